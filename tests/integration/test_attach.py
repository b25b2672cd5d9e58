"""Attach behaviour on a real kernel: priorities, doctor, the lab commands."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tracer import probes
from tracer.filters import PacketFilter
from tracer.session import TraceOptions, Tracer

pytestmark = pytest.mark.root


def test_priority_taken_by_an_nft_chain_moves_our_observer(lab):
    """EBUSY on an equal priority: pkttrace takes the next free one."""
    lab.nft("add", "table", "inet", "pt_busy")
    lab.nft("add", "chain", "inet", "pt_busy", "pre",
            "{ type filter hook prerouting priority -2147483647; policy accept; }")
    try:
        with Tracer(TraceOptions(netns=[lab.router], filter=PacketFilter(proto=1))) as t:
            # netfilter links are placed by priority; the fentry backend
            # (kernels before 6.4) observes the chain itself and places nothing
            nflink = t.plan.netfilter == "nflink"
            if nflink:
                # (the lab's mangle rule adds one more observer, after -150)
                pre4 = [a for a in t.observer_links() if "ipv4 prerouting" in a.what and a.priority < -1000]
                # the first observer wanted the chain's priority and moved up; the
                # one placed after the chain wanted that one and moved up again
                assert sorted(a.priority for a in pre4) == [probes.PRIO_FIRST + 1, probes.PRIO_FIRST + 2]
            # and the observation reports the priority it really ran at
            assert lab.ping(lab.client, lab.addr["server4"]) == 1
            for _ in range(30):
                pkts = [p for p in t.poll(0.1) if p.src == lab.addr["client4"]]
                if pkts:
                    break
            pre = pkts[0].path[pkts[0].stage_names().index("prerouting")]
            if nflink:
                assert pre.observations[0].priority == probes.PRIO_FIRST + 1
            assert [tb.table for tb in pre.tables][:1] == ["pt_busy/pre"]
    finally:
        lab.nft("delete", "table", "inet", "pt_busy")


def run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True, timeout=timeout)


def test_doctor_reports_every_feature():
    r = run("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    for feature in ("kernel BTF", "tracepoint kfree_skb", "tracepoint fib_table_lookup", "netfilter BPF links",
                    "TCX links", "kprobes", "fentry/fexit", "BPF programs load"):
        assert feature in r.stdout, feature
    assert "pkttrace will use:" in r.stdout


def test_lab_commands_up_status_down():
    prefix = "tcli"
    try:
        up = run("lab", "up", "--prefix", prefix)
        assert up.returncode == 0, up.stderr
        st = run("lab", "status", "--prefix", prefix, "--json")
        import json
        status = json.loads(st.stdout)
        assert status["complete"] and status["rules"]
        assert all(ns["exists"] for ns in status["namespaces"].values())
    finally:
        down = run("lab", "down", "--prefix", prefix)
    assert down.returncode == 0
    assert not json.loads(run("lab", "status", "--prefix", prefix, "--json").stdout)["complete"]
