"""`pkttrace doctor`: what this kernel offers and what pkttrace will use.

Each feature is tried, not inferred from a version number: the object is
loaded, links are created in a throwaway network namespace and closed, and
fentry is asked for with a minimal program.
"""
from __future__ import annotations

import ctypes
import os
import platform
import struct
import uuid
from dataclasses import dataclass

from . import libbpf, probes

TRACEPOINTS = ("netif_receive_skb", "net_dev_queue", "net_dev_xmit", "kfree_skb", "consume_skb",
               "skb_copy_datagram_iovec", "sk_data_ready", "napi_poll", "fib_table_lookup", "fib6_table_lookup")
BTF_KIND_FUNC = 12
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "no  ")
        return f"{mark}  {self.name:<34} {self.detail}"


def _fentry_check(btf: libbpf.Btf) -> Check:
    tid = btf.find("ip_rcv", BTF_KIND_FUNC)
    if tid is None:
        return Check("fentry/fexit", False, "no BTF for ip_rcv", required=False)
    insns = (ctypes.c_uint64 * 2)(0x00000000000000B7, 0x0000000000000095)  # r0 = 0; exit
    lic = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_ubyte * 128)()
    struct.pack_into("=IIQQ", attr, 0, BPF_PROG_TYPE_TRACING, 2, ctypes.addressof(insns), ctypes.addressof(lic))
    struct.pack_into("=I", attr, 68, BPF_TRACE_FENTRY)
    struct.pack_into("=I", attr, 108, tid)
    try:
        fd = libbpf.bpf_syscall(BPF_PROG_LOAD, attr)
    except OSError as e:
        return Check("fentry/fexit", False, f"refused: {os.strerror(e.errno)} (not needed)", required=False)
    os.close(fd)
    return Check("fentry/fexit", True, "loads (not needed on this kernel)", required=False)


def _kprobe_check() -> Check:
    ok = os.path.exists("/sys/bus/event_source/devices/kprobe/type")
    return Check("kprobes", ok, "available (not needed)" if ok else
                 "not built in (no kprobe PMU); pkttrace does not need them", required=False)


def _attach_checks(obj: libbpf.BpfObject) -> list[Check]:
    """Create and close one netfilter and one TCX link in a throwaway netns."""
    from pyroute2 import netns as pr_netns
    name = f"pkttrace-doctor-{uuid.uuid4().hex[:8]}"
    out = []
    pr_netns.create(name)
    try:
        try:
            link = probes.attach_netfilter(obj.program("nf_obs_0").fd, 4, 0, probes.PRIO_FIRST, name)
            link.close()
            out.append(Check("netfilter BPF links", True, "attach per netns (Linux 6.4+)"))
        except probes.AttachError as e:
            out.append(Check("netfilter BPF links", False, str(e)))
        try:
            link = probes.attach_tcx(obj.program("tc_ingress").fd, 1, "lo", True, name)
            link.close()
            out.append(Check("TCX links", True, "tc observers as fd-owned links (Linux 6.6+)"))
        except probes.AttachError as e:
            out.append(Check("TCX links", False, f"{e}; classic clsact + cls_bpf will be used", required=False))
    finally:
        pr_netns.remove(name)
    return out


def run() -> list[Check]:
    from .session import TraceError, object_path
    checks = [Check("kernel", True, platform.release(), required=False)]
    if os.geteuid() != 0:
        checks.append(Check("root", False, "run as root: loading BPF needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"))
        return checks
    checks.append(Check("root", True, "yes"))
    try:
        btf = libbpf.Btf.vmlinux()
    except libbpf.BpfError as e:
        checks.append(Check("kernel BTF", False, str(e)))
        return checks
    try:
        checks.append(Check("kernel BTF", True, "/sys/kernel/btf/vmlinux (CO-RE relocations)"))
        for tp in TRACEPOINTS:
            ok = btf.has_type(f"btf_trace_{tp}", libbpf.BTF_KIND_TYPEDEF)
            checks.append(Check(f"tracepoint {tp}", ok, "tp_btf" if ok else "missing in this kernel"))
        reasons = btf.enum("skb_drop_reason")
        checks.append(Check("drop reasons", bool(reasons), f"{len(reasons)} names from BTF enum skb_drop_reason"
                            if reasons else "enum skb_drop_reason missing: reasons shown as numbers",
                            required=False))
        checks.append(_fentry_check(btf))
    finally:
        btf.close()
    checks.append(_kprobe_check())
    try:
        obj = libbpf.BpfObject(object_path())
    except (libbpf.BpfError, TraceError) as e:
        checks.append(Check("BPF object", False, str(e)))
        return checks
    try:
        for p in obj.programs():
            if p.name.startswith("nf_obs_"):
                p.set_type(libbpf.BPF_PROG_TYPE_NETFILTER, libbpf.BPF_NETFILTER)
        obj.load()
        checks.append(Check("BPF programs load", True, f"{object_path()}"))
        checks.extend(_attach_checks(obj))
    except libbpf.BpfError as e:
        checks.append(Check("BPF programs load", False, str(e)))
    finally:
        obj.close()
    return checks


def plan(checks: list[Check]) -> str:
    """What pkttrace will use, in one line."""
    by = {c.name: c for c in checks}
    tc = "TCX" if by.get("TCX links", Check("", False, "")).ok else "classic cls_bpf"
    return f"pkttrace will use: tp_btf tracepoints, netfilter BPF links, {tc} for tc ingress/egress"
