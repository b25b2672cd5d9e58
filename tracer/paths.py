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
import ctypes
import dataclasses
import errno
import json
import operator
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from .events import (NF_STAGES, PT_SHAPE_LEN, PT_SHAPE_OFF, REC_LATE, REC_TRUNCATED, DeliverHow, Fate, PtRecord,
                     PtStage, StageKind)

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
    # resolved Shapes by the record's PT_SHAPE bytes (netns, devices, signature, fate, ...)
    shapes: dict = field(default_factory=dict)
    max_shapes: int = 4096

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
    template: "_Template | None" = None
    drop_reason: str | None = None      # dropped: reason name
    af: int = socket.AF_INET
    alen: int = 4
    ports: bool = False
    json_tpl: "_JsonTemplate | None" = None   # compiled on first JSON output


@dataclass
class Values:
    """What is particular to one packet."""
    id: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    drop: dict | None = None
    process: dict | None = None
    truncated: bool = False
    late_match: bool = False           # matched only after NAT: earlier stages not kept


class Packet:
    """One packet's traversal.

    A packet from the kernel holds its raw record and the Shape it shares
    with every packet that took the same path: the collector's work per
    record is a cache lookup.  Per-packet values are unpacked, and the path
    built, the first time someone reads them.
    """

    __slots__ = ("_shape", "_raw", "_vals", "_path", "_ctx")

    def __init__(self, id, netns, family, proto, src, dst, sport, dport, fate, in_dev, out_dev,
                 path=None, drop=None, process=None, truncated=False, end=None, proto_num=0, path_sig=0):
        self._shape = Shape(netns, family, proto, proto_num, fate, in_dev, out_dev, end, path_sig)
        self._vals = Values(id, src, dst, sport, dport, drop, process, truncated)
        self._path, self._raw, self._ctx = path if path is not None else [], None, None

    @classmethod
    def _from_raw(cls, raw: bytes, shape: Shape, ctx: "Context") -> "Packet":
        p = cls.__new__(cls)
        p._shape, p._raw, p._ctx, p._vals, p._path = shape, raw, ctx, None, None
        return p

    def _v(self) -> Values:
        if self._vals is None:
            self._vals = _values(self._raw, self._shape, self._ctx)
        return self._vals

    def _set_shape(self, name: str, value) -> None:
        # shapes are shared between packets: copy on write
        self._shape = dataclasses.replace(self._shape, **{name: value})

    def _set_value(self, name: str, value) -> None:
        setattr(self._v(), name, value)


    @property
    def path(self) -> list[Stage]:
        if self._path is None:
            sh = self._shape
            n = self._raw[_N_OFF]
            first_ts = _U64.unpack_from(self._raw, 8)[0]
            self._path = _materialize(sh.template, self._raw[_HDR_SIZE:_HDR_SIZE + n * _STAGE_SIZE], first_ts)
        return self._path

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
        v, sh = self._v(), self._shape
        d = {"id": v.id, "netns": sh.netns, "family": sh.family, "proto": sh.proto, "src": v.src, "dst": v.dst}
        if v.sport is not None:
            d["sport"], d["dport"] = v.sport, v.dport
        d.update(fate=sh.fate, in_dev=sh.in_dev, out_dev=sh.out_dev, path=[s.to_json() for s in self.path])
        if v.drop:
            d["drop"] = v.drop
        if v.process:
            d["process"] = v.process
        if v.truncated:
            d["truncated"] = True
        if v.late_match:
            d["late_match"] = True
        if sh.end:
            d["end"] = sh.end
        return d


def _shape_field(name: str) -> property:
    return property(lambda self: getattr(self._shape, name), lambda self, v: self._set_shape(name, v))


def _value_field(name: str) -> property:
    return property(lambda self: getattr(self._v(), name), lambda self, v: self._set_value(name, v))


for _f in ("netns", "family", "proto", "proto_num", "fate", "in_dev", "out_dev", "end", "path_sig"):
    setattr(Packet, _f, _shape_field(_f))
