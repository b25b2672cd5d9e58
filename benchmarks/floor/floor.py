"""The cost floor of a BPF program that does (next to) nothing, per attach
kind pkttrace uses, on this machine.

    .venv/bin/python -m benchmarks.floor.floor [--rounds 5] [--duration 3]

Programs (floor.bpf.c, built here with bpf/Makefile's flags):
  floor_rx    tp_btf/netif_receive_skb, empty (fires in every netns)
  floor_napi  tp_btf/napi_poll, one per-CPU array lookup + compare, no skb
  floor_nf    netfilter link, returns NF_ACCEPT
  floor_tcx   TCX ingress on the router's ingress device, returns TCX_NEXT

Measured two ways, in the lab ptfloor (client -> router -> server netns, no
rules), under an iperf3 UDP 64-byte flood client -> server:

1. Forwarded-packet rate (kernel.bpf_stats_enabled off): server-received
   packets / s with programs attached vs none.  Configs, each alternated
   with the baseline A, several rounds, medians and ratios to A's median:
     A  nothing attached
     B  floor_nf at 7 netfilter hooks in the router (PREROUTING -300, -250,
        -199, FORWARD -1, 1, POSTROUTING 99, 101: 7 runs per packet)
     C  floor_nf at PREROUTING -300 only
     D  floor_rx
     E  floor_tcx on the router's ingress device (rc)
   With no iptables/nft tables in the router, a netfilter link also turns on
   the hook machinery (nf_hook_slow) itself: B and C include that.
2. kernel.bpf_stats_enabled=1 (restored afterwards): run_time_ns/run_cnt of
   each program (bpftool -j prog show) with everything attached, and runs
   per forwarded packet.  This is the time between the two clock reads
   around the program only: dispatch (trampoline, nf_hook_slow, tcx loop)
   is not in it, the stats' own clock reads partly are.

"implied ns/run" = (1/pps_X - 1/pps_A) / (runs per packet): what one run
costs the forwarding CPU, dispatch included, if that CPU is the bottleneck.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tracer import libbpf, netns  # noqa: E402
from tracer.lab import Lab  # noqa: E402
from benchmarks.run import BenchError, iperf_trial  # noqa: E402  (the harness's iperf3 trial)

SRC = HERE / "floor.bpf.c"
OBJ = HERE / "floor.bpf.o"
CFLAGS = ["-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
          "-Wno-unused-function", f"-I{REPO / 'bpf' / 'include'}", f"-I{REPO / 'bpf'}"]
LAB_PREFIX, LAB_NET_ID = "ptfloor", 63
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"
PROGS = ("floor_rx", "floor_napi", "floor_nf", "floor_tcx")
NFPROTO_IPV4 = 2
PRE, FWD, POST = 0, 2, 4
NF_SLOTS_7 = ((PRE, -300), (PRE, -250), (PRE, -199), (FWD, -1), (FWD, 1), (POST, 99), (POST, 101))
NF_SLOTS_1 = ((PRE, -300),)
CONFIGS = {
    "A": "baseline, nothing attached",
    "B": "7 x netfilter (PRE -300,-250,-199, FWD -1,1, POST 99,101)",
    "C": "1 x netfilter (PRE -300)",
    "D": "tp_btf/netif_receive_skb empty",
    "E": "tcx ingress on rc, TCX_NEXT",
}


FloorError = BenchError


def build() -> Path:
    if not OBJ.exists() or OBJ.stat().st_mtime < SRC.stat().st_mtime:
        subprocess.run(["clang", *CFLAGS, "-c", str(SRC), "-o", str(OBJ)], check=True)
    return OBJ


# ---- traffic -----------------------------------------------------------------

def flood(lab: Lab, duration: float) -> dict:
    """One UDP 64 B flood client -> server (the harness's own trial); what
    the server received."""
    r = iperf_trial(lab, "udp", duration)
    return {"pps": r["value"], "delivered": r["delivered"], "sent": r["sent"]}


# ---- programs and links --------------------------------------------------------

class Floor:
    """The loaded object and whatever is attached now (all fd-owned)."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.obj = libbpf.BpfObject(str(build()))
        self.obj.program("floor_nf").set_type(libbpf.BPF_PROG_TYPE_NETFILTER, libbpf.BPF_NETFILTER)
        self.obj.load()
        self.fd = {p: self.obj.program(p).fd for p in PROGS}
        self.ids = {p: libbpf.prog_id_name(fd)[0] for p, fd in self.fd.items()}
        self.rc_index = netns.ifindex(lab.router, "rc")
        self.link_fds: list[int] = []
        self.tp_links: list[libbpf.Link] = []

    def attach_nf(self, slots) -> None:
        with netns.entered(self.lab.router):   # netfilter links bind to the caller's netns
            for hook, prio in slots:
                self.link_fds.append(libbpf.link_netfilter(self.fd["floor_nf"], NFPROTO_IPV4, hook, prio))

    def attach_tcx(self) -> None:
        with netns.entered(self.lab.router):
            self.link_fds.append(libbpf.link_tcx(self.fd["floor_tcx"], self.rc_index,
                                                 libbpf.BPF_TCX_INGRESS, libbpf.BPF_F_BEFORE))

    def attach_tp(self, prog: str) -> None:
        self.tp_links.append(self.obj.program(prog).attach())

    def config(self, name: str) -> None:
        self.detach()
        if name == "B":
            self.attach_nf(NF_SLOTS_7)
        elif name == "C":
            self.attach_nf(NF_SLOTS_1)
        elif name == "D":
            self.attach_tp("floor_rx")
        elif name == "E":
            self.attach_tcx()
        elif name == "all":
            self.attach_nf(NF_SLOTS_7)
            self.attach_tp("floor_rx")
            self.attach_tp("floor_napi")
            self.attach_tcx()

    def detach(self) -> None:
        while self.link_fds:
            os.close(self.link_fds.pop())
        while self.tp_links:
            self.tp_links.pop().close()

    def close(self) -> None:
        self.detach()
        self.obj.close()


def prog_stats(ids: dict[str, int]) -> dict[str, tuple[int, int]]:
    res = subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True)
    by_id = {p["id"]: p for p in json.loads(res.stdout)}
    return {name: (by_id[i].get("run_time_ns", 0), by_id[i].get("run_cnt", 0)) for name, i in ids.items()}


