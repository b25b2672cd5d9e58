"""Sinks: packets as readable blocks, or as JSON lines for tools."""
from __future__ import annotations

import time
from typing import Callable, TextIO, cast

from .colour import BOLD, CYAN, GREEN, PLAIN, RED, YELLOW, Paint
from .inputs import escape, write_all
from .collector import Counters
from .model import Packet, Stage, TableStep, _endpoint_addr, packet_json, tcp_flags_text
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


# ---- the header line: what tcpdump says about a packet ----------------------

def tcp_flags(flags: int) -> str:
    """`[S]`, `[S.]`, `[P.]`, `[F.]`, `[R]`, `[none]`, as tcpdump writes them."""
    return f"[{tcp_flags_text(flags)}]"


# tcpdump's words (print-icmp.c, print-icmp6.c), without the addresses it adds
_ICMP4 = {0: "echo reply", 4: "source quench", 8: "echo request", 9: "router advertisement",
          10: "router solicitation", 12: "parameter problem", 13: "time stamp request", 14: "time stamp reply",
          15: "information request", 16: "information reply", 17: "address mask request",
          18: "address mask reply"}
_ICMP4_CODES = {
    3: {0: "net unreachable", 1: "host unreachable", 2: "protocol unreachable", 3: "port unreachable",
        4: "need to frag", 5: "source route failed", 6: "net unknown", 7: "host unknown", 8: "source host isolated",
        9: "net prohibited", 10: "host prohibited", 11: "net unreachable for tos",
        12: "host unreachable for tos", 13: "unreachable - admin prohibited filter",
        14: "unreachable - host precedence violation", 15: "unreachable - precedence cutoff"},
    5: {0: "redirect net", 1: "redirect host", 2: "redirect tos net", 3: "redirect tos host"},
    11: {0: "time exceeded in-transit", 1: "ip reassembly time exceeded"},
}
_ICMP6 = {2: "packet too big", 4: "parameter problem", 128: "echo request", 129: "echo reply",
          130: "multicast listener query", 131: "multicast listener report", 132: "multicast listener done",
          133: "router solicitation", 134: "router advertisement", 135: "neighbor solicitation",
          136: "neighbor advertisement", 137: "redirect", 143: "multicast listener report v2"}
_ICMP6_CODES = {
    1: {0: "unreachable route", 1: "unreachable prohibited", 2: "unreachable beyond scope",
        3: "unreachable address", 4: "unreachable port", 5: "unreachable source address failed policy",
        6: "unreachable reject route"},
    3: {0: "time exceeded in-transit", 1: "ip6 reassembly time exceeded"},
}


def icmp_words(family: str, typ: int, code: int | None) -> str:
    """`echo request`, `host unreachable`, `time exceeded in-transit`, ...;
    `type 42 code 0` for what tcpdump has no words for either."""
    names, codes = (_ICMP6, _ICMP6_CODES) if family == "ipv6" else (_ICMP4, _ICMP4_CODES)
    word = codes.get(typ, {}).get(code or 0) if typ in codes else names.get(typ)
    return word or f"type {typ} code {code if code is not None else '?'}"


def _header_extra(p: Packet) -> str:
    """TCP flags or ICMP type/code, and the IP length, where the kernel
    record has them (a packet of an older recording has none: nothing)."""
    bits = []
    if p.ext_hdrs:
        bits.append("ext " + ",".join(p.ext_hdrs))
    if p.tcp_flags is not None and p.proto == "tcp":
        bits.append(tcp_flags(p.tcp_flags))
    if p.icmp_type is not None and p.proto in ("icmp", "icmpv6"):
        bits.append(icmp_words(p.family, p.icmp_type, p.icmp_code) + ",")
    length = p.length
    if length is not None:
        bits.append(f"length {length}")
    elif bits and bits[-1].endswith(","):
        bits[-1] = bits[-1][:-1]
    return " " + " ".join(bits) if bits else ""


