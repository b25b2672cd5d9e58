"""The live traversal page in a real browser: `pkttrace serve` on the lab
with traffic and drops, the page loaded in headless Chromium (Debian's
`chromium`), and the DOM checked after real updates (issue 15)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.request

import pytest

from tracer import demo, diagram

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chromium import CHROMIUM, Chromium  # noqa: E402
from servectl import serving  # noqa: E402

pytestmark = pytest.mark.root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# PKTTRACE_SCREENSHOT=docs/page.png: also write the README's screenshot there
SCREENSHOT = os.environ.get("PKTTRACE_SCREENSHOT")


@pytest.fixture(scope="module")
def served(lab):
    """`pkttrace serve` on the lab router."""
    demo.setup(lab)
    with serving(lab.router) as (_, port):
        yield port


@pytest.fixture
def traffic(lab):
    """Forwarded, delivered, locally sent and dropped packets, all the time the test runs."""
    stop = threading.Event()
    a = lab.addr

    def run():
        while not stop.is_set():
            lab.ping(lab.client, a["server4"], count=2, timeout=1)       # forwarded both ways
            lab.ping(lab.client, a["router_c4"], timeout=1)              # delivered, and the reply sent
            lab.udp_send(lab.client, a["server4"], 5001)                 # marked, policy-routed
            lab.udp_send(lab.router, a["server4"], 5003)                 # sent, rerouted
            lab.udp_send(lab.client, a["server4"], 5009, count=3)        # dropped by FORWARD's filter
            time.sleep(0.1)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    yield
    stop.set()
    th.join(10)


def per_second(text: str) -> float | None:
    """`12.3/s  (456)`, `1.2k/s` -> 12.3, 1200; `–` (no rate yet) -> None."""
    m = re.match(r"\s*([0-9.]+)(k?)/s", text or "")
    if not m:
        return None
    return float(m.group(1)) * (1000 if m.group(2) else 1)


STATE = """(() => {
  const t = (id) => { const el = document.getElementById(id); return el ? el.textContent : null; };
  const rows = (sel) => Array.from(document.querySelectorAll(sel + " tbody tr"), (tr) =>
      Array.from(tr.cells, (c) => c.textContent));
  const boxes = Array.from(document.querySelectorAll("#drawing svg g.box"), (g) => g.getAttribute("data-box"));
  const rates = {}, drops = {}, edges = {};
  for (const b of boxes) { rates[b] = t("rate-" + b); drops[b] = t("drop-" + b); }
  for (const e of document.querySelectorAll("#drawing svg path.edge")) {
    edges[e.id.slice(5)] = {label: t("el-" + e.id.slice(5)), cls: e.getAttribute("class")};
  }
  return {updates: Number(document.body.getAttribute("data-updates")), boxes, rates, drops, edges,
          dropRows: rows("#drops"), dropBox: t("dr-0"), status: t("status"),
          forwardTables: [t("tv-forward-0")], netnsHidden: document.getElementById("netns-label").hidden};
})()"""


def test_the_page_shows_the_boxes_live_rates_and_drops(served, traffic, lab, tmp_path):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: scripts/setup.sh installs Debian's chromium package"
    url = f"http://127.0.0.1:{served}/?interval=1"
    headers = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10).headers
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    with Chromium() as browser:
        browser.goto(url)
        # three reads: the first gives totals, each next one rates over the time since the previous
        browser.wait_for("Number(document.body.getAttribute('data-updates')) >= 3", timeout=40)
        state = browser.wait_for(f"(() => {{ const s = {STATE}; return s.dropRows.length && "
                                 f"parseFloat(s.rates.forward) > 0 ? s : null; }})()", timeout=20)
        assert set(state["boxes"]) == {b.id for b in diagram.BOXES}
        assert not state["status"].startswith("error"), state["status"]
        assert state["netnsHidden"]                          # one netns traced: no selector
        # packets per second through the forwarding path, the local path and the drop
        for box in ("ingress", "prerouting", "route", "forward", "local", "output"):
            assert (per_second(state["rates"][box]) or 0) > 0, (box, state["rates"])
        for edge in ("ingress-prerouting", "route-forward", "forward-postrouting", "route-input"):
            assert (per_second(state["edges"][edge]["label"]) or 0) > 0, (edge, state["edges"][edge])
            assert "idle" not in state["edges"][edge]["cls"]
        assert per_second(state["forwardTables"][0]) is not None          # FORWARD's filter table row
        # the drop: on FORWARD's box, in the drop box, and in the table of drop reasons
        assert state["drops"]["forward"].startswith("✕ ")
        assert "NETFILTER_DROP @ forward / filter" in state["dropBox"]
        reason, stage, table, rate, count = next(r for r in state["dropRows"] if r[0] == "NETFILTER_DROP")
        assert (stage, table) == ("forward", "filter")
        # the path map has room for every path here: no drop may read as one it could not hold
        assert not [r for r in state["dropRows"] if r[1] == "(overflow)"], state["dropRows"]
        assert int(count.replace(",", "")) > 0 and (per_second(rate) or 0) > 0
        # a click on a box: its tables and the drop reasons there in the side panel
        browser.evaluate("document.getElementById('box-forward').dispatchEvent(new MouseEvent('click', "
                         "{bubbles: true}))")
        panel = browser.wait_for("""(() => {
            const rows = (id) => Array.from(document.querySelectorAll('#' + id + ' tbody tr'),
                                            (tr) => Array.from(tr.cells, (c) => c.textContent));
            const p = {title: document.getElementById('panel-title').textContent,
                       tables: rows('panel-tables'), drops: rows('panel-drops')};
            return p.tables.length && p.drops.length ? p : null; })()""", timeout=10)
        assert panel["title"].startswith("FORWARD")
        assert [r[0] for r in panel["tables"]] == ["filter"] and panel["tables"][0][1] == "0"
        assert panel["drops"][0][:2] == ["NETFILTER_DROP", "filter"]
        assert browser.evaluate("document.getElementById('box-forward').classList.contains('selected')")
        assert browser.console_errors() == []
        # the Content-Security-Policy holds: a script injected inline (as a host name that got
        # into the DOM as HTML would be) does not run, and the browser says why
        browser.evaluate("(() => { const s = document.createElement('script'); s.textContent = "
                         "'window.injected = 1'; document.body.appendChild(s); })()")
        assert browser.evaluate("window.injected === undefined")
        deadline = time.monotonic() + 5
        while not any("Content Security Policy" in e for e in browser.console_errors()):
            assert time.monotonic() < deadline, browser.console_errors()
            browser.evaluate("0")        # reads the events that came meanwhile
        browser.screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if SCREENSHOT:
            shutil.copy(tmp_path / "page.png", os.path.join(REPO, SCREENSHOT))


def choose(browser: Chromium, netns: str) -> None:
    """Pick a netns in the page's selector, as a user does."""
    browser.evaluate(f"(() => {{ const s = document.getElementById('netns'); s.value = {json.dumps(netns)}; "
                     "s.dispatchEvent(new Event('change')); })()")


