"""Which mechanism observes each part of a packet's path on this kernel.

Every feature is probed, not inferred from a version number: a type or a
function in the kernel's BTF, a symbol in /proc/kallsyms, or a minimal
program the kernel is asked to load.  Two backends observe netfilter:

  nflink  netfilter BPF links at chosen priorities (Linux 6.4+): one
          observer before the first table of each hook and one after each
          table; nothing to patch in the kernel, works without fentry.
  fentry  fentry/fexit on the hook machinery (nf_hook_slow) and on each
          table (nft_do_chain, ipt_do_table, ip6t_do_table), for kernels
          without netfilter links (Debian 12's 6.1).  A table tells its
          verdict itself; a hook where no table is registered runs no hook
          function, so it shows no stage.

The rest is shared: tp_btf tracepoints for devices, drops, routes and
delivery (sk_data_ready by fentry on sock_def_readable before 6.3), and tc
observers where tc programs can name their packet (bpf_cast_to_kern_ctx,
6.2+), else the receive/queue tracepoints.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import struct
from collections.abc import Container
from dataclasses import dataclass, field

from . import kallsyms, libbpf

BACKENDS = ("auto", "nflink", "fentry", "kprobe")
# how tc ingress/egress is observed (--tc): TCX links, classic cls_bpf, or not at all
TC_MODES = ("auto", "tcx", "classic", "off")
BTF_KIND_FUNC = 12
BTF_KIND_STRUCT = 4
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24
MIN_KERNEL = (5, 8)            # BPF ring buffer, tp_btf with CO-RE

# The tp_btf programs of every backend: program -> (tracepoint, what it
# sees).  The session attaches these (less what the plan leaves off), doctor
# checks the kernel has them, a test checks the BPF source against them.
TRACEPOINT_PROGRAMS = {
    "on_rx": ("netif_receive_skb", "the receive, where no tc observer runs"),
    "on_dev_queue": ("net_dev_queue", "the hand-over to a device, where no tc observer runs"),
    "on_dev_xmit": ("net_dev_xmit", "a driver taking the packet: tx"),
    "on_kfree_skb": ("kfree_skb", "drops, with the kernel's reason"),
    "on_consume_skb": ("consume_skb", "ends that are not drops"),
    "on_copy_datagram": ("skb_copy_datagram_iovec", "a process reading the packet"),
    "on_sk_data_ready": ("sk_data_ready", "the packet queued to a socket"),
    "on_napi_poll": ("napi_poll", "the end of a poll: packets held for later"),
    "on_fib_lookup": ("fib_table_lookup", "IPv4 route lookups"),
    "on_fib6_lookup": ("fib6_table_lookup", "IPv6 route lookups"),
    "on_qdisc_enqueue": ("qdisc_enqueue", "a qdisc taking the packet: the qdisc stage starts"),
    "on_qdisc_dequeue": ("qdisc_dequeue", "a qdisc giving the packet to the driver: time queued"),
}
# tracepoints a kernel may lack, and what stands in for them
OPTIONAL_TRACEPOINTS = {"sk_data_ready": "Linux 6.3+: fentry or a kprobe on sock_def_readable stands in",
                        "qdisc_enqueue": "Linux 5.16+: no qdisc stage (time queued); qdisc drops still show",
                        "qdisc_dequeue": "no qdisc stage (time queued); qdisc drops still show"}
QDISC_PROGRAMS = ("on_qdisc_enqueue", "on_qdisc_dequeue")

# fentry backend programs and the kernel function each needs
FENTRY_PROGRAMS = {
    "fe_hook_entry": "nf_hook_slow",
    "fx_hook_exit": "nf_hook_slow",
    # (entered: a chain that drops frees the packet itself, before its exit)
    "fe_nft_chain": "nft_do_chain",
    "fx_nft_chain": "nft_do_chain",
    "fx_ipt_table": "ipt_do_table",
    "fx_ip6t_table": "ip6t_do_table",
    # the function each hook hands the packet to: it crossed the hook, tables or none
    "fd_pre4": "ip_rcv_finish", "fd_in4": "ip_local_deliver_finish", "fd_fwd4": "ip_forward_finish",
    "fd_out4": "__ip_local_out", "fd_post4": "ip_finish_output",
    "fd_pre6": "ip6_rcv_finish", "fd_in6": "ip6_input_finish", "fd_fwd6": "ip6_forward_finish",
    "fd_out6": "__ip6_local_out", "fd_post6": "ip6_finish_output",
    # (where the direct call to ip_rcv_finish is inlined: the input route lookup)
    "fd_pre4_route": "ip_route_input_noref", "fd_pre6_route": "ip6_route_input",
    # (where ip6_forward_finish refuses fentry: the output function after it)
    "fd_fwd6_out": "ip6_output",
}
# kprobe backend: the same observations as kprobes (kretprobes where fentry
# has fexit), for kernels that refuse fentry but have kprobes
KPROBE_PROGRAMS = {
    "kp_hook_entry": "nf_hook_slow", "kr_hook_exit": "nf_hook_slow",
    "kp_nft_chain": "nft_do_chain", "kr_nft_chain": "nft_do_chain",
    "kp_ipt_table": "ipt_do_table", "kr_ipt_table": "ipt_do_table",
    "kp_ip6t_table": "ip6t_do_table", "kr_ip6t_table": "ip6t_do_table",
    "kd_pre4": "ip_rcv_finish", "kd_in4": "ip_local_deliver_finish", "kd_fwd4": "ip_forward_finish",
    "kp_out4": "__ip_local_out", "kd_out4": "__ip_local_out", "kd_post4": "ip_finish_output",
    "kd_pre6": "ip6_rcv_finish", "kd_in6": "ip6_input_finish", "kd_fwd6": "ip6_forward_finish",
    "kp_out6": "__ip6_local_out", "kd_out6": "__ip6_local_out", "kd_post6": "ip6_finish_output",
    "kd_pre4_route": "ip_route_input_noref", "kd_pre6_route": "ip6_route_input",
    "kd_fwd6_out": "ip6_output",
}
KPROBE_DATA_READY = ("kp_data_ready", "sock_def_readable")
# every hook-machinery program of either backend, and the function it needs
HOOK_PROGRAMS = {**FENTRY_PROGRAMS, **KPROBE_PROGRAMS}
# program -> the program it stands in for: attached only if that one could not be
FALLBACK_FOR = {"fd_fwd6_out": "fd_fwd6", "kd_fwd6_out": "kd_fwd6"}
FENTRY_DATA_READY = ("fe_sk_data_ready", "sock_def_readable")
# what a fentry program that cannot be attached costs; the rest are required
OPTIONAL = frozenset(p for p in HOOK_PROGRAMS if p.startswith(("fd_", "kd_", "kp_out")) or
                     p.startswith(("fx_", "fe_", "kp_", "kr_")) and ("table" in p or "chain" in p))
WHAT_IS_MISSED = {p: "a hook with no table registered shows no stage there" for p in HOOK_PROGRAMS
                  if p.startswith(("fd_", "kd_", "kp_out"))}


class BackendError(Exception):
    """The kernel lacks what pkttrace needs; the message names it."""


@dataclass(frozen=True)
class Features:
    """What this kernel offers pkttrace (probed)."""
    kernel: str
    netfilter_link: bool        # BPF_PROG_TYPE_NETFILTER (struct bpf_nf_ctx), 6.4+
    cast_kfunc: bool            # bpf_cast_to_kern_ctx, 6.2+: tc observers know their skb
    sk_data_ready_tp: bool      # tracepoint sk:sk_data_ready, 6.3+
    fentry: str | None          # None if fentry loads, else why not
    kprobes: bool = False       # the kprobe PMU (or tracefs kprobe_events): kprobes attach
    # kernel functions present (kallsyms.Functions: looked up when asked)
    functions: Container[str] = field(default_factory=frozenset)
    hook_slow: tuple[int, int] | None = None    # nf_hook_slow's code [start, end), if kallsyms shows addresses
    qdisc_tp: bool = True       # tracepoints qdisc:qdisc_enqueue (5.16+) and qdisc_dequeue: the qdisc stage


@dataclass
class Plan:
    """The backend chosen for each feature, and what it cannot see."""
    netfilter: str                              # "nflink" | "fentry"
    tc: bool                                    # tc observers (else receive/queue tracepoints)
    data_ready: str | None                      # "tp" | "fentry" | None
    off: set[str] = field(default_factory=set)  # programs not to load
    notes: list[str] = field(default_factory=list)
    # nf_hook_slow's code: tells a conntrack drop from an nft chain's, so the
    # two can share an observer (placement.plan's merge_conntrack)
    hook_slow: tuple[int, int] | None = None

    def counters_on_demand(self) -> bool:
        """May count mode's per-CPU hashes take an element when a key first
        comes (BPF_F_NO_PREALLOC) rather than all of them at load?  Where
        netfilter links are (6.4+: per-CPU hashes allocate through
        bpf_mem_alloc, from any context) and no kprobe program shares them
        (for kprobes, kernels before it warn, WARN_ONCE, of run-time
        allocated per-CPU hashes)."""
        return self.netfilter == "nflink" and self.data_ready == "tp"

    def describe(self) -> str:
        nf = {"nflink": "netfilter BPF links", "fentry": "fentry on nf_hook_slow and each table",
              "kprobe": "kprobes on nf_hook_slow and each table"}[self.netfilter]
        tc = "tc observers (TCX or cls_bpf)" if self.tc else "receive/queue tracepoints (no tc stages)"
        return f"tp_btf tracepoints, {nf}, {tc}"


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def fentry_refusal(btf: libbpf.Btf) -> str | None:
    """Load a minimal fentry program (on ip_rcv); None if the kernel takes it."""
    tid = btf.find("ip_rcv", BTF_KIND_FUNC)
    if tid is None:
        return "no BTF for ip_rcv"
    insns = (ctypes.c_uint64 * 2)(0x00000000000000B7, 0x0000000000000095)  # r0 = 0; exit
    lic = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_ubyte * 128)()
    struct.pack_into("=IIQQ", attr, 0, BPF_PROG_TYPE_TRACING, 2, ctypes.addressof(insns), ctypes.addressof(lic))
    struct.pack_into("=I", attr, 68, BPF_TRACE_FENTRY)
    struct.pack_into("=I", attr, 108, tid)
    try:
        fd = libbpf.bpf_syscall(BPF_PROG_LOAD, attr)
    except OSError as e:
        return f"refused: {e.strerror}"      # bpf_syscall's: os.strerror(errno)
    os.close(fd)
    return None


def kprobes_available() -> bool:
    """Can kprobes be attached: the kprobe PMU, or the legacy tracefs interface."""
    return any(os.path.exists(p) for p in ("/sys/bus/event_source/devices/kprobe/type",
                                           "/sys/kernel/tracing/kprobe_events",
                                           "/sys/kernel/debug/tracing/kprobe_events"))


def require_kernel() -> None:
    """BackendError below Linux 5.8: said before anything asks for BTF."""
    if _kernel_version() < MIN_KERNEL:
        raise BackendError(f"Linux {platform.release()} is too old: pkttrace needs 5.8 or later "
                           "(BPF ring buffer, BTF tracepoints)")


def probe(btf: libbpf.Btf | None = None) -> Features:
    """Probe this kernel; BackendError below Linux 5.8 or without BTF.
    `btf`: the kernel's, already parsed (the session shares one parse with
    names.read_kernel_btf: ~15 ms of start each); else parsed here."""
    require_kernel()
    if btf is None:
        try:
            with libbpf.Btf.vmlinux() as own:
                return probe(own)
        except libbpf.BpfError as e:
            raise BackendError(str(e)) from None
    text = kallsyms.take()
    return Features(
        kernel=platform.release(),
        netfilter_link=btf.find("bpf_nf_ctx", BTF_KIND_STRUCT) is not None,
        cast_kfunc=btf.find("bpf_cast_to_kern_ctx", BTF_KIND_FUNC) is not None,
        sk_data_ready_tp=btf.has_type("btf_trace_sk_data_ready", libbpf.BTF_KIND_TYPEDEF),
        fentry=fentry_refusal(btf),
        kprobes=kprobes_available(),
        functions=kallsyms.Functions(text), hook_slow=kallsyms.code_of(text, b"nf_hook_slow"),
        qdisc_tp=all(btf.has_type(f"btf_trace_{tp}", libbpf.BTF_KIND_TYPEDEF)
                     for tp in ("qdisc_enqueue", "qdisc_dequeue")))


def plan(feat: Features, backend: str = "auto", tc: str = "auto") -> Plan:
    """Choose per feature; BackendError if the asked-for backend cannot run here."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose {', '.join(BACKENDS)}")
    fentry_ok = feat.fentry is None and "nf_hook_slow" in feat.functions
    kprobe_ok = feat.kprobes and "nf_hook_slow" in feat.functions
    if backend == "auto":
        backend = "nflink" if feat.netfilter_link else "fentry" if fentry_ok else "kprobe" if kprobe_ok else ""
        if not backend:
            raise BackendError("this kernel has neither netfilter BPF links (Linux 6.4+), nor fentry on "
                               f"nf_hook_slow ({feat.fentry or 'nf_hook_slow not found'}), nor kprobes: "
                               "netfilter hooks cannot be observed")
    elif backend == "nflink" and not feat.netfilter_link:
        raise BackendError("--backend nflink: this kernel has no netfilter BPF links (Linux 6.4+)")
    elif backend == "fentry" and not fentry_ok:
        raise BackendError(f"--backend fentry: fentry on nf_hook_slow is not available here "
                           f"({feat.fentry or 'nf_hook_slow not found'})")
    elif backend == "kprobe" and not kprobe_ok:
        raise BackendError("--backend kprobe: " + ("nf_hook_slow not found" if feat.kprobes else
                                                   "this kernel has no kprobes (no kprobe PMU or kprobe_events)"))
    p = Plan(netfilter=backend, tc=tc != "off" and feat.cast_kfunc, data_ready=None, hook_slow=feat.hook_slow)
    nf_obs = {"nf_obs_0", "nf_obs_1"}
    if backend == "nflink":
        p.off |= set(HOOK_PROGRAMS)
    else:
        mine = FENTRY_PROGRAMS if backend == "fentry" else KPROBE_PROGRAMS
        p.off |= nf_obs | (set(HOOK_PROGRAMS) - set(mine))
        for prog, fn in mine.items():
            if fn not in feat.functions:
                p.off.add(prog)
        if "nft_do_chain" not in feat.functions:
            p.notes.append("nf_tables is not loaded: nft and iptables-nft tables are not observed one by one")
        missing = sorted({fn for prog, fn in mine.items() if prog.startswith(("fd_", "kd_")) and fn not in
                          feat.functions})
        if missing:
            p.notes.append(f"{backend} backend: a hook where no table is registered shows no stage where "
                           f"{', '.join(missing)} cannot be attached")
    if tc != "off" and not feat.cast_kfunc:
        p.notes.append("no tc stages or tc verdicts: tc observers need the kfunc bpf_cast_to_kern_ctx "
                       "(Linux 6.2+); receive and hand-over come from tracepoints")
    p.off |= {"on_rx", "on_dev_queue"} if p.tc else {"tc_ingress", "tc_egress"}
    p.off.add("pt_pcap_selftest")   # tests run it (BPF_PROG_TEST_RUN); a trace never does
    if not feat.qdisc_tp:
        p.off |= set(QDISC_PROGRAMS)
        p.notes.append("no qdisc tracepoints (qdisc_enqueue: Linux 5.16+): no qdisc stage (time queued); "
                       "qdisc drops still show")
    if feat.sk_data_ready_tp:
        p.data_ready = "tp"
        p.off |= {FENTRY_DATA_READY[0], KPROBE_DATA_READY[0]}
    elif backend != "kprobe" and feat.fentry is None and FENTRY_DATA_READY[1] in feat.functions:
        p.data_ready = "fentry"
        p.off |= {"on_sk_data_ready", KPROBE_DATA_READY[0]}
    elif feat.kprobes and KPROBE_DATA_READY[1] in feat.functions:
        p.data_ready = "kprobe"
        p.off |= {"on_sk_data_ready", FENTRY_DATA_READY[0]}
    else:
        p.off |= {"on_sk_data_ready", FENTRY_DATA_READY[0], KPROBE_DATA_READY[0]}
        p.notes.append("no sk_data_ready tracepoint (Linux 6.3+), fentry or kprobes: a UDP datagram queued "
                       "to a socket is seen delivered only when read")
    return p
