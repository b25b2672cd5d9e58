"""Record raw kernel records, and replay them without root or BPF.

A recording is JSON lines: a header, then one line per record with the raw
bytes the kernel wrote (hex), plus `context` lines whenever user space
learned names the records need (devices, observer priorities, drop reasons,
kernel symbols of drop locations).  Replaying rebuilds the paths with the
same code as live tracing, so recordings double as test fixtures.
"""
from __future__ import annotations

import dataclasses
import json
import re
import struct
from dataclasses import dataclass
from typing import IO, Callable, Iterator

from . import events, layout, model, paths, routing

# 2: the record carries the header line's facts and header bytes (appended to
#    its header), and the recording the wall-clock time of the kernel's clock
#    zero.  Format 1 records are read by padding their header with zeros:
#    every field added since reads 0, "unknown".
# 3: the record carries tunnel links (encap, decap, inner), the tunnel device
#    and the IPv6 extension headers walked, appended to its header: formats 1
#    and 2 are padded as above.
# 4: a record the kernel emitted carries its stage times after first_ts
#    (rel_ts set, a byte that was padding); older records read as before,
#    absolute.  Bumped so that an older pkttrace refuses such a recording
#    instead of printing its times as absolute.
FORMAT = 4
_LAYOUTS = {1: (200, 32), 2: (304, 32), 3: (events.RECORD_HEADER_SIZE, events.STAGE_SIZE),
            4: (events.RECORD_HEADER_SIZE, events.STAGE_SIZE)}
_U64 = struct.Struct("=Q")
_FATE_OFF = events.PtRecord.fate.offset
_LOC_OFF = events.PtRecord.drop_location.offset


def _ctx_to_json(ctx: paths.Context, symbols: dict[int, str]) -> dict:
    d = _ctx_rows(ctx, symbols)
    if ctx.hidden_tables:       # --rules' own tables (fentry/kprobe see them run): only when there are some
        d["hidden_tables"] = [[ino, h] for ino, h in sorted(ctx.hidden_tables)]
    return d


def _ctx_rows(ctx: paths.Context, symbols: dict[int, str]) -> dict:
    return {
        "ifnames": [[ino, idx, name] for (ino, idx), name in sorted(ctx.ifnames.items())],
        # [ino, ifindex, kind] of tunnel devices: absent in older recordings
        "if_kinds": [[ino, idx, kind] for (ino, idx), kind in sorted(ctx.if_kinds.items())],
        "netns_names": [[ino, name] for ino, name in sorted(ctx.netns_names.items())],
        "slot_priority": [[*k, v] for k, v in sorted(ctx.slot_priority.items())],
        "slot_tables": [[*k, v] for k, v in sorted(ctx.slot_tables.items())],
        "slot_after": [[*k, v] for k, v in sorted(ctx.slot_after.items())],
        "conntrack": [[ino, fams] for ino, fams in sorted(ctx.conntrack.items())],
        "registered": [[*k, v] for k, v in sorted(ctx.registered.items())],
        "rules": [[ino, fam, [routing.rule_to_json(r) for r in rules]] for (ino, fam), rules in sorted(ctx.rules.items())],
        "drop_reasons": [[v, n] for v, n in sorted(ctx.drop_reasons.items())],
        "symbols": [[a, s] for a, s in sorted(symbols.items())],
        # [ino, ifindex, handle, kind, root]: a context line without them (older recordings) reads as before
        "qdiscs": [[ino, idx, h, kind, ctx.qdisc_roots.get((ino, idx)) == h]
                   for (ino, idx, h), kind in sorted(ctx.qdisc_kinds.items())],
    }