class StatsOn:
    """kernel.bpf_stats_enabled=1 for the block; the old value back after."""

    def __enter__(self):
        with open(BPF_STATS) as f:
            self.before = f.read().strip()
        with open(BPF_STATS, "w") as f:
            f.write("1")
        return self

    def __exit__(self, *exc):
        with open(BPF_STATS, "w") as f:
            f.write(self.before)


# ---- the runs ----------------------------------------------------------------

def pps_pass(fl: Floor, lab: Lab, rounds: int, duration: float, log) -> dict[str, list]:
    samples: dict[str, list] = {k: [] for k in CONFIGS}
    paired: dict[str, list] = {k: [] for k in CONFIGS if k != "A"}
    others = [k for k in CONFIGS if k != "A"]
    for r in range(rounds):
        order = others[r % len(others):] + others[:r % len(others)]
        for k in order:
            fl.config("A")
            a = flood(lab, duration)["pps"]
            fl.config(k)
            x = flood(lab, duration)["pps"]
            fl.detach()
            samples["A"].append(a)
            samples[k].append(x)
            paired[k].append(x / a)
            log(f"round {r + 1}: A {a:,.0f}  {k} {x:,.0f}  ({x / a:.3f})")
    return {"samples": samples, "paired": paired}


def stats_pass(fl: Floor, lab: Lab, rounds: int, duration: float, log) -> dict[str, dict]:
    fl.config("all")
    per: dict[str, dict[str, list]] = {p: {"ns_per_run": [], "runs_per_pkt": []} for p in PROGS}
    try:
        with StatsOn():
            for r in range(rounds):
                before = prog_stats(fl.ids)
                res = flood(lab, duration)
                after = prog_stats(fl.ids)
                for p in PROGS:
                    dt, dc = after[p][0] - before[p][0], after[p][1] - before[p][1]
                    if dc:
                        per[p]["ns_per_run"].append(dt / dc)
                    per[p]["runs_per_pkt"].append(dc / max(res["delivered"], 1))
                log(f"stats round {r + 1}: " + ", ".join(
                    f"{p} {per[p]['ns_per_run'][-1] if per[p]['ns_per_run'] else float('nan'):.1f} ns"
                    f" x{per[p]['runs_per_pkt'][-1]:.2f}" for p in PROGS))
    finally:
        fl.detach()
    return {p: {k: statistics.median(v) if v else None for k, v in d.items()} for p, d in per.items()}


