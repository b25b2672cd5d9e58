"""Where the netfilter observers go: one before the first table of a hook
and one after each table (or group of tables) actually registered there.

This kernel has no nfnetlink_hook (`nft list hooks` prints nothing, the
NFNL_SUBSYS_HOOK dump answers EINVAL), so what is registered is read from
what registers it:
  - nft base chains, iptables-nft tables included (nfnetlink dump via
    pyroute2: table, chain, hook, priority, type, and the rules' expressions);
  - legacy iptables tables (/proc/net/ip{,6}_tables_names) at their fixed
    priorities;
  - the NAT core hook, at the standard NAT priority of the hook, whatever
    the priority of the nat chains that run inside it;
  - conntrack (-200 at PREROUTING/OUTPUT) when something needs it: a nat
    chain or a rule matching on conntrack state.

Every observer costs every packet, so a hook with no table gets only the
first observer, which still shows the packet crossed it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import netns, nftables

HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
PRE, INPUT, FORWARD, OUTPUT, POST = range(5)
# netfilter refuses INT_MIN and INT_MAX; these are the outermost usable slots
PRIO_FIRST = -(2**31) + 1
PRIO_LAST = 2**31 - 2
BANK = 8                     # observer programs per bank (events.PT_NF_BANK)

PRI_RAW, PRI_CONNTRACK, PRI_MANGLE, PRI_NAT_DST, PRI_FILTER, PRI_SECURITY, PRI_NAT_SRC = \
    -300, -200, -150, -100, 0, 50, 100
# NAT runs in one core hook per hook point at a fixed priority
NAT_PRIORITY = {PRE: PRI_NAT_DST, OUTPUT: PRI_NAT_DST, INPUT: PRI_NAT_SRC, POST: PRI_NAT_SRC}
# legacy iptables tables: priority and hooks
LEGACY = {
    "raw": (PRI_RAW, (PRE, OUTPUT)),
    "mangle": (PRI_MANGLE, (PRE, INPUT, FORWARD, OUTPUT, POST)),
    "nat": (None, (PRE, INPUT, OUTPUT, POST)),
    "filter": (PRI_FILTER, (INPUT, FORWARD, OUTPUT)),
    "security": (PRI_SECURITY, (INPUT, FORWARD, OUTPUT)),
}
IPTABLES_NAMES = frozenset(LEGACY)
CONNTRACK = "conntrack"      # the name conntrack's hook goes by among the tables
# nft families: NFPROTO_INET (1) covers both IP families
NFT_FAMILIES = {2: (4,), 10: (6,), 1: (4, 6)}
# expressions and xt matches/targets that make a netns register conntrack
CT_EXPRS = frozenset({"ct", "nat", "masq", "redir", "connlimit", "ct_expect"})
CT_XT = frozenset({"state", "conntrack", "CONNMARK", "connmark", "CT", "helper"})


@dataclass(frozen=True)
class Table:
    """Something registered at a hook: a table, an nft base chain, NAT, conntrack."""
    name: str
    priority: int
    nat: bool = False        # a nat table or chain: may rewrite addresses and ports
    # nftables' handle of its table (0: not nft): what the fentry and kprobe
    # backends name a chain by; a table deleted and added again gets another
    handle: int = 0


@dataclass
class HookPlan:
    """The observers of one (family, hook): priorities[i] is slot i of the bank,
    tables[i] what the packet crosses between observer i-1 and observer i."""
    priorities: list[int]
    tables: list[list[Table]] = field(default_factory=list)

    def tables_after(self, i: int) -> list[Table]:
        """What runs between observer i and the next one (none after the last:
        an observer follows every table)."""
        return self.tables[i + 1] if i + 1 < len(self.tables) else []


Registered = dict[tuple[int, int], list[Table]]   # (family, hook) -> tables


def _table_name(table: str, chain: str, nfproto: int, hook: int) -> str:
    # iptables-nft: table "mangle" of family ip/ip6 with chain "PREROUTING"
    if nfproto in (2, 10) and table in IPTABLES_NAMES and chain == HOOKS[hook].upper():
        return table
    return f"{table}/{chain}"


def table_step_name(table: str, chain: str, nfproto: int, hook: int) -> str:
    """What a path calls the table step of this nft base chain (TableStep.table)."""
    return _table_name(table, chain, nfproto, hook)


def _uses_conntrack(rule) -> bool:
    for e in rule.get_attr("NFTA_RULE_EXPRESSIONS") or ():
        name = e.get_attr("NFTA_EXPR_NAME")
        if name in CT_EXPRS:
            return True
        if name in ("match", "target"):
            data = e.get_attr("NFTA_EXPR_DATA")
            xt = data.get_attr("NFTA_MATCH_NAME" if name == "match" else "NFTA_TARGET_NAME") if data else None
            if xt in CT_XT:
                return True
    return False


def read_nft(ns: str | None) -> tuple[Registered, set[int]]:
    """nft base chains by (family, hook), and the families that use conntrack."""
    from pyroute2.nftables.main import NFTables
    reg: Registered = {}
    conntrack: set[int] = set()
    with netns.entered(ns):
        nft = NFTables(nfgen_family=0)   # NFPROTO_UNSPEC: every family
        try:
            tables = nft.get_tables()
            chains = nft.get_chains()
            rules = nft.get_rules()
        finally:
            nft.close()
    handles = {(t["nfgen_family"], t.get_attr("NFTA_TABLE_NAME")): t.get_attr("NFTA_TABLE_HANDLE") or 0
               for t in tables}
    for c in chains:
        hook = c.get_attr("NFTA_CHAIN_HOOK")
        nfproto = c["nfgen_family"]
        if (c.get_attr("NFTA_CHAIN_TABLE") or "").startswith(nftables.TABLE_PREFIX):
            continue     # --rules' own tables: they change nothing, so no observer is owed to them
        if hook is None or nfproto not in NFT_FAMILIES:
            continue
        hooknum, prio = hook.get_attr("NFTA_HOOK_HOOKNUM"), hook.get_attr("NFTA_HOOK_PRIORITY")
        if hooknum is None or hooknum > 4:
            continue
        table = c.get_attr("NFTA_CHAIN_TABLE")
        name = _table_name(table, c.get_attr("NFTA_CHAIN_NAME"), nfproto, hooknum)
        handle = handles.get((nfproto, table), 0)
        nat = c.get_attr("NFTA_CHAIN_TYPE") == "nat"
        if nat:
            prio = NAT_PRIORITY.get(hooknum, prio)
            conntrack.update(NFT_FAMILIES[nfproto])
        for fam in NFT_FAMILIES[nfproto]:
            reg.setdefault((fam, hooknum), []).append(Table(name, prio, nat, handle))
    for r in rules:
        if (r.get_attr("NFTA_RULE_TABLE") or "").startswith(nftables.TABLE_PREFIX):
            continue
        if r["nfgen_family"] in NFT_FAMILIES and _uses_conntrack(r):
            conntrack.update(NFT_FAMILIES[r["nfgen_family"]])
    return reg, conntrack


def read_legacy(ns: str | None) -> Registered:
    """Tables of the legacy (x_tables) iptables, at their fixed priorities."""
    reg: Registered = {}
    with netns.entered(ns):
        for fam, fname in ((4, "ip_tables_names"), (6, "ip6_tables_names")):
            try:
                # thread-self: setns() changed this thread's netns only
                with open(f"/proc/thread-self/net/{fname}") as f:
                    names = f.read().split()
            except OSError:
                continue
            for t in names:
                if t not in LEGACY:
                    continue
                prio, hooks = LEGACY[t]
                for h in hooks:
                    reg.setdefault((fam, h), []).append(
                        Table(f"{t} (legacy)", NAT_PRIORITY[h] if prio is None else prio, t == "nat"))
    return reg


def registered(ns: str | None) -> Registered:
    """Everything registered at the IP hooks of a netns, sorted by priority."""
    reg, conntrack = read_nft(ns)
    for key, tables in read_legacy(ns).items():
        reg.setdefault(key, []).extend(tables)
        if any(t.name.startswith("nat ") for t in tables):
            conntrack.add(key[0])
    for fam in conntrack:
        for h in (PRE, OUTPUT):
            reg.setdefault((fam, h), []).append(Table(CONNTRACK, PRI_CONNTRACK))
    return {k: sorted(set(v), key=lambda t: (t.priority, t.name)) for k, v in reg.items()}


def has_nat(reg: Registered) -> bool:
    """Can a table of this ruleset rewrite addresses or ports?"""
    return any(t.nat for tables in reg.values() for t in tables)


def _merge_conntrack(groups: list[list[Table]]) -> None:
    """Conntrack alone in its group, followed by a group of nft chains only
    (no NAT, no x_tables): one observer after both.  Conntrack changes
    neither mark nor DSCP and the chains cannot change its state, so the
    observation after both says what each did; and a drop is told apart by
    where the packet was freed: an nft chain frees its own (NF_DROP_REASON,
    in nft_do_chain), conntrack's NF_DROP is freed by nf_hook_slow."""
    i = 0
    while i + 1 < len(groups):
        nxt = groups[i + 1]
        if [t.name for t in groups[i]] == [CONNTRACK] and all(t.handle and not t.nat for t in nxt):
            groups[i:i + 2] = [groups[i] + nxt]
        i += 1