def _ctx_update(ctx: paths.Context, symbols: dict[int, str], d: dict) -> None:
    ctx.ifnames.update({(ino, idx): name for ino, idx, name in d.get("ifnames", [])})
    ctx.if_kinds.update({(ino, idx): kind for ino, idx, kind in d.get("if_kinds", [])})
    ctx.netns_names.update({ino: name for ino, name in d.get("netns_names", [])})
    ctx.slot_priority.update({tuple(row[:4]): row[4] for row in d.get("slot_priority", [])})
    ctx.slot_tables.update({tuple(row[:4]): [tuple(t) for t in row[4]] for row in d.get("slot_tables", [])})
    ctx.slot_after.update({tuple(row[:4]): [tuple(t) for t in row[4]] for row in d.get("slot_after", [])})
    ctx.conntrack.update({ino: fams for ino, fams in d.get("conntrack", [])})
    ctx.registered.update({tuple(row[:3]): [tuple(t) for t in row[3]] for row in d.get("registered", [])})
    ctx.rules.update({(ino, fam): [routing.rule_from_json(r) for r in rules] for ino, fam, rules in d.get("rules", [])})
    ctx.drop_reasons.update({v: n for v, n in d.get("drop_reasons", [])})
    ctx.hidden_tables.update((ino, h) for ino, h in d.get("hidden_tables", []))
    symbols.update({a: s for a, s in d.get("symbols", [])})
    for ino, idx, h, kind, root in d.get("qdiscs", []):
        ctx.qdisc_kinds[(ino, idx, h)] = kind
        if root:
            ctx.qdisc_roots[(ino, idx)] = h


