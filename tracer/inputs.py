"""Input checked at the door: numbers, names, paths, and text for a terminal.

pkttrace runs as root next to other tools: what the user typed is checked
before anything is asked of the kernel, and refused with one line that
says which value and why.  Numbers are written in ASCII digits only
(Python's int()/float() also take " 53 ", "1_000", "+53", "５３", "inf"
and "nan": none of them is something an operator means on a command
line); names read from the system are escaped before they reach a
terminal.
"""
from __future__ import annotations

import math
import os
import re
import select
import stat
from typing import IO

import click

# ASCII only: `[0-9]` is a literal range (unlike \d, which matches every
# Unicode digit)
_DEC = re.compile(r"[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")   # no sign, exponent, inf or nan
_MAX_DIGITS = 40                                        # longer is never a real value

# A second-valued option above this is a typo, not a wish: ~31 years
MAX_SECONDS = 1e9


class InputError(ValueError):
    """A value that cannot be used; the message names it and says why.

    reason: the why alone, for click, which names the option itself."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _bad(what: str, text, why: str) -> InputError:
    return InputError(f"invalid {what} {text!r}: {why}", f"{text!r}: {why}")


# ---- numbers ---------------------------------------------------------------

def _range(lo: int, hi: int) -> str:
    return f"{lo} or more" if hi >= 1 << 62 else f"{lo}-{hi}"


def parse_uint(text: str | int, what: str, lo: int, hi: int, hex_ok: bool = False) -> int:
    """An integer in lo..hi written in ASCII decimal (or 0x-hex when hex_ok)."""
    if isinstance(text, bool):
        raise _bad(what, text, "not a number")
    if isinstance(text, int):
        v = text
    else:
        ok = isinstance(text, str) and len(text) <= _MAX_DIGITS and (
            _DEC.fullmatch(text) or (hex_ok and _HEX.fullmatch(text)))
        if not ok:
            form = "a number such as 0x1 or 16" if hex_ok else _range(lo, hi)
            raise _bad(what, text, f"expected {form} in ASCII digits")
        v = int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)
    if not lo <= v <= hi:
        raise _bad(what, text, f"expected {_range(lo, hi)}")
    return v


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def parse_seconds(text: str | float, what: str, lo: float, lo_open: bool = False,
                  hi: float = MAX_SECONDS) -> float:
    """A finite number of seconds: `2`, `0.5`, `.5`; never inf, nan, -1 or 1e3."""
    if isinstance(text, bool):
        raise _bad(what, text, "not a number")
    if isinstance(text, (int, float)):
        v = float(text)
    elif isinstance(text, str) and len(text) <= _MAX_DIGITS and _DECIMAL.fullmatch(text):
        v = float(text)
    else:
        raise _bad(what, text, "expected seconds such as 2 or 0.5 (ASCII digits only)")
    # nan compares false with everything: test finiteness first
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        bound = f"more than {_num(lo)}" if lo_open else f"at least {_num(lo)}"
        raise _bad(what, text, f"expected {bound} and at most {_num(hi)} seconds")
    return v


class UInt(click.ParamType):
    """click's INT takes whatever int() takes ("1_000", " 5", "５"): this does not."""
    name = "integer"

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        try:
            return parse_uint(value, "value", self.lo, self.hi)
        except InputError as e:
            self.fail(e.reason, param, ctx)

    def get_metavar(self, param, ctx=None):   # ctx: click >= 8.2 passes it
        return "N"


class Seconds(click.ParamType):
    """A finite, bounded number of seconds (FloatRange lets nan and inf through)."""
    name = "seconds"

    def __init__(self, lo: float, lo_open: bool = False, hi: float = MAX_SECONDS):
        self.lo, self.lo_open, self.hi = lo, lo_open, hi

    def convert(self, value, param, ctx):
        try:
            return parse_seconds(value, "value", self.lo, self.lo_open, self.hi)
        except InputError as e:
            self.fail(e.reason, param, ctx)


# ---- repeated options --------------------------------------------------------

def dedupe(_ctx, _param, values):
    """click callback: a value given twice counts once, first position kept."""
    if values is None:
        return values
    return tuple(dict.fromkeys(values))


# ---- names -----------------------------------------------------------------

IFNAMSIZ = 16


def check_ifname(name: str) -> str:
    """A name the kernel could give a device (dev_valid_name())."""
    if (not name or len(name.encode("utf-8", "surrogateescape")) >= IFNAMSIZ or name in (".", "..")
            or any(c in "/:" or c.isspace() or not c.isprintable() for c in name)):
        raise InputError(f"invalid interface name {name!r}: 1-15 bytes, no '/', ':', spaces or control characters")
    return name


def check_cidr_text(text: str) -> str:
    """What ipaddress does not refuse but a filter cannot use: an IPv6 scope (%eth0)."""
    if "%" in text:
        raise InputError(f"invalid address or CIDR {text!r}: a scope (%...) cannot be filtered on")
    return text


# ---- paths -----------------------------------------------------------------

