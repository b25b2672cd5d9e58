"""`pkttrace serve` on a real lab, scraped by a real Prometheus (issue 4)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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
from servectl import free_port, serving  # noqa: E402

pytestmark = pytest.mark.root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
    with serving(lab.router, PKTTRACE_BPF_STATS="1") as served_proc:
        yield served_proc


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
    # the queue panels need a qdisc that queues and drops: a shaper on rs2,
    # where the demo's marked UDP to 5001 leaves, and bursts through it
    shaper = ["ip", "netns", "exec", lab.router, "tc", "qdisc", "{}", "dev", "rs2", "root"]
    subprocess.run([a.format("add") for a in shaper] + ["tbf", "rate", "1mbit", "burst", "3000", "limit", "6000"],
                   check=True)
    try:
        with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
            prom.wait_for('up{job="pkttrace"} == 1')
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:     # traffic across several scrapes: rate() needs two
                all_kinds_of_traffic(lab)
                lab.udp_send(lab.client, lab.addr["server4"], 5001, b"q" * 1000, count=20)
                time.sleep(1)
            prom.wait_for("pkttrace_packets_total")
            _every_panel_has_data(prom)
    finally:
        subprocess.run([a.format("del") for a in shaper], check=True)


def _every_panel_has_data(prom) -> None:
    panels: dict[tuple, list] = {}
    for dash, panel, expr in dashboard_queries(os.path.join(REPO, "dashboards")):
        panels.setdefault((dash, panel), []).append(bool(prom.query(expr)))
    empty = [k for k, results in panels.items() if not any(results)]
    assert panels and not empty, f"panels without data: {empty}"


def series(text: str) -> list[tuple[str, tuple]]:
    """(name, sorted labels) of every sample of a scrape, as exposed."""
    return [(s.name, tuple(sorted(s.labels.items())))
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def test_label_sets_are_unique_per_series(served, lab):
    """No two samples of a scrape share a name and label set: e.g. two paths
    that differ only by protocol (the kernel's path key has it) each carry
    their `proto`.  Prometheus would drop all but one."""
    _, port = served
    all_kinds_of_traffic(lab)
    a = lab.addr
    lab.ping(lab.client, a["server4"])                    # icmp and udp along the same hooks
    lab.udp_send(lab.client, a["server4"], 5002)
    time.sleep(0.5)
    text = scrape(port)
    seen = series(text)
    dupes = {k for k in seen if seen.count(k) > 1}
    assert not dupes, sorted(dupes)[:5]
    protos = {dict(lb).get("proto") for name, lb in seen if name == "pkttrace_paths_total"}
    assert {"icmp", "udp"} <= protos


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="Debian's prometheus package is not installed")
def test_prometheus_sees_no_duplicate_series(served, lab):
    _, port = served
    with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
        prom.wait_for('up{job="pkttrace"} == 1')
        for _ in range(3):
            all_kinds_of_traffic(lab)
            time.sleep(1)
        prom.wait_for("pkttrace_paths_total")
        # Prometheus's own count of samples it had to drop from a scrape
        # because an earlier one of the same scrape had the same series
        # (its own /metrics: it does not scrape itself here)
        own = _http.open(prom.url + "/metrics", timeout=10).read().decode()
        assert "prometheus_target_scrapes_sample_duplicate_timestamp_total" in own
        assert value(own, "prometheus_target_scrapes_sample_duplicate_timestamp_total") == 0
        assert value(own, "prometheus_target_scrapes_sample_out_of_order_total") == 0


def test_process_metrics_are_exported(served):
    _, port = served
    text = scrape(port)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "process_max_fds"):
        assert value(text, name) > 0, name
    # this process's, not some other's
    proc, _ = served
    assert value(text, "process_start_time_seconds") >= time.time() - 3600


def _plan():
    """What the served pkttrace uses on this kernel (the same choice)."""
    from tracer import backends
    return backends.plan(backends.probe(), os.environ.get("PKTTRACE_BACKEND", "auto"),
                         os.environ.get("PKTTRACE_TC", "auto"))


def _attached(text: str) -> list[tuple[dict, float]]:
    return [(dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "pkttrace_attached"]


def _tc_target(lb: dict, direction: str, dev: str) -> bool:
    """A tc observer's target on dev: a TCX link (`tcx ingress rc`) or, where
    the kernel has no TCX (before 6.6), a classic filter (`cls_bpf ingress rc pref 1`)."""
    return lb["target"] == f"tcx {direction} {dev}" or lb["target"].startswith(f"cls_bpf {direction} {dev} pref ")


def test_every_attachment_has_an_attached_gauge(served, lab):
    _, port = served
    text = scrape(port)
    att = _attached(text)
    assert att and all(v == 1 for _, v in att), [a for a in att if a[1] != 1]
    router = [lb for lb, _ in att if lb["netns"] == lab.router]
    nf = [lb for lb in router if lb["target"].startswith("netfilter ")]
    if nf:
        # netfilter links (6.4+): a link per observer, by the program the kernel says it runs
        assert len(nf) == value(text, "pkttrace_observers", netns=lab.router) > 0
        assert {lb["program"] for lb in nf} <= {"nf_obs_0", "nf_obs_1"}
    else:
        # fentry or kprobe backend: host-wide programs on the hook machinery
        hook = {lb["target"] for lb, _ in att if lb["netns"] == ""}
        assert hook & {"fentry/nf_hook_slow", "kprobe/nf_hook_slow"}, sorted(hook)
    tc = [lb for lb in router if lb["program"] in ("tc_ingress", "tc_egress")]
    tps = {lb["program"]: lb["target"] for lb, _ in att if lb["target"].startswith("tp_btf/")}
    assert tps.get("on_kfree_skb") == "tp_btf/kfree_skb"
    if not _plan().tc:
        # no tc observers (6.1: no kfunc bpf_cast_to_kern_ctx): the receive
        # and queue tracepoints stand in for them, host-wide
        assert not tc
        assert (tps.get("on_rx"), tps.get("on_dev_queue")) == ("tp_btf/netif_receive_skb", "tp_btf/net_dev_queue")
        return
    # tc observers on every device of the router, both directions
    devices = {ln.split(":")[1].strip().split("@")[0] for ln in lab.ip(lab.router, "-o", "link", "show").splitlines()}
    for d in ("ingress", "egress"):
        for n in devices:
            assert sum(_tc_target(lb, d, n) for lb in tc) == 1, (d, n, [lb["target"] for lb in tc])
    assert len(tc) == 2 * len(devices)


def test_a_new_device_gets_attached_gauges_and_loses_them_when_deleted(served, lab):
    if not _plan().tc:
        pytest.skip("tc observers switched off (PKTTRACE_TC=off)" if os.environ.get("PKTTRACE_TC") == "off" else
                    "no tc observers on this kernel: kfunc bpf_cast_to_kern_ctx missing (Linux 6.2+)")
    _, port = served

    def ours() -> list[tuple[dict, float]]:
        return [(lb, v) for lb, v in _attached(scrape(port))
                if lb["netns"] == lab.router and _tc_target(lb, "ingress", "ptsvd0")]

    lab.ip(lab.router, "link", "add", "ptsvd0", "type", "veth", "peer", "name", "ptsvd1")
    try:
        deadline = time.monotonic() + 15      # (a TCG guest of the kernel matrix is slow)
        while [v for _, v in ours()] != [1]:
            assert time.monotonic() < deadline, "no attached gauge for a new device"
            time.sleep(0.2)
    finally:
        lab.ip(lab.router, "link", "del", "ptsvd0")
    deadline = time.monotonic() + 15
    while ours():
        assert time.monotonic() < deadline, "the deleted device's gauge stayed"
        time.sleep(0.2)


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
    assert value(after, "pkttrace_map_overflow_total") == 0, [ln for ln in after.splitlines()
                                                             if ln.startswith("pkttrace_map_overflow_total")]


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


def test_drops_are_counted_when_the_path_map_is_full(make_lab):
    """drops_total must not depend on room in the per-path map."""
    from tracer import netns
    lab = make_lab()
    srv = Exporter(ServeOptions(listen=("127.0.0.1", free_port()), netns=[lab.router], max_paths=16)).start()
    try:
        # 24 forwarded paths the router has not seen: one per IP protocol
        # number (the path key has the protocol), so path_counts is full
        with netns.entered(lab.client):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) for proto in range(150, 174)]
        for sk in socks:
            with sk:
                sk.sendto(b"x" * 8, (lab.addr["server4"], 0))
        time.sleep(0.5)

        assert srv.httpd is not None
        port = srv.httpd.server_address[1]

        def drops() -> float:
            return value(scrape(port), "pkttrace_drops_total", netns=lab.router, reason="NETFILTER_DROP")

        def overflow() -> float:
            return value(scrape(port), "pkttrace_drops_total", netns=lab.router, reason="NETFILTER_DROP",
                         stage="(overflow)", table="(overflow)")

        assert value(scrape(port), "pkttrace_map_overflow_total", map="path_counts") > 0
        before, before_over = drops(), overflow()
        lab.udp_send(lab.client, lab.addr["server4"], 5009, count=50)
        time.sleep(0.5)
        assert drops() - before == 50
        # a path the full map could not take: counted by drop_totals, shown as the (overflow) stage and table
        assert overflow() - before_over == 50
        assert value(scrape(port), "pkttrace_map_overflow_total", map="drop_totals") == 0
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