for _f in ("id", "src", "dst", "sport", "dport", "drop", "process", "truncated", "late_match"):
    setattr(Packet, _f, _value_field(_f))


def _err_name(err: int) -> str | None:
    if not err:
        return None
    e = -err if err < 0 else err
    return errno.errorcode.get(e, str(err))


_DELIVER_HOW = {DeliverHow.QUEUED: "queued to socket", DeliverHow.READ: "read by process",
                DeliverHow.CONSUMED: "consumed after input", DeliverHow.STACK: "taken by the local stack"}

_END_BY_FATE = {Fate.FORWARDED: "tx", Fate.SENT: "tx", Fate.DROPPED: "kfree_skb",
                Fate.CONSUMED: "consume_skb", Fate.NONE: "aged out"}


# The record header and a stage, as struct formats built from the ctypes
# mirror (itself checked against the object's BTF).
_CT_FMT = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_int32: "i",
           ctypes.c_uint64: "Q"}


def _fmt(struct_type, stop: str | None = None) -> struct.Struct:
    out = "="
    for name, typ in struct_type._fields_:
        if name == stop:
            break
        out += f"{ctypes.sizeof(typ)}s" if issubclass(typ, ctypes.Array) else _CT_FMT[typ]
    return struct.Struct(out)


_HDR = _fmt(PtRecord, stop="stages")
_STAGE = _fmt(PtStage)
_HDR_SIZE = PtRecord.stages.offset
_STAGE_SIZE = ctypes.sizeof(PtStage)
assert _HDR.size == _HDR_SIZE and _STAGE.size == _STAGE_SIZE
_INET = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}


@dataclass
class _Plan:
    """How one output stage is built from raw stages: everything but the
    per-packet values (times, marks, TOS, socket inode)."""
    label: str
    dev: str | None
    first: int                          # index of its first raw stage
    raws: list[int]                     # indices of all its raw stages
    priorities: list[int | None] | None = None   # hook stages
    in_dev: str | None = None
    lookups: list[tuple] | None = None  # route: (table, table_id, dev, err) per raw stage
    how: str | None = None


@dataclass
class _Template:
    plans: list[_Plan]
    last_hook: str | None
    deliver_raw: int | None             # raw index of a deliver-by-socket stage


def _template(stages: list[tuple], ino: int, fam: int, ctx: Context) -> _Template:
    plans: list[_Plan] = []
    deliver_raw = None
    for i, (_ts, ifindex, _mark, aux, aux2, kind, slot, _tos, _f, _p) in enumerate(stages):
        try:
            kind = StageKind(kind)
        except ValueError:
            continue  # a newer kernel object with a stage we do not know
        dev = ctx.dev(ino, ifindex)
        prev = plans[-1] if plans else None
        if kind in NF_STAGES:
            prio = ctx.slot_priority.get((ino, fam, kind - StageKind.PREROUTING, slot))
            if prev is not None and prev.label == kind.label and prev.priorities is not None:
                prev.raws.append(i)
                prev.priorities.append(prio)
                continue
            plans.append(_Plan(kind.label, dev, i, [i], priorities=[prio],
                               in_dev=ctx.dev(ino, aux) if kind == StageKind.FORWARD else None))
        elif kind in (StageKind.ROUTE, StageKind.REROUTE):
            lk = (ctx.table(aux), aux, dev, _err_name(aux2))
            if prev is not None and prev.label == kind.label:
                prev.raws.append(i)
                prev.lookups.append(lk)
                prev.dev = dev or prev.dev
                continue
            plans.append(_Plan(kind.label, dev, i, [i], lookups=[lk]))
        elif kind == StageKind.DELIVER:
            plans.append(_Plan(kind.label, dev, i, [i], how=_DELIVER_HOW.get(aux2)))
            if aux2 == DeliverHow.QUEUED:
                deliver_raw = i
        else:
            plans.append(_Plan(kind.label, dev, i, [i]))
    hooks = [p.label for p in plans if p.priorities is not None]
    return _Template(plans, hooks[-1] if hooks else None, deliver_raw)


