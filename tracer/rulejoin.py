"""--rules: join nftables trace groups to the paths pkttrace reports.

The kernel's trace id is a keyed hash of the skb's address (6.4+), which
BPF cannot compute, so a group of trace events (tracer.ruletrace) is joined
to a path by what both saw first: the packet's headers before any NAT (the
first event of a group carries them, as the path's record does), its netns
and family, and with the record's captured header the IPv4 id.  Groups with
the same headers are taken oldest first.

A packet's trace events are queued to pkttrace's socket as the kernel runs
the rules (netlink multicast delivers synchronously), before the packet
ends and its record is written: so once the socket was read empty after the
record came, a path whose group is not there will get none (the limit left
it untraced, or the socket overflowed) and goes out without rules, counted.
Only while the socket holds more than one read takes does a path wait, at
most `wait` seconds.  Each event lands
on the table step of its base chain's hook (events in user chains on the
base chain that jumped there).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from . import model, nftables as nft, placement
from .ruletrace import GROUP_TTL, Group, NsRules, RuleTracer

WAIT = 0.2                      # seconds a path waits for its trace events


@dataclass
class JoinCounts:
    joined: int = 0             # paths given their rules
    without: int = 0            # paths that waited in vain (limit, overrun, not selected by nft)
    unclaimed: int = 0          # groups no reported path claimed (filtered out by pkttrace's own filter)


def packet_key(p: model.Packet) -> tuple[tuple, int | None]:
    """(netns inode, family, proto, src, dst, sport, dport), IPv4 id (if captured)."""
    ver = 6 if p.family == "ipv6" else 4
    head = p.head
    ipid = int.from_bytes(head[4:6], "big") if ver == 4 and head and len(head) >= 6 else None
    return (p.netns_inode, ver, p.proto_num, p.src, p.dst, p.sport, p.dport), ipid


def rules_by_table(g: Group, r: NsRules) -> dict[tuple[str, str], list[dict]]:
    """(hook, table step name) -> the rules the packet met there, in order."""
    out: dict[tuple[str, str], list[dict]] = {}
    base: tuple[str, str] | None = None
    for ev in g.events:
        if ev.table.startswith(nft.TABLE_PREFIX):
            continue                 # pkttrace's own tables (this session's or another's)
        c = r.base_of(ev.family, ev.table, ev.chain)
        if c is None or (ev.handle is not None and ev.handle not in c.rules):
            r.refresh(force=True)
            c = r.base_of(ev.family, ev.table, ev.chain)
        if c is not None and c.hook in nft.HOOK_NUMBERS:
            hook = nft.HOOK_NUMBERS[c.hook]
            base = (c.hook, placement.table_step_name(ev.table, ev.chain, ev.family, hook))
        if base is None:
            continue                 # a user chain whose caller was not seen
        if ev.handle is None and (ev.type == nft.TRACE_RULE or
                                  (ev.type == nft.TRACE_RETURN and c is not None and c.hook is not None)):
            # the end of a chain's rules, before its policy (6.18: a rule
            # event without a handle; 6.1: a return from the base chain): no rule
            continue
        entry: dict[str, object]
        if ev.type == nft.TRACE_POLICY:
            v = ev.verdict_text
            entry = {"chain": ev.chain, "handle": None, "rule": f"policy {v}", "verdict": v}
        else:
            text = c.rules.get(ev.handle) if c is not None and ev.handle is not None else None
            entry = {"chain": ev.chain, "handle": ev.handle, "rule": text, "verdict": ev.verdict_text}
        out.setdefault(base, []).append(entry)
    return out


def attach(p: model.Packet, found: dict[tuple[str, str], list[dict]]) -> None:
    """Give each table step of the path the rules met there (a step that
    stands for several chains at one priority gets theirs in order)."""
    for (hook, name), rules in found.items():
        for s in p.path:
            if s.stage != hook or not s.is_hook:
                continue
            step = next((t for t in s.tables if t.table == name or name in t.table.split(", ")), None)
            if step is not None:
                step.rules = (step.rules or []) + rules
                break
    for s in p.path:                 # a table nftables reported nothing of (conntrack, legacy): []
        for t in s.tables if s.is_hook else ():
            if t.rules is None:
                t.rules = []


class Joiner:
    """A stage between the collector and the sinks: packets in, packets
    out (in order) with their rules, none held more than `wait` seconds."""

    def __init__(self, rt: RuleTracer, wait: float = WAIT):
        self.rt, self.wait = rt, wait
        self.pending: deque[tuple[float, model.Packet]] = deque()
        self.index: dict[tuple, deque[Group]] = {}
        self.counts = JoinCounts()

    def _take_groups(self) -> None:
        now = time.monotonic()
        by_ns = {r.ns: r for r in self.rt.ns.values()}
        for g in self.rt.take():
            if g.key is None:
                continue
            ver, proto, src, dst, sport, dport, ipid = g.key
            r = by_ns.get(g.ns)
            # the IPv4 id in the key: the packets of one flow are told apart
            # without a scan (IPv6 has none: oldest first)
            k = (r.ino if r is not None else None, ver, proto, src, dst, sport, dport, ipid)
            self.index.setdefault(k, deque()).append(g)
        for k in list(self.index):
            q = self.index[k]
            while q and now - q[0].t > GROUP_TTL:
                q.popleft()
                self.counts.unclaimed += 1
            if not q:
                del self.index[k]

    def _claim(self, p: model.Packet) -> bool:
        # read from a copy: a packet that gets no rules stays undecoded
        key, ipid = packet_key(p.reader())
        q = self.index.get((*key, ipid))
        if not q:
            return False
        g = q.popleft()
        r = next((r for r in self.rt.ns.values() if r.ns == g.ns), None)
        if r is not None:
            attach(p, rules_by_table(g, r))
        self.counts.joined += 1
        return True

    def feed(self, pkts: list[model.Packet], final: bool = False) -> list[model.Packet]:
        """The packets ready to go out, in order: joined, without hook stages,
        or waited `wait` seconds (all of them when final)."""
        now = time.monotonic()
        self.pending.extend((now, p) for p in pkts)
        self._take_groups()
        # every event queued before these records came has been read
        complete = getattr(self.rt, "drained", False)
        out: list[model.Packet] = []
        while self.pending:
            t, p = self.pending[0]
            if not p.has_hook_stage() or self._claim(p):
                pass
            elif final or complete or now - t >= self.wait:
                self.counts.without += 1
            else:
                break
            self.pending.popleft()
            out.append(p)
        return out

    def waiting(self) -> int:
        return len(self.pending)

    def discard(self) -> int:
        """Forget the paths still waiting (not to be printed); how many."""
        n = len(self.pending)
        self.pending.clear()
        return n
