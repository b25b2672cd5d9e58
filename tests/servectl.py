"""`pkttrace serve` run as users run it, for the integration tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(*netns: str, **env: str):
    """`pkttrace serve` on these namespaces, ready (systemd's readiness
    protocol: the test is the NOTIFY_SOCKET) when entered: (process, port).
    env: more PKTTRACE_* settings, e.g. PKTTRACE_BPF_STATS="1"."""
    port = free_port()
    d = tempfile.mkdtemp()
    sock_path = os.path.join(d, "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(sock_path)
    ns.settimeout(30)
    full_env = dict(os.environ, NOTIFY_SOCKET=sock_path, PKTTRACE_LISTEN=f"127.0.0.1:{port}",
                    PKTTRACE_NETNS=" ".join(netns), **env)
    proc = subprocess.Popen([sys.executable, "-m", "tracer", "serve"], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg, msg
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        ns.close()
        shutil.rmtree(d, ignore_errors=True)
