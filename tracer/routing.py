"""The routing policy database (`ip rule`): which rule chose a table.

The kernel's fib tracepoints say which tables a lookup consulted, in
order, and what each gave; not which rule sent it there.  Rules are read
from the RPDB with pyroute2 and walked here the way fib_rules_lookup()
walks them, so a route stage can say `rule 100: from all fwmark 0x1/0x1
lookup 100`.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

from . import netns

FR_ACT_TO_TBL, FR_ACT_GOTO, FR_ACT_NOP = 1, 2, 3
FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT = 6, 7, 8
FIB_RULE_INVERT = 0x2
ACTION_NAMES = {FR_ACT_BLACKHOLE: "blackhole", FR_ACT_UNREACHABLE: "unreachable", FR_ACT_PROHIBIT: "prohibit",
                FR_ACT_GOTO: "goto", FR_ACT_NOP: "nop"}
TABLE_NAMES = {255: "local", 254: "main", 253: "default"}


@dataclass(frozen=True)
class Rule:
    priority: int
    table: int
    action: int = FR_ACT_TO_TBL
    src: ipaddress._BaseNetwork | None = None
    dst: ipaddress._BaseNetwork | None = None
    fwmark: int | None = None
    fwmask: int = 0xFFFFFFFF
    iif: str | None = None
    oif: str | None = None
    tos: int = 0
    ipproto: int = 0
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None
    invert: bool = False
    unsupported: bool = False     # a selector we do not evaluate (uidrange, l3mdev, ...)

    def text(self, table_name=None) -> str:
        """Like `ip rule` prints it."""
        name = table_name or (lambda t: TABLE_NAMES.get(t, str(t)))
        parts = [f"{self.priority}:"]
        if self.invert:
            parts.append("not")
        parts.append(f"from {self.src if self.src is not None else 'all'}")
        if self.dst is not None:
            parts.append(f"to {self.dst}")
        if self.tos:
            parts.append(f"tos {self.tos:#x}")
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}" + (f"/{self.fwmask:#x}" if self.fwmask != 0xFFFFFFFF else ""))
        if self.iif:
            parts.append(f"iif {self.iif}")
        if self.oif:
            parts.append(f"oif {self.oif}")
        if self.ipproto:
            parts.append(f"ipproto {self.ipproto}")
        for what, rng in (("sport", self.sport), ("dport", self.dport)):
            if rng:
                parts.append(f"{what} {rng[0]}" if rng[0] == rng[1] else f"{what} {rng[0]}-{rng[1]}")
        if self.action == FR_ACT_TO_TBL:
            parts.append(f"lookup {name(self.table)}")
        else:
            parts.append(ACTION_NAMES.get(self.action, f"action {self.action}"))
        return " ".join(parts)


@dataclass
class Flow:
    """What a rule selects on, as the packet was when it was routed."""
    src: str
    dst: str
    mark: int
    iif: str | None          # None: locally generated (the kernel matches iif lo)
    oif: str | None = None
    tos: int = 0
    proto: int = 0
    sport: int | None = None
    dport: int | None = None


def rule_matches(r: Rule, f: Flow) -> bool:
    if r.unsupported:
        return False
    ok = True
    if r.src is not None:
        ok = ok and ipaddress.ip_address(f.src) in r.src
    if r.dst is not None:
        ok = ok and ipaddress.ip_address(f.dst) in r.dst
    if r.fwmark is not None:
        ok = ok and (f.mark & r.fwmask) == r.fwmark
    if r.iif:
        ok = ok and (f.iif or "lo") == r.iif
    if r.oif:
        ok = ok and f.oif == r.oif
    if r.tos:
        ok = ok and (f.tos & 0x1E) == r.tos
    if r.ipproto:
        ok = ok and f.proto == r.ipproto
    if r.sport:
        ok = ok and f.sport is not None and r.sport[0] <= f.sport <= r.sport[1]
    if r.dport:
        ok = ok and f.dport is not None and r.dport[0] <= f.dport <= r.dport[1]
    return ok != r.invert


def choosing_rule(rules: list[Rule], flow: Flow, tables: list[int]) -> Rule | None:
    """The rule whose table gave the lookup's result.

    `tables` are the tables the kernel looked up, in order (all but the
    last answered -EAGAIN: "no route here, next rule").  Rules are walked in
    priority order and matched against the flow; each matching lookup rule
    consumes one lookup.  When the walk and the kernel disagree (rules
    changed meanwhile, or the kernel's no-custom-rules fast path that
    looks up only main), the first matching rule that points at the final
    table is the answer.
    """
    if not tables:
        return None
    final = tables[-1]
    i = 0
    for r in rules:
        if not rule_matches(r, flow):
            continue
        if r.action != FR_ACT_TO_TBL:
            # unreachable/prohibit/blackhole rules end the walk before any
            # table gave the result: no rule chose the final table
            return None
        if i < len(tables) and r.table == tables[i]:
            if i == len(tables) - 1:
                return r
            i += 1
    return next((r for r in rules if r.action == FR_ACT_TO_TBL and r.table == final and rule_matches(r, flow)),
                None)


def rule_to_json(r: Rule) -> dict:
    d = dataclasses.asdict(r)
    d["src"] = str(r.src) if r.src is not None else None
    d["dst"] = str(r.dst) if r.dst is not None else None
    return d


def rule_from_json(d: dict) -> Rule:
    d = dict(d)
    for k in ("src", "dst"):
        d[k] = ipaddress.ip_network(d[k]) if d.get(k) else None
    for k in ("sport", "dport"):
        d[k] = tuple(d[k]) if d.get(k) else None
    return Rule(**d)


def _port_range(v) -> tuple[int, int] | None:
    if not v:
        return None
    return (v["start"], v["end"]) if isinstance(v, dict) else tuple(v)


def from_netlink(msg) -> Rule:
    a = msg.get_attr
    fam = msg["family"]
    net = ipaddress.IPv4Network if fam == 2 else ipaddress.IPv6Network
    src = net(f"{a('FRA_SRC')}/{msg['src_len']}", strict=False) if a("FRA_SRC") else None
    dst = net(f"{a('FRA_DST')}/{msg['dst_len']}", strict=False) if a("FRA_DST") else None
    fwmark = a("FRA_FWMARK")
    return Rule(
        priority=a("FRA_PRIORITY") or 0,
        table=a("FRA_TABLE") or msg["table"],
        action=msg["action"],
        src=src, dst=dst,
        fwmark=fwmark if fwmark is not None and (fwmark or a("FRA_FWMASK")) else None,
        fwmask=a("FRA_FWMASK") if a("FRA_FWMASK") is not None else 0xFFFFFFFF,
        iif=a("FRA_IIFNAME"), oif=a("FRA_OIFNAME"), tos=msg["tos"], ipproto=a("FRA_IP_PROTO") or 0,
        sport=_port_range(a("FRA_SPORT_RANGE")), dport=_port_range(a("FRA_DPORT_RANGE")),
        invert=bool(msg["flags"] & FIB_RULE_INVERT),
        unsupported=bool(a("FRA_UID_RANGE") or a("FRA_L3MDEV")),
    )


def read_rules(ns: str | None, family: int) -> list[Rule]:
    """The RPDB of a netns for family 4 or 6, in evaluation order."""
    # an existing netns only: pyroute2's NetNS would create a deleted one
    with netns.ipr(ns) as ipr:
        msgs = ipr.get_rules(family=2 if family == 4 else 10)
    return sorted((from_netlink(m) for m in msgs), key=lambda r: r.priority)
