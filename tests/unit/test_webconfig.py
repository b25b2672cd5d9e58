"""tracer/webconfig.py: the exporter-toolkit web-config file, and the
metrics server over TLS with basic auth (no root: a plain registry)."""
from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from tracer import webconfig
from tracer.httpd import MetricsServer
from tracer.webconfig import WebConfigError

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)   # htpasswd writes 2y


def make_cert(d, name="server", cn="127.0.0.1") -> tuple[str, str]:
    crt, key = os.path.join(d, f"{name}.crt"), os.path.join(d, f"{name}.key")
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", f"subjectAltName=IP:{cn}", "-keyout", key, "-out", crt],
                   check=True, capture_output=True, timeout=60)
    return crt, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("certs")
    crt, key = make_cert(str(d))
    other_crt, other_key = make_cert(str(d), "other")
    return d, crt, key, other_key


def write(d, text: str) -> str:
    p = os.path.join(d, "web.yml")
    with open(p, "w") as f:
        f.write(text)
    return p


# --- parsing ----------------------------------------------------------------

def test_empty_file_is_plain_http(tmp_path):
    cfg = webconfig.load(write(tmp_path, ""))
    assert cfg.ssl_context is None and cfg.users == {}


@needs_openssl
def test_relative_paths_are_the_files_directory(certs):
    d, *_ = certs
    cfg = webconfig.load(write(d, f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                  f"basic_auth_users:\n  prom: '{HASH}'\n"))
    assert isinstance(cfg.ssl_context, ssl.SSLContext) and cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cfg.users == {"prom": HASH.encode()}


@pytest.mark.parametrize("text, said", [
    ("- a\n- b\n", "must be a mapping"),
    ("tls_server_config: {}\n", "cert_file and tls_server_config.key_file are both required"),
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "not a readable file"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n", "cert_file/key_file"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS99\n", "min_version"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  cipher_suites: [x]\n",
     "cipher_suites is not supported"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", "needs tls_server_config.client_ca_file"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: Maybe\n",
     "client_auth_type 'Maybe'"),
    ("tls_config:\n  cert_file: a\n", "unknown field tls_config"),
    ("basic_auth_users:\n  prom: plaintext\n", "not a bcrypt hash"),
    ("basic_auth_users:\n  'a:b': '" + HASH + "'\n", "without ':'"),
    ("basic_auth_users: [prom]\n", "must be a mapping"),
    ("http_server_config:\n  headers:\n    Content-Type: x\n", "set by the server"),
    ("http_server_config:\n  http2: maybe\n", "http2 must be true or false"),
    ("tls_server_config: [\n", "not YAML at line"),
])
@needs_openssl
def test_bad_files_are_one_line(certs, text, said):
    d, *_ = certs
    with pytest.raises(WebConfigError) as e:
        webconfig.load(write(d, text))
    msg = str(e.value)
    assert said in msg and "\n" not in msg and msg.startswith("--web.config.file ")


def test_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for p in (str(tmp_path / "fifo"), str(tmp_path), "/dev/null", str(tmp_path / "absent"), ""):
        with pytest.raises(WebConfigError):
            webconfig.load(p)


# --- basic auth ---------------------------------------------------------------

def call(app, auth: str | None):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"}
    if auth is not None:
        environ["HTTP_AUTHORIZATION"] = auth
    seen = {}
    body = b"".join(app(environ, lambda status, headers, exc=None: seen.update(status=status, headers=headers)))
    return seen["status"], dict(seen["headers"]), body


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_basic_auth_accepts_only_the_right_password():
    inner = []
    app = webconfig.BasicAuth(lambda env, sr: inner.append(1) or sr("200 OK", []) or [b"ok"], {"prom": HASH.encode()})
    assert call(app, basic("prom", "s3cret"))[0] == "200 OK"
    assert call(app, basic("prom", "s3cret"))[0] == "200 OK"       # the cached check
    for auth in (None, basic("prom", "wrong"), basic("other", "s3cret"), "Basic !!!", "Bearer x",
                 basic("prom", "s3cret").replace("Basic", "Digest"), "Basic " + base64.b64encode(b"nocolon").decode()):
        status, headers, _ = call(app, auth)
        assert status == "401 Unauthorized" and headers["WWW-Authenticate"].startswith("Basic realm=")
    assert len(inner) == 2


def test_an_unknown_user_costs_a_bcrypt_check_too():
    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=10))
    app = webconfig.BasicAuth(lambda env, sr: [b""], {"prom": slow})
    t0 = time.monotonic()
    call(app, basic("prom", "wrong"))
    known = time.monotonic() - t0
    t0 = time.monotonic()
    call(app, basic("nobody", "wrong"))
    unknown = time.monotonic() - t0
    assert unknown > known / 3          # same order: user names are not told apart by time


# --- the server over TLS ------------------------------------------------------

@pytest.fixture
def tls_server(certs):
    d, crt, key, _ = certs
    reg = CollectorRegistry()
    Counter("pkttrace_test", "A counter", registry=reg).inc()
    cfg = webconfig.load(write(d, f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n"
                                  f"basic_auth_users:\n  prom: '{HASH}'\n"))
    srv = MetricsServer("127.0.0.1", 0, webconfig.wrap(make_wsgi_app(reg), cfg), idle_timeout=2.0,
                        ssl_context=cfg.ssl_context).start()
    yield srv, crt
    srv.close()


def https_get(port: int, crt: str, auth: str | None = None) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=crt)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    req = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers={"Authorization": auth} if auth else {})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_https_with_and_without_credentials(tls_server):
    srv, crt = tls_server
    port = srv.server_address[1]
    status, body = https_get(port, crt, basic("prom", "s3cret"))
    assert status == 200 and b"pkttrace_test_total 1.0" in body
    assert https_get(port, crt)[0] == 401
    assert https_get(port, crt, basic("prom", "wrong"))[0] == 401


def test_stalled_handshakes_and_plain_http_do_not_block_scrapes(tls_server):
    srv, crt = tls_server
    port = srv.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")        # a ClientHello cut short
    plain = socket.create_connection(("127.0.0.1", port), timeout=5)
    plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        t0 = time.monotonic()
        assert https_get(port, crt, basic("prom", "s3cret"))[0] == 200
        assert time.monotonic() - t0 < 2
        try:
            answer = plain.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert b"pkttrace_test" not in answer and not answer.startswith(b"HTTP/")   # never served in clear
        deadline = time.monotonic() + 5
        while srv.stats["tls_failed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.stats["tls_failed"] >= 1
        # the stalled ones are closed by the idle timeout (2 s here), not kept
        deadline = time.monotonic() + 6
        while srv.open_connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.open_connections == 0
    finally:
        for s in idle + [half, plain]:
            s.close()
