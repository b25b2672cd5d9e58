"""Output: the readable block per packet, JSON lines, and the closing summary."""

import io
import json
import os
import struct
import threading

import pytest

from tracer import events, inputs, output
from tracer.model import Lookup, Observation, Packet, Stage
from tracer.paths import Context, assemble
from tracer.session import Counters


def _hook(name, t, dev, mark, mark_out, in_dev=None):
    return Stage(name, t, dev, mark, mark_out=mark_out, tos=0, tos_out=0, in_dev=in_dev,
                 observations=[Observation(-300, mark, 0, t), Observation(300, mark_out, 0, t + 100)])


def forwarded_icmp() -> Packet:
    """Router: marked 0x0 -> 0x1 in PREROUTING, routed by table main, forwarded."""
    return Packet(
        id=7, netns="ptlab-rtr", family="ipv4", proto="icmp", src="10.71.1.2", dst="10.71.2.2",
        sport=None, dport=None, fate="forwarded", in_dev="r0", out_dev="r1",
        path=[
            Stage("rx", 0, "r0", 0),
            _hook("prerouting", 1_500, "r0", 0, 1),
            Stage("route", 2_000, "r1", 1, lookups=[Lookup("main", 254, "r1", None, 1, 2_000)]),
            _hook("forward", 3_000, "r1", 1, 1, in_dev="r0"),
            _hook("postrouting", 4_000, "r1", 1, 1),
            Stage("tx", 2_500_000, "r1", 1),
        ],
        proto_num=1,
    )


def dropped_udp() -> Packet:
    """Router: UDP to port 5009 dropped by a FORWARD rule."""
    return Packet(
        id=8, netns="ptlab-rtr", family="ipv4", proto="udp", src="10.71.1.2", dst="10.71.2.2",
        sport=40000, dport=5009, fate="dropped", in_dev="r0", out_dev="r1",
        path=[
            Stage("rx", 0, "r0", 0),
            Stage("route", 2_000, "r1", 0, lookups=[Lookup("main", 254, "r1", None, 0, 2_000)]),
            _hook("forward", 3_000, "r1", 0, 0, in_dev="r0"),
            Stage("drop", 3_500, "r1", 0),
        ],
        drop={"reason": "NETFILTER_DROP", "location": "nf_hook_slow+0x9c", "last_hook": "forward",
              "stage": "forward", "table": "filter"},
        proto_num=17,
    )


# --- JSON -------------------------------------------------------------------

REQUIRED = {"id", "netns", "family", "proto", "src", "dst", "fate", "in_dev", "out_dev", "path"}


@pytest.mark.parametrize("make", [forwarded_icmp, dropped_udp])
def test_json_is_one_line_of_valid_json(make):
    line = output.format_json(make())
    assert "\n" not in line
    d = json.loads(line)
    assert REQUIRED <= set(d)


def test_json_values_of_a_forwarded_packet():
    d = json.loads(output.format_json(forwarded_icmp()))
    assert {k: d[k] for k in REQUIRED - {"path"}} == {
        "id": 7, "netns": "ptlab-rtr", "family": "ipv4", "proto": "icmp", "src": "10.71.1.2",
        "dst": "10.71.2.2", "fate": "forwarded", "in_dev": "r0", "out_dev": "r1"}
    assert "sport" not in d and "dport" not in d  # no ports for ICMP
    assert "drop" not in d


def test_json_path_entries():
    d = json.loads(output.format_json(forwarded_icmp()))
    assert [(s["stage"], s["t_ns"], s["dev"], s["mark"]) for s in d["path"]] == [
        ("rx", 0, "r0", 0), ("prerouting", 1_500, "r0", 0), ("route", 2_000, "r1", 1),
        ("forward", 3_000, "r1", 1), ("postrouting", 4_000, "r1", 1), ("tx", 2_500_000, "r1", 1)]
    pre = d["path"][1]
    assert pre["mark_out"] == 1
    assert [o["priority"] for o in pre["observers"]] == [-300, 300]
    assert d["path"][2]["table"] == "main"
    assert d["path"][3]["in_dev"] == "r0"


def test_json_ports_and_drop_for_udp():
    d = json.loads(output.format_json(dropped_udp()))
    assert (d["sport"], d["dport"]) == (40000, 5009)
    assert d["fate"] == "dropped"
    assert d["drop"]["reason"] == "NETFILTER_DROP"
    assert d["drop"]["location"] == "nf_hook_slow+0x9c"


