"""`pkttrace doctor`: what this kernel offers and what pkttrace will use.

Each feature is tried, not inferred from a version number: the object is
loaded, links are created in a throwaway network namespace and closed, and
fentry is asked for with a minimal program.
"""
from __future__ import annotations

import platform
import uuid
from dataclasses import dataclass

from . import backends, caps, libbpf, observers, probes

TRACEPOINTS = tuple(tp for tp, _ in backends.TRACEPOINT_PROGRAMS.values())


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
    why = backends.fentry_refusal(btf)
    if why is None:
        return Check("fentry/fexit", True, "loads (the fentry backend can run)", required=False)
    return Check("fentry/fexit", False, why, required=False)


def _kprobe_check() -> Check:
    ok = backends.kprobes_available()
    return Check("kprobes", ok, "available (the kprobe backend can run)" if ok else
                 "not built in (no kprobe PMU or kprobe_events): no kprobe backend", required=False)


def _attach_checks(obj: libbpf.BpfObject, plan: backends.Plan) -> list[Check]:
    """Create and close the links the plan uses, in a throwaway netns."""
    from pyroute2 import netns as pr_netns
    name = f"pkttrace-doctor-{uuid.uuid4().hex[:8]}"
    out = []
    try:
        pr_netns.create(name)
    except OSError as e:
        # as a non-root uid with capabilities: /run/netns is root's to write
        return [Check("attach", False, f"cannot make a throwaway netns to try attaching in ({e.strerror}): "
                      "run doctor as root for this check", required=False)]
    try:
        if plan.netfilter == "nflink":
            try:
                link = probes.attach_netfilter(obj.program("nf_obs_0").fd, 4, 0, probes.PRIO_FIRST, name)
                link.close()
                out.append(Check("netfilter BPF links", True, "attach per netns (Linux 6.4+)"))
            except probes.AttachError as e:
                out.append(Check("netfilter BPF links", False, str(e)))
        if plan.tc:
            try:
                link = probes.attach_tcx(obj.program("tc_ingress").fd, 1, "lo", True, name)
                link.close()
                out.append(Check("TCX links", True, "tc observers as fd-owned links (Linux 6.6+)"))
            except probes.AttachError as e:
                out.append(Check("TCX links", False, f"{e}; classic clsact + cls_bpf will be used",
                                 required=False))
    finally:
        pr_netns.remove(name)
    # what the plan does not use is still named, with why
    if plan.netfilter != "nflink":
        out.append(Check("netfilter BPF links", False, "not in this kernel (BPF_PROG_TYPE_NETFILTER, Linux 6.4+): "
                         f"the {plan.netfilter} backend observes the hooks", required=False))
    if not plan.tc:
        out.append(Check("TCX links", False, "not used: tc programs cannot name their packet here (kfunc "
                         "bpf_cast_to_kern_ctx, Linux 6.2+)", required=False))
    return out


def _feature_checks(plan: backends.Plan) -> list[Check]:
    """Per feature: the backend that observes it, or why it is not seen."""
    nf = {"nflink": "netfilter BPF links: an observer before the first table and after each one",
          "fentry": "fentry on nf_hook_slow and on each table (nft_do_chain, ...)",
          "kprobe": "kprobes on nf_hook_slow and on each table (nft_do_chain, ...)"}[plan.netfilter]
    out = [Check("netfilter hooks and tables", True, nf),
           Check("tc stages and verdicts", plan.tc,
                 "tc observers" if plan.tc else "unavailable: tc programs cannot name their packet before 6.2 "
                 "(kfunc bpf_cast_to_kern_ctx); rx/tx from tracepoints", required=False),
           Check("socket delivery (UDP queued)", plan.data_ready is not None,
                 {"tp": "tracepoint sk_data_ready", "fentry": "fentry on sock_def_readable",
                  "kprobe": "kprobe on sock_def_readable"}.get(
                     plan.data_ready or "", "unavailable: seen only when the datagram is read"), required=False)]
    return out


def run() -> list[Check]:
    from .libbpf import object_path
    from .session import TraceError
    checks = [Check("kernel", True, platform.release(), required=False)]
    # the capabilities a trace needs, as the trace itself checks them (not uid 0)
    try:
        lacking = caps.missing(caps.needed(), caps.effective())
    except caps.CapsError as e:
        checks.append(Check("capabilities", False, str(e)))
        return checks
    if lacking:
        checks.append(Check("capabilities", False, caps.missing_message(lacking)))
        return checks
    checks.append(Check("capabilities", True, " ".join(caps.NAMES[c] for c in caps.needed())))
    try:
        btf = libbpf.Btf.vmlinux()
    except libbpf.BpfError as e:
        checks.append(Check("kernel BTF", False, str(e)))
        return checks
    try:
        checks.append(Check("kernel BTF", True, "/sys/kernel/btf/vmlinux (CO-RE relocations)"))
        for tp in TRACEPOINTS:
            ok = btf.has_type(f"btf_trace_{tp}", libbpf.BTF_KIND_TYPEDEF)
            optional = backends.OPTIONAL_TRACEPOINTS.get(tp)
            optional = f" ({optional})" if optional else None
            checks.append(Check(f"tracepoint {tp}", ok, "tp_btf" if ok else f"missing in this kernel{optional or ''}",
                                required=optional is None))
        reasons = btf.enum("skb_drop_reason")
        checks.append(Check("drop reasons", bool(reasons), f"{len(reasons)} names from BTF enum skb_drop_reason"
                            if reasons else "enum skb_drop_reason missing: reasons shown as numbers",
                            required=False))
        checks.append(_fentry_check(btf))
    finally:
        btf.close()
    checks.append(_kprobe_check())
    try:
        bplan = backends.plan(backends.probe())
    except backends.BackendError as e:
        checks.append(Check("backends", False, str(e)))
        return checks
    checks.extend(_feature_checks(bplan))
    try:
        obj = libbpf.BpfObject(object_path())
    except (libbpf.BpfError, TraceError) as e:
        checks.append(Check("BPF object", False, str(e)))
        return checks
    try:
        observers.select_programs(obj, bplan)
        obj.load()
        checks.append(Check("BPF programs load", True, f"{object_path()}"))
        checks.extend(_attach_checks(obj, bplan))
    except libbpf.BpfError as e:
        checks.append(Check("BPF programs load", False, str(e)))
    finally:
        obj.close()
    checks.append(Check("plan", True, bplan.describe(), required=False))
    return checks


def plan(checks: list[Check]) -> str:
    """What pkttrace will use, in one line."""
    by = {c.name: c for c in checks}
    used = by["plan"].detail if "plan" in by else "tp_btf tracepoints"
    if "TCX links" in by and not by["TCX links"].ok:
        used = used.replace("TCX or cls_bpf", "classic cls_bpf")
    return f"pkttrace will use: {used}"
