"""dashboards/: valid Grafana JSON that queries only the metrics of docs/metrics.md."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from promtools import PROMTOOL, dashboard_queries, expand

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASH_DIR = os.path.join(REPO, "dashboards")
DASHBOARDS = sorted(f for f in os.listdir(DASH_DIR) if f.endswith(".json"))
# labels Prometheus adds to every scraped series
TARGET_LABELS = {"instance", "job"}
BUILTIN_VARS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}


def metric_labels() -> dict[str, set[str]]:
    """metric -> labels, from the tables in docs/metrics.md."""
    out = {}
    with open(os.path.join(REPO, "docs", "metrics.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            m = re.fullmatch(r"`(pkttrace_\w+)`", cells[0]) if len(cells) >= 3 else None
            if m:
                out[m.group(1)] = {lb.strip() for lb in cells[2].split(",") if lb.strip()}
    return out


METRICS = metric_labels()

_AGGR = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
         "group"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}
_STRING = r'"(?:[^"\\]|\\.)*"'


def promql_parts(expr: str):
    """(metric names, [(metric, matcher labels)], grouping labels) of a PromQL expression (a light parse)."""
    selectors = []
    for name, body in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{((?:[^}\"]|" + _STRING + r")*)\}", expr):
        selectors.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*" + _STRING, body))))
    grouping = set()
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        grouping |= {lb.strip() for lb in body.split(",") if lb.strip()}
    bare = re.sub(_STRING, "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", bare):
        word, call = m.group(1), m.group(2)
        if not call and word not in _AGGR and word not in _KEYWORDS:
            names.add(word)
    return names, selectors, grouping


def load(name: str) -> dict:
    with open(os.path.join(DASH_DIR, name)) as f:
        return json.load(f)


def all_panels(panels):
    for p in panels or []:
        yield p
        yield from all_panels(p.get("panels"))


def test_docs_table_parsed():
    assert len(METRICS) >= 20
    assert METRICS["pkttrace_drops_total"] == {"netns", "family", "reason", "stage", "table"}
    assert METRICS["pkttrace_inflight_records"] == set()


def test_there_are_dashboards():
    assert {"pkttrace-paths.json", "pkttrace-health.json"} <= set(DASHBOARDS)


def test_json_is_what_build_py_writes():
    spec = importlib.util.spec_from_file_location("dashboards_build", os.path.join(DASH_DIR, "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rendered = build.render()
    assert sorted(rendered) == DASHBOARDS
    for name, text in rendered.items():
        with open(os.path.join(DASH_DIR, name)) as f:
            assert f.read() == text, f"{name} is stale: run python3 dashboards/build.py"


def _lost(ours, theirs, path: str = "") -> list[str]:
    """Fields of `ours` that `theirs` does not have, or has with another value
    (fields `theirs` adds, its defaults, are fine)."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path}: {ours!r} became {theirs!r}"]
        return [x for k, v in ours.items()
                for x in ([f"{path}.{k}: dropped"] if k not in theirs else _lost(v, theirs[k], f"{path}.{k}"))]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path}: {ours!r} became {theirs!r}"]
        return [x for i, (a, b) in enumerate(zip(ours, theirs)) for x in _lost(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r} became {theirs!r}"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_grafana_schema_keeps_every_field(name):
    """Read back by the grafana-foundation-sdk's models of Grafana 11.6's
    dashboard schema (and each panel plugin's options and field config,
    generated from Grafana's own CUE kinds), the JSON loses nothing: no field
    Grafana does not know (a row's description, a variable's definition, both
    in the hand-written JSON before), no value it would change.  Only its
    defaults are added.  (Enum values are checked when build.py is type
    checked: the SDK's builders take its enums; from_json does not check them.)"""
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard
    plugins.register_default_plugins()     # panel options by panel type, queries by datasource type
    ours = load(name)
    theirs = json.loads(json.dumps(Dashboard.from_json(ours), cls=JSONEncoder))
    assert _lost(ours, theirs) == []


def test_the_schema_check_catches_what_grafana_drops():
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard
    plugins.register_default_plugins()
    bad = load(DASHBOARDS[0])
    row = next(p for p in bad["panels"] if p["type"] == "row")
    row["description"] = "rows have none"
    ts = next(p for p in bad["panels"] if p["type"] == "timeseries")
    ts["options"]["legend"]["placment"] = "bottom"
    lost = _lost(bad, json.loads(json.dumps(Dashboard.from_json(bad), cls=JSONEncoder)))
    assert any(x.endswith(".description: dropped") for x in lost)
    assert any(x.endswith(".legend.placment: dropped") for x in lost)


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_structure(name):
    d = load(name)
    assert d["title"] and d["uid"] and d["schemaVersion"] >= 36
    panels = list(all_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    var_names = {v["name"] for v in d["templating"]["list"]}
    assert {"DS_PROMETHEUS", "instance"} <= var_names
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']!r} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        assert p["datasource"]["uid"] in ("${DS_PROMETHEUS}", "prometheus")
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("expr"), p["title"]
            used = {a or b or c for a, b, c in re.findall(r"\$\{(\w+)[^}]*\}|\$(\w+)|\[\[(\w+)\]\]", t["expr"])}
            assert used <= var_names | BUILTIN_VARS, (p["title"], used - var_names - BUILTIN_VARS)


@pytest.mark.parametrize("name", DASHBOARDS)
def test_queries_use_documented_metrics_and_labels(name):
    d = load(name)
    exprs = [(p["title"], t["expr"]) for p in all_panels(d["panels"]) for t in p.get("targets") or []]
    # a query variable's PromQL: {"query": ..., "refId": ...} as Grafana's Prometheus editor writes it
    exprs += [("variable " + v["name"], v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
              for v in d["templating"]["list"] if v["type"] == "query"]
    for title, expr in exprs:
        expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr)  # variable query: its selector
        names, selectors, grouping = promql_parts(expr)
        assert names, (title, expr)
        unknown = names - set(METRICS)
        assert not unknown, f"{title!r}: {sorted(unknown)} not in docs/metrics.md"
        for metric, labels in selectors:
            extra = labels - METRICS[metric] - TARGET_LABELS
            assert not extra, f"{title!r}: {metric} has no label {sorted(extra)}"
        known = set().union(*(METRICS[n] for n in names)) | TARGET_LABELS
        assert grouping <= known, f"{title!r}: grouping by {sorted(grouping - known)}"


def test_promql_parts_catches_mistakes():
    names, sel, grp = promql_parts('sum by (tabel) (rate(pkttrace_drop_total{netns=~"$netns"}[1m])) / 1e-9')
    assert names == {"pkttrace_drop_total"} and sel == [("pkttrace_drop_total", {"netns"})] and grp == {"tabel"}


def test_dashboard_queries_expand_every_variable():
    queries = dashboard_queries(DASH_DIR)
    assert len(queries) >= 30
    titles = {d for d, _, _ in queries}
    assert {"pkttrace / packet paths", "pkttrace / tracer health"} <= titles
    for dash, panel, expr in queries:
        assert "$" not in expr and "[[" not in expr, (dash, panel, expr)
    one = dashboard_queries(os.path.join(DASH_DIR, "pkttrace-health.json"))
    assert one and {d for d, _, _ in one} == {"pkttrace / tracer health"}


def test_expand():
    labels = {"netns", "instance"}
    assert expand('x{netns=~"$netns",instance="${instance}"}[$__rate_interval]', labels) == \
        'x{netns=~".*",instance=~".*"}[1m]'
    assert expand("rate(x[$__rate_interval])", rate_interval="30s") == "rate(x[30s])"
    assert expand("increase(x[$__range]) > $thr", fixed={"thr": "5"}) == "increase(x[5m]) > 5"
    assert expand('x{a=~"[[netns]]"}', labels) == 'x{a=~".*"}'
    assert expand("x > $unknown") == "x > $unknown"  # left for the caller to see


@pytest.mark.skipif(not os.path.exists(PROMTOOL) and not shutil.which("promtool"), reason="promtool not installed")
def test_expanded_queries_parse_as_promql(tmp_path):
    # `promtool check rules` parses each rule's expression: every panel's
    # query as a recording rule.
    rules = [{"record": f"pkttrace:dashboard:{i}", "expr": expr}
             for i, (_, _, expr) in enumerate(dashboard_queries(DASH_DIR))]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run([shutil.which("promtool") or PROMTOOL, "check", "rules", str(path)],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_provisioning_yaml():
    with open(os.path.join(DASH_DIR, "provisioning", "dashboards.yaml")) as f:
        prov = yaml.safe_load(f)
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/pkttrace"
    with open(os.path.join(DASH_DIR, "provisioning", "datasource.yaml")) as f:
        ds = yaml.safe_load(f)
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://localhost:9090"
    # the dashboards' datasource variable defaults to that uid
    for name in DASHBOARDS:
        (var,) = [v for v in load(name)["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
        assert var["type"] == "datasource" and var["current"]["value"] == "prometheus"


def test_build_py_type_checks():
    """The SDK's builders are typed (its enums, its models): mypy is what
    turns a wrong field or enum value in build.py into an error."""
    pytest.importorskip("grafana_foundation_sdk")
    import sys
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", os.path.join(DASH_DIR, "build.py")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