def _record(proto: int) -> events.PtRecord:
    rec = events.PtRecord()
    rec.id, rec.family, rec.proto, rec.fate = 1, 4, proto, events.Fate.SENT
    rec.saddr[:4], rec.daddr[:4] = [10, 0, 0, 1], [10, 0, 0, 2]
    rec.sport, rec.dport = 1234, 80
    rec.n_stages = 1
    rec.stages[0].kind = events.StageKind.TX
    return rec


@pytest.mark.parametrize("proto, has_ports", [(6, True), (17, True), (1, False), (58, False), (47, False)])
def test_json_ports_only_for_tcp_and_udp(proto, has_ports):
    d = json.loads(output.format_json(assemble(_record(proto), Context())))
    assert ("sport" in d, "dport" in d) == (has_ports, has_ports)
    if has_ports:
        assert (d["sport"], d["dport"]) == (1234, 80)


def _mld_report(ext_hdrs: int) -> events.PtRecord:
    """A received MLDv2 report as the kernel records it: ICMPv6 type 143
    found behind the extension headers in ext_hdrs (events.EXT_*)."""
    rec = events.PtRecord()
    rec.id, rec.family, rec.proto, rec.fate = 9, 6, 58, events.Fate.DELIVERED
    rec.saddr[:16] = [0xfe, 0x80] + [0] * 13 + [2]
    rec.daddr[:16] = [0xff, 0x02] + [0] * 13 + [0x16]
    rec.flags, rec.len, rec.icmp_type, rec.ext_hdrs = events.REC_L4, 76, 143, ext_hdrs
    rec.n_stages = 1
    rec.stages[0].kind = events.StageKind.RX
    return rec


@pytest.mark.parametrize("bits, names", [
    (events.EXT_HOP, ["hop-by-hop"]),
    (events.EXT_FRAG | events.EXT_DEST, ["fragment", "dstopts"]),
    (events.EXT_HOP | events.EXT_ROUTING | events.EXT_AH, ["hop-by-hop", "routing", "ah"]),
])
def test_extension_headers_in_json_and_on_the_header_line(bits, names):
    p = assemble(_mld_report(bits), Context())
    d = json.loads(output.format_json(p))
    assert (d["proto"], d["icmp_type"], d["ext_hdrs"]) == ("icmpv6", 143, names)
    head = output.format_packet(p).splitlines()[0]
    assert head == (f"#9 ipv6 icmpv6 fe80::2 → ff02::16 ext {','.join(names)} multicast listener report v2, "
                    "length 76  DELIVERED  netns 0")
    # the JSON the CLI writes (filled templates) says the same
    fmt = output.Templates(output.packet_json, str, as_bytes=True)
    for _ in range(2):
        assert fmt(assemble(_mld_report(bits), Context())) == output.packet_json(p).encode()


def test_no_extension_headers_no_key_and_nothing_on_the_header_line():
    p = assemble(_mld_report(0), Context())
    assert "ext_hdrs" not in json.loads(output.format_json(p))
    assert " ext " not in output.format_packet(p).splitlines()[0]


# --- readable block ---------------------------------------------------------

def _line(text: str, stage: str) -> str:
    [ln] = [ln for ln in text.splitlines()[1:] if ln.split()[1] == stage]
    return ln


def test_block_header():
    head = output.format_packet(forwarded_icmp()).splitlines()[0]
    assert head == "#7 ipv4 icmp 10.71.1.2 → 10.71.2.2  FORWARDED  netns ptlab-rtr"


def test_block_has_one_line_per_stage_in_order():
    lines = output.format_packet(forwarded_icmp()).splitlines()[1:]
    assert [ln.split()[1] for ln in lines] == ["rx", "prerouting", "route", "forward", "postrouting", "tx"]


def test_block_mark_change():
    assert "mark 0x0→0x1" in _line(output.format_packet(forwarded_icmp()), "prerouting")


def test_block_unchanged_mark_is_shown_once():
    ln = _line(output.format_packet(forwarded_icmp()), "postrouting")
    assert "mark 0x1" in ln and "→0x" not in ln


def test_block_route_table():
    ln = _line(output.format_packet(forwarded_icmp()), "route")
    assert "table main → dev r1" in ln


def test_block_route_error_and_several_tables():
    p = forwarded_icmp()
    p.path[2].lookups = [Lookup("local", 255, None, None, 0, 2_000),
                         Lookup("main", 254, None, "ENETUNREACH", 0, 2_100)]
    assert "table local → main → error ENETUNREACH" in _line(output.format_packet(p), "route")


def test_block_forward_shows_both_devices():
    assert "r0→r1" in _line(output.format_packet(forwarded_icmp()), "forward")


