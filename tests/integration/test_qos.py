"""QoS: the qdisc stage (time queued, queue length, qdisc drops), IFB, and
the serve histogram -- each checked against the kernel's own qdisc counters
(`tc -s qdisc`).

A shaper on the router's egress device rs (tbf, or htb with a leaf qdisc:
fq_codel where the kernel has it, else pfifo) at a low rate, and a burst of
UDP datagrams from the client: the qdisc queues what the rate lets by later
and drops what does not fit.  Neighbours are pinned and IPv6 is off on the
shaped device, so the burst is the only traffic through the qdisc.
"""
from __future__ import annotations

import json
import random
import re
import string
import subprocess
import time

import pytest

from test_truth import (SetupError, is_flow, pin_neighbours, pj, qdisc_stats, run_in, sysctl, wait_for)
from tracer import libbpf
from tracer.filters import PacketFilter
from tracer.lab import NET_ID_RANGE, Lab
from tracer.output import format_packet

pytestmark = pytest.mark.root

UDP = 17
BURST = 80


@pytest.fixture
def lab():
    """A lab of its own (namespaces ptqXXXX-*): no rules, neighbours pinned."""
    import os
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    new = Lab("ptq" + "".join(random.choices(string.ascii_lowercase, k=4)), random.choice(NET_ID_RANGE[:-1]))
    try:
        new.up(rules=False)
        new.flush_rules()
        pin_neighbours(new)
        # nothing but the test's packets through the shaped device
        sysctl(new.router, net__ipv6__conf__rs__disable_ipv6=1)
        yield new
    finally:
        new.down()


def tc(lab, *args) -> str:
    return run_in(lab.router, "tc", *args)


def qdisc_line_stats(lab, dev: str) -> dict:
    return qdisc_stats(tc(lab, "-s", "qdisc", "show", "dev", dev))


def handle_of(lab, dev: str) -> str:
    """The root qdisc's handle as tc prints it (`8004:`)."""
    m = re.search(r"qdisc \S+ (\S+) root", tc(lab, "qdisc", "show", "dev", dev))
    if not m:
        raise SetupError(f"set-up: no root qdisc on {dev}")
    return m.group(1)


def leaf_kind(lab) -> str:
    """fq_codel where the kernel has it (Debian's), else pfifo (this CI's kernel has neither fq_codel nor sfq)."""
    try:
        tc(lab, "qdisc", "add", "dev", "lo", "root", "fq_codel")
    except SetupError:
        return "pfifo"
    tc(lab, "qdisc", "del", "dev", "lo", "root")
    return "fq_codel"


def shape(lab, kind: str) -> str:
    """A 1 mbit shaper on rs: tbf (limit ~30 packets), or htb 1: with class
    1:10 and a leaf of 20 packets; the leaf's kind."""
    if kind == "tbf":
        tc(lab, "qdisc", "add", "dev", "rs", "root", "tbf", "rate", "1mbit", "burst", "3000", "limit", "30000")
        return ""
    leaf = leaf_kind(lab)
    tc(lab, "qdisc", "add", "dev", "rs", "root", "handle", "1:", "htb", "default", "10")
    tc(lab, "class", "add", "dev", "rs", "parent", "1:", "classid", "1:10", "htb", "rate", "1mbit", "burst", "3000")
    tc(lab, "qdisc", "add", "dev", "rs", "parent", "1:10", "handle", "10:", leaf, "limit", "20")
    return leaf


def burst(lab, trace, sport: int, dport: int, count: int = BURST):
    """count datagrams of 1000 bytes through the shaper; (capture, packets of the flow, qdisc counters)."""
    a = lab.addr
    srv = lab.udp_server(lab.server, a["server4"], dport)
    cap = trace(filter=PacketFilter(proto=UDP, port=dport))
    before = qdisc_line_stats(lab, "rs")
    lab.udp_send(lab.client, a["server4"], dport, b"q" * 1000, count=count, sport=sport)

    def q():
        now = qdisc_line_stats(lab, "rs")
        return {k: now[k] - before[k] if k != "backlog" else now[k] for k in now}
    assert wait_for(cap, lambda: (lambda s: s["backlog"] == 0 and s["sent"] + s["dropped"] >= count)(q()), 20), \
        f"set-up: the qdisc never handled the burst: {q()}"

    def flow():
        return [p for p in cap.packets if is_flow(p, src=a["client4"], dst=a["server4"], sport=sport, dport=dport)]
    wait_for(cap, lambda: len(flow()) >= count, 10)
    srv.close()
    return cap, flow(), q()


