"""Classic tc (--tc classic, kernels without TCX) next to other tools and other
pkttrace sessions (issue 11): another tool's cls_bpf filters are never
touched, two sessions coexist and stop independently, and what a SIGKILLed
session left is removed by the next start and by `pkttrace cleanup`, exactly
that.

tc state is read with tc(8), not with the code under test."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from streams import Lines
from test_cli_process import need_tc_observers, pkttrace

from tracer import netns

pytestmark = pytest.mark.root

FOREIGN_C = """
__attribute__((section("classifier"), used)) int foreign(void *skb) { return -1; }  /* TC_ACT_UNSPEC: next filter */
char _license[] __attribute__((section("license"), used)) = "GPL";
"""
# where the other tool's filters go: pref 1 (where pkttrace used to go) and others
FOREIGN_AT = (("rs", "ingress", 1), ("rs", "egress", 5), ("rc", "ingress", 2))

_LINE = re.compile(r"^filter protocol \S+ pref (\d+) bpf chain (\d+) handle (0x[0-9a-f]+) (\S+) .*?\bid (\d+)")


@dataclass(frozen=True)
class Filter:
    dev: str
    direction: str
    pref: int
    handle: int
    name: str
    prog_id: int

    def of(self, proc: subprocess.Popen) -> bool:
        return self.name.split("/")[:2] == ["pkttrace", str(proc.pid)]


def tc(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True,
                          check=True).stdout


def filters(ns: str) -> set[Filter]:
    """Every cls_bpf filter on every device of ns, both directions."""
    out = set()
    for dev in sorted(netns.links(ns).values()):
        for direction in ("ingress", "egress"):
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, direction],
                               capture_output=True, text=True)
            for line in r.stdout.splitlines():
                m = _LINE.match(line)
                if m:
                    out.add(Filter(dev, direction, int(m[1]), int(m[3], 16), m[4], int(m[5])))
    return out


def clsact(ns: str) -> set[str]:
    """The devices of ns with a clsact qdisc."""
    return {m[1] for m in re.finditer(r"qdisc clsact \S+ dev (\S+)", tc(ns, "qdisc", "show"))}


class Session:
    """pkttrace --tc classic on the lab router, ICMP to the server as JSON."""

    def __init__(self, lab):
        self.lab = lab
        self.proc = pkttrace("--netns", lab.router, "--tc", "classic", "--json", "--proto", "icmp",
                             "--dst", lab.addr["server4"])
        self.err = Lines(self.proc.stderr)
        self.out = Lines(self.proc.stdout)
        self.err.wait_for(lambda s: "tracing" in s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sees_a_ping(self) -> dict:
        """A ping from the client, reported with its tc stages on the router."""
        deadline = time.monotonic() + 10
        while True:
            assert self.lab.ping(self.lab.client, self.lab.addr["server4"]) == 1
            try:
                pkt = json.loads(self.out.wait_for(lambda s: s.startswith("{"), timeout=2))
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                continue
            stages = [s["stage"] for s in pkt["path"]]
            if pkt["fate"] == "forwarded" and "tc_ingress" in stages and "tc_egress" in stages:
                return pkt

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        assert self.proc.returncode == 0, self.err.all
        return "\n".join(self.err.all)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)


def cleanup(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "tracer", "cleanup", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "Traceback" not in r.stdout
    return r.stdout.splitlines()


@pytest.fixture
def sessions():
    """Sessions started by a test; any still running at the end is killed."""
    started: list[Session] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.kill()


@pytest.fixture
def foreign(lab, tmp_path):
    """Another tool's cls_bpf filters on the router (and the clsact qdiscs
    it made for them); the router's tc state is reset afterwards."""
    need_tc_observers()
    src, obj = tmp_path / "foreign.c", tmp_path / "foreign.o"
    src.write_text(FOREIGN_C)
    subprocess.run(["clang", "-O2", "-target", "bpf", "-c", str(src), "-o", str(obj)], check=True)
    assert not filters(lab.router) and not clsact(lab.router), "tc state left by an earlier test"
    for dev, direction, pref in FOREIGN_AT:
        subprocess.run(["ip", "netns", "exec", lab.router, "tc", "qdisc", "add", "dev", dev, "clsact"],
                       capture_output=True)   # once per device
        tc(lab.router, "filter", "add", "dev", dev, direction, "pref", str(pref), "bpf", "da", "obj", str(obj),
           "sec", "classifier")
    theirs = filters(lab.router)
    assert {(f.dev, f.direction, f.pref) for f in theirs} == set(FOREIGN_AT)
    assert clsact(lab.router) == {"rs", "rc"}
    yield theirs
    for dev in netns.links(lab.router).values():
        subprocess.run(["ip", "netns", "exec", lab.router, "tc", "qdisc", "del", "dev", dev, "clsact"],
                       capture_output=True)


