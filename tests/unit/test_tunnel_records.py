"""Tunnel links in kernel records (built with the ctypes mirror): decoded to
JSON, rendered through the templates, kept by recordings, and printed with
the outer packet under the one it carries."""
from __future__ import annotations

import io
import json

from tracer import events, output
from tracer.events import Fate, StageKind
from tracer.model import packet_json
from tracer.output import OUTER_INDENT, Printer, format_json, format_packet
from tracer.paths import Context, assemble
from tracer.recording import Recorder, replay

NS, RC, RS, VX = 4026532000, 2, 3, 9


def ctx() -> Context:
    return Context(ifnames={(NS, RC): "rc", (NS, RS): "rs", (NS, VX): "vx0"}, netns_names={NS: "rtr"},
                   if_kinds={(NS, VX): "vxlan"})


def record(rid: int, proto: int, src: list, dst: list, stages: list[tuple], fate: Fate, **links) -> events.PtRecord:
    """stages: (kind, t_ns, ifindex)."""
    rec = events.PtRecord()
    rec.id, rec.netns, rec.family, rec.proto, rec.fate = rid, NS, 4, proto, fate
    rec.saddr[:4], rec.daddr[:4] = src, dst
    if proto == 17:
        rec.sport, rec.dport = 40000, 4789
    rec.first_ts = 1_000_000
    rec.path_sig = 0x4321 + len(stages) + fate + proto
    rec.n_stages = len(stages)
    for i, (kind, t, ifx) in enumerate(stages):
        s = rec.stages[i]
        s.kind, s.ts, s.ifindex, s.family = kind, 1_000_000 + t, ifx, 4
    rec.in_ifindex, rec.out_ifindex = stages[0][2], stages[-1][2]
    for k, v in links.items():
        setattr(rec, k, v)
    return rec


def payload(rid: int, encap: int) -> events.PtRecord:
    return record(rid, 1, [10, 0, 1, 2], [10, 0, 77, 2],
                  [(StageKind.TC_INGRESS, 0, RC), (StageKind.FORWARD, 1_000, VX), (StageKind.TC_EGRESS, 2_000, VX)],
                  Fate.ENCAPSULATED, encap=encap, tun_ifindex=VX)


def outer(rid: int, inner: int) -> events.PtRecord:
    return record(rid, 17, [10, 0, 2, 1], [10, 0, 2, 2],
                  [(StageKind.OUTPUT, 3_000, RS), (StageKind.POSTROUTING, 4_000, RS), (StageKind.TX, 5_000, RS)],
                  Fate.SENT, inner=inner, tun_ifindex=VX)


def test_links_and_tunnel_in_json():
    c = ctx()
    p, o = json.loads(packet_json(assemble(payload(256, 512), c))), json.loads(packet_json(assemble(outer(512, 256), c)))
    assert (p["fate"], p["encap"], p["tunnel"]) == ("encapsulated", 512, {"dev": "vx0", "kind": "vxlan"})
    assert "inner" not in p and "decap" not in p and p.get("end") == "encapsulated"
    assert (o["fate"], o["inner"], o["tunnel"]) == ("sent", 256, {"dev": "vx0", "kind": "vxlan"})


def test_no_tunnel_device_is_xfrm():
    rec = outer(512, 256)
    rec.proto, rec.tun_ifindex = 50, RS     # ESP, left by a plain device: an xfrm policy's
    assert json.loads(packet_json(assemble(rec, ctx())))["tunnel"] == {"kind": "xfrm"}


def test_ipv6_extension_headers_are_named():
    rec = record(1, 58, [0] * 4, [0] * 4, [(StageKind.OUTPUT, 0, RS)], Fate.SENT)
    rec.family, rec.ext_hdrs = 6, events.EXT_HOP | events.EXT_DEST
    p = assemble(rec, ctx())
    assert json.loads(packet_json(p))["ext_hdrs"] == ["hop-by-hop", "dstopts"]
    assert "ext hop-by-hop,dstopts" in format_packet(p).splitlines()[0]


def test_templates_fill_each_packets_own_link_ids():
    """Packets of one shape share a template: the tunnel ids are holes,
    filled with each packet's own (as the renderer writes them)."""
    c = ctx()
    for render, direct in ((format_json, packet_json), (format_packet, output._format_packet)):
        hits = render.hits
        for rid in (256, 1280, 99999):
            for p in (assemble(payload(rid, rid + 256), c), assemble(outer(rid + 256, rid), c)):
                assert render(p) == direct(assemble(bytes(p._raw), c))
        assert render.hits - hits == 4      # the second and third of each shape came from its template


