"""Who did what (issue 3): tables, routing decisions, NAT, conntrack, drops.

Each test builds its own lab (no demo rules), loads real iptables-nft rules
and routes, sends real packets and checks what pkttrace attributes to whom.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import time

import pytest

from tracer import exporter, placement
from tracer.filters import PacketFilter
from tracer.model import packet_json

pytestmark = pytest.mark.root


@pytest.fixture
def lab(make_lab):
    """Each test its own lab with no netfilter rules at all (the `trace`
    fixture traces this lab's router)."""
    new = make_lab(rules=False)
    new.flush_rules()
    return new


def udp_from_client(lab, dport, dst=None):
    lab.udp_send(lab.client, dst or lab.addr["server4"], dport)


def second_uplink_table(lab, table=100):
    """Table `table` sends the server's address out of the second uplink (rs2)."""
    lab.ip(lab.router, "route", "add", lab.addr["server4"] + "/32", "via", lab.addr["server2_4"], "dev", "rs2",
           "table", table)
    lab.ip(lab.router, "rule", "add", "fwmark", "0x1/0x1", "lookup", table, "pref", 100)


def test_policy_routing_by_mark_shows_rule_table_and_uplink(lab, trace):
    lab.iptables("-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "5001", "-j", "MARK", "--set-mark", "1")
    second_uplink_table(lab)
    cap = trace(filter=PacketFilter(proto=17))
    udp_from_client(lab, 5001)
    udp_from_client(lab, 5002)
    marked = cap.until(lambda p: p.dport == 5001 and p.fate == "forwarded")
    plain = cap.until(lambda p: p.dport == 5002 and p.fate == "forwarded")

    pre = marked.stage("prerouting")
    assert [(t.table, t.mark_in, t.mark) for t in pre.tables] == [("mangle", 0, 1)]
    r = marked.stage("route").route
    assert r.tables[-1] == "100" and r.rule == "100: from all fwmark 0x1/0x1 lookup 100"
    assert (r.dev, r.gw, r.type, r.err, r.mark) == ("rs2", lab.addr["server2_4"], "unicast", None, 1)
    assert marked.out_dev == "rs2"

    r = plain.stage("route").route
    assert r.tables[-1] == "main" and r.rule == "32766: from all lookup main"
    assert (r.dev, r.gw, r.mark) == ("rs", None, 0)
    assert plain.out_dev == "rs"

    d = json.loads(packet_json(marked))
    route = next(s for s in d["path"] if s["stage"] == "route")["route"]
    assert {"tables", "rule", "type", "dev", "gw", "src", "err", "mark"} <= set(route)
    # with a custom rule the kernel also looks up the source (fib_validate_source)
    assert route["src_check"]["dev"] == "rc"
    assert route["dev"] == "rs2" and route["mark"] == 1
    pre_j = next(s for s in d["path"] if s["stage"] == "prerouting")
    assert pre_j["tables"][0] | {"priority": None} == {"table": "mangle", "priority": None, "mark": 1, "dscp": 0,
                                                      "ct": None, "verdict": "accept"}
    assert pre_j["tables"][0]["priority"] == -150


def test_mangle_output_mark_reroutes_a_local_packet(lab, trace):
    lab.iptables("-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "5003", "-j", "MARK", "--set-mark", "1")
    second_uplink_table(lab)
    cap = trace(filter=PacketFilter(proto=17))
    lab.udp_send(lab.router, lab.addr["server4"], 5003)
    p = cap.until(lambda p: p.dport == 5003 and p.fate == "sent")
    assert p.crossed("route", "output", "reroute", "postrouting", "tx")
    first, again = p.stage("route").route, p.stage("reroute").route
    assert (first.tables[-1], first.dev, first.mark) == ("main", "rs", 0)
    assert (again.tables[-1], again.dev, again.mark) == ("100", "rs2", 1)
    assert again.rule == "100: from all fwmark 0x1/0x1 lookup 100"
    assert again.src == lab.addr["router_s4"]   # the source the first lookup chose stays
    assert [(t.table, t.mark) for t in p.stage("output").tables] == [("mangle", 1)]
    assert p.out_dev == "rs2"


def test_dnat_at_prerouting_and_masquerade_at_postrouting(lab, trace):
    a = lab.addr
    lab.iptables("-t", "nat", "-A", "PREROUTING", "-p", "udp", "-d", a["router_c4"], "--dport", "8080",
                 "-j", "DNAT", "--to-destination", f"{a['server4']}:80")
    lab.iptables("-t", "nat", "-A", "POSTROUTING", "-o", "rs", "-j", "MASQUERADE")
    cap = trace(filter=PacketFilter(proto=17))
    lab.udp_send(lab.client, a["router_c4"], 8080, sport=40000)
    p = cap.until(lambda p: p.dport == 8080 and p.fate == "forwarded")
    nat_pre = [t for t in p.stage("prerouting").tables if t.nat]
    assert [(t.table, t.nat) for t in nat_pre] == [
        ("nat", {"dst": {"from": f"{a['router_c4']}:8080", "to": f"{a['server4']}:80"}})]
    nat_post = [t for t in p.stage("postrouting").tables if t.nat]
    assert len(nat_post) == 1 and nat_post[0].table == "nat"
    assert nat_post[0].nat["src"]["from"] == f"{a['client4']}:40000"
    assert nat_post[0].nat["src"]["to"].startswith(a["router_s4"] + ":")
    # conntrack saw a new connection from its first table on
    assert p.stage("prerouting").ct == "new"
    assert p.addresses("dst") == [a["router_c4"], a["server4"]]
    # the routing decision used the translated destination
    assert p.stage("route").route.dev == "rs"


def test_counted_nat_paths_are_one_path_whatever_the_ports(lab, trace):
    # a NAT rewrite's address stage says which side and where, not the
    # address or port it wrote: three connections masqueraded from three
    # source ports are one path in the kernel's counters (serve)
    a = lab.addr
    lab.iptables("-t", "nat", "-A", "POSTROUTING", "-o", "rs", "-p", "udp", "-j", "MASQUERADE")
    counting = trace(filter=PacketFilter(proto=17), emit=False, count=True)
    for sport in (40001, 40002, 40003):
        lab.udp_send(lab.client, a["server4"], 5002, sport=sport)
    time.sleep(0.5)
    paths = [(lb.nat, n) for lb, n in exporter.PathCounts(counting.tracer).read()
             if lb.proto == "udp" and lb.fate == "forwarded"]
    assert paths == [([("postrouting", "src")], 3)], paths


def test_dscp_set_in_mangle_forward(lab, trace):
    lab.iptables("-t", "mangle", "-A", "FORWARD", "-p", "udp", "--dport", "5004", "-j", "DSCP", "--set-dscp", "10")
    cap = trace(filter=PacketFilter(proto=17))
    udp_from_client(lab, 5004)
    p = cap.until(lambda p: p.dport == 5004 and p.fate == "forwarded")
    fwd = p.stage("forward")
    assert [(t.table, t.dscp_in, t.dscp) for t in fwd.tables] == [("mangle", 0, 10)]
    assert (fwd.tos, fwd.tos_out) == (0, 10 << 2)
    assert all(t.dscp == 0 for t in p.stage("prerouting").tables)


def test_dscp_set_in_mangle_forward_ipv6(lab, trace):
    """IPv6 keeps DSCP in the traffic class, split over the header's first two
    bytes: the observers read it from there (with inlined loads where the
    netfilter links are, helper reads under fentry and kprobes)."""
    lab.iptables("-t", "mangle", "-A", "FORWARD", "-p", "udp", "--dport", "5014", "-j", "DSCP", "--set-dscp", "46",
                 v6=True)
    cap = trace(filter=PacketFilter(proto=17))
    udp_from_client(lab, 5014, dst=lab.addr["server6"])
    p = cap.until(lambda p: p.dport == 5014 and p.fate == "forwarded")
    assert p.family == "ipv6"
    fwd = p.stage("forward")
    assert [(t.table, t.dscp_in, t.dscp) for t in fwd.tables] == [("mangle", 0, 46)]
    assert (fwd.tos, fwd.tos_out) == (0, 46 << 2)


def test_raw_notrack_is_untracked_from_then_on(lab, trace):
    lab.iptables("-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "5005", "-j", "NOTRACK")
    # a conntrack user, so that conntrack runs in this netns
    lab.iptables("-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    cap = trace(filter=PacketFilter(proto=17))
    udp_from_client(lab, 5005)
    udp_from_client(lab, 5006)
    untracked = cap.until(lambda p: p.dport == 5005 and p.fate == "forwarded")
    tracked = cap.until(lambda p: p.dport == 5006 and p.fate == "forwarded")
    pre = untracked.stage("prerouting")
    assert [(t.table, t.ct) for t in pre.tables][0] == ("raw", "untracked")
    for name in ("prerouting", "forward", "postrouting"):
        assert untracked.stage(name).ct == "untracked", name
    assert [t.ct for t in tracked.stage("prerouting").tables] == [None, "new"]   # raw, then conntrack
    assert tracked.stage("forward").ct == "new"


def test_drops_name_the_table_and_stage(lab, trace):
    a = lab.addr
    lab.iptables("-A", "INPUT", "-p", "udp", "--dport", "5007", "-j", "DROP")
    lab.iptables("-A", "FORWARD", "-p", "udp", "--dport", "5009", "-j", "DROP")
    lab.iptables("-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "5008", "-j", "DROP")
    lab.ip(lab.router, "route", "add", "unreachable", a["server2_4"] + "/32")
    cap = trace(filter=PacketFilter(proto=17))
    lab.udp_send(lab.client, a["router_c4"], 5007)
    udp_from_client(lab, 5009)
    udp_from_client(lab, 5008)
    lab.udp_send(lab.client, a["server2_4"], 5010)
    got = {}
    for port in (5007, 5009, 5008, 5010):
        p = cap.until(lambda p, port=port: p.dport == port and p.fate == "dropped")
        got[port] = (p.drop["table"], p.drop["stage"], p.drop["reason"])
    assert got[5007] == ("filter", "input", "NETFILTER_DROP")
    assert got[5009] == ("filter", "forward", "NETFILTER_DROP")
    assert got[5008] == ("mangle", "prerouting", "NETFILTER_DROP")
    assert got[5010][:2] == (None, "route")
    p = cap.until(lambda p: p.dport == 5010)
    r = p.stage("route").route
    assert (r.type, r.err) == ("unreachable", "EHOSTUNREACH")
    d = json.loads(packet_json(cap.until(lambda p: p.dport == 5009)))
    assert (d["drop"]["table"], d["drop"]["stage"]) == ("filter", "forward")
    fwd = next(s for s in d["path"] if s["stage"] == "forward")
    assert fwd["tables"][-1]["verdict"] == "drop"


def netfilter_links_of(tracer) -> int | None:
    """Count our netfilter links as the kernel lists them (bpftool), not as we
    think.  None on the fentry backend: it observes the tables themselves
    and places no links."""
    if tracer.plan.netfilter != "nflink":
        return None
    ours = {lk.fd for lk in tracer.observer_links()}
    assert ours
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                      check=True).stdout)
    obs_ids = {p["id"] for p in progs if p.get("name", "").startswith("nf_obs_")}
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout)
    # bpftool 7.1 prints the netfilter link type as its number, 10
    return sum(1 for lk in links if lk.get("prog_id") in obs_ids and lk.get("type") in ("netfilter", 10))


def test_no_rules_means_one_observer_per_hook(lab, trace):
    cap = trace()
    assert netfilter_links_of(cap.tracer) in (5 * 2, None)   # 5 hooks x 2 families, nothing after tables
    assert lab.ping(lab.client, lab.addr["server4"]) == 1
    p = cap.until(lambda p: p.fate == "forwarded" and p.proto == "icmp")
    assert p.crossed("prerouting", "route", "forward", "postrouting")
    if cap.tracer.plan.netfilter == "nflink":
        # one observer per hook, nothing after tables (the hook-machinery
        # backends see every table the kernel still has registered, empty or not)
        assert all(len(s.observations) == 1 and not s.tables for s in p.path if s.observations)


def test_rules_added_while_tracing_move_the_observers_without_losing_packets(lab, trace):
    cap = trace(filter=PacketFilter(proto=17, port=5011), replace_every=0.2)
    assert netfilter_links_of(cap.tracer) in (10, None)
    sent = 0
    for i in range(40):
        udp_from_client(lab, 5011)
        sent += 1
        if i == 10:
            lab.iptables("-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "5011", "-j", "MARK",
                         "--set-mark", "7")
        time.sleep(0.025)                        # a steady stream over ~1 s
        cap.packets.extend(cap.tracer.poll(0))
    cap.settle(0.5)
    pkts = [p for p in cap.packets if p.dport == 5011]
    assert len(pkts) == sent and all(p.fate == "forwarded" for p in pkts)
    # v4 prerouting gained an observer after mangle (v6 has no table: unchanged)
    assert netfilter_links_of(cap.tracer) in (11, None)
    assert pkts[-1].stage("prerouting").tables[0].table == "mangle"
    assert pkts[-1].stage("prerouting").mark_out == 7
    assert cap.tracer.counters().attach_failures == 0


def test_placement_reads_iptables_nft_and_native_nft(lab):
    lab.iptables("-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-mark", "1")
    lab.nft("add", "table", "inet", "fw")
    lab.nft("add", "chain", "inet", "fw", "in", "{ type filter hook input priority 10; }")
    lab.nft("add", "table", "ip", "n")
    lab.nft("add", "chain", "ip", "n", "post", "{ type nat hook postrouting priority 120; }")
    reg = placement.registered(lab.router)
    # nft chains carry their table's handle (what fentry/kprobe name them by)
    assert all(t.handle > 0 for t in reg[(6, placement.INPUT)] + reg[(4, placement.POST)])
    assert reg[(4, placement.PRE)][0] == placement.Table("conntrack", -200)
    no_handles = {k: [dataclasses.replace(t, handle=0) for t in v] for k, v in reg.items()}
    assert no_handles[(4, placement.PRE)] == [placement.Table("conntrack", -200), placement.Table("mangle", -150)]
    assert no_handles[(6, placement.INPUT)] == [placement.Table("fw/in", 10)]
    # the nat chain runs inside the NAT core hook at +100, whatever its own priority
    assert no_handles[(4, placement.POST)] == [placement.Table("n/post", 100, nat=True)]
    plan = placement.plan(reg)
    assert plan[(4, placement.PRE)].priorities == [placement.PRIO_FIRST, -199, -149]


def test_conntrack_shares_the_observer_of_the_nft_chain_after_it(lab, trace):
    """One observer after conntrack and mangle (netfilter links, where the
    kernel shows where a dropped packet was freed); the path still names
    each: mangle's mark, conntrack's state, and mangle's drop."""
    lab.iptables("-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "5001", "-j", "MARK", "--set-mark", "1")
    lab.iptables("-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "5008", "-j", "DROP")
    lab.iptables("-A", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT")
    cap = trace(filter=PacketFilter(proto=17))
    t = cap.tracer
    merged = t.plan.netfilter == "nflink" and t.plan.hook_slow is not None
    if merged:
        [placed] = t.placed.values()
        assert [p - placed.bank for p in placed.plans[(4, placement.PRE)].priorities] == [placement.PRIO_FIRST, -149]
    udp_from_client(lab, 5001)
    udp_from_client(lab, 5008)
    marked = cap.until(lambda p: p.dport == 5001 and p.fate == "forwarded")
    dropped = cap.until(lambda p: p.dport == 5008 and p.fate == "dropped")
    pre = marked.stage("prerouting")
    # (fentry/kprobe observe each table itself: conntrack, which has no
    # chain, runs unobserved there and shows only in the stage's ct)
    ct_step = [("conntrack", 0, 0, "new")] if t.plan.netfilter == "nflink" else []
    assert [(tb.table, tb.mark_in, tb.mark, tb.ct) for tb in pre.tables] == ct_step + [("mangle", 0, 1, "new")]
    if merged:
        assert len(pre.observations) == 2      # before every table, after both
    assert (dropped.drop["table"], dropped.drop["stage"]) == ("mangle", "prerouting")
    ct_pass = [("conntrack", "accept")] if t.plan.netfilter == "nflink" else []
    steps = [(tb.table, tb.verdict) for tb in dropped.stage("prerouting").tables]
    assert steps[-len(ct_pass) - 1:] == ct_pass + [("mangle", "drop")]