# ---- a stage's line ------------------------------------------------------------

class _View:
    """How one block is written: colour (Paint) and detail (-v)."""

    def __init__(self, paint: Paint = PLAIN, verbose: int = 0):
        self.paint, self.verbose = paint, verbose


_PLAIN_VIEW = _View()


def _detail(s: Stage, dst: str, v: _View) -> str:
    paint = v.paint
    parts = []
    if s.is_hook:
        if s.mark_out != s.mark:
            parts.append(paint(YELLOW, f"mark {_mark(s.mark)}→{_mark(s.mark_out)}"))
        elif s.mark:
            parts.append(f"mark {_mark(s.mark)}")
        if s.tos_out != s.tos:
            parts.append(paint(YELLOW, f"tos {s.tos:#04x}→{s.tos_out:#04x}"))
        elif v.verbose and s.tos is not None:
            parts.append(f"tos {s.tos:#04x}")
        if s.ct:
            parts.append(f"ct {s.ct}")
    elif s.qdisc is not None:
        parts.append(_qdisc(s, v))
        return "  ".join(parts)
    elif s.route is not None:
        parts.append(_route(s, dst, v))
    elif s.lookups:
        tables = " → ".join(lk.table for lk in s.lookups)
        last = s.lookups[-1]
        res = paint(RED, f"error {last.err}") if last.err else (f"dev {last.dev}" if last.dev else "")
        parts.append(f"table {tables}" + (f" → {res}" if res else ""))
    elif s.mark:
        parts.append(f"mark {_mark(s.mark)}")
    if s.verdict and (s.verdict != "ok" or v.verbose):
        text = s.verdict + (f" → {s.target}" if s.target else "")
        parts.append(paint(RED, text) if s.verdict == "shot" else paint(YELLOW, text) if s.verdict != "ok" else text)
    if v.verbose and s.how:
        parts.append(f"{s.how}" + (f" socket {s.socket_inode}" if s.socket_inode else ""))
    return "  ".join(parts)


def duration(ns: int) -> str:
    """`850 ns`, `12.4 µs`, `1.8 ms`, `1.25 s`."""
    if ns < 1000:
        return f"{ns} ns"
    if ns < 1_000_000:
        return f"{ns / 1000:.1f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def _qdisc(s: Stage, v: _View) -> str:
    """`queued 1.8 ms in tbf 8004: on rs  qlen 3`: the wait in the device's queue."""
    where = f"in {s.qdisc} on {_name(s.dev or '?')}"
    if s.verdict == "dropped":
        out = v.paint(RED, f"dropped after {duration(s.queued_ns or 0)} {where}")
    elif s.queued_ns is None:
        out = f"queued {where}"
    else:
        out = f"queued {duration(s.queued_ns)} {where}" + (v.paint(YELLOW, " (requeued)")
                                                           if s.verdict == "requeued" else "")
    if s.qlen is not None:
        out += f"  qlen {s.qlen}"
    return out


_FAILED_TYPES = ("unreachable", "prohibit", "blackhole", "throw")


def _route(s: Stage, dst: str, v: _View) -> str:
    """The decision as `ip route get` prints it:
    `10.71.2.2 via 10.71.3.2 dev rs2 table 100 mark 0x1`, `local 10.71.1.1 dev lo table local`,
    `unreachable 10.9.9.9 table main (ENETUNREACH: no route)`.  The rule that
    chose the table and the tables consulted follow on a line of their own."""
    r = s.route
    if r is None:
        return ""
    table = r.tables[-1] if r.tables else None
    if r.err or r.type in _FAILED_TYPES:
        out = f"{r.type or 'unreachable'} {dst}" + (f" table {table}" if table else "")
        if r.err:
            out += f" ({r.err}{': no route' if r.err == 'ENETUNREACH' else ''})"
        return v.paint(RED, out)
    out = f"{r.type} {dst}" if r.type and r.type != "unicast" else dst
    if r.gw:
        out += f" via {r.gw}"
    if r.dev:
        out += f" dev {r.dev}"
    if table:
        out += f" table {table}"
    if r.src:
        out += f" src {r.src}"
    if r.mark:
        out += f" mark {_mark(r.mark)}"
    return out


