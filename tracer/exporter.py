"""`pkttrace serve`: Prometheus metrics from counters the kernel keeps.

In count mode the BPF programs send nothing per packet: when a packet's
traversal ends they add one to its path's per-CPU counter (path_counts)
and keep the first record of each new path (path_examples).  At scrape time
this collector reads those maps and turns each path into the labels it
contributes to (hooks and tables crossed, mark changes, NAT rewrites, route
lookups, drop reason/stage/table, devices), through the same path assembly
`pkttrace` uses to print packets.  A path is resolved once; a scrape costs
one map read per path, never anything per packet.

Metric names and labels: docs/metrics.md.
"""
from __future__ import annotations

import ctypes
import os
import platform
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as Registered

from . import events, libbpf, model, paths, placement, probes
from .version import __version__
from .events import PT_QDISC_BUCKETS, PtDropKey, PtPathKey, PtQdiscKey, PtRecord
from .session import DROP_TOTALS, QDISC_HIST, Tracer



def path_label(p: model.Packet) -> str:
    """`rx rc > prerouting > route 100 > forward > postrouting > tx rs2`: readable, bounded by topology."""
    out = []
    for s in p.path:
        if s.stage in ("rx", "tx") and s.dev:
            out.append(f"{s.stage} {s.dev}")
        elif s.route is not None:
            out.append(f"{s.stage} {s.route.tables[-1]}")
        else:
            out.append(s.stage)
    return " > ".join(out)


# the table label of packets that crossed a hook while its ruleset changed
CHANGING = "(changing)"


@dataclass
class PathLabels:
    """Everything one path adds to, per packet on it: resolved once."""
    netns: str
    family: str
    proto: str
    fate: str
    path_sig: str
    path: str
    hooks: list[tuple] = field(default_factory=list)        # (hook,)
    tables: list[tuple] = field(default_factory=list)       # (hook, table)
    marks: list[tuple] = field(default_factory=list)        # (hook, table)
    nat: list[tuple] = field(default_factory=list)          # (hook, kind)
    routes: list[tuple] = field(default_factory=list)       # (table, result)
    ifaces: list[tuple] = field(default_factory=list)       # (device, direction)
    drop: tuple | None = None                               # (reason, stage, table)
    stages: tuple[str, ...] = ()                            # the path's stages, for the page's edges
    qdisc_drop: tuple | None = None                         # (device, qdisc kind, handle, reason)


def resolve(p: model.Packet) -> PathLabels:
    # proto: the kernel's path key has it (a UDP and an ICMP packet on the
    # same path are two keys); without the label their series would carry
    # identical label sets.  Names for the common ones, the number otherwise
    pl = PathLabels(p.netns or "", p.family, p.proto or str(p.proto_num), p.fate, f"{p.path_sig:08x}",
                    path_label(p), stages=tuple(p.stage_names()))
    for s in p.path:
        if s.is_hook:
            pl.hooks.append((s.stage,))
            if s.attribution == "changing":
                # crossed while the ruleset changed: which tables, unknown
                pl.tables.append((s.stage, CHANGING))
            for t in s.tables:
                if t.verdict == "accept":
                    pl.tables.append((s.stage, t.table))
                if t.mark != t.mark_in:
                    pl.marks.append((s.stage, t.table))
                for kind in ("src", "dst"):
                    if t.nat and kind in t.nat:
                        pl.nat.append((s.stage, kind))
        for lk in s.lookups:
            # label values lower case: errors without a route type are errno names
            pl.routes.append((lk.table, (lk.type or "").lower()))
        if s.stage in ("rx", "tx") and s.dev:
            pl.ifaces.append((s.dev, s.stage))
    if p.drop:
        table = CHANGING if p.drop.attribution == "changing" else p.drop.table or ""
        pl.drop = (p.drop.reason, p.drop.stage or "", table)
        if p.drop.stage == "qdisc":
            q = p.drop.qdisc
            pl.qdisc_drop = (p.drop.dev or "", (q.kind or "") if q else "", q.handle if q else "", p.drop.reason)
    return pl


# pkttrace_qdisc_queue_seconds' upper bounds: the kernel's buckets (powers
# of 4 from 1 us: bucket i holds waits up to 4^i us), the last one +Inf
QDISC_BOUNDS = [1e-6 * 4 ** i for i in range(PT_QDISC_BUCKETS - 1)]