def test_block_times():
    text = output.format_packet(forwarded_icmp())
    assert "+1.5µs" in _line(text, "prerouting")
    assert "+2.500ms" in _line(text, "tx")


def test_block_drop_line():
    text = output.format_packet(dropped_udp())
    assert text.splitlines()[0].startswith("#8 ipv4 udp 10.71.1.2:40000 → 10.71.2.2:5009  DROPPED")
    assert text.splitlines()[-1] == "  dropped: NETFILTER_DROP at nf_hook_slow+0x9c (in filter forward)"


def test_block_ipv6_endpoints_are_bracketed():
    p = dropped_udp()
    p.family, p.src, p.dst = "ipv6", "fd71:1::2", "fd71:2::2"
    assert "[fd71:1::2]:40000 → [fd71:2::2]:5009" in output.format_packet(p).splitlines()[0]


def test_block_aged_out():
    p = forwarded_icmp()
    p.fate = "unknown"
    assert "  end not seen: aged out" in output.format_packet(p).splitlines()


def test_printer_json_writes_one_line_per_packet():
    buf = io.StringIO()
    printer = output.Printer(buf, as_json=True)
    printer.packet(forwarded_icmp())
    printer.packet(dropped_udp())
    assert [json.loads(ln)["id"] for ln in buf.getvalue().splitlines()] == [7, 8]


# --- summary ----------------------------------------------------------------

def test_summary_counts():
    s = output.summary(Counters(shown=3, filtered=11, lost=5, create_failed=2, aged_out=4))
    assert "3 packets shown" in s
    assert "11 filtered out" in s
    assert "5 lost" in s
    assert "2 not traced" in s
    assert "4 aged out" in s
    assert "\n" not in s


def _recorded():
    """(context, raw records) of tests/data/lab-demo.jsonl."""
    from benchmarks.run import RECORDING, load_recording
    return load_recording(RECORDING)


@pytest.mark.parametrize("boot_wall_ns", [None, 1_764_672_000_123_456_789])
def test_json_bytes_lines_equal_the_json_renderer_for_every_recorded_packet(boot_wall_ns):
    # twice each: the first renders and compiles a template, the second fills it;
    # with a wall clock, each packet's "time_ns" is a hole of its own
    ctx, raws = _recorded()
    ctx.boot_wall_ns = boot_wall_ns
    fmt = output.Templates(output.packet_json, str, as_bytes=True)
    for _ in range(2):
        for raw, aged in raws:
            pkt = assemble(raw, ctx, aged=aged)
            assert fmt(pkt) == output.packet_json(assemble(raw, ctx, aged=aged)).encode()
    assert fmt.hits >= len(raws) // 2 and fmt.misses > 0


def test_bytes_templates_refuse_text_holes():
    with pytest.raises(ValueError):
        output.Templates(output._format_packet, output._time, output._time_col, as_bytes=True)


def test_printer_json_goes_to_the_binary_buffer_after_earlier_text():
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")
    out.write("before\n")
    p = output.Printer(out, as_json=True)
    p.batch(forwarded_icmp())
    p.batch(forwarded_icmp())
    p.flush()
    lines = raw.getvalue().decode().splitlines()
    assert lines[0] == "before"
    assert [json.loads(x)["id"] for x in lines[1:]] == [7, 7]


class _Writes(io.RawIOBase):
    """A stream that passes every write on (as stdout under python -u):
    what each write() was given; `most`: takes at most that many bytes a
    call, as a pipe's write interrupted by a signal does."""

    def __init__(self, most: int | None = None):
        self.calls: list[bytes] = []
        self.most = most

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)[:self.most]
        self.calls.append(b)
        return len(b)


@pytest.mark.parametrize("as_json", [True, False])
def test_a_raw_stream_taking_part_of_each_write_gets_every_byte_in_order(as_json):
    # under python -u a pipe's write() cut short by SIGTERM takes part of a
    # batch and says so: the rest is written, not dropped (nor the text
    # layer's, which ignores how much went)
    raw = _Writes(most=1000)
    p = output.Printer(io.TextIOWrapper(raw, encoding="utf-8", write_through=True), as_json=as_json)
    ids = list(range(40))
    for i in ids:
        pkt = forwarded_icmp()
        pkt.id = i
        p.batch(pkt)
    p.flush()
    assert len(raw.calls) > 10 and all(len(c) <= 1000 for c in raw.calls)
    text = b"".join(raw.calls).decode()
    if as_json:
        assert [json.loads(x)["id"] for x in text.splitlines()] == ids
    else:
        one = output.Printer(io.StringIO(), as_json=False).render(forwarded_icmp())
        assert text == "".join(one.replace("#7 ", f"#{i} ", 1) for i in ids)


