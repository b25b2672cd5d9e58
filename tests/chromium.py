"""Headless Chromium driven over the DevTools protocol, standard library only.

`--remote-debugging-pipe`: Chromium reads commands on fd 3 and writes
answers and events on fd 4, each a JSON message ended by a NUL byte.  Unlike
`--dump-dom --virtual-time-budget`, the page runs in real time, so the
rates it computes between two reads of a live exporter are real ones.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"       # Debian's package (scripts/setup.sh installs it)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars"]


class CdpError(Exception):
    pass


class Chromium:
    """One headless browser with one page, closed with the `with` block."""

    def __init__(self, width: int = 1400, height: int = 900, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="ptp-chromium-")
        # the child's ends above 9 first, so that putting them at 3 and 4 never overwrites one with the other
        r, self._w = os.pipe()
        self._r, w = os.pipe()
        to_chrome_r, from_chrome_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (r, w))
        os.close(r)
        os.close(w)
        def pipe_fds() -> None:
            # in the child, before exec: the pipe ends where Chromium looks for them
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     pass_fds=(3, 4), preexec_fn=pipe_fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                             "deviceScaleFactor": 1, "mobile": False}, page=True)
            self.send("Page.enable", page=True)
            self.send("Runtime.enable", page=True)
            self.send("Log.enable", page=True)      # CSP violations, failed loads
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise CdpError("no answer from chromium in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None \
                    else ""
                raise CdpError(f"chromium closed the pipe: {err}")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, page: bool = False) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._message(deadline)
            if m.get("id") != self._id:
                self.events.append(m)
                continue
            if "error" in m:
                raise CdpError(f"{method}: {m['error']}")
            return m["result"]

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, page=True)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-able)."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      page=True)
        if "exceptionDetails" in r:
            raise CdpError(f"{expression[:60]}...: {r['exceptionDetails'].get('text')} "
                           f"{r['exceptionDetails'].get('exception', {}).get('description', '')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, every: float = 0.2):
        """Evaluate until the expression is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                v = self.evaluate(expression)
            except CdpError as e:
                # the page is still loading (no body yet, a context replaced): ask again
                v, last = None, e
            else:
                last = None
            if v:
                return v
            if time.monotonic() > deadline:
                raise CdpError(f"timed out waiting for {expression}" + (f" ({last})" if last else ""))
            time.sleep(every)

    def console_errors(self) -> list[str]:
        """What the page said went wrong (exceptions, CSP violations, console errors)."""
        out = []
        for m in self.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "") + " " +
                           p["exceptionDetails"].get("exception", {}).get("description", ""))
            elif m.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
            elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        return out

    def screenshot(self, path: str) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close")
            except (CdpError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)
