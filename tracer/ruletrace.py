"""--rules: pkttrace's temporary nftables table, and the trace events it earns.

In each traced netns pkttrace adds table `inet pkttrace_<pid>`, owned by
its netlink socket (the kernel deletes it when the socket closes, even after
SIGKILL), with a base chain at the lowest priority (INT_MIN) of each hook.
Their rules set `meta nftrace` for the packets the filter selects, through a
`limit` that bounds the trace volume; nftables then reports every rule,
return and policy the packet meets in every table (NFNLGRP_NFTRACE), and
pkttrace reads those events on the same socket.

Events are grouped per packet (their trace id) here; tracer.rulejoin joins
the groups to the paths.  Rule texts come from `nft -a -s list ruleset`
inside the netns (-s: without counter values, which would be stale),
cached per netns and read again when an event names an unknown rule or the
ruleset's generation moved.

The filter is compiled into nft expressions: addresses (prefixes), protocol,
ports (TCP/UDP, either side), mark/mask, device (in or out).  A chain per
hook matches the packet as it is at that hook, so a packet that matches only
after NAT is selected at the next hook.  A tcpdump expression is not
compiled: the rest of the filter (or every packet) selects, and the join
drops the groups no reported path claims.  Conntrack's tuples are not
matched: at INT_MIN a packet has no conntrack entry yet, and a `ct`
expression would make the kernel register conntrack in a netns that does
not use it.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import re
import struct
import subprocess
import time
from dataclasses import dataclass, field

from . import netns, nftables as nft, watch
from .filters import PacketFilter

TABLE_PREFIX = nft.TABLE_PREFIX
LIMIT_RATE = 2000               # packets (hook passes) per second selected for nftables tracing
LIMIT_BURST = LIMIT_RATE // 10   # a tenth of a second's worth at once
SELECT = "select"               # our regular chain: the limit, then meta nftrace set 1
FAMILY_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
GROUP_TTL = 2.0                 # seconds a group waits for its path before it is dropped
REFRESH_EVERY = 0.2             # seconds between two re-reads of a netns's rule texts
GEN_CHECK_EVERY = 1.0           # seconds between two checks of nftables' generation while events come


class RulesError(Exception):
    """--rules cannot work here; the message names the missing feature."""


def table_name(pid: int | None = None) -> str:
    return f"{TABLE_PREFIX}{os.getpid() if pid is None else pid}"


# ---- the filter, as nft expressions ----

def _prefix(base: int, off: int, net) -> list[bytes]:
    n = net.num_addresses
    exprs = [nft.payload(base, off, len(net.network_address.packed))]
    if n > 1:
        exprs.append(nft.bitwise(net.netmask.packed))
    return exprs + [nft.cmp_eq(net.network_address.packed)]


def compile_filter(pf: PacketFilter) -> list[list[bytes]]:
    """Alternatives (OR) of expression lists (AND): the rules that select
    a packet at a hook.  [] when no packet can match; [[]] for every packet."""
    alts: list[list[list[bytes]]] = []
    versions = {n.version for n in (pf.src, pf.dst) if n is not None}
    if len(versions) > 1:
        return []
    if versions:
        v = versions.pop()
        addr: list[bytes] = [nft.meta(nft.NFT_META_NFPROTO), nft.cmp_eq(bytes([2 if v == 4 else 10]))]
        for net, off in ((pf.src, 12 if v == 4 else 8), (pf.dst, 16 if v == 4 else 24)):
            if net is not None:
                addr += _prefix(nft.NFT_PAYLOAD_NETWORK_HEADER, off, net)
        alts.append([addr])
    if pf.port is not None:
        protos = [pf.proto] if pf.proto is not None else [6, 17]
        if not set(protos) & {6, 17}:
            return []
        port = struct.pack(">H", pf.port)
        alts.append([[nft.meta(nft.NFT_META_L4PROTO), nft.cmp_eq(bytes([p])),
                      nft.payload(nft.NFT_PAYLOAD_TRANSPORT_HEADER, off, 2), nft.cmp_eq(port)]
                     for p in protos if p in (6, 17) for off in (0, 2)])
    elif pf.proto is not None:
        alts.append([[nft.meta(nft.NFT_META_L4PROTO), nft.cmp_eq(bytes([pf.proto]))]])
    if pf.mark is not None:
        m = [nft.meta(nft.NFT_META_MARK)]
        if pf.mark.mask != 0xFFFFFFFF:
            m.append(nft.bitwise(struct.pack("=I", pf.mark.mask)))
        alts.append([m + [nft.cmp_eq(struct.pack("=I", pf.mark.value))]])
    if pf.iface is not None:
        name = pf.iface.encode().ljust(16, b"\0")
        alts.append([[nft.meta(k), nft.cmp_eq(name)] for k in (nft.NFT_META_IIFNAME, nft.NFT_META_OIFNAME)])
    return [[e for part in combo for e in part] for combo in itertools.product(*alts)]


def table_messages(table: str, selects: list[list[bytes]], hooks=tuple(nft.HOOK_NUMBERS),
                   rate: int = LIMIT_RATE, burst: int = LIMIT_BURST):
    """build(seq) -> the batch's messages: the table, a base chain per hook
    whose rules go to `select`, and `select`: over the limit, accept
    untraced (counted); else meta nftrace set 1."""
    fam = nft.NFPROTO_INET

    def build(seq: int) -> list[bytes]:
        s = itertools.count(seq)
        out = [nft.new_table(next(s), fam, table), nft.new_chain(next(s), fam, table, SELECT)]
        out.append(nft.new_rule(next(s), fam, table, SELECT,
                                [nft.limit(rate, burst, over=True), nft.counter(), nft.verdict(nft.NF_ACCEPT)]))
        out.append(nft.new_rule(next(s), fam, table, SELECT,
                                [nft.counter(), nft.immediate(b"\x01"), nft.meta_set(nft.NFT_META_NFTRACE)]))
        for hook in hooks:
            out.append(nft.new_chain(next(s), fam, table, hook, nft.HOOK_NUMBERS[hook]))
            for sel in selects:
                out.append(nft.new_rule(next(s), fam, table, hook, sel + [nft.verdict(nft.NFT_GOTO, SELECT)]))
        return out
    return build


# ---- rule texts ----

@dataclass
class Chain:
    hook: str | None = None            # a base chain's hook
    policy: str | None = None
    rules: dict[int, str] = field(default_factory=dict)


Ruleset = dict[tuple[str, str], dict[str, Chain]]      # (family, table) -> chain name -> Chain

_TABLE = re.compile(r'^table (\S+) (\S+) \{')
_CHAIN = re.compile(r'^\s*chain (\S+|"[^"]*") \{')
_HOOK = re.compile(r'type \S+ hook (\S+)(?: device \S+)? priority [^;]+;(?: policy (\w+);)?')
_HANDLE = re.compile(r'^\s*(.*?) # handle (\d+)$')


def parse_listing(text: str) -> Ruleset:
    """`nft -a -s list ruleset` -> tables, chains (hook, policy) and rule texts by handle."""
    out: Ruleset = {}
    table: dict[str, Chain] | None = None
    chain: Chain | None = None
    for line in text.splitlines():
        m = _TABLE.match(line)
        if m:
            table = out.setdefault((m.group(1), m.group(2).strip('"')), {})
            chain = None
            continue
        m = _CHAIN.match(line)
        if m and table is not None:
            chain = table.setdefault(m.group(1).strip('"'), Chain())
            continue
        if chain is None:
            continue
        if line.strip() == "}":
            chain = None
            continue
        m = _HOOK.search(line)
        if m and chain.hook is None and "# handle" not in line:
            chain.hook, chain.policy = m.group(1), m.group(2) or "accept"
            continue
        m = _HANDLE.match(line)
        if m:
            chain.rules[int(m.group(2))] = m.group(1)
    return out


def list_ruleset(ns: str | None, *args: str) -> str:
    """nft's listing, run inside ns (the child inherits this thread's netns)."""
    with netns.entered(ns):
        r = subprocess.run(["nft", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RulesError(f"nft {' '.join(args)}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'failed'}")
    return r.stdout


# ---- per netns: the table, the events, the groups ----

@dataclass
class Group:
    """The trace events of one packet in one netns, in order."""
    ns: str | None
    id: int
    t: float
    key: tuple | None
    events: list[nft.TraceEvent] = field(default_factory=list)


def header_key(nfproto: int | None, network: bytes | None, transport: bytes | None) -> tuple | None:
    """(family, proto, src, dst, sport, dport, ipv4 id) of the headers of a trace event."""
    if not network:
        return None
    ver = network[0] >> 4
    if ver == 4 and len(network) >= 20:
        proto, src, dst = network[9], network[12:16], network[16:20]
        ipid: int | None = struct.unpack_from(">H", network, 4)[0]
    elif ver == 6 and len(network) >= 40:
        proto, src, dst, ipid = network[6], network[8:24], network[24:40], None
    else:
        return None
    sport = dport = None
    if proto in (6, 17) and transport and len(transport) >= 4:
        sport, dport = struct.unpack_from(">HH", transport)
    return (ver, proto, str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), sport, dport, ipid)


class NsRules:
    """pkttrace's table in one netns, its trace socket, and the rule texts there."""

    def __init__(self, ns: str | None, table: str, selects: list[list[bytes]], rate: int, burst: int):
        self.ns, self.table = ns, table
        self.ino = netns.inode(ns)
        try:
            with netns.entered(ns):     # the socket stays in the netns it was made in
                raw = nft.open_socket()
            self.sock = nft.Socket(raw)
        except OSError as e:
            raise RulesError(f"--rules needs nf_tables (netlink NETLINK_NETFILTER): {e.strerror}") from None
        try:
            self.sock.commit(table_messages(table, selects, rate=rate, burst=burst))
        except OSError as e:
            self.sock.close()
            if e.errno == 95 or e.errno == 22:     # EOPNOTSUPP / EINVAL: no owner flag before 5.12
                raise RulesError("--rules needs nftables' owned tables (NFT_TABLE_F_OWNER, Linux 5.12+): "
                                 f"the kernel refused the table ({e.strerror})") from None
            if e.errno == 2:
                raise RulesError("--rules needs nf_tables' filter chains and the limit/meta expressions "
                                 f"(nft_limit, nft_meta): {e.strerror}") from None
            raise RulesError(f"--rules: cannot add table inet {table} in netns {ns or '(host)'}: "
                             f"{e.strerror}") from None
        self.sock.subscribe()
        self.open: dict[int, Group] = {}
        self.rules: Ruleset = {}
        self._gen = -1
        self._read_at = 0.0
        self._gen_checked = 0.0
        self.events = 0

    def table_handle(self) -> int | None:
        """Our table's handle: what the fentry/kprobe backends see its chains by."""
        try:
            text = list_ruleset(self.ns, "-a", "list", "table", "inet", self.table)
        except (RulesError, OSError, netns.NetnsError, subprocess.TimeoutExpired):
            return None
        m = re.search(rf"^table inet {re.escape(self.table)} {{ # handle (\d+)", text, re.M)
        return int(m.group(1)) if m else None

    def base_of(self, family: int, table: str, chain: str) -> Chain | None:
        return self.rules.get((FAMILY_NAMES.get(family, str(family)), table), {}).get(chain)

    def refresh(self, force: bool = False) -> None:
        """Read the rule texts again (at most every REFRESH_EVERY s unless the generation moved)."""
        now = time.monotonic()
        try:
            gen = watch.nft_generation(self.ns)
        except (OSError, netns.NetnsError):
            return
        if gen == self._gen and not (force and now - self._read_at >= REFRESH_EVERY):
            return
        try:
            self.rules = parse_listing(list_ruleset(self.ns, "-a", "-s", "list", "ruleset"))
        except (RulesError, OSError, netns.NetnsError, subprocess.TimeoutExpired):
            return
        self._gen, self._read_at = gen, now

    def take(self) -> list[Group]:
        """Read the queued events; the groups they started (closing the earlier
        group of the same trace id).  Our own table's events only delimit:
        a packet enters prerouting or output through our chain first."""
        started: list[Group] = []
        now = time.monotonic()
        evs = self.sock.events()
        if evs and now - self._gen_checked >= GEN_CHECK_EVERY:
            # a table deleted and added again numbers its rules from 1 again:
            # a known handle may now be another rule (read again if the
            # generation moved; at most once a second)
            self._gen_checked = now
            self.refresh()
        for ev in evs:
            self.events += 1
            ours = ev.table == self.table and ev.family == nft.NFPROTO_INET
            g = self.open.get(ev.id)
            # our `meta nftrace set 1` with the headers: the first event of
            # a chain run that began untraced, so a new packet (the id is a
            # hash of the skb's address: a later packet may reuse it)
            if g is None or (ours and ev.chain == SELECT and ev.network is not None):
                g = Group(self.ns, ev.id, now, header_key(ev.nfproto, ev.network, ev.transport))
                self.open.pop(ev.id, None)  # re-inserted: the dict stays in order of creation
                self.open[ev.id] = g
                started.append(g)
            g.events.append(ev)
        # the groups of packets long gone (their paths claimed them or never will)
        while self.open:
            first = next(iter(self.open.values()))
            if now - first.t <= GROUP_TTL:
                break
            del self.open[first.id]
        return started

    def over_limit(self) -> int:
        """Hook passes the limit refused (the counter of `select`'s first rule)."""
        try:
            text = list_ruleset(self.ns, "list", "chain", "inet", self.table, SELECT)
        except (RulesError, OSError, netns.NetnsError, subprocess.TimeoutExpired):
            return 0
        m = re.search(r"limit rate over .*? counter packets (\d+)", text)
        return int(m.group(1)) if m else 0

    def close(self) -> None:
        self.sock.close()            # the kernel deletes the table with it


