"""Render packets of one flow and path fast: the text as a template.

A flood is mostly packets of a few flows, each taking one path: their JSON
lines and human blocks differ only in the packet id, the times of their
stages and the ids they link to.  The first packet of each (path shape,
everything else in its record) is rendered by the one renderer
(`paths.Packet.to_json`, `output.format_packet`) with sentinel values in
place of those; the sentinels in the text become template holes, and every
later packet of the same kind fills them.  Nothing but the id, times and
links is ever taken from the template, so the text is the renderer's own.
A record with neither links nor a tunnel (a flood's, mostly) is read by one
struct unpack that gives both the key of its text and the values to fill;
its stage times come after its first already (the kernel makes them so as
it emits the record), so a JSON line is one getter and one `bytes %`.
"""
from __future__ import annotations

import re
import struct
from itertools import repeat
from operator import itemgetter, sub as _sub
from typing import Callable

from .events import StageKind
from .layout import HEAD_OFF as _HEAD_OFF, HEADER_SIZE as _HDR_SIZE, LINK_OFFS as _LINK_OFFS, \
    LINKS_OFF as _LINKS_OFF, REL_TS_OFF as _REL_TS_OFF, STAGE_SIZE as _STAGE_SIZE, TS_OFF as _TS_OFF, \
    TUN_OFF as _TUN_OFF, stage_kinds, timed_stages
from .model import Packet

# Sentinels: the id, and the time of raw stage i (ns after the first stage),
# chosen so that each renders as a token found nowhere else in the text.
_SENT_ID = 7_100_000_000_000_000_000
_SENT_LINK = 7_200_000_000_000_000_000          # + 0..6: cause, prev, next, reassembled, encap, decap, inner
_SENT_T = 7_000_000_000_000                     # + i * 1000: distinct at the human view's resolution
_T_STEP = 1000
# the wall-clock time (ns) the sentinel record's first stage gets: year 2201,
# a value no real packet has (its first_ts is set to this minus boot_wall_ns)
_SENT_WALL = 7_300_000_000_000_000_000
_U64 = struct.Struct("=Q")
_LINKS4 = struct.Struct("=QQQQ")                # cause, prev, next, link: ids
_LINK_BYTES = _LINKS4.size
_NO_LINKS = bytes(_LINK_BYTES)
_TUN3 = struct.Struct("=QQQ")                   # encap, decap, inner: ids (after the captured header bytes)
_NO_TUN = bytes(_HDR_SIZE - _TUN_OFF)
_N_LINKS = len(_LINK_OFFS)
_WALL = 1 + _N_LINKS                            # value index of the wall-clock time
_T0 = _WALL + 1                                 # ... of the first stage time
# how a template's holes take the values, in the two common orders
_ID_TIMES = "id, times"
_ID_WALL_TIMES = "id, wall-clock time, times"
_ID_SOME_TIMES = "id, times picked"
_ID_SOME_TIMES_WALL = "id, times picked, wall-clock time"
# where a plain fill puts the wall-clock time
_PLAIN_NO_WALL, _PLAIN_WALL_FIRST, _PLAIN_WALL_LAST = 0, 1, 2