@pytest.mark.parametrize("kind", ["tbf", "htb"])
def test_burst_queues_longer_and_drops_the_excess_in_the_qdisc(lab, trace, kind):
    leaf = shape(lab, kind)
    handle = handle_of(lab, "rs")
    cap, pkts, q = burst(lab, trace, 41070, 5070)
    assert q["sent"] + q["dropped"] == BURST and q["dropped"] > 0 and q["sent"] > 0, \
        f"set-up: other packets crossed the qdisc, or none was dropped: {q}"
    # in the order they were sent (ids are per CPU)
    forwarded = sorted((p for p in pkts if p.fate == "forwarded"), key=lambda p: p.wall_ns)
    dropped = [p for p in pkts if p.fate == "dropped"]
    # KNOWN ISSUE (see the branch's report): now and then (~1 run in 3 on
    # this host, a 30-packet queue) one record misses its dequeue and its tx
    # and ages out: enqueued, end not seen.  Accounted for, at most one.
    lost = [p for p in pkts if p.fate == "unknown" and "qdisc" in p.stage_names()]
    assert len(forwarded) + len(dropped) + len(lost) == len(pkts) == BURST and len(lost) <= 1, \
        [json.dumps(pj(p)) for p in pkts if p.fate not in ("forwarded", "dropped")]
    # the kernel's counts: sent by the qdisc, dropped by it
    assert (len(forwarded) + len(lost), len(dropped)) == (q["sent"], q["dropped"]), [p.drop for p in dropped][:3]
    names = pj(forwarded[0])["path"]
    stages = [s["stage"] for s in names]
    assert stages[-3:] == [cap.tx, "qdisc", "tx"], stages
    waits, order = [], []
    for p in forwarded:
        st = next(s for s in pj(p)["path"] if s["stage"] == "qdisc")
        assert st["dev"] == "rs" and st["qdisc"] == {"kind": kind, "handle": handle}, st
        # (qlen unknown where the qdisc took it while dropping others: fq_codel)
        assert st["verdict"] == "queued" and st["queued_ns"] is not None, pj(p)["path"]
        assert st["qlen"] is None and leaf == "fq_codel" or st["qlen"] >= 1, pj(p)["path"]
        enq = p.wall_ns + st["t_ns"]
        order.append((enq, enq + st["queued_ns"]))
    # one flow through a FIFO: in the order they were enqueued, the packets
    # left in that order too (each dequeue is matched to its own packet)
    order.sort()
    leaves = [d for _e, d in order]
    assert leaves == sorted(leaves), order
    waits = [d - e for e, d in order]
    # and the later ones waited longer, behind the earlier ones (the first
    # ones pass within the burst size); the client's sends are uneven under
    # emulation, so compared by thirds
    third = len(waits) // 3
    assert sum(waits[-third:]) > 5 * sum(waits[:third]), waits
    # 1 mbit/s is ~8.2 ms per 1028-byte frame: the last one waited behind many
    assert waits[-1] > 20_000_000, waits
    for p in dropped:
        d = pj(p)["drop"]
        assert (d["stage"], d["dev"]) == ("qdisc", "rs") and d["qdisc"] == {"kind": kind, "handle": handle}, d
    text = format_packet(forwarded[-1])
    print(text, format_packet(dropped[0]), json.dumps(pj(forwarded[-1])["path"][-3:]), sep="\n\n")   # (-s: the README's sample)
    assert re.search(rf"queued \d+\.\d ms in {kind} {re.escape(handle)} on rs", text), text
    assert f"(in qdisc {kind} {handle} on rs)" in format_packet(dropped[0])
    if leaf == "fq_codel":
        # fq_codel drops from the head of its fattest flow: packets it had
        # queued, which say so (and how long they waited)
        inside = [p for p in dropped if any(s.stage == "qdisc" for s in p.path)]
        for p in inside:
            st = next(s for s in pj(p)["path"] if s["stage"] == "qdisc")
            assert st["verdict"] == "dropped" and st["queued_ns"] > 0, st


