"""`pkttrace serve` under load: 1,000 idle connections and 50 scrapes/s at once (issue 11)."""
from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# what prometheus-client's own server answers a scrape without an Accept header
# (0.16: CONTENT_TYPE_LATEST; 0.22+: the 0.0.4 text format, not CONTENT_TYPE_LATEST)
CONTENT_TYPE = choose_encoder(None)[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


def settled_fd_count(pid: int, samples: int = 10) -> int:
    """The fd count without the short-lived netlink sockets of a ruleset check."""
    counts = []
    for _ in range(samples):
        counts.append(fd_count(pid))
        time.sleep(0.05)
    return min(counts)


def wait_fd_count(pid: int, want: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = settled_fd_count(pid, 4)
        if n == want or time.monotonic() > deadline:
            return n


@contextlib.contextmanager
def serving(*netns: str, listen_host: str = "127.0.0.1"):
    """`pkttrace serve` as users run it, ready (READY=1) when entered: (proc, url)."""
    port = free_port(listen_host)
    listen = f"[{listen_host}]:{port}" if ":" in listen_host else f"{listen_host}:{port}"
    d = tempfile.mkdtemp()
    sock_path = os.path.join(d, "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(sock_path)
    ns.settimeout(30)
    args = [sys.executable, "-m", "tracer", "serve", "--listen", listen]
    for n in netns:
        args += ["--netns", n]
    proc = subprocess.Popen(args, env=dict(os.environ, NOTIFY_SOCKET=sock_path), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg, msg
        yield proc, f"http://{listen}/metrics"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ns.close()
        os.unlink(sock_path)
        os.rmdir(d)


def scrape(url: str) -> tuple[int, str, str]:
    with _http.open(url, timeout=15) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def valid_exposition(text: str) -> bool:
    names = {f.name for f in text_string_to_metric_families(text)}
    return "pkttrace_build_info" in names and "pkttrace_packets" in names


@pytest.fixture
def many_fds():
    """Room in this process for 1,000 client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if want < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: cannot open 1,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_and_scrapes_at_once(lab, many_fds):
    with serving(lab.router) as (proc, url):
        pid = proc.pid
        assert scrape(url)[0] == 200
        base_fds = settled_fd_count(pid)
        threads_seen, fds_seen = [thread_count(pid)], [base_fds]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                threads_seen.append(thread_count(pid))
                fds_seen.append(fd_count(pid))
                time.sleep(0.02)

        idle: list[socket.socket] = []
        failed_connects = []

        def open_idle():
            host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
            for _ in range(1000):
                try:
                    idle.append(socket.create_connection((host, int(port)), timeout=10))
                except OSError as e:
                    failed_connects.append(e)
                time.sleep(0.001)

        results = []

        def timed_scrape():
            t0 = time.monotonic()
            try:
                st, ctype, body = scrape(url)
            except Exception as e:   # noqa: BLE001 - reported below
                results.append((repr(e), None, False, time.monotonic() - t0))
                return
            results.append((st, ctype, valid_exposition(body), time.monotonic() - t0))

        sampler = threading.Thread(target=sample)
        opener = threading.Thread(target=open_idle)
        sampler.start()
        opener.start()
        try:
            # 50 scrapes a second for 5 seconds, each on its own connection
            with ThreadPoolExecutor(max_workers=16) as pool:
                t0 = time.monotonic()
                for i in range(250):
                    delay = t0 + i / 50 - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(timed_scrape)
            opener.join()
        finally:
            stop.set()
            sampler.join()
            opened = len(idle)
            for s in idle:
                s.close()

        assert not failed_connects and opened == 1000, failed_connects[:3]
        bad = [r for r in results if r[:3] != (200, CONTENT_TYPE, True)]
        assert len(results) == 250 and not bad, bad[:5]
        assert max(threads_seen) <= 16, max(threads_seen)
        # at most 256 connections held at once: idle ones give way
        assert max(fds_seen) <= base_fds + 256 + 16, (base_fds, max(fds_seen))
        assert wait_fd_count(pid, base_fds) == base_fds
        slowest = max(r[3] for r in results)
        print(f"threads max {max(threads_seen)}, fds {base_fds}..{max(fds_seen)}, slowest scrape {slowest:.3f} s")

        assert scrape(url)[0] == 200
        proc.terminate()
        assert proc.wait(15) == 0
        assert "stopped" in proc.stderr.read()


def test_ipv6_listen_address(lab):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        free_port("::1")
    except OSError as e:
        pytest.skip(f"no ::1 here: {e}")
    with serving(lab.router, listen_host="::1") as (proc, url):
        st, ctype, body = scrape(url)
        assert st == 200 and ctype == CONTENT_TYPE and valid_exposition(body)
        proc.terminate()
        assert proc.wait(15) == 0
