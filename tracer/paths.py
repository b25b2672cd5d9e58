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

import errno
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable

from . import layout, routing
from .model import (HOOK_NAMES as _HOOKS, TC_NAMES, Drop, FateName, Lookup, Observation, Packet, Qdisc, QdiscVerdict,
                    Route, Shape, Stage, StageName as S, TableStep, Values, Verdict, qdisc_handle)
from .placement import CONNTRACK, PRI_CONNTRACK, shares_conntrack_observer
from .events import (EXT_HDRS, REC_L4, CT_REPLY, NF_STAGES, PT_NF_BANK, REC_CAUSED, REC_FRAG, ROUTE_SRC_CHECK, PT_SHAPE_LEN, PT_SHAPE_OFF, REC_LATE,
                     REC_TRUNCATED, SLOT_EXIT, SLOT_TABLE, STF_CHANGING, STF_HOOK_SLOW, STF_NF_DROP, STF_NFT_TABLE, STF_REDIRECTED, AddrWhat, Ct, DeliverHow, Fate, PtRecord,
                     QdiscEvent, StageKind, TcVerdict)

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 47: "gre", 50: "esp"}
FATE_NAMES = {Fate.FORWARDED: FateName.FORWARDED, Fate.DELIVERED: FateName.DELIVERED, Fate.SENT: FateName.SENT,
              Fate.DROPPED: FateName.DROPPED, Fate.CONSUMED: FateName.CONSUMED, Fate.REDIRECTED: FateName.REDIRECTED,
              Fate.REASSEMBLED: FateName.REASSEMBLED, Fate.ENCAPSULATED: FateName.ENCAPSULATED,
              Fate.DECAPSULATED: FateName.DECAPSULATED, Fate.NONE: FateName.UNKNOWN}
# RTN_* of the route the kernel attached to a packet (struct rtable.rt_type)
RTN_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
             7: "unreachable", 8: "prohibit"}
TC_STAGES = TC_NAMES
ROUTE_TABLES = {255: "local", 254: "main", 253: "default"}
DROP_PREFIX = "SKB_DROP_REASON_"


@dataclass
class Context:
    """What user space knows that the records do not carry."""
    ifnames: dict[tuple[int, int], str] = field(default_factory=dict)  # (netns inode, ifindex) -> name
    if_kinds: dict[tuple[int, int], str] = field(default_factory=dict)  # ... -> kind, of tunnel devices
    netns_names: dict[int, str] = field(default_factory=dict)          # inode -> name ("" = host)
    slot_priority: dict[tuple[int, int, int, int], int] = field(default_factory=dict)  # (ino, fam, hook, slot)
    # (ino, fam, hook, slot) -> [(table, priority)] crossed just before that observer / right after it
    slot_tables: dict[tuple[int, int, int, int], list] = field(default_factory=dict)
    slot_after: dict[tuple[int, int, int, int], list] = field(default_factory=dict)
    conntrack: dict[int, list[int]] = field(default_factory=dict)     # ino -> families with conntrack hooks
    # (ino, fam, hook) -> [(table, priority, nft table handle or 0)] registered there, in
    # priority order (fentry/kprobe backends)
    registered: dict[tuple[int, int, int], list] = field(default_factory=dict)
    # (ino, nft table handle) of pkttrace's own --rules tables: their chains
    # are seen running (fentry/kprobe) but are no table of the path
    hidden_tables: set[tuple[int, int]] = field(default_factory=set)
    rules: dict[tuple[int, int], list] = field(default_factory=dict)  # (ino, fam) -> [routing.Rule]
    generation: int = 0                # bumped when observers or rules change (recordings re-save names)
    boot_wall_ns: int | None = None    # Unix time (ns) of the kernel's monotonic clock's zero: wall-clock times
    drop_reasons: dict[int, str] = field(default_factory=dict)         # enum value -> name
    symbolize: Callable[[int], str] | None = None
    socket_owner: Callable[[int], tuple[int, str] | None] | None = None  # socket inode -> (pid, comm)
    route_tables: dict[int, str] = field(default_factory=lambda: dict(ROUTE_TABLES))
    # resolved Shapes by the record's PT_SHAPE bytes (netns, devices, signature, fate, ...)
    shapes: dict = field(default_factory=dict)
    max_shapes: int = 4096
    # qdiscs: (netns inode, ifindex, handle) -> kind; (netns inode, ifindex) -> the root's handle
    qdisc_kinds: dict[tuple[int, int, int], str] = field(default_factory=dict)
    qdisc_roots: dict[tuple[int, int], int] = field(default_factory=dict)
    qdisc_refresh: Callable[[int], None] | None = None   # read netns ino's qdiscs again (live tracing)

    def dev(self, netns: int, ifindex: int) -> str | None:
        if not ifindex:
            return None
        return self.ifnames.get((netns, ifindex), f"if{ifindex}")

    def tunnel(self, netns: int, ifindex: int) -> dict:
        """The tunnel a packet went through on device ifindex: its device and
        kind, or xfrm (IPsec by policy: no tunnel device; ifindex is then
        the device it left or arrived by)."""
        kind = self.if_kinds.get((netns, ifindex))
        if kind is None:
            return {"kind": "xfrm"}
        return {"dev": self.dev(netns, ifindex), "kind": kind}

    def drop_reason(self, value: int) -> str:
        name = self.drop_reasons.get(value)
        if name is None:
            return f"reason {value}"
        return name[len(DROP_PREFIX):] if name.startswith(DROP_PREFIX) else name

    def table(self, tb: int) -> str:
        return self.route_tables.get(tb, str(tb))

    def qdisc(self, netns: int, ifindex: int, handle: int | None = None) -> Qdisc | None:
        """The qdisc `handle` of a device (None: its root), with its kind."""
        for again in (False, True):
            if again:
                if self.qdisc_refresh is None:
                    break
                self.qdisc_refresh(netns)      # a qdisc added (or replaced) since the last read
            h = self.qdisc_roots.get((netns, ifindex)) if handle is None else handle
            kind = self.qdisc_kinds.get((netns, ifindex, h)) if h is not None else None
            if kind is not None:
                break
        if h is None:
            return None
        return Qdisc(kind, qdisc_handle(h))


