"""Every backend gives the same answers (issue 13).

The same packet through the same ruleset, traced with netfilter BPF links,
with fentry and with kprobes on the hook machinery, must read the same:
stages, tables crossed and their effects, route, fate and drop.  Where
this kernel lacks a backend the comparison is skipped, naming the feature
(this machine refuses fentry and has no kprobes; Debian's 6.12 in the VM of
scripts/kernel-matrix.sh has all three, its 6.1 fentry and kprobes)."""
from __future__ import annotations

import pytest

from tracer import backends
from tracer.filters import PacketFilter

pytestmark = pytest.mark.root
UDP = 17


def _features():
    try:
        return backends.probe()
    except backends.BackendError as e:
        pytest.skip(str(e))


def _need(feat, backend):
    try:
        backends.plan(feat, backend)
    except backends.BackendError as e:
        pytest.skip(f"backend {backend} unavailable on this kernel: {e}")


@pytest.fixture
def lab(make_lab):
    new = make_lab(rules=False)
    new.flush_rules()
    # a table at every hook the packets cross, each with something to show
    new.iptables("-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "5501", "-j", "MARK",
                 "--set-mark", "0x1")
    new.iptables("-t", "filter", "-A", "FORWARD", "-p", "udp", "--dport", "5502", "-j", "DROP")
    new.iptables("-t", "mangle", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT")
    new.iptables("-t", "filter", "-A", "INPUT", "-p", "udp", "-j", "ACCEPT")
    return new


def _essence(p) -> dict:
    """What must read the same on every backend: each stage with its
    tables, effects and verdicts, the route, the fate and the drop (not
    times, ids, or where an observer sat)."""
    d = p.to_json()
    stages = []
    for s in d["path"]:
        e = {"stage": s["stage"], "dev": s["dev"], "mark": s["mark"]}
        if "tables" in s:
            e["mark_out"] = s["mark_out"]
            e["tables"] = [(t["table"], t["mark"], t["verdict"]) for t in s["tables"]]
        if "route" in s:
            r = s["route"]
            e["route"] = (r["tables"], r["type"], r["dev"], r["gw"], r["err"])
        stages.append(e)
    drop = d.get("drop")
    return {"fate": d["fate"], "in": d["in_dev"], "out": d["out_dev"], "stages": stages,
            "drop": (drop["reason"], drop["stage"], drop["table"]) if drop else None}


def _trace_once(lab, trace, backend, dport):
    cap = trace(filter=PacketFilter(proto=UDP, port=dport), backend=backend)
    lab.udp_send(lab.client, lab.addr["server4"], dport, b"same")
    p = cap.until(lambda p: p.dport == dport and p.fate != "unknown")
    cap.tracer.close()
    return p


@pytest.mark.parametrize("one,other", [("nflink", "fentry"), ("nflink", "kprobe"), ("fentry", "kprobe")])
@pytest.mark.parametrize("dport,fate", [(5501, "forwarded"), (5502, "dropped")])
def test_backends_read_the_same(lab, trace, one, other, dport, fate):
    feat = _features()
    _need(feat, one)
    _need(feat, other)
    a = _trace_once(lab, trace, one, dport)
    b = _trace_once(lab, trace, other, dport)
    assert a.fate == b.fate == fate
    assert _essence(a) == _essence(b)


def test_the_backend_in_use_is_the_one_asked_for(lab, trace):
    feat = _features()
    tried = []
    for backend in ("nflink", "fentry", "kprobe"):
        try:
            plan = backends.plan(feat, backend)
        except backends.BackendError:
            continue
        cap = trace(backend=backend)
        assert cap.tracer.plan.netfilter == plan.netfilter == backend
        lab.udp_send(lab.client, lab.addr["server4"], 5501, b"x")
        p = cap.until(lambda p: p.dport == 5501)
        assert p.crossed("prerouting", "route", "forward", "postrouting", "tx")
        cap.tracer.close()
        tried.append(backend)
    assert tried, "no backend runs here"
