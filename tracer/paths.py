"""Packet path assembly: a kernel record becomes the packet's ordered path.

The kernel records raw observations (one per probe run).  Here they become
stages a person reads: the observers of one netfilter hook merge into one
stage (mark on entry and after the last table), consecutive route lookups
merge into one `route` stage (every table consulted is kept), and devices,
tables, drop reasons and kernel locations get their names.

Everything the kernel does not tell us (device names, which priority an
observer slot was attached at, drop-reason names, symbols) comes from a
Context, so recorded records can be replayed without root.
"""
from __future__ import annotations

import bisect
import errno
import ipaddress
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .events import NF_STAGES, REC_TRUNCATED, DeliverHow, Fate, PtRecord, StageKind

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 47: "gre", 50: "esp"}
FATE_NAMES = {Fate.FORWARDED: "forwarded", Fate.DELIVERED: "delivered", Fate.SENT: "sent",
              Fate.DROPPED: "dropped", Fate.CONSUMED: "consumed", Fate.NONE: "unknown"}
ROUTE_TABLES = {255: "local", 254: "main", 253: "default"}
DROP_PREFIX = "SKB_DROP_REASON_"


@dataclass
class Context:
    """What user space knows that the records do not carry."""
    ifnames: dict[tuple[int, int], str] = field(default_factory=dict)  # (netns inode, ifindex) -> name
    netns_names: dict[int, str] = field(default_factory=dict)          # inode -> name ("" = host)
    slot_priority: dict[tuple[int, int, int, int], int] = field(default_factory=dict)  # (ino, fam, hook, slot)
    drop_reasons: dict[int, str] = field(default_factory=dict)         # enum value -> name
    symbolize: Callable[[int], str] | None = None
    socket_owner: Callable[[int], tuple[int, str] | None] | None = None  # socket inode -> (pid, comm)
    route_tables: dict[int, str] = field(default_factory=lambda: dict(ROUTE_TABLES))

    def dev(self, netns: int, ifindex: int) -> str | None:
        if not ifindex:
            return None
        return self.ifnames.get((netns, ifindex), f"if{ifindex}")

    def drop_reason(self, value: int) -> str:
        name = self.drop_reasons.get(value)
        if name is None:
            return f"reason {value}"
        return name[len(DROP_PREFIX):] if name.startswith(DROP_PREFIX) else name

    def table(self, tb: int) -> str:
        return self.route_tables.get(tb, str(tb))


@dataclass
class Observation:
    """One netfilter observer's view inside a hook stage."""
    priority: int | None
    mark: int
    tos: int
    t_ns: int


@dataclass
class Lookup:
    table: str
    table_id: int
    dev: str | None
    err: str | None
    mark: int
    t_ns: int


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
    lookups: list[Lookup] = field(default_factory=list)
    ifindex: int = 0                   # device index (for filters on recorded data)
    in_ifindex: int = 0
    how: str | None = None             # deliver: how delivery was seen
    socket_inode: int | None = None    # deliver: the socket it was queued to

    def to_json(self) -> dict:
        d = {"stage": self.stage, "t_ns": self.t_ns, "dev": self.dev, "mark": self.mark}
        if self.observations:
            d["mark_out"] = self.mark_out
            d["tos"], d["tos_out"] = self.tos, self.tos_out
            d["observers"] = [{"priority": o.priority, "mark": o.mark, "tos": o.tos, "t_ns": o.t_ns}
                              for o in self.observations]
        if self.in_dev is not None:
            d["in_dev"] = self.in_dev
        if self.how:
            d["how"] = self.how
        if self.socket_inode:
            d["socket_inode"] = self.socket_inode
        if self.lookups:
            last = self.lookups[-1]
            d["table"], d["err"] = last.table, last.err
            d["lookups"] = [{"table": lk.table, "table_id": lk.table_id, "dev": lk.dev, "err": lk.err,
                             "mark": lk.mark, "t_ns": lk.t_ns} for lk in self.lookups]
        return d


