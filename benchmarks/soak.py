"""`pkttrace serve` left on: its memory over a long run (issue 12: serve
RSS <= 60 MB, flat over an hour).

    python -m benchmarks.soak [--minutes 60] [--pps 20000] [--out DIR]   (root)

The five-second trials of benchmarks.run show serve's peak RSS, not whether
it grows.  Here serve counts for --minutes while the traffic keeps changing,
as on a router left alone:
  - a paced 64-byte UDP flow (iperf3, --pps) through the router, a new
    connection every minute;
  - every second a mixed trickle from the client: UDP to ports spread over
    the whole range (the server answers with ICMP port unreachable, back
    through the router), to port 5009 (dropped in FORWARD), marked port
    5001, to the router itself, over IPv6, TCP connects to closed ports
    (SYN forwarded, RST back) and a ping;
  - every 5 minutes a mangle rule added, removed 2.5 minutes later: the
    observers are placed again each time;
  - /metrics scraped every 15 s (Prometheus' default) and /flow.json every
    5 s (a live page left open).
serve's VmRSS is sampled every 15 s.

Verdict: the peak (the samples' and VmHWM, which sees between them) is
<= 60 MB, and the RSS is flat: the median of the last
quarter of the samples is at most FLAT_MB above the median of the second
quarter (the first quarter is warm-up: paths counted for the first time,
the allocator's arenas filling).  The slope over the second half is printed
too, in MB per hour.

Results: a table on stdout, DIR/soak.{json,md} and the last scrape,
DIR/soak-metrics.txt (default DIR: benchmarks/results).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import (ROUTER_RULES, UDP_LEN, BenchError, TracerProcess, compile_tracer,  # noqa: E402
                            machine, status_bytes, wait_listening)

LAB_PREFIX, LAB_NET_ID = "ptsoak", 86
FLOW_PORT = 5301
SAMPLE_S = 15.0           # RSS and /metrics, as often as Prometheus scrapes by default
PAGE_S = 5.0              # /flow.json, as often as the live page asks
RULE_PERIOD_S = 300.0     # a mangle rule added, removed half a period later
FLOW_S = 60               # the paced flow: a new iperf3 connection this often
RSS_MAX_MB = 60.0
FLAT_MB = 1.0             # allowed rise of the last quarter's median over the second quarter's
CHURN_RULE = ("-t", "mangle", "-I", "PREROUTING", "-p", "udp", "--dport", "7777", "-j", "DSCP", "--set-dscp", "10")


# ---- the verdict (pure: tests/unit/test_soak.py runs it on recorded series) ----

def rss_verdict(samples: list[tuple[float, int]], max_mb: float = RSS_MAX_MB, flat_mb: float = FLAT_MB,
                hwm_bytes: int | None = None) -> dict:
    """samples: (seconds since ready, RSS bytes); hwm_bytes: the process's
    VmHWM at the end, the peak between samples too.  Peak, the medians of
    the second and last quarters, their difference, the slope over the
    second half (least squares, MB/hour) and whether peak and growth are in
    bounds."""
    if len(samples) < 8:
        raise ValueError(f"{len(samples)} RSS samples: at least 8 are needed to tell warm-up from growth")
    mb = [(t, b / 1e6) for t, b in samples]
    n = len(mb)
    q2 = [v for _, v in mb[n // 4:n // 2]]
    q4 = [v for _, v in mb[3 * n // 4:]]
    half = mb[n // 2:]
    tm = statistics.fmean(t for t, _ in half)
    vm = statistics.fmean(v for _, v in half)
    den = sum((t - tm) ** 2 for t, _ in half)
    slope = sum((t - tm) * (v - vm) for t, v in half) / den * 3600 if den else 0.0
    peak = max([v for _, v in mb] + ([hwm_bytes / 1e6] if hwm_bytes else []))
    growth = statistics.median(q4) - statistics.median(q2)
    return {"samples": n, "seconds": mb[-1][0] - mb[0][0], "first_mb": mb[0][1], "peak_mb": peak,
            "q2_median_mb": statistics.median(q2), "q4_median_mb": statistics.median(q4),
            "growth_mb": growth, "slope_mb_per_h": slope,
            "peak_ok": peak <= max_mb, "flat_ok": growth <= flat_mb, "max_mb": max_mb, "flat_mb": flat_mb}


# ---- serve's side ---------------------------------------------------------------

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metrics_summary(text: str) -> dict:
    """Series count, path series, and the loss/overflow counters of one scrape."""
    series = paths = 0
    lost = overflow = 0.0
    for line in text.splitlines():
        m = METRIC_NAME.match(line)     # comments and blank lines do not match
        if not m:
            continue
        series += 1
        # label values may hold anything but a raw newline: the value is the last field
        name, value = m.group(0), float(line.rsplit(" ", 1)[1])
        if name == "pkttrace_paths_total":
            paths += 1
        elif name == "pkttrace_events_lost_total":
            lost += value
        elif name == "pkttrace_map_overflow_total":
            overflow += value
    return {"series": series, "path_series": paths, "events_lost": lost, "map_overflow": overflow}


# ---- the traffic -----------------------------------------------------------------

class Traffic:
    """Threads that keep the router busy and its ruleset moving until stopped."""

    def __init__(self, lab, pps: int, stop: threading.Event):
        self.lab, self.pps, self.stop = lab, pps, stop
        self.errors: list[str] = []
        self.counts = {"flows": 0, "trickle_rounds": 0, "rule_changes": 0}
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                        for f in (self._flow, self._trickle, self._rules)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=FLOW_S + 30)

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- reported in the results, the run goes on
            self.errors.append(f"{fn.__name__}: {type(e).__name__}: {e}")

    def _flow(self) -> None:
        lab, dst = self.lab, self.lab.addr["server4"]
        server = subprocess.Popen(["ip", "netns", "exec", lab.server, "iperf3", "-s", "-B", dst,
                                   "-p", str(FLOW_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        try:
            wait_listening(server, FLOW_PORT)
            while not self.stop.is_set():
                client = subprocess.Popen(
                    ["ip", "netns", "exec", lab.client, "iperf3", "-c", dst, "-p", str(FLOW_PORT), "-u",
                     "-l", str(UDP_LEN), "-b", str(self.pps * UDP_LEN * 8), "-t", str(FLOW_S)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while client.poll() is None and not self.stop.wait(0.5):
                    pass
                if client.poll() is None:
                    client.terminate()
                    client.wait()
                self.counts["flows"] += 1
                self.stop.wait(1.0)   # the server is ready for the next test again
        finally:
            server.terminate()
            server.wait()

    def _trickle(self) -> None:
        from tracer import netns
        lab, a = self.lab, self.lab.addr
        rnd = random.Random(1)
        with netns.entered(lab.client):
            u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with u4, u6:
            while not self.stop.wait(1.0):
                for _ in range(20):
                    u4.sendto(b"soak", (a["server4"], rnd.randrange(1024, 65536)))
                    u6.sendto(b"soak", (a["server6"], rnd.randrange(1024, 65536)))
                for port in (5001, 5009, 7777):
                    u4.sendto(b"soak", (a["server4"], port))
                u4.sendto(b"soak", (a["router_c4"], 9))           # the router's own closed port
                for dst in (a["server4"], a["server6"]):
                    self._connect(dst, rnd.randrange(1024, 65536))
                lab.ping(lab.client, a["server4"], count=1, timeout=0.5)
                self.counts["trickle_rounds"] += 1

    def _connect(self, dst: str, port: int) -> None:
        from tracer import netns
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with netns.entered(self.lab.client):
            s = socket.socket(fam, socket.SOCK_STREAM)
        with s:
            s.settimeout(0.5)
            with contextlib.suppress(OSError):
                s.connect((dst, port))

    def _rules(self) -> None:
        delete = ("-D",) + CHURN_RULE[3:]
        while not self.stop.wait(RULE_PERIOD_S / 2):
            self.lab.iptables(*CHURN_RULE)
            self.counts["rule_changes"] += 1
            if self.stop.wait(RULE_PERIOD_S / 2):
                self.lab.iptables("-t", "mangle", *delete)
                break
            self.lab.iptables("-t", "mangle", *delete)
            self.counts["rule_changes"] += 1


class Scraper:
    """A Prometheus and an open live page: GET /metrics and /flow.json."""

    def __init__(self, base: str, stop: threading.Event):
        self.base, self.stop = base, stop
        self.errors = 0
        self.last_metrics = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as r:
                return r.read().decode()
        except OSError:
            self.errors += 1
            return None

    def _run(self) -> None:
        next_metrics = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_metrics:
                text = self._get("/metrics")
                if text is not None:
                    self.last_metrics = text
                next_metrics = now + SAMPLE_S
            self._get("/flow.json")
            self.stop.wait(PAGE_S)


# ---- the run -----------------------------------------------------------------------

def soak(minutes: float, pps: int, log) -> dict:
    from tracer.lab import Lab
    compile_tracer()
    lab = Lab(LAB_PREFIX, LAB_NET_ID)
    lab.down()
    lab.up(rules=True)                       # the demo's mark (5001) and drop (5009) rules
    for rule in ROUTER_RULES:
        lab.iptables(*rule)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    argv = [sys.executable, "-m", "tracer", "serve", "--netns", lab.router, "--listen", f"127.0.0.1:{port}"]
    tp = TracerProcess(argv, re.compile(r"tracing|listening|serving|ready"))
    stop = threading.Event()
    res: dict = {"argv": ["pkttrace", *argv[3:]], "pps": pps, "minutes": minutes}
    samples: list[tuple[float, int]] = []
    scrapes: list[dict] = []
    try:
        res["start_to_ready_s"] = tp.start()
        t0 = time.monotonic()
        traffic, scraper = Traffic(lab, pps, stop), Scraper(f"http://127.0.0.1:{port}", stop)
        traffic.start()
        scraper.thread.start()
        deadline, next_log = t0 + minutes * 60, t0 + 300
        while time.monotonic() < deadline and tp.proc.poll() is None:
            rss = status_bytes(tp.proc.pid, "VmRSS")
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))
            if scraper.last_metrics:
                scrapes.append({"t": time.monotonic() - t0, **metrics_summary(scraper.last_metrics)})
            if time.monotonic() >= next_log:
                log(f"  {(time.monotonic() - t0) / 60:5.1f} min  RSS {samples[-1][1] / 1e6:.1f} MB  "
                    f"series {scrapes[-1]['series'] if scrapes else '?'}")
                next_log += 300
            time.sleep(min(SAMPLE_S, max(0.0, deadline - time.monotonic())))
        stop.set()
        traffic.join()
        scraper.thread.join(timeout=15)
        if tp.proc.poll() is not None:
            raise BenchError(f"serve exited during the soak (status {tp.proc.returncode}): "
                             f"{' | '.join(tp.lines[-3:])}")
        res.update(traffic_errors=traffic.errors, traffic=traffic.counts, scrape_errors=scraper.errors,
                   last_scrape=metrics_summary(scraper.last_metrics), last_metrics_text=scraper.last_metrics)
    finally:
        stop.set()
        info = tp.stop() if hasattr(tp, "proc") else {}
        res["peak_rss_bytes"] = info.get("peak_rss_bytes")
        res["exit"] = info.get("exit")
        lab.down()
    res["rss_samples"] = samples
    res["scrapes"] = scrapes
    res["verdict"] = rss_verdict(samples, hwm_bytes=res["peak_rss_bytes"])
    return res


def render(res: dict) -> str:
    v, last = res["verdict"], res.get("last_scrape", {})
    rows = [("start to ready", f"{res['start_to_ready_s']:.2f} s"),
            ("RSS first sample", f"{v['first_mb']:.1f} MB"),
            ("RSS peak (samples)", f"{max(b for _, b in res['rss_samples']) / 1e6:.1f} MB"),
            ("RSS peak (VmHWM)", f"{(res.get('peak_rss_bytes') or 0) / 1e6:.1f} MB"),
            ("peak", f"{v['peak_mb']:.1f} MB (<= {v['max_mb']:.0f}: {'ok' if v['peak_ok'] else 'MISS'})"),
            ("median, 2nd quarter", f"{v['q2_median_mb']:.2f} MB"),
            ("median, last quarter", f"{v['q4_median_mb']:.2f} MB"),
            ("growth", f"{v['growth_mb']:+.2f} MB (<= {v['flat_mb']:g}: {'flat' if v['flat_ok'] else 'GROWING'})"),
            ("slope, 2nd half", f"{v['slope_mb_per_h']:+.2f} MB/h"),
            ("samples", f"{v['samples']} over {v['seconds'] / 60:.1f} min"),
            ("metric series at the end", f"{last.get('series', '?')} ({last.get('path_series', '?')} paths)"),
            ("events lost (exporter)", f"{last.get('events_lost', '?'):g}" if last else "?"),
            ("map overflows", f"{last.get('map_overflow', '?'):g}" if last else "?"),
            ("traffic", ", ".join(f"{k} {n}" for k, n in res.get("traffic", {}).items())),
            ("errors", f"traffic {len(res.get('traffic_errors', []))}, scrapes {res.get('scrape_errors', 0)}")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {val} |" for k, val in rows)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="how long serve runs (default 60)")
    ap.add_argument("--pps", type=int, default=20_000, help="paced UDP flow, packets/s (default 20000)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where soak.{json,md} go")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (a netns lab and BPF)", file=sys.stderr)
        return 2
    if a.minutes < 2 or a.pps < 1:
        print("soak: --minutes must be >= 2 (8 samples) and --pps >= 1", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)   # `timeout`/kill: the lab torn down as for Ctrl-C

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    log(f"soak: serve for {a.minutes:g} min, paced flow {a.pps:,} pps + trickle, rule churn, scrapes")
    try:
        res = soak(a.minutes, a.pps, log)
    except (BenchError, ValueError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak: interrupted (lab removed)", file=sys.stderr)
        return 130
    res.update(date=started.isoformat(timespec="seconds"), machine=machine())
    table = render(res)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak-metrics.txt").write_text(res.pop("last_metrics_text", ""))   # the last scrape, whole
    (a.out / "soak.json").write_text(json.dumps(res, indent=1) + "\n")
    m = res["machine"]
    (a.out / "soak.md").write_text(f"## serve soak, {res['date']}\n\n{m['kernel']}, {m['nproc']} CPUs, "
                                   f"{m['cpu_model']}; `{' '.join(res['argv'])}`\n\n| | |\n|---|---|\n"
                                   f"{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