def points(lab) -> set[tuple[str, str]]:
    return {(dev, d) for dev in netns.links(lab.router).values() for d in ("ingress", "egress")}


def check_own_filters(lab, proc, now: set[Filter], theirs: set[Filter]) -> set[Filter]:
    """One filter of proc per device and direction, at a priority and handle
    no other filter there uses, running tc_ingress / tc_egress."""
    mine = {f for f in now if f.of(proc)}
    assert {(f.dev, f.direction) for f in mine} == points(lab)
    for f in mine:
        others = {(g.pref, g.handle) for g in now - {f} if (g.dev, g.direction) == (f.dev, f.direction)}
        assert f.pref not in {p for p, _ in others} and f.handle not in {h for _, h in others}, (f, others)
    names = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    name_of = {p["id"]: p.get("name") for p in json.loads(names)}
    assert {(f.direction, name_of[f.prog_id]) for f in mine} == {("ingress", "tc_ingress"), ("egress", "tc_egress")}
    return mine


def test_foreign_filters_survive_start_stop_kill_restart_and_cleanup(lab, foreign, sessions):
    theirs, qdiscs = foreign, clsact(lab.router)
    # start: next to them, at free priorities (rs ingress: after theirs at pref 1)
    s = Session(lab)
    sessions.append(s)
    now = filters(lab.router)
    assert theirs <= now
    mine = check_own_filters(lab, s.proc, now, theirs)
    assert {f.pref for f in mine if (f.dev, f.direction) == ("rs", "ingress")} == {2}
    assert {f.pref for f in mine if (f.dev, f.direction) == ("rc", "ingress")} == {1}
    s.sees_a_ping()          # their filters return TC_ACT_UNSPEC: ours run too
    # stop: ours go, theirs and their qdiscs stay
    s.stop()
    assert filters(lab.router) == theirs
    assert clsact(lab.router) == qdiscs

    # SIGKILL: ours stay behind; the next start removes them, and only them
    s = Session(lab)
    sessions.append(s)
    dead = check_own_filters(lab, s.proc, filters(lab.router), theirs)
    s.kill()
    assert filters(lab.router) == theirs | dead
    s2 = Session(lab)
    sessions.append(s2)
    notice = [ln for ln in s2.err.all if "left by a killed pkttrace" in ln]
    assert notice == [f"pkttrace: netns {lab.router}: removed {len(dead)} cls_bpf filters and 2 clsact qdiscs "
                      "left by a killed pkttrace"], s2.err.all      # lo and rs2: created by pkttrace
    now = filters(lab.router)
    assert not dead & now and theirs <= now
    check_own_filters(lab, s2.proc, now, theirs)
    s2.sees_a_ping()

    # SIGKILL again, then pkttrace cleanup
    s2.kill()
    lines = cleanup("--netns", lab.router)
    assert filters(lab.router) == theirs
    assert clsact(lab.router) == qdiscs
    assert len(lines) == len(points(lab)) + 2 + 1 and lines[-1].startswith("removed ")
    assert cleanup("--netns", lab.router) == ["nothing left by a killed pkttrace in 1 network namespace"]