class Recorder:
    """Writes raw records to a file as the tracer reports them."""

    def __init__(self, out: IO[str], ctx: paths.Context):
        self.out, self.ctx = out, ctx
        self._written: dict | None = None
        self._sizes: tuple | None = None
        self._symbols: dict[int, str] = {}
        # (None: records of a recording that had no wall clock, rewritten)
        out.write(json.dumps({"pkttrace_recording": FORMAT, "record_size": events.RECORD_HEADER_SIZE,
                              "stage_size": events.STAGE_SIZE, "boot_wall_ns": ctx.boot_wall_ns}) + "\n")

    def __call__(self, raw: bytes, aged: bool) -> None:
        fate, loc = raw[_FATE_OFF], _U64.unpack_from(raw, _LOC_OFF)[0]
        if fate == events.Fate.DROPPED and loc not in self._symbols and self.ctx.symbolize:
            self._symbols[loc] = self.ctx.symbolize(loc)
        # names are only ever added: compare sizes, not the whole context, per record
        sizes = (len(self.ctx.ifnames) + len(self.ctx.if_kinds), len(self.ctx.netns_names), self.ctx.generation,
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
    """The file is not a complete recording this pkttrace reads; one line says why."""


# ---- reading: every line checked before it is used ---------------------------
#
# A recording is input like any other: it may be cut (the disk filled, the
# tracer was killed), damaged, of another version, or not a recording at
# all.  Each line is checked for what this version writes (types, sizes,
# hex) before anything is built from it; only the last line may be cut,
# which loses that line and nothing else.

MAX_LINE = 64 << 20        # a context line of hundreds of namespaces is a few MB
_HEX = re.compile(r"[0-9a-fA-F]*")
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_RULE_FIELDS = {f.name for f in dataclasses.fields(routing.Rule)}
_N_OFF = events.PtRecord.n_stages.offset


@dataclass
class Cut:
    """What was left of a recording's last line: not read."""
    lines: int = 0
    bytes: int = 0

    def __str__(self) -> str:
        return f"last {self.lines} line(s) incomplete, ignored ({self.bytes} bytes)"


def _is_int(v) -> bool:
    return type(v) is int and _INT_MIN <= v <= _INT_MAX    # bool is an int to Python, not here


def _is_str(v) -> bool:
    return type(v) is str


def _is_int_or_none(v) -> bool:
    return v is None or _is_int(v)


def _is_str_or_none(v) -> bool:
    return v is None or _is_str(v)


def _row(*checks):
    def check(v) -> bool:
        return type(v) is list and len(v) == len(checks) and all(c(x) for c, x in zip(checks, v))
    return check


def _list_of(check):
    return lambda v: type(v) is list and all(check(x) for x in v)


_TABLES = _list_of(_row(_is_str, _is_int))     # [(table, priority)]
# [(table, priority, nft table handle)]; recordings before handles: pairs
_REGISTERED = _list_of(lambda t: _row(_is_str, _is_int, _is_int)(t) or _row(_is_str, _is_int)(t))
_I = _is_int
# the rows of each kind of name a context line carries (as _ctx_to_json writes them)
_CONTEXT_ROWS = {
    "ifnames": _row(_I, _I, _is_str),
    "if_kinds": _row(_I, _I, _is_str),
    "netns_names": _row(_I, _is_str),
    "slot_priority": _row(_I, _I, _I, _I, _I),
    "slot_tables": _row(_I, _I, _I, _I, _TABLES),
    "slot_after": _row(_I, _I, _I, _I, _TABLES),
    "conntrack": _row(_I, _list_of(_I)),
    "registered": _row(_I, _I, _I, _REGISTERED),
    "rules": _row(_I, _I, _list_of(lambda r: type(r) is dict)),
    "drop_reasons": _row(_I, _is_str),
    "symbols": _row(_I, _is_str),
    "qdiscs": _row(_I, _I, _I, _is_str, lambda v: type(v) is bool),
    "hidden_tables": _row(_I, _I),
}
_RULE_TYPES = {
    "priority": _is_int, "table": _is_int, "action": _is_int, "src": _is_str_or_none, "dst": _is_str_or_none,
    "fwmark": _is_int_or_none, "fwmask": _is_int, "iif": _is_str_or_none, "oif": _is_str_or_none, "tos": _is_int,
    "ipproto": _is_int, "sport": lambda v: v is None or _row(_I, _I)(v),
    "dport": lambda v: v is None or _row(_I, _I)(v), "invert": lambda v: type(v) is bool,
    "unsupported": lambda v: type(v) is bool,
}


def _rule(d: dict) -> routing.Rule:
    if not {"priority", "table"} <= d.keys() <= _RULE_FIELDS or not all(_RULE_TYPES[k](v) for k, v in d.items()):
        raise ValueError("not a routing rule")
    return routing.rule_from_json(d)     # ValueError: an address that is not one


def _check_context(d) -> dict:
    """A context line's names, checked and converted; ValueError if any is not what the recorder writes."""
    if type(d) is not dict:
        raise ValueError("context is not an object")
    for key, rows in d.items():
        check = _CONTEXT_ROWS.get(key)
        if check is None:
            continue                      # names a later version added: not needed to rebuild paths
        if type(rows) is not list or not all(check(r) for r in rows):
            raise ValueError(f"bad {key!r}")
    # converted here, so a bad rule is found while the file is checked
    rules = [[ino, fam, [_rule(r) for r in rs]] for ino, fam, rs in d.get("rules", [])]
    return dict(d, rules=rules)


def _check_raw(d: dict, header_size: int, version: int = FORMAT) -> tuple[bytes, bool]:
    raw, aged = d["raw"], d.get("aged", False)
    if not _is_str(raw) or len(raw) % 2 or not _HEX.fullmatch(raw) or type(aged) is not bool:
        raise ValueError("not a record")
    b = bytes.fromhex(raw)
    stages, rest = divmod(len(b) - header_size, events.STAGE_SIZE)
    # exactly the record the kernel sent: its header, and as many stages as it says
    if stages < 0 or rest or stages != min(b[_N_OFF], events.PT_MAX_STAGES):
        raise ValueError(f"a record of {len(b)} bytes")
    if header_size < events.RECORD_HEADER_SIZE:      # an older format: its header grew at the end since
        b = b[:header_size] + bytes(events.RECORD_HEADER_SIZE - header_size) + b[header_size:]
    if version < 4 and b[layout.REL_TS_OFF]:
        # times absolute before format 4, whatever the byte: format 1 had
        # a netns index there for a while (nonzero but for the first netns)
        b = b[:layout.REL_TS_OFF] + b"\0" + b[layout.REL_TS_OFF + 1:]
    return b, aged


def _check_header(d, n: int) -> tuple[int, int | None, int]:
    """(the records' header size, boot_wall_ns, format) of a recording's first line."""
    if type(d) is not dict or "pkttrace_recording" not in d:
        raise RecordingError(f"line {n}: not a pkttrace recording (no header)")
    version = d["pkttrace_recording"]
    if not _is_int(version) or version < 1:
        raise RecordingError(f"line {n}: not a pkttrace recording (format {version!r})")
    if version > FORMAT:
        raise RecordingError(f"recording format {version} is newer than this pkttrace reads ({FORMAT}): "
                             "replay it with a newer pkttrace")
    if (d.get("record_size"), d.get("stage_size")) != _LAYOUTS[version]:
        raise RecordingError("recorded with another record layout (another pkttrace version)")
    if version < 2:
        return _LAYOUTS[version][0], None, version
    wall = d.get("boot_wall_ns")
    if wall is None:                     # a format 1 recording rewritten: times unknown
        return _LAYOUTS[version][0], None, version
    if not isinstance(wall, int) or not _is_int(wall) or wall < 0:
        raise RecordingError(f"line {n}: boot_wall_ns is not a time")
    return _LAYOUTS[version][0], wall, version


def _lines(source: IO) -> Iterator[tuple[int, str | bytes, bool]]:
    """(line number, text, ends with a newline): text or binary streams, bounded lines."""
    n = 0
    while True:
        try:
            line = source.readline(MAX_LINE + 1)
        except UnicodeDecodeError:        # a text stream over bytes that are not text
            raise RecordingError(f"line {n + 1}: not UTF-8 text: is this a pkttrace recording?") from None
        except OSError as e:
            raise RecordingError(f"line {n + 1}: cannot read: {e.strerror}") from None
        if not line:
            return
        n += 1
        complete = line.endswith(b"\n" if isinstance(line, bytes) else "\n")
        if not complete and len(line) > MAX_LINE:
            raise RecordingError(f"line {n}: longer than {MAX_LINE >> 20} MiB: not a pkttrace recording")
        yield n, line, complete


# what the recorder writes (json.dumps: ASCII, ", " and ": " separators),
# to tell a line cut short from anything else without a newline
_STARTS = ('{"pkttrace_recording": ', '{"context": {', '{"raw": "')
_RAW_CUT = re.compile(r'\{"raw": "[0-9a-f]*(.*)', re.S)
_RAW_ENDS = ('", "aged": false}', '", "aged": true}')


def _is_cut_line(text: str) -> bool:
    """Could text be the start of a line the recorder writes, cut short?"""
    if not text.isascii() or not text.isprintable():
        return False                       # the recorder writes printable ASCII only
    if any(s.startswith(text) for s in _STARTS):
        return True                        # cut inside the opening itself
    m = _RAW_CUT.fullmatch(text)
    if m:
        return any(end.startswith(m.group(1)) for end in _RAW_ENDS)
    return text.startswith(_STARTS[:2])


def _items(source: IO, cut: Cut) -> Iterator[tuple[int, str, dict | tuple[bytes, bool] | int | None]]:
    """The checked lines of a recording: (1, "header", boot_wall_ns), then
    (n, "context", dict) or (n, "raw", (bytes, aged)).

    A last line without its newline that does not parse is a cut tail:
    counted in `cut`, not read."""
    header, header_size, version = False, 0, FORMAT
    for n, line, complete in _lines(source):
        size = len(line) if isinstance(line, bytes) else len(line.encode("utf-8", "surrogateescape"))
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError:
            text = None
        if text is not None and not text.strip():
            continue
        try:
            if text is None:
                raise ValueError
            d = json.loads(text)
        except (ValueError, RecursionError):    # not JSON, not UTF-8, or nested beyond reason
            if not complete and text is not None and _is_cut_line(text):
                cut.lines, cut.bytes = 1, size
                break                  # the last line: nothing follows
            what = "not JSON" if text is not None else "not UTF-8 text"
            raise RecordingError(f"line {n}: {what}: is this a pkttrace recording?") from None
        if not header:
            header_size, wall, version = _check_header(d, n)
            header = True
            yield n, "header", wall
            continue
        try:
            if type(d) is not dict:
                raise ValueError("not an object")
            if "context" in d:
                yield n, "context", _check_context(d["context"])
            elif "raw" in d:
                yield n, "raw", _check_raw(d, header_size, version)
            else:
                raise ValueError("neither a record nor names")
        except (ValueError, TypeError, RecursionError) as e:
            raise RecordingError(f"line {n}: not a line of a pkttrace recording ({e})") from None
    if not header:
        raise RecordingError("empty file: not a pkttrace recording" if not cut.bytes else
                             "not a complete pkttrace recording (its header is cut)")


# assembling a record is the live tracer's code, which trusts the kernel:
# what a damaged record makes it raise
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, struct.error, OverflowError, ZeroDivisionError,
                  AttributeError, RecursionError)


