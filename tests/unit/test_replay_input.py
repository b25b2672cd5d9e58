"""A recording is input: complete recordings of a known format only; a cut tail is skipped and said so."""
from __future__ import annotations

import io
import json
import os

import pytest

from tracer import events
from tracer.output import Printer
from tracer.recording import _LAYOUTS, FORMAT, Cut, RecordingError, _check_raw, check, replay, replay_to

_LAYOUT2 = _LAYOUTS[2]

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")

with open(DATA, "rb") as _f:
    BASE = _f.read()
LINES = BASE.splitlines(keepends=True)
ALL = len([ln for ln in LINES if ln.startswith(b'{"raw"')])


def ids(data: bytes) -> list[int]:
    return [p.id for p in replay(io.BytesIO(data))]


def test_the_fixture_declares_this_format():
    # the fixture is of format 1 (records without the header line's facts):
    # still read, its records padded to this format's layout
    assert json.loads(LINES[0])["pkttrace_recording"] == 1 and FORMAT == 4
    assert len(ids(BASE)) == ALL


def test_text_and_binary_streams_read_alike():
    with open(DATA) as f:
        assert [p.id for p in replay(f)] == ids(BASE)


@pytest.mark.parametrize("keep", [1, 5, 30])
def test_cut_last_line_is_skipped_and_measured(keep):
    last = LINES[-1]
    data = BASE[:-len(last)] + last[:keep]
    cut = Cut()
    got = [p.id for p in replay(io.BytesIO(data), cut)]
    assert got == ids(BASE)[:-1]
    assert (cut.lines, cut.bytes) == (1, keep)
    assert str(cut) == f"last 1 line(s) incomplete, ignored ({keep} bytes)"
    assert check(io.BytesIO(data)).bytes == keep


def test_cut_inside_the_names_keeps_what_came_before():
    data = b"".join(LINES[:3]) + LINES[3][:20]   # a record line, then a context line cut
    assert len(ids(data)) == 1


def test_cut_after_the_last_newline_is_a_whole_recording():
    assert check(io.BytesIO(BASE)) == Cut()
    assert check(io.BytesIO(BASE.rstrip(b"\n"))) == Cut()     # the last line is whole JSON


def test_header_only_is_an_empty_recording():
    assert ids(LINES[0]) == []


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty file"),
    (b"\n\n", "empty file"),
    (LINES[0][:20], "header is cut"),
    (b"hello\n", "not JSON"),
    (b"\x89PNG\r\n\x1a\n\0\0", "not UTF-8"),
    (b"[1, 2]\n", "no header"),
    (b'{"context": {}}\n', "no header"),
    (b'{"pkttrace_recording": 5, "record_size": 200, "stage_size": 32}\n', "format 5 is newer"),
    (b'{"pkttrace_recording": true, "record_size": 200, "stage_size": 32}\n', "format True"),
    (b'{"pkttrace_recording": "1", "record_size": 200, "stage_size": 32}\n', "format '1'"),
    (b'{"pkttrace_recording": 1, "record_size": 208, "stage_size": 32}\n', "another record layout"),
    (LINES[0] + b'{"raw": "00"}\n', "a record of 1 bytes"),
    (LINES[0] + b'{"raw": "zz"}\n', "not a record"),
    (LINES[0] + b'{"raw": "00", "aged": "yes"}\n', "not a record"),
    (LINES[0] + b'{"something": 1}\n', "neither a record nor names"),
    (LINES[0] + b'{"context": {"ifnames": [[1, 2]]}}\n', "bad 'ifnames'"),
    (LINES[0] + b'{"context": {"ifnames": [[1, true, "x"]]}}\n', "bad 'ifnames'"),
    (LINES[0] + b'{"context": {"rules": [[1, 2, [{"priority": 1}]]]}}\n', "not a routing rule"),
    (LINES[0] + b'{"context": {"rules": [[1, 2, [{"priority": 1, "table": 2, "src": "10.0.0.1/8"}]]]}}\n',
     "host bits set"),
    (LINES[0] + b"[" * 100000 + b"]" * 100000 + b"\n", "not JSON"),
    (LINES[0] + b'{"raw": ' + b"1" * 5000 + b"}\n", "not JSON"),    # beyond int()'s digit limit
    (LINES[0] + b"garbage without a newline", "not JSON"),         # a cut line looks like the recorder's
    (LINES[0] + b"\0" * 64, "not JSON"),
])
def test_not_a_complete_recording_is_one_line(data, fragment):
    with pytest.raises(RecordingError) as e:
        list(replay(io.BytesIO(data)))
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_a_line_in_the_middle_cut_is_refused():
    data = b"".join(LINES[:5]) + LINES[5][:40] + b"\n" + b"".join(LINES[6:])
    with pytest.raises(RecordingError, match="line 6: not JSON"):
        list(replay(io.BytesIO(data)))


