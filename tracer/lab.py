"""The built-in three-namespace lab: client <-> router <-> server.

Everything is created in-process with pyroute2 (no ``ip`` commands); only
the firewall rules are applied with ``iptables-nft``/``ip6tables-nft``/``nft``
run inside the router namespace.

Topology (``P`` = prefix, default ``ptlab``; ``N`` = net_id, default 71)::

    P-cli            P-rtr                    P-srv
    c0  ------------ rc
                     rs   ------------------- s0    (uplink 1, default route)
                     rs2  ------------------- s1    (uplink 2, policy routing)

Address plan: subnet S is 1 (client link), 2 (uplink 1) or 3 (uplink 2);
the router is host 1 on every subnet, the client/server end is host 2::

    IPv4  10.N.S.H/24
    IPv6  fdNN:S::H/64      NN = net_id in *decimal*, zero padded to 2 digits,
                            so 10.71.1.2 pairs with fd71:1::2 (hence 1..99)

``Lab.addr`` keys (each also exists with a trailing ``6`` instead of ``4``)::

    client4       c0   10.N.1.2     router_c4     rc   10.N.1.1
    router_s4     rs   10.N.2.1     server4       s0   10.N.2.2
    router_s2_4   rs2  10.N.3.1     server2_4     s1   10.N.3.2

The client routes by default via router_c4/router_c6, the server via
router_s4/router_s6 only (main table).  The server also owns server2_4 on
s1, so it *receives* on the second uplink, but its replies always leave via
s0: asymmetric on purpose, nothing fancy; policy-routing tests add rules.

The router forwards v4 and v6; rp_filter is off in all three namespaces, so
asymmetric or policy-routed traffic is not silently dropped.  The demo
ruleset (``up(rules=True)``) marks UDP dport 5001 with 0x1 in mangle
PREROUTING and drops UDP dport 5009 in filter FORWARD, for v4 and v6.
"""

from __future__ import annotations

import ipaddress
import random
import re
import select
import socket
import struct
import subprocess
import time
import zlib

from . import netns

DEFAULT_PREFIX = "ptlab"
DEFAULT_NET_ID = 71
PREFIXLEN4 = 24
PREFIXLEN6 = 64
NET_ID_RANGE = range(1, 100)

_PREFIX_RE = re.compile(r"[a-z0-9]{1,8}")
_CMD_TIMEOUT = 10.0

# One veth per row: (role_a, ifname_a, addr key_a, role_b, ifname_b, key_b,
# subnet).  The "a" end creates the pair and pushes the peer into "b".
VETHS = (
    ("client", "c0", "client4", "router", "rc", "router_c4", 1),
    ("router", "rs", "router_s4", "server", "s0", "server4", 2),
    ("router", "rs2", "router_s2_4", "server", "s1", "server2_4", 3),
)

# (iptables table, chain, match+target) -- applied for both families.
DEMO_RULES = (
    ("mangle", "PREROUTING", ("-p", "udp", "--dport", "5001", "-j", "MARK", "--set-mark", "0x1")),
    ("filter", "FORWARD", ("-p", "udp", "--dport", "5009", "-j", "DROP")),
)

ROUTER_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
}
# Set before the veths exist so "default" is inherited by them.  NODAD on
# the addresses covers the globals, accept_dad=0 also the link-locals.
# rp_filter is explicitly off everywhere: a new netns may inherit the host's
# value (net.core.devconf_inherit_init_net), and the effective value is
# max(all, interface), so "all" alone is not enough (see _create).
COMMON_SYSCTLS = {
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv4/conf/all/rp_filter": "0",
    "net/ipv4/conf/default/rp_filter": "0",
}


class LabError(Exception):
    """A one-line, human readable lab problem."""


def validate_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise LabError(f"invalid lab prefix {prefix!r}: use 1-8 characters of [a-z0-9]")
    return prefix


