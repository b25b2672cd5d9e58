"""Count-only tracer: the stand-in for `pkttrace serve` until it exists.

    python -m benchmarks.count_only NETNS [NETNS ...]

Runs the library with ``TraceOptions(emit=False)``: the kernel follows every
packet of the namespaces but writes no record to the ring buffer, so this
is the cost of the probes plus the in-kernel counting a metrics daemon
would pay.  Prints a ready line (containing "tracing") on stderr, ages out
idle in-flight records like a real session, and on SIGTERM/SIGINT prints
pkttrace's summary line plus every counter as JSON.
"""
from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict

from tracer.output import summary
from tracer.session import TraceOptions, Tracer


def main(argv: list[str]) -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    tracer = Tracer(TraceOptions(netns=list(argv) or [None], emit=False))
    tracer.start()
    where = ", ".join(argv) or "current netns"
    print(f"pkttrace count-only: tracing {where} ({len(tracer.attached())} probes, "
          f"ready in {tracer.ready_s * 1000:.0f} ms)", file=sys.stderr, flush=True)
    try:
        while not stop:
            tracer.poll(0.2)  # no ring buffer: sleeps, then ages out idle records
    finally:
        c = tracer.counters()
        tracer.close()
        print(f"pkttrace: {summary(c)}", file=sys.stderr)
        print(f"pkttrace count-only: counters {json.dumps(asdict(c))}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