def shares_conntrack_observer(group: list) -> bool:
    """Is this group (Tables, or (name, priority) pairs) conntrack merged
    with the nft chains after it?  Tables grouped for their priorities are
    at most 1 + bank (<= 2) apart; a merged group leaves more room."""
    def prio(t):
        return t.priority if isinstance(t, Table) else t[1]

    def name(t):
        return t.name if isinstance(t, Table) else t[0]
    return len(group) > 1 and name(group[0]) == CONNTRACK and prio(group[1]) - prio(group[0]) > 2


def plan_hook(tables: list[Table], bank: int = 0, entry: bool = True, merge_conntrack: bool = False) -> HookPlan:
    """Observer priorities for one hook.

    Tables at one priority run in an order we cannot see: they form one
    group, observed after the last of them.  So do tables whose priorities
    leave no integer between them.  With more groups than the bank has
    slots, the last groups share one observer.  The second bank sits one
    above the first, so both can be attached at once while re-placing.
    Without `entry` (and with tables) no observer comes before the first
    table: the stage before the hook says how the packet came in.  With
    `merge_conntrack`, conntrack shares the observer of the nft chains
    after it (see _merge_conntrack): the kernel must tell where a dropped
    packet was freed.
    """
    groups: list[list[Table]] = []
    for t in tables:
        if groups and t.priority - groups[-1][-1].priority <= 1 + bank:
            groups[-1].append(t)
        else:
            groups.append([t])
    if merge_conntrack:
        _merge_conntrack(groups)
    while len(groups) > BANK - 1:
        groups[-2:] = [groups[-2] + groups[-1]]
    prios = [min(g[-1].priority + 1 + bank, PRIO_LAST) for g in groups]
    if entry or not groups:
        return HookPlan([PRIO_FIRST + bank] + prios, [[]] + groups)
    return HookPlan(prios, groups)


