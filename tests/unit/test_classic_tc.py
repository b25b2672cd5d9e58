"""Classic tc next to other tools, without a kernel: how a filter dump is read,
which filters count as ours, what a clean-up removes, and `pkttrace cleanup`.

The real thing (cls_bpf filters in a netns lab, two sessions, SIGKILL) is in
tests/integration/test_tc_sharing.py."""
from __future__ import annotations

import os
import socket
import struct

import pytest

from tracer import cli, netns, probes
from tracer.probes import Cleanup, TcFilter

INGRESS, EGRESS = 0xFFFFFFF2, 0xFFFFFFF3


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class Msg:
    """What pyroute2 hands out (0.7 and 0.9): the receive buffer, the
    message's offset in it, its header, get_attr()."""

    def __init__(self, body: bytes, index: int = 0, kind: str = "", offset: int = 8):
        self.data = b"\xee" * offset + body + b"\xee" * 8    # other messages around it
        self.offset = offset
        self._h = {"length": len(body)}
        self._index, self._kind = index, kind

    def __getitem__(self, key):
        return {"header": self._h, "index": self._index}[key]

    def get_attr(self, name):
        return {"TCA_KIND": self._kind, "IFLA_IFNAME": f"if{self._index}"}.get(name)


def filter_msg(ifindex=3, parent=INGRESS, pref=1, handle=1, kind="bpf", name="pkttrace/42", prog_id=77,
               chain=0, protocol=0x0003) -> Msg:
    info = (pref << 16) | socket.htons(protocol)
    attrs = _nla(1, kind.encode() + b"\0") + _nla(11, struct.pack("=I", chain))
    if handle:
        opts = (_nla(7, name.encode() + b"\0") + _nla(10, b"\x01" * 8) + _nla(11, struct.pack("=I", prog_id))
                + _nla(8, struct.pack("=I", 1)))
        attrs += _nla(2 | 0x8000, opts)            # NLA_F_NESTED is masked off
    body = struct.pack("=BxxxiIII", 0, ifindex, handle, parent, info) + attrs
    return Msg(struct.pack("=IHHII", 16 + len(body), 44, 2, 1, 0) + body)


def test_a_filter_is_read_from_the_raw_message():
    f = TcFilter.parse(filter_msg(ifindex=5, parent=EGRESS, pref=3, handle=0x2a, name="pkttrace/42/clsact",
                                  prog_id=31546))
    assert (f.ifindex, f.ingress, f.pref, f.protocol, f.handle, f.chain, f.kind) == (5, False, 3, 3, 0x2a, 0, "bpf")
    assert (f.name, f.prog_id, f.pid, f.marks_qdisc, f.named_ours) == ("pkttrace/42/clsact", 31546, 42, True, True)
    assert f.describe("rs") == "cls_bpf filter egress rs pref 3 handle 0x2a"


@pytest.mark.parametrize("kw, ours", [
    ({}, True),
    ({"name": "pkttrace"}, True),                       # versions before this one
    ({"name": "pkttrace/7/clsact"}, True),
    ({"name": "pkttracer"}, False),
    ({"name": "foreign.o:[classifier]"}, False),
    ({"name": ""}, False),
    ({"kind": "u32"}, False),
    ({"chain": 5}, False),
    ({"handle": 0}, False),                             # the priority's own entry, not a filter
    ({"prog_id": 0}, False),
])
def test_which_filters_are_named_ours(kw, ours):
    assert TcFilter.parse(filter_msg(**kw)).named_ours is ours


def test_only_the_clsact_mark_gives_the_qdisc():
    assert not TcFilter.parse(filter_msg(name="pkttrace/42")).marks_qdisc
    assert not TcFilter.parse(filter_msg(name="pkttrace")).marks_qdisc
    assert TcFilter.parse(filter_msg(name="pkttrace")).pid is None
    assert not TcFilter.parse(filter_msg(name="other/42/clsact")).marks_qdisc


def test_lowest_free():
    assert probes._lowest_free([]) == 1
    assert probes._lowest_free([1, 2, 4]) == 3
    assert probes._lowest_free([2, 49152]) == 1


