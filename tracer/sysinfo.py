"""What /proc says: kernel symbols and which process holds a socket.

Both are read lazily and cached: they name things in a packet's path (a
drop location, the process a datagram was queued for) but cost a scan.
"""
from __future__ import annotations

import bisect
import ctypes
import os
import time
from array import array


class SocketOwners:
    """Socket inode -> (pid, comm) of a process holding it, from /proc/*/fd.

    Scanning /proc is slow, so results are cached and a full rescan happens
    at most every `min_interval` seconds, only for inodes not yet known.
    """

    def __init__(self, proc: str = "/proc", min_interval: float = 0.5):
        self.proc, self.min_interval = proc, min_interval
        self._owners: dict[int, tuple[int, str]] = {}
        self._scanned = float("-inf")

    def _scan(self) -> None:
        owners: dict[int, tuple[int, str]] = {}
        for pid in (d for d in os.listdir(self.proc) if d.isdigit()):
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    ino = int(target[8:-1])
                    if ino not in owners:
                        owners[ino] = (int(pid), self._comm(pid))
        self._owners = owners

    def _comm(self, pid: str) -> str:
        try:
            with open(f"{self.proc}/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return "?"

    def __call__(self, inode: int) -> tuple[int, str] | None:
        if inode not in self._owners and time.monotonic() - self._scanned >= self.min_interval:
            self._scanned = time.monotonic()
            self._scan()
        return self._owners.get(inode)


class Kallsyms:
    """Kernel address -> symbol+offset, from /proc/kallsyms (read once, lazily).

    Held compact: a 6.18 kernel lists ~120,000 text symbols, which as Python
    lists of ints and strs took ~25 MB of a service's RSS (serve's budget is
    60 MB; its first scrape with a drop on a path loaded them).  An array of
    addresses, one blob of the names and an array of where each ends take
    ~4.5 MB, and nothing per symbol is built while reading.
    """

    def __init__(self, path: str = "/proc/kallsyms"):
        self.path = path
        self._tables: list[_Symbols] | None = None

    def _load(self) -> None:
        # Two passes: the first counts, the second fills arrays made at
        # their size.  Arrays grown symbol by symbol are copied as they grow,
        # and in a process whose heap serves the large blocks (serve's, after
        # libbpf's loads) the copies peaked ~4 MB above the final size
        # (54.7 MiB for a final 50.6, measured in one serve).  vmlinux lists its symbols by address and modules sit above
        # it; BPF programs and trampolines come last, below the modules:
        # those few are set aside in a second table (sorting all would copy
        # all).  The file may change between the passes (a module or BPF
        # program loaded): what does not fit is appended, what is missing cut.
        n = size = 0
        for a, name in self._text_symbols():
            n, size = n + 1, size + len(name)
        main = _Symbols(n, size)
        aside = []
        for a, name in self._text_symbols():
            if main.n and a < main.last:
                aside.append((a, name))
            else:
                main.add(a, name)
        main.cut()
        more = _Symbols(len(aside), sum(len(name) for _, name in aside))
        for a, name in sorted(aside):
            more.add(a, name)
        self._tables = [main, more]
        _trim_heap()   # the lines read: back to the system

    def _text_symbols(self):
        """(address, name) of each text symbol, as kallsyms lists them."""
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    parts = line.split(None, 3)
                    if len(parts) < 3 or parts[1] not in (b"t", b"T", b"w", b"W"):
                        continue
                    try:
                        a = int(parts[0], 16)
                    except ValueError:
                        continue
                    if a:                # zeroed: kallsyms hides addresses from this reader
                        yield a, parts[2]
        except OSError:
            return

    def __call__(self, addr: int) -> str:
        if self._tables is None:
            self._load()
        best: tuple[int, _Symbols, int] | None = None
        for t in self._tables or ():
            i = bisect.bisect_right(t.addrs, addr) - 1
            if i >= 0 and (best is None or t.addrs[i] > best[0]):
                best = (t.addrs[i], t, i)
        if best is None or not addr:
            return hex(addr)
        start, t, i = best
        return f"{t.name(i)}+{addr - start:#x}"


class _Symbols:
    """Symbols sorted by address, in arrays made for n symbols of size
    bytes of names: names[ends[i-1]:ends[i]] is symbol i's."""

    def __init__(self, n: int = 0, size: int = 0):
        self.addrs, self.ends = array("Q", bytes(8)) * n, array("I", bytes(4)) * n
        self.names = bytearray(size)
        self.n = self.used = 0           # symbols and name bytes filled
        self.last = 0                    # the last address added

    def add(self, addr: int, name: bytes) -> None:
        i, end = self.n, self.used + len(name)
        if i < len(self.addrs) and end <= len(self.names):
            self.addrs[i], self.ends[i] = addr, end
            self.names[self.used:end] = name
        else:                            # more than counted: kallsyms grew between the passes
            self.cut()
            self.addrs.append(addr)
            self.ends.append(end)
            self.names += name
        self.n, self.used, self.last = i + 1, end, addr

    def cut(self) -> None:
        """Drop the room counted but not filled."""
        del self.addrs[self.n:]
        del self.ends[self.n:]
        del self.names[self.used:]

    def name(self, i: int) -> str:
        return self.names[self.ends[i - 1] if i else 0:self.ends[i]].decode(errors="replace")


def _trim_heap() -> None:
    """glibc's malloc_trim(0): the freed pages of the heap's middle too."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to give back this way
        pass
