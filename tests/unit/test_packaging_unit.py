"""The per-architecture parts of packaging: the bpf() syscall number and the
BPF object's target (the wheels themselves: tests/integration/test_packaging.py)."""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import subprocess

import pytest

from tracer import libbpf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_machine(monkeypatch, machine: str) -> None:
    u = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result((u.sysname, u.nodename, u.release, u.version, machine)))


def test_this_machines_number_is_its_kernel_headers_one():
    # linux-libc-dev (a libbpf-dev dependency): asm/unistd_64.h on x86-64, asm-generic's on arm64
    found = {int(m) for h in glob.glob("/usr/include/*-linux-gnu*/asm*/unistd*.h")
             for m in re.findall(r"#define __NR_bpf (\d+)\b", open(h).read())
             if os.uname().machine != "x86_64" or h.endswith("asm/unistd_64.h")}
    if not found:
        pytest.skip("no kernel headers with __NR_bpf here (linux-libc-dev)")
    assert {libbpf.sys_bpf()} == found


def test_the_number_is_bpf_on_this_kernel():
    # an unknown bpf() command is EINVAL (EPERM unprivileged); another
    # syscall, or none, would answer otherwise
    attr = (ctypes.c_ubyte * 8)()
    with pytest.raises(OSError) as e:
        libbpf.bpf_syscall(9999, attr)
    assert e.value.errno in (errno.EINVAL, errno.EPERM)


@pytest.mark.parametrize("machine,nr", [("x86_64", 321), ("aarch64", 280), ("riscv64", 280), ("loongarch64", 280),
                                        ("ppc64le", 361), ("ppc64", 361), ("s390x", 351), ("armv7l", 386),
                                        ("armv6l", 386), ("i686", 357), ("i386", 357)])
def test_each_known_architecture(monkeypatch, machine, nr):
    fake_machine(monkeypatch, machine)
    assert libbpf.sys_bpf() == nr


def test_an_unknown_architecture_is_refused_before_any_syscall_or_libbpf(monkeypatch):
    fake_machine(monkeypatch, "mips64")
    monkeypatch.setattr(libbpf, "_lib", None)       # as in a new process
    called = []
    monkeypatch.setattr(libbpf, "_libc", type("NoLibc", (), {"syscall": lambda *a: called.append(a)})())
    for attempt in (libbpf.lib, lambda: libbpf.bpf_syscall(0, (ctypes.c_ubyte * 8)())):
        with pytest.raises(libbpf.UnsupportedArchitecture) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("unsupported architecture mips64: ") and "aarch64" in msg
    assert called == [] and libbpf._lib is None
    # a BpfError: the paths that make one line of those (session, doctor) make one of this
    assert issubclass(libbpf.UnsupportedArchitecture, libbpf.BpfError)


def make_n(*args):
    return subprocess.run(["make", "-s", "-n", "-B", "-C", os.path.join(REPO, "bpf"), *args], capture_output=True,
                          text=True, timeout=60)


def test_the_object_is_built_for_the_asked_architecture_into_its_own_file():
    arm = make_n("ARCH=arm64", "OUT=/nonexistent/x.o")
    assert arm.returncode == 0, arm.stderr
    assert "-D__TARGET_ARCH_arm64" in arm.stdout and "-include include/arm64_regs.h" in arm.stdout
    assert "-o /nonexistent/x.o" in arm.stdout
    host = {"x86_64": "x86", "aarch64": "arm64"}[os.uname().machine]
    default = make_n()
    assert f"-D__TARGET_ARCH_{host} " in default.stdout and "-o pkttrace.bpf.o" in default.stdout
    cross = make_n("ARCH=" + ("arm64" if host == "x86" else "x86"))
    assert re.search(r"-o pkttrace\.(arm64|x86)\.bpf\.o", cross.stdout)     # never over the host's object


def test_an_architecture_without_a_build_is_refused_by_make():
    r = make_n("ARCH=mips")
    assert r.returncode != 0 and "ARCH=mips: pkttrace's BPF object is built for x86 or arm64" in r.stderr


def _visible_commands(cmd, ctx, path="pkttrace"):
    """(path, command, ctx) for every visible command, from click's tree itself."""
    import click
    yield path, cmd, ctx
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _visible_commands(sub, click.Context(sub, info_name=name, parent=ctx), f"{path} {name}")


def test_the_man_page_renders_cleanly_and_has_every_command_and_option(tmp_path):
    import click

    from tracer import cli, manpage
    page = tmp_path / "pkttrace.1"
    page.write_text(manpage.render())
    # -ww: every warning; -z: no output, only the check
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou", "-rHY=0", str(page)], capture_output=True,
                          text=True, timeout=60, check=True).stdout
    assert "PKTTRACE(1)" in text and "EXIT STATUS" in text
    commands = list(_visible_commands(cli.main, click.Context(cli.main, info_name="pkttrace")))
    assert len(commands) > 5
    for path, cmd, ctx in commands:
        assert path in text, path
        for p in cmd.get_params(ctx):
            if isinstance(p, click.Option) and not p.hidden:
                assert all(o in text for o in p.opts), (path, p.opts)


def test_man_renders_it(tmp_path):
    import shutil

    from tracer import manpage
    if not shutil.which("man"):
        pytest.skip("man (man-db) not installed; groff rendered it above")
    page = tmp_path / "pkttrace.1"
    page.write_text(manpage.render())
    r = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "pkttrace doctor" in r.stdout and "--netns" in r.stdout.replace("‐", "-")


def test_bash_completion_script_completes_commands(tmp_path):
    # what the README says: _PKTTRACE_COMPLETE=bash_source pkttrace > /etc/bash_completion.d/pkttrace;
    # then bash itself, with that script, completes `pkttrace lab d`
    import sys
    exe = tmp_path / "pkttrace"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m tracer "$@"\n')
    exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    src = subprocess.run(["pkttrace"], env={**env, "_PKTTRACE_COMPLETE": "bash_source"}, capture_output=True,
                         text=True, timeout=60)
    assert src.returncode == 0 and "complete -o nosort -F _pkttrace_completion pkttrace" in src.stdout, src.stderr
    (tmp_path / "completion.bash").write_text(src.stdout)
    r = subprocess.run(["bash", "-c", f'source {tmp_path}/completion.bash; COMP_WORDS=(pkttrace lab d); COMP_CWORD=2; '
                        '_pkttrace_completion pkttrace; printf "%s\\n" "${COMPREPLY[@]}"'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["demo", "down"], r.stdout + r.stderr
