"""The filter expression against tcpdump's own reading of the same packets.

Real traffic crosses the lab router (TCP connects to open and closed ports,
UDP to a range of ports with small and large datagrams, ICMP echo, ICMP
errors, over IPv4 and IPv6).  tcpdump captures everything on the router's
two devices; then, for each expression, tcpdump itself reads those captures
with the expression, and pkttrace, tracing the router with the same
expression during the same traffic, must have selected the same packets:
per device, the same count of packets per flow (family, protocol,
addresses, ports).

tcpdump reads the capture twice: as captured (Ethernet) and with the
Ethernet header cut off (raw IP, as pkttrace applies expressions).  Both
must agree with pkttrace, except for `len`/`greater`/`less`, which count the
link-layer header on Ethernet: there only the raw-IP reading applies.
"""
from __future__ import annotations

import collections
import contextlib
import ipaddress
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from tracer import netns
from tracer.filters import PacketFilter
from tracer.session import TraceOptions, Tracer

pytestmark = pytest.mark.root

OPEN_PORTS = (22, 443, 5003, 8080)
TCP_PORTS = (22, 80, 443, 5000, 5003, 5010, 5011, 8080)
UDP_PORTS = tuple(range(4998, 5013))
DEVICES = ("rc", "rs")


def _expressions(lab):
    a = lab.addr
    return [
        # (expression, pkttrace's other criteria, what tcpdump reads instead when those are given)
        (f"tcp port 443 and host {a['server4']}", {}, None),
        ("tcp and not port 22", {}, None),
        ("not icmp", {}, None),
        ("udp portrange 5000-5010", {}, None),
        (f"src net {ipaddress.ip_network(a['client4'] + '/24', strict=False)}", {}, None),
        ("greater 300", {}, None),
        ("less 100", {}, None),
        ("ip6 and (tcp or udp dst port 5003)", {}, None),
        ("tcp[tcpflags] & tcp-syn != 0", {}, None),
        ("icmp or icmp6", {}, None),
        (f"ip6 host {a['server6']} and not tcp", {}, None),
        # combined with the existing options: every criterion must match
        ("port 443 or port 5003", {"proto": "udp"}, "udp and (port 443 or port 5003)"),
    ]


# ---- traffic ----------------------------------------------------------------

@contextlib.contextmanager
def _tcp_servers(lab):
    """Listeners on the server for OPEN_PORTS, v4 and v6, and on the
    router's IPv4 address; each connection is read to its end and closed.
    Each listener is closed by its own thread, once out of accept(): closed
    under it, the port would stay taken for the next test."""
    stop = threading.Event()
    socks = []
    for ns, addrs in ((lab.server, ((socket.AF_INET, lab.addr["server4"]), (socket.AF_INET6, lab.addr["server6"]))),
                      (lab.router, ((socket.AF_INET, lab.addr["router_c4"]),))):
        for port, (fam, addr) in ((port, a) for port in OPEN_PORTS for a in addrs):
            with netns.entered(ns):
                s = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            s.listen(16)
            s.settimeout(0.2)

    def serve(s):
        with s:
            while not stop.is_set():
                try:
                    c, _ = s.accept()
                except OSError:     # the timeout included
                    continue
                with c:
                    c.settimeout(2)
                    try:
                        while c.recv(65536):
                            pass
                    except OSError:
                        pass
    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()


def _traffic(lab) -> None:
    a = lab.addr
    # through the router, and to the router itself (delivered to its
    # sockets, its replies sent: first seen at OUTPUT); to the router over
    # IPv4 only: its IPv6 neighbour discovery comes and goes with timing
    for dst in (a["server4"], a["server6"], a["router_c4"]):
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        # more to the router: its TCP frees the packets it took without a
        # tracepoint, and its next packet may get one's skb (a rejected
        # one's was once taken for it, and that packet lost)
        for port in TCP_PORTS + ((443,) * 12 if dst == a["router_c4"] else ()):
            with netns.entered(lab.client):
                s = socket.socket(fam, socket.SOCK_STREAM)
            with s:
                s.settimeout(2)
                try:
                    s.connect((dst, port))
                    s.sendall(b"x" * (600 if port == 443 else 20))
                    s.shutdown(socket.SHUT_WR)
                    s.recv(10)
                except OSError:
                    pass   # a closed port: SYN, then RST
        for port in UDP_PORTS:
            lab.udp_send(lab.client, dst, port, b"u" * (400 if port % 2 else 10))
        lab.ping(lab.client, dst, count=2, timeout=1.0)


# ---- captures ---------------------------------------------------------------

