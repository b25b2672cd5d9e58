"""What pkttrace says about a packet: typed objects, the public model.

A Packet is one packet's traversal of one network namespace: its headers,
its fate, and its path, a list of Stages (tc, netfilter hooks with the
tables each crossed, routing decisions with their lookups, delivery, drop).
Every object has `to_json()`, the JSON contract the README documents.

Packets decoded from kernel records are lazy: the per-packet values and
the path are unpacked the first time they are read (tracer.paths does it).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, Protocol, TypeVar


class _Name(enum.StrEnum):
    """A name from a closed set: a str that compares, prints, serializes and
    shows (repr) as its value."""

    def __repr__(self) -> str:
        return repr(self.value)


class StageName(_Name):
    """A stage of a path, as JSON's `stage` names it."""
    RX = "rx"
    TC_INGRESS = "tc_ingress"
    PREROUTING = "prerouting"
    INPUT = "input"
    FORWARD = "forward"
    OUTPUT = "output"
    POSTROUTING = "postrouting"
    ROUTE = "route"
    REROUTE = "reroute"
    TC_EGRESS = "tc_egress"
    QDISC = "qdisc"
    TX = "tx"
    DELIVER = "deliver"
    DROP = "drop"


HOOK_NAMES = (StageName.PREROUTING, StageName.INPUT, StageName.FORWARD, StageName.OUTPUT, StageName.POSTROUTING)
TC_NAMES = (StageName.TC_INGRESS, StageName.TC_EGRESS)


class FateName(_Name):
    """How a packet's traversal ended (JSON `fate`)."""
    FORWARDED = "forwarded"
    DELIVERED = "delivered"
    SENT = "sent"
    DROPPED = "dropped"
    CONSUMED = "consumed"
    REDIRECTED = "redirected"
    REASSEMBLED = "reassembled"
    ENCAPSULATED = "encapsulated"    # became the payload of an outer packet (`encap`)
    DECAPSULATED = "decapsulated"    # an outer packet whose payload went on (`inner`)
    UNKNOWN = "unknown"


class Verdict(_Name):
    """What a table did with the packet (JSON `tables[].verdict`)."""
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"      # sent an ICMP error or a TCP reset back, then dropped it


class Decoder(Protocol):
    """How a Packet decoded from a record unpacks itself (tracer.paths)."""

    def values(self, raw: bytes, shape: "Shape", ctx: Any) -> "Values": ...

    def path(self, raw: bytes, shape: "Shape", values: "Values", ctx: Any) -> "list[Stage]": ...


@dataclass
class Observation:
    """One netfilter observer's view inside a hook stage."""
    priority: int | None
    mark: int
    tos: int
    t_ns: int
    ct: str | None = None


@dataclass
class TableStep:
    """What the packet was like after the table(s) between two observers."""
    table: str
    priority: int | None
    mark: int
    dscp: int
    ct: str | None
    verdict: str                        # accept | drop | reject
    mark_in: int = 0
    dscp_in: int = 0
    nat: dict | None = None             # {"src"|"dst": {"from": "a:p", "to": "b:p"}}
    # --rules: what nftables traced in this table, in order (user chains
    # reached by jump/goto included): {"chain", "handle", "rule", "verdict"}
    rules: list[dict] | None = None

    def to_json(self) -> dict:
        d: dict[str, Any] = {"table": self.table, "priority": self.priority, "mark": self.mark, "dscp": self.dscp,
                             "ct": self.ct, "verdict": self.verdict}
        if self.nat:
            d.update(self.nat)
        if self.rules is not None:
            d["rules"] = self.rules
        return d


@dataclass
class Lookup:
    table: str
    table_id: int
    dev: str | None
    err: str | None
    mark: int
    t_ns: int
    gw: str | None = None
    src_check: bool = False             # a lookup of the source (rp_filter), not the decision
    type: str | None = None             # result: see route_type()


@dataclass
class Route:
    """A routing decision: tables consulted, the rule that chose, the result."""
    tables: list[str]
    rule: str | None
    type: str | None
    dev: str | None
    gw: str | None
    src: str | None
    err: str | None
    mark: int
    src_check: dict | None = None       # the source-validation lookup (rp_filter), when the kernel made one

    def to_json(self) -> dict:
        d: dict[str, object] = {"tables": self.tables, "rule": self.rule, "type": self.type, "dev": self.dev,
                                "gw": self.gw, "src": self.src, "err": self.err, "mark": self.mark}
        if self.src_check:
            d["src_check"] = self.src_check
        return d


