"""A child process's output, line by line, as it comes (integration tests)."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable


class Lines:
    """A stream of a process, read in a thread; every line read is kept in .all."""

    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def wait_for(self, match: str | Callable[[str], bool], timeout: float = 15.0) -> str:
        """The next line containing match (a str) or satisfying it (a predicate)."""
        want = match if callable(match) else (lambda line: match in line)
        what = "a matching line" if callable(match) else repr(match)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout}s; saw {self.all}") from None
            if line is None:
                raise AssertionError(f"stream ended without {what}; saw {self.all}")
            self.all.append(line)
            if want(line):
                return line

    def rest(self) -> list[str]:
        """Every line until the stream ends."""
        while True:
            line = self.q.get(timeout=10)
            if line is None:
                return self.all
            self.all.append(line)
