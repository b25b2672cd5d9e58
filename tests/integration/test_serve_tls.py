"""`pkttrace serve --web.config.file`: TLS and basic auth on a real exporter,
scraped by curl-like clients and by a real Prometheus (issue 14)."""
from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from promtools import PROMETHEUS, PrometheusServer  # noqa: E402

bcrypt = pytest.importorskip("bcrypt")
pytestmark = pytest.mark.root
OPENSSL = shutil.which("openssl")
USER, PASSWORD = "prometheus", "c0rrect horse"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_serve(tmp_path_factory, lab):
    if OPENSSL is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("web")
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "tls.key"),
                    "-out", str(d / "tls.crt")], check=True, capture_output=True, timeout=60)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    # relative file names: the toolkit resolves them against the file's directory
    (d / "web.yml").write_text(f"tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n"
                               f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tracer", "serve", "--listen", f"127.0.0.1:{port}",
                             "--netns", lab.router], env=dict(os.environ, PKTTRACE_WEB_CONFIG_FILE=str(d / "web.yml")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ctx = ssl.create_default_context(cafile=str(d / "tls.crt"))
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s, \
                    ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"serve did not come up: {proc.communicate()[1]}")
            time.sleep(0.2)
    try:
        yield port, ctx, d
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        assert "https://127.0.0.1" in proc.stderr.read()


def get(port: int, ctx, auth: tuple[str, str] | None = None, scheme: str = "https",
        path: str = "/metrics") -> tuple[int, str]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", headers=headers),
                         timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_https_with_the_right_credentials_serves_metrics(tls_serve, lab):
    port, ctx, _ = tls_serve
    status, text = get(port, ctx, (USER, PASSWORD))
    assert status == 200 and f'netns="{lab.router}"' in text


@pytest.mark.parametrize("auth", [None, (USER, "wrong"), ("admin", PASSWORD), (USER, "")],
                         ids=["no credentials", "wrong password", "unknown user", "empty password"])
def test_https_without_the_right_credentials_is_401(tls_serve, auth):
    port, ctx, _ = tls_serve
    status, text = get(port, ctx, auth)
    assert status == 401 and "pkttrace_" not in text


@pytest.mark.parametrize("path", ["/", "/page.js", "/flow.json", "/diagram.svg"])
def test_the_live_page_needs_the_same_credentials(tls_serve, lab, path):
    port, ctx, _ = tls_serve
    assert get(port, ctx, None, path=path)[0] == 401
    assert get(port, ctx, (USER, "wrong"), path=path)[0] == 401
    status, text = get(port, ctx, (USER, PASSWORD), path=path)
    assert status == 200
    if path == "/flow.json":
        assert f'"selected":"{lab.router}"' in text


def test_plain_http_gets_nothing(tls_serve):
    port, ctx, _ = tls_serve
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        get(port, ctx, (USER, PASSWORD), scheme="http")
    assert get(port, ctx, (USER, PASSWORD))[0] == 200      # and it still serves


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="Debian's prometheus package is not installed")
def test_prometheus_scrapes_over_tls_with_basic_auth(tls_serve):
    port, _, d = tls_serve
    scrape = {"scheme": "https", "tls_config": {"ca_file": str(d / "tls.crt")},
              "basic_auth": {"username": USER, "password": PASSWORD}}
    with PrometheusServer([f"127.0.0.1:{port}"], scrape=scrape) as prom:
        prom.wait_for('up{job="pkttrace"} == 1')
        assert prom.wait_for("pkttrace_build_info")
    # the same Prometheus with a wrong password sees the target down (401)
    bad = dict(scrape, basic_auth={"username": USER, "password": "wrong"})
    with PrometheusServer([f"127.0.0.1:{port}"], scrape=bad) as prom:
        down = prom.wait_for('up{job="pkttrace"} == 0')
        assert down
        errors = [t.get("lastError", "") for t in prom.api("targets")["activeTargets"]]
        assert any("401" in e for e in errors), errors


def test_a_bad_web_config_is_one_line_exit_2(tmp_path):
    (tmp_path / "web.yml").write_text("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n")
    r = subprocess.run([sys.executable, "-m", "tracer", "serve", "--web.config.file", str(tmp_path / "web.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cert_file" in r.stderr
