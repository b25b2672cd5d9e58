"""Every option of every command, fed its bad values: exit 2, one line on stderr, no traceback.

Runs without root, and again as (faked) root: input is checked at the
door, so a bad value gets its own line whoever runs pkttrace, and never
reaches tracing (stubbed to fail the test), the lab, or the exporter.
"""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from tracer import cli, netns

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")

UNICODE_DIGITS = ["５３", "٥٣", "۵۳", "५३", "²"]      # fullwidth, Arabic-Indic, Persian, Devanagari, superscript
NOT_A_COUNT = ["nan", "inf", "-inf", "-1", "0", "1_000", " 53 ", " 5", "5 ", "+5", "0x5", "1.5", "1e3", "",
               *UNICODE_DIGITS]
NOT_SECONDS = ["nan", "NaN", "inf", "-inf", "Infinity", "-1", "1_0", " 5", "5 ", "+5", "0x1", "1e3", "", "1" * 40,
               "99999999999", *UNICODE_DIGITS]
NOT_A_PORT = ["nan", "inf", "-1", "0", "65536", "1_000", " 53 ", " 53", "+53", "0x35", "53.0", "", "http",
              *UNICODE_DIGITS]
NOT_A_MARK = ["nan", "inf", "-1", "1_0", " 1", "1 ", "+1", "0x", "0x1/", "1/1_0", "4294967296", "0x1/0x0", "",
              "１", "0x１"]
NOT_A_PROTO = ["nan", "-1", "256", " 6", "6 ", "1_7", "+6", "", "udp ", "tcp6", "６"]
NOT_A_CIDR = ["nan", "", " 10.0.0.1", "10.0.0.1 ", "１0.0.0.1", "10.0.0.0/٨", "10.0.0.0/33", "10.0.0.0/+8",
              "fe80::1%eth0", "\x1b[31m"]
NOT_AN_IFACE = ["", "a b", "x" * 16, "a/b", "a:b", ".", "..", "\x1b[31m", "eth0\n"]
NOT_A_NETNS = ["", "does-not-exist-xyz", "../x", "a/b", ".", "nul\0byte", "\x1b[31m"]
NOT_A_PREFIX = ["", "A", "a b", "toolongpfx", "../x", "a-b", "\x1b", "ａ"]
NOT_A_LISTEN = ["", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:９６３２", "127.0.0.1:²",
                " 127.0.0.1:9632", "127.0.0.1:9632 ", "127.0.0.1: 9632", "localhost:9632", "127.0.0.1:1_000",
                "127.0.0.1:+80", "[::1]9632", "127.0.0.1:nan"]
NOT_MAX_PATHS = ["nan", "inf", "-1", "0", "15", "1048577", "1_024", " 1024", "１０２４", "", "1e3"]


def _bad_paths() -> list[str]:
    return ["/proc/version", "{tmp}", "{tmp}/", "{tmp}/fifo", "/dev/null", "{tmp}/missing/rec.jsonl",
            "{tmp}/dangling", "{tmp}/file/rec.jsonl", ""]


