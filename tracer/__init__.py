"""pkttrace: the path each packet really takes through the Linux network stack.

Flow: bpf/ (programs, shared header) -> libbpf (loader) -> probes, observers,
tcobservers (attach) -> session (the lifecycle of a trace) -> collector (the
ring buffer) -> paths (record bytes -> model.Packet) -> sinks (output,
recording, exporter).  The README's
"Architecture" section draws the layers.  The library API is tracer.api,
whose names are here too (imported on first use, so the command line starts
no slower):

    import tracer
    for p in tracer.read("trace.jsonl", tracer.Filter.parse(proto="udp")):
        print(p.id, p.fate)
"""
from .version import __version__  # noqa: F401  (tracer.__version__)

_API = ("Counters", "Cut", "Drop", "Filter", "FilterError", "Packet", "RecordingError", "Stage", "TableStep",
        "TraceError", "TraceOptions", "Tracer", "read", "start", "trace")


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'tracer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
