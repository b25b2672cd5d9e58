"""IPv6 extension headers: the packet shows its upper-layer protocol and
ports, and `ext_hdrs` names the headers the parser walked to reach them.

Real packets from the kernel's own senders, traced on the lab router as
they arrive from the client: an MLDv2 report (the kernel puts a hop-by-hop
header with a router alert in front of every MLD message), UDP with a
destination-options header (the IPV6_DSTOPTS socket option), the same with a
hop-by-hop header too, a UDP datagram too big for the link (destination
options, then the fragment header, in every fragment), UDP behind a segment
routing header (a seg6 route) and behind IPsec AH (an xfrm state).  A packet
socket on the router's receiving device sees the same packets' bytes: the
ground truth the JSON is checked against.
"""
from __future__ import annotations

import json
import random
import select
import socket
import string
import struct
import time

import pytest

from tracer import netns
from tracer.filters import PacketFilter
from tracer.lab import Lab, LabError, NET_ID_RANGE
from tracer.model import packet_json

pytestmark = pytest.mark.root

ICMP6, UDP = 58, 17
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
SRH = 4          # routing header type 4: segment routing
MLD2_REPORT = 143
ETH_P_IPV6 = 0x86DD
# an 8-byte options header: next header and length (both the kernel's),
# then one PadN option of 4 bytes
PADN_OPTS = bytes([0, 0, 1, 4, 0, 0, 0, 0])


@pytest.fixture(scope="module")
def lab():
    """This module's own three-namespace lab ("x6..." namespaces), no rules."""
    prefix = "x6" + "".join(random.choices(string.ascii_lowercase, k=4))
    new = Lab(prefix, random.choice([n for n in NET_ID_RANGE if n != 71]))
    try:
        new.up(rules=False)
        yield new
    finally:
        new.down()


def pj(p) -> dict:
    """The packet as the JSON output prints it."""
    return json.loads(packet_json(p))


class Wire:
    """The IPv6 packets a device of a netns receives, as bytes (a packet
    socket: what tcpdump would see), read by the test itself."""

    def __init__(self, ns: str, ifname: str):
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6))
        self.sock.bind((ifname, ETH_P_IPV6))

    def until(self, pred, timeout: float = 5.0) -> bytes:
        """The first packet (from the IPv6 header on) satisfying pred."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.sock], [], [], left)[0]:
                data, addr = self.sock.recvfrom(65535)
                if addr[2] != socket.PACKET_OUTGOING and pred(data):
                    return data
        raise AssertionError("set-up: the router's device never received the packet")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire(lab):
    """What the router receives from the client (on rc)."""
    w = Wire(lab.router, "rc")
    yield w
    w.close()


def udp6_send(ns: str, dst: str, dport: int, payload: bytes = b"ext6", options: tuple = ()) -> int:
    """One datagram from ns; options: IPV6_DSTOPTS and/or IPV6_HOPOPTS, each
    an 8-byte header set as a sticky socket option.  Its source port."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with sock:
        for opt in options:
            sock.setsockopt(socket.IPPROTO_IPV6, opt, PADN_OPTS)
        sock.sendto(payload, (dst, dport))
        return sock.getsockname()[1]


def test_mld_report_is_icmpv6_143_behind_a_hop_by_hop_header(lab, trace, wire):
    group = socket.inet_pton(socket.AF_INET6, f"ff02::6:{lab.net_id:x}")
    # proto icmpv6 is matched in the kernel: before the walk it read the
    # hop-by-hop header's number (0) and this filter left the report out.
    # snap: the record's first bytes tell this join's report from the
    # reports of the groups the lab's interfaces joined when created
    cap = trace(filter=PacketFilter(proto=ICMP6), snap=True)
    with netns.entered(lab.client):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        mreq = group + struct.pack("@I", socket.if_nametoindex("c0"))
    with sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)  # the kernel reports the join
        # ground truth: a report naming the group on the wire, ICMPv6 behind
        # an 8-byte hop-by-hop header, to all MLDv2 routers
        raw = wire.until(lambda b: (b[6], b[40], b[48]) == (HOPOPTS, ICMP6, MLD2_REPORT) and group in b[56:])
        assert socket.inet_ntop(socket.AF_INET6, raw[24:40]) == "ff02::16", raw.hex()
        p = cap.until(lambda p: p.head is not None and group in p.head[56:], timeout=10)

    d = pj(p)
    assert (d["family"], d["proto"], d["icmp_type"], d["icmp_code"]) == ("ipv6", "icmpv6", MLD2_REPORT, 0), d
    assert d["ext_hdrs"] == ["hop-by-hop"], d
    assert (d["src"], d["dst"], d["len"]) == (socket.inet_ntop(socket.AF_INET6, raw[8:24]), "ff02::16", len(raw)), d
    assert d["netns"] == lab.router and d["in_dev"] == "rc", d


