"""A load that fails still says why (libbpf.BpfObject.load).

Loads run with libbpf's messages off (each of its ~2,700 debug callbacks
would wait for the GIL while the session's other thread runs Python); a
failed load is repeated on a replica of the object with the messages on.
These loads are refused on purpose, by the kernel's verifier or by libbpf
itself, and the error must carry the reason, as it did with the messages on.
"""
from __future__ import annotations

import ctypes
import os

import pytest

from tracer import backends, libbpf, observers

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")]

BPF_PROG_TYPE_TRACEPOINT = 5


def only(obj, name):
    for p in obj.programs():
        if p.name != name:
            p.set_autoload(False)
    return obj.program(name)


def test_the_verifiers_reason_is_in_the_error():
    obj = libbpf.BpfObject(libbpf.object_path())
    try:
        # tc_ingress as a tracepoint program: its context is no __sk_buff
        only(obj, "tc_ingress").set_type(BPF_PROG_TYPE_TRACEPOINT)
        with pytest.raises(libbpf.BpfError) as e:
            obj.load()
    finally:
        obj.close()
    msg = str(e.value)
    assert "load BPF programs" in msg and "prog 'tc_ingress'" in msg
    assert "END PROG LOAD LOG" in msg or "failed to load" in msg, msg


def test_libbpfs_own_reason_is_in_the_error():
    """The netfilter observers' section is unknown to libbpf 1.1: without the
    type the session sets, libbpf refuses before the kernel sees them."""
    obj = libbpf.BpfObject(libbpf.object_path())
    try:
        only(obj, "nf_obs_0")
        with pytest.raises(libbpf.BpfError) as e:
            obj.load()
    finally:
        obj.close()
    assert "prog 'nf_obs_0': missing BPF prog type" in str(e.value)


@pytest.mark.skipif(backends._kernel_version() < (6, 4), reason="netfilter BPF programs need Linux 6.4+")
def test_a_replica_keeps_the_settings_that_made_the_load_succeed():
    """The replica is this object's settings: the same program, given the
    type the session gives it, loads (so a failure repeated on the replica
    is the original's, not one of its own)."""
    obj = libbpf.BpfObject(libbpf.object_path())
    try:
        only(obj, "nf_obs_0").set_type(libbpf.BPF_PROG_TYPE_NETFILTER, libbpf.BPF_NETFILTER)
        obj.map("events").set_max_entries(4096)
        assert obj._why_not_loaded() == ""      # the replica loads: nothing to say
    finally:
        obj.close()


def _print_fn_now() -> int | None:
    """The address of libbpf's print callback now (libbpf_set_print returns
    the one it replaces; it is put back at once)."""
    lib = libbpf.lib()
    old = lib.libbpf_set_print(libbpf._print_cb)
    lib.libbpf_set_print(ctypes.cast(old, libbpf._PRINT_FN) if old else libbpf._NO_PRINT)
    return old


def test_messages_are_on_again_after_loads_in_two_threads():
    """load_split loads two objects at once, each quietly: the callback is
    the process's, so it must come back only after both, and come back (an
    attach failure says why through it)."""
    with libbpf.Btf.vmlinux() as kb:
        plan = backends.plan(backends.probe(kb), "auto", "auto")
    obj = libbpf.BpfObject(libbpf.object_path())
    try:
        observers.select_programs(obj, plan)
        obj.load_split({*observers.nf_programs(), *backends.HOOK_PROGRAMS})
        assert len(obj.parts) == 2
    finally:
        obj.close()
    assert _print_fn_now() == ctypes.cast(libbpf._print_cb, ctypes.c_void_p).value
