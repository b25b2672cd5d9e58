"""--rules on a real kernel: pkttrace's temporary nftables table selects the
filter's packets for nftables tracing, and each path shows the rules its
packet met (chains, jump/goto, handles, the rules' text, verdicts)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time

import pytest

from tracer.filters import PacketFilter
from tracer.lab import DEFAULT_NET_ID, NET_ID_RANGE, Lab
from tracer.session import TraceOptions, Tracer

pytestmark = pytest.mark.root

RULESET = """
table inet ptrlab {
  chain fw {
    type filter hook forward priority 10; policy accept;
    udp dport 6001 accept
    udp dport 6002 jump check
    udp dport 6003 goto gochain
  }
  chain check {
    udp dport 6002 counter drop
  }
  chain gochain {
    udp dport 6003 accept
  }
}
"""


@pytest.fixture(scope="module")
def lab():
    """The client—router—server lab (demo iptables-nft rules: FORWARD drops UDP
    to 5009) with RULESET loaded in the router; namespaces named ptr*."""
    prefix = "ptr" + "".join(random.choices(string.ascii_lowercase, k=4))
    lb = Lab(prefix, random.choice([n for n in NET_ID_RANGE if n != DEFAULT_NET_ID]))
    try:
        lb.up(rules=True)
        subprocess.run(["ip", "netns", "exec", lb.router, "nft", "-f", "-"], input=RULESET, text=True, check=True)
        yield lb
    finally:
        lb.down()


def handles(lab, family: str, table: str) -> dict[str, int]:
    """rule text -> handle, as `nft -a list table` prints them."""
    out = subprocess.run(["ip", "netns", "exec", lab.router, "nft", "-a", "-s", "list", "table", family, table],
                         capture_output=True, text=True, check=True).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(.*?) # handle (\d+)$", out, re.M)}


def tables(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True,
                          check=True).stdout


def run(lab, send, filt: PacketFilter, settle: float = 1.0, **kw):
    """Trace the router with --rules while send() runs; (its counters, packets)."""
    t = Tracer(TraceOptions(netns=[lab.router], filter=filt, rules=True, **kw)).start()
    try:
        send()
        pkts = []
        end = time.monotonic() + settle
        while time.monotonic() < end:
            pkts += t.poll(0.1)
        pkts += t.stop()
        return t.counters(), pkts
    finally:
        t.close()


def forward_rules(p) -> list[dict]:
    return [r for t in p.stage("forward").tables for r in (t.rules or ())]


def one(pkts, dport):
    found = [p for p in pkts if p.dport == dport and p.stage("forward") is not None]
    assert found, [(p.dport, p.fate) for p in pkts]
    return found[0]


def test_drop_in_a_user_chain_reached_by_jump_and_accept_and_goto(lab):
    def send():
        for port in (6001, 6002, 6003):
            lab.udp_send(lab.client, lab.addr["server4"], port)
    c, pkts = run(lab, send, PacketFilter.parse(proto="udp", src=lab.addr["client4"]))
    h = handles(lab, "inet", "ptrlab")

    dropped = one(pkts, 6002)
    assert dropped.fate == "dropped"
    step = next(s for s in dropped.stage("forward").tables if s.table == "ptrlab/fw")
    assert step.rules == [
        {"chain": "fw", "handle": h["udp dport 6002 jump check"], "rule": "udp dport 6002 jump check",
         "verdict": "jump check"},
        {"chain": "check", "handle": h["udp dport 6002 counter drop"], "rule": "udp dport 6002 counter drop",
         "verdict": "drop"}]
    assert step.verdict == "drop"
    # the iptables-nft filter table before it (priority 0) let it through: its policy
    filt = next(s for s in dropped.stage("forward").tables if s.table == "filter")
    assert filt.rules == [{"chain": "FORWARD", "handle": None, "rule": "policy accept", "verdict": "accept"}]

    accepted = one(pkts, 6001)
    assert accepted.fate == "forwarded"
    fw = next(s for s in accepted.stage("forward").tables if s.table == "ptrlab/fw")
    assert fw.rules == [{"chain": "fw", "handle": h["udp dport 6001 accept"], "rule": "udp dport 6001 accept",
                         "verdict": "accept"}]

    went = one(pkts, 6003)
    fw = next(s for s in went.stage("forward").tables if s.table == "ptrlab/fw")
    assert fw.rules == [
        {"chain": "fw", "handle": h["udp dport 6003 goto gochain"], "rule": "udp dport 6003 goto gochain",
         "verdict": "goto gochain"},
        {"chain": "gochain", "handle": h["udp dport 6003 accept"], "rule": "udp dport 6003 accept",
         "verdict": "accept"}]
    # the iptables-nft table at the same hook: its policy, after ptrlab's accept
    filt = next(s for s in went.stage("forward").tables if s.table == "filter")
    assert filt.rules == [{"chain": "FORWARD", "handle": None, "rule": "policy accept", "verdict": "accept"}]
    c = c.rules
    assert c is not None and c.joined == len([p for p in pkts if any(s.is_hook for s in p.path)])


def test_ipv6_through_the_inet_chains(lab):
    c, pkts = run(lab, lambda: lab.udp_send(lab.client, lab.addr["server6"], 6002),
                  PacketFilter.parse(src=lab.addr["client6"], proto="udp"))
    p = one(pkts, 6002)
    assert p.family == "ipv6" and p.fate == "dropped"
    step = next(s for s in p.stage("forward").tables if s.table == "ptrlab/fw")
    assert [(r["chain"], r["verdict"]) for r in step.rules] == [("fw", "jump check"), ("check", "drop")]


def test_a_filter_expression_traces_the_rest_and_keeps_the_shown_paths(lab):
    # the expression is not compiled into nft: every UDP packet is traced by
    # nftables, the groups of the paths not shown are dropped
    def send():
        lab.udp_send(lab.client, lab.addr["server4"], 6001)
        lab.udp_send(lab.client, lab.addr["server4"], 6002)
    c, pkts = run(lab, send, PacketFilter(proto=17, expression="udp and dst port 6002"))
    assert [p.dport for p in pkts] == [6002]
    step = next(s for s in pkts[0].stage("forward").tables if s.table == "ptrlab/fw")
    assert [r["verdict"] for r in step.rules] == ["jump check", "drop"]
    assert c.rules is not None and c.rules.joined == 1


def test_an_iptables_nft_rule_shows_with_its_text(lab):
    c, pkts = run(lab, lambda: lab.udp_send(lab.client, lab.addr["server4"], 5009),
                  PacketFilter.parse(proto="udp", port="5009"))
    p = one(pkts, 5009)
    h = handles(lab, "ip", "filter")
    (text,) = [r for r in h if "5009" in r]
    filt = next(s for s in p.stage("forward").tables if s.table == "filter")
    assert filt.rules == [{"chain": "FORWARD", "handle": h[text], "rule": text, "verdict": "drop"}]
    assert "udp dport 5009" in text and text.endswith("drop")
    # the mangle PREROUTING chain of iptables-nft too: no rule matched, its policy
    pre = p.stage("prerouting").tables
    assert {"chain": "PREROUTING", "handle": None, "rule": "policy accept", "verdict": "accept"} in \
        [r for s in pre for r in (s.rules or ())]


def test_unrelated_traffic_makes_no_trace_events_and_the_limit_counts(lab):
    with lab.udp_server(lab.server, lab.addr["server4"], 7000):
        def flood():
            lab.udp_send(lab.client, lab.addr["server4"], 7000, count=3000)
            lab.udp_send(lab.client, lab.addr["server4"], 6001)
        c, pkts = run(lab, flood, PacketFilter.parse(proto="udp", port="6001"))
    c = c.rules
    assert c is not None
    # one packet selected: its hooks (prerouting, forward, postrouting) and the
    # tables there; the 3,000 others of the flood none
    assert 0 < c.events < 60, c
    assert c.joined == 1 and c.without == 0 and c.over_limit == 0

    # a limit of 50 hook passes a second (burst 5): most of a burst of the
    # selected flow goes untraced, counted; the traced ones still get rules
    c, pkts = run(lab, lambda: lab.udp_send(lab.client, lab.addr["server4"], 6001, count=300),
                  PacketFilter.parse(proto="udp", port="6001"), rules_rate=50)
    c = c.rules
    assert c is not None and c.over_limit > 0
    assert c.joined + c.without == len([p for p in pkts if any(s.is_hook for s in p.path)]) == 300
    assert 0 < c.joined < 300 and c.without > 0
    assert all(forward_rules(p) for p in pkts if p.stage("forward") and
               any(s.rules is not None for s in p.stage("forward").tables))


def pkttrace(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tracer", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(proc) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "tracing" in line:
            return
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"pkttrace never became ready: rc={proc.poll()} {proc.stderr.read()}")


def sender(lab, port: int):
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            lab.udp_send(lab.client, lab.addr["server4"], port)
            time.sleep(0.1)
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    return stop, th


@pytest.mark.parametrize("as_json", [True, False])
def test_the_command_shows_rules_and_its_table_is_gone_after_exit(lab, as_json):
    proc = pkttrace("--rules", "--netns", lab.router, "--proto", "udp", "--port", "6002", "-c", "1",
                    *(["--json"] if as_json else []))
    wait_ready(proc)
    assert f"pkttrace_{proc.pid}" in tables(lab.router)
    stop, th = sender(lab, 6002)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        stop.set()
        th.join()
    assert proc.returncode == 0, err
    h = handles(lab, "inet", "ptrlab")
    # -c 1: one packet, even if more had ended and were waiting for their rules
    assert len(re.findall(r'^\{"id"' if as_json else r"^\S* #\d+ ipv4", out, re.M)) == 1, out
    if as_json:
        pkt = json.loads(out.splitlines()[0])
        fwd = next(s for s in pkt["path"] if s["stage"] == "forward")
        step = next(t for t in fwd["tables"] if t["table"] == "ptrlab/fw")
        assert [r["verdict"] for r in step["rules"]] == ["jump check", "drop"]
        assert step["rules"][1]["handle"] == h["udp dport 6002 counter drop"]
        pre = next(s for s in pkt["path"] if s["stage"] == "prerouting")
        assert all("rules" in t for t in pre["tables"])
    else:
        assert f"fw #{h['udp dport 6002 jump check']}  udp dport 6002 jump check" in out
        assert f"check #{h['udp dport 6002 counter drop']}  udp dport 6002 counter drop" in out
    # (-c 1: a second packet may have been joined before the count was reached)
    assert re.search(r"rules: \d+ nftables trace events, [1-9]\d* paths with rules, 0 without", err), err
    assert "pkttrace_" not in tables(lab.router)       # the kernel deleted it with the socket


def test_the_table_is_gone_after_sigkill(lab):
    proc = pkttrace("--rules", "--netns", lab.router, "--proto", "udp")
    try:
        wait_ready(proc)
        assert f"pkttrace_{proc.pid}" in tables(lab.router)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    deadline = time.monotonic() + 5
    while f"pkttrace_{proc.pid}" in tables(lab.router) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "pkttrace_" not in tables(lab.router)


def test_legacy_xtables_said_once(lab):
    ns = f"ptr-leg{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"], check=True)
        r = subprocess.run([sys.executable, "-m", "tracer", "--rules", "--netns", ns, "--duration", "0.3"],
                           capture_output=True, text=True, timeout=120)     # a TCG guest starts slowly
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if "legacy xtables" in ln]
        assert len(lines) == 1 and "iptables filter" in lines[0] and "nftables trace events" in lines[0]
        assert "pkttrace_" not in tables(ns)
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy", "-F"], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_locally_generated_and_locally_delivered_packets(lab):
    nft = ["ip", "netns", "exec", lab.router, "nft"]
    subprocess.run([*nft, "-f", "-"], text=True, check=True, input="""
