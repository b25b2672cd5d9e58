"""systemd/pkttrace.service under a real systemd (PID 1 of a systemd-nspawn
container): DynamicUser=, the capabilities, the sandbox, Type=notify and
RestartPreventExitStatus=2, serving metrics (issue 14).

Needs a Debian OS tree with systemd and Python 3.11 (README, "The unit
under real systemd"); skipped, saying how to make one, when it is absent:

    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,libbpf1 \\
        bookworm /var/tmp/pkttrace-nspawn/bookworm http://deb.debian.org/debian

The tree is never written: the container boots with --volatile=overlay
(writes go to a tmpfs), and the unit file, /etc/default/pkttrace and a
/usr/local/bin/pkttrace that runs this checkout are bind-mounted read-only,
with the dependencies from this venv.  The container shares the host's
network namespace: pkttrace traces the host's, and the test scrapes it
from inside the container.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time

import pytest

from tracer import caps

pytestmark = pytest.mark.root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TREE = os.environ.get("PKTTRACE_NSPAWN_TREE", "/var/tmp/pkttrace-nspawn/bookworm")
NSPAWN = shutil.which("systemd-nspawn")
UNIT = os.path.join(REPO, "systemd", "pkttrace.service")
# what the container may grant its services: the unit's capabilities; bpf()
# and perf_event_open() are outside nspawn's own seccomp allow-list
CAPS = [caps.NAMES[c] for c in caps.BASE]


def _skip_reason() -> str | None:
    if NSPAWN is None:
        return "systemd-nspawn not installed (Debian package systemd-container)"
    if not os.path.exists(os.path.join(TREE, "lib/systemd/systemd")):
        return (f"no OS tree with systemd at {TREE}: debootstrap --variant=minbase "
                "--include=systemd,systemd-sysv,dbus,python3,libbpf1 bookworm " + TREE)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Container:
    """A booted container; `run(...)` executes in all its namespaces."""

    def __init__(self, port: int):
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="ptsv-nspawn-")
        self.name = f"ptsv{os.getpid()}"
        self.proc: subprocess.Popen | None = None
        self.leader = 0

    def __enter__(self) -> "Container":
        wrapper = os.path.join(self.dir, "pkttrace")
        with open(wrapper, "w") as f:
            # the checkout and this venv's pure-Python dependencies, read-only
            f.write("#!/bin/sh\nPYTHONPATH=/opt/pkttrace/src:/opt/pkttrace/site exec /usr/bin/python3 -m tracer \"$@\"\n")
        os.chmod(wrapper, 0o755)
        # root-only TLS material and a web-config file, as an operator keeps
        # them in /etc/pkttrace: the dynamic user reads them only through
        # LoadCredential= (test_tls_and_basic_auth_through_credentials)
        etc = os.path.join(self.dir, "etc-pkttrace")
        os.mkdir(etc, 0o700)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", f"{etc}/tls.key",
                        "-out", f"{etc}/tls.crt"], check=True, capture_output=True, timeout=60)
        import bcrypt
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=8)).decode()
        with open(f"{etc}/web.yml", "w") as f:
            f.write(f"tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n"
                    f"basic_auth_users:\n  prom: '{hashed}'\n")
        for name in os.listdir(etc):
            os.chmod(os.path.join(etc, name), 0o600)
        env_file = os.path.join(self.dir, "pkttrace.env")
        with open(env_file, "w") as f:
            f.write(f"PKTTRACE_LISTEN=127.0.0.1:{self.port}\nPKTTRACE_BPF_STATS=1\n")
        os.chmod(env_file, 0o644)
        os.chmod(self.dir, 0o755)
        cmd = [NSPAWN, "-q", "-D", TREE, "-M", self.name, "--volatile=overlay", "--register=no", "--keep-unit",
               "--capability=" + ",".join(CAPS), "--system-call-filter=bpf perf_event_open",
               f"--bind-ro={REPO}:/opt/pkttrace/src",
               f"--bind-ro={sysconfig.get_paths()['purelib']}:/opt/pkttrace/site",
               f"--bind-ro={UNIT}:/etc/systemd/system/pkttrace.service",
               f"--bind-ro={env_file}:/etc/default/pkttrace",
               f"--bind-ro={wrapper}:/usr/local/bin/pkttrace",
               f"--bind-ro={etc}:/etc/pkttrace",
               "-b", "systemd.wants=pkttrace.service"]
        self.log = open(os.path.join(self.dir, "console.log"), "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.leader = self._find_init()
            self.wait_system_running()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _find_init(self) -> int:
        """The container's systemd: a child of nspawn's namespace process."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}: {self.console()}")
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                    with open(f"/proc/{fields[1]}/cmdline", "rb") as f:
                        parent = f.read()
                except (OSError, IndexError):
                    continue
                if comm == "systemd" and self.name.encode() in parent:
                    return int(pid)
            time.sleep(0.2)
        raise AssertionError(f"no systemd in the container: {self.console()}")

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{args}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def wait_system_running(self) -> None:
        # `--wait` returns once start-up is over (running or degraded); before
        # systemd's private socket exists it fails at once: try again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=120).strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.3)
        raise AssertionError(f"the container did not finish booting: {self.console()}")

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "pkttrace.service", "-p", ",".join(props))
        return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)

    def journal(self) -> str:
        return self.run("journalctl", "-u", "pkttrace", "--no-pager", "-o", "cat", check=False)

    def console(self) -> str:
        with open(os.path.join(self.dir, "console.log"), errors="replace") as f:
            return f.read()[-3000:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)     # nspawn: orderly power-off of the container
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def container():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with Container(free_port()) as ct:
        yield ct