def _err_name(err: int) -> str | None:
    if not err:
        return None
    e = -err if err < 0 else err
    return errno.errorcode.get(e, str(err))


# what a fib error means as a route type (fib_props[] in the kernel)
_ERR_TYPE = {-errno.ENETUNREACH: "unreachable", -errno.EHOSTUNREACH: "unreachable", -errno.EACCES: "prohibit",
             -errno.EINVAL: "blackhole", -errno.EAGAIN: "no_match"}


def route_type(table_id: int, err: int) -> str:
    """The result of one lookup: unicast, local, or why it failed."""
    if err:
        return _ERR_TYPE.get(err, _err_name(err) or str(err))
    return "local" if table_id == 255 else "unicast"


_CT_NAMES = {Ct.NEW: "new", Ct.ESTABLISHED: "established", Ct.RELATED: "related", Ct.UNTRACKED: "untracked"}


def ct_name(code: int, tracked: bool) -> str | None:
    """PT_CT_* as conntrack says it; no entry where conntrack runs is `invalid`."""
    base = code & ~CT_REPLY
    if base == Ct.NONE:
        return "invalid" if tracked else None
    name = _CT_NAMES.get(Ct(base), str(base)) if base in Ct._value2member_map_ else str(base)
    return name + " reply" if code & CT_REPLY and base != Ct.UNTRACKED else name


_DELIVER_HOW = {DeliverHow.QUEUED: "queued to socket", DeliverHow.READ: "read by process",
                DeliverHow.CONSUMED: "consumed after input", DeliverHow.STACK: "taken by the local stack"}

_END_BY_FATE = {Fate.FORWARDED: "tx", Fate.SENT: "tx", Fate.REDIRECTED: "tx", Fate.DROPPED: "kfree_skb",
                Fate.CONSUMED: "consume_skb", Fate.REASSEMBLED: "reassembled", Fate.NONE: "aged out",
                Fate.ENCAPSULATED: "encapsulated", Fate.DECAPSULATED: "decapsulated"}


# The record's layout (tracer.layout), under the short names this module reads it by
_HDR_SIZE, _STAGE_SIZE, _STAGE, _ADDR = layout.HEADER_SIZE, layout.STAGE_SIZE, layout.STAGE, layout.ADDR
_INET = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}
# fields of a raw stage tuple
(_TS, _IFX, _MARK, _AUX, _AUX2, _KIND, _SLOT, _TOS, _FAM, _CT, _FLAGS) = (
    layout.ST_TS, layout.ST_IFINDEX, layout.ST_MARK, layout.ST_AUX, layout.ST_AUX2, layout.ST_KIND, layout.ST_SLOT,
    layout.ST_TOS, layout.ST_FAMILY, layout.ST_CT, layout.ST_FLAGS)


@dataclass
class _Obs:
    raw: int                            # raw stage index
    priority: int | None
    tables: list                        # [(name, priority)] crossed just before this observer
    nat: list[tuple[int, int]] = field(default_factory=list)   # (raw index of ADDR stage, what)
    unknown: bool = False               # fentry/kprobe: an nft table the ruleset read does not have


@dataclass
class _Plan:
    """How one output stage is built from raw stages: everything but the
    per-packet values (times, marks, TOS, addresses, socket inode)."""
    label: S
    dev: str | None
    first: int                          # index of its first raw stage
    raws: list[int]                     # indices of all its raw stages
    obs: list[_Obs] | None = None       # hook stages
    drop_tables: list | None = None     # hook stage before a netfilter drop: tables after the last observer
    drop_passed: list | None = None     # ... of which these let it by (conntrack, sharing the dropper's observer)
    drop_verdict: str = Verdict.DROP          # ... and what they did: drop, or reject (sent an ICMP error / RST)
    drop_in_last: bool = False          # fentry backend: the last observed table itself dropped it
    changing: bool = False              # the hook's registrations were not what the observers were placed for
    tracked: bool = False               # conntrack runs in this netns/family (no entry = invalid)
    in_dev: str | None = None
    lookups: list[tuple] | None = None  # route: (table, table_id, dev, err, gw raw index, src_check) per raw stage
    nexthop: int | None = None          # route: raw index of the NEXTHOP stage (what the kernel attached)
    rtype: int = 0                      # route: RTN_* of that route (0: unknown)
    how: str | None = None
    verdict: str | None = None          # tc stages
    target: str | None = None
    qdisc: Qdisc | None = None          # qdisc stage: the root qdisc (raws: enqueue, dequeue(s))


@dataclass
class _Template:
    plans: list[_Plan]
    last_hook: str | None
    deliver_raw: int | None             # raw index of a deliver-by-socket stage
    drop_stage: str | None = None       # where a drop happened: hook, route, tc_ingress, ...
    drop_table: str | None = None
    drop_dev: str | None = None
    drop_before: int | None = None      # netfilter drop before our first observer of that hook: its priority
    changing: bool = False              # a hook crossed while its ruleset was changing: tables not named
    drop_changing: bool = False         # ... and the drop happened in such a hook
    drop_qdisc: Qdisc | None = None     # dropped in a qdisc: which


def _nf_drop(reason: str | None) -> bool:
    return reason is not None and reason.startswith("NETFILTER")


