"""The human view as a tcpdump user reads it: wall-clock stamps (-t...),
TCP flags, ICMP words and length in the header, a route line like
`ip route get`, colour on a terminal, and -v detail."""
from __future__ import annotations

import io
import re
import time

import pytest

from tracer import colour, output
from tracer.model import Lookup, Packet, Route, Stage, TableStep
from tracer.paths import assemble

from test_output import dropped_udp, forwarded_icmp   # the packets built by hand there

SGR = re.compile(r"\x1b\[[0-9;]*m")


def _head(p: Packet, **kw) -> str:
    return output.format_packet(p).splitlines()[0] if not kw else \
        output.packet_renderer(**kw)(p).splitlines()[0]


# --- header line -----------------------------------------------------------------

@pytest.mark.parametrize("bits, text", [(0x02, "[S]"), (0x12, "[S.]"), (0x18, "[P.]"), (0x11, "[F.]"),
                                        (0x04, "[R]"), (0x14, "[R.]"), (0x00, "[none]"), (0xC2, "[SEW]")])
def test_tcp_flags_in_tcpdump_notation(bits, text):
    assert output.tcp_flags(bits) == text


@pytest.mark.parametrize("family, typ, code, words", [
    ("ipv4", 8, 0, "echo request"), ("ipv4", 0, 0, "echo reply"), ("ipv4", 3, 1, "host unreachable"),
    ("ipv4", 3, 3, "port unreachable"), ("ipv4", 3, 13, "unreachable - admin prohibited filter"),
    ("ipv4", 11, 0, "time exceeded in-transit"), ("ipv4", 5, 1, "redirect host"),
    ("ipv6", 128, 0, "echo request"), ("ipv6", 129, 0, "echo reply"), ("ipv6", 1, 4, "unreachable port"),
    ("ipv6", 1, 0, "unreachable route"), ("ipv6", 3, 0, "time exceeded in-transit"),
    ("ipv6", 135, 0, "neighbor solicitation"), ("ipv6", 2, 0, "packet too big"),
    ("ipv4", 42, 7, "type 42 code 7"), ("ipv6", 3, 9, "type 3 code 9"),
])
def test_icmp_type_and_code_as_tcpdump_words(family, typ, code, words):
    assert output.icmp_words(family, typ, code) == words


def test_header_with_icmp_words_and_length():
    p = forwarded_icmp()
    p.length, p.icmp_type, p.icmp_code = 84, 8, 0
    assert _head(p) == "#7 ipv4 icmp 10.71.1.2 → 10.71.2.2 echo request, length 84  FORWARDED  netns ptlab-rtr"


def test_header_with_tcp_flags_and_length():
    p = dropped_udp()
    p.proto, p.length, p.tcp_flags = "tcp", 60, 0x12
    assert _head(p).startswith("#8 ipv4 tcp 10.71.1.2:40000 → 10.71.2.2:5009 [S.] length 60  DROPPED")


def test_header_of_a_packet_without_the_facts_is_as_before():
    # a recording of format 1 knows none of them: the header line is unchanged
    assert _head(forwarded_icmp()) == "#7 ipv4 icmp 10.71.1.2 → 10.71.2.2  FORWARDED  netns ptlab-rtr"
    p = forwarded_icmp()
    p.icmp_type = 0
    assert _head(p) == "#7 ipv4 icmp 10.71.1.2 → 10.71.2.2 echo reply  FORWARDED  netns ptlab-rtr"


# --- the route line -----------------------------------------------------------------

def _routed(route: Route, stage_dev: str | None = "r1", nat_to: str | None = None) -> Packet:
    p = forwarded_icmp()
    if nat_to:
        p.path[1].tables = [TableStep("nat", -100, 0, 0, "new", "accept",
                                      nat={"dst": {"from": "10.71.2.2", "to": nat_to}})]
    p.path[2] = Stage("route", 2_000, stage_dev, 1, lookups=[Lookup("main", 254, stage_dev, None, 1, 2_000)],
                      route=route)
    return p


DETAIL_COL = 2 + 11 + 2 + 12 + 1 + 14 + 1      # "  {time:>11}  {stage:<12} {dev:<14} {detail}"


def _route_line(p: Packet, **kw) -> list[str]:
    """The route stage's detail, then the text of the sub-lines under it."""
    text = output.packet_renderer(**kw)(p) if kw else output.format_packet(p)
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.split()[1:2] == ["route"])
    out = [lines[i][DETAIL_COL:]]
    for ln in lines[i + 1:]:
        if "·" not in ln or ln[15:17].strip():   # the next stage
            break
        out.append(ln.split("·", 1)[1].strip())
    return out


