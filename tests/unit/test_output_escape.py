"""Names from the system never write control characters to the terminal.

Anyone who can name a device, a namespace, a process or an nft table can
put an escape sequence in it: the human view shows it as `\\x1b[31m`, the
JSON view stays valid JSON carrying the exact name.
"""
from __future__ import annotations

import io
import json
import os

import pytest

from tracer import output
from tracer.model import Lookup, Packet, Stage, TableStep
from tracer.recording import replay

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")
RED = "\x1b[31m"
HOSTILE = [RED + "x", "a\nb", "bidi\u202etxt", "bell\x07", "csi\x9b2J", "nul\x00", "bad\udcff"]


def _raw_control(text: str) -> list[str]:
    """Characters that must not reach a terminal raw (line breaks between lines aside)."""
    return [c for line in text.split("\n") for c in line if not c.isprintable()]


def hostile_packet(name: str) -> Packet:
    return Packet(
        id=9, netns="ns" + name, family="ipv4", proto="udp", src="10.0.0.1", dst="10.0.0.2", sport=1, dport=53,
        fate="delivered", in_dev="in" + name, out_dev=None, proto_num=17,
        path=[
            Stage("rx", 0, "in" + name, 0),
            Stage("route", 1_000, "lo", 0, lookups=[Lookup("local", 255, "dev" + name, None, 0, 1_000)]),
            Stage("input", 2_000, "in" + name, 0, tables=[TableStep("tbl" + name, 0, 0, 0, None, "accept")]),
        ],
        process={"pid": 42, "comm": "comm" + name},
    )


@pytest.mark.parametrize("name", HOSTILE)
def test_human_view_escapes_every_name(name):
    text = output.format_packet(hostile_packet(name))
    assert _raw_control(text) == [], text
    assert f"netns ns{output.escape(name)}" in text
    assert f"read by comm{output.escape(name)} (pid 42)" in text
    assert len(text.splitlines()) == len(output.format_packet(hostile_packet("x")).splitlines())


def test_escape_sequence_is_shown_literally():
    text = output.format_packet(hostile_packet(RED))
    assert "\\x1b[31m" in text and "\x1b" not in text


def test_unicode_letters_are_kept():
    text = output.format_packet(hostile_packet("wlän-网卡"))
    assert "wlän-网卡" in text


@pytest.mark.parametrize("name", HOSTILE)
def test_json_stays_valid_and_exact(name):
    p = hostile_packet(name)
    line = output.format_json(p)
    assert "\n" not in line and _raw_control(line) == []
    d = json.loads(line)
    assert d["netns"] == "ns" + name and d["in_dev"] == "in" + name
    b = output.format_json_line(p)
    assert b.endswith(b"\n") and b"\n" not in b[:-1] and json.loads(b) == d


def _recording_with_names(ifname: str, nsname: str) -> io.StringIO:
    out = []
    with open(DATA) as f:
        for line in f:
            d = json.loads(line)
            ctx = d.get("context", {})
            if "ifnames" in ctx:
                ctx["ifnames"] = [[ino, idx, ifname if name == "rc" else name] for ino, idx, name in ctx["ifnames"]]
            if "netns_names" in ctx:
                ctx["netns_names"] = [[ino, nsname] for ino, _ in ctx["netns_names"]]
            out.append(json.dumps(d) + "\n")
    return io.StringIO("".join(out))


def test_recorded_names_are_escaped_in_replay():
    for p in replay(_recording_with_names(RED + "rc", "pt\x07lab")):
        text = output.format_packet(p)
        assert _raw_control(text) == [], text
        assert "pt\\x07lab" in text
        d = json.loads(output.format_json(p))
        assert d["netns"] == "pt\x07lab"


def test_printer_writes_no_raw_escape():
    buf = io.StringIO()
    pr = output.Printer(buf, False)
    for p in replay(_recording_with_names(RED + "rc", RED)):
        pr.packet(p)
    assert "\x1b" not in buf.getvalue() and "\\x1b[31mrc" in buf.getvalue()