table ip ptrloc {
  chain out {
    type filter hook output priority 0; policy accept;
    udp dport 6100 counter
  }
  chain in {
    type filter hook input priority 0; policy accept;
    udp dport 6200 drop
  }
}
""")
    try:
        def send():
            lab.udp_send(lab.router, lab.addr["server4"], 6100)
            lab.udp_send(lab.client, lab.addr["router_c4"], 6200)
        c, pkts = run(lab, send, PacketFilter.parse(proto="udp"))
        h = handles(lab, "ip", "ptrloc")
    finally:
        subprocess.run([*nft, "delete", "table", "ip", "ptrloc"], check=True)
    sent = next(p for p in pkts if p.dport == 6100)
    out = next(t for t in sent.stage("output").tables if t.table == "ptrloc/out")
    assert out.rules == [
        {"chain": "out", "handle": h["udp dport 6100 counter"], "rule": "udp dport 6100 counter",
         "verdict": "continue"},
        {"chain": "out", "handle": None, "rule": "policy accept", "verdict": "accept"}]
    dropped = next(p for p in pkts if p.dport == 6200)
    inp = next(t for t in dropped.stage("input").tables if t.table == "ptrloc/in")
    assert inp.rules == [{"chain": "in", "handle": h["udp dport 6200 drop"], "rule": "udp dport 6200 drop",
                          "verdict": "drop"}]
