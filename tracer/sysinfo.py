"""What /proc says: kernel symbols and which process holds a socket.

Both are read lazily and cached: they name things in a packet's path (a
drop location, the process a datagram was queued for) but cost a scan.
"""
from __future__ import annotations

import bisect
import os
import time


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
    """Kernel address -> symbol+offset, from /proc/kallsyms (read once, lazily)."""

    def __init__(self, path: str = "/proc/kallsyms"):
        self.path = path
        self._addrs: list[int] | None = None
        self._names: list[str] = []

    def _load(self) -> None:
        pairs = []
        try:
            with open(self.path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        a = int(parts[0], 16)
                        if a:
                            pairs.append((a, parts[2]))
        except OSError:
            pass
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [nm for _, nm in pairs]

    def __call__(self, addr: int) -> str:
        if self._addrs is None:
            self._load()
        addrs = self._addrs or []
        i = bisect.bisect_right(addrs, addr) - 1
        if i < 0 or not addr:
            return hex(addr)
        return f"{self._names[i]}+{addr - addrs[i]:#x}"