def _template(stages: list[tuple], raw_stages: bytes, ino: int, fam: int, ctx: Context,
              drop_reason: str | None, caused: bool = False) -> _Template:
    plans: list[_Plan] = []
    deliver_raw = None
    drop_raw = None
    tracked = fam in ctx.conntrack.get(ino, ())
    for i, st in enumerate(stages):
        ifindex, aux, aux2, kind, slot = st[_IFX], st[_AUX], st[_AUX2], st[_KIND], st[_SLOT]
        try:
            kind = StageKind(kind)
        except ValueError:
            continue  # a newer kernel object with a stage we do not know
        prev = plans[-1] if plans else None
        if kind == StageKind.ADDR:
            a = _addr_stage(raw_stages, i)
            what = a[2]
            if prev is not None and prev.obs and what in (AddrWhat.NAT_SRC, AddrWhat.NAT_DST):
                prev.obs[-1].nat.append((i, what))
            elif prev is not None and prev.lookups and what == AddrWhat.GW:
                prev.lookups[-1] = prev.lookups[-1][:4] + (i,) + prev.lookups[-1][5:]
            elif prev is not None and prev.lookups and what == AddrWhat.NEXTHOP:
                prev.nexthop, prev.rtype = i, a[3]
                prev.dev = ctx.dev(ino, a[4]) or prev.dev
            continue
        dev = ctx.dev(ino, ifindex)
        if kind in NF_STAGES:
            # a reroute inside OUTPUT (mangle changed the mark) sits between
            # two observers of that hook: they still make one output stage
            hook_plan = prev if prev is not None and prev.label == kind.label else \
                plans[-2] if prev is not None and len(plans) > 1 and prev.label == S.REROUTE and \
                plans[-2].label == kind.label else None
            if slot in (SLOT_TABLE, SLOT_EXIT):
                # fentry backend: after the table at priority aux2, or after
                # every hook function; with it, what ran since the last look
                last = hook_plan.obs[-1].priority if hook_plan is not None and hook_plan.obs else None
                handle = aux if st[_FLAGS] & STF_NFT_TABLE else None
                if handle is not None and (ino, handle) in ctx.hidden_tables:
                    ob = _Obs(i, aux2, [])   # pkttrace's --rules chain: an observation, no table
                else:
                    ob = _table_obs(i, slot, aux2, last,
                                    ctx.registered.get((ino, fam, kind - StageKind.PREROUTING), []), handle)
            else:
                key = (ino, fam, kind - StageKind.PREROUTING, slot)
                # (the fentry backend's hook entry has no placed slot: before
                # every table, even one at the first priority a link can take)
                ob = _Obs(i, ctx.slot_priority.get(key, PRIO_MIN if slot == 0 else None),
                          ctx.slot_tables.get(key, []))
            changing = bool(st[_FLAGS] & STF_CHANGING) or ob.unknown
            if hook_plan is not None and hook_plan.obs is not None:
                hook_plan.raws.append(i)
                hook_plan.obs.append(ob)
                hook_plan.changing |= changing
                continue
            plans.append(_Plan(S(kind.label), dev, i, [i], obs=[ob], tracked=tracked,
                               in_dev=ctx.dev(ino, aux) if kind == StageKind.FORWARD else None,
                               changing=changing))
        elif kind in (StageKind.ROUTE, StageKind.REROUTE):
            lk = (ctx.table(aux), aux, dev, aux2, None, bool(st[_CT] & ROUTE_SRC_CHECK))
            if prev is not None and prev.label == kind.label and prev.lookups is not None:
                prev.raws.append(i)
                prev.lookups.append(lk)
                if not lk[5] and prev.nexthop is None:
                    prev.dev = dev or prev.dev
                continue
            plans.append(_Plan(S(kind.label), dev, i, [i], lookups=[lk]))
        elif kind == StageKind.QDISC:
            # enqueue, then dequeue (and again, requeued): one stage
            if slot != QdiscEvent.ENQUEUED and prev is not None and prev.qdisc is not None and prev.dev == dev:
                prev.raws.append(i)
                continue
            plans.append(_Plan(S.QDISC, dev, i, [i], qdisc=ctx.qdisc(ino, ifindex, aux)))
        elif kind == StageKind.DELIVER:
            plans.append(_Plan(S(kind.label), dev, i, [i], how=_DELIVER_HOW.get(aux2)))
            if aux2 == DeliverHow.QUEUED:
                deliver_raw = i
        else:
            plans.append(_Plan(S(kind.label), dev, i, [i]))
            if kind == StageKind.DROP:
                drop_raw = i
            elif kind in (StageKind.TC_INGRESS, StageKind.TC_EGRESS) and aux2 in (TcVerdict.MIRROR,
                                                                                  TcVerdict.REDIRECT):
                # a copy was seen leaving tc for another device
                plans[-1].verdict = "mirror" if aux2 == TcVerdict.MIRROR else "redirect"
                plans[-1].target = ctx.dev(ino, aux)
    _tc_verdicts(plans, stages, ino, ctx, drop_reason)
    hooks = [p for p in plans if p.obs is not None]
    tpl = _Template(plans, hooks[-1].label if hooks else None, deliver_raw,
                    changing=any(p.changing for p in hooks))
    if drop_reason is not None:
        tpl.drop_dev = ctx.dev(ino, stages[drop_raw][_IFX]) if drop_raw is not None else None
        _drop_place(tpl, plans, stages, ino, fam, ctx, drop_reason, caused,
                    stages[drop_raw][_IFX] if drop_raw is not None else 0)
        hooks = [p for p in plans if p.obs is not None]
        tpl.last_hook = hooks[-1].label if hooks else None
        tpl.changing = any(p.changing for p in hooks)
    return tpl



