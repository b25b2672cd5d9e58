"""Path assembly and filters on records recorded from a real kernel.

tests/data/lab-demo.jsonl was made with
    pkttrace lab demo --record tests/data/lab-demo.jsonl
(kernel 6.18): raw records exactly as the BPF programs wrote them, plus the
names user space knew.  No root and no BPF are needed to replay them.
"""
from __future__ import annotations

import io
import os

import pytest

from tracer import cli
from tracer.filters import Mark, PacketFilter, parse_cidr
from tracer.recording import RecordingError, replay

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")


@pytest.fixture(scope="module")
def packets():
    with open(DATA) as f:
        return list(replay(f))


def one(packets, **want):
    found = [p for p in packets if all(getattr(p, k) == v for k, v in want.items())]
    assert len(found) >= 1, f"no packet with {want}"
    return found[0]


def test_forwarded_ipv4_path(packets):
    p = one(packets, proto="icmp", src="10.71.1.2", dst="10.71.2.2")
    assert p.fate == "forwarded" and p.end == "tx"
    # tc ingress marks the receive, tc egress the hand-over, tx the driver taking it
    assert p.stage_names() == ["tc_ingress", "prerouting", "route", "forward", "postrouting", "tc_egress", "tx"]
    assert (p.in_dev, p.out_dev, p.netns) == ("rc", "rs", "ptlab-rtr")
    route = p.path[2]
    # the demo's `ip rule` makes the kernel walk the rules: local, then main;
    # then it looks up the source (fib_validate_source), shown apart
    assert route.route.tables == ["local", "main"] and route.dev == "rs"
    assert route.route.rule == "32766: from all lookup main" and route.route.src_check["dev"] == "rc"
    fwd = p.path[3]
    assert (fwd.in_dev, fwd.dev) == ("rc", "rs")
    # the first observer, and one after the filter table (priority 0)
    assert [o.priority for o in fwd.observations] == [-2147483647, 1]
    assert [(t.table, t.priority, t.verdict) for t in fwd.tables] == [("filter", 0, "accept")]
    times = [s.t_ns for s in p.path]
    assert times[0] == 0 and times == sorted(times)


def test_forwarded_ipv6_consults_local_then_main(packets):
    p = one(packets, family="ipv6", src="fd71:1::2", dst="fd71:2::2")
    assert p.fate == "forwarded"
    assert p.crossed("tc_ingress", "prerouting", "route", "forward", "postrouting", "tx")
    assert [lk.table for lk in p.path[p.stage_names().index("route")].lookups] == ["local", "main"]


def test_delivered_to_router(packets):
    p = one(packets, proto="icmp", dst="10.71.1.1")
    assert p.fate == "delivered" and p.end == "consumed after input"
    assert p.stage_names() == ["tc_ingress", "prerouting", "route", "input", "deliver"]


def test_sent_by_router_routes_before_output(packets):
    p = one(packets, proto="icmp", src="10.71.2.1", dst="10.71.2.2")
    assert p.fate == "sent"
    assert p.stage_names() == ["route", "output", "postrouting", "tc_egress", "tx"]
    assert p.in_dev is None and p.out_dev == "rs"


def test_mark_change_inside_prerouting(packets):
    p = one(packets, proto="udp", dport=5001)
    pre = p.path[p.stage_names().index("prerouting")]
    assert (pre.mark, pre.mark_out) == (0, 1)
    assert [o.mark for o in pre.observations] == [0, 0, 1, 1]   # first, conntrack, mangle, nat
    assert [(t.table, t.mark_in, t.mark) for t in pre.tables] == [("conntrack", 0, 0), ("mangle", 0, 1),
                                                                 ("nat", 1, 1)]
    assert all(s.mark == 1 for s in p.path[p.stage_names().index("route"):])
    # and the mark chose table 100, which leaves through the second uplink
    route = p.path[p.stage_names().index("route")].route
    assert (route.rule, route.tables[-1], route.dev) == ("100: from all fwmark 0x1/0x1 lookup 100", "100", "rs2")
    assert p.out_dev == "rs2"


def test_reroute_after_mangle_output(packets):
    p = one(packets, proto="udp", dport=5003)
    assert p.stage_names() == ["route", "output", "reroute", "postrouting", "tc_egress", "tx"]
    first, again = p.stage("route").route, p.stage("reroute").route
    assert (first.tables[-1], first.mark, first.dev) == ("main", 0, "rs")
    assert (again.tables[-1], again.mark, again.dev) == ("100", 1, "rs2")


def test_dnat_port_forward(packets):
    p = one(packets, proto="udp", dport=8080)
    nat = [t for t in p.stage("prerouting").tables if t.nat]
    assert [(t.table, t.nat) for t in nat] == [("nat", {"dst": {"from": "10.71.1.1:8080", "to": "10.71.2.2:5002"}})]
    assert p.fate == "forwarded" and p.out_dev == "rs"


def test_drop_names_reason_symbol_and_hook(packets):
    p = one(packets, proto="udp", dport=5009)
    assert p.fate == "dropped"
    assert p.drop == {"reason": "NETFILTER_DROP", "location": p.drop["location"], "last_hook": "forward",
                      "stage": "forward", "table": "filter", "dev": "rc"}
    assert p.drop["location"].startswith("nft_do_chain+0x")
    assert p.stage_names()[-1] == "drop" and len(p.path[-2].observations) == 1
    assert p.path[-2].tables[-1].verdict == "drop"


def test_replay_filters_use_the_kernels_any_stage_rule(packets):
    marked = [p for p in packets if PacketFilter(mark=Mark(1)).matches(p)]
    assert [p.dport for p in marked] == [5001, 5003]
    v6 = PacketFilter(dst=parse_cidr("fd71:2::/64"))
    assert {p.dst for p in packets if v6.matches(p)} == {"fd71:2::2"}
    assert all(p.proto == "udp" for p in packets if PacketFilter(proto=17).matches(p))


def test_replay_command(capsys):
    assert cli.run(["replay", DATA, "--mark", "0x1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and '"dport":5001' in lines[0] and '"dport":5003' in lines[1]


def test_replay_iface_matches_device_names(capsys):
    assert cli.run(["replay", DATA, "--iface", "rs", "--proto", "udp"]) == 0
    out = capsys.readouterr().out
    assert "5009" in out and "8080" in out  # the drop happened after the route chose rs
    assert ":5001 " not in out              # marked: it left through rs2


def test_not_a_recording_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text("hello\n")
    assert cli.run(["replay", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not JSON" in err[0]


def test_wrong_header_is_refused():
    with pytest.raises(RecordingError):
        list(replay(io.StringIO('{"something": 1}\n')))