ROUTES = [
    (Route(["local", "100"], "100: from all fwmark 0x1/0x1 lookup 100", "unicast", "rs2", "10.71.3.2", None, None,
           1),
     ["10.71.2.2 via 10.71.3.2 dev rs2 table 100 mark 0x1",
      "rule 100: from all fwmark 0x1/0x1 lookup 100 (tables local → 100)"]),
    (Route(["local", "main"], "32766: from all lookup main", "unicast", "r1", None, None, None, 0),
     ["10.71.2.2 dev r1 table main"]),
    (Route(["local"], "0: from all lookup local", "local", "lo", None, None, None, 0),
     ["local 10.71.2.2 dev lo table local"]),
    (Route(["main"], None, "unreachable", None, None, None, "ENETUNREACH", 0),
     ["unreachable 10.71.2.2 table main (ENETUNREACH: no route)"]),
    (Route(["main"], None, "prohibit", None, None, None, "EACCES", 0),
     ["prohibit 10.71.2.2 table main (EACCES)"]),
    (Route(["main"], None, "unicast", "r1", None, "10.71.2.1", None, 0),
     ["10.71.2.2 dev r1 table main src 10.71.2.1"]),
]


@pytest.mark.parametrize("route, want", ROUTES, ids=[w[0] for _, w in ROUTES])
def test_route_line_reads_like_ip_route_get(route, want):
    assert _route_line(_routed(route)) == want


def test_route_line_names_the_destination_after_dnat():
    r = Route(["main"], None, "unicast", "r2", None, None, None, 0)
    assert _route_line(_routed(r, "r2", nat_to="10.9.0.5:80"))[0] == "10.9.0.5 dev r2 table main"


def test_verbose_route_shows_the_default_rule_and_every_lookup():
    r = Route(["local", "main"], "32766: from all lookup main", "unicast", "r1", None, None, None, 0)
    p = _routed(r)
    p.path[2].lookups = [Lookup("local", 255, None, "EAGAIN", 0, 2_000),
                         Lookup("main", 254, "r1", None, 0, 2_100),
                         Lookup("main", 254, "r0", None, 0, 2_200, src_check=True)]
    lines = _route_line(p, verbose=1)
    assert lines[1] == "rule 32766: from all lookup main (tables local → main)"
    assert lines[2:] == ["lookup table local → EAGAIN  mark 0x0", "lookup table main → dev r1  mark 0x0",
                         "source check table main → dev r0  mark 0x0"]


# --- -v -------------------------------------------------------------------------------

def test_verbose_shows_observers_tos_and_tc_verdicts():
    p = forwarded_icmp()
    p.path[0] = Stage("tc_ingress", 0, "r0", 0, verdict="ok")
    plain = output.format_packet(p)
    text = output.packet_renderer(verbose=1)(p)
    assert "observer" not in plain and "observer" in text
    pre = [ln for ln in text.splitlines() if "◦ observer" in ln]
    assert pre[0].split() == ["+1.5µs", "◦", "observer", "-300", "mark", "0x0", "tos", "0x00"]
    assert "tos 0x00" in [ln for ln in text.splitlines() if " prerouting " in ln][0]
    assert [ln for ln in text.splitlines() if " tc_ingress " in ln][0].endswith(" ok")


# --- colour ---------------------------------------------------------------------------

def test_colour_marks_verdicts_drops_and_changes():
    p = dropped_udp()
    p.path[2].tables = [TableStep("filter", 0, 0, 0, "new", "drop")]
    text = output.packet_renderer(colour=True)(p)
    assert "\x1b[31mDROPPED\x1b[0m" in text.splitlines()[0]
    assert "\x1b[31mDROP\x1b[0m" in text
    assert text.splitlines()[-1] == "  \x1b[31mdropped: NETFILTER_DROP at nf_hook_slow+0x9c (in filter forward)\x1b[0m"
    ok = output.packet_renderer(colour=True)(forwarded_icmp())
    assert "\x1b[32mFORWARDED\x1b[0m" in ok and "\x1b[33mmark 0x0→0x1\x1b[0m" in ok
    # without colour: the same text, to the character
    assert SGR.sub("", text) == output.format_packet(p)