PRIO_MIN, PRIO_MAX = -(2**31), 2**31 - 1   # INT_MIN/INT_MAX: before/after every hook function


def _table_obs(raw: int, slot: int, prio: int, last: int | None, registered: list,
               handle: int | None = None) -> _Obs:
    """An observation of the fentry/kprobe backends: after one table (an nft
    base chain, named by its table's handle, or an x_tables table at
    `prio`), or after every hook function.  The tables crossed since the
    last observation are what is registered between the two priorities
    (conntrack, NAT, ... run unobserved)."""
    lo = last if last is not None else PRIO_MIN
    hi = prio if slot == SLOT_TABLE else PRIO_MAX
    tables = [(t[0], t[1]) for t in registered if lo < t[1] <= hi]
    if slot == SLOT_TABLE:
        # the table itself said it ran: name it alone.  What ran unobserved
        # before it (conntrack, defrag: no chain of their own) shows in the
        # stage's ct, not as a table the change could be blamed on
        if handle is not None:
            named = [(t[0], t[1]) for t in registered if t[1] == prio and len(t) > 2 and t[2] == handle]
            if not named:
                # a table the ruleset read does not have (yet): it changed
                # since, and a name by priority could be another table's
                return _Obs(raw, hi, [], unknown=True)
            return _Obs(raw, hi, named)
        tables = [(n, p) for n, p in tables if p == prio] or \
            [(f"(table at {prio})", prio)]      # not (yet) in the ruleset read
    return _Obs(raw, hi, tables)


def _tc_verdicts(plans: list[_Plan], stages: list[tuple], ino: int, ctx: Context, drop_reason: str | None) -> None:
    """What happened to the packet after each tc stage, seen from the next:
    dropped by tc (`shot`), sent to another device by tc (`redirect`: that
    stage has skb->redirected), or went on (`ok`)."""
    for k, p in enumerate(plans):
        if p.label not in TC_STAGES or p.verdict is not None:
            continue
        nxt = plans[k + 1] if k + 1 < len(plans) else None
        p.verdict = "ok"
        if nxt is None:
            continue
        if nxt.label == S.DROP and drop_reason is not None and drop_reason.startswith("TC_"):
            p.verdict = "shot"
        elif stages[nxt.first][_FLAGS] & STF_REDIRECTED and nxt.dev != p.dev:
            p.verdict, p.target = "redirect", nxt.dev


def _route_failed(p: _Plan) -> bool:
    lookups = p.lookups or []
    decisions = [lk for lk in lookups if not lk[5]] or lookups
    if not decisions:
        return False
    return bool(decisions[-1][3])


def _drop_place(tpl: _Template, plans: list[_Plan], stages: list[tuple], ino: int, fam: int, ctx: Context,
                reason: str, caused: bool, drop_dev_ifindex: int = 0) -> None:
    """Where the kernel dropped the packet: the stage, and for netfilter the table."""
    before = [p for p in plans if p.label != S.DROP]
    last = before[-1] if before else None
    if last is None:
        return
    nf = _nf_drop(reason)
    tpl.drop_stage = last.label
    if reason.startswith("QDISC") or (last.label in (S.TX, S.QDISC) and not reason.startswith("TC_")):
        # handed to the device (tc egress, or the queue tracepoint), then
        # dropped in its queue (qdisc, or a driver that could not take it):
        # the qdisc that took it, else the device's root qdisc (a tail drop)
        tpl.drop_stage = "qdisc"
        if last.qdisc is not None:
            tpl.drop_qdisc = last.qdisc
        elif drop_dev_ifindex:
            tpl.drop_qdisc = ctx.qdisc(ino, drop_dev_ifindex)
        return
    if nf and _dropped_in_first_table(tpl, plans, stages, ino, fam, ctx, caused):
        return
    if last.obs is not None:
        if nf and last.changing:
            # the ruleset changed under the observers: the table that
            # dropped it cannot be named (rather than name a wrong one)
            last.drop_verdict = Verdict.REJECT if caused else Verdict.DROP
            tpl.drop_changing = True
            return
        if nf:
            # the table sent an ICMP error or RST back before dropping it
            last.drop_verdict = Verdict.REJECT if caused else Verdict.DROP
            lst = stages[last.obs[-1].raw]
            if lst[_SLOT] == SLOT_TABLE and lst[_FLAGS] & STF_NF_DROP:
                # fentry backend: the table observed last said drop itself
                last.drop_in_last = True
                tpl.drop_table = _names(last.obs[-1].tables[-1:])
                return
            # dropped between the last observer that saw it and the next one
            key = (ino, fam, StageKind[last.label.upper()] - StageKind.PREROUTING, lst[_SLOT])
            if lst[_SLOT] in (0, SLOT_TABLE) and key not in ctx.slot_after:
                # fentry backend: something registered after that priority
                since = last.obs[-1].priority if lst[_SLOT] == SLOT_TABLE else PRIO_MIN
                last.drop_tables = [(t[0], t[1]) for t in ctx.registered.get(key[:3], [])
                                    if since is None or t[1] > since]
            else:
                last.drop_tables = ctx.slot_after.get(key, [])
                _split_conntrack_drop(last, stages[plans[-1].first][_FLAGS])
            tpl.drop_table = _names(last.drop_tables) if last.drop_tables else None
        return
    after: str | None = None
    if last.lookups is not None:
        if _route_failed(last):
            return  # routing said no: drop.stage is "route"
        # routed, then dropped on the way to the next hook (ip_forward: TTL,
        # MTU; or a netfilter hook function before our first observer)
        after = _next_hook(last)
    elif last.label in (S.RX, S.TC_INGRESS) and nf:
        after = S.PREROUTING
    elif last.label == S.POSTROUTING or last.label in TC_STAGES:
        return
    if after is not None:
        tpl.drop_stage = after
        if nf:
            # a hook function registered before our first observer there
            hook = _HOOKS.index(S(after))
            firsts = [prio for (i, f, h, _s), prio in ctx.slot_priority.items() if (i, f, h) == (ino, fam, hook)]
            tpl.drop_before = min(firsts) if firsts else None


