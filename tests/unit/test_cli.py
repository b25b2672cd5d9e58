"""The command line: bad input is one line and exit 2; every command has an example.

Runs without root: the effective uid is faked as 1000 unless a test says
otherwise, and tracing / lab changes are stubbed out so that a test can never
load BPF programs or create namespaces, even when the suite runs as root.
"""

import ipaddress
import os
import re

import click
import pytest
from click.testing import CliRunner

from tracer import cli, netns
from tracer.filters import Mark, PacketFilter


@pytest.fixture(autouse=True)
def unprivileged(monkeypatch):
    """Fake a normal user, and make tracing or lab changes a test failure."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    # the door checks capabilities (tracer/caps.py): the faked uid 0 has them all, others none
    from tracer import caps
    monkeypatch.setattr(caps, "effective", lambda: (1 << 64) - 1 if os.geteuid() == 0 else 0)

    def no_trace(*args, **kwargs):
        raise AssertionError("unit tests must not start tracing")
    monkeypatch.setattr(cli, "run_trace", no_trace)

    from tracer import lab

    def no_lab(*args, **kwargs):
        raise AssertionError("unit tests must not change the lab")
    monkeypatch.setattr(lab.Lab, "up", no_lab)
    monkeypatch.setattr(lab.Lab, "down", no_lab)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click 8.1: needed for result.stderr
    except TypeError:
        return CliRunner()                  # click >= 8.2: stderr is always separate


def assert_one_line(err: str) -> str:
    """stderr holds exactly one non-empty line, from pkttrace, without a traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("pkttrace: "), lines[0]
    return lines[0]


# --- bad input --------------------------------------------------------------

# args, a fragment the one line must contain
OUR_ERRORS = [
    (["--src", "10.0.0.300/8"], "10.0.0.300/8"),
    (["--dst", "nonsense"], "nonsense"),
    (["--mark", "0xZZ"], "0xZZ"),
    (["--proto", "bogus"], "bogus"),
    (["--port", "70000"], "70000"),
    (["--netns", "does-not-exist-xyz"], "does-not-exist-xyz"),
    # resolved in the current netns with an RTM_GETLINK dump: no root needed
    (["--iface", "nosuchif0"], "nosuchif0"),
    (["lab", "status", "--prefix", "Bad/x"], "Bad/x"),
]
CLICK_ERRORS = [
    (["--count", "0"], "--count"),
    (["--duration", "-1"], "--duration"),
    (["--frobnicate"], "--frobnicate"),
]
_ids = [" ".join(a) for a, _ in OUR_ERRORS + CLICK_ERRORS]


@pytest.mark.parametrize("args, fragment", OUR_ERRORS + CLICK_ERRORS, ids=_ids)
def test_run_bad_input_is_one_line_exit_2(capsys, args, fragment):
    status = cli.run(args)
    out, err = capsys.readouterr()
    assert status == 2
    line = assert_one_line(err)
    assert fragment in line
    assert "root" not in line  # input is checked before asking for root
    assert out == ""


@pytest.mark.parametrize("args, fragment", OUR_ERRORS, ids=[" ".join(a) for a, _ in OUR_ERRORS])
def test_main_bad_input_is_one_line_exit_2(args, fragment):
    result = _runner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert not isinstance(result.exception, AssertionError)
    assert fragment in assert_one_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize("args, fragment", CLICK_ERRORS, ids=[" ".join(a) for a, _ in CLICK_ERRORS])
def test_main_click_usage_errors_exit_2(args, fragment):
    # Through click's standalone mode (not the console entry point `run`),
    # click adds its usage lines; `run` is what makes these one line.
    result = _runner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr.strip().splitlines()[-1]


def test_iface_with_several_netns_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(netns, "exists", lambda name: True)
    assert cli.run(["--netns", "a", "--netns", "b", "--iface", "eth0"]) == 2
    assert "single --netns" in assert_one_line(capsys.readouterr().err)


def test_iface_lookup_error_from_netns(capsys, monkeypatch):
    # the message of a NetnsError becomes the one line, whatever netns.ifindex found
    def fake_ifindex(ns, name):
        raise netns.NetnsError(f"no interface {name!r} in network namespace 'current'")
    monkeypatch.setattr(netns, "ifindex", fake_ifindex)
    assert cli.run(["--iface", "nosuchif0"]) == 2
    line = assert_one_line(capsys.readouterr().err)
    assert line == "pkttrace: no interface 'nosuchif0' in network namespace 'current'"


# --- root -------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["--mark", "0x1", "--iface", "lo"], ["lab", "up"], ["lab", "down"]],
                         ids=["trace", "trace with filters", "lab up", "lab down"])
def test_not_root_is_one_line_exit_2(capsys, args):
    assert os.geteuid() == 1000
    assert cli.run(args) == 2
    out, err = capsys.readouterr()
    assert "root" in assert_one_line(err)
    assert out == ""


def test_root_passes_parsed_options_to_the_tracer(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    seen = {}

    def fake_run_trace(opts, count=None, duration=None, as_json=False, record_path=None, show=None,
                       write_path=None):
        seen.update(opts=opts, count=count, duration=duration, as_json=as_json, record_path=record_path, show=show,
                    write_path=write_path)
    monkeypatch.setattr(cli, "run_trace", fake_run_trace)

    status = cli.run(["--mark", "0x10/0xf0", "--src", "10.1.2.3/8", "--dst", "2001:db8::1", "--proto", "udp",
                      "--port", "53", "--iface", "lo", "-c", "3", "--duration", "1.5", "--json",
                      "--tc", "off", "--age-after", "2"])
    assert status == 0, capsys.readouterr().err
    opts = seen["opts"]
    assert opts.filter == PacketFilter(mark=Mark(0x10, 0xF0), src=ipaddress.ip_network("10.0.0.0/8"),
                                       dst=ipaddress.ip_network("2001:db8::1/128"), proto=17, port=53,
                                       iface="lo")  # checked to exist, then followed by name
    assert opts.netns == [None]
    assert (opts.tc, opts.age_after) == ("off", 2.0)
    assert (seen["count"], seen["duration"], seen["as_json"]) == (3, 1.5, True)
    assert opts.snap is False and seen["write_path"] is None and seen["show"].printing


# --- help -------------------------------------------------------------------

def _walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, path + (name,))


COMMANDS = [path for path, _ in _walk(cli.main)]
_cmd_ids = [" ".join(p) or "main" for p in COMMANDS]
_EXAMPLE = re.compile(r"^\s*Examples?:\s*\n\s+pkttrace\b", re.M)  # a heading, then a real command line


def test_command_tree_is_walked():
    assert {(), ("doctor",), ("lab",), ("lab", "up"), ("lab", "down"), ("lab", "status")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=_cmd_ids)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_has_an_example(capsys, path, flag):
    status = cli.run([*path, flag])
    out, err = capsys.readouterr()
    assert status == 0
    assert err == ""
    assert "Example" in out
    assert _EXAMPLE.search(out), out


@pytest.mark.parametrize("path", COMMANDS, ids=_cmd_ids)
def test_help_through_click_runner(path):
    result = _runner().invoke(cli.main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert _EXAMPLE.search(result.stdout), result.stdout