class QdiscHist:
    """Queueing time per (netns, device, root qdisc), from the kernel's
    per-CPU buckets (map qdisc_hist, counted at each dequeue)."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.entries = 0

    def read(self) -> dict[tuple[str, str, str, str], tuple[list[int], float]]:
        """(netns, device, qdisc kind, handle) -> (packets per bucket, seconds summed)."""
        ctx = self.tracer.ctx
        m = self.tracer._obj.map("qdisc_hist")
        ncpu = libbpf.possible_cpus()
        out: dict[tuple[str, str, str, str], tuple[list[int], float]] = {}
        self.entries = 0
        for key in m.keys(PtQdiscKey):
            self.entries += 1
            vals = (ctypes.c_uint64 * (2 * ncpu))()      # struct pt_qdisc_val per CPU: packets, ns
            if libbpf.lib().bpf_map_lookup_elem(m.fd, ctypes.byref(key), vals):
                continue
            ns = ctx.netns_names.get(key.netns)
            if ns is None or key.bucket >= PT_QDISC_BUCKETS:
                continue                   # a netns no longer traced
            q = ctx.qdisc(key.netns, key.ifindex, key.handle)
            labels = (ns, ctx.dev(key.netns, key.ifindex) or "", (q.kind or "") if q else "",
                      q.handle if q else "")
            counts, total = out.get(labels) or ([0] * PT_QDISC_BUCKETS, 0.0)
            counts[key.bucket] += sum(vals[0::2])
            out[labels] = (counts, total + sum(vals[1::2]) / 1e9)
        return out


class PathCounts:
    """The kernel's per-path counters, with each path's labels cached."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self._labels: dict[bytes, PathLabels | None] = {}
        self._epoch = tracer.netns_epoch
        self.entries = 0        # keys in path_counts at the last read

    def read(self) -> list[tuple[PathLabels, int]]:
        obj = self.tracer._obj   # a collector reads a started tracer
        counts, examples = obj.map("path_counts"), obj.map("path_examples")
        out = []
        rec = PtRecord()
        self.entries = 0
        if self._epoch != self.tracer.netns_epoch:
            # a netns stopped being traced (its paths were deleted with it):
            # its inode may come back for another namespace, under another name
            self._epoch = self.tracer.netns_epoch
            self._labels.clear()
        for key in counts.keys(PtPathKey):
            self.entries += 1
            n = counts.percpu_u64_sum(key)
            if not n:
                continue
            kb = bytes(key)
            labels = self._labels.get(kb)
            if labels is None:
                if not examples.lookup(key, rec):
                    continue   # the example is written right after the first count
                k = min(rec.n_stages, events.PT_MAX_STAGES)
                raw = bytes(rec)[:events.RECORD_HEADER_SIZE + k * events.STAGE_SIZE]
                labels = self._labels[kb] = resolve(paths.assemble(raw, self.tracer.ctx))
            out.append((labels, n))
        return out


class DropTotals:
    """Drops per (netns, family, reason) as the kernel counts them apart from
    the paths (map drop_totals): what path_counts could not hold is still
    in drops_total, as the (overflow) stage and table."""

    OVERFLOW = "(overflow)"

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.entries = 0
        self._shortfall: dict[tuple, int] = {}   # largest seen: a counter never goes down

    def read(self) -> dict[tuple[str, str, str], int]:
        """(netns name, family, reason name) -> drops."""
        ctx = self.tracer.ctx
        out: dict[tuple[str, str, str], int] = {}
        self.entries = 0
        m = self.tracer._obj.map("drop_totals")
        for key in m.keys(PtDropKey):
            self.entries += 1
            ns = ctx.netns_names.get(key.netns)
            n = m.percpu_u64_sum(key)
            if ns is None or n is None:
                continue               # a netns no longer traced (its keys are being deleted)
            k = (ns, f"ipv{key.family}", ctx.drop_reason(key.reason))
            out[k] = out.get(k, 0) + n
        return out

    def shortfall(self, by_path: Counter, totals: dict[tuple[str, str, str], int] | None = None) -> dict[tuple, int]:
        """Drops not on any counted path, per (netns, family, reason):
        drops_total's (overflow) series.  `totals`: read() made before the
        paths were read (else it is read now)."""
        per_reason: Counter = Counter()
        for (ns, fam, reason, _stage, _table), n in by_path.items():
            per_reason[(ns, fam, reason)] += n
        for k, total in (self.read() if totals is None else totals).items():
            missing = total - per_reason.get(k, 0)
            if missing > self._shortfall.get(k, 0):
                self._shortfall[k] = missing
        return dict(self._shortfall)