def _table():
    rows = []

    def add(cmd, opt, values):
        rows.extend((cmd, opt, v) for v in values)

    for cmd in ([], ["replay", DATA]):      # the filters, live and in replay
        add(cmd, "--port", NOT_A_PORT)
        add(cmd, "--mark", NOT_A_MARK)
        add(cmd, "--proto", NOT_A_PROTO)
        add(cmd, "--src", NOT_A_CIDR)
        add(cmd, "--dst", NOT_A_CIDR)
        add(cmd, "--iface", NOT_AN_IFACE)
        add(cmd, "--count", NOT_A_COUNT)
        add(cmd, "-c", ["0", "nan", "1_0", "５"])
        add(cmd, "--color", ["bogus", "", "ALWAYS", "always "])
        add(cmd, "-i", NOT_AN_IFACE)
    add([], "--duration", NOT_SECONDS + ["0", "0.0"])
    add([], "--age-after", NOT_SECONDS + ["0", "0.05"])
    add([], "--tc", ["bogus", "", "TCX", "tcx "])
    add([], "--backend", ["bogus", "", "NFLINK"])
    add([], "--buffer-size", NOT_A_COUNT + ["1048577", "99999999999"])
    add([], "-B", ["0", "nan", "1_0", "５", "64k"])
    add([], "--record", _bad_paths())
    add([], "-w", _bad_paths())
    add([], "-r", ["/dev/zero", "{tmp}", "/nonexistent/trace.pcapng", "", "/proc/version", "{tmp}/file"])
    add([], "--netns", NOT_A_NETNS)
    add(["serve"], "--listen", NOT_A_LISTEN)
    add(["serve"], "--age-after", NOT_SECONDS + ["0", "0.05"])
    add(["serve"], "--max-paths", NOT_MAX_PATHS)
    add(["serve"], "--tc", ["bogus", ""])
    add(["serve"], "--netns", NOT_A_NETNS)
    # not a readable regular file, or not a web-config mapping ({tmp}/file: one line of text)
    add(["serve"], "--web.config.file", ["/proc/version", "{tmp}", "{tmp}/fifo", "/dev/null", "{tmp}/dangling",
                                         "{tmp}/missing.yml", "{tmp}/file", ""])
    add(["cleanup"], "--netns", NOT_A_NETNS)
    add(["install-service"], "--root", ["", "/nonexistent/root", "{tmp}/file", "/proc/version"])
    add(["install-service"], "--exec", ["", "pkttrace", "bin/pkttrace", "/opt/my tools/pkttrace", "/x\n/pkttrace"])
    add(["replay"], None, ["/dev/zero", "{tmp}", "{tmp}/fifo-no-writer-is-never-opened", "/nonexistent/rec", "",
                           "/proc/version", "{tmp}/file"])
    for opt in ("--port", "--mark", "--proto", "--src", "--dst", "--iface", "-i"):     # checked before -r, -o
        add(["diagram"], opt, {"--port": NOT_A_PORT, "--mark": NOT_A_MARK, "--proto": NOT_A_PROTO,
                               "--src": NOT_A_CIDR, "--dst": NOT_A_CIDR}.get(opt, NOT_AN_IFACE))
    add(["diagram"], "--packet", [v for v in NOT_A_COUNT if v != "0"])     # 0 is an id
    add(["diagram"], "-r", ["/dev/zero", "{tmp}", "/nonexistent/trace.pcapng", "", "/proc/version", "{tmp}/file"])
    add(["diagram"], "-o", _bad_paths())
    for sub in ("up", "down", "status", "demo"):
        add(["lab", sub], "--prefix", NOT_A_PREFIX)
    add(["lab", "demo"], "--record", _bad_paths())
    return rows


TABLE = _table()


def _id(row) -> str:
    cmd, opt, value = row
    return " ".join([*(c if c != DATA else "REC" for c in cmd), opt or "", repr(value)])


@pytest.fixture(params=[1000, 0], ids=["user", "root"])
def uid(request, monkeypatch):
    """Fake the effective uid; make tracing, lab changes and serving a test failure."""
    monkeypatch.setattr(os, "geteuid", lambda: request.param)
    # the door checks capabilities, not the uid: the user has none
    from tracer import caps
    monkeypatch.setattr(caps, "effective", lambda: (1 << 64) - 1 if request.param == 0 else 0)

    def forbidden(*args, **kwargs):
        raise AssertionError("bad input went past the door")
    monkeypatch.setattr(cli, "run_trace", forbidden)
    from tracer import demo, lab, probes, serve
    monkeypatch.setattr(probes, "clean_dead_sessions", forbidden)
    monkeypatch.setattr(lab.Lab, "up", forbidden)
    monkeypatch.setattr(lab.Lab, "down", forbidden)
    monkeypatch.setattr(demo, "run", forbidden)
    monkeypatch.setattr(serve, "Exporter", forbidden)
    from tracer import installer
    monkeypatch.setattr(installer, "install", forbidden)
    return request.param


@pytest.fixture
def tmp(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "file").write_text("not a recording\n")
    return tmp_path


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("pkttrace: "), lines[0]
    assert all(c.isprintable() for c in lines[0]), repr(lines[0])   # what was typed is escaped
    return lines[0]


