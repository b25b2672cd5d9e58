"""EarlyTcx when the wait for its thread is interrupted (Ctrl-C during the
start): close() still waits for the thread and closes every link it made.

No root: the placeholder program, the device list and the TCX links are
stand-ins; what is under test is the hand-over between the two threads.
(tests/integration/test_early_tcx.py covers the real links.)
"""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tracer import libbpf, probes
from tracer.tcobservers import EarlyTcx


class _Link:
    def __init__(self, made: list):
        self.closed = False
        made.append(self)

    def close(self) -> None:
        self.closed = True


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def test_an_interrupted_wait_still_closes_every_link_the_thread_makes(monkeypatch):
    made: list[_Link] = []
    placeholder = os.open(os.devnull, os.O_RDONLY)
    monkeypatch.setattr(libbpf, "load_tc_next", lambda: placeholder)
    monkeypatch.setattr(socket, "if_nameindex", lambda: [(1, "lo"), (2, "r0"), (3, "r1")])

    def slow_attach(prog, ifindex, name, ingress, ns):
        time.sleep(0.04)                 # a link waits for an RCU grace period
        return _Link(made)
    monkeypatch.setattr(probes, "attach_tcx", slow_attach)
    old = signal.signal(signal.SIGALRM, _interrupt)
    try:
        early = EarlyTcx([None])
        with pytest.raises(KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.06)   # Ctrl-C while take() waits
            early.take(None)
        assert len(made) < 6             # (interrupted while the thread still made links)
        early.close()                    # what the session's clean-up does then
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(made) == 6 and all(link.closed for link in made)
    with pytest.raises(OSError):
        os.fstat(placeholder)            # the placeholder closed too
