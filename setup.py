"""Build the CO-RE BPF object and ship it inside the package.

The object is compiled once here (clang, -target bpf); where pkttrace runs,
libbpf relocates it against that kernel's BTF, so no compiler is needed there.
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithBpf(build_py):
    def run(self):
        subprocess.run(["make", "-C", os.path.join(HERE, "bpf")], check=True)
        super().run()
        dest = os.path.join(self.build_lib, "tracer", "data")
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(os.path.join(HERE, "bpf", "pkttrace.bpf.o"), dest)


setup(cmdclass={"build_py": BuildWithBpf})