def test_two_sessions_coexist_and_stop_independently(lab, foreign, sessions):
    theirs, qdiscs = foreign, clsact(lab.router)
    a = Session(lab)
    sessions.append(a)
    b = Session(lab)
    sessions.append(b)
    now = filters(lab.router)
    mine_a = check_own_filters(lab, a.proc, now, theirs)
    mine_b = check_own_filters(lab, b.proc, now, theirs)
    assert now == theirs | mine_a | mine_b
    # each sees the packets, with its own tc stages
    for s in (a, b):
        pkt = s.sees_a_ping()
        assert pkt["in_dev"] == "rc" and pkt["out_dev"] == "rs"

    # stopping the first leaves the second's filters, and it still sees packets
    a.stop()
    assert filters(lab.router) == theirs | mine_b
    assert clsact(lab.router) == qdiscs | {"lo", "rs2"}    # b still uses them
    b.sees_a_ping()
    b.stop()
    assert filters(lab.router) == theirs
    assert clsact(lab.router) == qdiscs                    # the last pkttrace removed what a pkttrace created

    # the other order, and a session started while another runs, stopped first
    a, b = Session(lab), None
    sessions.append(a)
    b = Session(lab)
    sessions.append(b)
    mine_a = {f for f in filters(lab.router) if f.of(a.proc)}
    b.stop()
    assert filters(lab.router) == theirs | mine_a
    a.sees_a_ping()
    a.stop()
    assert filters(lab.router) == theirs and clsact(lab.router) == qdiscs


def test_cleanup_after_sigkill_removes_exactly_what_the_dead_session_left(lab, foreign, sessions):
    theirs, qdiscs = foreign, clsact(lab.router)
    dead = Session(lab)
    sessions.append(dead)
    live = Session(lab)
    sessions.append(live)
    now = filters(lab.router)
    left = check_own_filters(lab, dead.proc, now, theirs)
    kept = check_own_filters(lab, live.proc, now, theirs)
    dead.kill()
    assert filters(lab.router) == now            # netlink state outlives the process

    # the dead one's filters only: the live session's and the other tool's stay,
    # and every qdisc (the live session still has filters on lo and rs2)
    lines = cleanup("--netns", lab.router)
    assert len(lines) == len(left) + 1
    for f in left:
        assert sum(f"{f.direction} {f.dev} pref {f.pref} handle {f.handle:#x} " in ln and f"pid {dead.pid}" in ln
                   for ln in lines) == 1, (f, lines)
    assert lines[-1] == (f"removed {len(left)} cls_bpf filters and 0 clsact qdiscs in 1 network namespace; "
                         f"{len(kept)} filters of running pkttrace sessions left alone")
    assert filters(lab.router) == theirs | kept
    assert clsact(lab.router) == qdiscs | {"lo", "rs2"}
    live.sees_a_ping()

    # now the other one dies: its filters go, and the clsact qdiscs a pkttrace
    # created (lo, rs2) once empty; the other tool's (rs, rc) stay
    live.kill()
    lines = cleanup("--netns", lab.router)
    assert sorted(ln for ln in lines if "removed clsact qdisc" in ln) == [
        f"netns {lab.router}: removed clsact qdisc lo (created by a killed pkttrace, now empty)",
        f"netns {lab.router}: removed clsact qdisc rs2 (created by a killed pkttrace, now empty)"]
    assert lines[-1] == f"removed {len(kept)} cls_bpf filters and 2 clsact qdiscs in 1 network namespace"
    assert filters(lab.router) == theirs
    assert clsact(lab.router) == qdiscs
    # nothing left to do
    assert cleanup("--netns", lab.router) == ["nothing left by a killed pkttrace in 1 network namespace"]


def test_cleanup_leaves_running_sessions_and_other_namespaces_alone(lab, make_lab, sessions):
    """Filters of a session killed in another netns are not this netns' business."""
    need_tc_observers()
    other = make_lab(rules=False)
    s = Session(lab)
    sessions.append(s)
    mine = filters(lab.router)
    assert cleanup("--netns", other.router) == ["nothing left by a killed pkttrace in 1 network namespace"]
    assert cleanup("--netns", lab.router) == [
        f"nothing left by a killed pkttrace in 1 network namespace; {len(mine)} filters of running pkttrace "
        "sessions left alone"]
    assert filters(lab.router) == mine
    s.stop()
    assert filters(lab.router) == set() and clsact(lab.router) == set()
