"""Stage times as the kernel emits them: ns after the record's first_ts.

pt_emit makes every timed stage's time relative (and sets rel_ts) so that
the collector prints them without a subtraction each; records read from the
in-flight map (aged) and recordings made before format 4 carry absolute
times.  Both forms must read, print and template alike.
"""
from __future__ import annotations

import io
import json
import struct

import pytest

from tracer import layout, output
from tracer.events import StageKind
from tracer.paths import assemble
from tracer.recording import FORMAT, Recorder, replay

from test_qdisc_stage import ctx as qdisc_ctx, queued, record   # records built by hand there

BOOT = 1_764_672_000_123_456_789


def _recorded():
    from benchmarks.run import RECORDING, load_recording
    ctx, raws = load_recording(RECORDING)
    ctx.boot_wall_ns = BOOT
    return ctx, raws


def _times(raw: bytes) -> list[int | None]:
    out = []
    for i in range(raw[layout.N_STAGES_OFF]):
        off = layout.HEADER_SIZE + i * layout.STAGE_SIZE
        out.append(None if raw[off + layout.KIND_OFF] == StageKind.ADDR else layout.U64.unpack_from(raw, off)[0])
    return out


def test_relative_times_does_what_pt_emit_does():
    ctx, raws = _recorded()
    addr_stages = 0
    for raw, _aged in raws:
        rel = layout.relative_times(raw)
        first = layout.U64.unpack_from(raw, layout.FIRST_TS_OFF)[0]
        assert raw[layout.REL_TS_OFF] == 0 and rel[layout.REL_TS_OFF] == 1
        assert _times(rel) == [None if t is None else t - first for t in _times(raw)]
        assert all(t is None or t >= 0 for t in _times(rel))
        # an address stage holds an address where others have a time: untouched
        for i, t in enumerate(_times(raw)):
            if t is None:
                off = layout.HEADER_SIZE + i * layout.STAGE_SIZE
                assert rel[off:off + layout.STAGE_SIZE] == raw[off:off + layout.STAGE_SIZE]
                addr_stages += 1
        # everything but the times and the marker is the same
        masked = bytearray(rel)
        masked[layout.REL_TS_OFF] = 0
        for i, t in enumerate(_times(raw)):
            if t is not None:
                struct.pack_into("=Q", masked, layout.HEADER_SIZE + i * layout.STAGE_SIZE, t)
        assert bytes(masked) == raw
        assert layout.relative_times(rel) == rel      # (already relative: unchanged)
    assert addr_stages > 0                           # the recording has NAT/gateway stages


@pytest.mark.parametrize("view", ["json", "human"])
def test_an_emitted_record_reads_as_its_absolute_twin(view):
    # the decoder, not a template: path times, observations, lookups
    ctx, raws = _recorded()
    render = {"json": output.packet_json, "human": output._format_packet}[view]
    for raw, aged in raws:
        a = assemble(raw, ctx, aged=aged)
        r = assemble(layout.relative_times(raw), ctx, aged=aged)
        assert render(r) == render(a)
        assert r.wall_ns == a.wall_ns == BOOT + layout.U64.unpack_from(raw, layout.FIRST_TS_OFF)[0]
    t_ns = [s["t_ns"] for raw, aged in raws
            for s in json.loads(output.packet_json(assemble(layout.relative_times(raw), ctx)))["path"]]
    assert max(t_ns) > 0 and min(t_ns) == 0


def test_a_qdisc_stage_waits_as_long_in_either_form():
    raw = bytes(record(queued(1_811_000)))
    a, r = assemble(raw, qdisc_ctx()), assemble(layout.relative_times(raw), qdisc_ctx())
    assert (r.stage("qdisc").queued_ns, r.stage("qdisc").t_ns) == (a.stage("qdisc").queued_ns,
                                                                   a.stage("qdisc").t_ns) == (1_800_000, 11_000)