class _Shape:
    """Per path shape: how to read the parts of a record that are not times."""

    def __init__(self, raw: bytes):
        kinds = stage_kinds(raw)
        n = len(kinds)
        self.timed = timed_stages(kinds)        # raw indices of stages that carry a time
        # a qdisc stage prints a difference of two times (queued_ns): not a
        # hole a template can fill; such packets are rendered each
        self.untemplated = StageKind.QDISC in kinds
        self.n = n
        self.size = _HDR_SIZE + n * _STAGE_SIZE
        # id, first_ts, then the link ids, then every timed stage's time
        offs = [0, 8] + list(_LINK_OFFS) + \
               [_HDR_SIZE + i * _STAGE_SIZE + _TS_OFF for i in self.timed]
        fmt, pos = "=", 0
        for off in offs:
            fmt += f"{off - pos}xQ"
            pos = off + 8
        self.values = struct.Struct(fmt)
        # the bytes a template depends on, as runs picked by one struct and
        # joined into one key: all from offset 24 on but the link ids, the
        # captured header bytes (head[]: no view but pcap-ng's shows them,
        # and each packet's differ), the tunnel links and the stage times
        skip = [(_LINKS_OFF, _LINKS_OFF + _LINK_BYTES), (_HEAD_OFF, _HDR_SIZE)] + \
               [(_HDR_SIZE + i * _STAGE_SIZE + _TS_OFF, _HDR_SIZE + i * _STAGE_SIZE + _TS_OFF + 8)
                for i in self.timed]
        fmt, pos = "=24x", 24
        for a, b in skip:
            fmt += f"{a - pos}s{b - a}x" if a > pos else f"{b - a}x"
            pos = b
        if self.size > pos:
            fmt += f"{self.size - pos}s"
        self.kept = struct.Struct(fmt)
        self._plain_struct()
        self.texts: dict = {}                   # key -> (text, pick, boot, plain fill or None, rel)

    def _plain_struct(self) -> None:
        """One struct for a record with no link and no tunnel (a flood's
        records, mostly): one unpack gives the key's bytes and every value
        a template fills, where key() and values take two and slices.

        plain.unpack_from(raw): the id, first_ts, then in the record's
        order the kept runs, the link ids' bytes (plain_links), the tunnel
        bytes (plain_tun) and each timed stage's time."""
        items, pos, fmt = 0, 0, "="
        kept, times = [], {}

        def take(off: int, code: str, size: int) -> int:
            nonlocal items, pos, fmt
            fmt += (f"{off - pos}x" if off > pos else "") + code
            pos = off + size
            items += 1
            return items - 1

        take(0, "Q", 8)
        take(8, "Q", 8)
        run = 24                                # a kept run open since this offset
        cuts = [(_LINKS_OFF, _LINKS_OFF + _LINK_BYTES, "links"), (_HEAD_OFF, _TUN_OFF, None),
                (_TUN_OFF, _HDR_SIZE, "tun")] + \
               [(_HDR_SIZE + i * _STAGE_SIZE + _TS_OFF, _HDR_SIZE + i * _STAGE_SIZE + _TS_OFF + 8, i)
                for i in self.timed]
        for a, b, what in cuts:
            if a > run:
                kept.append(take(run, f"{a - run}s", a - run))
            if what == "links":
                self.plain_links = take(a, f"{b - a}s", b - a)
            elif what == "tun":
                self.plain_tun = take(a, f"{b - a}s", b - a)
            elif what is not None:
                times[what] = take(a, "Q", 8)
            run = b
        if self.size > run:
            kept.append(take(run, f"{self.size - run}s", self.size - run))
        self.plain = struct.Struct(fmt)
        # the key's runs (a tuple even of one); the item of timed stage j
        self.plain_kept = itemgetter(*kept) if len(kept) > 1 else (lambda t, i=kept[0]: (t[i],))
        self.plain_times = [times[i] for i in self.timed]

    def key(self, raw: bytes) -> bytes | tuple:
        # what the text depends on but the id, times and link ids: the kept
        # bytes, and which links exist (mostly none: the bytes alone)
        kept = b"".join(self.kept.unpack_from(raw))
        links = raw[_LINKS_OFF:_LINKS_OFF + _LINK_BYTES]
        tun = raw[_TUN_OFF:_HDR_SIZE]          # tunnel links, device, IPv6 extension headers
        if links == _NO_LINKS and tun == _NO_TUN:
            return kept
        return (kept, None if links == _NO_LINKS else tuple(map(bool, _LINKS4.unpack(links))),
                None if tun == _NO_TUN else (tuple(map(bool, _TUN3.unpack_from(tun))), tun[_TUN3.size:]))

    def sentinel_raw(self, raw: bytes, boot_wall_ns: int | None) -> bytes:
        b = bytearray(raw[:self.size])
        _U64.pack_into(b, 0, _SENT_ID)
        # first_ts: the wall-clock sentinel (times after it are the stage sentinels)
        first = _SENT_WALL - boot_wall_ns if boot_wall_ns is not None else 0
        _U64.pack_into(b, 8, first)
        for k, off in enumerate(_LINK_OFFS):
            if _U64.unpack_from(b, off)[0]:
                _U64.pack_into(b, off, _SENT_LINK + k)
        base = 0 if raw[_REL_TS_OFF] else first  # (emitted records' times are after first_ts)
        for j, i in enumerate(self.timed):
            _U64.pack_into(b, _HDR_SIZE + i * _STAGE_SIZE + _TS_OFF, base + _SENT_T + j * _T_STEP)
        return bytes(b)


