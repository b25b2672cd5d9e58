"""The paths pkttrace reports for real packets through a real netns router.

Paths are checked as ordered subsequences: other stages (tc, extra lookups)
may sit between the ones a test names.
"""
from __future__ import annotations

import socket

import pytest

from tracer import netns
from tracer.filters import Mark, PacketFilter, parse_cidr

pytestmark = pytest.mark.root

ICMP, ICMP6, UDP = 1, 58, 17


def _from_to(p, src, dst, proto):
    return p.src == src and p.dst == dst and p.proto_num == proto


def test_local_delivery_to_router_address(lab, trace):
    """Seed 002: packets for the router itself never cross forward/output/postrouting."""
    cap = trace(filter=PacketFilter(proto=ICMP))
    assert lab.ping(lab.client, lab.addr["router_c4"]) == 1
    p = cap.until(lambda p: _from_to(p, lab.addr["client4"], lab.addr["router_c4"], ICMP))
    names = p.stage_names()
    assert p.fate == "delivered"
    # ICMP has no early demux: the input route lookup must be there
    assert p.crossed(cap.rx, "prerouting", "route", "input", "deliver"), names
    assert not {"forward", "output", "postrouting", "tx"} & set(names), names
    assert p.in_dev == "rc"


@pytest.mark.parametrize("answer", ["echo reply", "port unreachable"])
def test_the_first_answer_to_a_new_peer_is_routed_by_its_own_lookup(lab, trace, answer):
    """At a first contact the router resolves the peer's address (ARP) before
    the packet it answers arrives; a lookup made then has the answer's
    addresses reversed.  The answer's route is its own lookups (main, the
    decision), not that one taken for a source check: an output route has
    none."""
    a = lab.addr
    for ns in (lab.client, lab.router):
        lab.ip(ns, "neigh", "flush", "all")
    # (with a filter that turns down what it answers, or without)
    cap = trace(filter=PacketFilter(proto=ICMP) if answer == "port unreachable" else PacketFilter())
    if answer == "echo reply":
        assert lab.ping(lab.client, a["router_c4"]) == 1
    else:
        lab.udp_send(lab.client, a["router_c4"], 5555)
    p = cap.until(lambda p: _from_to(p, a["router_c4"], a["client4"], ICMP))
    assert p.fate == "sent", p.fate
    assert p.cause or answer == "port unreachable", "what it answers has a record: it names it"
    route = p.path[p.stage_names().index("route")]
    # (an ICMP error's route is looked up twice: icmp_route_lookup)
    assert route.lookups and {(lk.table, lk.src_check) for lk in route.lookups} == {("main", False)}, \
        [(lk.table, lk.src_check, lk.dev) for lk in route.lookups]
    assert route.dev == "rc"


def test_udp_delivery_names_the_reading_process(lab, trace):
    cap = trace(filter=PacketFilter(proto=UDP, port=7001))
    with lab.udp_server(lab.router, lab.addr["router_c4"], 7001) as srv:
        lab.udp_send(lab.client, lab.addr["router_c4"], 7001, b"hello")
        assert srv.recv(2.0) == b"hello"
        p = cap.until(lambda p: p.dport == 7001)
    assert p.fate == "delivered"
    assert p.crossed("prerouting", "input", "deliver")
    assert p.process and p.process["pid"] > 0 and p.process["comm"]


def test_forwarded_ipv4(lab, trace):
    cap = trace(filter=PacketFilter(proto=ICMP))
    assert lab.ping(lab.client, lab.addr["server4"]) == 1
    p = cap.until(lambda p: _from_to(p, lab.addr["client4"], lab.addr["server4"], ICMP))
    names = p.stage_names()
    assert p.fate == "forwarded"
    assert p.crossed(cap.rx, "prerouting", "route", "forward", "postrouting", "tx"), names
    assert not {"input", "output", "deliver"} & set(names), names
    assert (p.in_dev, p.out_dev) == ("rc", "rs")
    route = p.path[names.index("route")]
    assert route.lookups[-1].table == "main" and route.dev == "rs" and route.lookups[-1].err is None
    assert names.index(cap.rx) < names.index("prerouting") < names.index("postrouting") < \
        names.index(cap.tx) <= names.index("tx")