@pytest.mark.parametrize("row", TABLE, ids=[_id(r) for r in TABLE])
def test_bad_value_is_one_line_exit_2(capsys, uid, tmp, row):
    cmd, opt, value = row
    value = value.replace("{tmp}", str(tmp))
    args = [*cmd, *([opt, value] if opt else [value])]
    status = cli.run(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert status == 2, (status, err)
    line = one_line(err)
    assert "not root" not in line and "missing capabilit" not in line   # checked before root is asked for
    assert out == ""


def test_table_covers_every_option_of_every_command():
    """A new option must get its row here (flags and --help aside)."""
    seen = {(tuple(c for c in cmd if c != DATA and not c.startswith("/")), opt) for cmd, opt, _ in TABLE}
    missing = []

    def walk(cmd, path):
        for p in cmd.params:
            if p.param_type_name == "argument":
                if (path, None) not in seen:
                    missing.append((path, p.name))
                continue
            # flags and counted switches (-v, -tt...) take no value (tests/unit/test_cli_tcpdump.py)
            if getattr(p, "is_flag", False) or getattr(p, "count", False) or p.name == "help":
                continue
            if not any((path, o) in seen for o in p.opts):
                missing.append((path, p.opts[0]))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + (name,))
    walk(cli.main, ())
    assert missing == []


# --- through click's own runner (standalone mode, as `pkttrace` scripts run) ---

def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click 8.1: needed for result.stderr
    except TypeError:
        return CliRunner()                  # click >= 8.2: stderr is always separate


@pytest.mark.parametrize("args", [["--duration", "nan"], ["--age-after", "inf"], ["--port", " 53 "],
                                  ["--record", "/proc/version"], ["serve", "--max-paths", "1_024"],
                                  ["replay", "/dev/zero"], ["lab", "up", "--prefix", "A"]])
def test_click_runner_never_shows_a_traceback(uid, args):
    result = _runner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stdout + result.stderr


# --- environment variables go through the same checks ---------------------------

@pytest.mark.parametrize("var, value", [("PKTTRACE_AGE_AFTER", "nan"), ("PKTTRACE_AGE_AFTER", "inf"),
                                        ("PKTTRACE_MAX_PATHS", "1_024"), ("PKTTRACE_MAX_PATHS", "１０２４"),
                                        ("PKTTRACE_LISTEN", "127.0.0.1:９６３２"), ("PKTTRACE_TC", "bogus"),
                                        ("PKTTRACE_NETNS", "does-not-exist-xyz"),
                                        ("PKTTRACE_BPF_STATS", "maybe")])
