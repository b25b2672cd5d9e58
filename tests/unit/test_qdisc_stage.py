"""The qdisc stage: kernel records (built with the ctypes mirror) decoded into
one stage per enqueue/dequeue pair, qdisc drops, and the human line."""
from __future__ import annotations

import io
import json

import pytest

from tracer import events, output
from tracer.events import Fate, QdiscEvent, StageKind
from tracer.model import packet_json, qdisc_handle
from tracer.paths import Context, assemble
from tracer.recording import Recorder, replay

NS, RC, RS = 4026532000, 2, 3
TBF = 0x80040000


def ctx() -> Context:
    c = Context(ifnames={(NS, RC): "rc", (NS, RS): "rs"}, netns_names={NS: "rtr"},
                drop_reasons={2: "SKB_DROP_REASON_NOT_SPECIFIED", 77: "SKB_DROP_REASON_QDISC_DROP"})
    c.qdisc_kinds[(NS, RS, TBF)] = "tbf"
    c.qdisc_roots[(NS, RS)] = TBF
    return c


def record(stages: list[tuple], fate: Fate = Fate.FORWARDED, reason: int = 0) -> events.PtRecord:
    """stages: (kind, t_ns, ifindex, slot, aux, aux2)."""
    rec = events.PtRecord()
    rec.id, rec.netns, rec.family, rec.proto, rec.fate, rec.drop_reason = 1, NS, 4, 17, fate, reason
    rec.in_ifindex, rec.out_ifindex = RC, RS
    rec.saddr[:4], rec.daddr[:4] = [10, 0, 1, 2], [10, 0, 2, 2]
    rec.sport, rec.dport = 4000, 5000
    rec.first_ts = 1_000_000
    rec.path_sig = 0x1234 + len(stages) + fate   # (a signature: shapes are cached by it)
    rec.n_stages = len(stages)
    for i, (kind, t, ifx, slot, aux, aux2) in enumerate(stages):
        s = rec.stages[i]
        s.kind, s.ts, s.ifindex, s.slot, s.aux, s.aux2, s.family = kind, 1_000_000 + t, ifx, slot, aux, aux2, 4
    return rec


def queued(*deq: int, qlen: int = 3) -> list[tuple]:
    return [(StageKind.TC_INGRESS, 0, RC, 0, 0, 0),
            (StageKind.TC_EGRESS, 10_000, RS, 0, 0, 0),
            (StageKind.QDISC, 11_000, RS, QdiscEvent.ENQUEUED, TBF, qlen),
            *[(StageKind.QDISC, t, RS, ev, TBF, 0) for t, ev in zip(deq, [QdiscEvent.DEQUEUED] +
                                                                   [QdiscEvent.REQUEUED] * 3)],
            (StageKind.TX, deq[-1] + 500, RS, 0, 0, 0)]


def test_enqueue_and_dequeue_are_one_qdisc_stage_between_tc_egress_and_tx():
    p = assemble(record(queued(1_811_000)), ctx())
    d = json.loads(packet_json(p))
    assert [s["stage"] for s in d["path"]] == ["tc_ingress", "tc_egress", "qdisc", "tx"]
    assert d["path"][2] == {"stage": "qdisc", "t_ns": 11_000, "dev": "rs", "mark": 0,
                            "qdisc": {"kind": "tbf", "handle": "8004:"}, "qlen": 3, "queued_ns": 1_800_000,
                            "verdict": "queued"}
    assert d["fate"] == "forwarded" and "drop" not in d


def test_a_second_dequeue_is_a_requeue():
    st = assemble(record(queued(50_000, 90_000)), ctx()).stage("qdisc")
    assert (st.verdict, st.queued_ns) == ("requeued", 39_000)


def test_human_line_says_how_long_in_which_qdisc():
    text = output.format_packet(assemble(record(queued(1_811_000)), ctx()))
    [line] = [ln for ln in text.splitlines() if " qdisc " in ln]
    assert line.split(None, 3)[1:] == ["qdisc", "rs", "queued 1.8 ms in tbf 8004: on rs  qlen 3"]