_DEFAULT_RULES = ("0", "32766", "32767")


def _route_lines(s: Stage, v: _View) -> list[tuple[int | None, str]]:
    """Under a route stage: the rule that chose the table and every table
    the kernel consulted on the way (-v: each lookup with its result)."""
    r = s.route
    if r is None:
        return []
    lines: list[tuple[int | None, str]] = []
    tables = " → ".join(r.tables)
    # the rules every host has (0 local, 32766 main, 32767 default) choose
    # nothing worth a line; a policy rule does, and -v shows them all
    default = r.rule is None or r.rule.split(":", 1)[0] in _DEFAULT_RULES
    if r.rule and (v.verbose or not default):
        lines.append((None, f"rule {r.rule}" + (f" (tables {tables})" if len(r.tables) > 1 else "")))
    elif v.verbose and len(r.tables) > 1:
        lines.append((None, f"tables {tables}"))
    if v.verbose:
        for lk in s.lookups:
            res = lk.err or " ".join(x for x in (f"via {lk.gw}" if lk.gw else "", f"dev {lk.dev}" if lk.dev else "")
                                     if x) or lk.type or ""
            what = "source check" if lk.src_check else "lookup"
            lines.append((lk.t_ns, f"{what} table {lk.table} → {res}  mark {_mark(lk.mark)}"))
    return lines


def _table_line(t: TableStep, paint: Paint = PLAIN) -> str:
    """What one table did: `mangle  mark 0x0→0x1`, `nat  dst 10.1.0.1:8080→10.2.0.2:80`."""
    parts = []
    if t.mark != t.mark_in:
        parts.append(paint(YELLOW, f"mark {_mark(t.mark_in)}→{_mark(t.mark)}"))
    if t.dscp != t.dscp_in:
        parts.append(paint(YELLOW, f"dscp {t.dscp_in}→{t.dscp}"))
    for side in ("src", "dst"):
        if t.nat and side in t.nat:
            parts.append(paint(YELLOW, f"{side} {t.nat[side]['from']}→{t.nat[side]['to']}"))
    if t.verdict != "accept":
        parts.append(paint(RED, t.verdict.upper()))
    return f"{t.table:<14} " + "  ".join(parts) if parts else t.table


def _rule_line(r: dict) -> str:
    """--rules: one rule the packet met, under its table: `forward #4  udp dport 5009 jump check`,
    its verdict added when the text does not end with it (`continue` after a counter)."""
    # chain names and rule texts are anyone's: escaped with the whole block (_format_packet)
    chain, text, verdict = str(r["chain"]), r.get("rule"), str(r["verdict"])
    if r.get("handle") is None:
        return f"{chain}  {text or verdict}"
    body = text if text is not None else "(rule text unknown)"
    if text is None or not text.endswith(verdict):
        body += f"  → {verdict}"
    return f"{chain} #{r['handle']}  {body}"


def _observer_line(o) -> str:
    """-v: one netfilter observation inside a hook (its real priority)."""
    prio = "?" if o.priority is None else str(o.priority)
    return (f"observer {prio:<12} mark {_mark(o.mark)}  tos {o.tos:#04x}"
            + (f"  ct {o.ct}" if o.ct else ""))


def _name(name) -> str:
    """A device, netns or process name as the system gave it: anyone who can
    name a device can put an escape sequence in it (escaped before padding,
    so columns stay aligned)."""
    return escape(str(name))


_FATE_COLOUR = {"dropped": RED, "forwarded": GREEN, "delivered": GREEN, "sent": GREEN, "unknown": YELLOW,
                "redirected": CYAN, "encapsulated": CYAN, "decapsulated": CYAN}


