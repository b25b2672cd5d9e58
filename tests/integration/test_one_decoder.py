"""One road from kernel bytes to a packet's path (issue 16): the same
packets, read live, replayed from the recording made meanwhile, and
assembled by the exporter from the kernel's path examples, are the same
paths.  Also the library API's live half, tracer.trace()."""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import time
from collections import Counter

import pytest

import tracer
from tracer import exporter, layout
from tracer.events import StageKind
from tracer.filters import PacketFilter
from tracer.recording import Recorder

pytestmark = pytest.mark.root

UDP = 17
PORTS = (5001, 5009, 5002)     # the demo ruleset: marked and forwarded, dropped in FORWARD, forwarded


def _send(lab) -> None:
    for port in PORTS:
        lab.udp_send(lab.client, lab.addr["server4"], port, count=3)
    lab.ping(lab.client, lab.addr["router_c4"])


def _key(labels) -> str:
    return json.dumps(dataclasses.asdict(labels), sort_keys=True)


def _paths_of(packets) -> Counter:
    """Packets per path, by the labels the exporter gives the path."""
    return Counter(_key(exporter.resolve(p)) for p in packets)


def _collect(t, want: int, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got.extend(t.poll(0.1))
    return got


def test_live_replay_and_exporter_read_the_same_paths(lab, trace):
    flt = PacketFilter()
    cap = trace(filter=flt)
    rec = io.StringIO()
    cap.tracer.on_raw = Recorder(rec, cap.tracer.ctx)
    _send(lab)
    live = [p for p in _collect(cap.tracer, 11) + cap.tracer.stop() if p.family == "ipv4"]
    cap.tracer.on_raw.flush()
    ours = [p for p in live if p.proto == "udp" and p.dport in PORTS]
    assert len(ours) == 9, [(p.dport, p.fate) for p in live]
    assert {p.fate for p in ours} == {"forwarded", "dropped"}

    # the recording, read back: the very same packets, field for field
    rec.seek(0)
    replayed = {p.id: p.to_json() for p in tracer.read(rec)}
    for p in live:
        assert replayed[p.id] == p.to_json(), p.id

    # serve's road: the kernel counts per path and keeps one example record
    # per path; the exporter names it.  The same packets, counted, give the
    # labels the live packets give, and as many of each.
    counting = trace(filter=flt, emit=False, count=True)
    _send(lab)
    time.sleep(0.5)
    counted = {_key(lb): n for lb, n in exporter.PathCounts(counting.tracer).read()}
    want = _paths_of(ours)
    for k, n in want.items():
        assert counted.get(k) == n, (k, counted)


def _send_answered(lab) -> None:
    """Packets the router answers (an echo reply, a port unreachable),
    and pings it routes both ways."""
    a = lab.addr
    lab.ping(lab.client, a["router_c4"], count=2)
    lab.udp_send(lab.client, a["router_c4"], 5555, count=2)
    lab.ping(lab.client, a["server4"], count=2)




def test_counted_paths_keep_their_route_lookups_and_replies(lab, trace):
    # Counting, a stage in the same pass as its record's last one takes that
    # time instead of reading the clock (stage_time): the route lookups
    # taken since the previous stage, and the replies the kernel made while
    # a packet was being processed, must still be each packet's, as traced
    # (from a first contact: test_paths' first_answer tests)
    for ns in (lab.client, lab.router):
        lab.ip(ns, "neigh", "flush", "all")
    cap = trace()
    _send_answered(lab)
    live = _collect(cap.tracer, 12) + cap.tracer.stop()
    routed = [p for p in live if p.family == "ipv4" and p.fate == "forwarded"]
    assert len(routed) == 4 and all(_route_tables(p) for p in routed), routed
    assert sum(1 for p in live if p.family == "ipv4" and p.cause) == 4, [(p.proto, p.fate, p.cause) for p in live]
    want = _paths_of(p for p in live if p.family == "ipv4" and p.proto in ("icmp", "udp"))
    assert sum(want.values()) == 12, want

    counting = trace(emit=False, count=True)
    _send_answered(lab)
    time.sleep(0.5)
    counted = {_key(lb): n for lb, n in exporter.PathCounts(counting.tracer).read()
               if lb.family == "ipv4" and lb.proto in ("icmp", "udp")}
    assert counted == want, "counted:\n" + _listing(counted) + "\ntraced:\n" + _listing(want)


def _route_tables(p) -> list:
    return [lk.table for s in p.path for lk in s.lookups]


def _listing(paths: dict) -> str:
    return "\n".join(sorted(f"{n} {k}" for k, n in paths.items()))


def test_the_library_traces_live_as_a_context_manager(lab):
    with tracer.trace(netns=[lab.router], filter=tracer.Filter.parse(proto="udp", port="5009")) as live:
        lab.udp_send(lab.client, lab.addr["server4"], 5009)
        got = list(live.packets(count=1, duration=5))
        counters = live.counters()
    assert [(p.dport, p.fate, p.drop["table"]) for p in got] == [(5009, "dropped", "filter")]
    assert counters.shown == 1
    assert live.obj is None and not live.observer_links()     # everything detached on leaving


def test_a_live_trace_is_an_iterator(lab):
    with tracer.trace(netns=[lab.router], filter=tracer.Filter.parse(proto="udp", port="5009")) as live:
        lab.udp_send(lab.client, lab.addr["server4"], 5009, count=2)
        got = list(itertools.islice(live, 2))
    assert [(p.dport, p.fate) for p in got] == [(5009, "dropped")] * 2


def test_emitted_records_carry_their_stage_times_after_the_first(lab, trace):
    # pt_emit makes the times relative (rel_ts): no subtraction per time in
    # user space.  Both halves or neither: times left absolute would print as
    # the host's uptime, subtracted twice as negative.
    cap = trace(filter=tracer.Filter.parse(proto="udp", port="5001"))
    sent = time.time_ns()
    lab.udp_send(lab.client, lab.addr["server4"], 5001, count=2)
    got = [p for p in _collect(cap.tracer, 2) if p.dport == 5001]
    assert len(got) == 2
    for p in got:
        assert p._raw[layout.REL_TS_OFF] == 1
        t = [s.t_ns for s in p.path]
        assert min(t) == 0 and max(t) < 1_000_000_000, t      # forwarded within a second
        assert abs(p.wall_ns - sent) < 10_000_000_000           # the wall clock from first_ts, still absolute
    # address stages (gateway, next hop, NAT) hold an address where the
    # others hold their time: untouched (an IPv4 address in the first 4 of
    # 16 bytes; made "relative" its zeros would read as a borrow's 0xff)
    addr_stages = 0
    for p in got:
        for i, kind in enumerate(layout.stage_kinds(p._raw)):
            off = layout.HEADER_SIZE + i * layout.STAGE_SIZE
            if kind == StageKind.ADDR:
                addr_stages += 1
                assert p._raw[off + 4:off + 16] == bytes(12), p._raw[off:off + 16].hex()
    assert addr_stages > 0
