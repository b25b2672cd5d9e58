"""The HTTP side of `pkttrace serve`: /metrics and the live traversal page.

One WSGI application, wrapped as a whole by webconfig (TLS, basic auth,
headers), so the page and its data need the same credentials as /metrics:

    /metrics        prometheus-client's own app, unchanged
    /               the page (tracer/web/page.html), its script and styles
    /diagram.svg    the drawing of one netns (tracer/diagram.py), ?netns=NAME
    /flow.json      the counters of one netns by the drawing's ids, ?netns=NAME

The page asks /flow.json every few seconds; the counters are totals since
serve started, and the page computes rates from the difference between two
answers and the time between them (`t`, the server's monotonic clock): the
server keeps no history and any number of pages can watch.  Anything else
is 404.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs

from . import diagram

# what the page may load: its own files and data, nothing inline, no eval
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"/": ("page.html", "text/html; charset=utf-8"),
          "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8"),
          "/diagram.css": ("diagram.css", "text/css; charset=utf-8"),
          "/favicon.svg": ("favicon.svg", "image/svg+xml; charset=utf-8")}
_COMMON = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
           ("Content-Security-Policy", CSP)]


def _static() -> dict[str, tuple[bytes, str]]:
    web = resources.files("tracer").joinpath("web")
    return {path: (web.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in STATIC.items()}


class App:
    """WSGI: dispatch by path.  `snapshot()` reads the exporter's counters
    (exporter.Collector.snapshot: the same read a scrape makes)."""

    def __init__(self, metrics_app: Callable, snapshot: Callable[[], Any]):
        self.metrics_app = metrics_app
        self.snapshot = snapshot
        self.files = _static()           # read once: a page load never touches the disk

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return self.metrics_app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        known = path in self.files or path in ("/flow.json", "/diagram.svg")
        if not known:
            return _plain(start_response, "404 Not Found", "not found: /metrics, or the page at /\n")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "GET or HEAD\n", [("Allow", "GET, HEAD")])
        if path in self.files:
            body, ctype = self.files[path]
            return _send(start_response, body, ctype, cache="no-cache", head=method == "HEAD")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        snap = self.snapshot()
        names = diagram.namespaces(snap)
        asked = query.get("netns", [None])[0]
        if asked is not None and asked not in names:
            return _plain(start_response, "404 Not Found", "no such traced netns\n")
        ns = asked if asked is not None else (names[0] if names else "")
        flow = diagram.flow(snap, ns)
        if path == "/flow.json":
            body = json.dumps(flow, separators=(",", ":")).encode()
            return _send(start_response, body, "application/json", cache="no-store", head=method == "HEAD")
        # the same table rows as the flow's, so `tv-<box>-<i>` name the same tables
        return _send(start_response, diagram.render(diagram.rows_of(flow)).encode(),
                     "image/svg+xml; charset=utf-8", cache="no-store", head=method == "HEAD")


def _send(start_response, body: bytes, ctype: str, cache: str, head: bool = False) -> list[bytes]:
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                              ("Cache-Control", cache), *_COMMON])
    return [] if head else [body]


def _plain(start_response, status: str, text: str, extra: list | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            *_COMMON, *(extra or [])])
    return [body]
