"""Build the CO-RE BPF object and ship it inside the package.

The object is compiled once here (clang, -target bpf); where pkttrace runs,
libbpf relocates it against that kernel's BTF, so no compiler is needed there.

The Python code is pure, but the object is not quite: its kprobe programs
read arguments from the target's `struct pt_regs` (bpf/Makefile).  So the
wheel is tagged for one platform, py3-none-linux_x86_64 by default (the
build host's), and `bdist_wheel --plat-name linux_aarch64` builds the arm64
object into an arm64 wheel (scripts/build-wheels.sh builds both).
"""
import os
import shutil
import subprocess
import sysconfig

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

from setuptools.command.bdist_wheel import bdist_wheel   # setuptools >= 70.1 (pyproject asks 77)

HERE = os.path.dirname(os.path.abspath(__file__))

# wheel platform tag's machine -> bpf/Makefile's ARCH (__TARGET_ARCH_*)
BPF_ARCH = {"x86_64": "x86", "aarch64": "arm64"}


def bpf_arch(plat: str) -> str:
    """The BPF target of a platform tag: linux_x86_64, manylinux2014_aarch64..."""
    for machine, arch in BPF_ARCH.items():
        if plat.endswith("_" + machine):
            return arch
    raise SystemExit(f"setup.py: no BPF object for platform {plat}: pkttrace builds "
                     f"{', '.join('linux_' + m for m in BPF_ARCH)}")


class BuildWithBpf(build_py):
    """Compile the object for the wheel's platform into tracer/data/."""

    def run(self):
        plat = getattr(self.distribution, "pkttrace_plat", None) or sysconfig.get_platform()
        arch = bpf_arch(plat.replace("-", "_"))
        # built under build/ (never bpf/pkttrace.bpf.o, the checkout's
        # own object for the host), one file per architecture
        out = os.path.abspath(os.path.join(self.get_finalized_command("build").build_temp, f"bpf-{arch}",
                                           "pkttrace.bpf.o"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run(["make", "-s", "-C", os.path.join(HERE, "bpf"), f"ARCH={arch}", f"OUT={out}"], check=True)
        super().run()
        dest = os.path.join(self.build_lib, "tracer", "data")
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(out, os.path.join(dest, "pkttrace.bpf.o"))
        # the unit, its environment file and the dashboards travel with the
        # package (tracer/data/systemd, tracer/data/dashboards), so an
        # installed pkttrace can put them in place without a checkout
        shutil.copytree(os.path.join(HERE, "systemd"), os.path.join(dest, "systemd"), dirs_exist_ok=True)
        shutil.copytree(os.path.join(HERE, "dashboards"), os.path.join(dest, "dashboards"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.py", "*.md", "__pycache__"))


class PlatformDistribution(Distribution):
    """Platform-specific like a C extension (build/lib.<plat>, platlib, a
    platform tag), though it has none: the object is the platform part."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: any Python 3, no C ABI, one architecture's object."""

    def get_tag(self):
        plat = super().get_tag()[2]
        return "py3", "none", plat

    def run(self):
        # build_py runs inside this command: tell it which object to build
        self.distribution.pkttrace_plat = self.get_tag()[2]
        super().run()


setup(distclass=PlatformDistribution, cmdclass={"build_py": BuildWithBpf, "bdist_wheel": PlatformWheel})