def qdisc_handle(handle: int) -> str:
    """A qdisc or class handle as tc writes it: `8004:`, `1:10` (hex)."""
    major, minor = handle >> 16, handle & 0xFFFF
    return f"{major:x}:{minor:x}" if minor else f"{major:x}:"


@dataclass
class Qdisc:
    """A device's root qdisc as a packet met it (JSON `{"kind": "tbf", "handle": "8004:"}`)."""
    kind: str | None                   # tbf, htb, fq_codel, ... (None: gone before it was read)
    handle: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "handle": self.handle}

    def __str__(self) -> str:
        return f"{self.kind or 'qdisc'} {self.handle}"


class QdiscVerdict(_Name):
    """What the qdisc did with the packet (a qdisc stage's `verdict`)."""
    QUEUED = "queued"                  # enqueued, then given to the driver
    REQUEUED = "requeued"              # ... which was busy: dequeued again later
    DROPPED = "dropped"                # enqueued, then dropped inside (AQM, overlimit)


@dataclass
class Stage:
    stage: str
    t_ns: int
    dev: str | None
    mark: int
    mark_out: int | None = None        # hook stages: mark after the last table
    tos: int | None = None
    tos_out: int | None = None
    in_dev: str | None = None          # forward: both devices
    observations: list[Observation] = field(default_factory=list)
    tables: list[TableStep] = field(default_factory=list)
    lookups: list[Lookup] = field(default_factory=list)
    route: Route | None = None
    ct: str | None = None              # hook stages: conntrack state after the last table
    ifindex: int = 0                   # device index (for filters on recorded data)
    in_ifindex: int = 0
    how: str | None = None             # deliver: how delivery was seen
    socket_inode: int | None = None    # deliver: the socket it was queued to
    verdict: str | None = None         # tc stages: ok | shot | redirect | mirror
    target: str | None = None          # tc redirect/mirror: the device it (or a copy) went to
    attribution: str | None = None     # hook stages: "changing" while the ruleset changed (no tables named)
    qdisc: Qdisc | None = None         # qdisc stage: the device's root qdisc
    qlen: int | None = None            # ... packets in it after this one was enqueued
    queued_ns: int | None = None       # ... enqueue to dequeue (to the drop, if dropped in it)

    @property
    def is_hook(self) -> bool:
        """A netfilter hook stage (even one no observer saw: a drop in its first table)."""
        return self.mark_out is not None

    def to_json(self) -> dict:
        d = {"stage": self.stage, "t_ns": self.t_ns, "dev": self.dev, "mark": self.mark}
        if self.is_hook:
            d["mark_out"] = self.mark_out
            d["tos"], d["tos_out"] = self.tos, self.tos_out
            d["ct"] = self.ct
            d["observers"] = [{"priority": o.priority, "mark": o.mark, "tos": o.tos, "ct": o.ct, "t_ns": o.t_ns}
                              for o in self.observations]
            d["tables"] = [t.to_json() for t in self.tables]
            if self.attribution:
                d["attribution"] = self.attribution
        if self.qdisc is not None:
            d["qdisc"] = self.qdisc.to_json()
            d["qlen"], d["queued_ns"] = self.qlen, self.queued_ns
        # present only where they say something (a tc target only with its verdict)
        d.update((k, getattr(self, k)) for k in ("in_dev", "verdict", "target", "how", "socket_inode")
                 if getattr(self, k))
        if self.lookups:
            main = [lk for lk in self.lookups if not lk.src_check] or self.lookups
            d["table"], d["err"] = main[-1].table, main[-1].err
            d["lookups"] = [{"table": lk.table, "table_id": lk.table_id, "dev": lk.dev, "err": lk.err,
                             "mark": lk.mark, "gw": lk.gw, "src_check": lk.src_check, "t_ns": lk.t_ns}
                            for lk in self.lookups]
            if self.route is not None:
                d["route"] = self.route.to_json()
        return d


