"""Records to packets: what the kernel reported, in the order it ended.

The collector reads the ring buffer, assembles each record into a Packet
(tracer.paths), finds the records that never ended (idle in a CPU's slot or
parked in the shared table) and reports them aged out, and keeps the counts
that make every packet accounted for (shown, aged out, unread at exit, and
the kernel's own per-CPU counters).  The session (tracer.session) owns the
lifecycle around it: loading, attaching, namespaces, observers.
"""
from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from . import events, libbpf, model, paths
from .events import PtRecord, Stat
from .filters import PacketFilter

_U64 = struct.Struct("=Q")
_MAX_AGED_IDS = 65536          # ids of records reported aged out, remembered (bounded)


@dataclass
class RuleCounts:
    """--rules: what nftables tracing gave, and the paths it could not detail."""
    events: int = 0                    # trace events received
    joined: int = 0                    # paths given their rules
    without: int = 0                   # paths with hook stages and no rule detail
    over_limit: int = 0                # hook passes the trace limit left untraced
    overruns: int = 0                  # trace events lost: the socket's buffer was full (ENOBUFS)


@dataclass
class Counters:
    created: int = 0
    emitted: int = 0
    filtered: int = 0                  # records that ended without matching
    rejected: int = 0                  # judged at first sight, never given a record
    lost: int = 0                      # ring buffer full
    create_failed: int = 0             # in-flight table full
    truncated: int = 0
    route_dropped: int = 0
    path_overflow: int = 0             # count mode: packets on paths the path map had no room for
    drop_overflow: int = 0             # count mode: drops the drop_totals map had no room for
    qdisc_overflow: int = 0            # count mode: dequeues the qdisc_hist map had no room for
    aged_out: int = 0                  # counted in user space
    shown: int = 0
    unread: int = 0                    # emitted, still in the ring when tracing stopped
    attach_failures: int = 0           # re-placements that could not attach (old observers kept)
    rules: RuleCounts | None = None    # --rules only

    @property
    def not_seen(self) -> int:
        """Packets the user asked for that could not be shown."""
        return self.lost + self.create_failed


class Options(Protocol):
    """What the collector reads of a trace's options (session.TraceOptions)."""
    emit: bool
    ringbuf_bytes: int
    age_after: float
    filter: PacketFilter


