"""Namespaces that appear while pkttrace runs (issue 11): a traced name
created again under `serve`, `--netns all` picking up named and unnamed
(process-held) namespaces within a second, and 256 namespaces at once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from streams import Lines
from test_netns_churn import _samples_of, _send_udp_in, gone_for_good, ip_netns, netns_list, ns_name, scratch_ns  # noqa: F401
from test_serve_load import REPO, scrape, serving, settled_fd_count, wait_fd_count

from tracer import netns
from tracer.filters import PacketFilter
from tracer.session import TraceOptions, Tracer

pytestmark = pytest.mark.root


def _hold_unnamed_netns() -> tuple[subprocess.Popen, int]:
    """A network namespace no name stands for: only a process is in it."""
    proc = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep 60"])
    deadline = time.monotonic() + 10
    here = netns.inode(None)
    while time.monotonic() < deadline:
        try:
            ino = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
        except OSError:
            ino = here
        if ino != here:
            time.sleep(0.2)      # its lo is up once sh has run ip
            return proc, ino
        time.sleep(0.02)
    proc.kill()
    pytest.fail("unshare did not enter a new network namespace")


def test_serve_traces_a_netns_created_again_under_its_name(lab, scratch_ns):
    a = scratch_ns("f")
    with serving(lab.router, a) as (proc, url):
        err = Lines(proc.stderr)
        _send_udp_in(a)
        time.sleep(0.6)
        assert _samples_of(scrape(url)[2], a)
        ip_netns("del", a)
        err.wait_for(f"network namespace '{a}' was deleted: no longer traced", timeout=5)
        fds = settled_fd_count(proc.pid)
        t0 = time.monotonic()
        ip_netns("add", a)
        subprocess.run(["ip", "-n", a, "link", "set", "lo", "up"], check=True)
        err.wait_for(f"network namespace '{a}' appeared: traced", timeout=5)
        assert time.monotonic() - t0 < 1.5
        _send_udp_in(a)
        time.sleep(0.6)
        body = scrape(url)[2]
        samples = _samples_of(body, a)
        # counted again, under its name (series of the old namespace were dropped)
        assert any(s.name == "pkttrace_packets_total" and s.value > 0 for s in samples), sorted({s.name for s in samples})
        assert any(s.name == "pkttrace_observers" for s in samples)
        assert _samples_of(body, lab.router)
        ip_netns("del", a)
        err.wait_for(f"network namespace '{a}' was deleted", timeout=5)
        assert wait_fd_count(proc.pid, fds, timeout=10) <= fds   # the second one's links closed too
        assert gone_for_good(a, 1.0, proc)
        proc.terminate()
        assert proc.wait(15) == 0
        assert "Traceback" not in "\n".join(err.rest())


def test_netns_all_picks_up_named_and_unnamed_namespaces_created_after_start(scratch_ns):
    port = 7777
    tracer = subprocess.Popen([sys.executable, "-m", "tracer", "--netns", "all", "--proto", "udp", "--port",
                               str(port), "--json"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    holder = None
    try:
        err, out = Lines(tracer.stderr), Lines(tracer.stdout)
        err.wait_for("tracing every netns", timeout=60)
        named = scratch_ns("all")
        t0 = time.monotonic()
        err.wait_for(f"network namespace '{named}' appeared: traced", timeout=5)
        named_s = time.monotonic() - t0
        holder, ino = _hold_unnamed_netns()
        t1 = time.monotonic()
        unnamed = netns.unnamed(ino)
        err.wait_for(f"network namespace '{unnamed}' appeared: traced", timeout=5)
        unnamed_s = time.monotonic() - t1
        print(f"attached {named_s:.2f} s after `ip netns add`, {unnamed_s:.2f} s after unshare")
        assert named_s < 1.5 and unnamed_s < 1.5
        _send_udp_in(named, 3, port)
        _send_udp_in(unnamed, 3, port)
        got = set()

        def ours(line: str) -> bool:
            d = json.loads(line)
            if d.get("dport") == port:
                got.add(d["netns"])
            return got == {named, unnamed}
        out.wait_for(ours, timeout=10)
        assert got == {named, unnamed}
        # the process exits: its namespace is gone, said once, and nothing is re-created
        holder.kill()
        holder.wait()
        err.wait_for(f"network namespace '{unnamed}' is gone", timeout=5)
        assert tracer.poll() is None, "still tracing the others"
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        tracer.terminate()
        assert tracer.wait(20) == 0
    assert "Traceback" not in "\n".join(err.rest())


def test_256_namespaces_traced_at_once(scratch_ns):
    names = [scratch_ns("m") for _ in range(256)]
    with Tracer(TraceOptions(all_netns=True, filter=PacketFilter(proto=17, port=7878))) as t:
        traced = set(t.opts.netns)
        assert set(names) <= traced and len(t._ns_inodes) >= 257
        # packets in the first and the last of them are traced, each under its name
        for ns in (names[0], names[-1]):
            _send_udp_in(ns, 1, 7878)
        seen = set()
        for p in t.packets(duration=5):
            if p.dport == 7878:
                seen.add(p.netns)
            if seen == {names[0], names[-1]}:
                break
        assert seen == {names[0], names[-1]}
        for ns in names[:128]:
            ip_netns("del", ns)
        t.check_netns()
        assert not set(names[:128]) & set(t._ns_inodes)
        assert len(t._free_index) >= 128


def test_netns_all_leaks_nothing_over_50_attach_detach_cycles():
    """Each namespace created is attached (links, sockets, a map index) and
    each deleted one detached: fds, indices and the namespace list end as
    they began."""
    from test_serve_load import fd_count
    pid = os.getpid()
    with Tracer(TraceOptions(all_netns=True, filter=PacketFilter(proto=17, port=7979))) as t:
        t.on_notice = lambda line: None
        fds, free, before = fd_count(pid), len(t._free_index), netns_list()
        name = ns_name("cyc")
        for _ in range(50):
            ip_netns("add", name)
            assert t.discover_netns() == [name]
            assert name in t.placed and t.placed[name].links if t.plan.netfilter == "nflink" else name in t._ns_inodes
            ip_netns("del", name)
            assert t.check_netns() == [name]
        assert (fd_count(pid), len(t._free_index), netns_list()) == (fds, free, before)
