"""Fewer observers, same story: paths where one observer stands for two
places (issue 12).

- conntrack shares the observer of the nft chains after it: their table
  steps are still told apart, and a drop is the chain's or conntrack's by
  where the kernel freed the packet (PT_STF_HOOK_SLOW on the drop stage);
- INPUT, FORWARD and POSTROUTING have no observer before their first table:
  the hook's entering mark is the last hook observation's, and a drop by
  that first table adds the hook's stage no observer saw.

Records are built by hand the way the kernel writes them; the Context is
what user space knows after placing the observers.
"""
from __future__ import annotations

from tracer import events, placement
from tracer.events import StageKind
from tracer.paths import Context, assemble

INO, IN, OUT = 4026531999, 2, 3
NF_DROP_REASON = 12
PRE, FWD = placement.PRE, placement.FORWARD
GROUP = [("conntrack", -200), ("mangle", -150)]


def _ctx() -> Context:
    ctx = Context(ifnames={(INO, IN): "rc", (INO, OUT): "rs"}, netns_names={INO: "rtr"},
                  drop_reasons={NF_DROP_REASON: "SKB_DROP_REASON_NETFILTER_DROP"}, conntrack={INO: [4]})
    # PREROUTING: entry, then conntrack + mangle under one observer;
    # FORWARD: filter, observed only after it
    for hook, slots in ((PRE, [(placement.PRIO_FIRST, [], GROUP), (-149, GROUP, [])]),
                        (FWD, [(1, [("filter", 0)], [])])):
        for slot, (prio, before, after) in enumerate(slots):
            key = (INO, 4, hook, slot)
            ctx.slot_priority[key], ctx.slot_tables[key], ctx.slot_after[key] = prio, before, after
    return ctx


def _record(stages: list[dict], fate: int, drop_reason: int = 0) -> events.PtRecord:
    rec = events.PtRecord()
    rec.id, rec.family, rec.proto, rec.fate, rec.netns = 1, 4, 17, fate, INO
    rec.saddr[:4], rec.daddr[:4] = [10, 0, 1, 2], [10, 0, 2, 2]
    rec.cur_saddr[:4], rec.cur_daddr[:4] = [10, 0, 1, 2], [10, 0, 2, 2]
    rec.sport, rec.dport = 40000, 5001
    rec.drop_reason, rec.drop_location = drop_reason, 0xffffffff81000000
    rec.path_sig = hash(repr(stages)) & 0xffffffff     # one shape per distinct list
    rec.n_stages = len(stages)
    for i, st in enumerate(stages):
        s = rec.stages[i]
        s.ts = 1000 * (i + 1)
        for k, v in st.items():
            setattr(s, k, v)
    return rec


TC_IN = {"kind": StageKind.TC_INGRESS, "ifindex": IN}
PRE_ENTRY = {"kind": StageKind.PREROUTING, "ifindex": IN, "aux": IN, "slot": 0}


def test_conntrack_and_mangle_under_one_observer_read_as_two_tables():
    pre_after = {"kind": StageKind.PREROUTING, "ifindex": IN, "aux": IN, "slot": 1, "mark": 1,
                 "ct": events.Ct.NEW}
    route = {"kind": StageKind.ROUTE, "ifindex": OUT, "aux": 254}
    fwd = {"kind": StageKind.FORWARD, "ifindex": OUT, "aux": IN, "slot": 0, "mark": 1, "ct": events.Ct.NEW}
    p = assemble(_record([TC_IN, PRE_ENTRY, pre_after, route, fwd, {"kind": StageKind.TX, "ifindex": OUT, "mark": 1}],
                         events.Fate.FORWARDED), _ctx())
    pre = p.stage("prerouting")
    assert [(t.table, t.mark_in, t.mark, t.ct, t.verdict) for t in pre.tables] == [
        ("conntrack", 0, 0, "new", "accept"), ("mangle", 0, 1, "new", "accept")]
    assert [o.priority for o in pre.observations] == [placement.PRIO_FIRST, -149]
    # FORWARD's only observer comes after filter: it came in as PREROUTING left it
    f = p.stage("forward")
    assert (f.mark, f.mark_out) == (1, 1)
    assert [(t.table, t.mark_in, t.mark) for t in f.tables] == [("filter", 1, 1)]


