"""The packet-flow drawing of a host, defined once.

The seeds of this project are the classic packet-flow drawings (tc ingress,
PREROUTING, the routing decision, INPUT / FORWARD / OUTPUT, reroute,
POSTROUTING, tc egress).  This module owns that drawing: the boxes, their
ids and geometry, the edges between them, and how a path's stages land on
them.  Two things draw it:

  - the live page of `pkttrace serve` (tracer/page.py): the SVG is rendered
    here and served as is; the page's script only changes texts and classes
    (rates, drops) by the ids given here;
  - `pkttrace diagram`: one recorded packet on the same drawing, its stages
    highlighted and annotated (tables crossed, verdicts, mark and NAT
    changes, the route, the fate or drop reason).

`flow()` turns the exporter's counters (exporter.Snapshot: counts per path,
each path a sequence of stages) into counts per box, per edge, per table and
per drop reason, keyed by the ids of the drawing.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, Sequence
from xml.sax.saxutils import escape as _xml_escape

from .model import Packet, Stage

WIDTH, HEIGHT = 1390, 860
ROW = 16                      # a line of text inside a box
MAX_ROW_CHARS = 20            # what fits across a box at the rows' font size


@dataclass(frozen=True)
class Box:
    id: str
    title: str
    x: int
    y: int
    w: int
    h: int
    note: str = ""
    hook: bool = False        # a netfilter hook: its tables are listed inside

    @property
    def tables(self) -> int:
        """Tables that fit under the title, rate and drop lines (two lines each:
        name and priority, then its rates)."""
        return max(0, (self.h - 84) // (2 * ROW))


BOXES: tuple[Box, ...] = (
    Box("ingress", "tc ingress", 20, 70, 150, 100, "receive (rx)"),
    Box("prerouting", "PREROUTING", 220, 70, 150, 300, "netfilter hook", hook=True),
    Box("route", "routing decision", 420, 70, 150, 150, "input routing"),
    Box("forward", "FORWARD", 620, 70, 150, 300, "netfilter hook", hook=True),
    Box("postrouting", "POSTROUTING", 820, 70, 150, 300, "netfilter hook", hook=True),
    Box("egress", "tc egress", 1020, 70, 150, 100, "qdisc, tc"),
    Box("tx", "device out", 1220, 70, 150, 100, "driver (tx)"),
    Box("input", "INPUT", 420, 430, 150, 230, "netfilter hook", hook=True),
    Box("reroute", "reroute", 845, 395, 125, 150, "output rerouting"),
    Box("output", "OUTPUT", 820, 580, 150, 240, "netfilter hook", hook=True),
    Box("local", "local process", 420, 720, 150, 100, "sockets, the kernel"),
    Box("route_out", "routing decision", 620, 720, 150, 100, "output routing"),
    Box("drop", "drops", 1020, 430, 350, 390, "drop points, by reason"),
)
BOX = {b.id: b for b in BOXES}
HOOK_BOXES = tuple(b.id for b in BOXES if b.hook)
DROP_ROWS = 12                # reasons listed in the drop box


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    points: tuple[tuple[int, int], ...]
    label: tuple[int, int, str]        # x, y, text-anchor

    @property
    def key(self) -> str:
        return f"{self.src}>{self.dst}"

    @property
    def id(self) -> str:
        return f"{self.src}-{self.dst}"


EDGES: tuple[Edge, ...] = (
    Edge("ingress", "prerouting", ((170, 120), (220, 120)), (195, 112, "middle")),
    Edge("prerouting", "route", ((370, 120), (420, 120)), (395, 112, "middle")),
    Edge("route", "forward", ((570, 120), (620, 120)), (595, 112, "middle")),
    Edge("forward", "postrouting", ((770, 120), (820, 120)), (795, 112, "middle")),
    Edge("postrouting", "egress", ((970, 120), (1020, 120)), (995, 112, "middle")),
    Edge("egress", "tx", ((1170, 120), (1220, 120)), (1195, 112, "middle")),
    # without tc observers the hand-over to the driver follows POSTROUTING
    Edge("postrouting", "tx", ((895, 70), (895, 45), (1295, 45), (1295, 70)), (1095, 40, "middle")),
    Edge("route", "input", ((495, 220), (495, 430)), (501, 330, "start")),
    Edge("input", "local", ((495, 660), (495, 720)), (501, 694, "start")),
    Edge("local", "route_out", ((570, 770), (620, 770)), (595, 762, "middle")),
    Edge("route_out", "output", ((770, 770), (820, 770)), (795, 762, "middle")),
    # a locally generated packet first seen at OUTPUT (its route lookup not seen)
    Edge("local", "output", ((495, 820), (495, 845), (895, 845), (895, 820)), (695, 840, "middle")),
    Edge("output", "reroute", ((910, 580), (910, 545)), (916, 566, "start")),
    Edge("reroute", "postrouting", ((910, 395), (910, 370)), (916, 386, "start")),
    Edge("output", "postrouting", ((835, 580), (835, 370)), (829, 475, "end")),
)
EDGE = {e.key: e for e in EDGES}

# the stages of a path (model.StageName; `qdisc` only as a drop's stage) -> box
STAGE_BOX = {"rx": "ingress", "tc_ingress": "ingress", "prerouting": "prerouting", "route": "route",
             "input": "input", "forward": "forward", "output": "output", "reroute": "reroute",
             "postrouting": "postrouting", "tc_egress": "egress", "qdisc": "egress", "tx": "tx",
             "deliver": "local"}
_RECEIVED = ("ingress", "prerouting")
OVERFLOW = "(overflow)"       # exporter.DropTotals.OVERFLOW: a drop on a path the map could not hold


def _box_of(stage: str, received: bool) -> str | None:
    box = STAGE_BOX.get(stage)
    # a locally generated packet's routing decision is the output one
    if box == "route" and not received:
        return "route_out"
    return box


def boxes_of(stages: Sequence[str], drop_stage: str | None = None) -> tuple[list[str], str | None]:
    """The boxes a path crosses, in order, and the box it was dropped in.

    A packet first seen at the output routing decision or at OUTPUT was made
    on this host: it starts at the local process box.  A dropped packet ends
    in the box of its drop's stage: where the kernel says it was (a packet
    that died in ip_forward before FORWARD's first table was in forward's
    processing, though no observer of that hook saw it)."""
    out: list[str] = []
    received = False
    for s in stages:
        box = _box_of(s, received)
        if box is None:
            continue              # `drop`: the end, not a place
        received = received or box in _RECEIVED
        if not out and box in ("route_out", "output"):
            out.append("local")
        if not out or out[-1] != box:
            out.append(box)
    dropped_in = None
    if drop_stage is not None or (stages and stages[-1] == "drop"):
        dropped_in = _box_of(drop_stage or "", received) or (out[-1] if out else None)
        if dropped_in is not None and (not out or out[-1] != dropped_in):
            out.append(dropped_in)
    return out, dropped_in


# ---- counts for the live page -------------------------------------------


class PathCount(Protocol):
    """What flow() reads of one counted path (exporter.PathLabels)."""
    netns: str
    family: str
    fate: str
    stages: tuple[str, ...]
    tables: list[tuple]
    drop: tuple | None


class Counts(Protocol):
    """What flow() reads of the exporter's counters (exporter.Snapshot)."""
    t: float
    paths: list[tuple[Any, int]]
    drops: Counter
    registered: dict[str, dict[str, list[tuple[str, int]]]]


