"""Packaging as a user meets it: the sdist builds the wheels on its own, each
wheel is tagged for its architecture and carries that architecture's BPF
object, installs in a fresh venv and runs, and the README's install blocks
work as written on a fresh Debian 12."""
from __future__ import annotations

import os
import platform
import re
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERSION = re.search(r'__version__ = "(.+)"', open(os.path.join(REPO, "tracer", "version.py")).read())[1]
EM_BPF = 247
MACHINE = platform.machine()
# the Python a Debian 12 user has, for the fresh venvs (else this one)
SYSTEM_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def run(cmd, timeout=600, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """scripts/build-wheels.sh: the sdist, then from it the x86-64 and arm64 wheels."""
    out = tmp_path_factory.mktemp("dist")
    run(["bash", "scripts/build-wheels.sh", str(out)], cwd=REPO, env={**os.environ, "PYTHON": sys.executable},
        timeout=900)
    return out


def wheel(dist, machine: str):
    return dist / f"pkttrace-{VERSION}-py3-none-linux_{machine}.whl"


def elf_sections(data: bytes) -> dict[str, bytes]:
    """The PROGBITS sections of a little-endian ELF64 object, by name."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = heads[shstrndx][4]
    out = {}
    for name, typ, _flags, _addr, off, size in heads:
        if typ == 1:                                    # SHT_PROGBITS
            out[data[strtab + name:data.index(b"\0", strtab + name)].decode()] = data[off:off + size]
    return out


def test_sdist_carries_everything_a_wheel_build_needs_and_no_built_object(dist):
    with tarfile.open(dist / f"pkttrace-{VERSION}.tar.gz") as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tracked = run(["git", "ls-files", "bpf", "systemd", "dashboards", "docs", "tracer", "README.md"],
                  cwd=REPO).stdout.split()
    assert tracked and not set(tracked) - names, f"tracked files missing from the sdist: {set(tracked) - names}"
    assert "bpf/include/vmlinux.h" in names and "bpf/Makefile" in names
    assert not [n for n in names if n.endswith((".o", ".pyc"))]


def test_wheels_are_tagged_per_architecture_and_carry_their_own_object_and_the_service_files(dist):
    objs = {}
    for machine in ("x86_64", "aarch64"):
        with zipfile.ZipFile(wheel(dist, machine)) as z:
            meta = z.read(f"pkttrace-{VERSION}.dist-info/WHEEL").decode()
            assert f"Tag: py3-none-linux_{machine}\n" in meta and "Root-Is-Purelib: false" in meta
            objs[machine] = z.read("tracer/data/pkttrace.bpf.o")
            assert not [n for n in z.namelist() if ".data/" in n]     # at the root (platlib), not under .data/
        assert objs[machine][:4] == b"\x7fELF" and objs[machine][18] == EM_BPF
    with zipfile.ZipFile(wheel(dist, MACHINE)) as z:
        shipped = {n[len("tracer/data/"):]: z.read(n) for n in z.namelist() if n.startswith("tracer/data/")}
    # the unit, its environment file and the dashboards, as the checkout has them
    tracked = run(["git", "ls-files", "systemd", "dashboards"], cwd=REPO).stdout.split()
    want = [f for f in tracked if not f.endswith((".py", ".md"))]
    assert "systemd/pkttrace.service" in want and "dashboards/pkttrace-paths.json" in want
    for f in want:
        assert shipped.get(f) == open(os.path.join(REPO, f), "rb").read(), f
    # the live page's files (pkttrace serve, /) and the drawing's stylesheet, as the checkout has them
    with zipfile.ZipFile(wheel(dist, MACHINE)) as z:
        web = {n: z.read(n) for n in z.namelist() if n.startswith("tracer/web/")}
    tracked_web = run(["git", "ls-files", "tracer/web"], cwd=REPO).stdout.split()
    assert {"tracer/web/page.html", "tracer/web/page.js", "tracer/web/page.css", "tracer/web/diagram.css"} <= \
        set(tracked_web) == set(web)
    for f in tracked_web:
        assert web[f] == open(os.path.join(REPO, f), "rb").read(), f
    x86, arm = elf_sections(objs["x86_64"]), elf_sections(objs["aarch64"])
    progs = [s for s in x86 if "/" in s and not s.startswith(".")]
    assert set(progs) == {s for s in arm if "/" in s and not s.startswith(".")}
    # only the kprobe programs read struct pt_regs, whose layout is the
    # architecture's: they all differ, every other program is the same
    differ = {s for s in progs if x86[s] != arm[s]}
    kprobes = {s for s in progs if s.startswith(("kprobe/", "kretprobe/"))}
    assert kprobes and differ == kprobes
    # sock_def_readable(sk): sk is di (offset 112 in x86-64's pt_regs), x0 (regs[0], offset 0) on arm64;
    # one of the first instructions loads it: ldxdw (0x79) from r1, the
    # context, before anything writes r1 (the compiler orders the rest freely)
    for obj, off in ((x86, 112), (arm, 0)):
        code_of, loads = obj["kprobe/sock_def_readable"], []
        for at in range(0, 8 * 8, 8):
            code, regs, insn_off = struct.unpack_from("<BBh", code_of, at)
            if code == 0x79 and regs >> 4 == 1:
                loads.append(insn_off)
                break
            if regs & 0xF == 1:
                break       # r1 overwritten: no load from the context after this
        assert loads == [off]


def test_a_wheel_for_another_architecture_is_refused_by_pip(dist, tmp_path):
    other = "aarch64" if MACHINE == "x86_64" else "x86_64"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--dry-run", "--target",
                        str(tmp_path), str(wheel(dist, other))], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "is not a supported wheel on this platform" in r.stderr


@pytest.mark.root
def test_the_wheel_built_from_the_sdist_installs_in_a_fresh_venv_and_loads(dist, tmp_path):
    venv = tmp_path / "venv"
    run([SYSTEM_PY, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", str(wheel(dist, MACHINE))])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PKTTRACE_BPF_OBJECT")}
    out = run([str(venv / "bin" / "pkttrace"), "--help"], cwd=tmp_path, env=env).stdout
    assert "doctor" in out and "serve" in out
    obj = run([str(venv / "bin" / "python"), "-c", "from tracer.libbpf import object_path; print(object_path())"],
              cwd=tmp_path, env=env).stdout.strip()
    assert obj.startswith(str(venv)) and obj.endswith("tracer/data/pkttrace.bpf.o")
    # the installed object, not the checkout's, loads into this kernel
    doc = subprocess.run([str(venv / "bin" / "pkttrace"), "doctor"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert re.search(rf"^ok +BPF programs load +{re.escape(obj)}$", doc.stdout, re.M), doc.stdout + doc.stderr


FAKE_MACHINE = """
import os, sys
u = os.uname()
os.uname = lambda: os.uname_result((u.sysname, u.nodename, u.release, u.version, sys.argv[1]))
from tracer.cli import run
sys.exit(run(sys.argv[2:]))
"""


@pytest.mark.root
@pytest.mark.parametrize("args", [["-c", "1", "--duration", "1"], ["serve", "--listen", "127.0.0.1:1"]])
def test_an_unknown_architecture_is_one_line_and_exit_1(args):
    # the real command on this kernel, only os.uname() says another machine
    r = subprocess.run([sys.executable, "-c", FAKE_MACHINE, "mips64", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("pkttrace: unsupported architecture mips64: ") and "x86_64" in r.stderr


def readme_block(name: str) -> str:
    """The shell block after `<!-- tested: NAME ... -->` in the README."""
    text = open(os.path.join(REPO, "README.md")).read()
    m = re.search(rf"<!-- tested: {name}\b.*?-->\n```sh\n(.*?)```", text, re.S)
    assert m, f"README.md has no block marked `tested: {name}`"
    return m.group(1)


# After the README's block: where `pkttrace` on PATH leads, which object that
# install loads, and --version where the CLI has it.
AFTER = r"""
cd /root     # not in a checkout: python -c would import its tracer/
help=$(pkttrace --help)
py=$(dirname "$(readlink -f "$(command -v pkttrace)")")/python
obj=$("$py" -c 'from tracer.libbpf import object_path; print(object_path())')
echo "RESULT bin=$(readlink -f "$(command -v pkttrace)")"
echo "RESULT object=$obj"
case "$help" in *--version*) echo "RESULT version=$(pkttrace --version)";; esac
if [ -e /etc/bash_completion.d/pkttrace ]; then
  echo "RESULT completion=$(head -n 1 /etc/bash_completion.d/pkttrace)"
  echo "RESULT man=$(sed -n 2p /usr/local/share/man/man1/pkttrace.1)"
  echo "RESULT unit=$(grep '^ExecStart=' /etc/systemd/system/pkttrace.service)"
  echo "RESULT dashboards=$(ls /usr/share/pkttrace/dashboards/*.json | wc -l)"