def test_the_outer_packet_is_printed_under_the_payload_indented():
    c = ctx()
    text = format_packet(assemble(outer(512, 256), c))
    assert all(line.startswith(OUTER_INDENT) for line in text.splitlines())
    assert "outer packet of #256 (vxlan vx0)" in text.splitlines()[0]
    assert "⇒ encapsulated in #512 (vxlan vx0)" in format_packet(assemble(payload(256, 512), c))


def test_a_decapsulated_outer_packet_waits_for_its_payload():
    """It ends first (the payload is still on its way): the human view
    prints the payload, then the outer packet under it."""
    c = ctx()
    back = record(768, 17, [10, 0, 2, 2], [10, 0, 2, 1],
                  [(StageKind.TC_INGRESS, 0, RS), (StageKind.INPUT, 1_000, RS)], Fate.DECAPSULATED,
                  inner=1024, tun_ifindex=VX)
    reply = record(1024, 1, [10, 0, 77, 2], [10, 0, 1, 2],
                   [(StageKind.TC_INGRESS, 2_000, VX), (StageKind.TX, 3_000, RC)], Fate.FORWARDED,
                   decap=768, tun_ifindex=VX)
    other = record(5, 1, [10, 0, 1, 2], [10, 0, 2, 2], [(StageKind.TX, 0, RS)], Fate.SENT)
    out = io.StringIO()
    pr = Printer(out, as_json=False)
    pr.packet(assemble(back, c))
    assert out.getvalue() == ""
    pr.packet(assemble(other, c))
    pr.packet(assemble(reply, c))
    heads = [b.splitlines()[0] for b in out.getvalue().split("\n\n") if b.strip()]
    assert [h.split()[0] for h in heads] == ["#5", "#1024", "#768"]
    assert heads[2].startswith(OUTER_INDENT) and "decapsulated from #768" in heads[1]


def test_an_outer_packet_whose_payload_never_came_is_printed_at_the_end():
    c = ctx()
    back = record(768, 17, [10, 0, 2, 2], [10, 0, 2, 1], [(StageKind.INPUT, 1_000, RS)], Fate.DECAPSULATED,
                  inner=1024, tun_ifindex=VX)
    out = io.StringIO()
    pr = Printer(out, as_json=False)
    pr.packet(assemble(back, c))
    assert out.getvalue() == ""
    pr.flush(final=True)
    assert "outer packet of #1024" in out.getvalue()


def test_json_lines_are_never_held():
    back = record(768, 17, [10, 0, 2, 2], [10, 0, 2, 1], [(StageKind.INPUT, 1_000, RS)], Fate.DECAPSULATED,
                  inner=1024, tun_ifindex=VX)
    out = io.StringIO()
    Printer(out, as_json=True).packet(assemble(back, ctx()))
    assert json.loads(out.getvalue())["inner"] == 1024


def test_tunnel_links_and_kinds_survive_a_recording():
    f = io.StringIO()
    rec = Recorder(f, ctx())
    for r in (payload(256, 512), outer(512, 256)):
        rec(bytes(r)[:events.RECORD_HEADER_SIZE + r.n_stages * events.STAGE_SIZE], False)
    p, o = (json.loads(packet_json(x)) for x in replay(io.StringIO(f.getvalue())))
    assert (p["encap"], o["inner"], o["tunnel"]) == (512, 256, {"dev": "vx0", "kind": "vxlan"})


def test_an_outer_packet_that_ends_first_waits_for_its_payload():
    """WireGuard's worker may send the outer packet before the payload's
    hand-over returns: printed under the payload all the same."""
    c = ctx()
    out = io.StringIO()
    pr = Printer(out, as_json=False)
    pr.packet(assemble(outer(512, 256), c))
    assert out.getvalue() == ""
    pr.packet(assemble(payload(256, 512), c))
    heads = [b.splitlines()[0] for b in out.getvalue().split("\n\n") if b.strip()]
    assert [h.split()[0] for h in heads] == ["#256", "#512"] and heads[1].startswith(OUTER_INDENT)
    # the usual order: printed as it comes
    pr.packet(assemble(payload(1024, 1280), c))
    pr.packet(assemble(outer(1280, 1024), c))
    heads = [b.splitlines()[0] for b in out.getvalue().split("\n\n") if b.strip()]
    assert [h.split()[0] for h in heads] == ["#256", "#512", "#1024", "#1280"]