@dataclass
class Packet:
    id: int
    netns: str
    family: str
    proto: str
    src: str
    dst: str
    sport: int | None
    dport: int | None
    fate: str
    in_dev: str | None
    out_dev: str | None
    path: list[Stage]
    drop: dict | None = None
    process: dict | None = None
    truncated: bool = False
    end: str | None = None             # which event ended the record
    proto_num: int = 0

    @property
    def stages(self) -> list[Stage]:
        return self.path

    def stage_names(self) -> list[str]:
        return [s.stage for s in self.path]

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
        return [self.src if which == "src" else self.dst]

    def to_json(self) -> dict:
        d = {"id": self.id, "netns": self.netns, "family": self.family, "proto": self.proto,
             "src": self.src, "dst": self.dst}
        if self.sport is not None:
            d["sport"], d["dport"] = self.sport, self.dport
        d.update(fate=self.fate, in_dev=self.in_dev, out_dev=self.out_dev,
                 path=[s.to_json() for s in self.path])
        if self.drop:
            d["drop"] = self.drop
        if self.process:
            d["process"] = self.process
        if self.truncated:
            d["truncated"] = True
        if self.end:
            d["end"] = self.end
        return d


def _addr(raw, family: int) -> str:
    b = bytes(raw)
    return str(ipaddress.IPv4Address(b[:4]) if family == 4 else ipaddress.IPv6Address(b))


def _err_name(err: int) -> str | None:
    if not err:
        return None
    e = -err if err < 0 else err
    return errno.errorcode.get(e, str(err))


_DELIVER_HOW = {DeliverHow.QUEUED: "queued to socket", DeliverHow.READ: "read by process",
                DeliverHow.CONSUMED: "consumed after input", DeliverHow.STACK: "taken by the local stack"}

_END_BY_FATE = {Fate.FORWARDED: "tx", Fate.SENT: "tx", Fate.DROPPED: "kfree_skb",
                Fate.CONSUMED: "consume_skb", Fate.NONE: "aged out"}


