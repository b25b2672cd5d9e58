"""BPF time per program under a UDP flood: where a traced packet's cost goes.

    python -m benchmarks.probe_cost [all|nomatch|nomatch-expr|count|serve] [--duration S]

Modes: all (every packet followed and emitted, as `pkttrace` with no
filter), nomatch and nomatch-expr (a filter matching nothing, as options
and as an expression), count (every packet followed, nothing emitted or
counted: the following alone), serve (every packet followed and counted by
path and drop reason, as `pkttrace serve`).

Turns kernel.bpf_stats_enabled on for the run (and back off), floods UDP
64 B through its own lab router with iperf3, and prints run count and mean
run time of each pkttrace program (bpftool prog show: run_time_ns/run_cnt).
The per-program numbers include the stats' own overhead (~20-30 ns a run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from benchmarks.run import bpf_prog_times
from tracer.filters import PacketFilter, parse_cidr
from tracer.lab import Lab
from tracer.session import TraceOptions, Tracer

STATS = "/proc/sys/kernel/bpf_stats_enabled"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="all", choices=("all", "nomatch", "nomatch-expr", "count", "serve"))
    ap.add_argument("--duration", type=int, default=3)
    args = ap.parse_args()
    lab = Lab("ptcost", 62)
    lab.up(rules=True)
    with open(STATS) as f:
        stats_before = f.read().strip()
    try:
        with open(STATS, "w") as f:
            f.write("1")
        flt = {"nomatch": PacketFilter(dst=parse_cidr("192.0.2.1/32")),
               # the same criterion as a tcpdump expression: the interpreter's cost
               "nomatch-expr": PacketFilter(expression="dst host 192.0.2.1")}.get(args.mode, PacketFilter())
        with Tracer(TraceOptions(netns=[lab.router], filter=flt, emit=args.mode not in ("count", "serve"),
                                 count=args.mode == "serve")) as t:
            srv = subprocess.Popen(["ip", "netns", "exec", lab.server, "iperf3", "-s", "-1", "-B",
                                    lab.addr["server4"]], stdout=subprocess.DEVNULL)
            time.sleep(0.5)  # iperf3 retries its connect; a slow listener costs nothing here
            cli = subprocess.Popen(["ip", "netns", "exec", lab.client, "iperf3", "-u", "-l", "64", "-b", "0",
                                    "-t", str(args.duration), "-c", lab.addr["server4"], "-J"],
                                   stdout=subprocess.PIPE)
            while cli.poll() is None:
                t.poll(0.05)
            out = json.loads(cli.stdout.read())
            srv.wait(10)
            # this session's programs: not those of another pkttrace on the host
            progs = bpf_prog_times(os.getpid())
            print(f"mode {args.mode}: {out['end']['sum']['packets'] / args.duration:,.0f} UDP pps sent")
            for name, ns, cnt in progs.values():
                if cnt:
                    print(f"  {name:<20} runs {cnt:>10,}  mean {ns / cnt:6.0f} ns")
            print(f"  {t.counters()}")
    finally:
        with open(STATS, "w") as f:
            f.write(stats_before)
        lab.down()


if __name__ == "__main__":
    main()