def _context(ctx: paths.Context, symbols: dict[int, str], d: dict) -> None:
    _ctx_update(ctx, symbols, dict(d, rules=[]))
    ctx.rules.update({(ino, fam): rules for ino, fam, rules in d.get("rules", [])})
    ctx.shapes.clear()               # names changed: paths resolved with the old ones are stale


def _replay(lines: IO, cut: Cut) -> Iterator[tuple[int, model.Packet]]:
    ctx = paths.Context()
    symbols: dict[int, str] = {}
    ctx.symbolize = lambda a: symbols.get(a, hex(a))
    for n, kind, val in _items(lines, cut):
        if kind == "header":
            ctx.boot_wall_ns = val        # type: ignore[assignment]
            continue
        if isinstance(val, dict):         # a "context" line
            _context(ctx, symbols, val)
            continue
        raw, aged = val                   # type: ignore[misc]  # a "raw" line
        try:
            pkt = paths.assemble(events.decode_record(raw), ctx, aged=aged)
            pkt.path                          # built lazily otherwise: build it while errors are ours
        except _DECODE_ERRORS as e:
            raise RecordingError(f"line {n}: a record that does not decode ({type(e).__name__})") from None
        yield n, pkt


def replay(lines: IO, cut: Cut | None = None) -> Iterator[model.Packet]:
    """Packets rebuilt from a recording (a text or binary stream).

    Raises RecordingError, with the line, for anything that is not a
    complete recording of this format; a cut last line is skipped and
    described in `cut` (when given).  Each packet is built here (its path
    and values), so a damaged record fails here, not in the caller."""
    for _n, pkt in _replay(lines, cut if cut is not None else Cut()):
        yield pkt