# Hooks whose packets can come in changed by something pkttrace does not
# observe, or unseen before: PREROUTING (tc filters after pkttrace's own
# on ingress) and OUTPUT (a locally generated packet is first seen there).
# Between the other hooks only routing runs, which changes neither mark
# nor DSCP: every observer costs every packet, so they get none before
# their first table.
ENTRY_HOOKS = (PRE, OUTPUT)


def plan(reg: Registered, bank: int = 0, merge_conntrack: bool = False) -> dict[tuple[int, int], HookPlan]:
    """A plan for every (family, hook): tables or not, each hook is observed."""
    return {(fam, h): plan_hook(reg.get((fam, h), []), bank, entry=h in ENTRY_HOOKS,
                                merge_conntrack=merge_conntrack)
            for fam in (4, 6) for h in range(5)}


def entryless(hp: HookPlan) -> bool:
    """Does the plan's first observer come after a table?"""
    return bool(hp.tables and hp.tables[0])


def describe(reg: Registered) -> list[str]:
    """Human lines: `ipv4 prerouting: raw -300, conntrack -200, mangle -150`."""
    out = []
    for (fam, h) in sorted(reg):
        out.append(f"ipv{fam} {HOOKS[h]}: " + ", ".join(f"{t.name} {t.priority}" for t in reg[(fam, h)]))
    return out