def _tunnel(p: Packet) -> str:
    t = p.tunnel or {}
    return " ".join(str(x) for x in (t.get("kind"), t.get("dev")) if x) or "tunnel"


OUTER_INDENT = "    "   # an outer packet's journey, under the packet it carries


def _format_packet(p: Packet, v: _View = _PLAIN_VIEW) -> str:
    paint = v.paint
    fate = p.fate.upper()
    head = (f"{paint(BOLD, f'#{p.id}')} {p.family} {p.proto} {_endpoint(p.src, p.sport, p.family)} → "
            f"{_endpoint(p.dst, p.dport, p.family)}{_header_extra(p)}  {paint(_FATE_COLOUR.get(p.fate, ''), fate)}")
    if p.netns:
        head += f"  netns {_name(p.netns)}"
    if p.cause is not None:
        head += f"  in reply to #{p.cause}"
    if p.prev is not None:
        head += f"  ← #{p.prev} from netns {_name(p.prev_netns)}"
    if p.decap is not None:
        head += f"  ⇐ decapsulated from #{p.decap} ({_tunnel(p)})"
    if p.inner is not None:
        head += f"  outer packet of #{p.inner} ({_tunnel(p)})"
    lines = [head]
    dst = p.dst                      # the destination a route stage looked up: after any DNAT before it
    for s in p.path:
        dev = (f"{_name(s.in_dev)}→{_name(s.dev)}" if s.in_dev and s.dev and s.in_dev != s.dev
               else _name(s.dev or ""))
        lines.append(f"  {_time_col(s.t_ns)}  {s.stage:<12} {dev:<14} {_detail(s, dst, v)}".rstrip())
        # sub-lines: a time (-v) in the stages' time column
        for t_ns, text in _route_lines(s, v):
            lines.append(f"  {'' if t_ns is None else _time_col(t_ns):>11}    · {text}")
        if v.verbose:
            for o in s.observations:
                lines.append(f"  {_time_col(o.t_ns)}    ◦ {_observer_line(o)}")
        for t in s.tables:
            lines.append(f"  {'':>11}    · {_table_line(t, paint)}")
            for r in t.rules or ():
                lines.append(f"  {'':>11}        {_rule_line(r)}")
            if t.nat and "dst" in t.nat:
                dst = _endpoint_addr(t.nat["dst"]["to"])
        if s.attribution == "changing":
            lines.append(f"  {'':>11}    · (ruleset changing: tables not named)")
    if p.drop:
        where = " ".join(x for x in (p.drop.table, p.drop.stage) if x)
        if p.drop.attribution == "changing":
            where += ", ruleset changing"
        if p.drop.before_priority is not None:
            where += f", before priority {p.drop.before_priority}"
        elif p.drop.stage in ("qdisc", "tx") and p.drop.dev:
            where += (f" {p.drop.qdisc}" if p.drop.qdisc is not None else "") + f" on {p.drop.dev}"
        lines.append("  " + paint(RED, f"dropped: {p.drop.reason} at {p.drop.location}"
                                       + (f" (in {where})" if where else "")))
    if p.reassembled is not None:
        lines.append(f"  reassembled into #{p.reassembled}")
    if p.encap is not None:
        lines.append(f"  ⇒ encapsulated in #{p.encap} ({_tunnel(p)})")
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
    # included) reaches the terminal, whatever field carries it; colour
    # marks survive escaping and become colour only now
    if p.inner is not None:
        lines = [OUTER_INDENT + line for line in lines]
    return paint.finish("\n".join(map(escape, lines)))


# Packets of one flow on one path render alike but for ids and times: each
# renderer keeps its texts as templates (tracer/templates.py).
format_packet = Templates(_format_packet, _time, _time_col)
format_json = Templates(packet_json, str)
# what `pkttrace --json` writes: the same lines as UTF-8 bytes, each with
# its newline (in the template: not a copy of every line to add it)
format_json_line = Templates(lambda p: packet_json(p) + "\n", str, as_bytes=True)