@dataclass
class TableRow:
    table: str
    priority: int | None
    packets: int = 0          # came out of the table, accepted
    drops: int = 0            # dropped by it

    def to_json(self) -> dict:
        return {"table": self.table, "priority": self.priority, "packets": self.packets, "drops": self.drops}


def namespaces(snap: Counts) -> list[str]:
    """The traced namespaces the counters know, sorted ("" is the host's)."""
    return sorted(set(snap.registered) | {pl.netns for pl, _ in snap.paths} | {k[0] for k in snap.drops})


def flow(snap: Counts, netns: str) -> dict:
    """Totals of one netns by the drawing's ids, as /flow.json serves them.

    Counters only (packets since serve started); the page divides the
    difference between two of these by the time between them (`t`).  Every
    box and drawn edge is present (0 too), so the page can tell "no packets"
    from "not known"."""
    boxes = {b.id: {"packets": 0, "drops": 0} for b in BOXES}
    edges = {e.key: 0 for e in EDGES}
    other: Counter[str] = Counter()       # transitions the drawing has no edge for
    fates: Counter[str] = Counter()
    accepted: Counter[tuple[str, str]] = Counter()
    dropped: Counter[tuple[str, str]] = Counter()          # (hook, table) -> drops it made
    # one row per (reason, stage, table, box): IPv4 and IPv6 counted together
    drops: Counter[tuple[str, str, str, str | None]] = Counter()
    for pl, n in snap.paths:
        if pl.netns != netns:
            continue
        fates[pl.fate] += n
        path, dropped_in = boxes_of(pl.stages, pl.drop[1] if pl.drop else None)
        for b in path:
            boxes[b]["packets"] += n
        for a, b in zip(path, path[1:]):
            if f"{a}>{b}" in edges:
                edges[f"{a}>{b}"] += n
            else:
                other[f"{a}>{b}"] += n
        for hook, table in pl.tables:
            accepted[(hook, table)] += n
        if pl.drop is not None:
            reason, stage, table = pl.drop
            # the box the path says (a locally generated packet's route is the output one)
            if dropped_in is not None:
                boxes[dropped_in]["drops"] += n
            if table:
                dropped[(stage, table)] += n
            drops[(reason, stage, table, dropped_in)] += n
    # drops on no counted path (the path map was full): the drop box only
    for (ns, _fam, reason, stage, table), n in snap.drops.items():
        if ns == netns and n and stage == OVERFLOW:
            drops[(reason, stage, table, None)] += n
    boxes["drop"]["drops"] = sum(drops.values())
    boxes["drop"]["packets"] = boxes["drop"]["drops"]
    rows = table_rows(snap.registered.get(netns, {}), accepted, dropped)
    return {"t": snap.t, "netns": namespaces(snap), "selected": netns, "boxes": boxes, "edges": edges,
            "other": dict(other), "fates": dict(fates),
            "tables": {hook: [r.to_json() for r in rs] for hook, rs in rows.items()},
            "drops": [{"reason": r, "stage": st, "table": t, "box": b, "packets": n}
                      for (r, st, t, b), n in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0][:3]))],
            "layout": layout_sig(rows)}