def net_id_for(prefix: str) -> int:
    """Stable net_id for a prefix: 71 for the default, else a crc32 pick.

    Other prefixes avoid 71 so a test lab never collides with the default
    one; distinct prefixes may still collide with each other, so pass an
    explicit net_id when running several labs at once.
    """
    validate_prefix(prefix)
    if prefix == DEFAULT_PREFIX:
        return DEFAULT_NET_ID
    choices = [n for n in NET_ID_RANGE if n != DEFAULT_NET_ID]
    return choices[zlib.crc32(prefix.encode()) % len(choices)]


def address_plan(net_id: int) -> dict[str, str]:
    """All lab addresses (without prefix length) keyed as in the docstring."""
    if not isinstance(net_id, int) or isinstance(net_id, bool) or net_id not in NET_ID_RANGE:
        raise LabError(f"invalid net_id {net_id!r}: use an integer in 1..99")
    plan = {}
    for _, _, key_a, _, _, key_b, subnet in VETHS:
        for key in (key_a, key_b):
            host = 1 if key.startswith("router") else 2
            plan[key] = f"10.{net_id}.{subnet}.{host}"
            plan[key[:-1] + "6"] = f"fd{net_id:02d}:{subnet}::{host}"
    return plan


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


class UdpServer:
    """A UDP socket bound inside a lab namespace; reading it makes the
    kernel deliver to a real process (useful for end-to-end tracing)."""

    def __init__(self, ns: str, bind_addr: str, port: int):
        self.ns, self.addr, self.port = ns, bind_addr, port
        with netns.entered(ns):
            self.sock = socket.socket(_family(bind_addr), socket.SOCK_DGRAM)
        try:
            self.sock.bind((bind_addr, port))
        except OSError as e:
            self.sock.close()
            raise LabError(f"cannot bind UDP {bind_addr} port {port} in {ns}: {e.strerror}") from None

    def recv(self, timeout: float = 1.0) -> bytes | None:
        """One datagram, or None if nothing arrives within *timeout* s."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65535)
        except (socket.timeout, OSError):
            return None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "UdpServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Lab:
    def __init__(self, prefix: str = DEFAULT_PREFIX, net_id: int | None = None):
        self.prefix = validate_prefix(prefix)
        self.net_id = net_id_for(prefix) if net_id is None else net_id
        self.addr = address_plan(self.net_id)
        self.client = f"{prefix}-cli"
        self.router = f"{prefix}-rtr"
        self.server = f"{prefix}-srv"
        self.namespaces = (self.client, self.router, self.server)
        self._servers: list[UdpServer] = []

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, net_id={self.net_id})"

    def _ns(self, role: str) -> str:
        return getattr(self, role)

    # ---- lifecycle -------------------------------------------------------

    def up(self, rules: bool = True) -> None:
        """Create the lab unless it is already complete; a half-built lab
        (e.g. from an interrupted run) is torn down and rebuilt."""
        _require_root()
        if self._missing():
            if any(netns.exists(ns) for ns in self.namespaces):
                self.down()
            try:
                self._create()
            except Exception as e:
                self.down()
                if isinstance(e, LabError):
                    raise
                raise LabError(f"cannot build lab {self.prefix!r}: {e}") from e
        if rules:
            self.apply_demo_rules()

    def down(self) -> None:
        """Delete the namespaces (their veths go with them); idempotent.

        The lab starts no processes (traffic helpers are in-process), so
        closing the UDP servers it handed out is all the cleanup there is."""
        from pyroute2 import netns as pr_netns

        for srv in self._servers:
            srv.close()
        self._servers.clear()
        errors = []
        for ns in self.namespaces:  # keep going: remove as much as we can
            if netns.exists(ns):
                try:
                    pr_netns.remove(ns)
                except OSError as e:
                    errors.append(f"cannot remove network namespace {ns!r}: {e.strerror}")
        if errors:
            raise LabError("; ".join(errors))

    def exists(self) -> bool:
        return all(netns.exists(ns) for ns in self.namespaces)

    def _create(self) -> None:
        from pyroute2 import netns as pr_netns

        for ns in self.namespaces:
            pr_netns.create(ns)
            self._sysctls(ns, COMMON_SYSCTLS)
        self._sysctls(self.router, ROUTER_SYSCTLS)
        iprs = {role: _ipr_in(self._ns(role)) for role in ("client", "router", "server")}
        try:
            for ipr in iprs.values():
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for row in VETHS:
                self._add_veth(iprs, *row)
            self._add_routes(iprs)
        finally:
            for ipr in iprs.values():
                ipr.close()
        for role_a, if_a, _, role_b, if_b, _, _ in VETHS:
            for role, ifname in ((role_a, if_a), (role_b, if_b)):
                self._sysctls(self._ns(role), {f"net/ipv4/conf/{ifname}/rp_filter": "0"})

    def _add_veth(self, iprs, role_a, if_a, key_a, role_b, if_b, key_b, _subnet) -> None:
        from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

        iprs[role_a].link("add", ifname=if_a, kind="veth",
                          peer={"ifname": if_b, "net_ns_fd": netns.path(self._ns(role_b))})
        for role, ifname, key in ((role_a, if_a, key_a), (role_b, if_b, key_b)):
            ipr = iprs[role]
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, state="up")
            ipr.addr("add", index=idx, address=self.addr[key], prefixlen=PREFIXLEN4)
            # NODAD: otherwise the v6 address stays "tentative" for ~1-2 s
            # and the first pings/binds of a test fail.
            ipr.addr("add", index=idx, address=self.addr[key[:-1] + "6"],
                     prefixlen=PREFIXLEN6, flags=IFA_F_NODAD)

    def _add_routes(self, iprs) -> None:
        a = self.addr
        for role, gw4, gw6 in (("client", a["router_c4"], a["router_c6"]),
                               ("server", a["router_s4"], a["router_s6"])):
            iprs[role].route("add", dst="0.0.0.0/0", gateway=gw4)
            iprs[role].route("add", dst="::/0", gateway=gw6, family=socket.AF_INET6)

    def _sysctls(self, ns: str, values: dict[str, str]) -> None:
        # /proc/sys/net is resolved against the netns of the *opening
        # thread*, so writing it after setns() configures that namespace.
        with netns.entered(ns):
            for key, value in values.items():
                try:
                    with open(f"/proc/sys/{key}", "w") as f:
                        f.write(value)
                except OSError as e:
                    raise LabError(f"cannot set {key.replace('/', '.')}={value} in {ns}: {e.strerror}") from None

    # ---- inspection ------------------------------------------------------

    def _missing(self) -> list[str]:
        """What a complete lab has and this one lacks (empty = complete)."""
        missing = [ns for ns in self.namespaces if not netns.exists(ns)]
        if missing:
            return missing
        have = {ns: self._ns_status(ns)["links"] for ns in self.namespaces}
        for role_a, if_a, key_a, role_b, if_b, key_b, _ in VETHS:
            for role, ifname, key in ((role_a, if_a, key_a), (role_b, if_b, key_b)):
                addrs = have[self._ns(role)].get(ifname, {}).get("addresses", [])
                for k in (key, key[:-1] + "6"):
                    if self.addr[k] not in addrs:
                        missing.append(f"{self._ns(role)}:{ifname}:{self.addr[k]}")
        return missing

    def _ns_status(self, ns: str) -> dict:
        with _ipr_in(ns) as ipr:
            links = {}
            for msg in ipr.get_links():
                links[msg.get_attr("IFLA_IFNAME")] = {
                    "index": msg["index"],
                    "up": bool(msg["flags"] & 1),
                    "addresses": [],
                }
            by_index = {v["index"]: v for v in links.values()}
            for msg in ipr.get_addr():
                if msg["index"] in by_index:
                    by_index[msg["index"]]["addresses"].append(msg.get_attr("IFA_ADDRESS"))
        return {"exists": True, "inode": netns.inode(ns), "links": links}

    def status(self) -> dict:
        """Which namespaces exist, their links/addresses, demo rules present."""
        namespaces = {}
        for ns in self.namespaces:
            namespaces[ns] = self._ns_status(ns) if netns.exists(ns) else {"exists": False}
        router_up = namespaces[self.router]["exists"]
        return {
            "prefix": self.prefix,
            "net_id": self.net_id,
            "addr": dict(self.addr),
            "namespaces": namespaces,
            "complete": not self._missing(),
            "rules": router_up and self.rules_present(),
        }

    # ---- firewall --------------------------------------------------------

    def _run_in(self, ns: str, argv: list[str], what: str) -> str:
        if not netns.exists(ns):
            raise LabError(f"lab namespace {ns!r} does not exist (run the lab up first)")
        try:
            res = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                                 text=True, timeout=_CMD_TIMEOUT)
        except FileNotFoundError as e:
            raise LabError(f"{what}: command not found: {e.filename}") from None
        except subprocess.TimeoutExpired:
            raise LabError(f"{what}: timed out after {_CMD_TIMEOUT:.0f} s") from None
        if res.returncode != 0:
            msg = " ".join(res.stderr.split()) or f"exit status {res.returncode}"
            raise LabError(f"{what} failed in {ns}: {msg}")
        return res.stdout

    def iptables(self, *args: str, v6: bool = False) -> str:
        """Run iptables-nft (ip6tables-nft if v6) in the router; stdout."""
        tool = "ip6tables-nft" if v6 else "iptables-nft"
        return self._run_in(self.router, [tool, *map(str, args)], f"{tool} {' '.join(map(str, args))}")

    def apply_rules(self, family: int | str, argv_list: list[list[str]]) -> None:
        """Run several iptables argvs for *family* (4/6, "ipv4"/"ipv6" or
        AF_INET/AF_INET6) in the router, stopping at the first failure."""
        v6 = family in (6, "6", "ipv6", "inet6", socket.AF_INET6)
        for argv in argv_list:
            self.iptables(*argv, v6=v6)

    def ip(self, ns: str, *args) -> str:
        """Run ip(8) in one of the lab's namespaces (routes and rules of a scenario)."""
        self._check(ns)
        return self._run_in(ns, ["ip", *map(str, args)], f"ip {' '.join(map(str, args))}")

    def nft(self, *args: str) -> str:
        return self._run_in(self.router, ["nft", *map(str, args)], f"nft {' '.join(map(str, args))}")

    def flush_rules(self) -> None:
        """Remove every nft table (iptables-nft ones included) in the router."""
        self.nft("flush", "ruleset")

    def _rule_present(self, table: str, chain: str, spec: tuple, v6: bool) -> bool:
        try:
            self.iptables("-t", table, "-C", chain, *spec, v6=v6)
            return True
        except LabError:
            return False

    def rules_present(self) -> bool:
        return all(self._rule_present(t, c, s, v6) for v6 in (False, True) for t, c, s in DEMO_RULES)

    def apply_demo_rules(self) -> None:
        """Add the demo ruleset; rules already present are not duplicated."""
        for v6 in (False, True):
            for table, chain, spec in DEMO_RULES:
                if not self._rule_present(table, chain, spec, v6):
                    self.iptables("-t", table, "-A", chain, *spec, v6=v6)

    # ---- traffic ---------------------------------------------------------

    def _check(self, ns: str, dst: str | None = None) -> None:
        # Traffic helpers only ever talk to the lab's own addresses.
        if ns not in self.namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab ({', '.join(self.namespaces)})")
        if dst is not None and dst not in self.addr.values():
            raise LabError(f"{dst!r} is not a lab address (see Lab.addr)")

    def ping(self, ns: str, dst: str, count: int = 1, timeout: float = 2.0) -> int:
        """ICMP echo from *ns* to *dst*; returns the number of replies.

        Done in-process with a raw socket rather than ping(8), which is not
        installed everywhere; requests go out every 0.2 s and replies are
        awaited until *timeout* s after the last request.
        """
        self._check(ns, dst)
        if not 1 <= count <= 100:
            raise LabError("ping count must be within 1..100")
        with netns.entered(ns):
            sock = _icmp_socket(dst)
        with sock:
            return _ping(sock, dst, count, timeout)

    def udp_send(self, ns: str, dst: str, dport: int, payload: bytes = b"x",
                 count: int = 1, sport: int | None = None) -> None:
        self._check(ns, dst)
        if not 1 <= count <= 10000:
            raise LabError("udp_send count must be within 1..10000")
        fam = _family(dst)
        with netns.entered(ns):
            sock = socket.socket(fam, socket.SOCK_DGRAM)
        with sock:
            if sport is not None:
                sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
            for _ in range(count):
                sock.sendto(payload, (dst, dport))

    def udp_server(self, ns: str, bind_addr: str, port: int) -> UdpServer:
        self._check(ns)
        srv = UdpServer(ns, bind_addr, port)
        self._servers.append(srv)
        return srv