def test_a_bad_file_is_refused_before_anything_is_written():
    data = BASE + b"not json\n"
    out = []
    with pytest.raises(RecordingError, match=f"line {len(LINES) + 1}"):
        replay_to(io.BytesIO(data), lambda p: p.id, out.append)
    assert out == []


def test_replay_to_renders_filters_and_counts():
    pr = Printer(io.StringIO(), True)
    done = replay_to(io.BytesIO(BASE), pr.render, pr.write, keep=lambda p: p.proto == "udp", count=2)
    lines = pr.out.getvalue().splitlines()
    assert done.shown == 2 and len(lines) == 2 and all(json.loads(ln)["proto"] == "udp" for ln in lines)


class _Pipe(io.RawIOBase):
    """A stream that cannot seek (a pipe): read once, checked as it goes."""

    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buf):
        n = self._b.readinto(buf)
        return n


def test_a_pipe_is_read_once():
    src = io.BufferedReader(_Pipe(BASE + LINES[-1][:9]))
    assert not src.seekable()
    out = []
    done = replay_to(src, lambda p: p.id, out.append)
    assert out == ids(BASE) and done.cut == Cut(1, 9)


def test_a_line_too_long_is_refused_without_reading_it_all(monkeypatch):
    import tracer.recording as rec
    monkeypatch.setattr(rec, "MAX_LINE", 1000)
    with pytest.raises(RecordingError, match="longer than"):
        list(replay(io.BytesIO(LINES[0] + b'{"context": {"x": "' + b"a" * 5000)))


def _with_facts(raw: bytes) -> bytes:
    """A record given the header line's facts, as the kernel fills them for a TCP SYN."""
    from tracer import events
    b = bytearray(raw)
    R = events.PtRecord
    b[R.len.offset:R.len.offset + 2] = (60).to_bytes(2, "little")
    b[R.tcp_flags.offset], b[R.head_len.offset] = 0x02, 4
    b[R.flags.offset] |= events.REC_L4
    b[R.head.offset:R.head.offset + 4] = b"\x45\x00\x00\x3c"
    return bytes(b)


def test_format_1_records_read_with_unknown_facts_and_format_2_keeps_them():
    """A format 1 recording (the fixture) still replays, without the facts
    its records do not carry; one written now keeps them, and the time."""
    from tracer import paths
    from tracer.recording import Recorder, _check_raw
    old = list(replay(io.BytesIO(BASE)))
    assert all(p.length is None and p.wall_ns is None and p.head is None for p in old)
    assert all("time_ns" not in p.to_json() and "len" not in p.to_json() for p in old)
    # rewrite the fixture's records (read in this format's layout) as format 2
    ctx = paths.Context(boot_wall_ns=1_764_672_000_000_000_000)
    out = io.StringIO()
    rec = Recorder(out, ctx)
    for line in LINES[1:]:
        d = json.loads(line)
        if "context" in d:
            out.write(line.decode())
        else:
            raw, aged = _check_raw(d, 200)    # format 1's header size: padded to this layout
            rec(_with_facts(raw), aged)
    assert json.loads(out.getvalue().splitlines()[0])["pkttrace_recording"] == FORMAT == 4
    new = list(replay(io.StringIO(out.getvalue())))
    assert [p.id for p in new] == [p.id for p in old]
    tcp = [p for p in new if p.proto_num == 6]
    others = [p for p in new if p.proto_num != 6]
    assert all(p.length == 60 and p.head == b"\x45\x00\x00\x3c" for p in new)
    assert all(p.tcp_flags == 2 and p.to_json()["tcp_flags"] == "S" for p in tcp)
    assert all(p.tcp_flags is None for p in others)
    assert all(p.wall_ns is not None and p.wall_ns > 1_764_672_000_000_000_000 for p in new)


def test_a_format_2_recording_without_a_wall_clock_replays_without_times():
    """A format 1 recording rewritten (pcap-ng -w from -r) keeps "no wall clock": null."""
    head = json.loads(LINES[0])
    head.update(pkttrace_recording=2, record_size=_LAYOUT2[0], boot_wall_ns=None)
    lines = [json.dumps(head).encode() + b"\n"]
    for line in LINES[1:]:
        d = json.loads(line)
        if "raw" in d:
            # a format 2 record: format 1's padded to format 2's header size
            raw = _check_raw(d, 200)[0]
            d["raw"] = (raw[:_LAYOUT2[0]] + raw[events.RECORD_HEADER_SIZE:]).hex()
        lines.append(json.dumps(d).encode() + b"\n")
    pkts = list(replay(io.BytesIO(b"".join(lines))))
    assert len(pkts) == ALL and all(p.wall_ns is None for p in pkts)
    bad = dict(head, boot_wall_ns="yesterday")
    with pytest.raises(RecordingError, match="boot_wall_ns is not a time"):
        list(replay(io.BytesIO(json.dumps(bad).encode() + b"\n" + b"".join(lines[1:]))))
