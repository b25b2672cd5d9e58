"""The package's import graph follows the module map in the README
(section "Architecture"): no cycles, and every import points down the
layers, from the command line to the kernel's facts, never back up."""
from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tracer")

# bottom to top, as the README draws it; a module imports only from layers below its own
LAYERS = [
    {"events", "libbpf", "netns", "inputs", "model", "sysinfo", "sdnotify", "version", "colour",
     "caps", "webconfig", "pcapfilter", "nftables", "kallsyms"},                   # facts, model; libpcap; nf_tables netlink
    {"layout", "filters", "backends", "placement", "routing", "watch", "lab", "qdiscs"},   # what the kernel offers / has
    {"probes", "paths", "ruletrace"},                                             # attach; bytes -> packets; --rules' table
    {"observers", "tcobservers", "recording", "templates", "collector", "names", "rulejoin"},   # observers; record/replay; collect
    {"session"},                                                                  # the lifecycle of a trace
    {"output", "exporter", "doctor", "api", "demo", "installer", "pcapng", "diagram"},         # sinks, library API
    {"page", "httpd"},                                                            # HTTP: the live page, the server
    {"serve"},                                                                    # the service
    {"cli"},                                                                      # the command line
    {"__main__", "__init__", "manpage"},                                          # python -m tracer; import tracer; pkttrace(1)
]


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for f in sorted(os.listdir(PKG)):
        if not f.endswith(".py"):
            continue
        mod = f[:-3]
        deps = graph.setdefault(mod, set())
        with open(os.path.join(PKG, f)) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):              # imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:                            # from . import a, b
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tracer"):
                deps.add(node.module.split(".")[1] if "." in node.module else "__init__")
    return graph


def test_every_module_is_on_the_map():
    on_map = set().union(*LAYERS)
    assert set(_imports()) == on_map


def test_imports_point_down_the_layers_only():
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    wrong = [(m, d) for m, deps in _imports().items() for d in deps
             if d != m and layer[d] >= layer[m]]
    assert wrong == []


def test_no_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in graph.get(m, ()):
            visit(d, trail + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])
