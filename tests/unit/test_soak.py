"""The soak's verdict on serve's memory (benchmarks/soak.py), on series
shaped like what serve does and like what a leak does; and its reading of
a recorded /metrics scrape."""
from pathlib import Path

import pytest

from benchmarks.soak import metrics_summary, rss_verdict

MB = 1_000_000
HOUR = [15.0 * i for i in range(240)]          # an hour sampled every 15 s
SCRAPE = Path(__file__).resolve().parent.parent / "data" / "serve-metrics.txt"


def _series(f):
    return [(t, int(f(t) * MB)) for t in HOUR]


def test_warm_up_then_flat_is_flat():
    # 40 -> 52 MB over the first ten minutes (paths counted the first time), then +-0.3 MB of noise
    v = rss_verdict(_series(lambda t: 40 + 12 * min(t, 600) / 600 + 0.3 * ((int(t) // 15) % 3 - 1)))
    assert v["flat_ok"] and v["peak_ok"]
    assert v["peak_mb"] == pytest.approx(52.3)
    assert abs(v["growth_mb"]) <= 0.3
    assert abs(v["slope_mb_per_h"]) < 0.5


def test_a_slow_leak_is_growing():
    # 45 -> 55 MB in an hour: under the cap all along, and still a leak
    v = rss_verdict(_series(lambda t: 45 + 10 * t / 3600))
    assert v["peak_ok"] and not v["flat_ok"]
    assert v["growth_mb"] == pytest.approx(10 * 0.5, abs=0.1)     # last quarter's median - second quarter's
    assert v["slope_mb_per_h"] == pytest.approx(10, rel=0.01)


def test_over_the_cap_is_a_miss_even_when_flat():
    v = rss_verdict(_series(lambda t: 61.0))
    assert v["flat_ok"] and not v["peak_ok"]
    assert v["growth_mb"] == 0


def test_the_bounds_are_the_issues():
    v = rss_verdict(_series(lambda t: 50.0))
    assert (v["max_mb"], v["flat_mb"]) == (60.0, 1.0)
    assert v["samples"] == 240 and v["seconds"] == pytest.approx(3585)


def test_too_few_samples_is_refused():
    with pytest.raises(ValueError, match="at least 8"):
        rss_verdict([(0.0, 50 * MB)] * 7)


def test_a_recorded_scrape_is_read():
    s = metrics_summary(SCRAPE.read_text())
    assert s["series"] > 50
    assert s["path_series"] >= 5               # forwarded, dropped, ICMP back, local, IPv6 ...
    assert s["events_lost"] == 0
    assert s["map_overflow"] == 0


def test_loss_and_overflow_are_summed_over_their_series():
    text = ("# HELP pkttrace_events_lost_total x\n"
            "pkttrace_events_lost_total 3.0\n"
            'pkttrace_map_overflow_total{map="path_counts"} 2.0\n'
            'pkttrace_map_overflow_total{map="inflight"} 5.0\n'
            'pkttrace_paths_total{netns="r",path="a"} 1.0\n')
    assert metrics_summary(text) == {"series": 4, "path_series": 1, "events_lost": 3.0, "map_overflow": 7.0}


def test_the_peak_between_samples_counts():
    # flat samples at 55 MB, but the process touched 63 MB once in between (VmHWM)
    v = rss_verdict(_series(lambda t: 55.0), hwm_bytes=63 * MB)
    assert v["flat_ok"] and not v["peak_ok"]
    assert v["peak_mb"] == 63.0