def verify(ids: dict[str, int], lab: Lab) -> list[str]:
    problems = []
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout or "[]")
    mine = set(ids.values())
    problems += [f"link {ln['id']} still runs prog {ln.get('prog_id')}" for ln in links if ln.get("prog_id") in mine]
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                      text=True, check=True).stdout or "[]")
    problems += [f"prog {p['id']} {p['name']} still loaded" for p in progs if p.get("name", "").startswith("floor_")]
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    problems += [f"netns {ln.split()[0]} left" for ln in ns.splitlines() if ln.startswith(LAB_PREFIX)]
    with open(BPF_STATS) as f:
        problems += [] if f.read().strip() == STATS_AT_START else ["bpf_stats_enabled not restored"]
    return problems


STATS_AT_START = ""


def main() -> int:
    global STATS_AT_START
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stats-rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--json", default="/tmp/floor-results.json", help="results file (default %(default)s)")
    args = ap.parse_args()

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with open(BPF_STATS) as f:
        STATS_AT_START = f.read().strip()
    t0 = time.monotonic()
    lab = Lab(LAB_PREFIX, LAB_NET_ID)
    fl = None
    ids: dict[str, int] = {}
    try:
        lab.down()
        lab.up(rules=False)
        fl = Floor(lab)
        ids = dict(fl.ids)
        pps = pps_pass(fl, lab, args.rounds, args.duration, log)
        stats = stats_pass(fl, lab, args.stats_rounds, args.duration, log)
    finally:
        if fl is not None:
            fl.close()
        lab.down()
    elapsed = time.monotonic() - t0

    med = {k: statistics.median(v) for k, v in pps["samples"].items()}
    runs = {"B": stats["floor_nf"]["runs_per_pkt"], "C": stats["floor_nf"]["runs_per_pkt"] / 7,
            "D": stats["floor_rx"]["runs_per_pkt"], "E": stats["floor_tcx"]["runs_per_pkt"]}
    rows = []
    print(f"{'cfg':<4}{'what':<58}{'median pps':>12}{'ratio':>8}{'paired':>8}{'runs/pkt':>9}{'impl ns/run':>12}")
    for k, what in CONFIGS.items():
        ratio = med[k] / med["A"]
        pr = statistics.median(pps["paired"][k]) if k != "A" else 1.0
        rp = runs.get(k)
        impl = (1 / med[k] - 1 / med["A"]) * 1e9 / rp if rp else None
        rows.append({"config": k, "what": what, "median_pps": med[k], "ratio": ratio, "paired_ratio": pr,
                     "runs_per_pkt": rp, "implied_ns_per_run": impl, "samples": pps["samples"][k]})
        print(f"{k:<4}{what:<58}{med[k]:>12,.0f}{ratio:>8.3f}{pr:>8.3f}"
              f"{'' if rp is None else f'{rp:.2f}':>9}{'' if impl is None else f'{impl:.1f}':>12}")
    print("\nbpf_stats_enabled=1, everything attached (medians):")
    for p, d in stats.items():
        ns = "n/a" if d["ns_per_run"] is None else f"{d['ns_per_run']:.1f}"
        print(f"  {p:<11} {ns:>7} ns/run   {d['runs_per_pkt']:.3f} runs per forwarded packet")
    for _ in range(50):   # programs are freed after an RCU grace period
        problems = verify(ids, lab)
        if not problems:
            break
        time.sleep(0.1)
    print("\ncleanup: " + ("ok (no links, programs, namespaces left; bpf_stats_enabled restored)"
                           if not problems else "; ".join(problems)))
    print(f"elapsed {elapsed:.0f} s")
    Path(args.json).write_text(json.dumps({"rows": rows, "stats": stats, "paired": pps["paired"],
                                           "elapsed_s": elapsed, "args": vars(args)}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