def table_rows(registered: dict[str, list[tuple[str, int]]], accepted: Counter | None = None,
               dropped: Counter | None = None) -> dict[str, list[TableRow]]:
    """Per hook box: its tables in priority order, as registered (what the
    exporter placed its observers for), then any other a counted path
    named (a table gone since, or `(changing)`)."""
    accepted, dropped = accepted or Counter(), dropped or Counter()
    out: dict[str, list[TableRow]] = {}
    for hook in HOOK_BOXES:
        rows = [TableRow(name, prio) for name, prio in sorted(set(registered.get(hook, ())),
                                                                key=lambda t: (t[1], t[0]))]
        names = {r.table for r in rows}
        seen = sorted({t for h, t in [*accepted, *dropped] if h == hook} - names)
        rows += [TableRow(name, None) for name in seen]
        for r in rows:
            r.packets, r.drops = accepted[(hook, r.table)], dropped[(hook, r.table)]
        out[hook] = rows
    return out


def rows_of(flow_json: dict) -> dict[str, list[TableRow]]:
    """The table rows a flow() answer was computed with (the page's SVG)."""
    return {hook: [TableRow(**r) for r in rows] for hook, rows in flow_json["tables"].items()}


def layout_sig(rows: dict[str, list[TableRow]]) -> str:
    """Changes when the drawing's table rows do: the page fetches the SVG again."""
    shape = {h: [(r.table, r.priority) for r in rs] for h, rs in rows.items()}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


