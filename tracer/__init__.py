"""pkttrace: the path each packet really takes through the Linux network stack.

Flow: bpf/ (programs, shared header) -> libbpf (loader) -> probes (attach)
-> session (records) -> paths (assembly) -> output (terminal, JSON).
"""
__version__ = "0.1.0"