@pytest.mark.parametrize("hopopts", [False, True], ids=["dstopts", "hop-by-hop+dstopts"])
def test_udp_behind_destination_options_shows_its_ports(lab, trace, wire, hopopts):
    server, dport = lab.addr["server6"], 5061 + hopopts
    srv = lab.udp_server(lab.server, server, dport)
    cap = trace(filter=PacketFilter(proto=UDP))
    sport = udp6_send(lab.client, server, dport,
                      options=(socket.IPV6_DSTOPTS, socket.IPV6_HOPOPTS) if hopopts else (socket.IPV6_DSTOPTS,))

    # ground truth: each options header is 8 bytes; UDP follows them
    chain = [HOPOPTS, DSTOPTS, UDP] if hopopts else [DSTOPTS, UDP]
    udp_at = 40 + 8 * (len(chain) - 1)
    raw = wire.until(lambda b: [b[6], *b[40:udp_at:8]] == chain and
                     struct.unpack("!HH", b[udp_at:udp_at + 4]) == (sport, dport))
    assert srv.recv(2.0) == b"ext6", "set-up: the server did not receive the datagram"
    p = cap.until(lambda p: p.dst == server and p.sport == sport)

    d = pj(p)
    assert (d["family"], d["proto"], d["sport"], d["dport"]) == ("ipv6", "udp", sport, dport), d
    assert d["ext_hdrs"] == (["hop-by-hop", "dstopts"] if hopopts else ["dstopts"]), d
    assert d["fate"] == "forwarded" and d["in_dev"] == "rc" and d["out_dev"] == "rs", d
    assert d["len"] == len(raw) == udp_at + 8 + 4, d


def frag_offset(b: bytes) -> int:
    """The fragment offset of a packet whose fragment header is at byte 48."""
    return struct.unpack("!H", b[50:52])[0] & 0xFFF8


def test_fragments_walk_past_destination_options_and_the_fragment_header(lab, trace, wire):
    """A datagram too big for the client's link: Linux keeps the destination
    options in front of the fragment header, in every fragment, so the
    fragments read IPv6, destination options, fragment, and then the first
    one UDP; the later ones have no UDP header."""
    server, dport = lab.addr["server6"], 5063
    srv = lab.udp_server(lab.server, server, dport)
    payload = bytes(range(256)) * 12   # 3072 bytes: three fragments at MTU 1500
    cap = trace(filter=PacketFilter(proto=UDP))
    sport = udp6_send(lab.client, server, dport, payload, options=(socket.IPV6_DSTOPTS,))

    def chain(b: bytes) -> bool:
        return (b[6], b[40], b[48]) == (DSTOPTS, FRAGMENT, UDP)

    first = wire.until(lambda b: chain(b) and frag_offset(b) == 0 and struct.unpack("!H", b[56:58])[0] == sport)
    later = wire.until(lambda b: chain(b) and frag_offset(b) > 0 and b[52:56] == first[52:56])  # same id
    assert srv.recv(2.0) == payload, "set-up: the server did not receive the datagram"
    p = cap.until(lambda p: p.dst == server and p.sport == sport)
    q = cap.until(lambda p: p.dst == server and p.sport is None and p.length == len(later))

    d, e = pj(p), pj(q)
    assert (d["proto"], d["sport"], d["dport"], d["len"]) == ("udp", sport, dport, len(first)), d
    assert d["ext_hdrs"] == ["fragment", "dstopts"], d
    # a later fragment: the walk stops at the fragment header (no UDP header to read)
    assert (e["proto"], e["ext_hdrs"]) == ("udp", ["fragment", "dstopts"]) and "sport" not in e, e