def _scrape_inside(ct: Container) -> str:
    code = ("import urllib.request as u; print(u.build_opener(u.ProxyHandler({})).open("
            f"'http://127.0.0.1:{ct.port}/metrics', timeout=10).read().decode())")
    return ct.run("/usr/bin/python3", "-c", code)


def test_the_unit_serves_metrics_as_a_dynamic_user(container):
    ct = container
    st = ct.show("ActiveState", "SubState", "MainPID", "NRestarts", "Type")
    assert st["ActiveState"] == "active", (st, ct.journal())   # Type=notify: READY=1 arrived
    assert st["Type"] == "notify" and st["NRestarts"] == "0"
    status = ct.run("cat", f"/proc/{st['MainPID']}/status")
    fields = dict(ln.split(":", 1) for ln in status.splitlines())
    uid = int(fields["Uid"].split()[0])
    # DynamicUser=: a uid from systemd's dynamic range, never root
    assert 61184 <= uid <= 65519, fields["Uid"]
    assert caps.parse_status(status) == sum(1 << c for c in caps.BASE)
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    # in the service's own mount namespace and as its uid: the kernel
    # functions the fentry/kprobe backends (Linux < 6.4) look up by name
    # are visible (ProtectKernelTunables= and ProcSubset=pid would hide them)
    gid = int(fields["Gid"].split()[0])
    seen = ct.run("nsenter", "-t", st["MainPID"], "-m", "-S", str(uid), "-G", str(gid), "--",
                  "grep", "-c", " nf_hook_slow$", "/proc/kallsyms", check=False)
    assert seen.strip() == "1", seen
    text = _scrape_inside(ct)
    assert "pkttrace_build_info{" in text and 'pkttrace_observers{family="ipv4",hook="forward",netns=""}' in text
    # BPF_ENABLE_STATS worked under the sandbox (PKTTRACE_BPF_STATS=1)
    runs = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("pkttrace_bpf_runs_total")]
    assert runs and max(runs) > 0


def test_a_configuration_error_is_not_restarted(container):
    ct = container
    dropin = "/run/systemd/system/pkttrace.service.d"
    ct.run("mkdir", "-p", dropin)
    ct.run("sh", "-c", f"printf '[Service]\\nEnvironment=PKTTRACE_NETNS=no-such-ns\\n' > {dropin}/bad.conf")
    try:
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "pkttrace.service", check=False)
        time.sleep(7)          # RestartSec=5s: a restart would have happened by now
        st = ct.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert st == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2", "NRestarts": "0"}, st
        assert "unknown network namespace 'no-such-ns'" in ct.journal()
    finally:
        ct.run("rm", "-rf", dropin)
        ct.run("systemctl", "daemon-reload")


def test_tls_and_basic_auth_through_credentials(container):
    """The README's drop-in: root-only files handed to the dynamic user with
    LoadCredential=, the web-config's relative paths resolved in
    $CREDENTIALS_DIRECTORY."""
    ct = container
    dropin = "/run/systemd/system/pkttrace.service.d"
    ct.run("mkdir", "-p", dropin)
    ct.run("sh", "-c", f"printf '%s\\n' '[Service]' 'LoadCredential=web.yml:/etc/pkttrace/web.yml' "
                       f"'LoadCredential=tls.crt:/etc/pkttrace/tls.crt' 'LoadCredential=tls.key:/etc/pkttrace/tls.key' "
                       f"'Environment=PKTTRACE_WEB_CONFIG_FILE=%d/web.yml' > {dropin}/tls.conf")
    try:
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "pkttrace.service")
        st = ct.show("ActiveState")
        assert st["ActiveState"] == "active", ct.journal()
        code = ("import base64, ssl, sys, urllib.request as u, urllib.error as e\n"
                "ctx = ssl.create_default_context(cafile='/etc/pkttrace/tls.crt')\n"
                "o = u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=ctx))\n"
                "for auth in ('prom:pw', 'prom:wrong', None):\n"
                "    h = {'Authorization': 'Basic ' + base64.b64encode(auth.encode()).decode()} if auth else {}\n"
                f"    r = u.Request('https://127.0.0.1:{ct.port}/metrics', headers=h)\n"
                "    try:\n"
                "        print(o.open(r, timeout=10).status)\n"
                "    except e.HTTPError as x:\n"
                "        print(x.code)\n")
        assert ct.run("/usr/bin/python3", "-c", code).split() == ["200", "401", "401"]
    finally:
        ct.run("rm", "-rf", dropin)
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "pkttrace.service", check=False)
