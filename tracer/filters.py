"""Packet filters: parse what the user typed, and fill the BPF config.

Filters run in the kernel.  A packet is shown when every given criterion
matched at some stage of its path, so `--mark 0x1` also shows the stages
before the mangle rule that set the mark, and `--src` still matches a packet
after SNAT rewrote its source.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from . import events, pcapfilter
from .inputs import InputError, check_cidr_text, check_ifname, parse_uint

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_SIGNED = re.compile(r"-?(?:[0-9]+|0[xX][0-9a-fA-F]+)")   # a number, but maybe out of range


class FilterError(ValueError):
    """A filter value that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Mark:
    value: int
    mask: int = 0xFFFFFFFF

    def __str__(self) -> str:
        return f"{self.value:#x}" if self.mask == 0xFFFFFFFF else f"{self.value:#x}/{self.mask:#x}"


def _u32(text: str, what: str) -> int:
    # decimal or 0x-hex in ASCII digits: int(text, 0) would also take
    # " 1", "1_0" and "+1", and int() every script's digits
    try:
        return parse_uint(text, what, 0, 0xFFFFFFFF, hex_ok=True)
    except InputError as e:
        if _SIGNED.fullmatch(text):
            raise FilterError(f"invalid {what} {text!r}: must fit in 32 bits") from None
        raise FilterError(str(e)) from None


def parse_mark(text: str) -> Mark:
    """VALUE[/MASK], like iptables' --mark."""
    value, sep, mask = text.partition("/")
    v = _u32(value, "mark")
    m = _u32(mask, "mark mask") if sep else 0xFFFFFFFF
    if v & ~m:
        raise FilterError(f"invalid mark {text!r}: value has bits outside the mask")
    return Mark(v, m)


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        # ipaddress itself takes ASCII digits only, no spaces
        return ipaddress.ip_network(check_cidr_text(text), strict=False)
    except InputError as e:
        raise FilterError(str(e)) from None
    except ValueError:
        raise FilterError(f"invalid address or CIDR {text!r}: expected e.g. 10.0.0.0/8 or 2001:db8::1") from None


def parse_proto(text: str) -> int:
    t = text.lower()
    if t in PROTOS:
        return PROTOS[t]
    try:
        return parse_uint(text, "protocol", 0, 255, hex_ok=True)
    except InputError:
        raise FilterError(f"invalid protocol {text!r}: expected tcp, udp, icmp, icmpv6 or a number 0-255 "
                          "(ASCII digits)") from None


def parse_port(text: str | int) -> int:
    """1-65535 in ASCII decimal (0 is no port: the filter would never match)."""
    try:
        return parse_uint(text, "port", 1, 65535)
    except InputError as e:
        raise FilterError(str(e)) from None


@dataclass(frozen=True)
class PacketFilter:
    mark: Mark | None = None
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    proto: int | None = None
    port: int | None = None
    # --iface: a device name in the traced netns, matched by the ifindex it
    # has when the packet passes (the session follows renames, re-creation)
    iface: str | None = None
    # a tcpdump filter expression (pcap-filter(7)), compiled by libpcap for
    # the IP packet (tracer/pcapfilter.py): it matches when it matches the
    # packet at first sight or after a NAT table rewrote it
    expression: str | None = None
    program: pcapfilter.PcapProgram | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.expression is not None and not self.expression.strip():
            object.__setattr__(self, "expression", None)   # as tcpdump '': no filter
        if self.expression is not None:
            # compiled now: a bad expression is refused before anything loads
            try:
                prog = pcapfilter.compile(self.expression)
            except pcapfilter.PcapError as e:
                raise FilterError(str(e)) from None
            if len(prog.insns) > events.PT_PCAP_MAX:
                raise FilterError(f"filter expression {self.expression!r} compiles to {len(prog.insns)} "
                                  f"instructions: at most {events.PT_PCAP_MAX} run in the kernel")
            object.__setattr__(self, "program", prog)

    @classmethod
    def parse(cls, mark: str | None = None, src: str | None = None, dst: str | None = None,
              proto: str | None = None, port: str | int | None = None, iface: str | None = None,
              expression: str | None = None) -> "PacketFilter":
        """A filter from the command line's texts (`--mark 0x1/0xff`, `--src
        10.0.0.0/8`, `--proto udp`, `--port 53`, `--iface eth0`, `tcp port
        443`): FilterError, one line, for a value the command line would refuse."""
        if iface is not None:
            try:
                check_ifname(iface)
            except InputError as e:
                raise FilterError(str(e)) from None
        return cls(mark=parse_mark(mark) if mark is not None else None,
                   src=parse_cidr(src) if src is not None else None,
                   dst=parse_cidr(dst) if dst is not None else None,
                   proto=parse_proto(proto) if proto is not None else None,
                   port=parse_port(port) if port is not None else None,
                   iface=iface, expression=expression)

    @property
    def flags(self) -> int:
        f = 0
        f |= events.F_MARK if self.mark is not None else 0
        f |= events.F_SRC if self.src is not None else 0
        f |= events.F_DST if self.dst is not None else 0
        f |= events.F_PROTO if self.proto is not None else 0
        f |= events.F_PORT if self.port is not None else 0
        f |= events.F_IFACE if self.iface is not None else 0
        f |= events.F_PCAP if self.program is not None else 0
        return f

    def fill(self, cfg: events.PtConfig) -> None:
        """Write the criteria into the BPF config struct."""
        cfg.filter = self.flags
        if self.mark is not None:
            cfg.mark_value, cfg.mark_mask = self.mark.value, self.mark.mask
        for net, fam, addr, mask in ((self.src, "src_family", "src_addr", "src_mask"),
                                     (self.dst, "dst_family", "dst_addr", "dst_mask")):
            if net is None:
                continue
            setattr(cfg, fam, net.version)
            # pre-masked, zero-padded to 16 bytes like the record's addresses
            a = net.network_address.packed.ljust(16, b"\0")
            m = net.netmask.packed.ljust(16, b"\0")
            getattr(cfg, addr)[:] = list(a)
            getattr(cfg, mask)[:] = list(m)
        if self.proto is not None:
            cfg.proto = self.proto
        if self.port is not None:
            cfg.port = self.port
        if self.program is not None:
            cfg.pcap_len = len(self.program.insns)
            for i, (code, jt, jf, k) in enumerate(self.program.insns):
                cfg.pcap[i].code, cfg.pcap[i].jt, cfg.pcap[i].jf, cfg.pcap[i].k = code, jt, jf, k

    def matches(self, pkt) -> bool:
        """The kernel's rule, in Python, for recorded data (unit tests, replays).
        A recording keeps no packet bytes: an expression cannot be applied
        to it (FilterError)."""
        if self.program is not None:
            raise FilterError("a filter expression needs the packet's bytes: a recording has its path only")
        def any_addr(net, attr):
            return any(ipaddress.ip_address(a).version == net.version and ipaddress.ip_address(a) in net
                       for a in pkt.addresses(attr))
        if self.mark is not None and not any(
                (m & self.mark.mask) == self.mark.value for m in pkt.marks()):
            return False
        if self.src is not None and not any_addr(self.src, "src"):
            return False
        if self.dst is not None and not any_addr(self.dst, "dst"):
            return False
        if self.proto is not None and pkt.proto_num != self.proto:
            return False
        if self.port is not None and self.port not in pkt.ports():
            return False
        if self.iface is not None and not any(self.iface in (s.dev, s.in_dev) for s in pkt.stages):
            return False
        return True