def _tcpdump_start(ns: str, dev: str, path: str) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "-nn", "-U", "-Z", "root",
                          # immediate mode rings snaplen-sized frames: a small snaplen, many frames
                          "-s", "1024", "-B", "8192",
                          "--immediate-mode", "-w", path], stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()     # "listening on rc, link-type EN10MB ...": capturing from now on
    assert "listening on" in line, line
    return p


def _tcpdump_stop(p: subprocess.Popen) -> str:
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    return " ".join(p.communicate(timeout=10)[1].split())   # its counts: captured, dropped


def _read_pcap(path: str, lengths: bool = False) -> tuple[int, list]:
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack_from("<I", data)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), hex(magic)
    linktype = struct.unpack_from("<I", data, 20)[0]
    out, off = [], 24
    while off < len(data):
        _, _, incl, orig = struct.unpack_from("<IIII", data, off)
        frame = data[off + 16:off + 16 + incl]
        out.append((frame, orig) if lengths else frame)
        off += 16 + incl
    return linktype, out


def _to_raw_ip(src: str, dst: str) -> None:
    """An Ethernet capture as LINKTYPE_RAW (101): the IP packets only."""
    linktype, frames = _read_pcap(src, lengths=True)
    assert linktype == 1
    with open(dst, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 101))
        for fr, orig in frames:
            if fr[12:14] in (b"\x08\x00", b"\x86\xdd"):
                ip = fr[14:]
                f.write(struct.pack("<IIII", 0, 0, len(ip), orig - 14) + ip)


