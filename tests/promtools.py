"""Test helpers around a real Prometheus (Debian's `prometheus` package, 2.42).

- PrometheusServer: a private prometheus on 127.0.0.1 scraping given targets
  every second, queried through the HTTP API.
- promtool_check_metrics: `promtool check metrics` on exposition text.
- dashboard_queries: the PromQL of every Grafana panel in dashboards/, with
  Grafana's variables replaced so that Prometheus accepts the expression.

Only the standard library: no new test dependency.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


# Talks to 127.0.0.1 only: never through an $http_proxy.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusError(Exception):
    pass


class PrometheusServer:
    """`with PrometheusServer(["127.0.0.1:9632"]) as prom: prom.wait_for("up == 1")`.

    Storage, config and log live in a temp dir removed on exit; the server is
    stopped (SIGTERM, then SIGKILL) even when the body raises.
    """

    def __init__(self, targets: list[str], *, scrape_interval: str = "1s", job: str = "pkttrace",
                 binary: str = PROMETHEUS, start_timeout: float = 30.0, scrape: dict | None = None):
        """`scrape`: more fields of the scrape config, e.g. {"scheme": "https",
        "tls_config": {"ca_file": ...}, "basic_auth": {"username": ..., "password": ...}}."""
        self.targets, self.scrape_interval, self.job = list(targets), scrape_interval, job
        self.scrape = dict(scrape or {})
        self.binary, self.start_timeout = binary, start_timeout
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None
        self.port = 0
        self.url = ""

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> PrometheusServer:
        self.dir = tempfile.mkdtemp(prefix="pkttrace-prom-")
        try:
            self._write_config()
            # The free port is probed then released, so another process can
            # take it before prometheus binds: try a few ports.
            for _ in range(3):
                if self._start():
                    self._wait_targets()
                    return self
            raise PrometheusError(f"prometheus exited: {self.log_tail()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        self._stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _write_config(self) -> None:
        # JSON is YAML: no YAML writer needed.
        cfg = {
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}],
                                **self.scrape}],
        }
        with open(os.path.join(self.dir, "prometheus.yml"), "w") as f:
            json.dump(cfg, f)

    def _start(self) -> bool:
        self._stop()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(os.path.join(self.dir, "prometheus.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary,
                 f"--config.file={self.dir}/prometheus.yml",
                 f"--storage.tsdb.path={self.dir}/data",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited, e.g. the port was taken after all
            try:
                with _http.open(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while the TSDB opens
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready within {self.start_timeout}s: {self.log_tail()}")

    def _wait_targets(self) -> None:
        # Service discovery hands targets to the scrape manager at most every
        # 5 s, so right after /-/ready there may be none yet: wait for them,
        # so that a failing wait_for() can tell "down" from "not yet known".
        deadline = time.monotonic() + self.start_timeout
        while len(self.api("targets")["activeTargets"]) < len(self.targets):
            if time.monotonic() > deadline:
                raise PrometheusError(f"targets {self.targets} not picked up: {self.log_tail()}")
            time.sleep(0.1)

    def _stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(os.path.join(self.dir, "prometheus.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except (OSError, TypeError):
            return ""

    # -- queries -----------------------------------------------------------
    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns `data`, raises PrometheusError on an API error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with _http.open(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error in JSON
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"{path}: HTTP {e.code}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{params.get('query', path)!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list:
        """Instant query; the result list (vector/matrix), a scalar or string wrapped in a list."""
        data = self.api("query", query=expr)
        res = data["result"]
        return res if data["resultType"] in ("vector", "matrix") else [res]

    def wait_for(self, expr: str, timeout: float = 30.0, interval: float = 0.5) -> list:
        """Poll until `expr` returns a non-empty result; returns it (PrometheusError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.query(expr)
            if res:
                return res
            if time.monotonic() > deadline:
                targets = self.api("targets")["activeTargets"]
                health = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
                raise PrometheusError(f"no result for {expr!r} within {timeout}s; targets: {health}")
            time.sleep(interval)


def promtool_check_metrics(text: str, promtool: str = PROMTOOL) -> tuple[bool, str]:
    """Lint exposition text with `promtool check metrics`: (no problems, what it said)."""
    r = subprocess.run([promtool, "check", "metrics"], check=False, input=text, capture_output=True, text=True,
                       timeout=60)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


# -- Grafana dashboards ------------------------------------------------------

# Grafana's built-in variables, as Prometheus durations / numbers.  With a 1s
# scrape interval any window of a few seconds holds enough samples for rate().
_BUILTINS = {"__interval": "15s", "__interval_ms": "15000", "__range": "5m", "__range_s": "300",
             "__range_ms": "300000"}

# $var, ${var}, ${var:format}, [[var]]
_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")


def _panels(panels: list) -> list:
    """Every panel, including those inside collapsed rows."""
    out = []
    for p in panels or []:
        out.append(p)
        out.extend(_panels(p.get("panels")))
    return out


def _variables(dash: dict) -> tuple[set[str], dict[str, str]]:
    """(names whose values are label values, {name: fixed value}) from the templating list."""
    label_vars, fixed = set(), {}
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") in ("query", "adhoc"):
            label_vars.add(v["name"])
        elif v.get("type") in ("custom", "constant", "textbox", "interval"):
            cur = (v.get("current") or {}).get("value")
            if isinstance(cur, list):
                cur = cur[0] if cur else None
            if cur in (None, "", "$__all"):
                opts = v.get("options") or []
                cur = opts[0]["value"] if opts else str(v.get("query", "")).split(",")[0].strip()
            fixed[v["name"]] = str(cur)
    return label_vars, fixed


def expand(expr: str, label_vars: set[str] = frozenset(), fixed: dict[str, str] | None = None,
           rate_interval: str = "1m") -> str:
    """Replace Grafana variables by values Prometheus accepts.

    A label-value variable becomes a match-anything regex: `l="$v"` and
    `l=~"$v"` both turn into `l=~".*"` (".*" also matches series without the
    label, e.g. the host's empty netns).  $__rate_interval becomes
    `rate_interval`, the other built-ins fixed durations, custom/constant
    variables their current value.
    """
    fixed = dict(fixed or {})
    builtins = {**_BUILTINS, "__rate_interval": rate_interval}

    def matcher(m: re.Match) -> str:
        name = m.group(2) or m.group(3) or m.group(4)
        return f'{m.group(1)}=~".*"' if name in label_vars else m.group(0)

    # label matchers whose whole value is one variable
    expr = re.sub(r'(\w+)\s*=~?\s*"(?:\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\])"', matcher, expr)

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in builtins:
            return builtins[name]
        if name in fixed:
            return fixed[name]
        if name in label_vars:
            return ".*"
        return m.group(0)  # unknown: left for the caller to notice

    return _VAR.sub(value, expr)


def dashboard_queries(path_or_dir: str, rate_interval: str = "1m") -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expanded expr) for every Prometheus target.

    `path_or_dir`: one dashboard JSON file, or a directory whose *.json files
    are dashboards.  Hidden targets (`"hide": true`) are skipped.
    """
    paths = sorted(glob.glob(os.path.join(path_or_dir, "*.json"))) if os.path.isdir(path_or_dir) else [path_or_dir]
    out = []
    for path in paths:
        with open(path) as f:
            dash = json.load(f)
        label_vars, fixed = _variables(dash)
        for panel in _panels(dash.get("panels", [])):
            for t in panel.get("targets") or []:
                if t.get("expr") and not t.get("hide"):
                    out.append((dash.get("title", os.path.basename(path)), panel.get("title", ""),
                                expand(t["expr"], label_vars, fixed, rate_interval)))
    return out
