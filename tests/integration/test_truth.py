"""Ground truth: what the kernel really did, checked against what pkttrace says.

Each test builds its own lab (no demo rules, no netfilter rules at all),
makes the kernel do one thing for certain -- a routing failure, a REJECT, a
tc redirect, a tbf drop, a reassembly, an ECMP choice -- checks with the
kernel's own tools (tc -s, tcpdump, the receiving socket, connect()'s error)
that the set-up really did it, and then asserts on the JSON of the exact
packet pkttrace reported, identified by its addresses, ports and protocol.

Records that belong together point at each other by id: `cause` (the packet
whose processing made the kernel generate this one: an ICMP error, a TCP
RST), `next`/`prev` (the same packet in the next/previous traced netns) and
`reassembled` (the packet a fragment became).

Set PKTTRACE_TRUTH_DOCS=FILE to append the human view of each case's key
packets to FILE (a heading per case, then the text): the docs page is built
from it.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import time

import pytest

from tracer import netns
from tracer.filters import PacketFilter, parse_cidr
from tracer.lab import VETHS
from tracer.output import format_packet
from tracer.model import packet_json
from tracer.recording import Recorder, replay

pytestmark = pytest.mark.root

ICMP, TCP, UDP, ICMP6 = 1, 6, 17, 58
DOCS_ENV = "PKTTRACE_TRUTH_DOCS"


# ---- set-up helpers ---------------------------------------------------------

class SetupError(AssertionError):
    """A lab set-up command failed: the test is wrong, not pkttrace."""


def run_in(ns: str, *argv, timeout: float = 10.0) -> str:
    """Run a command inside netns `ns`; its stdout, or SetupError with stderr."""
    argv = [str(a) for a in argv]
    try:
        res = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SetupError(f"set-up: `{' '.join(argv)}` in {ns} timed out after {timeout} s") from None
    if res.returncode != 0:
        raise SetupError(f"set-up: `{' '.join(argv)}` in {ns} failed: {res.stderr.strip() or res.returncode}")
    return res.stdout


def sysctl(ns: str, **values) -> None:
    """sysctl(ns, net__ipv4__icmp_ratelimit=0): `__` stands for `/`."""
    with netns.entered(ns):  # /proc/sys/net is the opening thread's netns
        for key, value in values.items():
            path = "/proc/sys/" + key.replace("__", "/")
            with open(path, "w") as f:
                f.write(str(value))


def mac_of(lab, ns: str, ifname: str) -> str:
    return json.loads(lab.ip(ns, "-j", "link", "show", "dev", ifname))[0]["address"]


def pin_neighbours(lab) -> None:
    """Permanent ARP/ND entries on every lab link, both ways: no neighbour
    resolution traffic at all, so the only packets on a link are the test's
    own (and an ICMPv6 error to the client cannot be confused with an NA)."""
    for role_a, if_a, key_a, role_b, if_b, key_b, _ in VETHS:
        ns_a, ns_b = getattr(lab, role_a), getattr(lab, role_b)
        mac_a, mac_b = mac_of(lab, ns_a, if_a), mac_of(lab, ns_b, if_b)
        for ns, ifname, peer_key, peer_mac in ((ns_a, if_a, key_b, mac_b), (ns_b, if_b, key_a, mac_a)):
            for key in (peer_key, peer_key[:-1] + "6"):
                lab.ip(ns, "neigh", "replace", lab.addr[key], "lladdr", peer_mac, "dev", ifname, "nud", "permanent")


def snmp(ns: str, group: str) -> dict[str, int]:
    """The kernel's own counters (/proc/net/snmp) of netns ns, e.g. group "Ip"."""
    with netns.entered(ns):  # /proc/thread-self/net: the calling thread's netns
        with open("/proc/thread-self/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith(group + ":")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}


def router_addresses(lab) -> set[str]:
    return {a for k, a in lab.addr.items() if k.startswith("router")}


def extra_addr(lab, family: int, subnet: int = 99) -> str:
    """An address in the lab's range that no interface has (10.N.99.1, fdNN:99::1)."""
    return f"10.{lab.net_id}.{subnet}.1" if family == 4 else f"fd{lab.net_id:02d}:{subnet}::1"


def fam_key(name: str, family: int) -> str:
    """`server4` -> `server6` for family 6 (Lab.addr keys)."""
    return name[:-1] + str(family)


# ---- traffic helpers --------------------------------------------------------

def _family_of(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def udp_from(ns: str, dst: str, dport: int, payload: bytes = b"x", sport: int | None = None,
             ttl: int | None = None) -> None:
    """One datagram from a socket inside `ns` (to any address, unlike Lab.udp_send)."""
    fam = _family_of(dst)
    with netns.entered(ns):
        sock = socket.socket(fam, socket.SOCK_DGRAM)
    with sock:
        if sport is not None:
            sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        if ttl is not None:
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        sock.sendto(payload, (dst, dport))


def tcp_connect(ns: str, dst: str, dport: int, timeout: float = 3.0) -> Exception | None:
    """A real connect() from inside ns; the error it ended with (None: connected)."""
    with netns.entered(ns):
        sock = socket.socket(_family_of(dst), socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((dst, dport))
        except OSError as e:
            return e
    return None


# ---- capture helpers --------------------------------------------------------

def pj(p) -> dict:
    """The packet as the JSON output prints it."""
    return json.loads(packet_json(p))


def stage_json(d: dict, name: str) -> dict | None:
    return next((s for s in d["path"] if s["stage"] == name), None)


def names(d: dict) -> list[str]:
    return [s["stage"] for s in d["path"]]


def is_flow(p, src=None, dst=None, proto=None, dport=None, sport=None, netns_name=None, fate=None) -> bool:
    """Does packet p have these addresses/ports/protocol (None = any)?"""
    checks = ((src, p.src), (dst, p.dst), (proto, p.proto_num), (dport, p.dport), (sport, p.sport),
              (netns_name, p.netns), (fate, p.fate))
    return all(want is None or (want(got) if callable(want) else want == got) for want, got in checks)


def wait_for(cap, cond, timeout: float) -> bool:
    """Poll the tracer until cond() holds (True) or timeout seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        cap.packets.extend(cap.tracer.poll(0.1))
    return True


def seen(cap) -> list:
    return [(p.id, p.netns, p.fate, p.proto, p.src, p.sport, p.dst, p.dport) for p in cap.packets]


def linked_error(cap, lab, client: str, proto: int, src=None):
    """The one error packet (ICMP error / RST) the router sent back to `client`."""
    src = src or (lambda a: a in router_addresses(lab))
    return cap.until(lambda p: is_flow(p, src=src, dst=client, proto=proto, fate="sent"))


# ---- the docs page ----------------------------------------------------------

@pytest.fixture
def doc():
    """doc(heading, *packets): append the human view of key packets to $PKTTRACE_TRUTH_DOCS."""
    def write(heading: str, *packets, note: str = "") -> None:
        path = os.environ.get(DOCS_ENV)
        if not path:
            return
        with open(path, "a") as f:
            f.write(f"## {heading}\n\n")
            if note:
                f.write(note.strip() + "\n\n")
            f.write("```\n" + "\n\n".join(format_packet(p) for p in packets) + "\n```\n\n")
    return write


@pytest.fixture
def lab(make_lab):
    """Each test its own lab: no netfilter rules, neighbours pinned, and no
    ICMP rate limit in the router (errors are what several tests look at)."""
    new = make_lab(rules=False)
    new.flush_rules()
    pin_neighbours(new)
    sysctl(new.router, net__ipv4__icmp_ratelimit=0, net__ipv6__icmp__ratelimit=0)
    return new


# ---- tc helpers ---------------------------------------------------------------

def tc(lab, *args) -> str:
    return run_in(lab.router, "tc", *args)


def u32_udp_dport(port: int) -> list[str]:
    return ["protocol", "ip", "u32", "match", "ip", "protocol", "17", "0xff", "match", "ip", "dport", str(port),
            "0xffff"]


def action_stats(tc_out: str, kind: str) -> int:
    """Packets an action of `kind` (e.g. "Redirect", "Mirror") handled, from `tc -s filter show`."""
    m = re.search(rf"mirred \(Egress {kind} to device \S+\).*?Sent \d+ bytes (\d+) pkt", tc_out, re.S)
    if not m:
        raise SetupError(f"set-up: no mirred {kind} action statistics in:\n{tc_out}")
    return int(m.group(1))


def qdisc_stats(tc_out: str) -> dict:
    """Sent/dropped/backlog of the first qdisc in `tc -s qdisc show` output."""
    m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+) requeues (\d+)\)\s*"
                  r"backlog (\S+) (\d+)p", tc_out)
    if not m:
        raise SetupError(f"set-up: cannot read qdisc statistics from:\n{tc_out}")
    return {"sent": int(m.group(2)), "dropped": int(m.group(3)), "backlog": int(m.group(7))}


def add_tc_drop(lab, dev: str, port: int) -> str:
    """A tc ingress filter that drops UDP to `port` (TC_ACT_SHOT); which kind it used.

    `action drop` needs act_gact; kernels without it (this CI's has only
    u32, cls_bpf and mirred) get the same verdict from a classic BPF program
    in direct-action mode: tcpdump compiles the match, its returns become
    TC_ACT_SHOT (match) and TC_ACT_UNSPEC (no match: next filter)."""
    try:
        tc(lab, "filter", "add", "dev", dev, "ingress", "prio", "1", *u32_udp_dport(port), "action", "drop")
        return "gact"
    except SetupError as e:
        if "action module" not in str(e):  # "Failed to load TC action module": no act_gact
            raise
    out = subprocess.run(["tcpdump", "-ddd", "-y", "EN10MB", f"ip and udp dst port {port}"], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    insns = []
    for line in filter(None, (x.strip() for x in out[1:])):
        code, jt, jf, k = map(int, line.split())
        if code == 6:  # BPF_RET|BPF_K
            k = 2 if k else 0xFFFFFFFF  # TC_ACT_SHOT / TC_ACT_UNSPEC
        insns.append(f"{code} {jt} {jf} {k}")
    tc(lab, "filter", "add", "dev", dev, "ingress", "prio", "1", "protocol", "ip", "bpf", "bytecode",
       f"{len(insns)}," + ",".join(insns), "da")
    return "cls_bpf"


# ---- tcpdump (ECMP ground truth) ------------------------------------------------

class Tcpdump:
    """tcpdump -i IFACE in a netns, text output to a file; started and confirmed
    capturing before traffic, stopped (by its own pid) afterwards."""

    def __init__(self, ns: str, iface: str, expr: str, tmp_path):
        self.iface = iface
        self.out_path, self.err_path = tmp_path / f"tcpdump-{iface}.out", tmp_path / f"tcpdump-{iface}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        argv = ["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-nn", "-l", "-p", expr]
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while "listening on" not in self.err_path.read_text():  # printed once capturing
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SetupError(f"set-up: tcpdump -i {iface} in {ns} did not start: {self.err_path.read_text()}")
            time.sleep(0.02)

    def sports(self) -> set[int]:
        """Source ports of the UDP packets seen so far."""
        out = set()
        for line in self.out_path.read_text().splitlines():
            m = re.search(r" IP6? (\S+)\.(\d+) > (\S+)\.(\d+): UDP", line)
            if m:
                out.add(int(m.group(2)))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()
        self._err.close()


# ==== routing drops ==========================================================

# (route type to add, or None for no route at all) -> (route.type, route.err)
ROUTE_FAILURES = {
    None: ("unreachable", "ENETUNREACH"),
    "unreachable": ("unreachable", "EHOSTUNREACH"),
    "prohibit": ("prohibit", "EACCES"),
}


def _route_drop(lab, trace, family: int, kind: str | None, dport: int):
    """Send UDP from the client to an address the router cannot route; the drop."""
    dst = extra_addr(lab, family)
    if kind is not None:
        prefix = f"{dst}/{32 if family == 4 else 128}"
        lab.ip(lab.router, f"-{family}", "route", "add", kind, prefix)
    cap = trace()
    udp_from(lab.client, dst, dport)
    client = lab.addr[fam_key("client4", family)]
    dropped = cap.until(lambda p: is_flow(p, src=client, dst=dst, proto=UDP, dport=dport))
    return cap, client, dropped


@pytest.mark.parametrize("kind", [None, "unreachable", "prohibit"], ids=["no-route", "unreachable", "prohibit"])
@pytest.mark.parametrize("family", [4, 6])
def test_route_drop_shows_route_stage_and_linked_icmp_error(lab, trace, doc, family, kind):
    cap, client, p = _route_drop(lab, trace, family, kind, 5010)
    err = linked_error(cap, lab, client, ICMP if family == 4 else ICMP6)

    d, e = pj(p), pj(err)
    want_type, want_err = ROUTE_FAILURES[kind]
    assert d["fate"] == "dropped", d
    assert d["drop"]["stage"] == "route", d["drop"]
    assert "dev" in d["drop"], d["drop"]
    route = stage_json(d, "route")
    assert route is not None, names(d)
    assert (route["route"]["type"], route["route"]["err"]) == (want_type, want_err), route["route"]
    assert e["fate"] == "sent" and e["proto"] == ("icmp" if family == 4 else "icmpv6"), e
    assert e["dst"] == client
    assert e.get("cause") == d["id"], e
    assert f"in reply to #{d['id']}" in format_packet(err)
    doc(f"Routing drop: {kind or 'no route'} (IPv{family}) and the ICMP error it caused", p, err)


@pytest.mark.parametrize("family", [4, 6])
def test_blackhole_route_drop_shows_route_stage_and_sends_no_icmp(lab, trace, doc, family):
    cap, client, p = _route_drop(lab, trace, family, "blackhole", 5011)
    cap.settle(0.5)  # a negative check: nothing may follow
    errors = [q for q in cap.packets if q.dst == client and q.proto_num in (ICMP, ICMP6)]

    d = pj(p)
    assert d["fate"] == "dropped" and d["drop"]["stage"] == "route", d
    route = stage_json(d, "route")
    assert route is not None, names(d)
    assert (route["route"]["type"], route["route"]["err"]) == ("blackhole", "EINVAL"), route["route"]
    assert errors == [], seen(cap)
    doc(f"Routing drop: blackhole (IPv{family}), no ICMP error", p)


@pytest.mark.parametrize("family", [4, 6])
def test_ttl_expiry_drops_after_route_before_forward_hook_with_linked_time_exceeded(lab, trace, doc, family):
    client, server = lab.addr[fam_key("client4", family)], lab.addr[fam_key("server4", family)]
    cap = trace()
    udp_from(lab.client, server, 5040, ttl=1)
    p = cap.until(lambda p: is_flow(p, src=client, dst=server, proto=UDP, dport=5040))
    err = linked_error(cap, lab, client, ICMP if family == 4 else ICMP6)

    d, e = pj(p), pj(err)
    assert d["fate"] == "dropped", d
    route = stage_json(d, "route")
    assert route is not None and route["route"]["type"] == "unicast" and route["route"]["err"] is None, names(d)
    assert "forward" not in names(d), names(d)
    assert d["drop"]["stage"] == "forward", d["drop"]
    assert e["fate"] == "sent" and e.get("cause") == d["id"], e
    doc(f"TTL expiry on forward (IPv{family}) and the time-exceeded error", p, err)


# ==== routing decisions ======================================================

ECMP_FLOWS = 32


@pytest.mark.parametrize("style", ["multipath", "nhid"])
@pytest.mark.parametrize("family", [4, 6])
def test_ecmp_route_stage_names_the_nexthop_the_kernel_chose(lab, trace, doc, tmp_path, family, style):
    a = lab.addr
    dst = extra_addr(lab, family)
    plen = 32 if family == 4 else 128
    gw = {"rs": a[fam_key("server4", family)], "rs2": a[fam_key("server2_4", family)]}
    seen_on = {"rs": "s0", "rs2": "s1"}  # router uplink -> server interface tcpdump watches
    lab.ip(lab.server, "addr", "add", f"{dst}/{plen}", "dev", "lo", *(["nodad"] if family == 6 else []))
    srv = lab.udp_server(lab.server, dst, 5050)  # no ICMP port unreachable noise
    if style == "multipath":
        lab.ip(lab.router, f"-{family}", "route", "add", f"{dst}/{plen}",
               "nexthop", "via", gw["rs"], "dev", "rs", "nexthop", "via", gw["rs2"], "dev", "rs2")
    else:
        base = 100 * family
        lab.ip(lab.router, "nexthop", "add", "id", base + 1, "via", gw["rs"], "dev", "rs")
        lab.ip(lab.router, "nexthop", "add", "id", base + 2, "via", gw["rs2"], "dev", "rs2")
        lab.ip(lab.router, "nexthop", "add", "id", base, "group", f"{base + 1}/{base + 2}")
        lab.ip(lab.router, f"-{family}", "route", "add", f"{dst}/{plen}", "nhid", base)
    sysctl(lab.router, net__ipv4__fib_multipath_hash_policy=1, net__ipv6__fib_multipath_hash_policy=1)

    dumps = {dev: Tcpdump(lab.server, iface, f"udp and dst host {dst} and dst port 5050", tmp_path)
             for dev, iface in seen_on.items()}
    try:
        cap = trace(filter=PacketFilter(dst=parse_cidr(dst), proto=UDP))
        sports = list(range(42000, 42000 + ECMP_FLOWS))
        for sport in sports:
            udp_from(lab.client, dst, 5050, sport=sport)
        # every flow seen by tcpdump and reported by pkttrace
        assert wait_for(cap, lambda: set(sports) <= set().union(*(t.sports() for t in dumps.values())), 10), \
            {dev: sorted(t.sports()) for dev, t in dumps.items()}
        ok = wait_for(cap, lambda: set(sports) <= {p.sport for p in cap.packets if p.dst == dst}, 10)
    finally:
        for t in dumps.values():
            t.stop()
    srv.close()
    truth = {sport: dev for dev, t in dumps.items() for sport in t.sports()}
    assert set(truth.values()) == {"rs", "rs2"}, f"set-up: the kernel used one uplink only: {truth}"
    assert ok, seen(cap)

    by_sport = {p.sport: p for p in cap.packets if p.dst == dst and p.fate == "forwarded"}
    assert sorted(by_sport) == sports, seen(cap)
    chose = {}
    for sport, p in by_sport.items():
        route = stage_json(pj(p), "route")
        assert route is not None, names(pj(p))
        r = route["route"]
        chose[sport] = (r["dev"], r["gw"] and str(ipaddress.ip_address(r["gw"])), p.out_dev)
    want = {sport: (dev, str(ipaddress.ip_address(gw[dev])), dev) for sport, dev in truth.items()}
    assert chose == want
    first = {dev: next(p for s, p in sorted(by_sport.items()) if truth[s] == dev) for dev in ("rs", "rs2")}
    doc(f"ECMP (IPv{family}, {'nexthop group via nhid' if style == 'nhid' else 'multipath route'}): "
        "one flow on each uplink", first["rs"], first["rs2"])


@pytest.mark.parametrize("family", [4, 6])
def test_local_destination_without_rules_is_local_table_and_type(lab, trace, doc, family):
    client, router = lab.addr[fam_key("client4", family)], lab.addr[fam_key("router_c4", family)]
    proto = ICMP if family == 4 else ICMP6
    cap = trace(filter=PacketFilter(proto=proto))
    assert lab.ping(lab.client, router) == 1
    p = cap.until(lambda p: is_flow(p, src=client, dst=router, proto=proto))

    d = pj(p)
    assert d["fate"] == "delivered", d
    route = stage_json(d, "route")
    assert route is not None, names(d)
    assert route["route"]["tables"] == ["local"], route["route"]
    assert route["route"]["type"] == "local", route["route"]
    doc(f"Local destination, no ip rules (IPv{family})", p)


# ==== conntrack ==============================================================

def test_ipv6_raw_notrack_is_untracked_in_hooks_and_tables(lab, trace, doc):
    client, server = lab.addr["client6"], lab.addr["server6"]
    lab.iptables("-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "5005", "-j", "NOTRACK", v6=True)
    # a conntrack user, so that conntrack runs in this netns
    lab.iptables("-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP", v6=True)
    cap = trace(filter=PacketFilter(proto=UDP))
    udp_from(lab.client, server, 5005)
    udp_from(lab.client, server, 5006)
    untracked = cap.until(lambda p: is_flow(p, src=client, dst=server, dport=5005, fate="forwarded"))
    tracked = cap.until(lambda p: is_flow(p, src=client, dst=server, dport=5006, fate="forwarded"))

    d, t = pj(untracked), pj(tracked)
    for name in ("prerouting", "forward", "postrouting"):
        s = stage_json(d, name)
        assert s is not None and s["ct"] == "untracked", (name, s)
    pre = stage_json(d, "prerouting")["tables"]
    assert pre and pre[0]["table"] == "raw", pre
    assert [x["ct"] for x in pre] == ["untracked"] * len(pre), pre
    assert [x["ct"] for x in stage_json(d, "forward")["tables"]] == ["untracked"], stage_json(d, "forward")
    assert stage_json(t, "forward")["ct"] == "new"
    doc("IPv6 raw NOTRACK: untracked from the raw table on", untracked)


# ==== filters see the whole packet =============================================

def test_filter_on_dnat_target_shows_the_whole_path_live_and_in_replay(lab, trace, doc, tmp_path):
    a = lab.addr
    lab.iptables("-t", "nat", "-A", "PREROUTING", "-p", "udp", "-d", a["router_c4"], "--dport", "8080",
                 "-j", "DNAT", "--to-destination", f"{a['server4']}:5002")
    flt = PacketFilter(dst=parse_cidr(a["server4"]), port=5002)
    cap = trace(filter=flt)
    recording = tmp_path / "dnat.jsonl"
    with open(recording, "w") as rec_file:
        cap.tracer.on_raw = Recorder(rec_file, cap.tracer.ctx)
        with lab.udp_server(lab.server, a["server4"], 5002) as srv:
            lab.udp_send(lab.client, a["router_c4"], 8080, b"to be translated", sport=40100)
            assert srv.recv(2.0) == b"to be translated", "set-up: DNAT did not deliver to the server"
            p = cap.until(lambda p: is_flow(p, src=a["client4"], sport=40100, proto=UDP))
        rec_file.flush()
        cap.tracer.on_raw = None

    d = pj(p)
    assert d["fate"] == "forwarded", d
    # the first stage: received on rc (tc ingress marks the receive, or
    # netif_receive_skb where the kernel has no tc observers)
    assert names(d)[0] == cap.rx and d["path"][0]["dev"] == "rc", names(d)
    assert not d.get("late_match"), d
    assert not p.late_match
    nat = [t for t in stage_json(d, "prerouting")["tables"] if "dst" in t]
    assert [t["dst"] for t in nat] == [{"from": f"{a['router_c4']}:8080", "to": f"{a['server4']}:5002"}], nat

    with open(recording) as f:
        recorded = list(replay(f))
    assert [q.id for q in recorded] == [p.id], "set-up: the recording does not hold exactly the live packet"
    again = [q for q in recorded if flt.matches(q)]
    assert len(again) == 1, f"replay with the same filter dropped #{p.id} (sport/dport {p.sport}/{p.dport})"
    r = pj(again[0])
    assert names(r) == names(d)
    assert {k: v for k, v in r.items() if k != "process"} == {k: v for k, v in d.items() if k != "process"}
    doc("A filter on the DNAT target shows the packet from its first stage", p)


# ==== REJECT ====================================================================

@pytest.mark.parametrize("family", [4, 6])
def test_reject_udp_drops_with_reject_verdict_and_linked_icmp_error(lab, trace, doc, family):
    client, server = lab.addr[fam_key("client4", family)], lab.addr[fam_key("server4", family)]
    with_ = ["--reject-with", "icmp-port-unreachable"] if family == 4 else []
    lab.iptables("-A", "FORWARD", "-p", "udp", "--dport", "5020", "-j", "REJECT", *with_, v6=family == 6)
    cap = trace()
    udp_from(lab.client, server, 5020)
    p = cap.until(lambda p: is_flow(p, src=client, dst=server, proto=UDP, dport=5020))
    err = linked_error(cap, lab, client, ICMP if family == 4 else ICMP6)

    d, e = pj(p), pj(err)
    assert d["fate"] == "dropped", d
    assert (d["drop"]["stage"], d["drop"]["table"]) == ("forward", "filter"), d["drop"]
    filt = [t for t in stage_json(d, "forward")["tables"] if t["table"] == "filter"]
    assert [t["verdict"] for t in filt] == ["reject"], stage_json(d, "forward")
    assert e["fate"] == "sent" and e["proto"] == ("icmp" if family == 4 else "icmpv6"), e
    assert e.get("cause") == d["id"], e
    assert f"in reply to #{d['id']}" in format_packet(err)
    doc(f"iptables REJECT (IPv{family} UDP) and the ICMP error it sent", p, err)


@pytest.mark.parametrize("family", [4, 6])
def test_reject_tcp_reset_drops_syn_with_reject_verdict_and_linked_rst(lab, trace, doc, family):
    client, server = lab.addr[fam_key("client4", family)], lab.addr[fam_key("server4", family)]
    lab.iptables("-A", "FORWARD", "-p", "tcp", "--dport", "5021", "-j", "REJECT", "--reject-with", "tcp-reset",
                 v6=family == 6)
    cap = trace(filter=PacketFilter(proto=TCP))
    outcome = tcp_connect(lab.client, server, 5021)
    assert isinstance(outcome, ConnectionRefusedError), f"set-up: connect() ended with {outcome!r}, not a RST"
    syn = cap.until(lambda p: is_flow(p, src=client, dst=server, proto=TCP, dport=5021))
    # the RST carries the server's address: the router forges it
    rst = linked_error(cap, lab, client, TCP, src=server)

    d, r = pj(syn), pj(rst)
    assert d["fate"] == "dropped", d
    filt = [t for t in stage_json(d, "forward")["tables"] if t["table"] == "filter"]
    assert [t["verdict"] for t in filt] == ["reject"], stage_json(d, "forward")
    assert r["fate"] == "sent" and (r["sport"], r["dport"]) == (5021, d["sport"]), r
    assert r.get("cause") == d["id"], r
    assert f"in reply to #{d['id']}" in format_packet(rst)
    doc(f"iptables REJECT --reject-with tcp-reset (IPv{family}) and the RST it sent", syn, rst)


# ==== tc ===========================================================================

def _tc_stage(d: dict, name: str) -> dict:
    s = stage_json(d, name)
    assert s is not None, names(d)
    return s


def _need_tc_stages():
    """tc verdicts are seen by tc observers, which need the kfunc
    bpf_cast_to_kern_ctx (Linux 6.2+): skip where the kernel lacks it."""
    from tracer import backends
    if not backends.probe().cast_kfunc:
        pytest.skip("no tc stages on this kernel: kfunc bpf_cast_to_kern_ctx missing (Linux 6.2+)")


def mirred_on_rc_ingress(lab, dport: int, action: str, dev: str) -> None:
    """On the router's rc ingress: UDP to dport gets `mirred egress <action> dev <dev>`."""
    tc(lab, "qdisc", "add", "dev", "rc", "clsact")
    tc(lab, "filter", "add", "dev", "rc", "ingress", "prio", "1", *u32_udp_dport(dport),
       "action", "mirred", "egress", action, "dev", dev)


def test_tc_redirect_shows_verdict_target_and_redirected_fate(lab, trace, doc):
    _need_tc_stages()
    a = lab.addr
    mirred_on_rc_ingress(lab, 5030, "redirect", "rs")
    cap = trace(filter=PacketFilter(proto=UDP, port=5030))
    udp_from(lab.client, a["server4"], 5030)
    p = cap.until(lambda p: is_flow(p, src=a["client4"], dst=a["server4"], dport=5030))
    assert action_stats(tc(lab, "-s", "filter", "show", "dev", "rc", "ingress"), "Redirect") == 1

    d = pj(p)
    ing = _tc_stage(d, "tc_ingress")
    assert (ing.get("verdict"), ing.get("target")) == ("redirect", "rs"), ing
    assert d["fate"] == "redirected", d
    assert d["out_dev"] == "rs", d
    doc("tc mirred redirect on ingress", p)


def test_tc_mirror_shows_verdict_target_and_original_still_forwarded(lab, trace, doc):
    _need_tc_stages()
    a = lab.addr
    mirred_on_rc_ingress(lab, 5031, "mirror", "rs2")
    cap = trace(filter=PacketFilter(proto=UDP, port=5031))
    with lab.udp_server(lab.server, a["server4"], 5031) as srv:
        udp_from(lab.client, a["server4"], 5031, b"mirrored")
        assert srv.recv(2.0) == b"mirrored", "set-up: the original did not reach the server"
        # the original: received on rc (a mirrored copy starts on rs2)
        p = cap.until(lambda p: is_flow(p, src=a["client4"], dst=a["server4"], dport=5031)
                      and p.path and p.path[0].stage == "tc_ingress" and p.path[0].dev == "rc")
    assert action_stats(tc(lab, "-s", "filter", "show", "dev", "rc", "ingress"), "Mirror") == 1

    d = pj(p)
    ing = _tc_stage(d, "tc_ingress")
    assert (ing.get("verdict"), ing.get("target")) == ("mirror", "rs2"), ing
    assert d["fate"] == "forwarded" and d["out_dev"] == "rs", d
    assert _tc_stage(d, "tc_egress").get("verdict") == "ok", _tc_stage(d, "tc_egress")
    doc("tc mirred mirror on ingress: the original goes on", p)


def test_tc_drop_shows_shot_verdict_and_tc_ingress_drop(lab, trace, doc):
    _need_tc_stages()
    a = lab.addr
    tc(lab, "qdisc", "add", "dev", "rc", "clsact")
    how = add_tc_drop(lab, "rc", 5032)
    cap = trace(filter=PacketFilter(proto=UDP, port=5032))
    udp_from(lab.client, a["server4"], 5032)
    p = cap.until(lambda p: is_flow(p, src=a["client4"], dst=a["server4"], dport=5032))
    assert qdisc_stats(tc(lab, "-s", "qdisc", "show", "dev", "rc", "clsact"))["dropped"] == 1, \
        f"set-up: the {how} filter did not drop"

    d = pj(p)
    ing = _tc_stage(d, "tc_ingress")
    assert ing.get("verdict") == "shot", ing
    assert "target" not in ing or ing["target"] is None, ing
    assert d["fate"] == "dropped", d
    assert d["drop"]["stage"] == "tc_ingress", d["drop"]
    doc("tc ingress drop (TC_ACT_SHOT)", p)


# ==== qdisc drops ====================================================================

TBF_BURST = 80


def test_tbf_qdisc_drops_match_the_qdisc_counters(lab, trace, doc):
    a = lab.addr
    # nothing but this flow may cross the qdisc: no IPv6 (ND, MLD) on rs,
    # and the server's MAC is pinned (no ARP)
    sysctl(lab.router, net__ipv6__conf__rs__disable_ipv6=1)
    srv = lab.udp_server(lab.server, a["server4"], 5060)
    cap = trace(filter=PacketFilter(proto=UDP, port=5060))
    tc(lab, "qdisc", "add", "dev", "rs", "root", "tbf", "rate", "1mbit", "burst", "3000", "limit", "3000")
    lab.udp_send(lab.client, a["server4"], 5060, b"q" * 1000, count=TBF_BURST, sport=41060)

    def qdisc():
        return qdisc_stats(tc(lab, "-s", "qdisc", "show", "dev", "rs"))
    assert wait_for(cap, lambda: (lambda q: q["backlog"] == 0 and q["sent"] + q["dropped"] >= TBF_BURST)(qdisc()),
                    15), f"set-up: the qdisc never handled the burst: {qdisc()}"
    q = qdisc()
    assert q["sent"] + q["dropped"] == TBF_BURST and q["dropped"] > 0 and q["sent"] > 0, \
        f"set-up: other packets crossed the qdisc, or none was dropped: {q}"

    def flow():
        return [p for p in cap.packets if is_flow(p, src=a["client4"], dst=a["server4"], sport=41060, dport=5060)]
    wait_for(cap, lambda: len(flow()) >= TBF_BURST, 10)
    srv.close()
    pkts = flow()
    forwarded = [p for p in pkts if p.fate == "forwarded"]
    dropped = [p for p in pkts if p.fate == "dropped"]
    qdisc_drops = [p for p in dropped if (pj(p)["drop"].get("stage"), pj(p)["drop"].get("dev")) == ("qdisc", "rs")]
    assert (len(forwarded), len(qdisc_drops)) == (q["sent"], q["dropped"]), \
        [(p.fate, p.drop) for p in pkts if p.fate != "forwarded"][:5]
    assert len(forwarded) + len(dropped) == TBF_BURST == len(pkts)
    doc("tbf qdisc drop (tc -s counted the same)", forwarded[0], qdisc_drops[0])


# ==== fragments ========================================================================

@pytest.mark.parametrize("defrag", ["conntrack", "local"])
def test_fragments_point_to_the_reassembled_packet(lab, trace, doc, defrag):
    a = lab.addr
    if defrag == "conntrack":
        # a conntrack user: nf_defrag reassembles before conntrack, and the
        # fragments it chains are freed with the packet they became
        lab.iptables("-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED", "-j", "ACCEPT")
    # else ip_local_deliver reassembles before INPUT and frees the merged
    # fragments without a tracepoint: they end when they age out
    payload = bytes(range(256)) * 11 + bytes(184)   # 3000 bytes: 3 fragments at MTU 1500
    cap = trace(filter=PacketFilter(src=parse_cidr(a["client4"]), dst=parse_cidr(a["router_c4"]), proto=UDP),
                age_after=2.0)
    before = snmp(lab.router, "Ip")
    with lab.udp_server(lab.router, a["router_c4"], 7200) as srv:
        lab.udp_send(lab.client, a["router_c4"], 7200, payload)
        assert srv.recv(2.0) == payload, "set-up: the datagram was not delivered"
        after = snmp(lab.router, "Ip")
        assert (after["ReasmReqds"] - before["ReasmReqds"], after["ReasmOKs"] - before["ReasmOKs"]) == (3, 1), \
            "set-up: the router did not reassemble 3 fragments into 1 packet"

        def records():
            return [p for p in cap.packets if is_flow(p, src=a["client4"], dst=a["router_c4"], proto=UDP)]
        # the fragments' records may end after the reassembled packet's
        wait_for(cap, lambda: len(records()) >= 4, 6)
        cap.settle(0.3)  # and nothing more follows
    pkts = records()
    delivered = [p for p in pkts if p.fate == "delivered"]
    assert len(delivered) == 1, seen(cap)
    whole = delivered[0]
    frags = [pj(p) for p in pkts if p is not whole]
    assert len(frags) == 3, seen(cap)
    assert [(f["fate"], f.get("reassembled")) for f in frags] == [("reassembled", whole.id)] * 3, frags
    doc(f"IP fragments and the packet reassembly made of them ({defrag} defrag)",
        *(p for p in pkts if p is not whole), whole)


# ==== several namespaces =================================================================

@pytest.mark.parametrize("family", [4, 6])
def test_three_namespaces_link_each_hop_with_next_and_prev(lab, trace, doc, family):
    client, server = lab.addr[fam_key("client4", family)], lab.addr[fam_key("server4", family)]
    proto = ICMP if family == 4 else ICMP6
    cap = trace(netns=[lab.client, lab.router, lab.server], filter=PacketFilter(proto=proto))
    assert lab.ping(lab.client, server) == 1, "set-up: no echo reply"
    fates = ("sent", "forwarded", "delivered")

    def hops(src, dst, namespaces):
        return [cap.until(lambda p, ns=ns, fate=fate: is_flow(p, src=src, dst=dst, proto=proto, netns_name=ns,
                                                             fate=fate))
                for ns, fate in zip(namespaces, fates)]
    request = hops(client, server, (lab.client, lab.router, lab.server))
    reply = hops(server, client, (lab.server, lab.router, lab.client))

    for way in (request, reply):
        ds = [pj(p) for p in way]
        ids = [d["id"] for d in ds]
        assert [d.get("prev") for d in ds] == [None, ids[0], ids[1]], ds
        assert [d.get("next") for d in ds] == [ids[1], ids[2], None], ds
        assert [getattr(p, "next", "<no attribute>") for p in way] == [ids[1], ids[2], None]
        assert [getattr(p, "prev", "<no attribute>") for p in way] == [None, ids[0], ids[1]]
        for i, p in enumerate(way):
            text = format_packet(p)
            if i < 2:
                assert f"→ #{ids[i + 1]} in netns {way[i + 1].netns}" in text, text
            if i > 0:
                assert f"← #{ids[i - 1]} from netns {way[i - 1].netns}" in text, text
    doc(f"One ping through three traced namespaces (IPv{family})", *request, *reply)