@dataclass
class Drop:
    """Where and why the kernel dropped the packet (JSON `drop`).  Reads
    also as the JSON object does (`drop["table"]`, `drop.get("dev")`)."""
    reason: str
    location: str
    last_hook: str | None = None
    stage: str | None = None            # where: a hook, route, qdisc, tc_ingress, ...
    table: str | None = None            # the netfilter table that dropped it
    dev: str | None = None
    before_priority: int | None = None  # a hook function before pkttrace's first observer there
    attribution: str | None = None      # "changing": the ruleset changed under the observers
    qdisc: Qdisc | None = None          # stage qdisc: the qdisc that dropped it

    def to_json(self) -> dict:
        d: dict[str, object] = {"reason": self.reason, "location": self.location, "last_hook": self.last_hook,
                                "stage": self.stage, "table": self.table, "dev": self.dev}
        if self.qdisc is not None:
            d["qdisc"] = self.qdisc.to_json()
        if self.before_priority is not None:
            d["before_priority"] = self.before_priority
        if self.attribution:
            d["attribution"] = self.attribution
        return d

    def __getitem__(self, key: str) -> object:
        d = self.to_json()
        return d[key]

    def get(self, key: str, default: object = None) -> object:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, dict):
            return self.to_json() == other
        return isinstance(other, Drop) and dataclasses.astuple(self) == dataclasses.astuple(other)

    __hash__ = None  # type: ignore[assignment]    # mutable, compared by value


@dataclass
class Shape:
    """What packets with the same path shape share: resolved once per shape."""
    netns: str
    family: str
    proto: str
    proto_num: int
    fate: str
    in_dev: str | None
    out_dev: str | None
    end: str | None
    path_sig: int = 0
    template: Any = None                # the assembler's per-shape plan (paths._Template)
    drop_reason: str | None = None      # dropped: reason name
    af: int = socket.AF_INET
    alen: int = 4
    ports: bool = False
    local_out: bool = False             # locally generated: its first hook is output
    ino: int | None = None              # netns inode (rules are kept per netns)
    hooks: bool | None = None           # a netfilter hook stage in the path (None: not looked at yet)
    unnamed: bool | None = None         # in_dev or out_dev by number only, "if7" (None: not looked at yet)


@dataclass
class Values:
    """What is particular to one packet."""
    id: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    drop: Drop | None = None
    process: dict | None = None
    truncated: bool = False
    late_match: bool = False           # matched only after NAT: earlier stages not kept
    cause: int | None = None           # the packet whose processing made the kernel generate this one
    prev: int | None = None            # this packet's record in the netns it came from
    next: int | None = None            # ... in the netns it went on to
    prev_netns: str | None = None
    next_netns: str | None = None
    reassembled: int | None = None     # a fragment: the packet it became
    encap: int | None = None           # encapsulated: the outer packet it travelled in
    decap: int | None = None           # decapsulated: the outer packet that carried it
    inner: int | None = None           # an outer packet: the packet it carried
    tunnel: dict | None = None         # with any of those: {"dev", "kind"} of the tunnel
    ext_hdrs: list | None = None       # IPv6 extension headers walked ("hop-by-hop", ...)
    # the header line's facts at first sight (None: unknown, e.g. a recording of format 1)
    length: int | None = None          # IP total length
    tcp_flags: int | None = None       # TCP's flag byte (TCP_FLAGS)
    icmp_type: int | None = None
    icmp_code: int | None = None
    wall_ns: int | None = None         # Unix time of the first stage, ns
    head: bytes | None = None          # its first bytes from the IP header (captured for -w only)


T = TypeVar("T")


class _Field(Generic[T]):
    """A field of a Packet: held by its path shape (`shared`: every packet of
    the shape has it; setting it copies the shape), or by its own Values
    (unpacked from the record the first time one is read)."""

    def __init__(self, shared: bool = False):
        self.shared = shared

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: "Packet", objtype: type | None = None) -> T:
        if obj is None:             # on the class (introspection, docs): the field itself
            return self
        return getattr(obj._shape if self.shared else obj._v(), self.name)

    def __set__(self, obj: "Packet", value: T) -> None:
        if self.shared:
            obj._set_shape(self.name, value)
        else:
            setattr(obj._v(), self.name, value)