# --- clean_dead_sessions against a fake rtnetlink ----------------------------

class FakeIpr:
    """A netns with clsact on the given devices and the given filters."""

    def __init__(self, clsact: set[int], filters: list[dict]):
        self.clsact = set(clsact)
        self.filters = filters
        self.calls: list[tuple] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def get_qdiscs(self):
        return [Msg(b"", index=i, kind="clsact") for i in sorted(self.clsact)] + [Msg(b"", index=1, kind="noqueue")]

    def get_links(self):
        return [Msg(b"", index=i) for i in (1, 2, 3, 4)]

    def get_filters(self, index, parent):
        out = []
        for f in self.filters:
            if f["ifindex"] == index and f["parent"] == parent:
                out.append(filter_msg(**dict(f, handle=0)))   # the priority's entry first, as the kernel does
                out.append(filter_msg(**f))
        return out

    def tc(self, command, kind, index, handle=None, parent=None, prio=None, protocol=None, **kw):
        self.calls.append((command, kind, index, handle, parent, prio))
        if command == "del-filter":
            self.filters = [f for f in self.filters if not (f["ifindex"] == index and f["parent"] == parent
                                                            and f["pref"] == prio and f["handle"] == handle)]
        elif command == "del":
            self.clsact.discard(index)


@pytest.fixture
def world(monkeypatch):
    """Program 10 is a dead session's tc_ingress, 11 its tc_egress, 20 a
    running session's tc_ingress, 30 another tool's program."""
    names = {10: "tc_ingress", 11: "tc_egress", 20: "tc_ingress", 30: "foreign"}
    monkeypatch.setattr(probes.libbpf, "prog_name_by_id", names.get)
    monkeypatch.setattr(probes, "held_prog_ids", lambda: {20})

    def make(clsact, filters):
        ipr = FakeIpr(clsact, filters)
        monkeypatch.setattr(probes, "_ipr", lambda ns: ipr)
        return ipr
    return make


def f(ifindex, parent, pref, handle, name, prog_id):
    return {"ifindex": ifindex, "parent": parent, "pref": pref, "handle": handle, "name": name, "prog_id": prog_id}


def test_cleanup_removes_the_dead_sessions_filters_and_its_empty_clsact_only(world):
    ipr = world({2, 3}, [
        f(2, INGRESS, 1, 1, "pkttrace/9/clsact", 10), f(2, EGRESS, 1, 1, "pkttrace/9/clsact", 11),  # dead, dev 2
        f(3, INGRESS, 1, 1, "foreign.o:[classifier]", 30),                                          # another tool
        f(3, INGRESS, 2, 2, "pkttrace/9/clsact", 10),                                               # dead
        f(3, INGRESS, 3, 3, "pkttrace/8/clsact", 20),                                               # running
        f(3, EGRESS, 1, 1, "pkttrace/5", 30),          # named like ours, another program: not ours
    ])
    done = probes.clean_dead_sessions("labx")
    assert (done.filters, done.qdiscs, done.live) == (3, 1, 1)
    assert [c[:4] for c in ipr.calls] == [("del-filter", "bpf", 2, 1), ("del-filter", "bpf", 2, 1),
                                          ("del", "clsact", 2, None), ("del-filter", "bpf", 3, 2)]
    assert ipr.clsact == {3}
    assert sorted((x["ifindex"], x["parent"], x["pref"], x["prog_id"]) for x in ipr.filters) == [
        (3, INGRESS, 1, 30), (3, INGRESS, 3, 20), (3, EGRESS, 1, 30)]
    assert len(done.removed) == 4
    assert done.removed[0] == ("netns labx: removed cls_bpf filter ingress if2 pref 1 handle 0x1 "
                               "(tc_ingress, prog id 10, left by pid 9)")
    assert done.removed[2] == "netns labx: removed clsact qdisc if2 (created by a killed pkttrace, now empty)"
    assert done.summary() == "netns labx: removed 3 cls_bpf filters and 1 clsact qdisc left by a killed pkttrace"
    # a second clean-up finds nothing
    again = probes.clean_dead_sessions("labx")
    assert (again.filters, again.qdiscs, again.live, again.removed) == (0, 0, 1, [])


