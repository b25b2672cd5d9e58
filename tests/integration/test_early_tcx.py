"""TCX links made while the kernel verifies the programs (tcobservers.EarlyTcx).

Each new TCX link waits for an RCU grace period under the RTNL lock, so a
thread makes them with a placeholder program during the load and the real
tc_ingress/tc_egress are swapped in afterwards.  What must hold: after the
start every device of the traced netns has exactly its two links, each
running our program on that device (not the placeholder, not a dead link),
whatever happened to the devices between the early links and the swap; and
nothing of the placeholder stays behind.
"""
from __future__ import annotations

import os

import pytest

from tracer import backends, libbpf, netns, probes, tcobservers
from tracer.exporter import BPF_LINK_TYPE_TCX, link_info

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0 or backends._kernel_version() < (6, 6),
                                 reason="TCX links need Linux 6.6+ (and root)")]


@pytest.fixture(scope="module")
def tc_obj():
    """The object with only the two tc programs loaded (and its maps)."""
    obj = libbpf.BpfObject(libbpf.object_path())
    for p in obj.programs():
        if p.name not in ("tc_ingress", "tc_egress"):
            p.set_autoload(False)
    obj.load()
    yield obj
    obj.close()


def prog_id(obj, name):
    return libbpf.prog_id_name(obj.program(name).fd)[0]


def assert_running_ours(tc, ns, obj):
    """Every device of ns now: two TCX links on it, ingress running
    tc_ingress and egress tc_egress; no other device has any."""
    want = {libbpf.BPF_TCX_INGRESS: prog_id(obj, "tc_ingress"), libbpf.BPF_TCX_EGRESS: prog_id(obj, "tc_egress")}
    per_dev = tc.by_netns[ns]
    assert set(per_dev) == set(netns.links(ns))
    for ifindex, atts in per_dev.items():
        infos = sorted((i.type, i.prog_id, i.ifindex, i.attach_type) for i in (link_info(a.fd) for a in atts))
        assert infos == sorted((BPF_LINK_TYPE_TCX, want[at], ifindex, at) for at in want), (ifindex, infos)


def held_prog_names() -> set[str]:
    return {libbpf.prog_name_by_id(i) for i in probes.prog_ids_of(os.getpid())}


def test_early_links_are_swapped_to_our_programs(lab, tc_obj):
    early = tcobservers.EarlyTcx([lab.router])
    tc = tcobservers.TcObservers(tc_obj, "auto", print)
    try:
        early._join()                                   # the early links exist now
        assert "pt_tc_wait" in held_prog_names()       # the placeholder, while links wait for it
        tc.attach(lab.router, early=early)
        assert tc.mode == "tcx"
        assert_running_ours(tc, lab.router, tc_obj)
        early.close()
        assert "pt_tc_wait" not in held_prog_names()
    finally:
        early.close()
        tc.detach()


def test_devices_that_changed_before_the_swap(lab, tc_obj):
    """A device deleted after its early links were made, one added, and one
    deleted and made again under the same ifindex (veth pairs: both ends
    count) (its early links went with
    the first device): each ends with exactly our two links, or none."""
    ns = lab.router
    for name in ("gone0", "again0"):           # (veth: the lab kernel may lack dummy)
        lab.ip(ns, "link", "add", name, "type", "veth", "peer", "name", name + "p")
    again = netns.ifindex(ns, "again0")
    early = tcobservers.EarlyTcx([ns])
    tc = tcobservers.TcObservers(tc_obj, "auto", print)
    try:
        early._join()                                   # the early links exist now
        lab.ip(ns, "link", "del", "gone0")
        lab.ip(ns, "link", "del", "again0")
        lab.ip(ns, "link", "add", "again1", "index", str(again), "type", "veth", "peer", "name", "again1p")
        lab.ip(ns, "link", "add", "new0", "type", "veth", "peer", "name", "new0p")
        tc.attach(ns, early=early)
        assert_running_ours(tc, ns, tc_obj)
        assert again in tc.by_netns[ns] and netns.ifindex(ns, "new0") in tc.by_netns[ns]
        assert {a.what for a in tc.by_netns[ns][again]} == {"ingress again1", "egress again1"}
    finally:
        early.close()
        tc.detach()
        for name in ("again1", "new0"):
            lab.ip(ns, "link", "del", name)
    assert "pt_tc_wait" not in held_prog_names()


def test_a_trace_starts_with_no_placeholder_left(trace, lab):
    """The session's own start: our programs on every device, the placeholder gone."""
    cap = trace()
    if not cap.tracer.plan.tc:
        pytest.skip("no tc observers on this kernel: kfunc bpf_cast_to_kern_ctx missing (Linux 6.2+)")
    obj = cap.tracer.obj
    assert_running_ours(cap.tracer.tc, lab.router, obj)
    assert cap.tracer._early_tcx is None and "pt_tc_wait" not in held_prog_names()
