"""Synthetic IP packets for the filter-expression tests: IPv4 (with and
without options, fragments) and IPv6 carrying TCP, UDP, ICMP/ICMPv6 or
other protocols, from small pools of addresses and ports so that host, net,
port and range expressions both match and miss; some truncated or bigger
than the bytes the kernel's interpreter sees (tracer.events.PT_PCAP_CAP)."""
from __future__ import annotations

import ipaddress
import random
import struct

V4 = ["192.0.2.1", "192.0.2.77", "10.1.1.1", "10.200.3.4", "172.16.0.9", "198.51.100.2"]
V6 = ["2001:db8::1", "2001:db8::2", "2001:db8:1::5", "fd00::1", "fe80::1"]
PORTS = [22, 53, 80, 443, 1000, 1500, 2000, 4999, 5000, 5005, 5010, 5011, 8080, 33000, 65535]


def _l4(rng: random.Random, proto: int) -> bytes:
    if proto == 6:
        off = rng.choice([5, 5, 5, 8])                 # data offset: options sometimes
        flags = rng.choice([0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, rng.randrange(256)])
        hdr = struct.pack("!HHIIBBHHH", rng.choice(PORTS), rng.choice(PORTS), rng.getrandbits(32),
                          rng.getrandbits(32), off << 4, flags, 65535, 0, 0)
        hdr += bytes(rng.getrandbits(8) for _ in range(off * 4 - 20))
        payload = rng.choice([b"", b"GET / HTTP/1.1\r\n", bytes(rng.getrandbits(8) for _ in range(rng.randrange(400)))])
        return hdr + payload
    if proto == 17:
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(300)))
        return struct.pack("!HHHH", rng.choice(PORTS), rng.choice(PORTS), 8 + len(payload), 0) + payload
    if proto in (1, 58):
        typ = rng.choice([0, 8, 3, 11, 128, 129, 135, 136, rng.randrange(256)])
        return struct.pack("!BBHHH", typ, rng.randrange(4), 0, rng.getrandbits(16), rng.getrandbits(16)) + \
            bytes(rng.getrandbits(8) for _ in range(rng.randrange(64)))
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(64)))


def packet(rng: random.Random) -> bytes:
    """One IP packet (no link-layer header)."""
    v6 = rng.random() < 0.4
    proto = rng.choice([6, 6, 17, 17, 58 if v6 else 1, 47, 132])
    l4 = _l4(rng, proto)
    if v6:
        src, dst = (ipaddress.ip_address(rng.choice(V6)).packed for _ in range(2))
        nxt, ext = proto, b""
        if rng.random() < 0.1:   # a fragment header first
            ext = struct.pack("!BBHI", proto, 0, rng.choice([0, 1, 8 << 3]), rng.getrandbits(32))
            nxt = 44
        body = ext + l4
        pkt = struct.pack("!IHBB", 0x60000000 | rng.getrandbits(20), len(body), nxt, 64) + src + dst + body
    else:
        src, dst = (ipaddress.ip_address(rng.choice(V4)).packed for _ in range(2))
        ihl = rng.choice([5, 5, 5, 6, 15])
        opts = bytes([1] * ((ihl - 5) * 4))
        frag = rng.choice([0, 0, 0, 0x4000, 0x2000, 0x0010, 0x2010])
        total = ihl * 4 + len(l4)
        pkt = struct.pack("!BBHHHBBH", 0x40 | ihl, rng.randrange(256), total, rng.getrandbits(16), frag,
                          rng.randrange(1, 256), proto, 0) + src + dst + opts + l4
    r = rng.random()
    if r < 0.05:
        pkt = pkt[:rng.randrange(1, len(pkt))]       # truncated: loads past the end reject
    elif r < 0.07:
        pkt = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80)))   # not even IP
    return pkt


def packets(n: int, seed: int = 14) -> list[bytes]:
    rng = random.Random(seed)
    return [packet(rng) for _ in range(n)]
