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

from . import sdnotify
from .exporter import Collector
from .session import TraceError, TraceOptions, Tracer

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
    age_after: float = 5.0
    tc: str = "auto"
    max_paths: int = 1024
    # BPF run-time statistics for the pkttrace_bpf_* metrics: they cost every
    # run of every BPF program on the host ~25 ns, so they are opt-in
    bpf_stats: bool = False
    tick: float = 0.5        # seconds between age-out / ruleset checks


class Exporter:
    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.tracer = Tracer(TraceOptions(netns=opts.netns, emit=False, count=True, age_after=opts.age_after,
                                          tc=opts.tc, max_paths=opts.max_paths))
        self.lock = threading.Lock()
        self.collector: Collector | None = None
        self.httpd = None
        self._stop = threading.Event()

    def start(self) -> "Exporter":
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import start_http_server
        try:
            self.tracer.start()     # every probe attached, or an error: never half-working
        except TraceError as e:
            raise ServeError(str(e)) from None
        self.collector = Collector(self.tracer, self.lock, bpf_stats=self.opts.bpf_stats)
        registry = CollectorRegistry(auto_describe=True)
        registry.register(self.collector)
        host, port = self.opts.listen
        try:
            res = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            self.close()
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        # prometheus-client >= 0.19 returns (server, thread)
        self.httpd = res[0] if isinstance(res, tuple) else None
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
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.collector is not None:
            self.collector.close()
        self.tracer.close()
