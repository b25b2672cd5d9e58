"""tracer.inputs: numbers in ASCII digits, finite seconds, output paths, escaping."""
from __future__ import annotations

import os
import stat

import pytest

from tracer import inputs
from tracer.inputs import InputError, check_ifname, check_output_path, escape, parse_seconds, parse_uint

# --- numbers ------------------------------------------------------------------

# each of these int() or float() would take
NOT_ASCII_NUMBERS = [" 53", "53 ", " 53 ", "1_000", "+53", "-53", "５３", "٥٣", "۵۳", "०", "53\n", "\t53", "",
                     "5 3", "nan", "inf", "0x35", "1e3", "53.0", "²"]


@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS)
def test_uint_takes_ascii_decimal_only(text):
    with pytest.raises(InputError) as e:
        parse_uint(text, "port", 1, 65535)
    assert repr(text) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, value", [("53", 53), ("0053", 53), ("65535", 65535), (80, 80)])
def test_uint_valid(text, value):
    assert parse_uint(text, "port", 1, 65535) == value


@pytest.mark.parametrize("text, value", [("0x1F", 31), ("0xff", 255), ("16", 16)])
def test_uint_hex_where_meant(text, value):
    assert parse_uint(text, "mark", 0, 0xFFFFFFFF, hex_ok=True) == value


@pytest.mark.parametrize("text", ["0x", "0x1_0", "0x ff", "0xＦＦ", "0b1", "0o7", "x1", "1" * 41, True])
def test_uint_hex_refused(text):
    with pytest.raises(InputError):
        parse_uint(text, "mark", 0, 0xFFFFFFFF, hex_ok=True)


@pytest.mark.parametrize("text", ["0", "65536", 0, 70000, -1])
def test_uint_range(text):
    with pytest.raises(InputError, match="expected 1-65535"):
        parse_uint(text, "port", 1, 65535)


@pytest.mark.parametrize("text, value", [("2", 2.0), ("0.5", 0.5), (".5", 0.5), ("5.", 5.0), (3, 3.0), (0.25, 0.25)])
def test_seconds_valid(text, value):
    assert parse_seconds(text, "--duration", 0, lo_open=True) == value


NOT_SECONDS = [t for t in NOT_ASCII_NUMBERS if t != "53.0"] + [
    "0", "0.0", "-1", "NaN", "Infinity", float("nan"), float("inf"), "9" * 40, "1" + "0" * 10, True, None]


@pytest.mark.parametrize("text", NOT_SECONDS)
def test_seconds_refused(text):
    with pytest.raises(InputError) as e:
        parse_seconds(text, "--duration", 0, lo_open=True)
    assert "\n" not in str(e.value)


def test_seconds_lower_bound_closed():
    assert parse_seconds("0.1", "--age-after", 0.1) == 0.1
    with pytest.raises(InputError, match="at least 0.1"):
        parse_seconds("0.09", "--age-after", 0.1)


def test_dedupe_keeps_the_first_position():
    assert inputs.dedupe(None, None, ("b", "a", "b", "c", "a")) == ("b", "a", "c")
    assert inputs.dedupe(None, None, ()) == ()


# --- names --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["eth0", "rs2", "veth-ptlab.1", "x" * 15, "wlän0"])
def test_ifname_valid(name):
    assert check_ifname(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a:b", "a b", "x" * 16, "ä" * 8, "eth0\n", "\x1b[31m", "\t"])
def test_ifname_refused(name):
    with pytest.raises(InputError):
        check_ifname(name)


# --- output paths -------------------------------------------------------------

def test_output_new_file_in_a_writable_directory(tmp_path):
    p = tmp_path / "rec.jsonl"
    assert check_output_path(str(p)) == str(p)
    assert not p.exists()                       # checking creates nothing


def test_output_existing_regular_file(tmp_path):
    p = tmp_path / "rec.jsonl"
    p.write_text("old")
    assert check_output_path(str(p)) == str(p)
    assert p.read_text() == "old"               # nor truncates


def test_output_symlink_to_a_regular_file(tmp_path):
    (tmp_path / "real").write_text("")
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert check_output_path(str(tmp_path / "link"))


def _bad_paths(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink("/proc/version", tmp_path / "to-proc")
    (tmp_path / "file").write_text("")
    return {
        "proc": "/proc/version",
        "sysfs": "/sys/kernel/mm/transparent_hugepage/enabled",
        "directory": str(tmp_path),
        "directory with slash": str(tmp_path / "new") + "/",
        "fifo": str(fifo),
        "char device": "/dev/null",
        "missing directory": str(tmp_path / "missing" / "rec.jsonl"),
        "parent is a file": str(tmp_path / "file" / "rec.jsonl"),
        "dangling symlink": str(tmp_path / "dangling"),
        "symlink into proc": str(tmp_path / "to-proc"),
        "empty": "",
        "NUL": "a\0b",
    }


@pytest.mark.parametrize("kind", ["proc", "sysfs", "directory", "directory with slash", "fifo", "char device",
                                  "missing directory", "parent is a file", "dangling symlink", "symlink into proc",
                                  "empty", "NUL"])
def test_output_refused(tmp_path, kind):
    path = _bad_paths(tmp_path)[kind]
    if kind == "sysfs" and not os.path.exists(path):
        pytest.skip("no such sysfs file here")
    with pytest.raises(InputError) as e:
        check_output_path(path, "--record")
    assert "\n" not in str(e.value) and str(e.value).startswith("--record")
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(path).st_mode)   # untouched


def test_output_not_writable_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    d = tmp_path / "ro"
    d.mkdir(mode=0o555)
    with pytest.raises(InputError, match="not writable"):
        check_output_path(str(d / "x"))


def test_open_output_creates_and_empties_a_regular_file_only(tmp_path):
    p = tmp_path / "rec.jsonl"
    p.write_text("old content")
    with inputs.open_output(str(p)) as f:
        f.write("new\n")
    assert p.read_text() == "new\n"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError):
        inputs.open_output(str(fifo))          # refused, never blocks


def test_fs_type_of_proc_and_of_a_temp_dir(tmp_path):
    assert inputs._fs_type(os.stat("/proc/version").st_dev) == "proc"
    assert inputs._fs_type(os.stat(tmp_path).st_dev) not in inputs.PSEUDO_FS


# --- escaping -----------------------------------------------------------------

@pytest.mark.parametrize("raw, shown", [
    ("eth0", "eth0"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("a\nb", "a\\x0ab"),
    ("a\rb\tc", "a\\x0db\\x09c"),
    ("bell\x07", "bell\\x07"),
    ("\x9b31m", "\\x9b31m"),                  # C1 CSI
    ("ab\u202ecd", "ab\\u202ecd"),           # right-to-left override
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("line\u2028sep", "line\\u2028sep"),
    ("bad\udcffbyte", "bad\\udcffbyte"),     # an undecodable byte (surrogateescape)
    ("tag\U000e0041", "tag\\U000e0041"),
    ("wlän0 网卡 αβγ ünï", "wlän0 网卡 αβγ ünï"),  # letters of every script stay
    ("→ · µs", "→ · µs"),
    ("back\\slash", "back\\slash"),
])
def test_escape(raw, shown):
    assert escape(raw) == shown
    assert escape(shown) == shown             # idempotent

