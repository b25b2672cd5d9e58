"""Record raw kernel records, and replay them without root or BPF.

A recording is JSON lines: a header, then one line per record with the raw
bytes the kernel wrote (hex), plus `context` lines whenever user space
learned names the records need (devices, observer priorities, drop reasons,
kernel symbols of drop locations).  Replaying rebuilds the paths with the
same code as live tracing, so recordings double as test fixtures.
"""
from __future__ import annotations

import json
import struct
from typing import IO, Iterator

from . import events, paths, routing

FORMAT = 1
_U64 = struct.Struct("=Q")
_FATE_OFF = events.PtRecord.fate.offset
_LOC_OFF = events.PtRecord.drop_location.offset


def _ctx_to_json(ctx: paths.Context, symbols: dict[int, str]) -> dict:
    return {
        "ifnames": [[ino, idx, name] for (ino, idx), name in sorted(ctx.ifnames.items())],
        "netns_names": [[ino, name] for ino, name in sorted(ctx.netns_names.items())],
        "slot_priority": [[*k, v] for k, v in sorted(ctx.slot_priority.items())],
        "slot_tables": [[*k, v] for k, v in sorted(ctx.slot_tables.items())],
        "slot_after": [[*k, v] for k, v in sorted(ctx.slot_after.items())],
        "conntrack": [[ino, fams] for ino, fams in sorted(ctx.conntrack.items())],
        "registered": [[*k, v] for k, v in sorted(ctx.registered.items())],
        "rules": [[ino, fam, [routing.rule_to_json(r) for r in rules]] for (ino, fam), rules in sorted(ctx.rules.items())],
        "drop_reasons": [[v, n] for v, n in sorted(ctx.drop_reasons.items())],
        "symbols": [[a, s] for a, s in sorted(symbols.items())],
    }


def _ctx_update(ctx: paths.Context, symbols: dict[int, str], d: dict) -> None:
    ctx.ifnames.update({(ino, idx): name for ino, idx, name in d.get("ifnames", [])})
    ctx.netns_names.update({ino: name for ino, name in d.get("netns_names", [])})
    ctx.slot_priority.update({tuple(row[:4]): row[4] for row in d.get("slot_priority", [])})
    ctx.slot_tables.update({tuple(row[:4]): [tuple(t) for t in row[4]] for row in d.get("slot_tables", [])})
    ctx.slot_after.update({tuple(row[:4]): [tuple(t) for t in row[4]] for row in d.get("slot_after", [])})
    ctx.conntrack.update({ino: fams for ino, fams in d.get("conntrack", [])})
    ctx.registered.update({tuple(row[:3]): [tuple(t) for t in row[3]] for row in d.get("registered", [])})
    ctx.rules.update({(ino, fam): [routing.rule_from_json(r) for r in rules] for ino, fam, rules in d.get("rules", [])})
    ctx.drop_reasons.update({v: n for v, n in d.get("drop_reasons", [])})
    symbols.update({a: s for a, s in d.get("symbols", [])})


class Recorder:
    """Writes raw records to a file as the tracer reports them."""

    def __init__(self, out: IO[str], ctx: paths.Context):
        self.out, self.ctx = out, ctx
        self._written: dict | None = None
        self._sizes: tuple | None = None
        self._symbols: dict[int, str] = {}
        out.write(json.dumps({"pkttrace_recording": FORMAT, "record_size": events.RECORD_HEADER_SIZE,
                              "stage_size": events.STAGE_SIZE}) + "\n")

    def __call__(self, raw: bytes, aged: bool) -> None:
        fate, loc = raw[_FATE_OFF], _U64.unpack_from(raw, _LOC_OFF)[0]
        if fate == events.Fate.DROPPED and loc not in self._symbols and self.ctx.symbolize:
            self._symbols[loc] = self.ctx.symbolize(loc)
        # names are only ever added: compare sizes, not the whole context, per record
        sizes = (len(self.ctx.ifnames), len(self.ctx.netns_names), self.ctx.generation,
                 len(self.ctx.drop_reasons), len(self._symbols))
        if sizes != self._sizes:
            self._sizes = sizes
            snapshot = _ctx_to_json(self.ctx, self._symbols)
            # only what changed since the last context line
            prev = self._written or {}
            delta = {k: [r for r in v if r not in prev.get(k, [])] for k, v in snapshot.items()}
            self.out.write(json.dumps({"context": {k: v for k, v in delta.items() if v}}) + "\n")
            self._written = snapshot
        self.out.write(json.dumps({"raw": raw.hex(), "aged": aged}) + "\n")

    def flush(self) -> None:
        self.out.flush()


class RecordingError(ValueError):
    pass


def replay(lines: IO[str]) -> Iterator[paths.Packet]:
    """Packets rebuilt from a recording."""
    ctx = paths.Context()
    symbols: dict[int, str] = {}
    ctx.symbolize = lambda a: symbols.get(a, hex(a))
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            raise RecordingError(f"line {n}: not JSON: is this a pkttrace recording?") from None
        if n == 1:
            if d.get("pkttrace_recording") != FORMAT:
                raise RecordingError("not a pkttrace recording (or a newer format)")
            if (d.get("record_size"), d.get("stage_size")) != (events.RECORD_HEADER_SIZE, events.STAGE_SIZE):
                raise RecordingError("recorded with another record layout (another pkttrace version)")
            continue
        if "context" in d:
            _ctx_update(ctx, symbols, d["context"])
        elif "raw" in d:
            yield paths.assemble(events.decode_record(bytes.fromhex(d["raw"])), ctx, aged=bool(d.get("aged")))