def test_a_clsact_pkttrace_did_not_create_is_left_even_when_empty(world):
    ipr = world({2}, [f(2, INGRESS, 1, 1, "pkttrace/9", 10)])
    done = probes.clean_dead_sessions(None)
    assert (done.filters, done.qdiscs) == (1, 0)
    assert ipr.clsact == {2} and ipr.filters == []
    assert done.removed[0].startswith("current netns: removed cls_bpf filter ingress if2")


def test_nothing_named_ours_costs_no_proc_scan(world, monkeypatch):
    world({2}, [f(2, INGRESS, 1, 1, "foreign.o:[classifier]", 30)])
    monkeypatch.setattr(probes, "held_prog_ids", lambda: pytest.fail("scanned /proc for nothing"))
    assert probes.clean_dead_sessions(None).removed == []


def test_held_prog_ids_reads_proc_without_failing():
    """Processes that vanish or cannot be read are skipped."""
    assert isinstance(probes.held_prog_ids(), set)


# --- pkttrace cleanup -----------------------------------------------------------

@pytest.fixture
def root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)


def test_cleanup_prints_one_line_per_removal_and_a_summary(capsys, root, monkeypatch):
    monkeypatch.setattr(netns, "exists", lambda name: True)
    done = {"a": Cleanup("a", ["netns a: removed x", "netns a: removed y"], filters=1, qdiscs=1),
            "b": Cleanup("b", live=2)}
    monkeypatch.setattr(probes, "clean_dead_sessions", done.__getitem__)
    assert cli.run(["cleanup", "--netns", "a", "--netns", "b", "--netns", "a"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["netns a: removed x", "netns a: removed y",
                                "removed 1 cls_bpf filter and 1 clsact qdisc in 2 network namespaces; "
                                "2 filters of running pkttrace sessions left alone"]
    assert err == ""


def test_cleanup_with_nothing_to_do(capsys, root, monkeypatch):
    monkeypatch.setattr(probes, "clean_dead_sessions", lambda ns: Cleanup(ns))
    assert cli.run(["cleanup"]) == 0
    assert capsys.readouterr().out == "nothing left by a killed pkttrace in 1 network namespace\n"


def test_cleanup_all_is_the_current_netns_and_every_named_one_once(capsys, root, monkeypatch):
    inodes = {None: 1, "a": 2, "same-as-here": 1, "b": 3}
    monkeypatch.setattr(netns, "names", lambda: ["a", "b", "same-as-here"])
    monkeypatch.setattr(netns, "inode", lambda name: inodes[name])
    monkeypatch.setattr(netns, "current_inode", lambda name: inodes[name])
    seen = []
    monkeypatch.setattr(probes, "clean_dead_sessions", lambda ns: seen.append(ns) or Cleanup(ns))
    assert cli.run(["cleanup", "--all"]) == 0
    assert seen == [None, "a", "b"]
    assert "in 3 network namespaces" in capsys.readouterr().out


def test_cleanup_all_skips_a_netns_deleted_meanwhile(capsys, root, monkeypatch):
    monkeypatch.setattr(netns, "names", lambda: ["gone"])
    monkeypatch.setattr(netns, "current_inode", lambda name: 2)
    monkeypatch.setattr(netns, "exists", lambda name: False)

    def clean(ns):
        if ns == "gone":
            raise probes.AttachError("unknown network namespace 'gone'")
        return Cleanup(ns)
    monkeypatch.setattr(probes, "clean_dead_sessions", clean)
    assert cli.run(["cleanup", "--all"]) == 0
    assert "in 1 network namespace" in capsys.readouterr().out


def test_cleanup_all_and_netns_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(probes, "clean_dead_sessions", lambda ns: pytest.fail("went past the door"))
    assert cli.run(["cleanup", "--all", "--netns", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "--all" in err