def test_write_all_waits_on_a_full_non_blocking_stream():
    r, w = os.pipe()
    os.set_blocking(w, False)
    data = bytes(range(256)) * 1024                 # 256 KiB: more than a pipe holds
    got = bytearray()

    def read_all():
        while len(got) < len(data):
            got.extend(os.read(r, 65536))
    reader = threading.Thread(target=read_all)
    with open(w, "wb", buffering=0) as f:
        reader.start()
        inputs.write_all(f, data)
    reader.join(timeout=10)
    os.close(r)
    assert bytes(got) == data


def test_text_written_before_a_packet_comes_before_it():
    # the demo tells its story on the text layer and prints packets through
    # the binary one: the story is not held back behind them
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")
    p = output.Printer(out, as_json=False)
    out.write("step 1\n")
    p.packet(forwarded_icmp())
    out.write("step 2\n")
    p.packet(dropped_udp())
    lines = raw.getvalue().decode().splitlines()
    assert lines[0] == "step 1" and "step 2" in lines
    assert lines.index("step 2") > next(i for i, x in enumerate(lines) if "#7 " in x)


@pytest.mark.parametrize("as_json", [True, False])
def test_a_batch_is_written_in_one_write_even_to_a_stream_that_passes_each_on(as_json):
    raw = _Writes()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    p = output.Printer(out, as_json=as_json)
    for _ in range(20):
        p.batch(forwarded_icmp())
    assert raw.calls == []                      # nothing before the batch is done
    p.flush()
    assert len(raw.calls) == 1
    one = output.Printer(io.StringIO(), as_json=as_json).render(forwarded_icmp())
    assert raw.calls[0] == one.encode() * 20


def test_a_large_batch_goes_out_in_pieces_in_order():
    raw = _Writes()
    p = output.Printer(io.TextIOWrapper(raw, encoding="utf-8", write_through=True), as_json=True)
    n = 3 * output.BATCH_WRITE_BYTES // len(p.render(forwarded_icmp())) + 5
    for i in range(n):
        pkt = forwarded_icmp()
        pkt.id = i
        p.batch(pkt)
    p.flush()
    assert 3 <= len(raw.calls) <= 5
    assert all(len(c) < output.BATCH_WRITE_BYTES + 4096 for c in raw.calls)
    assert [json.loads(x)["id"] for x in b"".join(raw.calls).decode().splitlines()] == list(range(n))


def test_a_packet_written_at_once_comes_after_the_batch_before_it():
    raw = _Writes()
    p = output.Printer(io.TextIOWrapper(raw, encoding="utf-8", write_through=True), as_json=True)
    first, second = forwarded_icmp(), dropped_udp()
    p.batch(first)
    p.packet(second)
    assert [json.loads(x)["id"] for x in b"".join(raw.calls).decode().splitlines()] == [first.id, second.id]


def test_a_device_by_number_only_is_seen_once_per_shape_and_again_when_set():
    pkt = forwarded_icmp()
    assert not pkt.unnamed_device()
    pkt.in_dev = "if7"                          # copies the shape: looked at again
    assert pkt.unnamed_device() and pkt._shape.unnamed is True
    pkt.in_dev = "r0"
    assert not pkt.unnamed_device()
    ctx, raws = _recorded()
    a, b = (assemble(raws[0][0], ctx) for _ in range(2))
    assert a._shape is b._shape and a._shape.unnamed is None
    assert not a.unnamed_device() and b._shape.unnamed is False


def test_template_key_is_every_byte_but_the_id_times_links_and_captured_header():
    # a byte the key leaves out (id, first_ts, a stage's time, head[]) must
    # not change which template fills; any other must (a text from another
    # record would be printed); a link's value is left out, not whether it is there
    from tracer import layout, templates
    ctx, raws = _recorded()
    raw = next(r for r, _ in raws if r[layout.N_STAGES_OFF] >= 7 and
               r[layout.LINKS_OFF:layout.LINKS_OFF + 32] == bytes(32))
    meta = templates._Shape(raw)
    times = {layout.HEADER_SIZE + i * layout.STAGE_SIZE + k for i in meta.timed for k in range(8)}
    assert len(meta.timed) >= 6
    base = meta.key(raw)
    for off in range(meta.size):
        b = bytearray(raw)
        b[off] ^= 0x5A
        ignored = off < 24 or layout.HEAD_OFF <= off < layout.TUN_OFF or off in times
        assert (meta.key(bytes(b)) == base) == ignored, off
    linked = [bytearray(raw), bytearray(raw)]
    linked[0][layout.LINK_OFFS[0]] = 1
    linked[1][layout.LINK_OFFS[0]] = 2
    assert meta.key(bytes(linked[0])) == meta.key(bytes(linked[1])) != base