def _tcpdump_read(path: str, expr: str, out: str) -> list[bytes]:
    r = subprocess.run(["tcpdump", "-r", path, "-w", out, expr], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    linktype, pkts = _read_pcap(out)
    return [p[14:] for p in pkts if p[12:14] in (b"\x08\x00", b"\x86\xdd")] if linktype == 1 else pkts


def _round(lab, pf: PacketFilter, prefix: str, traffic) -> tuple[dict[str, str], list]:
    """Trace the router with pf while tcpdump captures its devices and
    traffic() runs: the capture files by device, and pkttrace's packets."""
    tracer = Tracer(TraceOptions(netns=[lab.router], filter=pf)).start()
    try:
        caps = {dev: f"{prefix}-{dev}.pcap" for dev in DEVICES}
        dumps = [_tcpdump_start(lab.router, dev, path) for dev, path in caps.items()]
        try:
            traffic()
        finally:
            stats = [_tcpdump_stop(d) for d in dumps]
        # tcpdump must have seen everything, or the comparison means nothing
        assert all(" 0 packets dropped by kernel" in st for st in stats), stats
        time.sleep(0.5)
        return caps, tracer.stop(budget=2.0)
    finally:
        tracer.close()


def _flow_of_ip(ip: bytes):
    if ip[0] >> 4 == 4:
        ihl, proto = (ip[0] & 0xF) * 4, ip[9]
        src, dst, l4 = ipaddress.ip_address(ip[12:16]), ipaddress.ip_address(ip[16:20]), ip[ihl:]
    else:
        proto = ip[6]
        src, dst, l4 = ipaddress.ip_address(ip[8:24]), ipaddress.ip_address(ip[24:40]), ip[40:]
    ports = struct.unpack_from("!HH", l4) if proto in (6, 17) else (None, None)
    return (src.version, proto, str(src), str(dst), *ports)


def _flow_of_packet(p):
    ports = (p.sport, p.dport) if p.proto_num in (6, 17) else (None, None)
    return (ipaddress.ip_address(p.src).version, p.proto_num, p.src, p.dst, *ports)


def _between_client_and_server(lab, flow) -> bool:
    """The test's own traffic: neighbour discovery and router solicitations
    depend on timing, not on the expression."""
    ends = {lab.addr[k] for k in ("client4", "client6", "server4", "server6", "router_c4")}
    return flow[2] in ends and flow[3] in ends


def _on_device(p, dev: str) -> bool:
    return dev in (p.in_dev, p.out_dev) or any(dev in (s.dev, s.in_dev) for s in p.stages)


@pytest.fixture(scope="module")
def plain_lab(make_lab_module):
    return make_lab_module(rules=False)


@pytest.fixture(scope="module")
def make_lab_module():
    from tests.conftest import _lab_fixture
    gen = _lab_fixture()
    make = next(gen)
    try:
        yield make
    finally:
        gen.close()


def test_expressions_select_what_tcpdump_selects(plain_lab, tmp_path):
    lab = plain_lab
    failures, checked = [], 0
    with _tcp_servers(lab):
        lab.ping(lab.client, lab.addr["server4"], count=1)   # neighbours resolved before the runs
        lab.ping(lab.client, lab.addr["server6"], count=1)
        for i, (expr, opts, tcpdump_expr) in enumerate(_expressions(lab)):
            caps, got = _round(lab, PacketFilter.parse(expression=expr, **opts), str(tmp_path / str(i)),
                               lambda: _traffic(lab))
            for dev, path in caps.items():
                raw = path + ".raw"
                _to_raw_ip(path, raw)
                want_raw = collections.Counter(
                    f for f in map(_flow_of_ip, _tcpdump_read(raw, tcpdump_expr or expr, raw + ".sel"))
                    if _between_client_and_server(lab, f))
                mine = collections.Counter(
                    f for f in (_flow_of_packet(p) for p in got if _on_device(p, dev))
                    if _between_client_and_server(lab, f))
                readings = {"raw IP": want_raw}
                if not any(w in expr for w in ("greater", "less", "len")):
                    readings["Ethernet"] = collections.Counter(
                        f for f in map(_flow_of_ip, _tcpdump_read(path, tcpdump_expr or expr, path + ".sel"))
                        if _between_client_and_server(lab, f))
                for how, want in readings.items():
                    checked += 1
                    if want != mine:
                        failures.append(f"{expr!r} {opts} on {dev}, tcpdump reading {how}: "
                                        f"only tcpdump {dict(want - mine)}, only pkttrace {dict(mine - want)}")
                # the expression must select some of the traffic and leave some
                _, everything = _read_pcap(path)
                assert 0 < sum(want_raw.values()) < len(everything), (expr, dev)
    assert not failures, "\n".join(failures)
    assert checked >= 2 * len(_expressions(lab))


def _connect(lab, dst: str, port: int) -> None:
    with netns.entered(lab.client):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(2)
        s.connect((dst, port))
        s.sendall(b"n" * 100)
        s.shutdown(socket.SHUT_WR)
        s.recv(10)


def test_expression_matches_before_or_after_nat(plain_lab, tmp_path):
    """DNAT on the router (router:8443 -> server:443): an expression that
    matches the packet only before the translation (as tcpdump sees it on
    the client's side) or only after it (on the server's side) selects it
    whole; pkttrace's packets are, per flow, those tcpdump selects on
    either device."""
    lab, a = plain_lab, plain_lab.addr

    def seen_from_client(flow):
        # the server's side of a translated flow, named as the client sees it
        version, proto, src, dst, sport, dport = flow
        if (src, sport) == (a["server4"], 443):
            src, sport = a["router_c4"], 8443
        if (dst, dport) == (a["server4"], 443):
            dst, dport = a["router_c4"], 8443
        return version, proto, src, dst, sport, dport

    def traffic():
        for _ in range(3):
            _connect(lab, a["router_c4"], 8443)        # translated
        _connect(lab, a["server4"], 22)                # not
        _connect(lab, a["server4"], 8080)

    failures = []
    with contextlib.ExitStack() as done:
        done.enter_context(_tcp_servers(lab))
        done.callback(lab.iptables, "-t", "nat", "-F", "PREROUTING")
        lab.iptables("-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8443", "-j", "DNAT",
                     "--to-destination", f"{a['server4']}:443")
        for i, expr in enumerate(["tcp dst port 8443", "tcp dst port 443", "tcp src port 8443", "tcp src port 443",
                                  f"host {a['server4']} and tcp port 443"]):
            caps, got = _round(lab, PacketFilter(expression=expr), str(tmp_path / f"nat{i}"), traffic)
            per_dev = [collections.Counter(
                seen_from_client(f) for f in map(_flow_of_ip, _tcpdump_read(path, expr, path + ".sel"))
                if _between_client_and_server(lab, f)) for path in caps.values()]
            want = collections.Counter({f: max(c[f] for c in per_dev) for c in per_dev for f in c})
            mine = collections.Counter(seen_from_client(_flow_of_packet(p)) for p in got
                                       if _between_client_and_server(lab, _flow_of_packet(p)))
            # every translated connection is selected, on one side of the NAT only
            assert sum(1 for f in want if f[4] == 8443 or f[5] == 8443) in (3, 6), (expr, want)
            assert all(min(c[f] for c in per_dev) == 0 for f in want), (expr, per_dev)
            if want != mine:
                failures.append(f"{expr!r}: only tcpdump {dict(want - mine)}, only pkttrace {dict(mine - want)}")
    assert not failures, "\n".join(failures)