def ifb_ingress(lab) -> None:
    """Ingress policy on rc: everything received there is redirected to
    ifb0, whose tbf shapes it; ifb sends it back to rc's receive."""
    r = lab.router
    run_in(r, "ip", "link", "add", "ifb0", "type", "ifb")
    run_in(r, "ip", "link", "set", "ifb0", "up")
    tc(lab, "qdisc", "add", "dev", "ifb0", "root", "tbf", "rate", "10mbit", "burst", "20000", "limit", "200000")
    tc(lab, "qdisc", "add", "dev", "rc", "handle", "ffff:", "ingress")
    tc(lab, "filter", "add", "dev", "rc", "parent", "ffff:", "protocol", "ip", "u32", "match", "u32", "0", "0",
       "action", "mirred", "egress", "redirect", "dev", "ifb0")


def test_ifb_ingress_policy_is_one_path_through_the_ifb_device(lab, trace):
    a = lab.addr
    ifb_ingress(lab)
    srv = lab.udp_server(lab.server, a["server4"], 5071)
    cap = trace(filter=PacketFilter(proto=UDP, port=5071))
    before = qdisc_line_stats(lab, "ifb0")
    lab.udp_send(lab.client, a["server4"], 5071, b"i" * 200, count=5, sport=41071)
    for _ in range(5):
        assert srv.recv(3.0), "set-up: a datagram did not arrive"
    assert qdisc_line_stats(lab, "ifb0")["sent"] - before["sent"] >= 5, "set-up: the ifb qdisc sent nothing"

    def flow():
        return [p for p in cap.packets if is_flow(p, src=a["client4"], dst=a["server4"], sport=41071, dport=5071)]
    assert wait_for(cap, lambda: len(flow()) >= 5, 5), [(p.fate, p.stage_names()) for p in cap.packets]
    cap.settle(0.3)
    pkts = flow()
    assert len(pkts) == 5, [(p.fate, p.stage_names()) for p in pkts]   # one path each, not two records
    for p in pkts:
        d = pj(p)
        assert d["fate"] == "forwarded" and d["in_dev"] == "rc" and d["out_dev"] == "rs", (d["fate"], d["path"])
        path = [(s["stage"], s["dev"]) for s in d["path"]]
        assert ("qdisc", "ifb0") in path and ("tx", "ifb0") in path, path
        i_ifb = path.index(("qdisc", "ifb0"))
        after = [s for s, _ in path[i_ifb:]]
        # after the ifb device: back in rc's receive, routed and forwarded on rs
        assert {"prerouting", "forward", "postrouting"} <= set(after) and path[-1] == ("tx", "rs"), path
        st = d["path"][i_ifb]
        assert st["qdisc"]["kind"] == "tbf" and st["verdict"] == "queued" and st["queued_ns"] >= 0, st
        if cap.rx == "tc_ingress":
            first = d["path"][0]
            assert (first["stage"], first["dev"], first.get("verdict"), first.get("target")) == \
                ("tc_ingress", "rc", "redirect", "ifb0"), first
    print(format_packet(pkts[0]))


