"""Sinks: packets as readable blocks, or as JSON lines for tools."""
from __future__ import annotations

from typing import TextIO, cast

from .inputs import escape
from .model import Packet, Stage, TableStep, packet_json
from .collector import Counters
from .templates import Templates


def _endpoint(addr: str, port: int | None, family: str) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def _time(t_ns: int) -> str:
    if t_ns < 1_000_000:
        return f"+{t_ns / 1000:.1f}µs"
    return f"+{t_ns / 1e6:.3f}ms"


def _time_col(t_ns: int) -> str:
    return f"{_time(t_ns):>11}"


def _mark(m: int | None) -> str:
    return f"{m:#x}"


def _detail(s: Stage) -> str:
    parts = []
    if s.is_hook:
        if s.mark_out != s.mark:
            parts.append(f"mark {_mark(s.mark)}→{_mark(s.mark_out)}")
        elif s.mark:
            parts.append(f"mark {_mark(s.mark)}")
        if s.tos_out != s.tos:
            parts.append(f"tos {s.tos:#04x}→{s.tos_out:#04x}")
        if s.ct:
            parts.append(f"ct {s.ct}")
    elif s.route is not None:
        parts.append(_route(s))
    elif s.lookups:
        tables = " → ".join(lk.table for lk in s.lookups)
        last = s.lookups[-1]
        res = f"error {last.err}" if last.err else (f"dev {last.dev}" if last.dev else "")
        parts.append(f"table {tables}" + (f" → {res}" if res else ""))
    elif s.mark:
        parts.append(f"mark {_mark(s.mark)}")
    if s.verdict and s.verdict != "ok":
        parts.append(s.verdict + (f" → {s.target}" if s.target else ""))
    return "  ".join(parts)


def _route(s: Stage) -> str:
    """`rule 100: from all fwmark 0x1/0x1 lookup 100 → table 100 → via 10.3.0.2 dev r2  mark 0x1`"""
    r = s.route
    if r is None:
        return ""
    out = f"rule {r.rule} → " if r.rule else ""
    out += "table " + " → ".join(r.tables)
    if r.err:
        out += f" → {r.type} ({r.err}{': no route' if r.err == 'ENETUNREACH' else ''})"
    else:
        res = (f"via {r.gw} " if r.gw else "") + (f"dev {r.dev}" if r.dev else "")
        out += f" → {r.type}" if r.type == "local" else (f" → {res.strip()}" if res else "")
    if r.mark:
        out += f"  mark {_mark(r.mark)}"
    return out


def _table_line(t: TableStep) -> str:
    """What one table did: `mangle  mark 0x0→0x1`, `nat  dst 10.1.0.1:8080→10.2.0.2:80`."""
    parts = []
    if t.mark != t.mark_in:
        parts.append(f"mark {_mark(t.mark_in)}→{_mark(t.mark)}")
    if t.dscp != t.dscp_in:
        parts.append(f"dscp {t.dscp_in}→{t.dscp}")
    for side in ("src", "dst"):
        if t.nat and side in t.nat:
            parts.append(f"{side} {t.nat[side]['from']}→{t.nat[side]['to']}")
    if t.verdict != "accept":
        parts.append(t.verdict.upper())
    return f"{t.table:<14} " + "  ".join(parts) if parts else t.table


def _name(name) -> str:
    """A device, netns or process name as the system gave it: anyone who can
    name a device can put an escape sequence in it (escaped before padding,
    so columns stay aligned)."""
    return escape(str(name))


