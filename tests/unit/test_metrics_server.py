"""The /metrics HTTP server of `pkttrace serve`: bounded threads, connections and waits.

No root, no BPF: a plain prometheus-client registry behind the server.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app, start_http_server

from tracer.httpd import MetricsServer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port(host="127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry():
    reg = CollectorRegistry()
    Counter("pkttrace_test", "A counter", ["netns"], registry=reg).labels("ns1").inc(3)
    return reg


@pytest.fixture
def server(registry):
    made = []

    def make(host="127.0.0.1", **kw):
        srv = MetricsServer(host, 0, make_wsgi_app(registry), **kw).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def exchange(port: int, request: bytes, host="127.0.0.1", timeout=5.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                return out
            out += d


def get(port: int, host="127.0.0.1") -> bytes:
    return exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", host)


def without_date(resp: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", resp)


REQUESTS = [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.0\r\n\r\n",
    b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS /metrics HTTP/1.1\r\n\r\n",
    b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    b"GET /metrics?name[]=pkttrace_test_total HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n",
    b"GET /favicon.ico HTTP/1.1\r\n\r\n",
    b"NONSENSE\r\n\r\n",
]


def test_answers_exactly_as_prometheus_clients_own_server(server, registry):
    """Same status, headers and body for every kind of request, whatever
    the installed prometheus-client does (0.16 answers HEAD with the
    metrics, newer ones with 405)."""
    port = server().server_address[1]
    ref = free_port()
    # a thread per connection; 0.19 and later return (server, thread), 0.16 nothing
    res = start_http_server(ref, addr="127.0.0.1", registry=registry)
    try:
        for req in REQUESTS:
            assert without_date(exchange(port, req)) == without_date(exchange(ref, req)), req
    finally:
        if isinstance(res, tuple):
            res[0].shutdown()
            res[0].server_close()


def test_ipv6_loopback(server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = server("::1")
    except OSError as e:
        pytest.skip(f"no ::1 here: {e}")
    assert srv.socket.family == socket.AF_INET6
    resp = get(srv.server_address[1], "::1")
    assert resp.startswith(b"HTTP/1.0 200 OK") and b"pkttrace_test_total" in resp


def test_idle_connections_cost_no_thread_and_are_closed(server):
    srv = server(idle_timeout=0.5)
    port = srv.server_address[1]
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        time.sleep(0.2)
        assert threading.active_count() == threads
        assert get(port).startswith(b"HTTP/1.0 200 OK")   # served next to them
        deadline = time.monotonic() + 5
        while srv.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.open_connections == 0
        for s in idle:        # closed by the server: EOF
            s.settimeout(2)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    assert srv.stats["timed_out"] == 100


def test_a_request_sent_slowly_must_be_complete_in_the_idle_timeout(server):
    srv = server(idle_timeout=0.5)
    with socket.create_connection(("127.0.0.1", srv.server_address[1])) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(0.8)
        s.settimeout(2)
        assert s.recv(100) == b""


def test_at_most_max_connections_the_oldest_idle_give_way(server):
    srv = server(max_connections=20, idle_timeout=30)
    port = srv.server_address[1]
    idle = []
    try:
        for i in range(100):
            idle.append(socket.create_connection(("127.0.0.1", port)))
            if i % 10 == 9:
                assert get(port).startswith(b"HTTP/1.0 200 OK")
        time.sleep(0.2)
        assert srv.open_connections <= 20
        # the newest are kept, the oldest were closed
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()
    assert srv.stats["evicted"] >= 80


def test_clients_that_send_half_a_request_hold_no_worker(server):
    srv = server(workers=1, idle_timeout=30)
    port = srv.server_address[1]
    slow = []
    try:
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        t0 = time.monotonic()
        assert get(port).startswith(b"HTTP/1.0 200 OK")
        assert time.monotonic() - t0 < 2
    finally:
        for s in slow:
            s.close()


def big_app(environ, start_response):
    """More than any socket buffer holds."""
    if environ["REQUEST_METHOD"] == "OPTIONS":
        start_response("200 OK", [])
        return [b""]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"x" * (64 << 20)]


def test_a_client_that_never_reads_is_cut_after_the_io_timeout():
    srv = MetricsServer("127.0.0.1", 0, big_app, workers=1, io_timeout=0.5).start()
    try:
        port = srv.server_address[1]
        with socket.socket() as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connect: a small window
            stuck.connect(("127.0.0.1", port))
            stuck.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            time.sleep(0.2)
            t0 = time.monotonic()
            # the only worker is free again once the send timed out
            assert exchange(port, b"OPTIONS / HTTP/1.1\r\n\r\n", timeout=10).startswith(b"HTTP/1.0 200")
            assert time.monotonic() - t0 < 5
    finally:
        srv.close()


def test_close_joins_every_thread(registry):
    before = threading.active_count()
    srv = MetricsServer("127.0.0.1", 0, make_wsgi_app(registry), workers=6).start()
    idle = socket.create_connection(("127.0.0.1", srv.server_address[1]))
    assert threading.active_count() == before + 7
    srv.close()
    idle.close()
    assert threading.active_count() == before


OUT_OF_FDS = textwrap.dedent("""
    import os, resource, sys, time
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from tracer.httpd import MetricsServer
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    srv = MetricsServer("127.0.0.1", 0, make_wsgi_app(CollectorRegistry()), max_connections=1000,
                        idle_timeout=60).start()
    print(srv.server_address[1], flush=True)
    for line in sys.stdin:
        if line.strip() == "hog":          # take every fd left: none for accept()
            hog = []
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
        elif line.strip() == "free":
            for fd in hog:
                os.close(fd)
        print(dict(srv.stats), flush=True)
""")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_file_descriptors_sheds_connections_without_spinning():
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", OUT_OF_FDS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    conns = []
    try:
        port = int(proc.stdout.readline())
        # more idle connections than fds: the oldest give way, scrapes are answered
        for _ in range(150):
            conns.append(socket.create_connection(("127.0.0.1", port)))
        assert get(port).startswith(b"HTTP/1.0 200 OK")
        for s in conns:
            s.close()
        conns.clear()
        time.sleep(0.3)
        # no fd left at all, nothing idle to give up: pending connections are
        # closed through the reserve fd, and the accept loop does not spin
        proc.stdin.write("hog\n")
        proc.stdin.flush()
        proc.stdout.readline()
        cpu0 = cpu_seconds(proc.pid)
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            conns.append(s)
        for s in conns:
            try:
                assert s.recv(100) == b""     # closed at once
            except ConnectionResetError:
                pass
        time.sleep(1.0)
        assert proc.poll() is None
        assert cpu_seconds(proc.pid) - cpu0 < 0.3
        proc.stdin.write("free\n")
        proc.stdin.flush()
        stats = proc.stdout.readline()
        assert "'shed': 20" in stats, stats
        assert get(port).startswith(b"HTTP/1.0 200 OK")
    finally:
        for s in conns:
            s.close()
        proc.kill()
        proc.wait()


def test_serve_loads_its_programs_one_after_the_other():
    """Parallel verification costs two parses of the kernel's BTF at once
    (~15 MB more peak RSS); serve's budget is RSS, not ~180 ms of start."""
    from tracer.serve import Exporter, ServeOptions
    from tracer.session import TraceOptions
    assert TraceOptions().parallel_load is True
    assert Exporter(ServeOptions()).tracer.opts.parallel_load is False