def scrape_text(collector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry(auto_describe=True)
    reg.register(collector)
    return generate_latest(reg).decode()


def samples(text: str, name: str, **labels) -> list:
    from prometheus_client.parser import text_string_to_metric_families
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def _map_flags(fd: int) -> int:
    """A map's flags as the kernel holds them (/proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("map_flags:"))


def test_serve_counts_queue_time_and_qdisc_drops_as_tc_does(lab):
    """Count mode (what `pkttrace serve` runs): the kernel's histogram of
    time queued and the qdisc drops, against tc -s qdisc's sent and dropped."""
    from tracer.exporter import Collector
    from tracer.session import TraceOptions, Tracer
    a = lab.addr
    tc(lab, "qdisc", "add", "dev", "rs", "root", "tbf", "rate", "1mbit", "burst", "3000", "limit", "30000")
    handle = handle_of(lab, "rs")
    srv = lab.udp_server(lab.server, a["server4"], 5072)
    tracer = Tracer(TraceOptions(netns=[lab.router], emit=False, count=True)).start()
    try:
        col = Collector(tracer)
        before = qdisc_line_stats(lab, "rs")
        lab.udp_send(lab.client, a["server4"], 5072, b"s" * 1000, count=BURST, sport=41072)
        deadline = time.monotonic() + 20
        while True:
            now = qdisc_line_stats(lab, "rs")
            sent, dropped = now["sent"] - before["sent"], now["dropped"] - before["dropped"]
            if now["backlog"] == 0 and sent + dropped >= BURST:
                break
            assert time.monotonic() < deadline, f"set-up: the qdisc never handled the burst: {now}"
            time.sleep(0.2)
        assert sent + dropped == BURST and dropped > 0, \
            f"set-up: other packets crossed the qdisc (no ARP, no IPv6 on rs), or none dropped: {sent}, {dropped}"
        time.sleep(0.3)
        text = scrape_text(col)
        # (the known issue: a record that missed its dequeue is still in flight)
        leftover = tracer.inflight()
        # the per-CPU counters take an element when a key first comes where
        # the kernel allows it (netfilter links, no kprobes), else all at load;
        # either way they counted the burst (below)
        on_demand = libbpf.BPF_F_NO_PREALLOC if tracer.plan.counters_on_demand() else 0
        flags = {name: _map_flags(tracer.obj.map(name).fd) & libbpf.BPF_F_NO_PREALLOC
                 for name in ("path_counts", "drop_totals", "qdisc_hist")}
        assert flags == dict.fromkeys(flags, on_demand), (tracer.plan, flags)
    finally:
        tracer.close()
        srv.close()
    q = dict(netns=lab.router, dev="rs", qdisc="tbf", handle=handle)
    drops = samples(text, "pkttrace_qdisc_drops_total", **q)
    qdisc_lines = [ln for ln in text.splitlines() if "qdisc" in ln and not ln.startswith("#")]
    assert sum(s.value for s in drops) == dropped, (dropped, sent, qdisc_lines)
    assert {s.labels["reason"] for s in drops} <= {"QDISC_DROP", "NOT_SPECIFIED", "QDISC_OVERLIMIT"}, drops
    count = samples(text, "pkttrace_qdisc_queue_seconds_count", **q)
    assert [s.value + leftover for s in count] == [sent] and leftover <= 1, (count, sent, leftover, qdisc_lines)
    buckets = samples(text, "pkttrace_qdisc_queue_seconds_bucket", **q)
    by_le = [(float(s.labels["le"]), s.value) for s in buckets]
    assert by_le == sorted(by_le) and by_le[-1] == (float("inf"), sent - leftover), by_le
    # at 1 mbit/s the queue holds ~29 frames of ~8.2 ms: most waited more than 16 ms
    assert dict(by_le)[0.016384] < sent / 2, by_le
    total = samples(text, "pkttrace_qdisc_queue_seconds_sum", **q)[0].value
    assert 0.016 * sent / 4 < total < 1.0 * sent, total
    # the same drops in the drops total, at stage qdisc
    assert sum(s.value for s in samples(text, "pkttrace_drops_total", netns=lab.router, stage="qdisc")) == dropped
    # one path for the packets the qdisc sent, whatever its queue held: the
    # queue length each found is in its stage, not in the path's signature
    paths = samples(text, "pkttrace_paths_total", netns=lab.router, family="ipv4", proto="udp", fate="forwarded")
    assert [s.value for s in paths] == [sent - leftover], [(s.labels["path"], s.value) for s in paths]