def _format_packet(p: Packet) -> str:
    head = (f"#{p.id} {p.family} {p.proto} {_endpoint(p.src, p.sport, p.family)} → "
            f"{_endpoint(p.dst, p.dport, p.family)}  {p.fate.upper()}")
    if p.netns:
        head += f"  netns {_name(p.netns)}"
    if p.cause is not None:
        head += f"  in reply to #{p.cause}"
    if p.prev is not None:
        head += f"  ← #{p.prev} from netns {_name(p.prev_netns)}"
    lines = [head]
    for s in p.path:
        dev = (f"{_name(s.in_dev)}→{_name(s.dev)}" if s.in_dev and s.dev and s.in_dev != s.dev
               else _name(s.dev or ""))
        lines.append(f"  {_time_col(s.t_ns)}  {s.stage:<12} {dev:<14} {_detail(s)}".rstrip())
        for t in s.tables:
            lines.append(f"  {'':>11}    · {_table_line(t)}")
        if s.attribution == "changing":
            lines.append(f"  {'':>11}    · (ruleset changing: tables not named)")
    if p.drop:
        where = " ".join(x for x in (p.drop.table, p.drop.stage) if x)
        if p.drop.attribution == "changing":
            where += ", ruleset changing"
        if p.drop.before_priority is not None:
            where += f", before priority {p.drop.before_priority}"
        elif p.drop.stage in ("qdisc", "tx") and p.drop.dev:
            where += f" on {p.drop.dev}"
        lines.append(f"  dropped: {p.drop.reason} at {p.drop.location}" + (f" (in {where})" if where else ""))
    if p.reassembled is not None:
        lines.append(f"  reassembled into #{p.reassembled}")
    if p.next is not None:
        lines.append(f"  → #{p.next} in netns {_name(p.next_netns)}")
    if p.process:
        lines.append(f"  read by {_name(p.process['comm'])} (pid {p.process['pid']})")
    if p.fate == "unknown":
        lines.append("  end not seen: aged out")
    if p.truncated:
        lines.append("  (path truncated: more stages than one record holds)")
    if p.late_match:
        lines.append("  (matched the filter only after NAT: stages before that were not kept)")
    # and every other name (tables, rules' iif/oif, drop devices): each
    # entry is one line, so no control character (a newline in a name
    # included) reaches the terminal, whatever field carries it
    return "\n".join(map(escape, lines))


# Packets of one flow on one path render alike but for ids and times: each
# renderer keeps its texts as templates (tracer/templates.py).
format_packet = Templates(_format_packet, _time, _time_col)
format_json = Templates(packet_json, str)
# what `pkttrace --json` writes: the same lines as UTF-8 bytes
format_json_bytes = Templates(packet_json, str, as_bytes=True)


def summary(c: Counters) -> str:
    """The closing line: nothing lost silently."""
    line = (f"{c.shown} packets shown, {c.filtered + c.rejected} filtered out, {c.lost} lost (ring buffer full), "
            f"{c.create_failed} not traced (in-flight table full), {c.aged_out} aged out")
    if c.unread:
        line += f", {c.unread} not printed (still queued at exit)"
    return line


class Printer:
    def __init__(self, out: TextIO, as_json: bool):
        self.out, self.as_json = out, as_json
        # JSON lines go to the binary buffer under the text stream (when it
        # has one), so the text layer never re-encodes them
        self._bin = getattr(out, "buffer", None) if as_json else None
        if self._bin is not None:
            out.flush()                         # anything written as text before goes first

    def render(self, p: Packet) -> str | bytes:
        """The text of one packet, as write() takes it."""
        if self._bin is not None:
            return cast(bytes, format_json_bytes(p)) + b"\n"
        text = cast(str, format_json(p)) if self.as_json else cast(str, format_packet(p)) + "\n"
        return text + "\n"

    def write(self, text: str | bytes, flush: bool = True) -> None:
        if isinstance(text, bytes):
            # (render() gives bytes only where the binary buffer exists)
            if self._bin is not None:
                self._bin.write(text)
            else:
                self.out.write(text.decode())
        else:
            self.out.write(text)
        if flush:
            self.flush()

    def packet(self, p: Packet, flush: bool = True) -> None:
        self.write(self.render(p), flush)

    def batch(self, p: Packet) -> None:
        """A packet of a batch: flushed by flush() when the batch is done."""
        self.packet(p, flush=False)

    def flush(self) -> None:
        self.out.flush()
        if self._bin is not None:
            self._bin.flush()