def test_tail_drop_names_the_root_qdisc_of_the_device():
    stages = queued(1)[:2] + [(StageKind.DROP, 12_000, RS, 0, 0, 0)]
    p = assemble(record(stages, Fate.DROPPED, 77), ctx())
    assert p.drop.to_json() | {"location": ""} == {
        "reason": "QDISC_DROP", "location": "", "last_hook": None, "stage": "qdisc", "table": None, "dev": "rs",
        "qdisc": {"kind": "tbf", "handle": "8004:"}}
    assert "(in qdisc tbf 8004: on rs)" in output.format_packet(p)


def test_dropped_after_queueing_says_how_long_it_waited():
    stages = queued(1)[:3] + [(StageKind.DROP, 511_000, RS, 0, 0, 0)]
    p = assemble(record(stages, Fate.DROPPED, 77), ctx())
    st = p.stage("qdisc")
    assert (st.verdict, st.queued_ns, p.drop.stage, str(p.drop.qdisc)) == ("dropped", 500_000, "qdisc", "tbf 8004:")
    assert "dropped after 500.0 µs in tbf 8004: on rs" in output.format_packet(p)


def test_an_unknown_handle_reads_the_qdiscs_again_once():
    c, asked = ctx(), []

    def refresh(ino):
        asked.append(ino)
        c.qdisc_kinds[(ino, RS, 0x10000)] = "htb"
    c.qdisc_refresh = refresh
    stages = [(k, t, i, s, 0x10000 if a == TBF else a, q) for k, t, i, s, a, q in queued(20_000)]
    st = assemble(record(stages), c).stage("qdisc")
    assert (st.qdisc.kind, st.qdisc.handle, asked) == ("htb", "1:", [NS])


def test_qdisc_kinds_survive_a_recording():
    f = io.StringIO()
    c = ctx()
    rec = Recorder(f, c)
    r = record(queued(1_811_000))
    rec(bytes(r)[:events.RECORD_HEADER_SIZE + r.n_stages * events.STAGE_SIZE], False)
    [p] = list(replay(io.StringIO(f.getvalue())))
    assert json.loads(packet_json(p))["path"][2]["qdisc"] == {"kind": "tbf", "handle": "8004:"}


@pytest.mark.parametrize("h, text", [(0x80040000, "8004:"), (0x10010, "1:10"), (0xFFFF0000, "ffff:")])
def test_handles_are_written_as_tc_writes_them(h, text):
    assert qdisc_handle(h) == text


@pytest.mark.parametrize("ns, text", [(850, "850 ns"), (12_400, "12.4 µs"), (1_800_000, "1.8 ms"),
                                      (1_250_000_000, "1.25 s")])
def test_durations(ns, text):
    assert output.duration(ns) == text


def test_taken_without_the_enqueue_tracepoint_waits_from_the_hand_over():
    """fq_codel takes a packet while dropping others (NET_XMIT_CN): no
    enqueue event; the hand-over to the device stands for it, qlen unknown."""
    stages = [s for s in queued(2_010_000) if not (s[0] == StageKind.QDISC and s[3] == QdiscEvent.ENQUEUED)]
    st = assemble(record(stages), ctx()).stage("qdisc")
    assert (st.t_ns, st.queued_ns, st.qlen, st.verdict) == (10_000, 2_000_000, None, "queued")


def test_without_qdisc_tracepoints_the_plan_leaves_their_programs_off():
    from tracer import backends
    feat = backends.Features(kernel="5.15.0", netfilter_link=True, cast_kfunc=True, sk_data_ready_tp=True,
                             fentry="refused", qdisc_tp=False)
    p = backends.plan(feat)
    assert set(backends.QDISC_PROGRAMS) <= p.off and any("qdisc" in n for n in p.notes)
    assert not set(backends.QDISC_PROGRAMS) & backends.plan(
        backends.Features(kernel="6.1.0", netfilter_link=True, cast_kfunc=True, sk_data_ready_tp=True,
                          fentry="refused")).off
    assert {"qdisc_enqueue", "qdisc_dequeue"} <= set(backends.OPTIONAL_TRACEPOINTS)