class Templates:
    """A cache of rendered texts with holes, for one renderer.

    render(pkt) -> str is the renderer; time(t_ns) -> str how it writes a
    time (int for JSON, "+1.2µs" for the human view), and fill(t_ns) the
    text that stands for a time in a template (time() as padded by the
    renderer: a sentinel is too wide to be padded).

    as_bytes: the texts are UTF-8 bytes, every hole an integer (%d): for
    JSON lines, where all holes are ints, bytes formatting takes 0.7 µs
    of a 2 KB line where str formatting takes 1.6."""

    def __init__(self, render: Callable[[Packet], str], time: Callable[[int], str],
                 fill: Callable[[int], str] | None = None, max_entries: int = 4096, as_bytes: bool = False,
                 wall: Callable[[int], str] = str):
        self.render, self.time, self.max_entries = render, time, max_entries
        self.fill = fill or time
        # how the renderer writes a packet's wall-clock time (Unix ns), e.g.
        # JSON's "time_ns" as str() does
        self.wall = wall
        self.as_bytes = as_bytes
        if as_bytes and (self.fill is not str or time is not str or wall is not str):
            raise ValueError("as_bytes templates hold integers only")
        self._shapes: dict[int, tuple] = {}     # id(Shape) -> (Shape object, _Shape with its texts)
        self.hits = self.misses = 0

    @property
    def _n_texts(self) -> int:
        """Texts held over all shapes (counted at a miss only: a miss
        renders and compiles, far more than this sum)."""
        return sum(len(meta.texts) for _shape, meta in self._shapes.values())

    def _render(self, pkt: Packet) -> str | bytes:
        text = self.render(pkt)
        return text.encode() if self.as_bytes else text

    def __call__(self, pkt: Packet) -> str | bytes:
        raw, shape = pkt._raw, pkt._shape
        if raw is None or pkt._vals is not None or pkt._path is not None:
            return self._render(pkt)            # built or changed by hand: no template
        sh = self._shapes.get(id(shape))
        if sh is None or sh[0] is not shape:
            if len(self._shapes) >= self.max_entries:
                self._shapes.clear()
            sh = self._shapes[id(shape)] = (shape, _Shape(raw))
        meta = sh[1]
        if len(raw) < meta.size or meta.untemplated:
            return self._render(pkt)
        v = meta.plain.unpack_from(raw)
        plain = v[meta.plain_links] == _NO_LINKS and v[meta.plain_tun] == _NO_TUN
        # (a plain record's key is meta.key(raw), from the one unpack)
        key = b"".join(meta.plain_kept(v)) if plain else meta.key(raw)
        fmt = meta.texts.get(key)
        if fmt is None:
            fmt = self._compile(pkt, meta, v if plain else None)
            if fmt is None:
                return self._render(pkt)
            if self._n_texts >= self.max_entries:
                for _shape, m in self._shapes.values():
                    m.texts.clear()
            meta.texts[key] = fmt
            self.misses += 1
        else:
            self.hits += 1
        if plain and fmt[3] is not None:
            return fmt[3](v)                    # a flood's packet: filled from v alone
        return self._fill(fmt, meta, raw)

    def _compile(self, pkt: Packet, meta: _Shape, plain: tuple | None):
        """The text of pkt with holes: rendered from a copy of its record
        whose id, times and links are sentinels (plain: the record's
        meta.plain items, if it has no link and no tunnel)."""
        ctx = pkt._ctx
        boot = ctx.boot_wall_ns if ctx is not None else None
        probe = Packet._from_raw(meta.sentinel_raw(pkt._raw, boot), pkt._shape, ctx, pkt._decoder)
        text = self.render(probe)
        # each token stands for a value: (id, cause, prev, next, reassembled,
        # encap, decap, inner, wall-clock time, time of timed stage 0, 1, ...)
        tokens = {str(_SENT_ID): 0}
        for k in range(_N_LINKS):
            tokens[str(_SENT_LINK + k)] = 1 + k
        if boot is not None:
            tokens[self.wall(_SENT_WALL)] = _WALL
        for j in range(len(meta.timed)):
            tokens[self.time(_SENT_T + j * _T_STEP)] = _T0 + j
        pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
        # holes in the order of the text, each picking from the values
        out, order = [], []
        pos = 0
        hole = "%d" if self.as_bytes else "%s"
        for m in pattern.finditer(text):
            out.append(text[pos:m.start()].replace("%", "%%"))
            out.append(hole)
            order.append(tokens[m.group(0)])
            pos = m.end()
        out.append(text[pos:].replace("%", "%%"))
        # the common cases, decided once for both fills: the id, the
        # wall-clock time first, last or not at all, and stage times (in
        # stage order, or some twice: a hook and its table share one), no
        # link; else a pick from all the values
        holes = self._id_wall_times(order)
        pick: object = None
        if holes is not None:
            where, times = holes
            in_order = times == list(range(len(meta.timed)))
            if where == _PLAIN_NO_WALL:
                pick = _ID_TIMES if in_order else (_ID_SOME_TIMES, itemgetter(*times)) if len(times) > 1 else None
            elif where == _PLAIN_WALL_FIRST:
                pick = _ID_WALL_TIMES if in_order else None
            elif len(times) > 1:
                # JSON lines as pkttrace writes them live: "id", the
                # stages' times, some twice, and last "time_ns"
                pick = (_ID_SOME_TIMES_WALL, itemgetter(*times))
        if pick is None:
            pick = itemgetter(*order) if len(order) > 1 else \
                (lambda vals, i=order[0]: (vals[i],)) if order else (lambda vals: ())
        joined = "".join(out)
        holed: str | bytes = joined.encode() if self.as_bytes else joined
        # rel: the record's stage times are after its first already (as
        # the kernel emits them: nothing to subtract); the byte is in the key
        rel = bool(pkt._raw[_REL_TS_OFF])
        fmt = (holed, pick, boot or 0, self._plain_fill(holed, boot or 0, rel, holes, meta), rel)
        # the sentinels must stand for values only: a text that renders
        # differently with them (a time or id used for anything but
        # printing) would be wrong; check the packet itself against it
        want = self._render(Packet._from_raw(pkt._raw, pkt._shape, ctx, pkt._decoder))
        if self._fill(fmt, meta, pkt._raw) != want:
            return None
        if fmt[3] is not None and plain is not None and fmt[3](plain) != want:
            fmt = fmt[:3] + (None,) + fmt[4:]   # (never seen) the general fill, which is right
        return fmt

    def _id_wall_times(self, order: list[int]) -> tuple[int, list[int]] | None:
        """(where the wall-clock time is: _PLAIN_*, the timed stages whose
        times fill the other holes, in the text's order) for a text whose
        holes are the id, then stage times, with the wall-clock time as
        str() writes it first, last or nowhere; None for any other (links)."""
        if not order or order[0] != 0 or (_WALL in order and self.wall is not str):
            return None
        rest = order[1:]
        where = _PLAIN_NO_WALL
        if rest and rest[0] == _WALL:
            where, rest = _PLAIN_WALL_FIRST, rest[1:]
        elif rest and rest[-1] == _WALL:
            where, rest = _PLAIN_WALL_LAST, rest[:-1]
        if rest and min(rest) < _T0:
            return None
        return where, [i - _T0 for i in rest]

    def _plain_fill(self, text: str | bytes, boot: int, rel: bool, holes: tuple[int, list[int]] | None,
                    meta: _Shape) -> Callable[[tuple], str | bytes] | None:
        """A function filling text's holes straight from a record's
        meta.plain items (one with no link and no tunnel), or None (other
        holes: _fill's general way).  Made for its case: a flood's line is
        one call, one getter and one format (JSON lines as pkttrace writes
        them live: the id, the stages' times as emitted, "time_ns" last)."""
        if holes is None or not holes[1]:
            return None
        where, times = holes
        idx = [meta.plain_times[j] for j in times]
        if rel and self.fill is str:
            # the id and the times as they are: one getter gives the tuple
            id_times = itemgetter(0, *idx)
            if where == _PLAIN_WALL_LAST:
                return lambda v: text % (id_times(v) + (boot + v[1],))
            if where == _PLAIN_NO_WALL:
                return lambda v: text % id_times(v)
        times_of = itemgetter(*idx) if len(idx) > 1 else (lambda t, i=idx[0]: (t[i],))
        fill = self.fill

        def fill_plain(v: tuple) -> str | bytes:
            first = v[1]
            times = times_of(v) if rel else map(_sub, times_of(v), repeat(first))
            if fill is not str:
                times = map(fill, times)
            if where == _PLAIN_WALL_LAST:
                return text % (v[0], *times, boot + first)
            if where == _PLAIN_NO_WALL:
                return text % (v[0], *times)
            return text % (v[0], boot + first, *times)
        return fill_plain

    def _fill(self, fmt: tuple, meta: _Shape, raw: bytes) -> str | bytes:
        text, pick, boot, _plain, rel = fmt
        v = meta.values.unpack_from(raw, 0)
        # id, links, then the times after the first stage (C loops: map)
        times = v[_T0:] if rel else map(_sub, v[_T0:], repeat(v[1]))
        if self.fill is not str:      # (% writes ints as str() would, without a call each)
            times = map(self.fill, times)
        if pick is _ID_WALL_TIMES:    # JSON lines: "id", "time_ns", then the stages'
            return text % (v[0], boot + v[1], *times)
        if pick is _ID_TIMES:
            return text % (v[0], *times)
        if pick.__class__ is tuple:
            if pick[0] is _ID_SOME_TIMES_WALL:
                return text % (v[0], *pick[1](tuple(times)), boot + v[1])
            return text % (v[0], *pick[1](tuple(times)))
        wall = boot + v[1]
        return text % pick(v[:1] + v[2:_WALL + 1] + (wall if self.wall is str else self.wall(wall),) + tuple(times))