def _materialize(tpl: _Template, raw_stages: bytes, base: int) -> list[Stage]:
    st = list(_STAGE.iter_unpack(raw_stages))
    path = []
    for p in tpl.plans:
        ts, ifindex, mark, aux, _aux2, kind, _slot, tos, _f, _pad = st[p.first]
        stage = Stage(p.label, ts - base, p.dev, mark, ifindex=ifindex, in_dev=p.in_dev,
                      how=p.how)
        if p.priorities is not None:
            stage.observations = [Observation(prio, st[i][2], st[i][7], st[i][0] - base)
                                  for i, prio in zip(p.raws, p.priorities)]
            last = st[p.raws[-1]]
            stage.tos, stage.mark_out, stage.tos_out = tos, last[2], last[7]
            stage.in_ifindex = aux if p.label == "forward" else 0
        elif p.lookups is not None:
            stage.lookups = [Lookup(table, tid, dev, err, st[i][2], st[i][0] - base)
                             for i, (table, tid, dev, err) in zip(p.raws, p.lookups)]
        elif p.how is not None and aux and _aux2 == DeliverHow.QUEUED:
            stage.socket_inode = aux
        path.append(stage)
    return path


_U64 = struct.Struct("=Q")
_N_OFF = PtRecord.n_stages.offset
# per-packet values: id, drop_location, flags, sport, dport, saddr, daddr, pid, comm
_VALS = struct.Struct("=Q16xQ")
_TAIL = struct.Struct("=BBBBHH16s16sI16s")
_TAIL_OFF = PtRecord.match.offset