@dataclass
class Snapshot:
    """The counters at one moment, read once: what collect() exports and
    the page's /flow.json draws (tracer/diagram.py)."""
    t: float                                   # time.monotonic() of the read
    paths: list[tuple[PathLabels, int]]        # each counted path and its packets
    sums: dict[str, Counter]                   # metric family -> label values -> packets
    # netns name -> hook -> [(table, priority)] registered there (both families)
    registered: dict[str, dict[str, list[tuple[str, int]]]] = field(default_factory=dict)

    @property
    def drops(self) -> Counter:
        """(netns, family, reason, stage, table) -> drops, the (overflow) ones included."""
        return self.sums["drops"]


class Collector(Registered):
    """prometheus-client custom collector over a running count-mode Tracer."""

    def __init__(self, tracer: Tracer, lock: threading.Lock | None = None, bpf_stats: bool = False):
        self.tracer = tracer
        self.paths = PathCounts(tracer)
        self.drops = DropTotals(tracer)
        self.qdisc = QdiscHist(tracer)
        self.lock = lock or threading.Lock()
        self.kernel = platform.release()
        self._last_scrape = 0.0
        self.stats_fd = -1
        if bpf_stats:
            try:
                self.stats_fd = libbpf.enable_run_time_stats()
            except libbpf.BpfError:
                pass   # run time then reads 0; the doctor tells why

    def close(self) -> None:
        if self.stats_fd >= 0:
            os.close(self.stats_fd)
            self.stats_fd = -1

    # -- families ----------------------------------------------------------

    def _families(self) -> dict[str, object]:
        C, G = CounterMetricFamily, GaugeMetricFamily
        return {
            "packets": C("pkttrace_packets", "Packets whose traversal ended, by fate",
                         labels=["netns", "family", "fate"]),
            "hooks": C("pkttrace_hook_packets", "Packets that entered a netfilter hook",
                       labels=["netns", "family", "hook"]),
            "tables": C("pkttrace_table_packets", "Packets that came out of a table (or nft base chain), accepted",
                        labels=["netns", "family", "hook", "table"]),
            "drops": C("pkttrace_drops", "Packets freed with a drop reason, where and by which table",
                       labels=["netns", "family", "reason", "stage", "table"]),
            "qdisc_drops": C("pkttrace_qdisc_drops", "Packets a qdisc dropped, per device, root qdisc and reason",
                             labels=["netns", "dev", "qdisc", "handle", "reason"]),
            "qdisc_queue": HistogramMetricFamily("pkttrace_qdisc_queue_seconds",
                                                 "Time packets waited in a device's qdisc (enqueue to dequeue)",
                                                 labels=["netns", "dev", "qdisc", "handle"]),
            "paths": C("pkttrace_paths", "Packets per distinct path",
                       labels=["netns", "family", "proto", "path_sig", "path", "fate"]),
            "routes": C("pkttrace_route_lookups", "FIB table lookups by table and result",
                        labels=["netns", "family", "table", "result"]),
            "marks": C("pkttrace_mark_changes", "Packets whose mark a table changed",
                       labels=["netns", "family", "hook", "table"]),
            "nat": C("pkttrace_nat_rewrites", "NAT rewrites seen at a hook", labels=["netns", "family", "hook", "kind"]),
            "ifaces": C("pkttrace_interface_packets", "Packets received / queued for transmit per device",
                        labels=["netns", "device", "direction"]),
            "lost": C("pkttrace_events_lost", "Packets the kernel could not count (in-flight or path map full)"),
            "aged": C("pkttrace_records_aged_out", "In-flight records whose end was never seen, removed by age"),
            "inflight": G("pkttrace_inflight_records", "Packets followed right now"),
            "entries": G("pkttrace_map_entries", "Entries in a bounded kernel map", labels=["map"]),
            "capacity": G("pkttrace_map_capacity", "Size of a bounded kernel map", labels=["map"]),
            "overflow": C("pkttrace_map_overflow", "Updates refused because the map was full", labels=["map"]),
            "run_s": C("pkttrace_bpf_run_seconds", "CPU time spent in each BPF program", labels=["program"]),
            "runs": C("pkttrace_bpf_runs", "Runs of each BPF program", labels=["program"]),
            "attach": C("pkttrace_attach_failures", "Attach attempts that failed (re-placement included)"),
            "observers": G("pkttrace_observers", "Netfilter observers attached", labels=["netns", "family", "hook"]),
            "attached": G("pkttrace_attached", "1 while this program's attachment is live in the kernel, else 0",
                          labels=["program", "netns", "target"]),
            "build": G("pkttrace_build_info", "pkttrace version and kernel", labels=["version", "kernel"]),
            "scrape": G("pkttrace_scrape_duration_seconds", "Time the last collect() took"),
        }

    def describe(self):
        return list(self._families().values())

    def collect(self):
        t0 = time.monotonic()
        f = self._families()
        with self.lock:
            for name, counter in self._snapshot().sums.items():
                for labels, v in counter.items():
                    f[name].add_metric(list(labels), v)
            self._collect_qdisc(f)
            self._collect_self(f)
        f["scrape"].add_metric([], self._last_scrape)
        self._last_scrape = time.monotonic() - t0
        return list(f.values())

    def snapshot(self) -> Snapshot:
        """The path counters now, with the tables of each hook (the page)."""
        with self.lock:
            snap = self._snapshot()
            snap.registered = self._registered()
        return snap

    def _registered(self) -> dict[str, dict[str, list[tuple[str, int]]]]:
        t = self.tracer
        out: dict[str, dict[str, list[tuple[str, int]]]] = {}
        for ns, ino in t._ns_inodes.items():
            hooks: dict[str, list[tuple[str, int]]] = {}
            for fam in (4, 6):
                for hook, name in enumerate(placement.HOOKS):
                    for table in t.ctx.registered.get((ino, fam, hook), []):
                        if (table[0], table[1]) not in hooks.setdefault(name, []):
                            hooks[name].append((table[0], table[1]))
            # named as the paths name it (paths.assemble): the inode when no name is known
            out[t.ctx.netns_names.get(ino, str(ino))] = hooks
        return out

    def _snapshot(self) -> Snapshot:
        sums: dict[str, Counter[tuple]] = {k: Counter() for k in ("packets", "hooks", "tables", "drops", "paths",
                                                                  "routes", "marks", "nat", "ifaces",
                                                                  "qdisc_drops")}
        # the per-reason totals before the paths: read after, a drop made
        # between the two reads is in the totals and on no path yet, and
        # the shortfall (which never goes down) would keep it as an overflow
        totals = self.drops.read()
        paths = self.paths.read()
        for pl, n in paths:
            base = (pl.netns, pl.family)
            sums["packets"][base + (pl.fate,)] += n
            sums["paths"][base + (pl.proto, pl.path_sig, pl.path, pl.fate)] += n
            for name in ("hooks", "tables", "marks", "nat", "routes"):
                for lab in getattr(pl, name):
                    sums[name][base + lab] += n
            for lab in pl.ifaces:
                sums["ifaces"][(pl.netns,) + lab] += n
            if pl.drop:
                sums["drops"][base + pl.drop] += n
            if pl.qdisc_drop:
                sums["qdisc_drops"][(pl.netns,) + pl.qdisc_drop] += n
        for k, n in self.drops.shortfall(sums["drops"], totals).items():
            if n:
                sums["drops"][k + (DropTotals.OVERFLOW, DropTotals.OVERFLOW)] += n
        return Snapshot(time.monotonic(), paths, sums)

    def _collect_qdisc(self, f) -> None:
        """The queue-time histogram, from the kernel's per-CPU buckets."""
        for labels, (counts, total) in sorted(self.qdisc.read().items()):
            cumulative, buckets = 0, []
            for bound, c in zip(QDISC_BOUNDS + [float("inf")], counts):
                cumulative += c
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
            f["qdisc_queue"].add_metric(list(labels), buckets, total)

    def _collect_self(self, f) -> None:
        t = self.tracer
        c = t.counters()
        f["lost"].add_metric([], c.create_failed + c.path_overflow)
        f["aged"].add_metric([], c.aged_out)
        inflight = t.inflight()
        f["inflight"].add_metric([], inflight)
        maps = {"inflight": (inflight, t.opts.max_inflight, c.create_failed),
                "path_counts": (self.paths.entries, t.opts.max_paths, c.path_overflow),
                "drop_totals": (self.drops.entries, DROP_TOTALS, c.drop_overflow),
                "qdisc_hist": (self.qdisc.entries, QDISC_HIST, c.qdisc_overflow),
                "route_buf": (None, events.PT_MAX_ROUTE, c.route_dropped)}
        for name, (entries, cap, over) in maps.items():
            if entries is not None:
                f["entries"].add_metric([name], entries)
            f["capacity"].add_metric([name], cap)
            f["overflow"].add_metric([name], over)
        for prog in t.loaded_programs():
            try:
                run_ns, cnt = libbpf.prog_run_stats(prog.fd)
            except libbpf.BpfError:
                continue
            f["run_s"].add_metric([prog.name], run_ns / 1e9)
            f["runs"].add_metric([prog.name], cnt)
        f["attach"].add_metric([], c.attach_failures)
        if t.plan is not None and t.plan.netfilter != "nflink":
            # fentry/kprobe: every hook is seen at its exit, and each table
            # registered there says itself that it ran
            for ns, ino in t._ns_inodes.items():     # (gone ones are no longer in it)
                for fam in (4, 6):
                    for hook in range(5):
                        n = 1 + len(t.ctx.registered.get((ino, fam, hook), []))
                        f["observers"].add_metric([ns or "", f"ipv{fam}", placement.HOOKS[hook]], n)
        for ns, placed in t.placed.items():
            for (fam, hook), hp in placed.plans.items():
                f["observers"].add_metric([ns or "", f"ipv{fam}", placement.HOOKS[hook]], len(hp.priorities))
        self._collect_attached(f["attached"])
        f["build"].add_metric([__version__, self.kernel], 1)

    def _collect_attached(self, fam) -> None:
        """One series per attachment: asked of the kernel (the link's info
        by its fd), not of pkttrace's own bookkeeping, so a link the kernel
        detached (its device deleted under it) reads 0."""
        t = self.tracer
        ids: dict[int, str] = {}
        for prog in t.loaded_programs():
            try:
                pid, name = libbpf.prog_id_name(prog.fd)
            except OSError:
                continue
            ids[pid] = prog.name
        for a in [*t.attached(), *t.observer_links()]:
            if isinstance(a, probes.TracepointAttachment):
                fd = _libbpf_link_fd(a.link)
                name, netns, target = a.prog, "", _section(t, a.prog)
            elif isinstance(a, probes.FdLink):
                fd, name, netns, target = a.fd, "", a.netns or "", f"{a.kind} {a.what}"
            elif isinstance(a, probes.ClassicTcAttachment):
                # a netlink filter, no link fd: alive while the filter that
                # runs our program is there (read at attach; tcobservers
                # forgets it when its device goes)
                name = ids.get(a.prog_id, "tc_ingress" if a.ingress else "tc_egress")
                fam.add_metric([name, a.ns or "", a.describe()], 0 if a.closed else 1)
                continue
            else:
                continue
            info = link_info(fd)
            live = info is not None and info.prog_id in ids
            if info is not None and info.type == BPF_LINK_TYPE_TCX:
                live = live and info.ifindex != 0      # the kernel detaches it when its device goes
            if not name:     # a netfilter or TCX link: its program, as the kernel says
                name = ids.get(info.prog_id, "") if info is not None else ""
            fam.add_metric([name or "(detached)", netns, target], 1 if live else 0)


