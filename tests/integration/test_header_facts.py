"""The header line's facts the kernel records at first sight: length, TCP
flags, ICMP type and code, the wall-clock time, and (for pcap-ng, -w) the
packet's first header bytes."""
from __future__ import annotations

import ipaddress
import subprocess
import sys
import time

import pytest

from tracer.filters import PacketFilter, parse_cidr
from tracer.model import tcp_flags_text
from tracer.output import format_json_line, packet_json

pytestmark = pytest.mark.root

ICMP, ICMP6, TCP, UDP = 1, 58, 6, 17


def _connect(ns: str, dst: str, port: int) -> None:
    """One TCP connect attempt from ns (a closed port: SYN, then the server's RST)."""
    code = f"import socket; s = socket.socket(); s.settimeout(1); s.connect_ex(({dst!r}, {port}))"
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, timeout=10)


def test_icmp_echo_has_its_length_type_code_and_wall_time(lab, trace):
    cap = trace(filter=PacketFilter(proto=ICMP))
    before = time.time()
    assert lab.ping(lab.client, lab.addr["server4"]) == 1
    after = time.time()
    req = cap.until(lambda p: p.src == lab.addr["client4"] and p.dst == lab.addr["server4"])
    rep = cap.until(lambda p: p.src == lab.addr["server4"] and p.dst == lab.addr["client4"])
    # lab.ping's payload is b"pkttrace-lab-ping": 20 (IP) + 8 (ICMP) + 17
    assert (req.length, req.icmp_type, req.icmp_code, req.tcp_flags) == (45, 8, 0, None)
    assert (rep.length, rep.icmp_type, rep.icmp_code) == (45, 0, 0)
    assert before - 0.05 <= req.wall_ts <= rep.wall_ts <= after + 0.05
    assert req.head is None                      # captured only when asked (snap)
    d = req.to_json()
    assert (d["len"], d["icmp_type"], d["icmp_code"]) == (45, 8, 0) and "tcp_flags" not in d


def test_icmpv6_echo_type(lab, trace):
    cap = trace(filter=PacketFilter(proto=ICMP6, dst=parse_cidr(lab.addr["server6"])))
    assert lab.ping(lab.client, lab.addr["server6"]) == 1
    p = cap.until(lambda p: p.src == lab.addr["client6"])
    # 40 (IPv6) + 8 + 17
    assert (p.length, p.icmp_type, p.icmp_code) == (65, 128, 0)


def test_tcp_syn_and_the_rst_that_answers_it(lab, trace):
    cap = trace(filter=PacketFilter(proto=TCP, port=9))
    _connect(lab.client, lab.addr["server4"], 9)
    syn = cap.until(lambda p: p.dport == 9 and p.src == lab.addr["client4"])
    rst = cap.until(lambda p: p.sport == 9 and p.src == lab.addr["server4"])
    assert tcp_flags_text(syn.tcp_flags) == "S" and syn.icmp_type is None
    assert syn.length >= 40                      # 20 + 20 + options (MSS, SACK, timestamps, wscale)
    assert tcp_flags_text(rst.tcp_flags) == "R." and rst.length == 40
    assert syn.to_json()["tcp_flags"] == "S"


def test_udp_length(lab, trace):
    cap = trace(filter=PacketFilter(proto=UDP, port=7003))
    lab.udp_send(lab.client, lab.addr["server4"], 7003, b"x" * 100)
    p = cap.until(lambda p: p.dport == 7003)
    assert (p.length, p.tcp_flags, p.icmp_type) == (128, None, None)


def test_snap_captures_the_packets_own_header_bytes(lab, trace):
    cap = trace(filter=PacketFilter(proto=UDP, port=7004), snap=True)
    lab.udp_send(lab.client, lab.addr["server4"], 7004, b"y" * 200)
    big = cap.until(lambda p: p.dport == 7004)
    lab.udp_send(lab.client, lab.addr["server4"], 7004, b"z" * 4)
    small = cap.until(lambda p: p.dport == 7004 and p.length == 32)
    assert len(big.head) == 96 and len(small.head) == 32           # min(length, PT_HEAD_LEN)
    for p, fill in ((big, b"y"), (small, b"z")):
        h = p.head
        assert h[0] == 0x45 and int.from_bytes(h[2:4], "big") == p.length and h[9] == UDP
        assert str(ipaddress.IPv4Address(h[12:16])) == p.src and str(ipaddress.IPv4Address(h[16:20])) == p.dst
        assert int.from_bytes(h[22:24], "big") == 7004 and h[28:] == fill * (len(h) - 28)


def test_json_lines_from_templates_carry_each_packets_own_time(lab, trace):
    """The fast JSON path (templates) fills the wall-clock time per packet."""
    cap = trace(filter=PacketFilter(proto=UDP, port=7005))
    for _ in range(3):
        lab.udp_send(lab.client, lab.addr["server4"], 7005, b"t")
        time.sleep(0.02)
    cap.until(lambda p: sum(q.dport == 7005 for q in cap.packets) >= 3)
    pkts = [p for p in cap.packets if p.dport == 7005]
    lines = [format_json_line(p) for p in pkts]
    assert lines == [packet_json(p).encode() + b"\n" for p in pkts]
    times = [p.to_json()["time_ns"] for p in pkts]
    assert len(set(times)) == 3 and times == sorted(times)