def packet_renderer(colour: bool = False, verbose: int = 0) -> Callable[[Packet], str | bytes]:
    """The human view with colour and/or -v detail (each its own templates)."""
    if not colour and not verbose:
        return format_packet
    view = _View(Paint(colour), verbose)
    return Templates(lambda p: _format_packet(p, view), _time, _time_col)


def plain_text(p: Packet) -> str:
    """The human view without colour, whatever the terminal: what a pcap-ng
    packet comment carries.  Rendered directly, not through templates: the
    packets -w writes carry their header bytes (snap), which differ from
    packet to packet and make every one a template of its own."""
    return _format_packet(p)


# ---- wall-clock time before each block: tcpdump's -t switches ---------------

# how many -t were given -> what is written before a block (tcpdump(8))
TIME_ABSOLUTE, TIME_NONE, TIME_EPOCH, TIME_DELTA, TIME_DATE, TIME_SINCE_FIRST = range(6)


def _us(ns: int) -> int:
    """Microseconds, rounded: as the pcap-ng file's timestamps (tracer.pcapng)."""
    return (ns + 500) // 1000


def _hms(us: int) -> str:
    sign = "-" if us < 0 else ""
    s, us = divmod(abs(us), 1_000_000)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{sign}{h:02d}:{m:02d}:{s:02d}.{us:06d}"


class Clock:
    """The time written before a packet's block, from the wall-clock time of
    its first stage (`Packet.wall_ns`), in microseconds as tcpdump writes
    them.  A packet without one (older recordings) gets none: its stages
    still carry their offsets."""

    def __init__(self, mode: int = TIME_ABSOLUTE):
        self.mode = mode
        self.first: int | None = None
        self.prev: int | None = None
        self._sec: tuple[int, str] | None = None     # the last whole second, formatted (one strftime per second)

    def __call__(self, wall_ns: int | None) -> str:
        if self.mode == TIME_NONE or wall_ns is None:
            return ""
        us = _us(wall_ns)
        if self.first is None:
            self.first = us
        prev, self.prev = self.prev, us
        if self.mode == TIME_DELTA:
            return _hms(0 if prev is None else us - prev) + " "
        if self.mode == TIME_SINCE_FIRST:
            return _hms(us - self.first) + " "
        sec, frac = divmod(us, 1_000_000)
        if self.mode == TIME_EPOCH:
            return f"{sec}.{frac:06d} "
        if self._sec is None or self._sec[0] != sec:
            fmt = "%Y-%m-%d %H:%M:%S" if self.mode == TIME_DATE else "%H:%M:%S"
            self._sec = (sec, time.strftime(fmt, time.localtime(sec)))
        return f"{self._sec[1]}.{frac:06d} "


def summary(c: Counters) -> str:
    """The closing line: nothing lost silently."""
    line = (f"{c.shown} packets shown, {c.filtered + c.rejected} filtered out, {c.lost} lost (ring buffer full), "
            f"{c.create_failed} not traced (in-flight table full), {c.aged_out} aged out")
    if c.unread:
        line += f", {c.unread} not printed (still queued at exit)"
    if c.rules is not None:
        r = c.rules
        line += (f"; rules: {r.events} nftables trace events, {r.joined} paths with rules, {r.without} without "
                 f"({r.over_limit} hook passes over the trace limit, {r.overruns} trace socket overruns)")
    return line


OUTER_WAIT_S = 1.0     # an outer packet's text waits this long for its payload's
OUTER_WAIT_MAX = 256   # ... and no more of them than this
# a batch's texts are written together, in pieces of about this size (a
# pipe's buffer): one write() for many packets, even where the stream
# passes every write to the kernel (python -u, PYTHONUNBUFFERED=1)
BATCH_WRITE_BYTES = 65536


