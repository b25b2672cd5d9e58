"""pkttrace as a Python library: read a recording, or trace live, and get
typed packets.

    import tracer

    for p in tracer.read("trace.jsonl", tracer.Filter(proto=17)):
        if p.fate == "dropped":
            print(p.id, p.drop["stage"], p.drop["table"])

    with tracer.trace(netns=["router"], filter=tracer.Filter.parse(port="53")) as live:
        for p in live.packets(count=10):
            print(p.to_json())

The command line is built on these (`pkttrace replay` on read(), `pkttrace`
on trace()); filters are the objects the command line builds from its
options, with the same meaning: a packet matches if it matched at any stage
of its path.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO

from .filters import FilterError, PacketFilter
from .model import Drop, Packet, Stage, TableStep
from .recording import Cut, RecordingError, replay
from .collector import Counters
from .session import TraceError, TraceOptions, Tracer

Filter = PacketFilter

__all__ = ["Counters", "Cut", "Drop", "Filter", "FilterError", "Packet", "RecordingError", "Stage", "TableStep",
           "TraceError", "TraceOptions", "Tracer", "read", "start", "trace"]


def read(source: str | os.PathLike | IO, filter: Filter | None = None, cut: Cut | None = None) -> Iterator[Packet]:
    """The packets of a recording (`pkttrace --record FILE`), in the order
    they ended, that match `filter`.

    `source` is a path ("-" is not special here) or an open file, text or
    binary.  RecordingError, naming the line, for anything that is not a
    recording; a last line cut short (the tracer was killed) is skipped and
    described in `cut` if one is given."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from read(f, filter, cut)
        return
    for pkt in replay(source, cut):
        if filter is None or filter.matches(pkt):
            yield pkt


def trace(netns: list[str | None] | None = None, filter: Filter | None = None, **options) -> Tracer:
    """A live trace, started: use it as a context manager (it detaches
    everything on exit) and iterate `packets(count=, duration=)`.

    `netns`: the namespaces to trace (None: the current one); `options`:
    the other fields of TraceOptions (tc, backend, age_after, ...).  Needs
    root (CAP_BPF, CAP_NET_ADMIN); TraceError says why it cannot start."""
    return start(TraceOptions(netns=list(netns) if netns else [None], filter=filter or Filter(), **options))


def start(opts: TraceOptions) -> Tracer:
    """trace() from a whole TraceOptions (what the command line builds)."""
    return Tracer(opts).start()