def test_serve_environment_is_checked(capsys, uid, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert cli.run(["serve"]) == 2
    assert "not root" not in one_line(capsys.readouterr().err)


def test_backend_environment_is_checked(capsys, uid, monkeypatch):
    monkeypatch.setenv("PKTTRACE_BACKEND", "bogus")
    assert cli.run([]) == 2
    one_line(capsys.readouterr().err)


# --- repeated options ---------------------------------------------------------

def test_repeated_netns_is_traced_once_in_order(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "exists", lambda name: True)
    seen = {}
    monkeypatch.setattr(cli, "run_trace", lambda opts, **kw: seen.update(opts=opts))
    assert cli.run(["--netns", "b", "--netns", "a", "--netns", "b", "--netns", "a"]) == 0, capsys.readouterr().err
    assert seen["opts"].netns == ["b", "a"]


def test_repeated_netns_with_iface_is_one_namespace(capsys, monkeypatch):
    """--iface needs a single --netns: the same name twice is a single one."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "exists", lambda name: True)
    monkeypatch.setattr(netns, "ifindex", lambda ns, name: 7)
    seen = {}
    monkeypatch.setattr(cli, "run_trace", lambda opts, **kw: seen.update(opts=opts))
    assert cli.run(["--netns", "x", "--netns", "x", "--iface", "eth0"]) == 0, capsys.readouterr().err
    assert seen["opts"].netns == ["x"] and seen["opts"].filter.iface == "eth0"


def test_repeated_netns_for_serve(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "exists", lambda name: True)
    from tracer import serve
    seen = {}

    class FakeExporter:
        def __init__(self, opts):
            seen["opts"] = opts
            self.tracer = type("T", (), {"ready_s": 0.0})()

        def start(self):
            pass

        def run(self):
            pass

        def close(self):
            pass

        def stop(self):
            pass
    monkeypatch.setattr(serve, "Exporter", FakeExporter)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    assert cli.run(["serve", "--netns", "a", "--netns", "a", "--netns", "b"]) == 0, capsys.readouterr().err
    assert seen["opts"].netns == ["a", "b"]


def test_help_says_repeated_netns_counts_once(capsys):
    assert cli.run(["--help"]) == 0
    assert "twice" in " ".join(capsys.readouterr().out.split())


# --- good values still pass -----------------------------------------------------

def test_good_values_reach_the_tracer(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    seen = {}
    monkeypatch.setattr(cli, "run_trace", lambda opts, **kw: seen.update(opts=opts, **kw))
    rec = tmp_path / "rec.jsonl"
    assert cli.run(["--port", "053", "--mark", "0x1/0xF", "--proto", "0x11", "-c", "10", "--duration", ".5",
                    "--age-after", "0.1", "--record", str(rec), "-B", "100"]) == 0, capsys.readouterr().err
    assert seen["opts"].filter.port == 53 and seen["opts"].filter.proto == 17 and seen["opts"].age_after == 0.1
    assert seen["opts"].ringbuf_bytes == 128 << 10        # -B 100 KiB: a power of two, rounded up
    assert (seen["count"], seen["duration"], seen["record_path"]) == (10, 0.5, str(rec))
    assert not rec.exists()                 # created by run_trace, right before tracing starts


def test_record_file_is_opened_before_the_tracer_exists(monkeypatch, tmp_path, capsys):
    """A --record path that went bad after the check fails before any BPF is loaded."""
    from tracer import session
    made = []
    monkeypatch.setattr(session, "Tracer", lambda opts: made.append(opts))
    path = tmp_path / "rec"
    os.mkfifo(path)   # appeared between the check and the open
    with pytest.raises(cli.UsageFailure, match="not a regular file"):
        cli.run_trace(session.TraceOptions(), record_path=str(path))
    assert made == []


def test_group_without_a_command_shows_its_help_as_text(capsys):
    """click >= 8.2 reports it as a usage error whose message is the help: not one escaped line."""
    status = cli.run(["lab"])
    out, err = capsys.readouterr()
    assert status in (0, 2)          # click 8.1 shows the help and exits 0, 8.2 exits 2
    assert "Usage:" in out + err and "\\x0a" not in out + err and "Traceback" not in out + err


@pytest.mark.parametrize("argv", [["--netns", "all", "--netns", "x"], ["--netns", "x", "--netns", "all"],
                                  ["--netns", "all", "--iface", "eth0"],
                                  ["serve", "--netns", "all", "--netns", "x"]])
def test_netns_all_is_given_alone(argv, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "exists", lambda name: True)
    monkeypatch.setattr(netns, "ifindex", lambda ns, name: 7)

    def forbidden(*args, **kwargs):
        raise AssertionError("bad input went past the door")
    monkeypatch.setattr(cli, "run_trace", forbidden)
    from tracer import serve
    monkeypatch.setattr(serve, "Exporter", forbidden)
    from tracer import installer
    monkeypatch.setattr(installer, "install", forbidden)
    assert cli.run(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert "--netns all" in line or "--iface" in line


def test_netns_all_reaches_the_tracer(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    seen = {}
    monkeypatch.setattr(cli, "run_trace", lambda opts, **kw: seen.update(opts=opts))
    assert cli.run(["--netns", "all", "--proto", "udp"]) == 0, capsys.readouterr().err
    assert seen["opts"].all_netns and seen["opts"].netns == [None]


def test_default_ring_is_8_mib_and_b_is_refused_with_r(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    seen = {}
    monkeypatch.setattr(cli, "run_trace", lambda opts, **kw: seen.update(opts=opts))
    assert cli.run(["--proto", "udp"]) == 0, capsys.readouterr().err
    assert seen["opts"].ringbuf_bytes == 8 << 20
    # -r reads packets traced before: there is no ring to size
    assert cli.run(["-r", DATA, "-B", "1024"]) == 2
    assert "-B means nothing" in one_line(capsys.readouterr().err)
