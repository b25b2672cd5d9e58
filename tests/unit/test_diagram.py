"""The packet-flow drawing (tracer/diagram.py): `pkttrace diagram` on
recorded packets, and the counters -> boxes/edges computation of the page."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

import pytest

import tracer
from tracer import cli, diagram

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")
SVG = "{http://www.w3.org/2000/svg}"


def draw(tmp_path, *args) -> ET.Element:
    out = tmp_path / "out.svg"
    assert cli.run(["diagram", "-r", DATA, *args, "-o", str(out)]) == 0
    return ET.parse(out).getroot()


def classes(root: ET.Element, kind: str) -> dict[str, set[str]]:
    """id (without the kind- prefix) -> classes, of the boxes or edges."""
    return {el.get("id")[len(kind) + 1:]: set(el.get("class", "").split())
            for el in root.iter() if (el.get("id") or "").startswith(kind + "-")}


def texts(root: ET.Element, box: str) -> list[str]:
    g = next(el for el in root.iter(SVG + "g") if el.get("id") == f"box-{box}")
    return ["".join(t.itertext()) for t in g.iter(SVG + "text")]


def test_a_forwarded_packet_lights_its_stages_and_edges(tmp_path):
    # #1024: udp to 5001, marked 0x1 in PREROUTING's mangle, policy-routed by table 100 out of rs2
    root = draw(tmp_path, "--packet", "1024")
    boxes = classes(root, "box")
    on = {b for b, c in boxes.items() if "on" in c}
    assert on == {"ingress", "prerouting", "route", "forward", "postrouting", "egress", "tx"}
    assert not any("dropped" in c for c in boxes.values())
    edges = {e for e, c in classes(root, "edge").items() if "on" in c}
    assert edges == {"ingress-prerouting", "prerouting-route", "route-forward", "forward-postrouting",
                     "postrouting-egress", "egress-tx"}
    pre = texts(root, "prerouting")
    assert [t for t in pre if t.startswith("· ")] == ["· conntrack accept", "· mangle accept", "· nat accept"]
    assert "↳ mark 0x0→0x1" in pre
    assert any("table 100" in t for t in texts(root, "route"))
    assert "FORWARDED" in "".join(root.find(f"{SVG}text[@id='caption']").itertext())


def test_a_dropped_packet_shows_where_and_why(tmp_path):
    # #4609: udp to 5009, dropped by the filter table of FORWARD
    root = draw(tmp_path, "--proto", "udp", "--port", "5009")
    boxes = classes(root, "box")
    assert {b for b, c in boxes.items() if "on" in c} == {"ingress", "prerouting", "route", "forward"}
    assert "dropped" in boxes["forward"] and "dropped" in boxes["drop"]
    assert "on" not in boxes["postrouting"]
    assert "· filter DROP" in texts(root, "forward")
    drop = texts(root, "drop")
    assert "dropped: NETFILTER_DROP" in drop and "in filter forward" in drop
    assert any(t.startswith("at nft_do_chain+") for t in drop)


def test_a_port_forwarded_packet_shows_the_nat_rewrite(tmp_path):
    root = draw(tmp_path, "--proto", "udp", "--port", "8080")     # #2816: DNAT in PREROUTING's nat
    pre = texts(root, "prerouting")
    i = pre.index("· nat accept")
    assert pre[i + 1:i + 3] == ["↳ dst 10.71.1.1:8080", "→ 10.71.2.2:5002"]


def test_a_locally_generated_packet_starts_at_the_local_process(tmp_path):
    root = draw(tmp_path, "--packet", "1536")        # sent, rerouted after OUTPUT's mangle set the mark
    edges = {e for e, c in classes(root, "edge").items() if "on" in c}
    assert edges == {"local-route_out", "route_out-output", "output-reroute", "reroute-postrouting",
                     "postrouting-egress", "egress-tx"}


def test_a_pcapng_file_written_by_w_draws_the_same(tmp_path):
    pcap = tmp_path / "t.pcapng"
    assert cli.run(["-r", DATA, "-w", str(pcap)]) == 0
    a, b = tmp_path / "a.svg", tmp_path / "b.svg"
    assert cli.run(["diagram", "-r", str(pcap), "--packet", "4609", "-o", str(a)]) == 0
    assert cli.run(["diagram", "-r", DATA, "--packet", "4609", "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_the_readmes_drawing_is_current():
    """docs/diagram-drop.svg, shown in the README: `pkttrace diagram -r
    tests/data/lab-demo.jsonl --proto udp --port 5009 -o docs/diagram-drop.svg`."""
    p = next(tracer.read(DATA, tracer.Filter.parse(proto="udp", port="5009")))
    with open(os.path.join(os.path.dirname(DATA), "..", "..", "docs", "diagram-drop.svg")) as f:
        assert f.read() == diagram.packet_svg(p)


def test_names_from_the_host_are_escaped(tmp_path):
    p = next(tracer.read(DATA, tracer.Filter.parse(port="5009")))
    p.path[-2].tables[0].table = "<script>alert(1)</script>&"
    svg = diagram.packet_svg(p)
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    ET.fromstring(svg)                     # still well-formed


@pytest.mark.parametrize("args,line", [
    (["-r", "/nonexistent/rec.jsonl", "-o", "{tmp}/x.svg"], "No such file"),
    (["-r", DATA, "--packet", "99", "-o", "{tmp}/x.svg"], "no packet #99 in"),
    (["-r", DATA, "--port", "4444", "-o", "{tmp}/x.svg"], "no packet that matches the filters"),
    (["-r", __file__, "-o", "{tmp}/x.svg"], "neither a pcap-ng file"),
    (["-o", "{tmp}/x.svg"], "which recording?"),
    (["-r", DATA], "where to?"),
])
def test_bad_input_is_one_line(capsys, tmp_path, args, line):
    status = cli.run(["diagram", *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and line in err
    assert not (tmp_path / "x.svg").exists()


# ---- counters -> boxes and edges (the page) --------------------------------


@dataclass
class PL:
    """The fields of exporter.PathLabels flow() reads."""
    stages: tuple[str, ...]
    fate: str
    netns: str = "r"
    family: str = "ipv4"
    tables: list[tuple] = field(default_factory=list)
    drop: tuple | None = None


@dataclass
class Snap:
    t: float
    paths: list
    drops: Counter
    registered: dict


FWD = ("tc_ingress", "prerouting", "route", "forward", "postrouting", "tc_egress", "tx")


def snapshot() -> Snap:
    dropped = PL(("tc_ingress", "prerouting", "route", "forward", "drop"), "dropped",
                 tables=[("prerouting", "mangle")], drop=("NETFILTER_DROP", "forward", "filter"))
    return Snap(10.0, [
        (PL(FWD, "forwarded", tables=[("prerouting", "mangle"), ("forward", "filter")]), 7),
        (dropped, 5),
        (PL(dropped.stages, "dropped", family="ipv6", drop=dropped.drop), 1),
        (PL(("tc_ingress", "prerouting", "route", "input", "deliver"), "delivered"), 3),
        (PL(("route", "output", "reroute", "postrouting", "tc_egress", "tx"), "sent"), 2),
        (PL(("output", "postrouting", "tx"), "sent"), 1),                   # no tc, no route seen
        (PL(("tc_ingress", "tc_egress", "tx"), "redirected"), 4),           # no edge drawn for it
        (PL(FWD, "forwarded", netns="other"), 100),                          # another netns
    ], Counter({("r", "ipv4", "NETFILTER_DROP", "forward", "filter"): 5,
                ("r", "ipv6", "NETFILTER_DROP", "forward", "filter"): 1,
                ("r", "ipv4", "NO_SOCKET", "(overflow)", "(overflow)"): 2,
                ("other", "ipv4", "NOT_SPECIFIED", "route", ""): 9}),
        {"r": {"prerouting": [("mangle", -150), ("conntrack", -200)], "forward": [("filter", 0)]}})


def test_flow_counts_boxes_edges_tables_and_drops_of_one_netns():
    f = diagram.flow(snapshot(), "r")
    assert f["netns"] == ["other", "r"] and f["selected"] == "r" and f["t"] == 10.0
    b = {k: v["packets"] for k, v in f["boxes"].items()}
    assert b["ingress"] == 7 + 5 + 1 + 3 + 4 and b["prerouting"] == 16 and b["forward"] == 13
    assert b["postrouting"] == 7 + 2 + 1 and b["tx"] == 7 + 2 + 1 + 4 and b["local"] == 3 + 2 + 1
    assert b["route_out"] == 2 and b["reroute"] == 2 and b["output"] == 3
    e = f["edges"]
    assert e["route>forward"] == 13 and e["forward>postrouting"] == 7 and e["route>input"] == 3
    assert e["input>local"] == 3 and e["local>route_out"] == 2 and e["local>output"] == 1
    assert e["output>reroute"] == 2 and e["output>postrouting"] == 1 and e["postrouting>tx"] == 1
    assert e["postrouting>egress"] == 2 + 7 and e["egress>tx"] == 13
    assert f["other"] == {"ingress>egress": 4}
    assert f["fates"] == {"forwarded": 7, "dropped": 6, "delivered": 3, "sent": 3, "redirected": 4}
    # drops: in the box of their stage, both families on one row; those on no counted path
    # (the path map was full) only in the drop box
    assert f["boxes"]["forward"]["drops"] == 6 and f["boxes"]["drop"]["drops"] == 8
    assert [(d["reason"], d["stage"], d["packets"]) for d in f["drops"]] == [
        ("NETFILTER_DROP", "forward", 6), ("NO_SOCKET", "(overflow)", 2)]
    # tables in priority order, as registered, with what came out of each and what each dropped
    assert f["tables"]["prerouting"] == [{"table": "conntrack", "priority": -200, "packets": 0, "drops": 0},
                                         {"table": "mangle", "priority": -150, "packets": 12, "drops": 0}]
    assert f["tables"]["forward"] == [{"table": "filter", "priority": 0, "packets": 7, "drops": 6}]


def test_a_drop_lands_in_the_box_its_path_says():
    # a locally generated packet refused by routing: the output routing decision, not the input one
    snap = Snap(1.0, [(PL(("route", "drop"), "dropped", drop=("IP_OUTNOROUTES", "route", "")), 2)], Counter(), {})
    f = diagram.flow(snap, "r")
    assert f["boxes"]["route_out"]["drops"] == 2 and f["boxes"]["route"]["drops"] == 0
    assert f["drops"] == [{"reason": "IP_OUTNOROUTES", "stage": "route", "table": "", "box": "route_out",
                           "packets": 2}]


def test_the_page_svg_has_an_element_for_every_value_flow_gives():
    f = diagram.flow(snapshot(), "r")
    root = ET.fromstring(diagram.render(diagram.rows_of(f)))
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    for box in f["boxes"]:
        assert {f"box-{box}", f"rate-{box}", f"drop-{box}"} <= ids
    for key in f["edges"]:
        assert {f"edge-{key.replace('>', '-')}", f"el-{key.replace('>', '-')}"} <= ids
    for hook, rows in f["tables"].items():
        assert {f"tv-{hook}-{i}" for i in range(len(rows))} <= ids
    assert root.get("data-layout") == f["layout"]
    # another ruleset, another layout: the page fetches the drawing again
    snap = snapshot()
    snap.registered["r"]["input"] = [("filter", 0)]
    assert diagram.flow(snap, "r")["layout"] != f["layout"]


def test_boxes_of_a_path():
    assert diagram.boxes_of(["rx", "prerouting", "route", "forward", "postrouting", "tx"]) == (
        ["ingress", "prerouting", "route", "forward", "postrouting", "tx"], None)
    # died in ip_forward before FORWARD's first table: in forward's processing
    assert diagram.boxes_of(["tc_ingress", "prerouting", "route", "drop"], "forward") == (
        ["ingress", "prerouting", "route", "forward"], "forward")
    assert diagram.boxes_of(["route", "drop"], "route") == (["local", "route_out"], "route_out")
    assert diagram.boxes_of(["tc_ingress", "drop"], "tc_ingress") == (["ingress"], "ingress")
