"""The metrics endpoint's TLS and basic auth, from a Prometheus exporter
web-config file (the `--web.config.file` of the exporter-toolkit, which
node_exporter and the others read), so the file an operator already has
for them works here:

    tls_server_config:
      cert_file: server.crt        # relative paths: to the file's directory
      key_file: server.key
      # client_ca_file: ca.crt
      # client_auth_type: RequireAndVerifyClientCert
      # min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...       # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':')

Everything is checked when the file is read (before root is asked for and
before any BPF is loaded): an unknown key, a missing file, a key that does
not match its certificate or a hash that is not bcrypt is one line, exit 2.
Fields of the toolkit pkttrace does not implement (cipher_suites, ...) are
refused rather than ignored: a setting that silently does nothing is worse
than an error.  PyYAML and bcrypt are needed only when such a file is given
(the `web` extra).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import ssl
import stat
import threading
from dataclasses import dataclass, field


class WebConfigError(Exception):
    """The file cannot be used; the message is one line naming the file."""


# exporter-toolkit's names for Go's tls.ClientAuthType values Python's ssl has
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1, "TLS12": ssl.TLSVersion.TLSv1_2,
                 "TLS13": ssl.TLSVersion.TLSv1_3}
_TOP = {"tls_server_config", "http_server_config", "basic_auth_users"}
_TLS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"}
# in exporter-toolkit's format, not implemented here: refused by name
_TLS_UNSUPPORTED = {"cert", "key", "client_ca", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
                    "client_allowed_sans"}
_HTTP = {"http2", "headers"}


@dataclass
class WebConfig:
    path: str
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)      # user -> bcrypt hash
    headers: list[tuple[str, str]] = field(default_factory=list)


def load(path: str) -> WebConfig:
    """Read and check the file: a regular file only (a FIFO nobody writes
    to would hang the start, a device could be read forever)."""
    if not path or "\0" in path:
        raise WebConfigError(f"--web.config.file {path!r}: not a file name")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise WebConfigError(f"--web.config.file {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WebConfigError(f"--web.config.file {path}: not a regular file")
        with open(os.dup(fd), encoding="utf-8") as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as e:
        raise WebConfigError(f"--web.config.file {path}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") \
            from None
    finally:
        os.close(fd)
    return parse(text, path)


def parse(text: str, path: str) -> WebConfig:
    where = f"--web.config.file {path}"
    try:
        import yaml
    except ImportError:
        raise WebConfigError(f"{where}: reading it needs PyYAML (pip install pyyaml, or apt install python3-yaml)") \
            from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise WebConfigError(f"{where}: not YAML{at}") from None
    if doc is None:
        doc = {}          # an empty file: plain HTTP, no auth (as the toolkit)
    cfg = WebConfig(path=path)
    top = _mapping(doc, where, "the file")
    _known(top, _TOP, set(), where, "")
    base = os.path.dirname(os.path.abspath(path))
    if top.get("tls_server_config") is not None:
        cfg.ssl_context = _tls(_mapping(top["tls_server_config"], where, "tls_server_config"), base, where)
    if top.get("http_server_config") is not None:
        cfg.headers = _http(_mapping(top["http_server_config"], where, "http_server_config"), where)
    if top.get("basic_auth_users") is not None:
        cfg.users = _users(_mapping(top["basic_auth_users"], where, "basic_auth_users"), where)
    return cfg


def _mapping(v, where: str, what: str) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise WebConfigError(f"{where}: {what} must be a mapping of names")
    return v


def _known(d: dict, known: set[str], unsupported: set[str], where: str, prefix: str) -> None:
    for k in d:
        if k in unsupported:
            raise WebConfigError(f"{where}: {prefix}{k} is not supported by pkttrace")
        if k not in known:
            raise WebConfigError(f"{where}: unknown field {prefix}{k}")


def _string(d: dict, key: str, where: str, prefix: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise WebConfigError(f"{where}: {prefix}{key} must be a non-empty string")
    return v


def _tls(t: dict, base: str, where: str) -> ssl.SSLContext:
    p = "tls_server_config."
    _known(t, _TLS, _TLS_UNSUPPORTED, where, p)
    files = {k: _string(t, k, where, p) for k in ("cert_file", "key_file", "client_ca_file")}
    if not files["cert_file"] or not files["key_file"]:
        raise WebConfigError(f"{where}: {p}cert_file and {p}key_file are both required")
    paths = {k: os.path.join(base, v) for k, v in files.items() if v}
    for k, fp in paths.items():
        if not os.path.isfile(fp) or not os.access(fp, os.R_OK):
            raise WebConfigError(f"{where}: {p}{k} {fp}: not a readable file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2       # the toolkit's default
    for key, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        v = _string(t, key, where, p)
        if v is not None:
            if v not in _TLS_VERSIONS:
                raise WebConfigError(f"{where}: {p}{key} {v!r}: one of {', '.join(_TLS_VERSIONS)}")
            setattr(ctx, attr, _TLS_VERSIONS[v])
    try:
        ctx.load_cert_chain(paths["cert_file"], paths["key_file"])
    except (ssl.SSLError, OSError) as e:
        raise WebConfigError(f"{where}: {p}cert_file/key_file: {getattr(e, 'reason', None) or e}") from None
    auth = _string(t, "client_auth_type", where, p) or "NoClientCert"
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{where}: {p}client_auth_type {auth!r}: one of {', '.join(_CLIENT_AUTH)}")
    if auth != "NoClientCert":
        if "client_ca_file" not in paths:
            raise WebConfigError(f"{where}: {p}client_auth_type {auth} needs {p}client_ca_file")
        try:
            ctx.load_verify_locations(paths["client_ca_file"])
        except (ssl.SSLError, OSError) as e:
            raise WebConfigError(f"{where}: {p}client_ca_file: {getattr(e, 'reason', None) or e}") from None
    ctx.verify_mode = _CLIENT_AUTH[auth]
    return ctx


def _http(h: dict, where: str) -> list[tuple[str, str]]:
    p = "http_server_config."
    _known(h, _HTTP, set(), where, p)
    if h.get("http2") is not None and not isinstance(h["http2"], bool):
        raise WebConfigError(f"{where}: {p}http2 must be true or false")
    # http2 is accepted and has no effect: the endpoint speaks HTTP/1.1,
    # which every Prometheus scrapes
    headers = h.get("headers") or {}
    out = []
    for k, v in _mapping(headers, where, p + "headers").items():
        if not isinstance(v, str) or any(c in k + v for c in "\r\n") or not k.replace("-", "").isalnum():
            raise WebConfigError(f"{where}: {p}headers {k!r}: a header name and a one-line string value")
        if k.lower() in ("authorization", "www-authenticate", "content-type", "content-length",
                         "content-encoding", "server", "date"):
            raise WebConfigError(f"{where}: {p}headers {k!r}: set by the server, cannot be configured")
        out.append((k, v))
    return out


def _users(u: dict, where: str) -> dict[str, bytes]:
    try:
        import bcrypt  # noqa: F401 - checked now: a scrape must not be the first to find it missing
    except ImportError:
        raise WebConfigError(f"{where}: basic_auth_users needs bcrypt (pip install bcrypt, "
                             "or apt install python3-bcrypt)") from None
    out = {}
    for user, h in u.items():
        if not user or ":" in user:
            raise WebConfigError(f"{where}: basic_auth_users: user {user!r} must be non-empty, without ':'")
        # $2a$/$2b$/$2y$ + 2-digit cost + 53 characters of salt and hash
        if not isinstance(h, str) or len(h) != 60 or h[:4] not in ("$2a$", "$2b$", "$2y$") or h[6] != "$" \
                or not h[4:6].isdigit():
            raise WebConfigError(f"{where}: basic_auth_users.{user}: not a bcrypt hash ($2y$10$...)")
        out[user] = h.encode()
    return out


class BasicAuth:
    """WSGI middleware: 401 unless the request carries a user of the file
    and a password its bcrypt hash accepts.

    bcrypt costs ~50-100 ms a check by design: a successful check is
    remembered (keyed by a hash of user, password and stored hash, never
    the password itself), as the exporter-toolkit does, so a scrape every
    few seconds does not spend a core.  An unknown user costs one bcrypt
    check too, so response times do not tell which users exist."""

    _DUMMY = b"$2b$10$" + b"." * 53      # a well-formed hash no password matches

    def __init__(self, app, users: dict[str, bytes], max_cached: int = 64):
        self.app, self.users, self.max_cached = app, users, max_cached
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()
        self._salt = os.urandom(16)

    def check(self, user: str, password: str) -> bool:
        import bcrypt
        stored = self.users.get(user)
        key = hmac.new(self._salt, b"\0".join([user.encode(), password.encode(), stored or b""]),
                       hashlib.sha256).digest()
        with self._lock:
            if key in self._ok:
                return True
        try:
            ok = bcrypt.checkpw(password.encode(), stored or self._DUMMY) and stored is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if len(self._ok) >= self.max_cached:
                    self._ok.clear()
                self._ok.add(key)
        return ok

    def __call__(self, environ, start_response):
        scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if sep and self.check(user, password):
                return self.app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Basic realm="pkttrace", charset="UTF-8"')])
        return [b"Unauthorized\n"]


class ExtraHeaders:
    """WSGI middleware: http_server_config.headers on every response."""

    def __init__(self, app, headers: list[tuple[str, str]]):
        self.app, self.headers = app, headers

    def __call__(self, environ, start_response):
        def start(status, headers, exc_info=None):
            return start_response(status, list(headers) + self.headers, exc_info)
        return self.app(environ, start)


def wrap(app, cfg: WebConfig | None):
    """The WSGI app with the file's headers and basic auth around it."""
    if cfg is None:
        return app
    if cfg.users:
        app = BasicAuth(app, cfg.users)
    if cfg.headers:
        app = ExtraHeaders(app, cfg.headers)
    return app
