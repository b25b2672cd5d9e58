"""The version of pkttrace (the package root, the exporter and the command line read it here)."""
__version__ = "0.1.0"
