"""`pkttrace serve` as a library: count in the kernel, export over HTTP.

    srv = Exporter(ServeOptions(listen=("127.0.0.1", 9632), netns=["ptlab-rtr"]))
    srv.start()          # attached and listening: READY=1 sent to systemd
    srv.run()            # until srv.stop() (SIGTERM)
    srv.close()
"""
from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import sdnotify, webconfig
from .session import TraceError, TraceOptions, Tracer

if TYPE_CHECKING:
    from .exporter import Collector
    from .httpd import MetricsServer

DEFAULT_LISTEN = "127.0.0.1:9632"


class ServeError(Exception):
    """Serving cannot start; the message says why in one line."""


def parse_listen(value: str) -> tuple[str, int]:
    """`127.0.0.1:9632`, `[::1]:9632`, `0.0.0.0:9632` -> (host, port).

    The address is always explicit: exposing the metrics beyond loopback
    is a decision the user writes down, never a default."""
    v = value.strip()
    if v.startswith("["):
        host, sep, port = v[1:].partition("]:")
    else:
        host, sep, port = v.rpartition(":")
    if not sep or not host:
        raise ServeError(f"--listen {value!r}: give ADDRESS:PORT, e.g. 127.0.0.1:9632 or [::1]:9632")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ServeError(f"--listen {value!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ServeError(f"--listen {value!r}: port must be 1..65535")
    return host, int(port)


@dataclass
class ServeOptions:
    listen: tuple[str, int] = ("127.0.0.1", 9632)
    netns: list[str | None] = field(default_factory=lambda: [None])
    all_netns: bool = False       # every namespace of the host, and new ones
    age_after: float = 5.0
    tc: str = "auto"
    max_paths: int = 1024
    # BPF run-time statistics for the pkttrace_bpf_* metrics: they cost every
    # run of every BPF program on the host ~25 ns, so they are opt-in
    bpf_stats: bool = False
    tick: float = 0.5        # seconds between age-out / ruleset checks
    # HTTP: a fixed pool of workers; idle connections cost an fd, not a thread
    http_workers: int = 4
    max_connections: int = 256
    idle_timeout: float = 5.0   # seconds a connection may take to send its request
    # TLS, basic auth and headers from a --web.config.file (tracer/webconfig.py)
    web: webconfig.WebConfig | None = None


class Exporter:
    def __init__(self, opts: ServeOptions):
        self.opts = opts
        # a traced name deleted and created again is traced again: a
        # service outlives the namespaces it watches
        self.tracer = Tracer(TraceOptions(netns=opts.netns, emit=False, count=True, age_after=opts.age_after,
                                          tc=opts.tc, max_paths=opts.max_paths, all_netns=opts.all_netns,
                                          follow_names=True, parallel_load=False))
        self.lock = threading.Lock()
        self.collector: Collector | None = None
        self.httpd: MetricsServer | None = None
        self._stop = threading.Event()

    def start(self) -> "Exporter":
        try:
            # every probe attached, or an error: never half-working.  The
            # HTTP side (~45 ms of imports) is imported while the kernel
            # verifies the programs, on the core the verifier leaves idle
            self.tracer.start(meanwhile=_import_http_side)
        except TraceError as e:
            raise ServeError(str(e)) from None
        from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

        from . import page
        from .exporter import Collector
        from .httpd import MetricsServer
        self.collector = Collector(self.tracer, self.lock, bpf_stats=self.opts.bpf_stats)
        registry = CollectorRegistry(auto_describe=True)
        registry.register(self.collector)
        # process_* (CPU, memory, fds, start time) of this process: a private
        # registry has none of the default registry's collectors
        ProcessCollector(registry=registry)
        host, port = self.opts.listen
        try:
            # /metrics: the app prometheus-client's own server runs (0.16 and
            # later): same content, content type and negotiation; only the
            # threads differ.  The page and its data sit beside it, behind
            # the same TLS and basic auth
            web = self.opts.web
            app = page.App(make_wsgi_app(registry), self.collector.snapshot)
            self.httpd = MetricsServer(host, port, webconfig.wrap(app, web),
                                       workers=self.opts.http_workers, max_connections=self.opts.max_connections,
                                       idle_timeout=self.opts.idle_timeout,
                                       ssl_context=web.ssl_context if web else None).start()
        except OSError as e:
            self.close()
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        sdnotify.ready()
        sdnotify.status(f"exporting on {host}:{port}")
        return self

    def run(self) -> None:
        """Age out records and follow ruleset changes until stop()."""
        while not self._stop.wait(self.opts.tick):
            with self.lock:
                self.tracer.poll(0)

    def stop(self) -> None:
        """Safe from a signal handler."""
        self._stop.set()

    def close(self) -> None:
        sdnotify.stopping()
        if self.httpd is not None:
            self.httpd.close()
            self.httpd = None
        if self.collector is not None:
            self.collector.close()
        self.tracer.close()


def _import_http_side() -> None:
    """What Exporter.start needs once the tracer is attached: prometheus-client,
    the exporter, the page and the HTTP server (imported, not used, here)."""
    import prometheus_client  # noqa: F401

    from . import exporter, httpd, page  # noqa: F401