# Where regular-looking files are not storage: writing there fails, or does
# something else than saving (proc, sysfs, cgroup files...).
PSEUDO_FS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf",
    "configfs", "pstore", "efivarfs", "fusectl", "mqueue", "binfmt_misc", "nsfs", "selinuxfs", "autofs",
    "rpc_pipefs", "hugetlbfs", "sockfs", "pipefs", "anon_inodefs",
})


def _fs_type(st_dev: int, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The filesystem type of a device number, from mountinfo (None: unknown)."""
    want = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return None


def _said(what: str, path: str) -> str:
    return f"{what} {path!r}" if what else repr(path)


def check_output_path(path: str, what: str = "output file") -> str:
    """A regular writable file, or a new one in a writable directory.

    Checked without side effects (nothing created or truncated): the file
    is opened by open_output() once tracing is sure to start."""
    if not path:
        raise InputError(f"{what + ': ' if what else ''}empty path")
    if "\0" in path:
        raise InputError(f"{_said(what, path)}: a path cannot hold a NUL byte")
    if path.endswith("/"):
        raise InputError(f"{_said(what, path)}: is a directory")
    try:
        st = os.stat(path)               # follows symlinks: the target is what gets written
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise InputError(f"{_said(what, path)}: {e.strerror}") from None
    if st is None:
        if os.path.islink(path):
            # O_CREAT through a dangling link creates its target, wherever it points
            raise InputError(f"{_said(what, path)}: a symbolic link to nothing")
        parent = os.path.dirname(path) or "."
        try:
            pst = os.stat(parent)
        except OSError as e:
            raise InputError(f"{_said(what, path)}: directory {parent!r}: {e.strerror}") from None
        if not stat.S_ISDIR(pst.st_mode):
            raise InputError(f"{_said(what, path)}: {parent!r} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{_said(what, path)}: directory {parent!r} is not writable")
        dev = pst.st_dev
    else:
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{_said(what, path)}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            # a FIFO would block, a device would take the data somewhere else
            raise InputError(f"{_said(what, path)}: not a regular file")
        if not os.access(path, os.W_OK):
            raise InputError(f"{_said(what, path)}: not writable")
        dev = st.st_dev
    fs = _fs_type(dev)
    if fs in PSEUDO_FS:
        raise InputError(f"{_said(what, path)}: on a {fs} filesystem, not a file that stores data")
    return path


def open_output(path: str, what: str = "output file"):
    """Open a checked output path for writing text, refusing anything but a
    regular file at open time too (the path may have changed since)."""
    check_output_path(path, what)
    # O_NONBLOCK: a FIFO put there since the check fails instead of blocking;
    # no O_TRUNC before fstat says it is a regular file
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise InputError(f"{_said(what, path)}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or _fs_type(st.st_dev) in PSEUDO_FS:
            raise InputError(f"{_said(what, path)}: not a regular file")
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
    except OSError as e:
        os.close(fd)
        raise InputError(f"{_said(what, path)}: {e.strerror}") from None
    except InputError:
        os.close(fd)
        raise
    return os.fdopen(fd, "w", encoding="utf-8")


# Output streams may be raw files (stdout under python -u, PYTHONUNBUFFERED=1),
# whose write() can take part of what it is given.
def write_all(stream: IO[bytes], data: bytes) -> None:
    """data written whole to a binary stream. A buffered one does it (or
    raises); a raw one returns how much it took, which can be part of it: a
    pipe's write interrupted by a signal (SIGTERM at the end of a trace)
    returns what went through, None when non-blocking and full."""
    view = memoryview(data)
    while view:
        n = stream.write(view)
        if n is None:
            select.select([], [stream], [])
            continue
        view = view[n:]


def check_input_path(path: str, what: str = "input file") -> str:
    """A file to read: regular, or a pipe (`<(zcat x.gz)`); never a
    directory or a device (/dev/zero would be read forever)."""
    if path == "-":
        return path
    if not path or "\0" in path:
        raise InputError(f"{_said(what, path)}: not a file name")
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{_said(what, path)}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{_said(what, path)}: is a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise InputError(f"{_said(what, path)}: not a regular file or a pipe")
    return path


class _PathParam(click.ParamType):
    """A file argument or option, checked by `check` (one line on failure)."""
    name = "file"

    def __init__(self, check):
        self.check = check

    def convert(self, value, param, ctx):
        try:
            return self.check(value, "")
        except InputError as e:
            self.fail(str(e), param, ctx)


def OutputPath() -> _PathParam:     # noqa: N802 -- used like the click types it stands beside
    return _PathParam(check_output_path)


def InputPath() -> _PathParam:      # noqa: N802
    return _PathParam(check_input_path)


# ---- text for a terminal ---------------------------------------------------

def _escape_char(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def escape(text: str) -> str:
    """Text safe to write to a terminal, on one line.

    Names come from the system (interfaces, namespaces, process names,
    nft tables) and anyone who can name a device can put an escape
    sequence in it.  Control and format characters (ESC, newline, bidi
    overrides, lone surrogates of undecodable bytes) are written as
    Python escapes, `\\x1b[31m` for ESC [31m; letters of every script
    stay as they are.  Idempotent: escaped text is printable."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)