def test_colour_cannot_be_forged_by_a_name():
    # a name made like the renderer's marks stays text: the marks carry a nonce no name knows
    fake = "⟦0123456789abcdef:31⟧x⟧0123456789abcdef⟧"
    p = forwarded_icmp()
    p.netns = fake + "\x1b[32m"
    text = output.packet_renderer(colour=True)(p)
    assert fake + "\\x1b[32m" in text.splitlines()[0]
    assert len(SGR.findall(text.splitlines()[0])) == 4      # #id bold and the fate, each opened and reset


@pytest.mark.parametrize("choice, tty, no_color, want", [
    ("always", False, "1", True), ("never", True, "", False), ("auto", True, None, True),
    ("auto", False, None, False), ("auto", True, "1", False), ("auto", True, "", True),
])
def test_colour_choice(choice, tty, no_color, want):
    class Stream(io.StringIO):
        def isatty(self):
            return tty
    env = {} if no_color is None else {"NO_COLOR": no_color}
    assert colour.wanted(choice, Stream(), env) is want


# --- wall-clock stamps -------------------------------------------------------------

@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


T0 = 1_764_675_000_250_000_000      # ns: 2025-12-02 11:30:00.25 UTC


@pytest.mark.parametrize("mode, stamps", [
    (output.TIME_ABSOLUTE, ["11:30:00.250000 ", "11:30:00.250100 ", "11:30:01.500000 "]),
    (output.TIME_NONE, ["", "", ""]),
    (output.TIME_EPOCH, ["1764675000.250000 ", "1764675000.250100 ", "1764675001.500000 "]),
    (output.TIME_DELTA, ["00:00:00.000000 ", "00:00:00.000100 ", "00:00:01.249900 "]),
    (output.TIME_DATE, ["2025-12-02 11:30:00.250000 ", "2025-12-02 11:30:00.250100 ", "2025-12-02 11:30:01.500000 "]),
    (output.TIME_SINCE_FIRST, ["00:00:00.000000 ", "00:00:00.000100 ", "00:00:01.250000 "]),
])
def test_clock_modes_as_tcpdump_t_switches(utc, mode, stamps):
    clock = output.Clock(mode)
    assert [clock(t) for t in (T0, T0 + 100_000, T0 + 1_250_000_000)] == stamps


def test_clock_without_wall_time_writes_nothing():
    assert output.Clock(output.TIME_ABSOLUTE)(None) == ""


def test_clock_rounds_to_the_microsecond_as_the_pcapng_file_does(utc):
    assert output.Clock(output.TIME_EPOCH)(1_764_675_000_000_000_500) == "1764675000.000001 "
    assert output.Clock(output.TIME_EPOCH)(1_764_675_000_999_999_600) == "1764675001.000000 "


def test_printer_writes_the_stamp_before_the_header(utc):
    buf = io.StringIO()
    pr = output.Printer(buf, as_json=False, clock=output.Clock())
    p = forwarded_icmp()
    p.wall_ns = T0
    pr.packet(p)
    pr.packet(forwarded_icmp())               # no wall time (older recordings): no stamp, no crash
    blocks = buf.getvalue().split("\n\n")
    assert blocks[0].startswith("11:30:00.250000 #7 ipv4 icmp")
    assert blocks[1].startswith("#7 ipv4 icmp")


def test_json_carries_no_stamp():
    buf = io.StringIO()
    output.Printer(buf, as_json=True, clock=output.Clock()).packet(forwarded_icmp())
    assert buf.getvalue().startswith("{")


# --- templates: colour and -v render through them, and equal direct rendering ---------

def test_colour_and_verbose_templates_equal_direct_rendering_for_every_recorded_packet():
    from benchmarks.run import RECORDING, load_recording
    ctx, raws = load_recording(RECORDING)
    for kw in ({"colour": True}, {"verbose": 1}, {"colour": True, "verbose": 1}):
        fmt = output.packet_renderer(**kw)
        direct = output.packet_renderer(**kw)
        for _ in range(2):
            for raw, aged in raws:
                pkt = assemble(raw, ctx, aged=aged)
                # a packet built by hand (its path set) renders directly, never from a template
                by_hand = assemble(raw, ctx, aged=aged)
                by_hand._path = list(by_hand.path)
                assert SGR.sub("", fmt(pkt)) == SGR.sub("", direct(by_hand))
        assert fmt.hits >= len(raws) // 2 and fmt.misses > 0, kw