def assemble(rec: PtRecord, ctx: Context, aged: bool = False) -> Packet:
    """Build the Packet for one record (aged: its end was never seen)."""
    fam = rec.family
    ino = rec.netns
    base = rec.first_ts
    path: list[Stage] = []
    n = min(rec.n_stages, len(rec.stages))
    for i in range(n):
        s = rec.stages[i]
        try:
            kind = StageKind(s.kind)
        except ValueError:
            continue  # a newer kernel object with a stage we do not know
        t = max(0, s.ts - base)
        dev = ctx.dev(ino, s.ifindex)
        prev = path[-1] if path else None
        if kind in NF_STAGES:
            hook = kind - StageKind.PREROUTING
            prio = ctx.slot_priority.get((ino, fam, hook, s.slot))
            obs = Observation(prio, s.mark, s.tos, t)
            if prev is not None and prev.stage == kind.label and prev.observations:
                prev.observations.append(obs)
                prev.mark_out, prev.tos_out = s.mark, s.tos
                continue
            st = Stage(kind.label, t, dev, s.mark, mark_out=s.mark, tos=s.tos, tos_out=s.tos,
                       observations=[obs])
            if kind == StageKind.FORWARD:
                st.in_dev = ctx.dev(ino, s.aux)
            path.append(st)
        elif kind in (StageKind.ROUTE, StageKind.REROUTE):
            lk = Lookup(ctx.table(s.aux), s.aux, dev, _err_name(s.aux2), s.mark, t)
            if prev is not None and prev.stage == kind.label:
                prev.lookups.append(lk)
                prev.dev = dev or prev.dev
                continue
            path.append(Stage(kind.label, t, dev, s.mark, lookups=[lk]))
        elif kind == StageKind.DELIVER:
            st = Stage(kind.label, t, dev, s.mark)
            how = s.aux2
            st.how = _DELIVER_HOW.get(how)
            if how == DeliverHow.QUEUED and s.aux:
                st.socket_inode = s.aux
            path.append(st)
        else:
            path.append(Stage(kind.label, t, dev, s.mark))
        path[-1].ifindex = path[-1].ifindex or s.ifindex
        if kind == StageKind.FORWARD:
            path[-1].in_ifindex = s.aux

    fate = Fate(rec.fate) if rec.fate in Fate._value2member_map_ else Fate.NONE
    pkt = Packet(
        id=rec.id,
        netns=ctx.netns_names.get(ino, str(ino)),
        family=f"ipv{fam}",
        proto=PROTO_NAMES.get(rec.proto, str(rec.proto)),
        proto_num=rec.proto,
        src=_addr(rec.saddr, fam),
        dst=_addr(rec.daddr, fam),
        sport=rec.sport if rec.proto in (6, 17) else None,
        dport=rec.dport if rec.proto in (6, 17) else None,
        fate="unknown" if aged else FATE_NAMES[fate],
        in_dev=ctx.dev(ino, rec.in_ifindex),
        out_dev=ctx.dev(ino, rec.out_ifindex),
        path=path,
        truncated=bool(rec.flags & REC_TRUNCATED),
        end="aged out" if aged else _END_BY_FATE.get(fate),
    )
    if fate == Fate.DROPPED and not aged:
        loc = rec.drop_location
        hooks = [s.stage for s in path if s.observations]
        pkt.drop = {
            "reason": ctx.drop_reason(rec.drop_reason),
            "location": ctx.symbolize(loc) if ctx.symbolize else hex(loc),
            "last_hook": hooks[-1] if hooks else None,
        }
    if fate == Fate.DELIVERED and not aged:
        last = path[-1] if path else None
        pkt.end = last.how if last is not None and last.how else "delivered"
        if rec.pid:
            pkt.process = {"pid": rec.pid, "comm": rec.comm.decode(errors="replace")}
        elif last is not None and last.socket_inode and ctx.socket_owner:
            owner = ctx.socket_owner(last.socket_inode)
            if owner:
                pkt.process = {"pid": owner[0], "comm": owner[1], "socket_inode": last.socket_inode}
    return pkt


class SocketOwners:
    """Socket inode -> (pid, comm) of a process holding it, from /proc/*/fd.

    Scanning /proc is slow, so results are cached and a full rescan happens
    at most every `min_interval` seconds, only for inodes not yet known.
    """

    def __init__(self, proc: str = "/proc", min_interval: float = 0.5):
        self.proc, self.min_interval = proc, min_interval
        self._owners: dict[int, tuple[int, str]] = {}
        self._scanned = float("-inf")

    def _scan(self) -> None:
        owners: dict[int, tuple[int, str]] = {}
        for pid in (d for d in os.listdir(self.proc) if d.isdigit()):
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    ino = int(target[8:-1])
                    if ino not in owners:
                        owners[ino] = (int(pid), self._comm(pid))
        self._owners = owners

    def _comm(self, pid: str) -> str:
        try:
            with open(f"{self.proc}/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return "?"

    def __call__(self, inode: int) -> tuple[int, str] | None:
        if inode not in self._owners and time.monotonic() - self._scanned >= self.min_interval:
            self._scanned = time.monotonic()
            self._scan()
        return self._owners.get(inode)


class Kallsyms:
    """Kernel address -> symbol+offset, from /proc/kallsyms (read once, lazily)."""

    def __init__(self, path: str = "/proc/kallsyms"):
        self.path = path
        self._addrs: list[int] | None = None
        self._names: list[str] = []

    def _load(self) -> None:
        pairs = []
        try:
            with open(self.path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        a = int(parts[0], 16)
                        if a:
                            pairs.append((a, parts[2]))
        except OSError:
            pass
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [nm for _, nm in pairs]

    def __call__(self, addr: int) -> str:
        if self._addrs is None:
            self._load()
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or not addr:
            return hex(addr)
        return f"{self._names[i]}+{addr - self._addrs[i]:#x}"