def _next_hook(last: _Plan) -> str | None:
    """The hook a packet goes to after the stage `last` (None: not one
    netfilter decides alone, or not known)."""
    if last.label in (S.FORWARD, S.OUTPUT, S.REROUTE):
        return S.POSTROUTING
    if last.lookups is not None and not _route_failed(last):
        if last.rtype == 2 or (not last.rtype and last.dev in (None, "lo")):
            return S.INPUT
        return S.FORWARD
    return None


def _dropped_in_first_table(tpl: _Template, plans: list[_Plan], stages: list[tuple], ino: int, fam: int,
                            ctx: Context, caused: bool) -> bool:
    """A netfilter drop after the last observer of one hook (or after
    routing) in a hook whose first observer comes after its first table:
    that table (group) dropped it before any observer of the hook saw it.
    Adds that hook's stage, which no observer saw, before the drop."""
    drop = plans[-1]
    before = plans[:-1]
    last = before[-1] if before else None
    if drop.label != S.DROP or last is None or (last.obs is not None and last.obs and
                                                 ctx.slot_after.get(_slot_key(last, stages, ino, fam), [])):
        return False
    hook = _next_hook(last)
    if hook is None:
        return False
    hook_i = _HOOKS.index(S(hook))
    banks = sorted({stages[o.raw][_SLOT] // PT_NF_BANK for p in before if p.obs for o in p.obs
                    if stages[o.raw][_SLOT] < SLOT_TABLE})
    for bank in banks or (0, 1):
        group = ctx.slot_tables.get((ino, fam, hook_i, bank * PT_NF_BANK))
        if group:
            break
    else:
        return False
    flags = stages[drop.first][_FLAGS]
    changing = bool(flags & STF_CHANGING)
    # where the packet was: FORWARD has both devices (the kernel's is the
    # one it came in on), the others the kernel's
    dev, in_dev = (last.dev, drop.dev) if hook == S.FORWARD else (drop.dev, None)
    p = _Plan(S(hook), dev, drop.first, [drop.first], obs=[], drop_tables=group, in_dev=in_dev,
              drop_verdict=Verdict.REJECT if caused else Verdict.DROP, changing=changing,
              tracked=fam in ctx.conntrack.get(ino, ()))
    _split_conntrack_drop(p, flags)
    plans.insert(len(plans) - 1, p)
    tpl.drop_stage = hook
    if changing:
        tpl.drop_changing = True
    else:
        tpl.drop_table = _names(p.drop_tables or [])
    return True


def _split_conntrack_drop(p: _Plan, drop_flags: int) -> None:
    """Conntrack and the nft chains after it share one observer: the kernel
    said which one dropped the packet by where it was freed."""
    if not p.drop_tables or not shares_conntrack_observer(p.drop_tables):
        return
    if drop_flags & STF_HOOK_SLOW:
        p.drop_tables = p.drop_tables[:1]
    else:
        p.drop_passed, p.drop_tables = p.drop_tables[:1], p.drop_tables[1:]


def _slot_key(p: _Plan, stages: list[tuple], ino: int, fam: int) -> tuple:
    """(netns, family, hook, slot) of the last observation of hook plan p."""
    assert p.obs
    return (ino, fam, StageKind[p.label.upper()] - StageKind.PREROUTING, stages[p.obs[-1].raw][_SLOT])


def _endpoint(addr: str, port: int | None, fam: int) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if fam == 6 else f"{addr}:{port}"


def _materialize(sh: Shape, raw_stages: bytes, base: int, v: Values, ctx: Context | None) -> list[Stage]:
    tpl = sh.template
    st = list(_STAGE.iter_unpack(raw_stages))
    fam = 6 if sh.af == socket.AF_INET6 else 4
    # the packet's addresses as it goes: NAT stages change them
    cur = {"src": (v.src, v.sport), "dst": (v.dst, v.dport)}
    path = []
    before = None      # the last hook observation: how the packet comes into the next hook
    for p in tpl.plans:
        t0 = st[p.first]
        stage = Stage(p.label, t0[_TS] - base, p.dev, t0[_MARK], ifindex=t0[_IFX], in_dev=p.in_dev, how=p.how,
                      verdict=p.verdict, target=p.target)
        if p.obs is not None:
            _hook_stage(stage, p, st, raw_stages, base, cur, sh, fam, before)
            if p.obs:
                before = st[p.obs[-1].raw]
        elif p.lookups is not None:
            _route_stage(stage, p, st, raw_stages, base, cur, sh, fam, ctx)
        elif p.how is not None and t0[_AUX] and t0[_AUX2] == DeliverHow.QUEUED:
            stage.socket_inode = t0[_AUX]
        elif p.qdisc is not None:
            _qdisc_stage(stage, p, st, tpl.plans)
        path.append(stage)
    return path


