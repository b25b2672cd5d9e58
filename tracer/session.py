"""The tracing session: load the BPF object, attach, and yield packets.

    with Tracer(TraceOptions(netns=["ptlab-rtr"], filter=PacketFilter(mark=Mark(1)))) as t:
        for pkt in t.packets(duration=5):
            print(pkt.fate, pkt.stage_names())

This is the library API; the CLI is a thin layer over it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import (backends, caps, collector, events, libbpf, model, names, netns, observers, paths, placement, probes,
               routing, rulejoin, ruletrace, sysinfo, tcobservers, watch)
from .collector import Counters
from .events import PtConfig
from .filters import PacketFilter


# count mode: (netns, drop reason, family) keys of map drop_totals.  A netns
# sees a handful of reasons; this is room for every reason of the kernel's
# enum (~120 in 6.18) in both families of 64 namespaces at once.
DROP_TOTALS = 16384
QDISC_HIST = 4096      # count mode: (netns, device, root qdisc, bucket) keys of map qdisc_hist


RINGBUF_DEFAULT = 8 << 20


def ring_bytes(kib: int) -> int:
    """-B KiB (tcpdump's unit) as a BPF ring size: rounded up to a power of
    two of at least a page, which the kernel requires."""
    want = max(kib * 1024, mmap.PAGESIZE)
    return 1 << (want - 1).bit_length()


class TraceError(Exception):
    """Tracing cannot start or continue; the message says why."""


@dataclass
class TraceOptions:
    netns: list[str | None] = field(default_factory=lambda: [None])  # None = current netns
    filter: PacketFilter = field(default_factory=PacketFilter)
    emit: bool = True                  # False: no per-packet records to user space
    count: bool = False                # count packets per path in the kernel (serve)
    max_paths: int = 1024              # count mode: distinct paths kept (more are counted as overflow)
    max_inflight: int = 8192           # packets followed at once
    # the ring between the kernel and the collector (a power of two, at
    # least a page): 8 MiB holds ~0.2 s of a 50,000 pps flow at ~750 B a
    # record: time to catch up after the machine descheduled the collector
    # (-B for longer bursts).
    ringbuf_bytes: int = RINGBUF_DEFAULT
    age_after: float = 5.0             # seconds without a stage before a record is aged out
    tc: str = "auto"                   # auto | tcx | classic | off
    # auto | nflink | fentry | kprobe: how netfilter hooks are observed ($PKTTRACE_BACKEND)
    backend: str = field(default_factory=lambda: os.environ.get("PKTTRACE_BACKEND", "auto"))
    # seconds between checks of the ruleset that nothing prompted (the
    # kernel flags a changed hook at its next packet, nftables announces its
    # changes: this is the safety net)
    replace_every: float = 10.0
    # every network namespace of the host, and those created while tracing
    # (named ones by name, unnamed ones of processes as "ns:<inode>")
    all_netns: bool = False
    # a traced name deleted and created again is traced again (serve); ad
    # hoc tracing says it went away and goes on with the rest
    follow_names: bool = False
    # copy each record's first header bytes (Packet.head): pcap-ng output (-w)
    snap: bool = False
    # nftables rule detail (tracer.ruletrace): a temporary table per netns
    # selects the filter's packets for nftables tracing, its events are
    # joined to the paths (each table step gains `rules`)
    rules: bool = False
    rules_rate: int = ruletrace.LIMIT_RATE    # hook passes/s selected for nftables tracing, at most
    # verify the programs on two cores (libbpf.BpfObject.load_split): ~180 ms
    # sooner ready on an idle 2-core machine, but two parses of the kernel's
    # BTF at once (~15 MB more peak RSS, ~5 MB more after); serve, which
    # runs for months under an RSS budget, loads them one after the other
    parallel_load: bool = True


def _raise_fd_limit() -> None:
    """Each traced netns holds ~15 fds (netfilter and TCX links, netlink
    sockets): hundreds of namespaces need more than the usual soft limit of
    1024.  The hard limit is the administrator's: raise the soft one to it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Tracer:
    def __init__(self, opts: TraceOptions | None = None):
        self.opts = opts or TraceOptions()
        rb = self.opts.ringbuf_bytes
        if rb < mmap.PAGESIZE or rb & (rb - 1):
            raise TraceError(f"ring buffer size {rb} bytes: the kernel needs a power of two of at least "
                             f"{mmap.PAGESIZE}")
        self.obj: libbpf.BpfObject | None = None
        self.attachments: list[probes.Attachment] = []
        self.ctx = paths.Context(symbolize=sysinfo.Kallsyms(), socket_owner=sysinfo.SocketOwners(),
                                 # bpf_ktime_get_ns() is CLOCK_MONOTONIC, as time.monotonic_ns()
                                 boot_wall_ns=time.time_ns() - time.monotonic_ns())
        # records -> packets, and the counts that account for every one
        self.names = names.Names(self.ctx)
        self.collect = collector.Collector(self.ctx, self.opts,
                                           relearn=lambda: self.names.relearn(self._ns_inodes.items()))
        self.started_ns = 0
        self.ready_s = 0.0
        self._last_age_scan = 0.0
        self._ns_inodes: dict[str | None, int] = {}
        self._ns_index: dict[int, int] = {}          # netns inode -> its index in the BPF maps
        self._free_index = list(range(events.PT_MAX_NETNS - 1, -1, -1))   # popped from the end
        self._slot_of: dict[int, int] = {}           # inode -> traced_ns slot it holds
        self.plan: backends.Plan | None = None       # the backend of each feature on this kernel
        self.nf: observers.Observers | None = None   # the netfilter observers (netfilter links)
        self._initial: dict = {}   # ns -> ruleset read before load, placed at attach
        self.attach_failures = 0
        self._last_replace_check = 0.0
        self._watches: dict[str | None, watch.NetnsWatch] = {}   # ns -> its netlink announcements
        # tc observers per netns and device (followed as devices come and go)
        self.tc: tcobservers.TcObservers | None = None
        self._early_tcx: tcobservers.EarlyTcx | None = None   # TCX links made during the load
        self._iface_index = 0                        # what iface_want holds
        # the programs read net->nft.base_seq (else they see 0, and are told 0)
        self._gen_visible = True
        # traced namespaces that were deleted (or whose name now stands for
        # another namespace): inode -> name
        self.gone: dict[int, str] = {}
        self.netns_epoch = 0                         # +1 each time a netns stops being traced
        self._last_ns_check = 0.0
        # called with one line when a traced netns goes away; default: stderr
        self.on_notice: Callable[[str], None] | None = None
        # set (e.g. from a signal handler) to end packets() between batches,
        # never in the middle of one: a batch taken from the ring is reported
        self.stopping = False
        # --rules: the nftables tables and trace sockets, and the join stage
        self.rules: ruletrace.RuleTracer | None = None
        self.joiner: rulejoin.Joiner | None = None

    @property
    def _nf(self) -> observers.Observers:
        if self.nf is None:
            raise TraceError("the netfilter observers are not set up: start() first")
        return self.nf

    # start() chooses the plan and loads obj, close() unloads it: the
    # methods that need them run in between
    @property
    def _obj(self) -> libbpf.BpfObject:
        if self.obj is None:
            raise TraceError("not tracing: the BPF object is not loaded")
        return self.obj

    @property
    def _plan(self) -> backends.Plan:
        if self.plan is None:
            raise TraceError("not tracing: no backend chosen yet")
        return self.plan

    # ---- set-up ----

    def start(self, meanwhile: Callable[[], object] | None = None) -> "Tracer":
        """Load and attach everything, or raise TraceError with nothing left.

        meanwhile: work of the caller's to do while the kernel verifies the
        programs (~200 ms without the GIL), in the thread that reads the
        rulesets then; an exception from it is raised here."""
        t0 = time.monotonic()
        # the effective capabilities, not uid 0: a service runs as a
        # DynamicUser= with exactly these (tracer/caps.py says why each)
        try:
            lacking = caps.missing(caps.needed(named_netns=any(self.opts.netns), all_netns=self.opts.all_netns),
                                   caps.effective())
        except caps.CapsError as e:
            raise TraceError(str(e)) from None
        if lacking:
            raise TraceError(caps.missing_message(lacking))
        if self.opts.all_netns:
            self.opts.netns = list(dict.fromkeys(netns.everything().values()))
        seen: set[int] = set()
        for ns in self.opts.netns:
            try:
                ino = netns.inode(ns)
            except netns.NetnsError as e:
                raise TraceError(str(e)) from None
            if ino not in seen:          # two names for one namespace: traced once
                seen.add(ino)
                self._ns_inodes[ns] = ino
        self.opts.netns = list(self._ns_inodes)
        if self.opts.all_netns or len(self._ns_inodes) > 16:
            _raise_fd_limit()
        if len(self._ns_inodes) > events.PT_MAX_NETNS:
            raise TraceError(f"at most {events.PT_MAX_NETNS} network namespaces can be traced at once "
                             f"({len(self._ns_inodes)} asked for)")
        # the kernel's BTF, parsed once for the probe and the names (~15 ms each)
        try:
            backends.require_kernel()
            with libbpf.Btf.vmlinux() as kernel_btf:
                self.plan = backends.plan(backends.probe(kernel_btf), self.opts.backend, self.opts.tc)
                self._gen_visible = self.names.read_kernel_btf(kernel_btf)
                libbpf.learn_prog_info(kernel_btf)     # for the run-time metrics, without a parse of its own
        except (backends.BackendError, libbpf.BpfError) as e:
            raise TraceError(str(e)) from None
        if self._plan.tc and self.opts.tc != "classic":
            # the tc links are slow to make, not to run: made beside the verifier
            self._early_tcx = tcobservers.EarlyTcx(self.opts.netns)
        try:
            if self.opts.rules:
                # before the rulesets are read: the observers are placed
                # with our table in (placement leaves it out)
                self._start_rules()
            self._load(meanwhile)
            self._attach()
        except (libbpf.BpfError, probes.AttachError, netns.NetnsError, ruletrace.RulesError) as e:
            self.close()
            raise TraceError(str(e)) from None
        except BaseException:
            self.close()
            raise
        for ns, ino in self._ns_inodes.items():
            self.names.learn_netns(ns, ino)
        self._last_replace_check = time.monotonic()
        self.ready_s = time.monotonic() - t0
        self.started_ns = time.monotonic_ns()
        return self

    def _start_rules(self) -> None:
        self.rules = ruletrace.RuleTracer(self.opts.filter, rate=self.opts.rules_rate)
        self.joiner = rulejoin.Joiner(self.rules)
        if self.rules.broad:
            self._notice("--rules: the filter expression is not compiled into nftables: every packet the other "
                         "options select is traced by nftables (at most "
                         f"{self.opts.rules_rate}/s), and only those of the paths shown are kept")
        for ns in self.opts.netns:
            self._add_rules(ns)

    def _add_rules(self, ns: str | None) -> None:
        """Our nft table in ns; its handle told to the decoder (the fentry and
        kprobe backends see its chains run, and must not take them for a
        table the ruleset read did not have: a change)."""
        assert self.rules is not None
        for note in self.rules.add(ns):
            self._notice(note)
        r = self.rules.ns[ns]
        handle = r.table_handle()
        if handle is not None:
            self.ctx.hidden_tables.add((r.ino, handle))

    def _load(self, meanwhile: Callable[[], object] | None = None) -> None:
        obj = self.obj = libbpf.BpfObject(libbpf.object_path())
        need = observers.select_programs(obj, self._plan)
        obj.map("inflight").set_max_entries(self.opts.max_inflight)
        # the ring must exist; without emit it only needs one page
        obj.map("events").set_max_entries(self.opts.ringbuf_bytes if self.opts.emit else 4096)
        for name in ("path_counts", "path_examples"):
            obj.map(name).set_max_entries(self.opts.max_paths if self.opts.count else 1)
        obj.map("drop_totals").set_max_entries(DROP_TOTALS if self.opts.count else 1)
        obj.map("qdisc_hist").set_max_entries(QDISC_HIST if self.opts.count else 1)
        if self.opts.count and self._plan.counters_on_demand():
            # a few keys of their 21,500: preallocating every per-CPU element
            # cost ~30 ms of serve's start on 2 CPUs and ~2 MB of kernel
            # memory there (the per-CPU part grows with the CPUs)
            for name in ("path_counts", "drop_totals", "qdisc_hist"):
                obj.map(name).add_flags(libbpf.BPF_F_NO_PREALLOC)
        ptr, size = obj.map(".rodata").initial_value()
        if size < ctypes.sizeof(PtConfig):
            raise TraceError("BPF object and pkttrace disagree on the config layout: rebuild it")
        cfg = PtConfig.from_address(ptr)
        cfg.emit = 1 if self.opts.emit else 0
        cfg.count = 1 if self.opts.count else 0
        # --rules joins on the IPv4 id too: the record keeps the first header bytes
        cfg.snap = 1 if self.opts.snap or self.opts.rules else 0
        if self._plan.hook_slow:
            cfg.hook_slow_start, cfg.hook_slow_end = self._plan.hook_slow
        self.opts.filter.fill(cfg)
        flags = self.opts.filter.flags
        cfg.early_reject = 1 if flags and not flags & ~events.F_HEADER else 0
        # a header filter may match a tunnel's payload: its carriers are kept
        for i, port in enumerate(netns.TUNNEL_UDP_PORTS[:events.PT_TUN_PORTS]):
            cfg.tun_ports[i] = port
        # The verifier takes most of the start (~250 ms, in the kernel,
        # without the GIL): read the rulesets meanwhile (pyroute2's import
        # and netlink dumps, ~60-80 ms) in a thread.  (Not the other way
        # round: libbpf's allocations in a thread of their own take a malloc
        # arena of their own, +12 MB of RSS for the life of the process.)
        failure: list[BaseException] = []
        initial: dict = {}

        def read_rulesets():
            try:
                initial.update((ns, observers.read_ruleset(ns)) for ns in self.opts.netns)
                if meanwhile is not None:
                    meanwhile()
            except BaseException as e:  # noqa: BLE001 -- raised again below, in the caller's thread
                failure.append(e)
        reader = threading.Thread(target=read_rulesets, name="pkttrace-rulesets")
        reader.start()
        try:
            # the netfilter observers (or hook probes) are half of the
            # verifier's time: verified beside the rest, on a second core
            if self.opts.parallel_load:
                obj.load_split({*observers.nf_programs(), *backends.HOOK_PROGRAMS})
            else:
                obj.load()
        finally:
            reader.join()
        libbpf.trim_heap()
        if failure:
            raise failure[0]
        self._initial = initial
        for ino in self._ns_inodes.values():
            self._register(ino)
        self.nf = observers.Observers(obj, self.ctx, self._plan,
                                      {i: obj.program(n).fd for i, n in enumerate(observers.nf_programs()) if i < need},
                                      inode_of=self._ns_inodes.get, index_of=self._ns_index.__getitem__)
        self.nf.gen_visible = self._gen_visible
        if self._plan.tc:
            self.tc = tcobservers.TcObservers(obj, self.opts.tc, self._notice)
        self.collect.bind(obj)

    def _attach(self) -> None:
        obj = self._obj
        failed: dict[str, str] = {}          # optional programs that could not be attached, why
        for prog in (*backends.TRACEPOINT_PROGRAMS, backends.FENTRY_DATA_READY[0], backends.KPROBE_DATA_READY[0],
                     *backends.HOOK_PROGRAMS):
            if prog in self._plan.off:
                continue
            stands_for = backends.FALLBACK_FOR.get(prog)
            if stands_for and stands_for not in failed and stands_for not in self._plan.off:
                continue                 # what it stands in for is attached
            try:
                self.attachments.append(probes.attach_tracepoint(obj, prog))
            except probes.AttachError as e:
                if prog not in backends.OPTIONAL:
                    raise
                failed[prog] = str(e)
                if stands_for:
                    continue             # its own note says what is missed
                fallback = next((f for f, of in backends.FALLBACK_FOR.items() if of == prog), None)
                if fallback and fallback not in self._plan.off:
                    continue             # said once the stand-in is tried (below)
                # a function the kernel will not let us trace: say what is not seen
                self._plan.notes.append(f"{backends.HOOK_PROGRAMS[prog]} cannot be traced here ({e}): "
                                       f"{backends.WHAT_IS_MISSED.get(prog, 'less detail')}")
        for fallback, prog in backends.FALLBACK_FOR.items():
            if prog in failed:
                fn, stand_in = backends.HOOK_PROGRAMS[prog], backends.HOOK_PROGRAMS[fallback]
                if any(getattr(a, "prog", None) == fallback for a in self.attachments):
                    self._plan.notes.append(f"{fn} cannot be traced here ({failed[prog]}): its hook is seen "
                                           f"at {stand_in} instead")
                else:
                    self._plan.notes.append(f"{fn} cannot be traced here ({failed[prog]}): "
                                           f"{backends.WHAT_IS_MISSED.get(prog, 'less detail')}")
        self._set_iface(self.opts.netns[0])
        for ns in self.opts.netns:
            self._attach_netns(ns, *self._initial.pop(ns))
        self._end_early_tcx()

    def _end_early_tcx(self) -> None:
        """The early TCX links not taken closed, and their placeholder program."""
        if self._early_tcx is not None:
            self._early_tcx.close()
            self._early_tcx = None

    def _attach_netns(self, ns: str | None, gen: int, reg: placement.Registered) -> None:
        """Observers, tc and the netlink watch of one netns, placed for the
        ruleset `reg` read at nftables generation `gen` (at start, or when a
        netns appears while tracing)."""
        self._watch(ns)
        nf = self._nf
        nf.set_hooks(ns, events.HOOKS_PLACING)
        nf.placed[ns] = nf.place(ns, 0, reg)
        self._learn_rules(ns)
        if self.tc is not None:
            self.tc.attach(ns, early=self._early_tcx)
        nf.set_hooks(ns, events.HOOKS_LEARN, gen)
        if watch.nft_generation(ns) != gen:
            nf.recheck(ns, signalled=True)   # committed to since it was read: read again

    def _watch(self, ns: str | None) -> None:
        try:
            self._watches[ns] = watch.NetnsWatch(ns)
        except OSError as e:
            self._plan.notes.append(f"netlink announcements of netns {ns or '(host)'} cannot be followed "
                                   f"({e.strerror}): ruleset changes are found at the next packet or within "
                                   f"{self.opts.replace_every:g} s")

    def _learn_rules(self, ns: str | None) -> None:
        ino = self._ns_inodes[ns]
        for fam in (4, 6):
            try:
                rules = routing.read_rules(ns, fam)
            except Exception:  # netlink trouble: route stages just name no rule
                continue
            if self.ctx.rules.get((ino, fam)) != rules:
                self.ctx.rules[(ino, fam)] = rules
                self.ctx.generation += 1

    def replace_observers(self, only_signalled: bool = False) -> bool:
        """Re-read the rulesets that changed (or every one); move the observers
        where they no longer fit.  True if anything moved.

        A namespace is re-read when the kernel flagged one of its hooks as
        replaced, when nftables announced a change there, or (unless
        only_signalled) every time: the timer's safety net."""
        moved = False
        nf = self._nf
        for ns in list(nf.placed):
            if ns not in nf.placed:
                continue                      # found gone meanwhile
            w = self._watches.get(ns)
            announced = w.changed() if w is not None else set()
            if w is not None and watch.LINKS in announced:
                self._follow_links(ns, w.take_deleted())
            signalled = self._plan.netfilter == "nflink" and nf.hooks_changed(ns)
            if not only_signalled or watch.RULES in announced:
                self._learn_rules(ns)
            if only_signalled and not (signalled or watch.NFT in announced):
                continue
            try:
                moved |= nf.recheck(ns, signalled)
            except probes.AttachError:
                if ns not in self.check_netns():   # deleted meanwhile: not a failure
                    self.attach_failures += 1
        return moved

    def loaded_programs(self) -> list[libbpf.Program]:
        """Every program loaded (bank 1's observers once they are)."""
        objs = [o for o in [self.obj, *(self.nf.extra_objs if self.nf else ())] if o is not None]
        return [p for o in objs for p in o.programs() if p.fd >= 0]

    def attached(self) -> list[probes.Attachment]:
        """Everything attached: tracepoints (fentry, kprobes) and tc observers
        (the netfilter observers are observer_links())."""
        return [*self.attachments, *(self.tc.attachments() if self.tc is not None else ())]

    def observer_links(self) -> list[probes.FdLink]:
        return self.nf.links() if self.nf is not None else []

    @property
    def placed(self) -> dict[str | None, observers.Placed]:
        """The observers of each traced netns: bank, ruleset, plans, links."""
        return self.nf.placed if self.nf is not None else {}

    def _follow_links(self, ns: str | None, deleted: set[int]) -> None:
        """Devices of ns came, went or were renamed: tc observers on the new
        ones, the gone ones' forgotten, names and the --iface device again."""
        ino = self._ns_inodes.get(ns)
        if ino is None:
            return
        try:
            now, tunnels = netns.links_and_tunnels(ns)
        except netns.NetnsError:
            return                           # the netns is going: check_netns says so
        self.names.learn_devices(ns, ino, (now, tunnels))
        if self.tc is not None:
            self.tc.follow(ns, now, deleted)
        self._set_iface(ns, now)

    def _set_iface(self, ns: str | None, devices: dict[int, str] | None = None) -> None:
        """Point the --iface filter at the device that has its name now."""
        name = self.opts.filter.iface
        if name is None or ns != self.opts.netns[0]:
            return
        if devices is None:
            try:
                devices = netns.links(ns)
            except netns.NetnsError:
                devices = {}
        index = next((i for i, n in devices.items() if n == name), 0)
        if index != self._iface_index:
            self._obj.map("iface_want").update(ctypes.c_uint32(0), ctypes.c_uint32(index))
            self._iface_index = index

    # ---- namespaces that come and go ----

    def _register(self, ino: int) -> int:
        """Give a netns an index in the BPF maps and make it traced there."""
        if ino in self._ns_index:
            return self._ns_index[ino]
        if not self._free_index:
            raise probes.AttachError(f"at most {events.PT_MAX_NETNS} network namespaces can be traced at once")
        idx = self._free_index.pop()
        self._ns_index[ino] = idx
        slot = ctypes.c_uint32(ino % events.PT_NS_SLOTS)
        cur = events.PtNsSlot()
        m = self._obj.map("traced_ns")
        if m.lookup(slot, cur) and cur.index:
            # another traced netns holds the slot: the kernel looks here next
            self._obj.map("traced_ns_more").update(ctypes.c_uint32(ino), ctypes.c_uint32(idx))
        else:
            m.update(slot, events.PtNsSlot(ino, idx + 1))
            self._slot_of[ino] = slot.value
        return idx

    def _unregister(self, ino: int) -> None:
        """The netns is no longer traced: its slot (given to a netns that
        collided with it) and its per-netns state, then its index."""
        idx = self._ns_index.pop(ino, None)
        if idx is None or self.obj is None:
            return
        if ino in self._slot_of:
            slot = self._slot_of.pop(ino)
            heir = next((i for i in self._ns_index if i % events.PT_NS_SLOTS == slot and i not in self._slot_of), None)
            if heir is not None:
                self.obj.map("traced_ns").update(ctypes.c_uint32(slot), events.PtNsSlot(heir, self._ns_index[heir] + 1))
                self._slot_of[heir] = slot
                self.obj.map("traced_ns_more").delete(ctypes.c_uint32(heir))
            else:
                self.obj.map("traced_ns").update(ctypes.c_uint32(slot), events.PtNsSlot())
        else:
            self.obj.map("traced_ns_more").delete(ctypes.c_uint32(ino))
        k = ctypes.c_uint32(idx)
        self.obj.map("nat_slots").update(k, events.PtNatSlots())
        self.obj.map("netns_nat").update(k, ctypes.c_uint32(0))
        self.obj.map("ruleset_gen").update(k, ctypes.c_uint32(0))
        self._free_index.append(idx)

    def add_netns(self, ns: str | None) -> bool:
        """Trace one more netns, while tracing: observers, tc, names.  False
        if it went away meanwhile (nothing of it is kept then)."""
        try:
            ino = netns.inode(ns)
        except netns.NetnsError:
            return False
        if ino in self._ns_index:
            return True                  # already traced, under another name
        self._ns_inodes[ns] = ino
        self.gone.pop(ino, None)         # an inode number is reused for a new namespace
        try:
            if self.rules is not None:
                self._add_rules(ns)
            self._register(ino)
            self._attach_netns(ns, *observers.read_ruleset(ns))
            self.names.learn_netns(ns, ino)
        except (probes.AttachError, netns.NetnsError, OSError, ruletrace.RulesError) as e:
            self._drop_netns(ns)
            if ns is None or netns.current_inode(ns) == ino:   # not just gone again: a failure
                self.attach_failures += 1
                self._notice(f"network namespace {ns!r} cannot be traced: {e}")
            return False
        return True

    def discover_netns(self) -> list[str | None]:
        """Namespaces to trace that appeared since the last look: with
        all_netns every new one; with follow_names a traced name created
        again.  Each is traced from now on; their names."""
        want: list[str | None] = []
        if self.opts.all_netns:
            traced = set(self._ns_index)
            want = [name for ino, name in netns.everything().items() if ino not in traced]
        if self.opts.follow_names or self.opts.all_netns:
            back = {name for name in self.gone.values()
                    if name is not None and not name.startswith(netns.UNNAMED) and name not in self._ns_inodes}
            want += [name for name in sorted(back) if netns.current_inode(name) is not None and name not in want]
        added = []
        for ns in want:
            if self.add_netns(ns):
                added.append(ns)
                self._notice(f"network namespace {ns!r} appeared: traced")
        return added

    def check_netns(self) -> list[str]:
        """Stop tracing the netns that no longer exist; their names.

        One stat(2) per netns: the file in /run/netns (for an unnamed one,
        a process's) must still be the namespace that was traced.  Nothing
        is opened, so a deleted namespace is never re-created.  Each is
        announced once."""
        out = []
        for ns, ino in list(self._ns_inodes.items()):
            if ns is not None and netns.current_inode(ns) != ino:
                self._forget_netns(ns)
                out.append(ns)
        return out

    def _drop_netns(self, ns: str | None) -> int | None:
        """Detach everything of a netns and forget it; its inode."""
        ino = self._ns_inodes.pop(ns, None)
        if self.nf is not None:
            self.nf.drop(ns)
        w = self._watches.pop(ns, None)
        if w is not None:
            w.close()
        if self.tc is not None:
            self.tc.drop(ns)
        if self.rules is not None:
            self.rules.drop(ns)
        if ino is not None:
            self._unregister(ino)
            self._forget_paths(ino)
        return ino

    def _forget_paths(self, ino: int) -> None:
        """Count mode: the netns's series end with it, and its paths free
        their slots (its inode may come back for another namespace)."""
        self.netns_epoch += 1
        if not self.opts.count or self.obj is None:
            return
        counts, examples = self.obj.map("path_counts"), self.obj.map("path_examples")
        for key in [k for k in counts.keys(events.PtPathKey) if k.netns == ino]:
            counts.delete(key)
            examples.delete(key)
        drops = self.obj.map("drop_totals")
        for dk in [k for k in drops.keys(events.PtDropKey) if k.netns == ino]:
            drops.delete(dk)

    def _forget_netns(self, ns: str) -> None:
        """Drop the observers of a netns that went away; keep the rest."""
        ino = self._drop_netns(ns)
        if ino is not None:
            self.gone[ino] = ns
            if len(self.gone) > 4 * events.PT_MAX_NETNS:
                self.gone.pop(next(iter(self.gone)))
        now = netns.current_inode(ns)
        what = "was deleted" if now is None else "now names another namespace"
        if ns.startswith(netns.UNNAMED):
            what = "is gone (no process is in it)"
        rest = "" if self._ns_inodes else "; nothing left to trace"
        self._notice(f"network namespace {ns!r} {what}: no longer traced{rest}")

    @property
    def exhausted(self) -> bool:
        """Every namespace asked for went away, and none will be traced
        again: nothing is traced any more."""
        return not self._ns_inodes and not (self.opts.follow_names or self.opts.all_netns)

    def _notice(self, line: str) -> None:
        if self.on_notice is not None:
            self.on_notice(line)
        else:
            print(f"pkttrace: {line}", file=sys.stderr, flush=True)

    # ---- running ----

    def poll(self, timeout: float = 0.2) -> list[model.Packet]:
        """Packets whose traversal ended since the last call (and aged-out ones)."""
        out = self.collect.wait(timeout)
        now = time.monotonic()
        if now - self._last_ns_check >= 0.5:
            self._last_ns_check = now
            self.check_netns()
            if self.opts.all_netns or self.opts.follow_names:
                self.discover_netns()
        if self.opts.replace_every and now - self._last_replace_check >= self.opts.replace_every:
            self._last_replace_check = now
            self.replace_observers()
        else:
            self.replace_observers(only_signalled=True)
        if now - self._last_age_scan >= min(1.0, self.opts.age_after / 2):
            self._last_age_scan = now
            out.extend(self.collect.age_out())
        if self.joiner is not None:
            # paths wait (bounded) for their nftables trace events
            out = self.joiner.feed(out)
        self.collect.shown += len(out)
        return out

    def age_out(self, older_than: float | None = None) -> list[model.Packet]:
        """Report (and forget) records idle for age_after (or older_than) seconds."""
        return self.collect.age_out(older_than)

    @property
    def on_raw(self) -> Callable[[bytes, bool], None] | None:
        """Called with (raw record bytes, aged) for every packet reported: --record."""
        return self.collect.on_raw

    @on_raw.setter
    def on_raw(self, fn: Callable[[bytes, bool], None] | None) -> None:
        self.collect.on_raw = fn

    def packets(self, count: int | None = None, duration: float | None = None,
                after_batch=None) -> Iterator[model.Packet]:
        """Yield packets until count packets were yielded or duration seconds passed.

        after_batch() is called once the packets of each poll are handed out
        (a sink flushes there: not per packet, and never later than a poll)."""
        deadline = None if duration is None else time.monotonic() + duration
        n = 0
        while not self.stopping and not self.exhausted:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            batch = self.poll(0.2 if left is None else max(0.0, min(0.2, left)))
            for i, pkt in enumerate(batch):
                yield pkt
                n += 1
                if count is not None and n >= count:
                    # reported by the kernel, not handed out: count, don't drop
                    rest = len(batch) - i - 1
                    self.collect.shown -= rest
                    self.collect.unread += rest
                    return
            if after_batch is not None and batch:
                after_batch()

    def counters(self) -> Counters:
        c = self.collect.counters(self.attach_failures)
        if self.rules is not None and self.joiner is not None:
            c.rules = collector.RuleCounts(events=self.rules.events, joined=self.joiner.counts.joined,
                                           without=self.joiner.counts.without + self.joiner.waiting(),
                                           over_limit=self.rules.over_limit(), overruns=self.rules.overruns)
        return c

    def inflight(self) -> int:
        """Records in flight: parked in the shared table, and in the CPUs' slots."""
        return self.collect.inflight()

    # ---- tear-down ----

    def stop(self, budget: float = 1.0) -> list[model.Packet]:
        """Detach, then hand over what the kernel had already reported
        (within `budget` seconds; the rest is counted as unread)."""
        self._detach()
        out = self.collect.finish(budget)
        if self.joiner is not None:
            if budget <= 0:
                # past -c or a gone reader: the paths waiting for their
                # rules are not printed either, counted like the ring's rest
                self.collect.unread += self.joiner.discard()
                return out
            # the packets ended, so their events are queued already; the
            # ones that waited are shown now (finish counted its own)
            before = len(out)
            out = self.joiner.feed(out, final=True)
            self.collect.shown += len(out) - before
        return out

    def _detach(self) -> None:
        self._end_early_tcx()
        if self.nf is not None:
            self.nf.detach()
        for w in self._watches.values():
            w.close()
        self._watches.clear()
        if self.tc is not None:
            self.tc.detach()
        for a in reversed(self.attachments):
            try:
                a.close()
            except Exception:  # keep closing the rest: nothing may stay attached
                pass
        self.attachments.clear()

    def close(self) -> None:
        self._detach()
        if self.rules is not None:
            self.rules.close()            # the kernel deletes our tables with their sockets
        # the ring, the observer banks (second loads sharing the maps), then the object
        self.collect.close()
        for part in ("nf", "obj"):
            held = getattr(self, part)
            if held is not None:
                held.close()
                setattr(self, part, None)

    def __iter__(self) -> Iterator[model.Packet]:
        """Every packet, as it ends, until stopped (packets() without limits)."""
        return self.packets()

    def __enter__(self) -> "Tracer":
        # tracer.trace() hands out a started Tracer: entering does not start it twice
        return self if self.obj is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.close()