class Collector:
    """The packets of one trace, from its BPF object's ring and maps.

    relearn() is called (at most once a second) when a packet names a
    device user space does not know yet: a device created after start."""

    def __init__(self, ctx: paths.Context, opts: Options, relearn: Callable[[], None]):
        self.ctx, self.opts, self._relearn = ctx, opts, relearn
        self.obj: libbpf.BpfObject | None = None
        self.ring: libbpf.RingBuffer | None = None
        self.aged = 0
        self.shown = 0
        self.unread = 0
        self._aged_ids: dict[int, None] = {}         # records reported as aged out (bounded)
        self._parked_deleted = 0                     # parked records user space deleted (aged out)
        self._last_relearn = 0.0
        # called with (raw record bytes, aged) for every packet reported: --record
        self.on_raw: Callable[[bytes, bool], None] | None = None

    def bind(self, obj: libbpf.BpfObject) -> None:
        """Read this loaded object (its ring only when records are emitted)."""
        self.obj = obj
        if self.opts.emit:
            self.ring = libbpf.RingBuffer(obj.map("events").fd, self.opts.ringbuf_bytes)

    @property
    def _obj(self) -> libbpf.BpfObject:
        if self.obj is None:
            raise RuntimeError("the collector is not bound to a loaded object")
        return self.obj

    def wait(self, timeout: float) -> list[model.Packet]:
        """The packets that ended, waiting up to timeout for the first."""
        if self.ring is None:            # no emit: nothing comes through a ring
            time.sleep(timeout)
            return []
        self.ring.wait(timeout)
        return self.drain()

    def drain(self) -> list[model.Packet]:
        """One batch from the ring: bounded, so memory stays flat when it is full."""
        out: list[model.Packet] = []
        if self.ring is None:
            return out
        aged = self._aged_ids
        for raw in self.ring.drain(max_records=4096):
            if aged and _U64.unpack_from(raw)[0] in aged:
                continue  # reported as aged out from its slot: its late end is not a new packet
            out.append(self.packet(raw))
            if self.on_raw:
                self.on_raw(raw, False)
        return out

    def packet(self, rec: PtRecord | bytes, aged: bool = False) -> model.Packet:
        pkt = paths.assemble(rec, self.ctx, aged=aged)
        if pkt.unnamed_device():
            # a device created after start: learn names again (at most once a second)
            now = time.monotonic()
            if now - self._last_relearn >= 1.0:
                self._last_relearn = now
                self._relearn()
                pkt = paths.assemble(rec, self.ctx, aged=aged)
        return pkt

    def slot_records(self) -> list[tuple[int, int, PtRecord]]:
        """(cpu, skb, record) of the records held in the CPUs' slots."""
        metas = self._obj.map("slots_meta").percpu_values(0, events.PtSlots)
        out: list[tuple[int, int, PtRecord]] = []
        for i in range(events.PT_SLOTS):
            if not any(m.skb[i] for m in metas):
                continue
            recs = self._obj.map("slots").percpu_values(i, PtRecord)
            out.extend((cpu, m.skb[i], recs[cpu]) for cpu, m in enumerate(metas) if m.skb[i])
        return out

    def age_out(self, older_than: float | None = None) -> list[model.Packet]:
        """Forget records idle for age_after seconds; report the matching ones.

        Parked records are deleted from the shared table.  A record in a
        CPU's slot is that CPU's to free: it is reported once here, and
        not again when the kernel later parks or reuses its slot."""
        limit = time.monotonic_ns() - int((self.opts.age_after if older_than is None else older_than) * 1e9)
        m = self._obj.map("inflight")
        out = []
        idle = []
        rec = PtRecord()
        for key in list(m.keys(ctypes.c_uint64)):
            if not m.lookup(key, rec) or rec.last_ts > limit:
                continue
            if not m.delete(key):
                continue  # ended meanwhile: the kernel reported it
            self._parked_deleted += 1
            if rec.id not in self._aged_ids:   # else reported from its slot already
                idle.append(PtRecord.from_buffer_copy(rec))
        if self._parked_deleted:
            # tell the kernel: it searches the shared table only while any is parked
            self._obj.map("parked").update(ctypes.c_uint32(1), ctypes.c_int64(self._parked_deleted))
        for _cpu, _skb, r in self.slot_records():
            if r.last_ts <= limit and r.id not in self._aged_ids:
                idle.append(r)
        want = self.opts.filter.flags
        for rec in idle:
            self._aged_ids[rec.id] = None
            if len(self._aged_ids) > _MAX_AGED_IDS:
                self._aged_ids.pop(next(iter(self._aged_ids)))
            # a fragment whose datagram was reassembled, freed without a
            # tracepoint (local-delivery defrag merges them): it was absorbed
            aged = not self._absorbed_fragment(rec)
            self.aged += aged
            if (rec.match & want) == want and self.opts.emit:
                out.append(self.packet(PtRecord.from_buffer_copy(rec), aged=aged))
                if self.on_raw:
                    n = min(rec.n_stages, events.PT_MAX_STAGES)
                    self.on_raw(bytes(rec)[:events.RECORD_HEADER_SIZE + n * events.STAGE_SIZE], aged)
        return out

    def _absorbed_fragment(self, rec: PtRecord) -> bool:
        """If rec is a fragment of a datagram the kernel reassembled, end it
        as the kernel would have told: reassembled into that packet."""
        if not rec.flags & events.REC_FRAG:
            return False
        k = events.PtFragKey(netns=rec.netns, frag_id=rec.frag_id, family=rec.family, proto=rec.proto)
        k.saddr[:], k.daddr[:] = rec.saddr[:], rec.daddr[:]
        into = ctypes.c_uint64()
        if not self._obj.map("frag_groups").lookup(k, into):
            return False
        rec.fate, rec.link = events.Fate.REASSEMBLED, into.value
        return True

    def counters(self, attach_failures: int = 0) -> Counters:
        st = self._obj.map("stats")
        vals = {s: sum(st.percpu_u64(s)) for s in Stat}
        return Counters(
            created=vals[Stat.CREATED], emitted=vals[Stat.EMITTED], filtered=vals[Stat.FILTERED],
            # per-CPU u64 counters: LATE can exceed REJECTED on one CPU, never in sum
            rejected=vals[Stat.REJECTED] - vals[Stat.LATE],
            lost=vals[Stat.LOST], create_failed=vals[Stat.CREATE_FAILED], truncated=vals[Stat.TRUNCATED],
            route_dropped=vals[Stat.ROUTE_DROPPED], path_overflow=vals[Stat.PATH_OVERFLOW],
            drop_overflow=vals[Stat.DROP_OVERFLOW], qdisc_overflow=vals[Stat.QDISC_OVERFLOW], aged_out=self.aged,
            shown=self.shown, unread=self.unread, attach_failures=attach_failures)

    def inflight(self) -> int:
        """Records in flight: parked in the shared table, and in the CPUs' slots."""
        return sum(1 for _ in self._obj.map("inflight").keys(ctypes.c_uint64)) + len(self.slot_records())

    def finish(self, budget: float = 1.0) -> list[model.Packet]:
        """Once nothing is attached: what the kernel had already reported.

        Records still in the ring after `budget` seconds of reading are
        counted as unread, so the summary accounts for every packet."""
        out: list[model.Packet] = []
        if self.ring is not None:
            deadline = time.monotonic() + budget
            while self.ring.pending() and time.monotonic() < deadline:
                out.extend(self.drain())
            self.unread += self.ring.discard()
        self.shown += len(out)
        return out

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