class Printer:
    """Writes packets to a stream: JSON lines (--json), or the human view
    with an optional clock (-t...), colour and detail (-v)."""

    def __init__(self, out: TextIO, as_json: bool, clock: Clock | None = None, colour: bool = False,
                 verbose: int = 0):
        self.out, self.as_json = out, as_json
        self.clock = None if as_json else clock
        self._human = packet_renderer(colour, verbose)
        # Packets go to the binary buffer under the text stream (when it has
        # one): JSON lines are bytes already, and the human view is encoded
        # as the text layer would. Written whole by write_all: under python
        # -u that buffer is the raw file, whose write() of a pipe may take
        # part of a batch when a signal comes, and the text layer would drop
        # the rest unsaid.
        self._bin = getattr(out, "buffer", None)
        self._encoding = getattr(out, "encoding", None) or "utf-8"
        self._errors = getattr(out, "errors", None) or "strict"
        if self._bin is not None:
            out.flush()                         # anything written as text before goes first
        # human view: an outer packet that delivered its payload ends before
        # the payload does (and WireGuard's may leave before its payload's
        # hand-over returns): its text waits to be printed under it (inner
        # id -> (text, when it came)), for OUTER_WAIT_S at most
        self._outer: dict[int, tuple[str, float]] = {}
        self._printed: dict[int, None] = {}     # ids of packets printed lately (bounded)
        self._pending: list = []                # texts of the batch not written yet (all bytes, or all str)
        self._pending_size = 0

    def render(self, p: Packet) -> str | bytes:
        """The text of one packet, as write() takes it."""
        if self.as_json:
            if self._bin is not None:
                return format_json_line(p)
            return cast(str, format_json(p)) + "\n"
        # the time is the packet's own, never part of a template
        stamp = self.clock(p.wall_ns) if self.clock is not None else ""
        text = stamp + cast(str, self._human(p)) + "\n\n"
        if p.inner is not None and p.inner not in self._printed:
            self._outer[p.inner] = (text, time.monotonic())
            return self._overdue()
        if p.encap is not None or p.decap is not None:
            self._printed[p.id] = None
            if len(self._printed) > OUTER_WAIT_MAX:
                del self._printed[next(iter(self._printed))]
        if self._outer:
            held = self._outer.pop(p.id, None)
            if held is not None:
                text += held[0]
            text += self._overdue()
        return text

    def _overdue(self, every: bool = False) -> str:
        """The outer packets whose payload was not seen in time (or all)."""
        now, out = time.monotonic(), ""
        for k, (text, t) in list(self._outer.items()):
            if every or now - t >= OUTER_WAIT_S or len(self._outer) > OUTER_WAIT_MAX:
                out += text
                del self._outer[k]
        return out

    def write(self, text: str | bytes, flush: bool = True) -> None:
        if self._bin is not None:
            self.out.flush()                    # what others wrote as text (the demo's story) goes first
            write_all(self._bin, text if isinstance(text, bytes) else text.encode(self._encoding, self._errors))
        else:
            # (render() gives bytes only where the binary buffer exists)
            self.out.write(text.decode() if isinstance(text, bytes) else text)
        if flush:
            self.flush()

    def packet(self, p: Packet, flush: bool = True) -> None:
        self._write_pending()                   # a batch's packets first
        self.write(self.render(p), flush)

    def batch(self, p: Packet) -> None:
        """A packet of a batch: written by flush() when the batch is done
        (or once BATCH_WRITE_BYTES are waiting)."""
        text = self.render(p)
        if text:
            self._pending.append(text)
            self._pending_size += len(text)
            if self._pending_size >= BATCH_WRITE_BYTES:
                self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            texts, self._pending, self._pending_size = self._pending, [], 0
            self.write((b"" if isinstance(texts[0], bytes) else "").join(texts), flush=False)

    def flush(self, final: bool = False) -> None:
        self._write_pending()
        if self._outer:
            held = self._overdue(every=final)
            if held:
                self.write(held, flush=False)
        self.out.flush()
        if self._bin is not None:
            self._bin.flush()