def _qdisc_stage(stage: Stage, p: _Plan, st: list[tuple], plans: list[_Plan]) -> None:
    """Enqueue, dequeue (requeued: dequeued again) as one stage: how long
    the packet waited, how many were queued with it, and how it left."""
    stage.qdisc = p.qdisc
    first = st[p.first]
    enq = first if first[_SLOT] == QdiscEvent.ENQUEUED else None
    deq = [st[i] for i in p.raws if st[i][_SLOT] != QdiscEvent.ENQUEUED]
    stage.qlen = enq[_AUX2] if enq is not None else None
    stage.verdict = QdiscVerdict.QUEUED
    if any(d[_SLOT] == QdiscEvent.REQUEUED for d in deq):
        stage.verdict = QdiscVerdict.REQUEUED
    k = plans.index(p)
    if enq is None:
        before = plans[k - 1] if k else None
        if before is not None and before.label in (S.TC_EGRESS, S.TX) and before.dev == p.dev:
            # the qdisc took it while dropping others to make room (fq_codel:
            # NET_XMIT_CN), which the enqueue tracepoint does not report: the
            # hand-over to the device just before stands for the enqueue
            enq = st[before.first]
            stage.t_ns += enq[_TS] - first[_TS]
        else:
            return
    if deq:
        stage.queued_ns = deq[0][_TS] - enq[_TS]
        return
    nxt = plans[k + 1] if k + 1 < len(plans) else None
    if nxt is not None and nxt.label == S.DROP:
        # dropped inside the qdisc (AQM, overlimit) after waiting there
        stage.verdict = QdiscVerdict.DROPPED
        stage.queued_ns = st[nxt.first][_TS] - enq[_TS]


def _hook_stage(stage: Stage, p: _Plan, st: list[tuple], raw_stages: bytes, base: int, cur: dict, sh: Shape,
                fam: int, before: tuple | None) -> None:
    if not p.obs:
        _unobserved_drop_stage(stage, p, st, before)
        return
    first, last = st[p.obs[0].raw], st[p.obs[-1].raw]
    stage.observations = [Observation(o.priority, st[o.raw][_MARK], st[o.raw][_TOS], st[o.raw][_TS] - base,
                                      ct_name(st[o.raw][_CT], p.tracked and _after_conntrack(o, p)))
                          for o in p.obs]
    # a hook whose first observer comes after a table: the packet came in
    # as the last hook before left it (only routing runs in between)
    prev = before if p.obs[0].tables and before is not None else first
    stage.mark, stage.tos, stage.mark_out, stage.tos_out = prev[_MARK], prev[_TOS], last[_MARK], last[_TOS]
    stage.ct = stage.observations[-1].ct
    stage.in_ifindex = first[_AUX] if p.label == S.FORWARD else 0
    if p.changing:
        # the observers sat among other tables than they were placed for:
        # their marks and times are true, the table names would not be
        stage.attribution = "changing"
        return
    for k, o in enumerate(p.obs):
        s = st[o.raw]
        nat = {}
        for raw_i, what in o.nat:
            a = _addr_stage(raw_stages, raw_i)
            addr, port = socket.inet_ntop(sh.af, a[0][:sh.alen]), a[1]
            side = "src" if what == AddrWhat.NAT_SRC else "dst"
            before = cur[side]
            cur[side] = (addr, port if sh.ports else None)
            nat[side] = {"from": _endpoint(before[0], before[1], fam), "to": _endpoint(addr, cur[side][1], fam)}
        if not o.tables and not nat:
            continue  # no table ran since the last look (a hook's entry: none yet)
        if nat and not o.tables and k > 0 and stage.tables and not stage.tables[-1].nat:
            # fentry/kprobe backends: a NAT hook rewrites the packet after its
            # chain returned, so the rewrite shows at the next look, where no
            # table ran since: it is the table just observed that did it
            stage.tables[-1].nat = nat
            prev = s
            continue
        verdict = p.drop_verdict if p.drop_in_last and k == len(p.obs) - 1 else Verdict.ACCEPT
        tables = o.tables
        if shares_conntrack_observer(tables):
            # conntrack changes neither mark nor DSCP: what changed, the
            # chains after it did
            stage.tables.append(TableStep(CONNTRACK, tables[0][1], prev[_MARK], prev[_TOS] >> 2,
                                          stage.observations[k].ct, Verdict.ACCEPT, prev[_MARK], prev[_TOS] >> 2))
            tables = tables[1:]
        stage.tables.append(TableStep(
            _names(tables), tables[-1][1] if tables else None,
            s[_MARK], s[_TOS] >> 2, stage.observations[k].ct, verdict, prev[_MARK], prev[_TOS] >> 2, nat or None))
        prev = s
    if p.drop_tables is not None and not p.drop_in_last:
        for t in p.drop_passed or ():
            stage.tables.append(TableStep(t[0], t[1], last[_MARK], last[_TOS] >> 2, stage.ct, Verdict.ACCEPT,
                                          last[_MARK], last[_TOS] >> 2))
        stage.tables.append(TableStep(_names(p.drop_tables),
                                      p.drop_tables[-1][1] if p.drop_tables else None,
                                      last[_MARK], last[_TOS] >> 2, stage.ct, p.drop_verdict, last[_MARK],
                                      last[_TOS] >> 2))


def _unobserved_drop_stage(stage: Stage, p: _Plan, st: list[tuple], before: tuple | None) -> None:
    """A hook whose first observer comes after its first table, dropped by
    that table: no observer saw the packet there; the drop says when, and
    with what mark it was freed."""
    drop = st[p.first]
    mark_in = before[_MARK] if before is not None else drop[_MARK]
    tos_in = before[_TOS] if before is not None else 0
    stage.mark, stage.tos, stage.mark_out, stage.tos_out = mark_in, tos_in, drop[_MARK], tos_in
    stage.ct = ct_name(before[_CT], p.tracked) if before is not None else None
    if p.changing:
        stage.attribution = "changing"
        return
    for t in p.drop_passed or ():
        stage.tables.append(TableStep(t[0], t[1], mark_in, tos_in >> 2, stage.ct, Verdict.ACCEPT, mark_in, tos_in >> 2))
    stage.tables.append(TableStep(_names(p.drop_tables or []), p.drop_tables[-1][1] if p.drop_tables else None,
                                  drop[_MARK], tos_in >> 2, stage.ct, p.drop_verdict, mark_in, tos_in >> 2))


