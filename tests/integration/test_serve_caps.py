"""`pkttrace serve` as an unprivileged uid with only capabilities: what
systemd's DynamicUser= + AmbientCapabilities= gives it (issue 14)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request

import pytest

from tracer import caps

pytestmark = pytest.mark.root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETPRIV = shutil.which("setpriv")
NOBODY = 65534
ALL = [caps.NAMES[c] for c in caps.BASE]
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_nobody(cap_names: list[str]) -> list[str]:
    """setpriv: uid/gid nobody, these capabilities inheritable, ambient and
    bounding (everything else dropped), as systemd sets them up."""
    spec = ",".join(["-all"] + ["+" + c[4:].lower() for c in cap_names])
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", f"--inh-caps={spec}",
            f"--ambient-caps={spec}", f"--bounding-set={spec}"]


def _interpreter() -> tuple[str, dict] | None:
    """A Python that uid nobody can run with this checkout and its
    dependencies: this one, or the system's of the same version (a pyenv
    interpreter under /root is out of nobody's reach)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, sysconfig.get_paths()["purelib"]]))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{ver}"):
        r = subprocess.run(as_nobody([]) + [exe, "-c", "import tracer.serve, prometheus_client"], env=env,
                           capture_output=True, cwd=REPO, timeout=60)
        if r.returncode == 0:
            return exe, env
    return None


@pytest.fixture(scope="module")
def python():
    if SETPRIV is None:
        pytest.skip("setpriv not installed (Debian package util-linux)")
    found = _interpreter()
    if found is None:
        pytest.skip("no Python interpreter that uid nobody can run with this checkout")
    return found


def test_serves_metrics_as_nobody_with_exactly_the_ambient_capabilities(python, lab):
    exe, env = python
    port = free_port()
    proc = subprocess.Popen(as_nobody(ALL) + [exe, "-m", "tracer", "serve", "--listen", f"127.0.0.1:{port}",
                                               "--netns", lab.router, "--bpf-stats"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = _http.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        assert text, proc.stderr.read() if proc.poll() is not None else "no answer"
        with open(f"/proc/{proc.pid}/status") as f:
            status = f.read()
        uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(NOBODY)] * 4
        assert caps.missing(caps.BASE, caps.parse_status(status)) == []
        assert caps.parse_status(status) == sum(1 << c for c in caps.BASE)
        # attached in the named netns (setns) and per-program stats on (BPF_ENABLE_STATS)
        assert f'pkttrace_observers{{family="ipv4",hook="forward",netns="{lab.router}"}}' in text
        lab.ping(lab.client, lab.addr["server4"], count=2)
        time.sleep(0.3)
        text = _http.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        runs = [ln for ln in text.splitlines() if ln.startswith("pkttrace_bpf_runs_total")]
        assert any(float(ln.rsplit(" ", 1)[1]) > 0 for ln in runs), runs
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, proc.stderr.read()


@pytest.mark.parametrize("lacking", ALL)
def test_a_missing_capability_is_named_in_one_line_exit_2(python, lacking):
    exe, env = python
    r = subprocess.run(as_nobody([c for c in ALL if c != lacking]) + [exe, "-m", "tracer", "serve", "--listen",
                                                                      f"127.0.0.1:{free_port()}"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"pkttrace: {caps.missing_message([lacking])}"


def test_doctor_and_lab_check_capabilities_not_the_uid(python):
    """doctor passes its capability check as nobody with the four
    capabilities and names the missing one without; the lab says what it
    lacks in one line."""
    exe, env = python

    def doctor(cap_names):
        return subprocess.run(as_nobody(cap_names) + [exe, "-m", "tracer", "doctor"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    full = doctor(ALL)
    line = next(ln for ln in full.stdout.splitlines() if "capabilities" in ln)
    assert line.startswith("ok") and all(c in line for c in ALL), full.stdout + full.stderr
    short = doctor([c for c in ALL if c != "CAP_PERFMON"])
    line = next(ln for ln in short.stdout.splitlines() if "capabilities" in ln)
    assert short.returncode != 0 and not line.startswith("ok") and "CAP_PERFMON" in line
    lab = subprocess.run(as_nobody([]) + [exe, "-m", "tracer", "lab", "up", "--prefix", "ptcaps"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    lines = [ln for ln in lab.stderr.splitlines() if ln.strip()]
    assert lab.returncode != 0 and len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], lab.stderr
    assert "Traceback" not in lab.stderr


def test_netns_all_needs_sys_ptrace(python):
    exe, env = python
    r = subprocess.run(as_nobody(ALL) + [exe, "-m", "tracer", "serve", "--netns", "all"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"pkttrace: {caps.missing_message(['CAP_SYS_PTRACE'])}"


def test_cleanup_as_another_uid_removes_nothing_it_cannot_judge(python, lab):
    """Which pkttrace filters are dead is told by the fds processes hold; a
    uid that cannot read other users' fds must not guess (it would remove a
    live session's filters): it says why in one line, exit 1."""
    from tracer.session import TraceOptions, Tracer
    exe, env = python
    live = Tracer(TraceOptions(netns=[lab.router], tc="classic")).start()    # root's live classic session
    try:
        before = subprocess.run(["ip", "netns", "exec", lab.router, "tc", "filter", "show", "dev", "rc", "ingress"],
                                capture_output=True, text=True, check=True).stdout
        assert "pkttrace" in before
        r = subprocess.run(as_nobody(ALL) + [exe, "-m", "tracer", "cleanup", "--netns", lab.router], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        assert "cannot tell which pkttrace filters are still in use" in lines[0]
        after = subprocess.run(["ip", "netns", "exec", lab.router, "tc", "filter", "show", "dev", "rc", "ingress"],
                               capture_output=True, text=True, check=True).stdout
        assert after == before
    finally:
        live.close()