def test_forwarded_ipv6(lab, trace):
    cap = trace(filter=PacketFilter(proto=ICMP6, dst=parse_cidr(lab.addr["server6"])))
    assert lab.ping(lab.client, lab.addr["server6"]) == 1
    p = cap.until(lambda p: p.src == lab.addr["client6"] and p.family == "ipv6")
    names = p.stage_names()
    assert p.fate == "forwarded"
    assert p.crossed(cap.rx, "prerouting", "route", "forward", "postrouting", "tx"), names
    assert not {"input", "output", "deliver"} & set(names), names
    assert (p.in_dev, p.out_dev) == ("rc", "rs")


def test_router_originated_packet_is_sent(lab, trace):
    cap = trace(filter=PacketFilter(proto=ICMP, dst=parse_cidr(lab.addr["server4"])))
    assert lab.ping(lab.router, lab.addr["server4"]) == 1
    p = cap.until(lambda p: p.src == lab.addr["router_s4"])
    names = p.stage_names()
    assert p.fate == "sent", (p.fate, names)
    assert p.crossed("output", "postrouting", "tx"), names
    assert not {"rx", "tc_ingress", "prerouting", "forward", "input"} & set(names), names
    # output routing happens before the OUTPUT hook
    assert "route" in names and names.index("route") < names.index("output"), names


def test_filter_forward_drop(lab, trace):
    """The demo ruleset drops UDP 5009 in filter FORWARD."""
    cap = trace(filter=PacketFilter(proto=UDP, port=5009))
    lab.udp_send(lab.client, lab.addr["server4"], 5009, b"x")
    p = cap.until(lambda p: p.dport == 5009)
    assert p.fate == "dropped"
    assert p.drop["reason"] == "NETFILTER_DROP"
    assert p.drop["last_hook"] == "forward"
    assert p.drop["location"].split("+")[0]  # a kernel symbol, not a bare address
    assert not p.drop["location"].startswith("0x")
    names = p.stage_names()
    assert names[-1] == "drop" and "postrouting" not in names
    fwd = p.path[names.index("forward")]
    if cap.tracer.plan.netfilter == "nflink":
        # FORWARD's first observer comes after filter: no observer saw it
        # there; the drop itself says where, and the forward stage carries
        # both devices as an observed one does
        assert fwd.observations == [] and fwd.tables[0].table == "filter"
        assert (fwd.dev, fwd.in_dev) == ("rs", "rc")
    else:
        # the nft chain that dropped it said so from inside (since 6.1 it
        # frees the packet itself): the hook's entry, then the chain at 0
        assert [o.priority for o in fwd.observations][1:] == [0]
    assert p.drop["table"] == "filter" and fwd.tables[-1].verdict == "drop"
    assert (p.in_dev, p.out_dev) == ("rc", "rs")     # the route the kernel attached, where no observer saw it


def test_iface_filter_on_the_out_device_shows_a_packet_dropped_in_forward(lab, trace):
    """--iface matches the device a packet was routed to even where FORWARD
    dropped it before any observer there saw it (its first observer comes
    after filter): the kernel's route says which."""
    cap = trace(filter=PacketFilter(proto=UDP, port=5009, iface="rs"))
    lab.udp_send(lab.client, lab.addr["server4"], 5009, b"x")
    p = cap.until(lambda p: p.dport == 5009)
    assert (p.fate, p.drop["stage"], p.out_dev) == ("dropped", "forward", "rs")


def test_mark_filter_shows_only_marked_packets_with_mark_change(lab, trace):
    """Demo ruleset: mangle PREROUTING marks UDP dport 5001 with 0x1."""
    cap = trace(filter=PacketFilter(mark=Mark(0x1)))
    with lab.udp_server(lab.server, lab.addr["server4"], 5001) as s1, \
            lab.udp_server(lab.server, lab.addr["server4"], 5002) as s2:
        lab.udp_send(lab.client, lab.addr["server4"], 5002, b"unmarked")
        lab.udp_send(lab.client, lab.addr["server4"], 5001, b"marked")
        assert s1.recv(2.0) == b"marked" and s2.recv(2.0) == b"unmarked"
        p = cap.until(lambda p: p.dport == 5001)
        cap.settle(0.5)
    assert all(p.dport == 5001 for p in cap.packets), [(p.proto, p.dport) for p in cap.packets]
    pre = p.path[p.stage_names().index("prerouting")]
    # before the mangle table (first observer) 0, after it (last observer) 0x1
    assert pre.mark == 0 and pre.mark_out == 0x1
    assert pre.observations[0].priority < -150 < pre.observations[-1].priority
    # stages before the mark was set are shown too
    assert p.path[0].stage == cap.rx and p.path[0].mark == 0
    assert p.path[-1].mark == 0x1