def _dropped_after_pre_entry(flags: int):
    drop = {"kind": StageKind.DROP, "ifindex": IN, "flags": flags}
    return assemble(_record([TC_IN, PRE_ENTRY, drop], events.Fate.DROPPED, NF_DROP_REASON), _ctx())


def test_a_drop_freed_by_an_nft_chain_is_mangles_and_conntrack_let_it_by():
    p = _dropped_after_pre_entry(0)
    assert (p.drop["stage"], p.drop["table"]) == ("prerouting", "mangle")
    assert [(t.table, t.verdict) for t in p.stage("prerouting").tables] == [("conntrack", "accept"),
                                                                            ("mangle", "drop")]


def test_a_drop_freed_by_nf_hook_slow_is_conntracks():
    p = _dropped_after_pre_entry(events.STF_HOOK_SLOW)
    assert (p.drop["stage"], p.drop["table"]) == ("prerouting", "conntrack")
    assert [(t.table, t.verdict) for t in p.stage("prerouting").tables] == [("conntrack", "drop")]


def test_a_drop_by_the_first_table_of_forward_adds_the_stage_no_observer_saw():
    pre_after = {"kind": StageKind.PREROUTING, "ifindex": IN, "aux": IN, "slot": 1, "mark": 1}
    route = {"kind": StageKind.ROUTE, "ifindex": OUT, "aux": 254}
    drop = {"kind": StageKind.DROP, "ifindex": IN, "mark": 1}
    p = assemble(_record([TC_IN, PRE_ENTRY, pre_after, route, drop], events.Fate.DROPPED, NF_DROP_REASON), _ctx())
    assert (p.drop["stage"], p.drop["table"], p.drop["last_hook"]) == ("forward", "filter", "forward")
    f = p.stage("forward")
    assert f.observations == [] and (f.dev, f.in_dev) == ("rs", "rc")
    assert [(t.table, t.verdict, t.mark_in) for t in f.tables] == [("filter", "drop", 1)]
    assert [s.stage for s in p.path] == ["tc_ingress", "prerouting", "route", "forward", "drop"]


def test_a_drop_while_the_ruleset_changes_names_no_table():
    route = {"kind": StageKind.ROUTE, "ifindex": OUT, "aux": 254}
    drop = {"kind": StageKind.DROP, "ifindex": IN, "flags": events.STF_CHANGING}
    p = assemble(_record([TC_IN, PRE_ENTRY, route, drop], events.Fate.DROPPED, NF_DROP_REASON), _ctx())
    assert p.drop["stage"] == "forward" and p.drop["table"] is None
    assert p.drop.get("attribution") == "changing"
    assert p.stage("forward").attribution == "changing" and p.stage("forward").tables == []


def test_merge_rule():
    ct, mangle = placement.Table("conntrack", -200), placement.Table("mangle", -150, handle=7)
    hp = placement.plan_hook([ct, mangle], merge_conntrack=True)
    assert hp.priorities == [placement.PRIO_FIRST, -149] and placement.shares_conntrack_observer(hp.tables[1])
    # not with a NAT chain or an x_tables table after it, nor without the drop location to tell them apart
    for nxt in (placement.Table("nat", -100, nat=True, handle=7), placement.Table("mangle (legacy)", -150)):
        assert placement.plan_hook([ct, nxt], merge_conntrack=True).priorities == [placement.PRIO_FIRST, -199,
                                                                                 nxt.priority + 1]
    assert placement.plan_hook([ct, mangle]).priorities == [placement.PRIO_FIRST, -199, -149]
    # tables grouped for sharing a priority are not a merge
    assert not placement.shares_conntrack_observer([("conntrack", -200), ("x", -199)])
