"""tests/promtools.py for real: a private Prometheus scrapes a prometheus_client exporter.

No root needed; needs Debian's `prometheus` package (scripts/setup.sh installs it).
"""
from __future__ import annotations

import os
import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from promtools import PROMETHEUS, PROMTOOL, PrometheusError, PrometheusServer, promtool_check_metrics

pytestmark = pytest.mark.skipif(not os.path.exists(PROMETHEUS),
                                reason=f"{PROMETHEUS} missing: apt-get install prometheus (scripts/setup.sh)")


class FakeCounters:
    """A custom collector shaped like the exporter's: counters built at scrape time."""

    def __init__(self):
        self.scrapes = 0

    def collect(self):
        self.scrapes += 1
        c = CounterMetricFamily("pkttrace_packets", "Packets whose traversal ended.",
                                labels=["netns", "family", "fate"])
        c.add_metric(["", "ipv4", "forwarded"], 42)
        c.add_metric(["lab", "ipv4", "dropped"], 3 * self.scrapes)  # grows: rate() > 0
        yield c
        g = GaugeMetricFamily("pkttrace_inflight_records", "Packets followed right now.")
        g.add_metric([], 7)
        yield g


@pytest.fixture
def exporter():
    reg = CollectorRegistry()
    reg.register(FakeCounters())
    server, thread = start_http_server(0, addr="127.0.0.1", registry=reg)  # port 0: no race for a free one
    try:
        yield f"127.0.0.1:{server.server_port}", reg
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_prometheus_scrapes_a_custom_collector(exporter):
    target, _ = exporter
    with PrometheusServer([target]) as prom:
        (sample,) = prom.wait_for('pkttrace_packets_total{fate="forwarded"}', timeout=30)
        assert float(sample["value"][1]) == 42
        # an empty label value (the host's netns) is no label at all in Prometheus
        assert "netns" not in sample["metric"]
        assert sample["metric"]["job"] == "pkttrace" and sample["metric"]["instance"] == target
        (sample,) = prom.wait_for('pkttrace_packets_total{netns="lab"}')
        assert sample["metric"]["fate"] == "dropped"
        assert prom.wait_for('rate(pkttrace_packets_total{netns="lab"}[5s]) > 0', timeout=30)
        assert float(prom.query("pkttrace_inflight_records")[0]["value"][1]) == 7
        assert prom.query("pkttrace_no_such_metric") == []
        assert prom.query("scalar(pkttrace_inflight_records)")[0][1] == "7"  # scalars come wrapped
        with pytest.raises(PrometheusError, match="parse"):
            prom.query("sum by (")
        proc, port, data = prom.proc, prom.port, prom.dir
    # stopped and cleaned up
    assert proc.poll() is not None and prom.proc is None
    assert not os.path.exists(data)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_wait_for_times_out_with_the_targets_state():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with PrometheusServer([dead]) as prom:
        with pytest.raises(PrometheusError, match="no result") as e:
            prom.wait_for("pkttrace_inflight_records", timeout=2)
        assert dead in str(e.value)


@pytest.mark.skipif(not os.path.exists(PROMTOOL), reason=f"{PROMTOOL} missing")
def test_promtool_check_metrics(exporter):
    _, reg = exporter
    ok, out = promtool_check_metrics(generate_latest(reg).decode())
    assert ok, out
    # a counter without the _total suffix: promtool lints it (exit 3)
    ok, out = promtool_check_metrics("# HELP pkttrace_packets Packets.\n# TYPE pkttrace_packets counter\n"
                                     "pkttrace_packets 1\n")
    assert not ok and "_total" in out
    ok, out = promtool_check_metrics("not an exposition {\n")
    assert not ok and "pars" in out