def _udp_from(ns, dst, port):
    """One datagram from inside ns to dst (the lab helpers only send to lab hosts)."""
    import socket

    from tracer import netns
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.sendto(b"x", (dst, port))


def test_unfinished_packet_ages_out_as_unknown(lab, trace):
    """A forwarded packet waiting for ARP that nobody answers: no end within age_after."""
    silent = lab.addr["server4"].rsplit(".", 1)[0] + ".99"  # on the server link, no host
    cap = trace(filter=PacketFilter(proto=UDP, port=7002), age_after=0.5)
    _udp_from(lab.client, silent, 7002)
    p = cap.until(lambda p: p.dport == 7002, timeout=5)
    assert p.fate == "unknown" and p.end == "aged out"
    assert p.crossed("prerouting", "route", "forward", "postrouting")
    assert "tx" not in p.stage_names()
    assert cap.tracer.counters().aged_out >= 1


def test_counters_account_for_every_packet(lab, trace):
    cap = trace(filter=PacketFilter(proto=ICMP))
    assert lab.ping(lab.client, lab.addr["server4"], count=3) == 3
    # 3 requests and 3 replies cross the router
    cap.until(lambda _: sum(q.fate == "forwarded" for q in cap.packets) >= 6)
    c = cap.tracer.counters()
    assert c.lost == 0 and c.create_failed == 0
    # every record started was emitted, filtered, aged or is still in flight
    assert c.created == c.emitted + c.filtered + c.aged_out + cap.tracer.inflight()


@pytest.mark.parametrize("family", [4, 6])
def test_address_filters_exclude_other_packets(lab, trace, family):
    """--dst/--src select in the kernel: nothing else reaches user space."""
    server, client = lab.addr[f"server{family}"], lab.addr[f"client{family}"]
    cap = trace(filter=PacketFilter(src=parse_cidr(client), dst=parse_cidr(server)))
    assert lab.ping(lab.client, lab.addr[f"router_c{family}"]) == 1  # must not show
    assert lab.ping(lab.client, server) == 1
    cap.until(lambda p: p.dst == server)
    cap.settle(0.3)
    assert {(p.src, p.dst) for p in cap.packets} == {(client, server)}
    c = cap.tracer.counters()
    # a header-only filter judges packets at first sight: no record for the rest
    assert c.rejected > 0 and c.filtered == 0


def test_port_and_iface_filters(lab, trace):
    cap = trace(filter=PacketFilter(port=5003, iface="rs"))
    with lab.udp_server(lab.server, lab.addr["server4"], 5003) as srv:
        lab.udp_send(lab.client, lab.addr["router_c4"], 5003, b"to router: no rs")  # port ok, iface not
        lab.udp_send(lab.client, lab.addr["server4"], 5004, b"wrong port")
        lab.udp_send(lab.client, lab.addr["server4"], 5003, b"both")
        assert srv.recv(2.0) == b"both"
        cap.until(lambda p: p.dport == 5003 and p.out_dev == "rs")
        cap.settle(0.3)
    assert [(p.dport, p.out_dev) for p in cap.packets] == [(5003, "rs")]


def test_routes_of_selected_packets_sent_among_rejected_ones(lab, trace):
    """The route lookups of packets the filter turned down (no record on the
    CPU then) are not kept: the packets it selects, sent between them,
    still get their own."""
    cap = trace(filter=PacketFilter(proto=UDP, port=5011))
    for _ in range(5):
        lab.udp_send(lab.client, lab.addr["server4"], 5010, b"not selected", count=20)
        lab.udp_send(lab.client, lab.addr["server4"], 5011, b"selected")
    cap.until(lambda _: sum(p.dport == 5011 for p in cap.packets) >= 5)
    cap.settle(0.3)
    assert [p.dport for p in cap.packets] == [5011] * 5
    for p in cap.packets:
        names = p.stage_names()
        assert p.fate == "forwarded" and "route" in names, (p.fate, names)
        route = p.path[names.index("route")]
        assert (route.lookups[-1].table, route.lookups[-1].err, route.dev) == ("main", None, "rs")
    c = cap.tracer.counters()
    # judged at first sight, or (with NAT in the netns) once conntrack had its NAT
    assert c.rejected + c.filtered >= 100 and c.route_dropped == 0, c


