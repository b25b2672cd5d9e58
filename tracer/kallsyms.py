"""/proc/kallsyms for the backend probe: read once per start, ahead of need
when the command line is going to trace.

The kernel formats the file's ~120,000 lines on every read: ~65 ms of
kernel CPU on our 2-core machines, a tenth of a trace's start.  `pkttrace`
starts the read in a thread before its own imports (tracer/__main__.py), on
the core the imports leave idle; backends.probe() takes the text when it
gets there.  Nothing else is imported here, so that start is early.

Of the text the probe wants two things: where nf_hook_slow's code is
(code_of), and which of ~18 functions exist (Functions: looked up when a
backend asks, ~2 ms a name; the netfilter-link backend asks for one)."""
from __future__ import annotations

import threading

PATH = "/proc/kallsyms"

_lock = threading.Lock()
_reader: threading.Thread | None = None
_prefetched: bytes | None = None


def _read() -> bytes:
    """The file's bytes; b"" if it cannot be read (no such file, no permission)."""
    try:
        with open(PATH, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _read_ahead() -> None:
    global _prefetched
    _prefetched = _read()


def prefetch() -> None:
    """Start reading the file in a daemon thread (once; a later take() waits for it)."""
    global _reader
    with _lock:
        if _reader is None:
            _reader = threading.Thread(target=_read_ahead, name="pkttrace-kallsyms", daemon=True)
            _reader.start()


def take() -> bytes:
    """The text: the prefetched one (forgotten here: 5 MB is not kept for the
    life of a service), else read now."""
    global _reader, _prefetched
    with _lock:
        reader, _reader = _reader, None
    if reader is None:
        return _read()
    reader.join()
    text, _prefetched = _prefetched, None
    return text if text is not None else _read()


def code_of(text: bytes, name: bytes) -> tuple[int, int] | None:
    """[start, end) of a vmlinux function: its address, and the next line's
    (vmlinux's symbols are listed by address).  None where kallsyms hides
    addresses.  A plain find, not a regular expression: ~30 ms less start."""
    for kind in (b" T ", b" t "):
        at = text.find(kind + name + b"\n")
        if at < 0:
            continue
        line = text.rfind(b"\n", 0, at) + 1
        nxt = at + len(kind) + len(name) + 1
        try:
            start, end = int(text[line:at], 16), int(text[nxt:text.index(b" ", nxt)], 16)
        except ValueError:
            return None
        return (start, end) if 0 < start < end else None
    return None


def defines(text: bytes, name: bytes) -> bool:
    """Does text list `name` as a function (type t/T/w/W), of vmlinux
    ("addr T name\\n") or of a module ("addr t name\\t[module]\\n")?"""
    needle = b" " + name
    at = text.find(needle)
    while at >= 0:
        end = at + len(needle)
        if text[at - 2:at - 1] == b" " and text[at - 1:at] in (b"t", b"T", b"w", b"W") \
                and text[end:end + 1] in (b"\n", b"\t"):
            return True
        at = text.find(needle, end)
    return False


class Functions:
    """Which kernel functions kallsyms lists, found when asked and
    remembered: `name in functions`.  Holds the text until dropped."""

    def __init__(self, text: bytes):
        self._text = text
        self._known: dict[str, bool] = {}

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name not in self._known:
            self._known[name] = defines(self._text, name.encode())
        return self._known[name]

    def __repr__(self) -> str:
        found = sorted(n for n, there in self._known.items() if there)
        return f"Functions(found so far: {', '.join(found) or 'none'})"