def test_several_namespaces_get_a_selector(lab, traffic):
    with serving(lab.router, lab.client) as (_, port), Chromium() as browser:
        browser.goto(f"http://127.0.0.1:{port}/?interval=1")
        browser.wait_for("Number(document.body.getAttribute('data-updates')) >= 1", timeout=40)
        options = browser.evaluate("Array.from(document.getElementById('netns').options, (o) => o.value)")
        assert sorted(options) == sorted([lab.router, lab.client])
        assert browser.evaluate("document.getElementById('netns-label').hidden") is False
        # the router's drawing: its caption, its FORWARD rates, its filter table
        choose(browser, lab.router)
        state = browser.wait_for(f"""(() => {{
            const t = (id) => document.getElementById(id).textContent;
            return t('caption') === 'netns {lab.router}' && parseFloat(t('rate-forward')) > 0
                ? {{forward: t('rate-forward'), table: t('tv-forward-0')}} : null; }})()""", timeout=20)
        assert per_second(state["forward"]) > 0
        # the client's: it forwards nothing, it sends and receives
        choose(browser, lab.client)
        state = browser.wait_for(f"""(() => {{
            const t = (id) => document.getElementById(id).textContent;
            return t('caption') === 'netns {lab.client}' && parseFloat(t('rate-output')) > 0
                ? {{forward: t('rate-forward'), output: t('rate-output'), local: t('rate-local')}} : null; }})()""",
                                 timeout=20)
        assert per_second(state["forward"]) == 0 and per_second(state["local"]) > 0
        assert browser.console_errors() == []