def test_plain_key_is_the_key_for_records_without_links_or_tunnel():
    # the one-unpack key of a plain record is byte for byte key(): the same
    # texts are found whichever way a record comes
    from tracer import layout, templates
    ctx, raws = _recorded()
    plain = [r for r, _ in raws if r[layout.LINKS_OFF:layout.LINKS_OFF + 32] == bytes(32)
             and r[layout.TUN_OFF:layout.HEADER_SIZE] == bytes(layout.HEADER_SIZE - layout.TUN_OFF)]
    assert len(plain) >= 10
    for raw in plain:
        meta = templates._Shape(raw)
        v = meta.plain.unpack_from(raw)
        assert v[meta.plain_links] == templates._NO_LINKS and v[meta.plain_tun] == templates._NO_TUN
        assert b"".join(meta.plain_kept(v)) == meta.key(raw)
        assert (v[0], v[1]) == struct.unpack_from("=QQ", raw)
        assert [v[j] for j in meta.plain_times] == \
            [struct.unpack_from("=Q", raw, layout.HEADER_SIZE + i * layout.STAGE_SIZE)[0] for i in meta.timed]


@pytest.mark.parametrize("renderer", ["json", "human", "colour"])
def test_plain_records_fill_from_one_unpack_without_the_general_fill(renderer, monkeypatch):
    # a flood's records (no link, no tunnel) take the short fill; with the
    # general one broken they still print as the renderer does
    from tracer import layout
    ctx, raws = _recorded()
    ctx.boot_wall_ns = 1_764_672_000_123_456_789
    fmt = {"json": output.Templates(output.packet_json, str, as_bytes=True),
           "human": output.Templates(output._format_packet, output._time, output._time_col),
           "colour": output.packet_renderer(colour=True)}[renderer]
    direct = {"json": lambda p: output.packet_json(p).encode(), "human": output._format_packet,
              "colour": output.packet_renderer(colour=True)}[renderer]
    plain = [(r, a) for r, a in raws if r[layout.LINKS_OFF:layout.LINKS_OFF + 32] == bytes(32)]
    for raw, aged in plain:
        fmt(assemble(raw, ctx, aged=aged))
    monkeypatch.setattr(fmt, "_fill", lambda *a: pytest.fail("the general fill for a plain record"))
    hits = fmt.hits
    for raw, aged in plain:
        by_hand = assemble(raw, ctx, aged=aged)
        by_hand._path = list(by_hand.path)
        assert fmt(assemble(raw, ctx, aged=aged)) == direct(by_hand)
    assert fmt.hits - hits >= len(plain) - 2


def test_templates_hold_at_most_max_entries_texts():
    ctx, raws = _recorded()
    fmt = output.Templates(output.packet_json, str, as_bytes=True, max_entries=3)
    for _ in range(2):
        for raw, aged in raws:
            pkt = assemble(raw, ctx, aged=aged)
            assert fmt(pkt) == output.packet_json(assemble(raw, ctx, aged=aged)).encode()
    held = sum(len(meta.texts) for _shape, meta in fmt._shapes.values())
    assert 0 < held <= 3 and held == fmt._n_texts
    assert fmt.misses > 3                       # more kinds than room: compiled again after a clear


def test_live_json_lines_fill_id_times_and_wall_clock_without_a_general_pick():
    # pkttrace's own JSON lines (the wall clock known): "id", the stages'
    # times (a hook and its table share one), "time_ns" last -- the fill
    # made for them, not the pick from every value (which packets linked to
    # others, e.g. an ICMP error to its cause, take)
    from tracer import layout, templates
    ctx, raws = _recorded()
    ctx.boot_wall_ns = 1_764_672_000_123_456_789
    fmt = output.Templates(output.packet_json, str, as_bytes=True)
    for raw, aged in raws:
        if raw[layout.LINKS_OFF:layout.LINKS_OFF + 32] == bytes(32):
            fmt(assemble(raw, ctx, aged=aged))
    picks = [t[1] for _s, meta in fmt._shapes.values() for t in meta.texts.values()]
    assert picks and all(p.__class__ is tuple and p[0] is templates._ID_SOME_TIMES_WALL for p in picks)