def test_udp_behind_a_segment_routing_header_shows_its_ports(lab, trace, wire):
    """The client inserts a segment routing header (a routing header) in
    front of UDP: its route to the server sends it through the server's
    second address first."""
    server, segment, dport = lab.addr["server6"], lab.addr["server2_6"], 5065
    try:
        lab.ip(lab.client, "-6", "route", "add", f"{server}/128", "encap", "seg6", "mode", "inline",
               "segs", segment, "dev", "c0")
    except LabError as e:
        # "lwt encapsulation type not supported": no seg6 route encapsulation
        if "not supported" in str(e):
            pytest.skip("this kernel has no SRv6 route encapsulation (CONFIG_IPV6_SEG6_LWTUNNEL)")
        raise
    try:
        cap = trace(filter=PacketFilter(proto=UDP))
        sport = udp6_send(lab.client, server, dport)

        def srh_udp(b: bytes) -> bool:
            udp_at = 40 + (b[41] + 1) * 8
            return (b[6], b[40], b[42]) == (ROUTING, UDP, SRH) and \
                struct.unpack("!HH", b[udp_at:udp_at + 4]) == (sport, dport)

        raw = wire.until(srh_udp)    # ground truth: to the segment, UDP behind the routing header
        assert socket.inet_ntop(socket.AF_INET6, raw[24:40]) == segment, raw.hex()
        p = cap.until(lambda p: p.sport == sport and p.dport == dport)
    finally:
        lab.ip(lab.client, "-6", "route", "del", f"{server}/128")

    d = pj(p)
    assert (d["proto"], d["dst"], d["sport"], d["dport"]) == ("udp", segment, sport, dport), d
    assert d["ext_hdrs"] == ["routing"], d
    assert d["len"] == len(raw) and d["in_dev"] == "rc" and d["out_dev"] == "rs2", d


def test_udp_behind_an_authentication_header_shows_its_ports(lab, trace, wire):
    """IPsec AH in transport mode between client and server: AH's length
    counts 4-byte words (the others count 8), so the walk must get this one
    right to find UDP behind it."""
    client, server, dport = lab.addr["client6"], lab.addr["server6"], 5066
    sa = ["src", client, "dst", server, "proto", "ah", "spi", "0x6a6", "mode", "transport",
          "auth", "hmac(sha256)", "0x" + "6a" * 32]
    try:
        for ns in (lab.client, lab.server):
            try:
                lab.ip(ns, "xfrm", "state", "add", *sa)
            except LabError as e:
                # "Requested type not found": no xfrm type AH for IPv6
                if "type not found" in str(e):
                    pytest.skip("this kernel has no IPv6 AH (CONFIG_INET6_AH)")
                raise
        lab.ip(lab.client, "xfrm", "policy", "add", "src", f"{client}/128", "dst", f"{server}/128", "proto", "udp",
               "dport", dport, "dir", "out", "tmpl", "src", client, "dst", server, "proto", "ah", "mode", "transport")
        srv = lab.udp_server(lab.server, server, dport)
        cap = trace(filter=PacketFilter(proto=UDP))
        sport = udp6_send(lab.client, server, dport)

        def ah_udp(b: bytes) -> bool:
            udp_at = 40 + (b[41] + 2) * 4
            return (b[6], b[40]) == (AH, UDP) and struct.unpack("!HH", b[udp_at:udp_at + 4]) == (sport, dport)

        raw = wire.until(ah_udp)      # ground truth: UDP behind AH on the wire
        assert srv.recv(2.0) == b"ext6", "set-up: the server did not receive the datagram (AH)"
        p = cap.until(lambda p: p.sport == sport and p.dport == dport)
    finally:
        for ns in (lab.client, lab.server):
            lab.ip(ns, "xfrm", "policy", "flush")
            lab.ip(ns, "xfrm", "state", "flush")

    d = pj(p)
    assert (d["proto"], d["sport"], d["dport"], d["len"]) == ("udp", sport, dport, len(raw)), d
    assert d["ext_hdrs"] == ["ah"], d
    assert d["fate"] == "forwarded", d