def test_another_namespaces_rule_walks_leave_the_route_ring_alone(lab, trace):
    """A namespace nobody traces (the client) with a rule to table 200: each
    of its sends walks the rules, missing the local table and table 200
    before main.  A miss names no device, so no netns: it is pushed to the
    CPU's ring of lookups, and taken back when the walk's result turns out
    to be in a netns nobody traces.  A burst of them to a host on the
    client's own link (the router never sees those packets, so nothing of
    the traced netns claims lookups in between) counts no route lookup as
    lost, and the router's packets sent after it get their own route."""
    cap = trace()
    # table 200 exists (a rule to a table that does not is skipped unlooked)
    lab.ip(lab.client, "route", "add", "blackhole", "198.51.100.0/24", "table", "200")
    lab.ip(lab.client, "rule", "add", "pref", "100", "lookup", "200")
    neighbour = lab.addr["router_c4"].rsplit(".", 1)[0] + ".200"   # on the client's link, nobody there
    try:
        with netns.entered(lab.client):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for _ in range(200):   # queued for ARP, never answered: under the socket's 256
                sock.sendto(b"burst", (neighbour, 5012))
        with lab.udp_server(lab.server, lab.addr["server4"], 5013):
            lab.udp_send(lab.client, lab.addr["server4"], 5013, b"after", count=5)
            cap.until(lambda _: sum(p.dport == 5013 for p in cap.packets) >= 5)
            cap.settle(0.3)
    finally:
        lab.ip(lab.client, "rule", "del", "pref", "100")
        lab.ip(lab.client, "route", "flush", "table", "200")
    after = [p for p in cap.packets if p.dport == 5013]
    assert len(after) == 5 and not [p for p in cap.packets if p.dport == 5012]
    for p in after:
        names = p.stage_names()
        assert p.fate == "forwarded" and "route" in names, (p.fate, names)
        route = p.path[names.index("route")]
        tables = [lk.table for lk in route.lookups]
        assert "200" not in tables and (tables[-1], route.dev) == ("main", "rs"), tables
    c = cap.tracer.counters()
    assert c.route_dropped == 0, c


def test_header_filter_still_catches_a_packet_that_matches_only_after_dnat(lab, trace):
    """--dst names the DNAT target: the packet is sent to the router's address."""
    server = lab.addr["server4"]
    lab.iptables("-t", "nat", "-A", "PREROUTING", "-p", "udp", "--dport", "7100", "-j", "DNAT",
                 "--to-destination", f"{server}:7101")
    try:
        cap = trace(filter=PacketFilter(dst=parse_cidr(server), port=7101))
        with lab.udp_server(lab.server, server, 7101) as srv:
            lab.udp_send(lab.client, lab.addr["router_c4"], 7100, b"to be translated")
            assert srv.recv(2.0) == b"to be translated"
            p = cap.until(lambda p: server in p.addresses("dst") and p.dport == 7100)
    finally:
        lab.iptables("-t", "nat", "-F", "PREROUTING")
    # NAT in the netns: the packet is judged at its end, so its whole path is
    # kept, from before the translation that made it match
    assert not p.late_match and p.fate == "forwarded"
    assert p.dst == lab.addr["router_c4"]
    assert p.stage_names()[0] == cap.rx
    assert p.crossed(cap.rx, "prerouting", "route", "forward", "postrouting", *{cap.tx: None, "tx": None})
    assert p.out_dev == "rs"


def test_without_tc_observers_rx_and_tx_come_from_the_tracepoints(lab, trace):
    """--tc off: netif_receive_skb marks the receive and net_dev_queue the
    hand-over to the device; net_dev_xmit still ends the packet."""
    cap = trace(filter=PacketFilter(proto=ICMP), tc="off")
    assert lab.ping(lab.client, lab.addr["server4"]) == 1
    p = cap.until(lambda p: _from_to(p, lab.addr["client4"], lab.addr["server4"], ICMP))
    names = p.stage_names()
    assert p.fate == "forwarded"
    assert names[0] == "rx" and names[-1] == "tx", names
    assert p.crossed("rx", "prerouting", "route", "forward", "postrouting", "tx"), names
    assert not {"tc_ingress", "tc_egress"} & set(names), names
    assert (p.in_dev, p.out_dev) == ("rc", "rs")
