"""Helpers for tests that trace a real lab with real BPF programs."""
from __future__ import annotations

import time

import pytest

from tracer.filters import PacketFilter
from tracer.session import TraceOptions, Tracer


class Capture:
    """A running Tracer on the lab router and the packets it reported."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.packets = []
        # the stages that mark the receive and the hand-over to a device:
        # tc observers where the kernel lets tc programs name their packet
        # (6.2+), else the netif_receive_skb / net_dev_queue tracepoints
        self.rx, self.tx = ("tc_ingress", "tc_egress") if tracer.plan.tc else ("rx", "tx")

    def until(self, pred, timeout: float = 5.0):
        """Poll until some packet satisfies pred; returns it (or fails the test)."""
        deadline = time.monotonic() + timeout
        while True:
            for p in self.packets:
                if pred(p):
                    return p
            if time.monotonic() > deadline:
                summary = [(p.fate, p.family, p.proto, p.src, p.dst, p.dport, p.stage_names())
                           for p in self.packets]
                pytest.fail(f"no matching packet within {timeout}s; saw: {summary}")
            self.packets.extend(self.tracer.poll(0.1))

    def settle(self, seconds: float = 0.5):
        """Collect everything that ends within `seconds` (for negative checks)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.packets.extend(self.tracer.poll(0.1))
        return self.packets


@pytest.fixture
def trace(lab):
    """trace(**TraceOptions fields) -> Capture on the lab router, closed after the test."""
    started = []

    def start(**kw):
        kw.setdefault("netns", [lab.router])
        kw.setdefault("filter", PacketFilter())
        t = Tracer(TraceOptions(**kw)).start()
        started.append(t)
        return Capture(t)

    yield start
    for t in started:
        t.close()