def _ipr_in(ns: str):
    from pyroute2 import IPRoute

    # The netlink socket stays in the namespace it was created in; this
    # avoids pyroute2's netns= mode, which forks a helper per socket.
    with netns.entered(ns):
        return IPRoute()


def _require_root() -> None:
    """CAP_NET_ADMIN and CAP_SYS_ADMIN (netns, links, rules; mounting the
    netns names), as the effective set says: not uid 0."""
    from . import caps
    try:
        lacking = caps.missing((caps.CAP_NET_ADMIN, caps.CAP_SYS_ADMIN), caps.effective())
    except caps.CapsError as e:
        raise LabError(str(e)) from None
    if lacking:
        raise LabError(f"the lab needs {' and '.join(lacking)}: run as root")


# ---- in-process ping -------------------------------------------------------

def _icmp_socket(dst: str) -> socket.socket:
    if _family(dst) == socket.AF_INET6:
        # For ICMPv6 raw sockets the kernel fills in the checksum itself.
        return socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _echo_request(v6: bool, ident: int, seq: int) -> bytes:
    kind = 128 if v6 else 8
    payload = b"pkttrace-lab-ping"
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    if v6:
        return msg
    return msg[:2] + struct.pack("!H", _checksum(msg)) + msg[4:]


def _parse_reply(data: bytes, v6: bool) -> tuple[int, int] | None:
    """(ident, seq) of an echo reply, else None.  IPv4 raw sockets hand us
    the IP header too; IPv6 ones do not."""
    if not v6:
        data = data[(data[0] & 0x0F) * 4:] if data else data
    if len(data) < 8 or data[0] != (129 if v6 else 0):
        return None
    _, _, _, ident, seq = struct.unpack("!BBHHH", data[:8])
    return ident, seq


def _ping(sock: socket.socket, dst: str, count: int, timeout: float) -> int:
    v6 = sock.family == socket.AF_INET6
    # Raw sockets see every ICMP packet in the namespace: match our own id.
    ident = random.randrange(1, 0x10000)
    got: set[int] = set()
    next_send, sent = time.monotonic(), 0
    deadline = next_send + 0.2 * (count - 1) + timeout
    while len(got) < count:
        now = time.monotonic()
        if sent < count and now >= next_send:
            try:
                sock.sendto(_echo_request(v6, ident, sent), (dst, 0))
            except OSError:
                pass  # e.g. no route: counts as lost, like ping(8)
            sent, next_send = sent + 1, now + 0.2
        wait = min(deadline, next_send if sent < count else deadline) - time.monotonic()
        if wait <= 0 and sent >= count:
            break
        if select.select([sock], [], [], max(wait, 0))[0]:
            reply = _parse_reply(sock.recv(65535), v6)
            if reply and reply[0] == ident and reply[1] < count:
                got.add(reply[1])
    return len(got)
