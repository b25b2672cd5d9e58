"""Observer placement and rule attribution: pure functions, no kernel."""
import ipaddress

from tracer import placement
from tracer.placement import PRIO_FIRST, Table, plan_hook
from tracer.routing import FR_ACT_UNREACHABLE, Flow, Rule, choosing_rule


def test_no_tables_means_only_the_first_observer():
    hp = plan_hook([])
    assert hp.priorities == [PRIO_FIRST] and hp.tables == [[]]
    assert hp.tables_after(0) == []


def test_an_observer_after_each_table_and_what_each_one_follows():
    hp = plan_hook([Table("raw", -300), Table("mangle", -150), Table("filter", 0)])
    assert hp.priorities == [PRIO_FIRST, -299, -149, 1]
    assert [[t.name for t in g] for g in hp.tables] == [[], ["raw"], ["mangle"], ["filter"]]
    assert [t.name for t in hp.tables_after(1)] == ["mangle"]     # a drop after observer 1 is mangle's


def test_tables_without_room_between_them_share_an_observer():
    hp = plan_hook([Table("a", 10), Table("b", 10), Table("c", 11), Table("d", 20)])
    assert hp.priorities == [PRIO_FIRST, 12, 21]
    assert [[t.name for t in g] for g in hp.tables[1:]] == [["a", "b", "c"], ["d"]]


def test_second_bank_sits_one_above_the_first():
    assert plan_hook([Table("mangle", -150)], bank=1).priorities == [PRIO_FIRST + 1, -148]


def test_more_groups_than_slots_merge_at_the_end():
    hp = plan_hook([Table(str(i), i * 10) for i in range(12)])
    assert len(hp.priorities) == placement.BANK
    assert [t.name for t in hp.tables[-1]] == [str(i) for i in range(6, 12)]


def test_every_hook_of_both_families_gets_planned():
    plans = placement.plan({(4, placement.PRE): [Table("mangle", -150)]})
    assert len(plans) == 10
    assert sum(len(hp.priorities) for hp in plans.values()) == 11


RULES = [Rule(0, 255), Rule(100, 100, fwmark=1, fwmask=1), Rule(32766, 254), Rule(32767, 253)]


def flow(mark=0, src="10.0.0.2", dst="10.9.0.2", iif="eth0"):
    return Flow(src, dst, mark, iif)


def test_the_rule_that_gave_the_final_table():
    assert choosing_rule(RULES, flow(mark=1), [255, 100]).priority == 100
    assert choosing_rule(RULES, flow(mark=0), [255, 254]).priority == 32766
    # the kernel's fast path without custom rules looks up main only
    assert choosing_rule(RULES, flow(), [254]).priority == 32766


def test_rule_text_reads_like_ip_rule():
    assert RULES[1].text() == "100: from all fwmark 0x1/0x1 lookup 100"
    r = Rule(200, 0, action=FR_ACT_UNREACHABLE, src=ipaddress.ip_network("10.1.0.0/16"), invert=True)
    assert r.text() == "200: not from 10.1.0.0/16 unreachable"


def test_selectors_are_evaluated():
    r = Rule(10, 7, src=ipaddress.ip_network("10.0.0.0/24"), iif="eth0", dport=(80, 80), ipproto=17)
    rules = [Rule(0, 255), r, Rule(32766, 254)]
    f = Flow("10.0.0.5", "1.2.3.4", 0, "eth0", proto=17, dport=80)
    assert choosing_rule(rules, f, [255, 7]) is r
    f.dport = 81
    assert choosing_rule(rules, f, [255, 7]) is None      # no rule selects table 7 for it
    # locally generated packets match iif lo
    assert choosing_rule([Rule(5, 9, iif="lo")], Flow("10.0.0.1", "1.2.3.4", 0, None), [9]).priority == 5


def test_hooks_after_routing_get_no_observer_before_their_first_table():
    """Only routing runs between hooks (it changes neither mark nor DSCP):
    INPUT, FORWARD and POSTROUTING are observed after their tables only;
    PREROUTING (tc may change the packet after pkttrace's own tc program)
    and OUTPUT (where a locally generated packet is first seen) keep an
    observer before their first table; a hook without tables keeps its one."""
    reg = {(4, placement.PRE): [Table("mangle", -150)], (4, placement.FORWARD): [Table("filter", 0)],
           (4, placement.POST): [Table("nat", 100, nat=True)], (4, placement.OUTPUT): [Table("filter", 0)]}
    plans = placement.plan(reg)
    assert plans[(4, placement.PRE)].priorities == [PRIO_FIRST, -149]
    assert plans[(4, placement.OUTPUT)].priorities == [PRIO_FIRST, 1]
    fwd = plans[(4, placement.FORWARD)]
    assert fwd.priorities == [1] and [[t.name for t in g] for g in fwd.tables] == [["filter"]]
    assert placement.entryless(fwd) and not placement.entryless(plans[(4, placement.PRE)])
    assert plans[(4, placement.POST)].priorities == [101]
    assert plans[(4, placement.INPUT)].priorities == [PRIO_FIRST]      # no table: one observer
    assert not placement.entryless(plans[(4, placement.INPUT)])
    assert plans[(6, placement.FORWARD)].priorities == [PRIO_FIRST]