# bpf_link_info (uapi/linux/bpf.h): type, id, prog_id, then a per-type union
# at offset 16; for TCX its fields are the ifindex (0 once detached) and the
# attach type.
BPF_LINK_TYPE_TCX = 11


@dataclass
class LinkInfo:
    type: int
    id: int
    prog_id: int
    ifindex: int
    attach_type: int = 0      # TCX: BPF_TCX_INGRESS or BPF_TCX_EGRESS


def link_info(fd: int) -> LinkInfo | None:
    """What the kernel says of a link fd; None if it is no link (closed)."""
    if fd < 0:
        return None
    info = (ctypes.c_uint8 * 64)()
    attr = (ctypes.c_uint8 * 16)()            # bpf_fd, info_len, info
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    try:
        libbpf.bpf_syscall(libbpf.BPF_OBJ_GET_INFO_BY_FD, attr)
    except OSError:
        return None
    raw = bytes(info)
    typ, lid, prog_id = struct.unpack_from("=III", raw, 0)
    return LinkInfo(typ, lid, prog_id, *struct.unpack_from("=II", raw, 16))


def _libbpf_link_fd(link: libbpf.Link) -> int:
    if not link.ptr:
        return -1
    fn = libbpf.lib().bpf_link__fd
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    return fn(link.ptr)


def _section(t: Tracer, prog: str) -> str:
    """`tp_btf/kfree_skb`: where a tracepoint program is attached."""
    try:
        return t._obj.program(prog).section
    except Exception:   # noqa: BLE001 - a label, never a failed scrape
        return prog

