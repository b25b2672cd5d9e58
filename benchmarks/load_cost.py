"""Verifier cost at start: instructions verified per program, and load time.

    python -m benchmarks.load_cost [--mode serve|trace] [--reps N] [--backend B]

Loads the BPF object as a trace session does on this kernel (the backend's
plan decides which programs; the config is serve's counting or the CLI's
emitting), one program after the other in one bpf_object__load, REPS times,
and prints each program's `verified_insns` (from its fd's fdinfo) and the
median load time.  No lab, no attachment: this is the verifier's share of
the start.  $PKTTRACE_BPF_OBJECT picks another object (before/after
comparisons).  Root.
"""
from __future__ import annotations

import argparse
import statistics
import time

from tracer import backends, libbpf, observers
from tracer.events import PtConfig


def _open(plan: backends.Plan, mode: str) -> libbpf.BpfObject:
    obj = libbpf.BpfObject(libbpf.object_path())
    observers.select_programs(obj, plan)     # as the session does
    ptr, _size = obj.map(".rodata").initial_value()
    cfg = PtConfig.from_address(ptr)
    if mode == "serve":
        cfg.count = 1
    else:
        cfg.emit = 1
    return obj


def _verified(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("verified_insns:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("serve", "trace"), default="serve")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    plan = backends.plan(backends.probe(), args.backend)
    times, rows = [], []
    for rep in range(args.reps):
        obj = _open(plan, args.mode)
        try:
            t0 = time.monotonic()
            obj.load()
            times.append(time.monotonic() - t0)
            if rep == args.reps - 1:
                rows = sorted(((_verified(p.fd), p.name) for p in obj.programs() if p.autoload), reverse=True)
        finally:
            obj.close()
    print(f"{libbpf.object_path()} ({args.mode}, backend {plan.netfilter}):")
    for n, name in rows:
        print(f"  {name:22} {n:>10,}")
    print(f"  {'total':22} {sum(n for n, _ in rows):>10,} in {len(rows)} programs")
    print(f"load: median {statistics.median(times):.3f} s of {args.reps} "
          f"({', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
