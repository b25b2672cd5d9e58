"""tcpdump's habits on the command line: -i, -n, -v, -t..., -w, -r, --print,
--version, --color.  No root: -r reads files; live tracing is stubbed (a
test that would start it fails)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tracer import cli
from tracer.version import __version__

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SGR = re.compile(r"\x1b\[[0-9;]*m")


# (autouse) a normal user; tracing and lab changes fail the test
from test_cli import unprivileged  # noqa: E402,F401


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.run(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pkttrace: ") and "Traceback" not in err
    return lines[0]


def test_version(capsys):
    status, out, err = run(capsys, "--version")
    assert (status, out, err) == (0, f"pkttrace {__version__}\n", "")


def test_dash_r_prints_what_replay_prints(capsys):
    for extra in ([], ["--json"], ["-v"], ["--proto", "udp", "-c", "2"]):
        s1, replayed, _ = run(capsys, "replay", DATA, *extra)
        s2, read, err = run(capsys, "-r", DATA, *extra)
        assert s1 == s2 == 0, err
        assert read == replayed and len(read.splitlines()) >= 2, extra


def test_dash_w_then_dash_r_prints_the_same_paths(capsys, tmp_path):
    pcap = tmp_path / "demo.pcapng"
    status, out, err = run(capsys, "-r", DATA, "-w", str(pcap))
    assert status == 0 and out == "", err              # -w writes, prints nothing (tcpdump's habit)
    _, replayed, _ = run(capsys, "replay", DATA, "-t")
    status, read, err = run(capsys, "-r", str(pcap), "-t")
    assert status == 0, err
    assert read == replayed and read.count("\n#") == 29
    # --json too, but for the wall-clock time this format-1 fixture never had
    _, replayed, _ = run(capsys, "replay", DATA, "--json")
    _, read, _ = run(capsys, "-r", str(pcap), "--json")
    assert [re.sub(r',"time_ns":\d+', "", ln) for ln in read.splitlines()] == replayed.splitlines()


def test_dash_w_with_print_writes_and_prints(capsys, tmp_path):
    pcap = tmp_path / "demo.pcapng"
    status, out, err = run(capsys, "-r", DATA, "-w", str(pcap), "--print", "-c", "3")
    assert status == 0, err
    assert out.count("\n#") + out.startswith("#") == 3 and pcap.stat().st_size > 0


def test_dash_w_dash_pipes_into_tcpdump():
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is not installed"
    writer = subprocess.Popen([sys.executable, "-m", "tracer", "-r", DATA, "-w", "-"], stdout=subprocess.PIPE,
                              cwd=ROOT)
    r = subprocess.run([tcpdump, "-n", "-r", "-"], stdin=writer.stdout, capture_output=True, text=True, timeout=60)
    writer.stdout.close()
    assert writer.wait(timeout=30) == 0
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 30


def test_colour_on_request_only(capsys, monkeypatch):
    _, plain, _ = run(capsys, "-r", DATA, "-c", "1")
    assert not SGR.search(plain)                        # not a terminal: auto means none
    _, coloured, _ = run(capsys, "-r", DATA, "-c", "1", "--color", "always")
    assert SGR.search(coloured) and SGR.sub("", coloured) == plain
    monkeypatch.setenv("NO_COLOR", "1")                 # always is always; NO_COLOR is for auto
    _, coloured2, _ = run(capsys, "-r", DATA, "-c", "1", "--color", "always")
    assert coloured2 == coloured


def test_dash_i_any_and_dash_n_are_accepted(capsys):
    _, everything, _ = run(capsys, "-r", DATA)
    status, out, err = run(capsys, "-r", DATA, "-i", "any", "-n")
    assert status == 0 and out == everything, err
    status, out, err = run(capsys, "-r", DATA, "-i", "rs2")
    assert status == 0 and 0 < out.count("FORWARDED") < everything.count("FORWARDED")


@pytest.mark.parametrize("args, fragment", [
    (["-tttttt"], "at most -ttttt"),
    (["--print"], "give it with -w FILE"),
    (["-w", "-", "--print"], "nowhere to go"),
    (["-r", DATA, "--netns", "x"], "--netns means nothing"),
    (["-r", DATA, "--duration", "3"], "--duration means nothing"),
    (["-r", "{pcap}"], "a pcap file (not pcap-ng) has no pkttrace paths"),
    (["-r", "{foreign}"], "no pkttrace paths in it (1 packet,"),
    (["-r", "{text}"], "neither a pcap-ng file written by pkttrace -w nor a recording"),
    (["-r", "{text}", "-w", "{text}"], "-r and -w name the same file"),
])
def test_bad_combinations_are_one_line_exit_2(capsys, tmp_path, args, fragment):
    from test_pcapng import _foreign_pcapng
    import struct
    (tmp_path / "classic.pcap").write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    (tmp_path / "foreign.pcapng").write_bytes(_foreign_pcapng())
    (tmp_path / "notes.txt").write_text("hello\n")
    args = [a.format(pcap=tmp_path / "classic.pcap", foreign=tmp_path / "foreign.pcapng", text=tmp_path / "notes.txt")
            for a in args]
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    assert fragment in one_line(err)
    assert (tmp_path / "notes.txt").read_text() == "hello\n"       # nothing was overwritten


def test_write_to_a_terminal_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    status, out, err = run(capsys, "-r", DATA, "-w", "-")
    assert status == 2 and "standard output is a terminal" in one_line(err)


def test_dash_w_live_asks_for_header_bytes_and_prints_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    seen = {}

    def fake_run_trace(opts, **kw):
        seen.update(opts=opts, **kw)
    monkeypatch.setattr(cli, "run_trace", fake_run_trace)
    assert cli.run(["-w", str(tmp_path / "x.pcapng"), "-vv", "-ttt"]) == 0
    assert seen["opts"].snap is True and seen["write_path"] == str(tmp_path / "x.pcapng")
    assert (seen["show"].printing, seen["show"].verbose, seen["show"].clock) == (False, 2, 3)
    assert cli.run(["-w", str(tmp_path / "x.pcapng"), "--print", "-i", "any"]) == 0
    assert seen["show"].printing is True and seen["opts"].filter.iface is None
    assert cli.run([]) == 0
    assert seen["opts"].snap is False and seen["show"].printing is True