# ---- SVG ----------------------------------------------------------------------


def _esc(text: str) -> str:
    """Text from the host (table, device, reason names) as SVG character data."""
    return _xml_escape(text, {'"': "&quot;"})


def _clip(text: str, n: int = MAX_ROW_CHARS) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _wrap(text: str, n: int = MAX_ROW_CHARS) -> list[str]:
    """Word-wrapped lines of at most n characters (a longer word is cut)."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        while len(word) > n:
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:n])
            word = word[n:]
        if cur and len(cur) + 1 + len(word) > n:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    return lines


def _text(x: float, y: float, text: str, cls: str, id: str | None = None, anchor: str | None = None,
          tip: str | None = None) -> str:
    attrs = f' id="{id}"' if id else ""
    if anchor:
        attrs += f' text-anchor="{anchor}"'
    title = f"<title>{_esc(tip)}</title>" if tip else ""
    return f'<text x="{x}" y="{y}" class="{cls}"{attrs}>{title}{_esc(text)}</text>'


@dataclass
class Marked:
    """What `pkttrace diagram` puts on the drawing for one packet."""
    caption: str = ""
    boxes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)   # box -> [(class, line)]
    on: list[str] = field(default_factory=list)          # boxes crossed, in order
    edges: set[str] = field(default_factory=set)         # Edge.key crossed
    dropped_in: str | None = None
    other: list[str] = field(default_factory=list)       # transitions without an edge


def render(rows: dict[str, list[TableRow]] | None = None, marked: Marked | None = None,
           standalone: bool = False) -> str:
    """The drawing as SVG.

    Live page (marked None): every box has an empty `rate-<box>` and
    `drop-<box>` text, each hook's table rows a `tv-<box>-<i>` value, every
    edge `edge-<a>-<b>` and its label `el-<a>-<b>`, the drop box `dr-<i>`
    lines: the page's script fills them in.  A packet (marked): its boxes
    and edges have the class `on`, each box lists what happened there.
    Standalone: with its stylesheet, to be opened on its own."""
    rows = rows if rows is not None else table_rows({})
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
           f'height="{HEIGHT}" class="flow" data-layout="{layout_sig(rows)}" role="img">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>']
    if standalone:
        out.append(f"<style><![CDATA[\n{stylesheet()}]]></style>")
        out.append(f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" class="background"/>')
    out.append(_text(20, 24, marked.caption if marked else "", "caption", id="caption"))
    for e in EDGES:
        cls = "edge"
        if marked is not None:
            cls += " on" if e.key in marked.edges else " idle"
        d = " ".join(f"{'M' if i == 0 else 'L'}{x},{y}" for i, (x, y) in enumerate(e.points))
        out.append(f'<path id="edge-{e.id}" class="{cls}" d="{d}" marker-end="url(#arrow)"/>')
        x, y, anchor = e.label
        out.append(_text(x, y, "", "edge-label", id=f"el-{e.id}", anchor=anchor))
    for b in BOXES:
        out.append(_box(b, rows.get(b.id, []), marked))
    if marked is not None and marked.other:
        out.append(_text(20, HEIGHT - 10, "also: " + ", ".join(marked.other), "note"))
    out.append("</svg>")
    return "\n".join(out)


def _box(b: Box, rows: list[TableRow], marked: Marked | None) -> str:
    cls = "box hook" if b.hook else "box"
    if b.id == "drop":
        cls += " sink"
    if marked is not None:
        cls += " on" if b.id in marked.on else " off"
        if marked.dropped_in == b.id or (b.id == "drop" and marked.dropped_in):
            cls += " dropped"
    g = [f'<g id="box-{b.id}" class="{cls}" data-box="{b.id}" tabindex="0">',
         f'<rect x="{b.x}" y="{b.y}" width="{b.w}" height="{b.h}" rx="6"/>',
         _text(b.x + 8, b.y + 18, b.title, "title"),
         _text(b.x + 8, b.y + 33, b.note, "note")]
    if marked is None:
        g.append(_text(b.x + 8, b.y + 51, "", "rate", id=f"rate-{b.id}"))
        g.append(_text(b.x + 8, b.y + 67, "", "drop-rate", id=f"drop-{b.id}"))
        if b.id == "drop":
            for i in range(DROP_ROWS):
                g.append(_text(b.x + 8, b.y + 90 + i * ROW * 1.5, "", "row", id=f"dr-{i}"))
        shown = rows if len(rows) <= b.tables else rows[:b.tables - 1]
        for i, r in enumerate(shown):
            y = b.y + 88 + i * 2 * ROW
            prio = "" if r.priority is None else str(r.priority)
            g.append(_text(b.x + 8, y, _clip(r.table, 16), "row table-name", tip=f"{r.table} {prio}".strip()))
            g.append(_text(b.x + b.w - 8, y, prio, "row prio", anchor="end"))
            g.append(_text(b.x + 16, y + ROW - 2, "", "row table-rate", id=f"tv-{b.id}-{i}"))
        if len(shown) < len(rows):
            g.append(_text(b.x + 8, b.y + 88 + len(shown) * 2 * ROW, f"+{len(rows) - len(shown)} more (click)",
                           "row note"))
    else:
        lines = marked.boxes.get(b.id, [])
        fit = (b.h - 44) // ROW
        if len(lines) > fit:
            lines = lines[:fit - 1] + [("note", "…")]
        for i, (lcls, line) in enumerate(lines):
            g.append(_text(b.x + 8, b.y + 52 + i * ROW, line, f"row {lcls}"))
    g.append("</g>")
    return "\n".join(g)


def stylesheet() -> str:
    """The drawing's CSS (tracer/web/diagram.css): the page links it, a
    standalone SVG carries it."""
    return resources.files("tracer").joinpath("web/diagram.css").read_text(encoding="utf-8")


# ---- one packet ---------------------------------------------------------------


def _chars(b: Box) -> int:
    """Characters of a row that fit across a box (11px monospace: ~6.7px each)."""
    return (b.w - 16) * 10 // 67


def _us(ns: int) -> str:
    return f"+{ns / 1000:.1f}µs" if ns < 1_000_000 else f"+{ns / 1e6:.3f}ms"


def _route_text(s: Stage, dst: str) -> str:
    r = s.route
    if r is None:
        if s.lookups:
            last = s.lookups[-1]
            return f"table {last.table} " + (f"error {last.err}" if last.err else f"dev {last.dev or '?'}")
        return ""
    table = r.tables[-1] if r.tables else None
    if r.err or r.type in ("unreachable", "prohibit", "blackhole", "throw"):
        return f"{r.type or 'unreachable'} {dst}" + (f" table {table}" if table else "") + \
            (f" ({r.err})" if r.err else "")
    out = f"{r.type} {dst}" if r.type and r.type != "unicast" else dst
    out += f" via {r.gw}" if r.gw else ""
    out += f" dev {r.dev}" if r.dev else ""
    out += f" table {table}" if table else ""
    out += f" mark {r.mark:#x}" if r.mark else ""
    return out


def _stage_lines(p: Packet, s: Stage, n: int = MAX_ROW_CHARS) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    dev = f"{s.in_dev}→{s.dev}" if s.in_dev and s.dev and s.in_dev != s.dev else (s.dev or "")
    lines.append(("time", f"{_us(s.t_ns)} {dev}".strip()))
    if s.is_hook:
        if s.mark_out is not None and s.mark_out != s.mark:
            lines.append(("change", f"mark {s.mark:#x}→{s.mark_out:#x}"))
        elif s.mark:
            lines.append(("", f"mark {s.mark:#x}"))
        if s.ct:
            lines.append(("", f"ct {s.ct}"))
        if s.attribution == "changing":
            lines.append(("note", "ruleset changing: tables unknown"))
        for t in s.tables:
            verdict = t.verdict.upper() if t.verdict != "accept" else "accept"
            lines.append(("verdict-" + ("accept" if t.verdict == "accept" else "drop"), f"· {t.table} {verdict}"))
            if t.mark != t.mark_in:
                lines.append(("change", f"↳ mark {t.mark_in:#x}→{t.mark:#x}"))
            if t.dscp != t.dscp_in:
                lines.append(("change", f"↳ dscp {t.dscp_in}→{t.dscp}"))
            for side in ("src", "dst"):
                if t.nat and side in t.nat:
                    # the address before and after on lines of their own: one line is too long for a box
                    lines += [("change", w) for w in _wrap(f"↳ {side} {t.nat[side]['from']}", n)]
                    lines += [("change", w) for w in _wrap(f"→ {t.nat[side]['to']}", n)]
    elif s.stage in ("route", "reroute"):
        lines += [("", w) for w in _wrap(_route_text(s, p.dst), n)]
        if s.route is not None and s.route.rule and s.route.rule.split(":", 1)[0] not in ("0", "32766", "32767"):
            lines += [("note", w) for w in _wrap(f"rule {s.route.rule}", n)]
    elif s.verdict and s.verdict != "ok":
        lines.append(("verdict-drop" if s.verdict == "shot" else "change",
                      s.verdict + (f" → {s.target}" if s.target else "")))
    elif s.stage == "deliver":
        if s.how:
            lines.append(("", s.how))
        if p.process:
            lines.append(("", f"{p.process.get('comm')} pid {p.process.get('pid')}"))
    return lines


def _endpoint(addr: str, port: int | None, family: str) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def mark_packet(p: Packet) -> Marked:
    """One packet's path on the drawing: its boxes and edges, what each
    stage did, and its fate."""
    drop = p.drop
    stages = p.stage_names()
    boxes, dropped_in = boxes_of(stages, drop.stage if drop else None)
    m = Marked(on=boxes, dropped_in=dropped_in)
    m.caption = (f"#{p.id} {p.family} {p.proto} {_endpoint(p.src, p.sport, p.family)} → "
                 f"{_endpoint(p.dst, p.dport, p.family)}  {p.fate.upper()}" + (f"  netns {p.netns}" if p.netns else ""))
    for a, b in zip(boxes, boxes[1:]):
        if f"{a}>{b}" in EDGE:
            m.edges.add(f"{a}>{b}")
        else:
            m.other.append(f"{BOX[a].title} → {BOX[b].title}")
    received = False
    for s in p.path:
        box = _box_of(s.stage, received)
        if box is None:
            continue
        received = received or box in _RECEIVED
        m.boxes.setdefault(box, []).extend(_stage_lines(p, s, _chars(BOX[box])))
    if boxes and boxes[0] == "local" and "local" not in m.boxes:
        m.boxes["local"] = [("note", "made on this host")]
    if drop is not None:
        where = f"in {drop.table} {drop.stage}" if drop.table else f"at {drop.stage}" if drop.stage else ""
        lines = [("verdict-drop", f"dropped: {drop.reason}")]
        lines += [("", w) for w in _wrap(f"at {drop.location}", 44)]
        if where:
            lines.append(("", where))
        if drop.dev:
            lines.append(("", f"dev {drop.dev}"))
        m.boxes["drop"] = lines
        if dropped_in is not None:
            m.boxes.setdefault(dropped_in, []).append(("verdict-drop", f"✕ {drop.reason}"))
    else:
        m.boxes["drop"] = [("note", f"not dropped: {p.fate}" + (f" (out {p.out_dev})" if p.out_dev else ""))]
    return m


def packet_svg(p: Packet) -> str:
    """`pkttrace diagram`: the packet's path on the drawing, a standalone SVG file."""
    m = mark_packet(p)
    rows: dict[str, list[TableRow]] = {}
    return render(rows, marked=m, standalone=True) + "\n"

