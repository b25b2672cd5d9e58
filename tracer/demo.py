"""`pkttrace lab demo`: the seed diagrams' scenarios, traced live on the lab.

Brings the lab up, traces its router, and sends one packet of each kind the
classic diagrams draw: forwarded (IPv4 and IPv6), for the router itself, sent
by the router, marked in mangle PREROUTING and routed by that mark (seed
004's policy routing), marked in mangle OUTPUT and rerouted, port-forwarded
by DNAT, and dropped in filter FORWARD.
"""
from __future__ import annotations

import time
from typing import Callable

from .filters import PacketFilter
from .lab import Lab, LabError
from .model import Packet
from .session import TraceOptions, Tracer

UDP = 17


def setup(lab: Lab) -> None:
    """Routing and NAT for the scenarios, on top of the lab's demo rules:
    mark 0x1 selects table 100, which leaves through the second uplink."""
    a = lab.addr
    steps = [
        lambda: lab.ip(lab.router, "rule", "add", "fwmark", "0x1/0x1", "lookup", "100", "pref", "100"),
        lambda: lab.ip(lab.router, "route", "add", a["server4"] + "/32", "via", a["server2_4"], "dev", "rs2",
                       "table", "100"),
        lambda: lab.iptables("-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "5003",
                             "-j", "MARK", "--set-mark", "0x1"),
        lambda: lab.iptables("-t", "nat", "-A", "PREROUTING", "-p", "udp", "-d", a["router_c4"], "--dport", "8080",
                             "-j", "DNAT", "--to-destination", f"{a['server4']}:5002"),
    ]
    for step in steps:
        try:
            step()
        except LabError as e:
            if "exists" not in str(e).lower():   # kept from an earlier `demo --keep`
                raise


def scenarios(lab: Lab) -> list[tuple[str, Callable[[], object]]]:
    """(title, send one packet of it); what a send returns (ping's replies) is not used."""
    a = lab.addr
    return [
        ("forwarded: client pings server (IPv4)", lambda: lab.ping(lab.client, a["server4"])),
        ("forwarded: client pings server (IPv6)", lambda: lab.ping(lab.client, a["server6"])),
        ("for the router itself: client pings the router", lambda: lab.ping(lab.client, a["router_c4"])),
        ("sent by the router: router pings server", lambda: lab.ping(lab.router, a["server4"])),
        ("marked 0x1 in mangle PREROUTING, routed by `ip rule fwmark 0x1 lookup 100` out of rs2: UDP to port 5001",
         lambda: lab.udp_send(lab.client, a["server4"], 5001, b"marked")),
        ("sent by the router, marked in mangle OUTPUT: rerouted to table 100 (UDP to port 5003)",
         lambda: lab.udp_send(lab.router, a["server4"], 5003, b"rerouted")),
        ("port forward: DNAT router:8080 to server:5002 in nat PREROUTING",
         lambda: lab.udp_send(lab.client, a["router_c4"], 8080, b"dnat")),
        ("dropped in filter FORWARD: UDP to port 5009",
         lambda: lab.udp_send(lab.client, a["server4"], 5009, b"dropped")),
    ]


def run(emit: Callable[[str], None], show: Callable[[Packet], None], prefix: str = "ptlab",
        keep: bool = False, record=None) -> int:
    """Run every scenario; returns the number of packets shown.

    record: a text file to save every raw record in (see tracer.recording).
    """
    lab = Lab(prefix)
    lab.up(rules=True)
    shown = 0
    try:
        setup(lab)
        # ICMP and UDP only: the lab's IPv6 neighbour discovery would drown the demo
        with Tracer(TraceOptions(netns=[lab.router], filter=PacketFilter())) as tracer:
            if record is not None:
                from .recording import Recorder
                tracer.on_raw = Recorder(record, tracer.ctx)
            emit(f"tracing {lab.router} ({len(tracer.attached())} probes, ready in "
                 f"{tracer.ready_s * 1000:.0f} ms)\n")
            for title, send in scenarios(lab):
                emit(f"==== {title}\n")
                send()
                deadline = time.monotonic() + 0.6
                while time.monotonic() < deadline:
                    for pkt in tracer.poll(0.1):
                        if pkt.proto in ("icmp", "udp") or (pkt.proto == "icmpv6" and pkt.fate == "forwarded"):
                            show(pkt)
                            shown += 1
            c = tracer.counters()
            emit(f"==== {shown} packets shown; {c.lost} lost, {c.create_failed} not traced, "
                 f"{c.aged_out} aged out\n")
    finally:
        if not keep:
            lab.down()
    return shown