def _after_conntrack(o: _Obs, p: _Plan) -> bool:
    """Has conntrack run when observer o looks?  At PREROUTING/OUTPUT only
    after its priority; at the other hooks it ran at the hook before."""
    if p.label not in (S.PREROUTING, S.OUTPUT):
        return True
    return o.priority is not None and o.priority > PRI_CONNTRACK


def _names(tables: list) -> str:
    """`mangle`, or `a, b` for tables sharing one observer."""
    return ", ".join(t[0] for t in tables) or "(not observed)"


def _addr_stage(raw_stages: bytes, i: int) -> tuple:
    """Raw stage i read as a PtAddrStage (addr, port, what, ..., family, ...)."""
    return _ADDR.unpack_from(raw_stages, i * _STAGE_SIZE)


def _route_stage(stage: Stage, p: _Plan, st: list[tuple], raw_stages: bytes, base: int, cur: dict, sh: Shape,
                 fam: int, ctx: Context | None) -> None:
    lookups: list[Lookup] = []
    checks: list[Lookup] = []
    for raw_i, (table, tid, dev, err, gw_raw, src_check) in zip(p.raws, p.lookups or []):
        gw = None
        if gw_raw is not None:
            a = _addr_stage(raw_stages, gw_raw)
            gaf, glen = _INET.get(a[-2], (sh.af, sh.alen))
            gw = socket.inet_ntop(gaf, a[0][:glen])
        lk = Lookup(table, tid, dev, _err_name(err), st[raw_i][_MARK], st[raw_i][_TS] - base, gw, src_check,
                    route_type(tid, err))
        (checks if src_check else lookups).append(lk)
    if not lookups:
        lookups, checks = checks, []
    last = lookups[-1]
    rtype = RTN_TYPES.get(p.rtype) if p.nexthop is not None and not last.err else None
    if rtype == "local" and [lk.table_id for lk in lookups] == [254]:
        # without custom rules the kernel looks up local and main merged
        # into one table it calls main: the route found is the local table's
        last.table, last.table_id = ctx.table(255) if ctx is not None else "local", 255
    stage.lookups = lookups + checks
    mark = last.mark
    dev, gw, err, typ = last.dev, last.gw, last.err, last.type
    if p.nexthop is not None and not last.err:
        # what the kernel attached: the nexthop it chose (ECMP), its device
        a = _addr_stage(raw_stages, p.nexthop)
        dev = p.dev
        gaf, glen = _INET.get(a[-2], (sh.af, sh.alen))
        gw = socket.inet_ntop(gaf, a[0][:glen]) if any(a[0][:glen]) else None
        typ = rtype or typ
    elif err:
        dev = gw = None  # (fib6 names the null entry's device, loopback)
        if err == "EAGAIN":
            # no table had a route: the lookup as a whole says ENETUNREACH
            err, typ = "ENETUNREACH", "unreachable"
    src, dst = cur["src"][0], cur["dst"][0]
    rule = None
    rules = ctx.rules.get((sh.ino, fam)) if ctx is not None and sh.ino is not None else None
    if rules and ctx is not None:
        flow = routing.Flow(src, dst, mark, None if sh.local_out else sh.in_dev, proto=sh.proto_num,
                            sport=cur["src"][1], dport=cur["dst"][1])
        r = routing.choosing_rule(rules, flow, [lk.table_id for lk in _last_walk(lookups)])
        if r is not None:
            rule = r.text(ctx.table)
    stage.dev = dev
    stage.route = Route([lk.table for lk in _last_walk(lookups)], rule, typ, dev, gw, src if sh.local_out else None,
                        err, mark)
    if checks:
        stage.route.src_check = {"tables": [c.table for c in checks], "dev": checks[-1].dev, "err": checks[-1].err}


def _last_walk(lookups: list[Lookup]) -> list[Lookup]:
    """The lookups of the last walk through the rules: the kernel may route
    one packet more than once in a row (xfrm looks up an ICMP error's route
    again), each walk starting again at the first table."""
    first = lookups[0].table_id
    starts = [i for i, lk in enumerate(lookups) if lk.table_id == first]
    return lookups[starts[-1]:]


_U64, _N_OFF, _FLAGS_OFF = layout.U64, layout.N_STAGES_OFF, layout.FLAGS_OFF
_VALS, _TAIL, _TAIL_OFF = layout.VALS, layout.TAIL, layout.TAIL_OFF
_LINKS, _LINKS_OFF = layout.LINKS, layout.LINKS_OFF
_TUN, _TUN_OFF = layout.TUN, layout.TUN_OFF


