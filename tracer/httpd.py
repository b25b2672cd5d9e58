"""The HTTP side of `pkttrace serve`: a WSGI server with bounded threads,
connections and waits (MetricsServer), for /metrics and the live page.

Apart from serve.py so that `pkttrace serve` imports it (with
prometheus-client and the page) while the kernel verifies the programs,
not before: see Exporter.start."""
from __future__ import annotations

import collections
import errno
import io
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler


class _SocketWriter(io.BufferedIOBase):
    """wfile of a request: every write is one sendall (bounded by the socket timeout)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            self._sock.sendall(b)
        except TimeoutError:
            # a client that does not read: given up like one that went away
            # (wsgiref then ends the request quietly, without a traceback)
            raise ConnectionAbortedError("the client did not read the response in time") from None
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class _Handler(WSGIRequestHandler):
    """The same WSGI request handler as prometheus-client's own server
    (same status line, headers, HEAD/GET behaviour, one request per
    connection), reading a request head the accept loop already received,
    so a worker never waits for a slow or idle client."""

    def __init__(self, sock, client_address, server, head: bytes):
        self._head = head
        super().__init__(sock, client_address, server)

    def setup(self):
        self.connection = self.request
        self.rfile = io.BytesIO(self._head)
        self.wfile = _SocketWriter(self.connection)

    def log_message(self, format, *args):
        """Log nothing (as prometheus-client's server)."""


class _Conn:
    __slots__ = ("sock", "addr", "deadline", "head", "handshake")

    def __init__(self, sock: socket.socket, addr, deadline: float, handshake: bool = False):
        self.sock, self.addr, self.deadline = sock, addr, deadline
        self.head = bytearray()
        self.handshake = handshake      # TLS: the handshake is not done yet


# errors of accept(2) that say "no fd or memory for one more connection now"
_ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class MetricsServer:
    """HTTP for /metrics with bounded threads, connections and waits.

    One thread accepts and reads request heads for every connection
    (epoll); a fixed pool of workers answers complete requests.  An idle
    connection costs a file descriptor, never a thread, and is closed
    after `idle_timeout` seconds without a complete request.  At most
    `max_connections` are open: a new one pushes out the oldest idle one
    (scrapers send their request at once, idle holders do not), or is
    closed at once if all are being answered.  When the process is out of
    file descriptors, accept() is retried after an idle connection (or a
    reserve fd) is given up: pending connections are closed promptly and
    the loop never spins.

    `app` is a WSGI application: prometheus_client.make_wsgi_app(registry),
    exactly what prometheus-client's start_http_server serves.

    With `ssl_context`, each connection's TLS handshake is driven by the
    accept loop, non-blocking, within the same `idle_timeout` as the request
    (a client that stalls its handshake costs an fd, never a thread).
    """

    def __init__(self, host: str, port: int, app, workers: int = 4, max_connections: int = 256,
                 idle_timeout: float = 5.0, io_timeout: float = 10.0, backlog: int = 1024,
                 ssl_context: ssl.SSLContext | None = None):
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        self.ssl_context = ssl_context
        self.server_address = sock.getsockname()
        self.app = app
        self.workers = max(1, workers)
        self.max_connections = max(1, max_connections)
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        # what wsgiref's WSGIServer gives each request's environ
        self.server_name, self.server_port = host, self.server_address[1]
        self.base_environ = {"SERVER_NAME": host, "GATEWAY_INTERFACE": "CGI/1.1",
                             "SERVER_PORT": str(self.server_port), "REMOTE_HOST": "", "CONTENT_LENGTH": "",
                             "SCRIPT_NAME": "", "HTTPS": "on" if ssl_context else "off"}
        self._idle: collections.OrderedDict[socket.socket, _Conn] = collections.OrderedDict()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = 0                     # handed to the workers, not closed yet
        self._busy_lock = threading.Lock()
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._spare = self._open_spare()
        self._accept_paused_until = 0.0
        self._threads: list[threading.Thread] = []
        # accepted, evicted, refused, timed_out, shed, served, tls_failed
        self.stats: collections.Counter[str] = collections.Counter()

    # -- WSGIServer interface used by the request handler ------------------

    def get_app(self):
        return self.app

    # -- life cycle --------------------------------------------------------

    def start(self) -> "MetricsServer":
        loop = threading.Thread(target=self._loop, name="pkttrace-http-accept", daemon=True)
        self._threads.append(loop)
        for i in range(self.workers):
            self._threads.append(threading.Thread(target=self._work, name=f"pkttrace-http-{i}", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        """Stop accepting, close every connection, join the threads."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        for _ in range(self.workers):
            self._ready.put(None)
        deadline = time.monotonic() + self.io_timeout + 1
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        while True:                        # handed over but never answered
            try:
                c = self._ready.get_nowait()
            except queue.Empty:
                break
            if c is not None:
                self._close_busy(c)
        for c in list(self._idle.values()):
            c.sock.close()
        self._idle.clear()
        self.socket.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1

    @property
    def open_connections(self) -> int:
        return len(self._idle) + self._busy

    # -- accept loop -------------------------------------------------------

    @staticmethod
    def _open_spare() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.socket, selectors.EVENT_READ, "listen")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            listening = True
            while not self._stopping:
                now = time.monotonic()
                if not listening and now >= self._accept_paused_until:
                    sel.register(self.socket, selectors.EVENT_READ, "listen")
                    listening = True
                timeout = 1.0
                if self._idle:
                    timeout = min(timeout, next(iter(self._idle.values())).deadline - now)
                if not listening:
                    timeout = min(timeout, self._accept_paused_until - now)
                for key, _ in sel.select(max(0.0, timeout)):
                    if key.data == "listen":
                        if not self._accept(sel):
                            sel.unregister(self.socket)
                            listening = False
                    elif key.data == "wake":
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    else:
                        self._read(sel, key.data)
                self._expire(sel, time.monotonic())
        finally:
            sel.close()

    def _accept(self, sel) -> bool:
        """Accept what is pending (a bounded batch); False: pause accepting."""
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in _ACCEPT_EXHAUSTED:
                    if not self._make_room(sel):
                        return False
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue           # the client gave up, or a firewall said no
                self._accept_paused_until = time.monotonic() + 0.1
                return False
            self.stats["accepted"] += 1
            if self.open_connections >= self.max_connections:
                if self._idle:
                    self._drop_idle(sel, next(iter(self._idle.values())))
                    self.stats["evicted"] += 1
                else:
                    sock.close()       # every slot is being answered: refuse, at once
                    self.stats["refused"] += 1
                    continue
            sock.setblocking(False)
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError):
                    sock.close()
                    self.stats["tls_failed"] += 1
                    continue
            c = _Conn(sock, addr, time.monotonic() + self.idle_timeout, handshake=self.ssl_context is not None)
            try:
                sel.register(sock, selectors.EVENT_READ, c)
            except (OSError, ValueError):
                sock.close()
                continue
            self._idle[sock] = c
        return True

    def _make_room(self, sel) -> bool:
        """Out of fds: give up the oldest idle connection, or shed one
        pending connection through the reserve fd.  False: nothing to give
        up, accept again in a moment (never a busy loop)."""
        if self._idle:
            self._drop_idle(sel, next(iter(self._idle.values())))
            self.stats["evicted"] += 1
            return True
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
            try:
                sock, _ = self.socket.accept()
                sock.close()
                self.stats["shed"] += 1
                shed = True
            except OSError:
                shed = False
            self._spare = self._open_spare()
            if shed and self._spare >= 0:
                return True
        self._accept_paused_until = time.monotonic() + 0.1
        return False

    def _drop_idle(self, sel, c: _Conn) -> None:
        del self._idle[c.sock]
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _expire(self, sel, now: float) -> None:
        while self._idle:
            c = next(iter(self._idle.values()))
            if c.deadline > now:
                break
            self._drop_idle(sel, c)
            self.stats["timed_out"] += 1

    def _read(self, sel, c: _Conn) -> None:
        if c.handshake:
            try:
                c.sock.do_handshake()   # type: ignore[attr-defined]  # an SSLSocket
            except ssl.SSLWantReadError:
                sel.modify(c.sock, selectors.EVENT_READ, c)
                return
            except ssl.SSLWantWriteError:
                sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                return
            except (ssl.SSLError, OSError):   # plain HTTP to the TLS port, a bad client cert, a reset
                self.stats["tls_failed"] += 1
                self._drop_idle(sel, c)
                return
            c.handshake = False
            sel.modify(c.sock, selectors.EVENT_READ, c)
        while True:
            try:
                data = c.sock.recv(16384)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                data = b""
            if not data:                   # closed (or reset) before a whole request
                self._drop_idle(sel, c)
                return
            c.head += data
            # TLS may hold decrypted bytes the socket no longer signals
            if not isinstance(c.sock, ssl.SSLSocket) or not c.sock.pending() or self._complete(c):
                break
        if not self._complete(c):
            return
        del self._idle[c.sock]
        sel.unregister(c.sock)
        with self._busy_lock:
            self._busy += 1
        self._ready.put(c)

    @staticmethod
    def _complete(c: _Conn) -> bool:
        """A whole request head (or more than any head may be)."""
        return b"\r\n\r\n" in c.head or b"\n\n" in c.head or len(c.head) >= 65536 + 8192

    # -- workers -----------------------------------------------------------

    def _close_busy(self, c: _Conn) -> None:
        try:
            c.sock.close()
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _work(self) -> None:
        while True:
            c = self._ready.get()
            if c is None:
                return
            try:
                if self._stopping:
                    continue
                c.sock.setblocking(True)
                c.sock.settimeout(self.io_timeout)
                _Handler(c.sock, c.addr, self, bytes(c.head))
                with self._busy_lock:
                    self.stats["served"] += 1
            except Exception:   # noqa: BLE001 - a client that went away; the next one is served
                pass
            finally:
                self._close_busy(c)
