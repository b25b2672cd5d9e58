"""tracer/caps.py: the effective capability set, parsed from /proc/PID/status."""
from __future__ import annotations

import pytest

from tracer import caps

STATUS = """Name:\tpkttrace
Umask:\t0077
CapInh:\t0000000000000000
CapPrm:\t000000c000201000
CapEff:\t000000c000201000
CapBnd:\t000000c000201000
CapAmb:\t000000c000201000
NoNewPrivs:\t1
"""


def test_parses_the_effective_set():
    mask = caps.parse_status(STATUS)
    # exactly BPF (39), PERFMON (38), SYS_ADMIN (21), NET_ADMIN (12): what the unit grants
    assert mask == (1 << 39) | (1 << 38) | (1 << 21) | (1 << 12)
    assert caps.missing(caps.BASE, mask) == []
    assert caps.parse_status(STATUS, "CapInh") == 0


def test_root_has_everything_and_nobody_nothing():
    full = caps.parse_status("CapEff:\t000001ffffffffff\n")
    assert caps.missing(caps.needed(all_netns=True, bpf_stats=True), full) == []
    assert caps.missing(caps.BASE, 0) == ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]


def test_each_missing_capability_is_named():
    mask = caps.parse_status(STATUS)
    for cap, name in caps.NAMES.items():
        if cap in caps.BASE:
            assert caps.missing(caps.BASE, mask & ~(1 << cap)) == [name]
    # --netns all also needs to see other users' processes' namespaces
    assert caps.missing(caps.needed(all_netns=True), mask) == ["CAP_SYS_PTRACE"]
    assert caps.missing(caps.needed(all_netns=True), mask | 1 << caps.CAP_SYS_PTRACE) == []


def test_message_is_one_line_naming_them():
    msg = caps.missing_message(["CAP_BPF", "CAP_PERFMON"])
    assert "\n" not in msg and "CAP_BPF, CAP_PERFMON" in msg and msg.startswith("missing capabilities")
    assert caps.missing_message(["CAP_BPF"]).startswith("missing capability CAP_BPF")


@pytest.mark.parametrize("text", ["", "CapEff:\n", "CapEff:\tzz00\n", "CapEff:\t" + "f" * 17 + "\n",
                                  "CapEffective:\t00\n", "CapEff:\t-1\n"])
def test_garbage_is_an_error_not_a_guess(text):
    with pytest.raises(caps.CapsError):
        caps.parse_status(text)


def test_reads_this_process(tmp_path):
    assert isinstance(caps.effective(), int)
    with pytest.raises(caps.CapsError, match="cannot read"):
        caps.effective(str(tmp_path / "absent"))