def legacy_tables(ns: str | None) -> list[str]:
    """Legacy xtables tables in ns (`ip_tables_names`, `ip6_tables_names`)."""
    out = []
    with netns.entered(ns):
        for fam, fname in (("iptables", "ip_tables_names"), ("ip6tables", "ip6_tables_names")):
            try:
                with open(f"/proc/thread-self/net/{fname}") as f:
                    out += [f"{fam} {t}" for t in f.read().split()]
            except OSError:
                continue
    return out


class RuleTracer:
    """The tables and trace sockets of every traced netns."""

    def __init__(self, pf: PacketFilter, rate: int = LIMIT_RATE, burst: int | None = None):
        self.selects = compile_filter(pf)
        self.broad = pf.expression is not None    # the expression is not compiled: more is selected
        # a tenth of a second's worth at once, by default
        self.rate, self.burst = rate, max(1, rate // 10) if burst is None else burst
        self.table = table_name()
        self.ns: dict[str | None, NsRules] = {}

    def add(self, ns: str | None) -> list[str]:
        """Our table in ns; notes to print once (legacy tables there)."""
        if ns in self.ns:
            return []
        r = self.ns[ns] = NsRules(ns, self.table, self.selects, self.rate, self.burst)
        r.refresh()
        legacy = legacy_tables(ns)
        if legacy:
            return [f"netns {ns or '(host)'} has legacy xtables tables ({', '.join(legacy)}): --rules shows no "
                    "rules of theirs (iptables-legacy does not emit nftables trace events; iptables-nft does)"]
        return []

    def drop(self, ns: str | None) -> None:
        r = self.ns.pop(ns, None)
        if r is not None:
            r.close()

    def take(self) -> list[Group]:
        out: list[Group] = []
        for r in list(self.ns.values()):
            out += r.take()
        return out

    @property
    def events(self) -> int:
        return sum(r.events for r in self.ns.values())

    @property
    def drained(self) -> bool:
        """The last take() read every queued event of every netns."""
        return all(r.sock.drained for r in self.ns.values())

    @property
    def overruns(self) -> int:
        return sum(r.sock.overruns for r in self.ns.values())

    def over_limit(self) -> int:
        return sum(r.over_limit() for r in self.ns.values())

    def close(self) -> None:
        for ns in list(self.ns):
            self.drop(ns)