def _shape(raw: bytes, ctx: Context, aged: bool) -> Shape:
    """Resolve everything packets of this path shape share."""
    h = dict(zip(("ino", "drop_reason", "in_if", "out_if", "sig", "fam", "proto", "fate", "n"),
                 struct.unpack_from("=IIIIIBBBB", raw, PT_SHAPE_OFF)))
    flags = raw[_FLAGS_OFF]
    n = min(h["n"], (len(raw) - _HDR_SIZE) // _STAGE_SIZE)
    ino, fam, proto = h["ino"], h["fam"], h["proto"]
    try:
        fate = Fate(h["fate"])
    except ValueError:
        fate = Fate.NONE
    reason = ctx.drop_reason(h["drop_reason"]) if fate == Fate.DROPPED and not aged else None
    raw_stages = raw[_HDR_SIZE:_HDR_SIZE + n * _STAGE_SIZE]
    tpl = _template(list(_STAGE.iter_unpack(raw_stages)), raw_stages, ino, fam, ctx, reason,
                    caused=bool(flags & REC_CAUSED))
    af, alen = _INET.get(fam, (socket.AF_INET, 4))
    end = "aged out" if aged else _END_BY_FATE.get(fate)
    if fate == Fate.DELIVERED and not aged:
        last = tpl.plans[-1] if tpl.plans else None
        end = last.how if last is not None and last.how else "delivered"
    sh = Shape(ctx.netns_names.get(ino, str(ino)), f"ipv{fam}", PROTO_NAMES.get(proto) or str(proto), proto,
               "unknown" if aged else FATE_NAMES[fate], ctx.dev(ino, h["in_if"]), ctx.dev(ino, h["out_if"]),
               end, h["sig"], tpl, reason, af, alen, proto in (6, 17))
    # locally generated: the first hook stage is output (rule walks see iif lo)
    hooks = [p.label for p in tpl.plans if p.obs is not None]
    sh.local_out = bool(hooks) and hooks[0] == S.OUTPUT
    sh.ino = ino
    return sh


def _facts(v: Values, raw: bytes, sh: Shape, flags: int, ctx: Context | None) -> None:
    """The header line's facts (length, TCP flags, ICMP type and code), the
    wall-clock time and the captured header bytes."""
    if ctx is not None and ctx.boot_wall_ns is not None:
        v.wall_ns = ctx.boot_wall_ns + _U64.unpack_from(raw, layout.FIRST_TS_OFF)[0]
    length, tcp_flags, icmp_type, icmp_code, head_len = layout.FACTS.unpack_from(raw, layout.FACTS_OFF)
    if not length:                       # not parsed, or recorded before the record carried them
        return
    v.length = length
    if head_len:
        v.head = raw[layout.HEAD_OFF:layout.HEAD_OFF + head_len]
    if not flags & REC_L4:
        return                           # a later fragment, or a header cut short: no L4 facts
    if sh.proto_num == 6:
        v.tcp_flags = tcp_flags
    elif sh.proto_num in (1, 58):
        v.icmp_type, v.icmp_code = icmp_type, icmp_code


def _values(raw: bytes, sh: Shape, ctx: Context | None) -> Values:
    pid_, drop_loc = _VALS.unpack_from(raw, layout.VALS_OFF)
    _m, _s, flags, _p, sport, dport, saddr, daddr, pid, comm = _TAIL.unpack_from(raw, _TAIL_OFF)
    # a fragment after the first carries no ports
    ports = sh.ports and not (flags & REC_FRAG and not sport and not dport)
    v = Values(pid_, socket.inet_ntop(sh.af, saddr[:sh.alen]), socket.inet_ntop(sh.af, daddr[:sh.alen]),
               sport if ports else None, dport if ports else None, truncated=bool(flags & REC_TRUNCATED),
               late_match=bool(flags & REC_LATE))
    if len(raw) >= _LINKS_OFF + _LINKS.size:
        cause, prev, nxt, link, next_ns, prev_ns = _LINKS.unpack_from(raw, _LINKS_OFF)
        names = ctx.netns_names if ctx is not None else {}
        v.cause = cause or None
        v.reassembled = link or None
        if prev:
            v.prev, v.prev_netns = prev, names.get(prev_ns, str(prev_ns))
        if nxt:
            v.next, v.next_netns = nxt, names.get(next_ns, str(next_ns))
    if len(raw) >= _TUN_OFF + _TUN.size:
        encap, decap, inner, tun_if, ext = _TUN.unpack_from(raw, _TUN_OFF)
        v.encap, v.decap, v.inner = encap or None, decap or None, inner or None
        if (encap or decap or inner) and ctx is not None:
            v.tunnel = ctx.tunnel(sh.ino or 0, tun_if)
        if ext:
            v.ext_hdrs = [name for bit, name in EXT_HDRS if ext & bit]
    _facts(v, raw, sh, flags, ctx)
    if sh.drop_reason is not None:
        sym = ctx.symbolize if ctx is not None else None
        tpl = sh.template
        v.drop = Drop(sh.drop_reason, sym(drop_loc) if sym else hex(drop_loc), tpl.last_hook, tpl.drop_stage,
                      tpl.drop_table, tpl.drop_dev, tpl.drop_before, "changing" if tpl.drop_changing else None,
                      tpl.drop_qdisc)
    elif sh.fate == "delivered":
        tpl = sh.template
        if pid:
            v.process = {"pid": pid, "comm": comm.rstrip(b"\0").decode(errors="replace")}
        elif tpl.deliver_raw is not None and ctx is not None and ctx.socket_owner:
            ino_sock = _STAGE.unpack_from(raw, _HDR_SIZE + tpl.deliver_raw * _STAGE_SIZE)[_AUX]
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
    return Packet._from_raw(raw, sh, ctx, _DECODER)


class _RecordDecoder:
    """The per-packet half of decoding, run when a Packet is first read."""

    @staticmethod
    def values(raw: bytes, shape: Shape, ctx: Context | None) -> Values:
        return _values(raw, shape, ctx)

    @staticmethod
    def path(raw: bytes, shape: Shape, values: Values, ctx: Context | None) -> list[Stage]:
        n = raw[_N_OFF]
        # the stages' times are printed after the first: emitted records
        # carry them so already, others are absolute
        base = 0 if raw[layout.REL_TS_OFF] else _U64.unpack_from(raw, layout.FIRST_TS_OFF)[0]
        return _materialize(shape, raw[_HDR_SIZE:_HDR_SIZE + n * _STAGE_SIZE], base, values, ctx)


_DECODER = _RecordDecoder()