class Packet:
    """One packet's traversal.

    A packet from the kernel holds its raw record and the Shape it shares
    with every packet that took the same path: the collector's work per
    record is a cache lookup.  Per-packet values are unpacked, and the path
    built, the first time someone reads them.
    """

    __slots__ = ("_shape", "_raw", "_vals", "_path", "_ctx", "_decoder")
    # read through to the Shape (shared by the packets of one path shape)...
    netns = _Field[str](shared=True)
    family = _Field[str](shared=True)
    proto = _Field[str](shared=True)
    proto_num = _Field[int](shared=True)
    fate = _Field[str](shared=True)
    in_dev = _Field[Optional[str]](shared=True)
    out_dev = _Field[Optional[str]](shared=True)
    end = _Field[Optional[str]](shared=True)
    path_sig = _Field[int](shared=True)
    # ... or to this packet's own Values
    id = _Field[int]()
    src = _Field[str]()
    dst = _Field[str]()
    sport = _Field[Optional[int]]()
    dport = _Field[Optional[int]]()
    drop = _Field[Optional[Drop]]()
    process = _Field[Optional[dict]]()
    truncated = _Field[bool]()
    late_match = _Field[bool]()
    cause = _Field[Optional[int]]()
    prev = _Field[Optional[int]]()
    next = _Field[Optional[int]]()
    prev_netns = _Field[Optional[str]]()
    next_netns = _Field[Optional[str]]()
    reassembled = _Field[Optional[int]]()
    encap = _Field[Optional[int]]()
    decap = _Field[Optional[int]]()
    inner = _Field[Optional[int]]()
    tunnel = _Field[Optional[dict]]()
    ext_hdrs = _Field[Optional[list]]()
    length = _Field[Optional[int]]()
    tcp_flags = _Field[Optional[int]]()
    icmp_type = _Field[Optional[int]]()
    icmp_code = _Field[Optional[int]]()
    wall_ns = _Field[Optional[int]]()

    def reader(self) -> "Packet":
        """This packet, or a copy decoded apart from it: reading a copy leaves
        this one undecoded, so its output keeps the per-path templates
        (tracer.templates) -- --rules reads every packet, changes few."""
        if self._raw is None or self._vals is not None or self._path is not None:
            return self
        return Packet._from_raw(self._raw, self._shape, self._ctx, self._decoder)

    def has_hook_stage(self) -> bool:
        """A netfilter hook stage in the path (known once per path shape)."""
        if self._raw is None:
            return any(s.is_hook for s in self.path)
        if self._shape.hooks is None:
            self._shape.hooks = any(s.is_hook for s in self.reader().path)
        return self._shape.hooks

    def unnamed_device(self) -> bool:
        """It came in or left by a device known by its number only ("if7":
        named after the start; known once per path shape)."""
        sh = self._shape
        if sh.unnamed is None:
            sh.unnamed = any(d is not None and d.startswith("if") for d in (sh.in_dev, sh.out_dev))
        return sh.unnamed

    @property
    def netns_inode(self) -> int | None:
        """The traced netns's inode (None for a packet not decoded from a record)."""
        return self._shape.ino

    @property
    def wall_ts(self) -> float | None:
        """Unix time of the first stage, in seconds."""
        ns = self.wall_ns
        return ns / 1e9 if ns is not None else None
    head = _Field[Optional[bytes]]()

    def __init__(self, id, netns, family, proto, src, dst, sport, dport, fate, in_dev, out_dev,
                 path=None, drop=None, process=None, truncated=False, end=None, proto_num=0, path_sig=0):
        self._shape = Shape(netns, family, proto, proto_num, fate, in_dev, out_dev, end, path_sig)
        if isinstance(drop, dict):
            drop = Drop(**drop)
        self._vals = Values(id, src, dst, sport, dport, drop, process, truncated)
        self._path, self._raw, self._ctx, self._decoder = path if path is not None else [], None, None, None

    @classmethod
    def _from_raw(cls, raw: bytes, shape: Shape, ctx: Any, decoder: "Decoder") -> "Packet":
        p = cls.__new__(cls)
        p._shape, p._raw, p._ctx, p._vals, p._path, p._decoder = shape, raw, ctx, None, None, decoder
        return p

    def _v(self) -> Values:
        if self._vals is None:
            self._vals = self._decoder.values(self._raw, self._shape, self._ctx)
        return self._vals

    def _set_shape(self, name: str, value) -> None:
        # shapes are shared between packets: copy on write (what is known
        # of the devices' names is looked at again)
        self._shape = dataclasses.replace(self._shape, **{name: value, "unnamed": None})

    @property
    def path(self) -> list[Stage]:
        if self._path is None:
            self._path = self._decoder.path(self._raw, self._shape, self._v(), self._ctx)
        return self._path

    @property
    def stages(self) -> list[Stage]:
        return self.path

    def stage_names(self) -> list[str]:
        return [s.stage for s in self.path]

    def stage(self, name: str, nth: int = 0) -> Stage | None:
        """The nth stage called `name`, or None."""
        found = [s for s in self.path if s.stage == name]
        return found[nth] if nth < len(found) else None

    def crossed(self, *stages: str) -> bool:
        """The path contains these stages in this order (others may sit between)."""
        it = iter(self.stage_names())
        return all(any(s == w for s in it) for w in stages)

    def marks(self) -> set[int]:
        """Every mark the packet was seen with."""
        out = set()
        for s in self.path:
            out.add(s.mark)
            if s.mark_out is not None:
                out.add(s.mark_out)
            out.update(o.mark for o in s.observations)
        return out

    def addresses(self, which: str) -> list[str]:
        """Every address the packet had on that side (NAT included), in order."""
        out = [self.src if which == "src" else self.dst]
        for s in self.path:
            for t in s.tables:
                if t.nat and which in t.nat:
                    out.append(_endpoint_addr(t.nat[which]["to"]))
        return out

    def ports(self) -> list[int]:
        """Every port the packet had (NAT included), in order."""
        out = [p for p in (self.sport, self.dport) if p is not None]
        for s in self.path:
            for t in s.tables:
                for side in ("src", "dst"):
                    if t.nat and side in t.nat:
                        ep = t.nat[side]["to"]
                        if ep.startswith("[") or ep.count(":") == 1:
                            out.append(int(ep.rsplit(":", 1)[1]))
        return out

    def to_json(self) -> dict:
        v, sh = self._v(), self._shape
        d = {"id": v.id, "netns": sh.netns, "family": sh.family, "proto": sh.proto, "src": v.src, "dst": v.dst}
        if v.sport is not None:
            d["sport"], d["dport"] = v.sport, v.dport
        d.update(fate=sh.fate, in_dev=sh.in_dev, out_dev=sh.out_dev, path=[s.to_json() for s in self.path])
        if v.drop:
            d["drop"] = v.drop.to_json()
        if v.process:
            d["process"] = v.process
        if v.truncated:
            d["truncated"] = True
        if v.late_match:
            d["late_match"] = True
        for k in ("cause", "prev", "next", "reassembled", "encap", "decap", "inner"):
            if getattr(v, k) is not None:
                d[k] = getattr(v, k)
        if v.tunnel is not None:
            d["tunnel"] = v.tunnel
        if v.ext_hdrs:
            d["ext_hdrs"] = v.ext_hdrs
        if v.prev is not None:
            d["prev_netns"] = v.prev_netns
        if v.next is not None:
            d["next_netns"] = v.next_netns
        if sh.end:
            d["end"] = sh.end
        if v.wall_ns is not None:
            d["time_ns"] = v.wall_ns
        if v.length is not None:
            d["len"] = v.length
        if v.tcp_flags is not None:
            d["tcp_flags"] = tcp_flags_text(v.tcp_flags)
        if v.icmp_type is not None:
            d["icmp_type"], d["icmp_code"] = v.icmp_type, v.icmp_code
        if sh.template is not None and sh.template.changing:
            d["attribution"] = "changing"
        return d


# TCP's flag bits as tcpdump names them, in its order ("." is ACK)
TCP_FLAGS = (("F", 0x01), ("S", 0x02), ("R", 0x04), ("P", 0x08), ("U", 0x20), ("E", 0x40), ("W", 0x80),
             (".", 0x10))


def tcp_flags_text(bits: int) -> str:
    """tcpdump's notation: 0x12 -> "S.", 0x18 -> "P.", 0 -> "none"."""
    return "".join(c for c, b in TCP_FLAGS if bits & b) or "none"


def _endpoint_addr(ep: str) -> str:
    """The address of `10.0.0.1:80`, `[fd00::1]:80`, `10.0.0.1` or `fd00::1` (see _endpoint)."""
    if ep.startswith("["):
        return ep[1:ep.index("]")]
    return ep.rsplit(":", 1)[0] if ep.count(":") == 1 else ep


def packet_json(pkt: Packet) -> str:
    """One packet as a JSON line."""
    return json.dumps(pkt.to_json(), separators=(",", ":"))