def _shape(raw: bytes, ctx: Context, aged: bool) -> Shape:
    """Resolve everything packets of this path shape share."""
    h = dict(zip(("ino", "drop_reason", "in_if", "out_if", "sig", "fam", "proto", "fate", "n"),
                 struct.unpack_from("=IIIIIBBBB", raw, PT_SHAPE_OFF)))
    n = min(h["n"], (len(raw) - _HDR_SIZE) // _STAGE_SIZE)
    ino, fam, proto = h["ino"], h["fam"], h["proto"]
    tpl = _template(list(_STAGE.iter_unpack(raw[_HDR_SIZE:_HDR_SIZE + n * _STAGE_SIZE])), ino, fam, ctx)
    try:
        fate = Fate(h["fate"])
    except ValueError:
        fate = Fate.NONE
    af, alen = _INET.get(fam, (socket.AF_INET, 4))
    end = "aged out" if aged else _END_BY_FATE.get(fate)
    if fate == Fate.DELIVERED and not aged:
        last = tpl.plans[-1] if tpl.plans else None
        end = last.how if last is not None and last.how else "delivered"
    return Shape(ctx.netns_names.get(ino, str(ino)), f"ipv{fam}", PROTO_NAMES.get(proto) or str(proto), proto,
                 "unknown" if aged else FATE_NAMES[fate], ctx.dev(ino, h["in_if"]), ctx.dev(ino, h["out_if"]),
                 end, h["sig"], tpl, ctx.drop_reason(h["drop_reason"]) if fate == Fate.DROPPED and not aged
                 else None, af, alen, proto in (6, 17))


def _values(raw: bytes, sh: Shape, ctx: Context | None) -> Values:
    pid_, drop_loc = _VALS.unpack_from(raw, 0)
    _m, _s, flags, _p, sport, dport, saddr, daddr, pid, comm = _TAIL.unpack_from(raw, _TAIL_OFF)
    v = Values(pid_, socket.inet_ntop(sh.af, saddr[:sh.alen]), socket.inet_ntop(sh.af, daddr[:sh.alen]),
               sport if sh.ports else None, dport if sh.ports else None, truncated=bool(flags & REC_TRUNCATED),
               late_match=bool(flags & REC_LATE))
    if sh.drop_reason is not None:
        sym = ctx.symbolize if ctx is not None else None
        v.drop = {"reason": sh.drop_reason, "location": sym(drop_loc) if sym else hex(drop_loc),
                  "last_hook": sh.template.last_hook}
    elif sh.fate == "delivered":
        tpl = sh.template
        if pid:
            v.process = {"pid": pid, "comm": comm.rstrip(b"\0").decode(errors="replace")}
        elif tpl.deliver_raw is not None and ctx is not None and ctx.socket_owner:
            ino_sock = _STAGE.unpack_from(raw, _HDR_SIZE + tpl.deliver_raw * _STAGE_SIZE)[3]
            owner = ctx.socket_owner(ino_sock) if ino_sock else None
            if owner:
                v.process = {"pid": owner[0], "comm": owner[1], "socket_inode": ino_sock}
    return v


def assemble(rec: PtRecord | bytes, ctx: Context, aged: bool = False) -> Packet:
    """The Packet for one record (aged: its end was never seen).

    Packets of one path shape (the kernel's path signature, with netns,
    devices, fate and stage count: PT_SHAPE_* bytes of the record) share
    their resolved names, so the work per record is one cache lookup.
    """
    raw = rec if isinstance(rec, bytes) else bytes(rec)
    key = raw[PT_SHAPE_OFF:PT_SHAPE_OFF + PT_SHAPE_LEN]
    sh = None if aged else ctx.shapes.get(key)
    if sh is None:
        sh = _shape(raw, ctx, aged)
        # aged records carry no signature (it is computed when a record ends)
        if not aged and sh.path_sig:
            if len(ctx.shapes) >= ctx.max_shapes:
                ctx.shapes.clear()  # bounded: shapes churn only with devices and rules
            ctx.shapes[key] = sh
    return Packet._from_raw(raw, sh, ctx)


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


# ---- JSON rendering by shape ----
#
# Packets of one shape share every key and every static value of their JSON
# object: the object is compiled once into a str.format template whose
# fields are the per-packet values, taken from one struct unpack of the
# record's stages.  tests/unit/test_json_fast.py checks it against to_json.

_STAGES_BY_N: dict[int, struct.Struct] = {}


def _stages_struct(n: int) -> struct.Struct:
    st = _STAGES_BY_N.get(n)
    if st is None:
        st = _STAGES_BY_N[n] = struct.Struct("=" + _STAGE.format.lstrip("=") * n)
    return st


_W = len(_STAGE.format.lstrip("="))   # values per stage in the flat tuple
_F_TS, _F_MARK, _F_AUX, _F_TOS = 0, 2, 3, 7


@dataclass
class _JsonTemplate:
    fmt: str                  # %-format, one %s per per-packet value in order of appearance
    ts: list[int]             # flat indices of timestamps (rendered relative to first_ts)
    fields: operator.itemgetter  # the other per-stage values, from the flat tuple
    order: operator.itemgetter   # puts [fixed..., timestamps..., fields...] in format order
    sock_raw: int | None      # raw stage whose aux is a socket inode (optional key)


def _j(v) -> str:
    return json.dumps(v, separators=(",", ":"))


def _escape(s: str) -> str:
    return s.replace("%", "%%")


_FIXED = ("id", "src", "dst", "sport", "dport", "drop", "process", "truncated", "socket")


def _compile_json(sh: Shape) -> _JsonTemplate:
    ts: list[int] = []
    fields: list[int] = []

    def x(name: str) -> str:
        return "\x01X%d\x02" % _FIXED.index(name)

    def t(raw_i: int) -> str:
        ts.append(raw_i * _W + _F_TS)
        return "\x01T%d\x02" % (len(ts) - 1)

    def f(raw_i: int, field: int) -> str:
        fields.append(raw_i * _W + field)
        return "\x01F%d\x02" % (len(fields) - 1)

    def js(v) -> str:
        return _escape(_j(v))

    out = ['{"id":', x("id"), ',"netns":', js(sh.netns), ',"family":', js(sh.family), ',"proto":', js(sh.proto),
           ',"src":"', x("src"), '","dst":"', x("dst"), '"']
    if sh.ports:
        out += [',"sport":', x("sport"), ',"dport":', x("dport")]
    out += [',"fate":', js(sh.fate), ',"in_dev":', js(sh.in_dev), ',"out_dev":', js(sh.out_dev), ',"path":[']
    sock_raw = None
    for k, p in enumerate(sh.template.plans):
        i = p.first
        out += [',{' if k else '{', '"stage":', js(p.label), ',"t_ns":', t(i), ',"dev":', js(p.dev),
                ',"mark":', f(i, _F_MARK)]
        if p.priorities is not None:
            last = p.raws[-1]
            out += [',"mark_out":', f(last, _F_MARK), ',"tos":', f(i, _F_TOS), ',"tos_out":', f(last, _F_TOS),
                    ',"observers":[']
            for m, (ri, prio) in enumerate(zip(p.raws, p.priorities)):
                out += [",{" if m else "{", '"priority":', js(prio), ',"mark":', f(ri, _F_MARK),
                        ',"tos":', f(ri, _F_TOS), ',"t_ns":', t(ri), "}"]
            out.append("]")
        if p.in_dev is not None:
            out += [',"in_dev":', js(p.in_dev)]
        if p.how:
            out += [',"how":', js(p.how)]
            if p.how == _DELIVER_HOW[DeliverHow.QUEUED]:
                sock_raw = i
                out.append(x("socket"))
        if p.lookups is not None:
            table, _tid, _dev, err = p.lookups[-1]
            out += [',"table":', js(table), ',"err":', js(err), ',"lookups":[']
            for m, (ri, (table, tid, dev, err)) in enumerate(zip(p.raws, p.lookups)):
                out += [",{" if m else "{", '"table":', js(table), ',"table_id":', str(tid), ',"dev":', js(dev),
                        ',"err":', js(err), ',"mark":', f(ri, _F_MARK), ',"t_ns":', t(ri), "}"]
            out.append("]")
        out.append("}")
    out += ["]", x("drop"), x("process"), x("truncated")]
    if sh.end:
        out += [',"end":', js(sh.end)]
    out.append("}")
    text = "".join(out)
    # value slots in the order they appear: index into fixed + timestamps + fields
    base = {"X": 0, "T": len(_FIXED), "F": len(_FIXED) + len(ts)}
    slots = [base[k] + int(n) for k, n in re.findall("\x01([XTF])(\\d+)\x02", text)]
    fmt = re.sub("\x01[XTF]\\d+\x02", "%s", text)
    return _JsonTemplate(fmt, ts, operator.itemgetter(*fields) if len(fields) > 1 else
                         (lambda flat, _i=fields: tuple(flat[i] for i in _i)), operator.itemgetter(*slots),
                         sock_raw)


def packet_json(pkt: Packet) -> str:
    """One packet as a JSON line: compiled per shape for kernel packets."""
    raw, sh = pkt._raw, pkt._shape
    if raw is None or sh.template is None or pkt._path is not None:
        return json.dumps(pkt.to_json(), separators=(",", ":"))
    jt = sh.json_tpl
    if jt is None:
        jt = sh.json_tpl = _compile_json(sh)
    v = pkt._v()
    flat = _stages_struct(raw[_N_OFF]).unpack_from(raw, _HDR_SIZE)
    base = _U64.unpack_from(raw, 8)[0]
    sock = ""
    if jt.sock_raw is not None:
        ino = flat[jt.sock_raw * _W + _F_AUX]
        sock = ',"socket_inode":%d' % ino if ino else ""
    vals = [v.id, v.src, v.dst, v.sport, v.dport,
            ',"drop":' + _j(v.drop) if v.drop else "",
            ',"process":' + _j(v.process) if v.process else "",
            (',"truncated":true' if v.truncated else "") + (',"late_match":true' if v.late_match else ""), sock]
    vals += [flat[i] - base for i in jt.ts]
    vals += jt.fields(flat)
    return jt.fmt % jt.order(vals)