def check(source: IO) -> Cut:
    """Read a whole recording without building packets: RecordingError if it
    is not a complete recording; what was cut at its end."""
    cut = Cut()
    for _ in _items(source, cut):
        pass
    return cut


@dataclass
class Replayed:
    shown: int = 0
    cut: Cut = dataclasses.field(default_factory=Cut)


def replay_to(source: IO, render: Callable[[model.Packet], object], write: Callable[[object], None],
              keep: Callable[[model.Packet], bool] | None = None, count: int | None = None) -> Replayed:
    """What `pkttrace replay` does: the packets of a recording that keep()
    accepts, each rendered and written, up to count.

    A file that can be read twice is checked whole first, so a bad one is
    refused before anything is written.  RecordingError for a bad file
    (also for a record that cannot be shown); errors of write() are the
    caller's."""
    try:
        start = source.tell() if source.seekable() else None
    except OSError:
        start = None
    done = Replayed()
    if start is not None:
        done.cut = check(source)
        try:
            source.seek(start)
        except OSError as e:
            raise RecordingError(f"cannot read it again: {e.strerror}") from None
    if count is not None and count <= 0:
        return done
    for n, pkt in _replay(source, done.cut):
        try:
            if keep is not None and not keep(pkt):
                continue
            text = render(pkt)
        except _DECODE_ERRORS as e:
            raise RecordingError(f"line {n}: a record that cannot be shown ({type(e).__name__})") from None
        write(text)
        done.shown += 1
        if count is not None and done.shown >= count:
            break
    return done