fi
"""


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("blocks,prefix", [(("install-venv", "install-extras"), "/opt/pkttrace/"),
                                           (("install-pipx",), "/opt/pipx/"),
                                           (("install-checkout",), "/opt/pkttrace/")])
def test_the_readme_install_block_works_on_a_fresh_debian_12(dist, tmp_path, blocks, prefix):
    """scripts/bookworm-chroot.sh: a fresh copy of a cached debootstrap (minbase,
    python3, python3-venv), the wheel in /root, the blocks run there as is."""
    script = tmp_path / "run.sh"
    sdist = dist / f"pkttrace-{VERSION}.tar.gz"
    # "in the checkout": the sdist unpacked stands for one (the same tracked files)
    before = f"tar xzf {sdist.name} && cd pkttrace-{VERSION}\n" if "install-checkout" in blocks else ""
    script.write_text(before + "".join(map(readme_block, blocks)) + AFTER)
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", "bookworm-chroot.sh"), str(script),
                        str(wheel(dist, MACHINE)), str(sdist)], capture_output=True, text=True, timeout=1800)
    if r.returncode == 3:
        pytest.skip(f"no Debian 12 to try it in: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = dict(line[len("RESULT "):].split("=", 1) for line in r.stdout.splitlines() if line.startswith("RESULT "))
    assert result["bin"].startswith(prefix) and result["object"].startswith(prefix), result
    assert result["object"].endswith("/tracer/data/pkttrace.bpf.o")
    if "version" in result:
        assert VERSION in result["version"]
    if "install-extras" in blocks:      # what bash, man and systemd read
        assert result["completion"].startswith("_pkttrace_completion()") and result["man"] == ".SH NAME"
        # the unit runs the pkttrace on PATH, the link into /opt/pkttrace; the wheel shipped the files
        assert result["unit"] == "ExecStart=/usr/local/bin/pkttrace serve" and int(result["dashboards"]) >= 2
    print(f"{' + '.join(blocks)}: {time.monotonic() - t0:.0f} s in the chroot")
