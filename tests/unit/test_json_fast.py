"""The per-shape compiled JSON is exactly what Packet.to_json serializes to."""
from __future__ import annotations

import json
import os

import pytest

from tracer import paths
from tracer.recording import replay

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")


def _packets():
    with open(DATA) as f:
        return list(replay(f))


@pytest.mark.parametrize("idx", range(len(_packets())))
def test_compiled_json_equals_to_json(idx):
    fast = paths.packet_json(_packets()[idx])
    slow = _packets()[idx].to_json()  # a fresh packet: built the slow way
    assert json.loads(fast) == slow
    assert "\n" not in fast


def test_every_shape_in_the_fixture_is_compiled():
    pkts = _packets()
    for p in pkts:
        paths.packet_json(p)
    assert all(p._shape.json_tpl is not None for p in pkts if p._shape.template is not None)


def test_hand_built_packets_fall_back_to_to_json():
    p = paths.Packet(1, "", "ipv4", "udp", "10.0.0.1", "10.0.0.2", 1, 2, "sent", None, "eth0",
                     path=[paths.Stage("tx", 0, "eth0", 0)])
    assert json.loads(paths.packet_json(p)) == p.to_json()