@pytest.mark.parametrize("name", ["json-bytes", "json", "human", "colour"])
def test_templates_fill_both_forms_as_the_renderer_prints_them(name):
    # one template cache sees each record in both forms, in turn and again:
    # the marker is part of the key (a text compiled for one form must not
    # be filled with the other's times), and each fill is the renderer's text
    ctx, raws = _recorded()
    fmt = {"json-bytes": output.Templates(output.packet_json, str, as_bytes=True),
           "json": output.Templates(output.packet_json, str),
           "human": output.Templates(output._format_packet, output._time, output._time_col),
           "colour": output.packet_renderer(colour=True)}[name]
    direct = {"json-bytes": lambda p: output.packet_json(p).encode(), "json": output.packet_json,
              "human": output._format_packet, "colour": output.packet_renderer(colour=True)}[name]
    hits = {}
    for _ in range(2):
        for raw, aged in raws:
            for form in (raw, layout.relative_times(raw)):
                by_hand = assemble(form, ctx, aged=aged)
                by_hand._path = list(by_hand.path)      # (rendered directly, never from a template)
                before = fmt.hits
                assert fmt(assemble(form, ctx, aged=aged)) == direct(by_hand)
                hits[form[layout.REL_TS_OFF]] = hits.get(form[layout.REL_TS_OFF], 0) + fmt.hits - before
    # the second round: every record a template takes, in either form
    assert hits[1] == hits[0] >= len(raws) - 3


def test_live_json_lines_of_emitted_records_take_the_one_getter_fill(monkeypatch):
    # pkttrace --json's lines of a flood's records: the fill built for them
    # (the id and the times picked as they are, "time_ns" last)
    ctx, raws = _recorded()
    fmt = output.Templates(lambda p: output.packet_json(p) + "\n", str, as_bytes=True)
    plain = [(layout.relative_times(r), a) for r, a in raws
             if r[layout.LINKS_OFF:layout.LINKS_OFF + 32] == bytes(32)]
    for raw, aged in plain:
        fmt(assemble(raw, ctx, aged=aged))
    monkeypatch.setattr(fmt, "_fill", lambda *a: pytest.fail("the general fill for a plain record"))
    fills = {m.texts[k][3].__name__ for _s, m in fmt._shapes.values() for k in m.texts if m.texts[k][3]}
    assert fills == {"<lambda>"}
    for raw, aged in plain:
        assert fmt(assemble(raw, ctx, aged=aged)) == (output.packet_json(assemble(raw, ctx, aged=aged)) +
                                                      "\n").encode()


def test_a_recording_of_emitted_records_replays_them_as_recorded():
    ctx, raws = _recorded()
    out = io.StringIO()
    rec = Recorder(out, ctx)
    for raw, aged in raws:
        rec(layout.relative_times(raw), aged)
    rec.flush()
    assert json.loads(out.getvalue().splitlines()[0])["pkttrace_recording"] == FORMAT == 4
    again = list(replay(io.StringIO(out.getvalue())))
    assert [output.packet_json(p) for p in again] == \
        [output.packet_json(assemble(raw, ctx, aged=aged)) for raw, aged in raws]


def test_records_of_older_formats_are_absolute_whatever_that_byte_holds():
    # format 1 had the netns index at rel_ts's offset for a while (nonzero
    # for every netns but the first traced): such records are absolute
    from benchmarks.run import RECORDING
    lines = RECORDING.read_text().splitlines(keepends=True)
    assert json.loads(lines[0])["pkttrace_recording"] == 1
    marked, n = [], 0
    for line in lines:
        d = json.loads(line)
        if "raw" in d:
            b = bytearray.fromhex(d["raw"])
            b[layout.REL_TS_OFF] = 2
            d["raw"], n = b.hex(), n + 1
            line = json.dumps(d) + "\n"
        marked.append(line)
    as_recorded = [output.packet_json(p) for p in replay(io.StringIO("".join(lines)))]
    assert len(as_recorded) == n > 0
    assert [output.packet_json(p) for p in replay(io.StringIO("".join(marked)))] == as_recorded
