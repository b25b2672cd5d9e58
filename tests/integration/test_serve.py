"""`pkttrace serve` on a real lab, scraped by a real Prometheus (issue 4)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tracer import demo
from tracer.serve import Exporter, ServeOptions

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from promtools import PROMETHEUS, PrometheusServer, dashboard_queries, promtool_check_metrics  # noqa: E402

pytestmark = pytest.mark.root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    return _http.open(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def served(lab):
    """`pkttrace serve` on the lab router as users run it, with systemd's
    readiness protocol: the test is the NOTIFY_SOCKET."""
    demo.setup(lab)
    port = free_port()
    d = tempfile.mkdtemp()
    sock_path = os.path.join(d, "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(sock_path)
    ns.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, PKTTRACE_LISTEN=f"127.0.0.1:{port}",
               PKTTRACE_NETNS=lab.router, PKTTRACE_BPF_STATS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tracer", "serve"], env=env, stdout=subprocess.PIPE,
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
        os.unlink(sock_path)
        os.rmdir(d)


def all_kinds_of_traffic(lab):
    """One of each: forwarded, delivered, sent, marked and policy-routed,
    rerouted, port-forwarded (DNAT), dropped."""
    a = lab.addr
    lab.ping(lab.client, a["server4"], count=2)
    lab.ping(lab.client, a["router_c4"])
    lab.ping(lab.router, a["server4"])
    lab.udp_send(lab.client, a["server4"], 5001)
    lab.udp_send(lab.router, a["server4"], 5003)
    lab.udp_send(lab.client, a["router_c4"], 8080)
    lab.udp_send(lab.client, a["server4"], 5009)


def test_counters_agree_with_the_traffic(served, lab):
    _, port = served
    before = scrape(port)
    n, m = 7, 5
    assert lab.ping(lab.client, lab.addr["server4"], count=n, timeout=3) == n
    lab.udp_send(lab.client, lab.addr["server4"], 5009, count=m)
    time.sleep(0.5)
    after = scrape(port)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    v4 = dict(netns=lab.router, family="ipv4")
    # each ping is an echo request and a reply, both forwarded
    assert delta("pkttrace_hook_packets_total", hook="forward", **v4) == 2 * n + m
    assert delta("pkttrace_packets_total", fate="forwarded", **v4) == 2 * n
    assert delta("pkttrace_table_packets_total", hook="forward", table="filter", **v4) == 2 * n
    assert delta("pkttrace_drops_total", reason="NETFILTER_DROP", stage="forward", table="filter", **v4) == m
    assert delta("pkttrace_packets_total", fate="dropped", **v4) == m
    assert value(after, "pkttrace_events_lost_total") == 0


def test_promtool_accepts_a_scrape(served, lab):
    _, port = served
    all_kinds_of_traffic(lab)
    ok, out = promtool_check_metrics(scrape(port))
    assert ok, out


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="Debian's prometheus package is not installed")
def test_prometheus_scrapes_and_every_dashboard_panel_has_data(served, lab):
    _, port = served
    with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
        prom.wait_for('up{job="pkttrace"} == 1')
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:     # traffic across several scrapes: rate() needs two
            all_kinds_of_traffic(lab)
            time.sleep(1)
        prom.wait_for("pkttrace_packets_total")
        empty = []
        panels: dict[tuple, list] = {}
        for dash, panel, expr in dashboard_queries(os.path.join(REPO, "dashboards")):
            panels.setdefault((dash, panel), []).append(bool(prom.query(expr)))
        empty = [k for k, results in panels.items() if not any(results)]
        assert panels and not empty, f"panels without data: {empty}"


def test_scraping_loses_nothing(served, lab):
    """A flood of dropped packets while a scraper hammers /metrics: every one counted."""
    _, port = served
    stop = threading.Event()
    scrapes = []

    def hammer():
        while not stop.is_set():
            scrapes.append(scrape(port))

    before = scrape(port)
    th = threading.Thread(target=hammer)
    th.start()
    k = 3000
    try:
        lab.udp_send(lab.client, lab.addr["server4"], 5009, count=k)
        time.sleep(1)
    finally:
        stop.set()
        th.join()
    after = scrape(port)
    assert len(scrapes) > 3
    labels = dict(netns=lab.router, family="ipv4", reason="NETFILTER_DROP", stage="forward", table="filter")
    assert value(after, "pkttrace_drops_total", **labels) - value(before, "pkttrace_drops_total", **labels) == k
    assert value(after, "pkttrace_events_lost_total") == 0
    assert value(after, "pkttrace_map_overflow_total") == 0


def test_sigterm_stops_cleanly_and_detaches(served):
    proc, port = served
    scrape(port)
    proc.terminate()
    assert proc.wait(15) == 0
    assert "stopped" in proc.stderr.read()
    from test_cli_process import wait_no_links   # bpftool: nothing of ours left
    assert wait_no_links() == []


def test_collect_does_not_allocate_per_packet(make_lab):
    """The work of a scrape depends on the number of paths, not of packets."""
    lab = make_lab()
    srv = Exporter(ServeOptions(listen=("127.0.0.1", free_port()), netns=[lab.router])).start()
    try:
        def measured_collect() -> tuple[int, int]:
            tracemalloc.start()
            fams = srv.collector.collect()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            return peak, sum(len(f.samples) for f in fams if not f.name.startswith("pkttrace_bpf_"))

        lab.udp_send(lab.client, lab.addr["server4"], 5009, count=10)
        time.sleep(0.3)
        srv.collector.collect()                 # resolves the path once
        small = measured_collect()
        lab.udp_send(lab.client, lab.addr["server4"], 5009, count=5000)
        time.sleep(0.5)
        big = measured_collect()
        # 500x the packets: about the same series (background IPv6 neighbour
        # discovery may add a path or two) and no memory per packet
        assert big[1] <= small[1] + 20
        assert big[0] < small[0] * big[1] / small[1] * 1.5 + 16384
    finally:
        srv.close()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("listen", ["9632", "localhost:9632", "127.0.0.1:99999", "[::1]"])
def test_bad_listen_is_one_line_exit_2(listen):
    r = run_cli("serve", "--listen", listen)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--listen" in r.stderr


def test_port_in_use_is_a_clear_error(lab):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("serve", "--listen", f"127.0.0.1:{s.getsockname()[1]}", "--netns", lab.router)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "cannot listen" in r.stderr


def test_env_var_options(lab):
    r = run_cli("serve", env=dict(os.environ, PKTTRACE_NETNS="no-such-ns"))
    assert r.returncode == 2 and "no-such-ns" in r.stderr
