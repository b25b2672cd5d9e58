"""The HTTP app of `pkttrace serve` (tracer/page.py): /metrics as before,
the page, its files and data, 404 elsewhere, and the web-config's basic
auth in front of all of it."""
from __future__ import annotations

import base64
import io
import json
import re
import xml.etree.ElementTree as ET
from wsgiref.util import setup_testing_defaults

import pytest

from tracer import page, webconfig

from test_diagram import snapshot


def metrics_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
    return [b"pkttrace_build_info 1\n"]


def call(app, path: str, method: str = "GET", auth: str | None = None) -> tuple[str, dict, bytes]:
    path, _, query = path.partition("?")
    env: dict = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": method, "wsgi.input": io.BytesIO()}
    if auth:
        env["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(auth.encode()).decode()
    setup_testing_defaults(env)
    got: dict = {}

    def start_response(status, headers, exc_info=None):
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app(env, start_response))
    return got["status"], got["headers"], body


@pytest.fixture
def app():
    return page.App(metrics_app, snapshot)


def test_metrics_is_the_prometheus_app_unchanged(app):
    status, headers, body = call(app, "/metrics")
    assert status == "200 OK" and body == b"pkttrace_build_info 1\n"
    assert headers == {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}


@pytest.mark.parametrize("path,ctype", [("/", "text/html; charset=utf-8"),
                                        ("/page.js", "text/javascript; charset=utf-8"),
                                        ("/page.css", "text/css; charset=utf-8"),
                                        ("/diagram.css", "text/css; charset=utf-8"),
                                        ("/favicon.svg", "image/svg+xml; charset=utf-8"),
                                        ("/diagram.svg", "image/svg+xml; charset=utf-8"),
                                        ("/flow.json", "application/json")])
def test_the_page_its_files_and_data(app, path, ctype):
    status, headers, body = call(app, path)
    assert status == "200 OK" and headers["Content-Type"] == ctype and int(headers["Content-Length"]) == len(body)
    # nothing inline may run: scripts and styles only from the page's own files
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert call(app, path, "HEAD")[2] == b""


def test_the_html_loads_only_its_own_files_and_has_no_inline_script(app):
    html = call(app, "/")[2].decode()
    assert '<script src="page.js" defer></script>' in html
    assert html.count("<script") == 1 and not re.search(r"\son[a-z]+\s*=", html)     # no onclick=...
    js = call(app, "/page.js")[2].decode()
    # names from the host are set as text, never parsed as HTML or code
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "new Function", "document.write"):
        assert banned not in js


def test_flow_json_and_the_svg_are_of_the_asked_netns(app):
    f = json.loads(call(app, "/flow.json")[2])
    assert f["selected"] == "other" and f["netns"] == ["other", "r"]        # the first one by default
    f = json.loads(call(app, "/flow.json?netns=r")[2])
    assert f["selected"] == "r" and f["edges"]["route>forward"] == 13
    svg = ET.fromstring(call(app, "/diagram.svg?netns=r")[2])
    assert svg.get("data-layout") == f["layout"]
    assert call(app, "/flow.json?netns=nope")[0].startswith("404")


def test_the_hosts_own_netns_is_the_empty_name():
    from test_diagram import PL, Snap
    from collections import Counter
    host = page.App(metrics_app, lambda: Snap(1.0, [(PL(("output", "postrouting", "tx"), "sent", netns=""), 3)],
                                              Counter(), {"": {}}))
    for path in ("/flow.json", "/flow.json?netns="):
        f = json.loads(call(host, path)[2])
        assert f["netns"] == [""] and f["selected"] == "" and f["boxes"]["output"]["packets"] == 3


@pytest.mark.parametrize("path", ["/index.html", "/metrics/", "/page.js/x", "/../tracer/page.py", "/web/page.js",
                                  "/favicon.ico", "/page.html"])
def test_anything_else_is_404(app, path):
    status, headers, _ = call(app, path)
    assert status == "404 Not Found" and headers["Content-Type"].startswith("text/plain")


def test_other_methods_are_refused(app):
    status, headers, _ = call(app, "/flow.json", "POST")
    assert status.startswith("405") and headers["Allow"] == "GET, HEAD"


def test_basic_auth_covers_the_page_too():
    bcrypt = pytest.importorskip("bcrypt")
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4))
    app = webconfig.wrap(page.App(metrics_app, snapshot), webconfig.WebConfig("web.yml", users={"prom": hashed}))
    for path in ("/", "/page.js", "/favicon.svg", "/flow.json", "/diagram.svg", "/metrics", "/nope"):
        assert call(app, path)[0].startswith("401"), path
        assert call(app, path, auth="prom:wrong")[0].startswith("401"), path
    for path in ("/", "/page.js", "/flow.json", "/diagram.svg", "/metrics"):
        assert call(app, path, auth="prom:s3cret")[0] == "200 OK", path
    assert call(app, "/nope", auth="prom:s3cret")[0].startswith("404")
