"""The kernel record's bytes: offsets and struct formats.

Derived from the ctypes mirror of bpf/pkttrace.h (tracer.events), which
tests/unit/test_btf_mirror.py checks against the BPF object's BTF: no
offset or format here is written by hand.  The decoder (tracer.paths) and
the output templates (tracer.templates) read records through these only.
"""
from __future__ import annotations

import ctypes
import struct

from .events import PT_MAX_STAGES, PtAddrStage, PtRecord, PtStage, StageKind

_CT_FMT = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_int32: "i",
           ctypes.c_uint64: "Q", ctypes.c_char: "c"}


def _code(typ) -> str:
    return f"{ctypes.sizeof(typ)}s" if issubclass(typ, ctypes.Array) else _CT_FMT[typ]


def whole(struct_type, stop: str | None = None) -> struct.Struct:
    """Every field of struct_type in order (up to `stop`), as one format."""
    out = "="
    for name, typ in struct_type._fields_:
        if name == stop:
            break
        out += _code(typ)
    return struct.Struct(out)


def pick(struct_type, *names: str) -> tuple[int, struct.Struct]:
    """(offset, format) reading just these fields, in offset order, the bytes
    between them skipped."""
    fields = dict(struct_type._fields_)
    at = sorted((getattr(struct_type, n).offset, n) for n in names)
    start, pos, out = at[0][0], at[0][0], "="
    for off, n in at:
        if off > pos:
            out += f"{off - pos}x"
        out += _code(fields[n])
        pos = off + ctypes.sizeof(fields[n])
    return start, struct.Struct(out)


HEADER = whole(PtRecord, stop="stages")
STAGE = whole(PtStage)
ADDR = whole(PtAddrStage)
HEADER_SIZE = PtRecord.stages.offset
STAGE_SIZE = ctypes.sizeof(PtStage)
assert HEADER.size == HEADER_SIZE and STAGE.size == STAGE_SIZE == ADDR.size

N_STAGES_OFF = PtRecord.n_stages.offset
FLAGS_OFF = PtRecord.flags.offset
FIRST_TS_OFF = PtRecord.first_ts.offset
# nonzero: the stage times are ns after first_ts (as emitted), else absolute
# (the in-flight map's records, and recordings made before format 4)
REL_TS_OFF = PtRecord.rel_ts.offset
U64 = struct.Struct("=Q")
# a stage as a tuple: the indices of its fields (STAGE.unpack order)
ST_TS, ST_IFINDEX, ST_MARK, ST_AUX, ST_AUX2, ST_KIND, ST_SLOT, ST_TOS, ST_FAMILY, ST_CT, ST_FLAGS = \
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
assert [f[0] for f in PtStage._fields_][:11] == ["ts", "ifindex", "mark", "aux", "aux2", "kind", "slot", "tos",
                                                 "family", "ct", "flags"]
KIND_OFF = PtStage.kind.offset
TS_OFF = PtStage.ts.offset

# per-packet values
VALS_OFF, VALS = pick(PtRecord, "id", "drop_location")
TAIL_OFF, TAIL = pick(PtRecord, "match", "seen", "flags", "rel_ts", "sport", "dport", "saddr", "daddr", "pid",
                      "comm")
LINKS_OFF, LINKS = pick(PtRecord, "cause", "prev", "next", "link", "next_netns", "prev_netns")
# the header line's facts, and the captured header bytes (HEAD_OFF, head_len of them)
FACTS_OFF, FACTS = pick(PtRecord, "len", "tcp_flags", "icmp_type", "icmp_code", "head_len")
HEAD_OFF = PtRecord.head.offset
# tunnels: the outer/inner packet links, the tunnel device, IPv6 extension headers
TUN_OFF, TUN = pick(PtRecord, "encap", "decap", "inner", "tun_ifindex", "ext_hdrs")
# every field that holds another record's id, in the order templates fill them
LINK_FIELDS = ("cause", "prev", "next", "link", "encap", "decap", "inner")
LINK_OFFS = tuple(getattr(PtRecord, n).offset for n in LINK_FIELDS)


def stage_kinds(raw: bytes) -> list[int]:
    """The kind of each of the record's stages (PT_STAGE_*), in order."""
    return [raw[HEADER_SIZE + i * STAGE_SIZE + KIND_OFF] for i in range(min(raw[N_STAGES_OFF], PT_MAX_STAGES))]


def timed_stages(kinds: list[int]) -> list[int]:
    """The indices of the stages that carry a time: all but address stages,
    whose address lies where the others hold their time."""
    return [i for i, kind in enumerate(kinds) if kind != StageKind.ADDR]


def relative_times(raw: bytes) -> bytes:
    """raw as pt_emit sends it: every timed stage's time made ns after
    first_ts, and rel_ts set (a record already so: unchanged).  For records
    read otherwise (recordings before format 4, tests, the benchmark's
    stream) that should take the live path."""
    if raw[REL_TS_OFF]:
        return raw
    b = bytearray(raw)
    first = U64.unpack_from(b, FIRST_TS_OFF)[0]
    for i in timed_stages(stage_kinds(raw)):
        off = HEADER_SIZE + i * STAGE_SIZE + TS_OFF
        U64.pack_into(b, off, (U64.unpack_from(b, off)[0] - first) % (1 << 64))
    b[REL_TS_OFF] = 1
    return bytes(b)
