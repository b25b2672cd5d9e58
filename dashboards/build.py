#!/usr/bin/env python3
"""Write the Grafana dashboards (pkttrace-*.json next to this file).

The JSON files are generated so that ids, grid positions, datasources and
label matchers stay consistent; edit this script, run it, commit both
(tests/unit/test_dashboards.py fails when they differ).  Standard library
only: `python3 dashboards/build.py`.

Metric names and labels: docs/metrics.md.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# A datasource variable: the provisioned Prometheus (uid "prometheus", see
# provisioning/datasource.yaml) by default, any other one can be picked.
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE = "$__rate_interval"

# Matchers every query of a metric with these labels carries.
I = 'instance=~"$instance"'
NS = f'{I},netns=~"$netns"'
FAM = f'{NS},family=~"$family"'


def _var_ds() -> dict:
    return {"type": "datasource", "name": "DS_PROMETHEUS", "label": "Prometheus", "query": "prometheus",
            "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0, "refresh": 1, "regex": "",
            "options": []}


def _var_query(name: str, query: str, label: str | None = None) -> dict:
    # All = ".*": it also matches an absent label, i.e. the host's netns,
    # whose `netns` label value is empty (Prometheus drops empty labels).
    return {"type": "query", "name": name, "label": label or name, "datasource": DS, "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1, "regex": "",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0, "options": []}


class Board:
    """Panels laid out left to right, wrapping at Grafana's 24 columns."""

    def __init__(self, title: str, uid: str, description: str, variables: list[dict]):
        self.title, self.uid, self.description, self.variables = title, uid, description, variables
        self.panels: list[dict] = []
        self.x = self.y = self.line_h = 0

    def _place(self, panel: dict, w: int, h: int, x: int | None = None) -> dict:
        if x is not None and x < self.x or self.x + w > 24:
            self.y, self.x, self.line_h = self.y + self.line_h, 0, 0
        if x is not None:
            self.x = x
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.line_h = max(self.line_h, h)
        return panel

    def row(self, title: str, description: str = "") -> None:
        if self.x:
            self.y, self.x, self.line_h = self.y + self.line_h, 0, 0
        self._place({"type": "row", "title": title, "description": description, "collapsed": False,
                     "panels": []}, 24, 1)
        self.y, self.x, self.line_h = self.y + 1, 0, 0

    def add(self, kind: str, title: str, targets: list[dict], *, w: int = 12, h: int = 8, x: int | None = None,
            unit: str = "pps", description: str = "", **extra) -> dict:
        for i, t in enumerate(targets):
            t.setdefault("refId", chr(ord("A") + i))
            t.setdefault("datasource", DS)
        panel = {"type": kind, "title": title, "description": description, "datasource": DS,
                 "targets": targets, "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}}
        _STYLE[kind](panel)
        for key, value in extra.items():
            if key == "overrides":
                panel["fieldConfig"]["overrides"] = value
            elif key == "defaults":
                panel["fieldConfig"]["defaults"].update(value)
            else:
                panel[key] = value
        return self._place(panel, w, h, x)

    def json(self) -> dict:
        return {
            "title": self.title, "uid": self.uid, "description": self.description, "tags": ["pkttrace"],
            "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "timezone": "browser",
            "time": {"from": "now-15m", "to": "now"}, "refresh": "10s", "fiscalYearStartMonth": 0,
            "liveNow": False, "weekStart": "",
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                      "name": "Annotations & Alerts", "type": "dashboard"}]},
            "links": [{"type": "dashboards", "tags": ["pkttrace"], "asDropdown": False, "includeVars": True,
                       "keepTime": True, "title": "pkttrace"}],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def q(expr: str, legend: str = "", **kw) -> dict:
    """A range query (time series)."""
    return {"expr": expr, "legendFormat": legend, "range": True, "instant": False, **kw}


def qt(expr: str) -> dict:
    """An instant query shown as a table."""
    return {"expr": expr, "format": "table", "range": False, "instant": True}


def _timeseries(p: dict) -> None:
    p["fieldConfig"]["defaults"].update(
        {"color": {"mode": "palette-classic"},
         "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                    "spanNulls": False, "stacking": {"mode": "none", "group": "A"}}})
    p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}}


def _stat(p: dict) -> None:
    p["fieldConfig"]["defaults"].update(
        {"color": {"mode": "thresholds"},
         "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}})
    p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto", "orientation": "auto",
                    "justifyMode": "auto"}


def _table(p: dict) -> None:
    p["options"] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]}}
    p["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]


def _bargauge(p: dict) -> None:
    p["fieldConfig"]["defaults"].update(
        {"min": 0, "max": 1, "color": {"mode": "thresholds"},
         "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                      {"color": "orange", "value": 0.8},
                                                      {"color": "red", "value": 0.95}]}})
    p["options"] = {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}


_STYLE = {"timeseries": _timeseries, "stat": _stat, "table": _table, "bargauge": _bargauge}

RED_WHEN_NONZERO = {"thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                   {"color": "red", "value": 1e-9}]}}


def _regex_color(regex: str, color: str) -> dict:
    return {"matcher": {"id": "byRegexp", "options": regex},
            "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}


def _hook(b: Board, n: str, hook: str, x: int, what: str) -> None:
    """One box of the netfilter diagram: entered, accepted per table, drops."""
    b.add("timeseries", f"{n} {hook.upper()}", [
        q(f'sum(rate(pkttrace_hook_packets_total{{{FAM},hook="{hook}"}}[{RATE}]))', "entered"),
        q(f'sum by (table) (rate(pkttrace_table_packets_total{{{FAM},hook="{hook}"}}[{RATE}]))', "{{table}}"),
        q(f'sum by (table, reason) (rate(pkttrace_drops_total{{{FAM},stage="{hook}"}}[{RATE}]))',
          "drop {{table}} {{reason}}"),
    ], w=6, h=7, x=x, description=f"{what} Packets/s that entered the hook, left each table (or nft base "
                                  "chain) accepted, and were dropped there (red).",
        overrides=[_regex_color("^drop .*", "red"), _regex_color("^entered$", "text")])


def paths_board() -> Board:
    b = Board("pkttrace / packet paths", "pkttrace-paths",
              "Where packets go through the Linux network stack, from pkttrace's in-kernel counters.",
              [_var_ds(),
               _var_query("instance", "label_values(pkttrace_build_info, instance)"),
               _var_query("netns", 'label_values(pkttrace_packets_total{instance=~"$instance"}, netns)'),
               _var_query("family", 'label_values(pkttrace_hook_packets_total{instance=~"$instance"}, family)')])

    b.row("Fates", "How each packet's traversal ended.")
    b.add("stat", "Packets/s by fate", [
        q(f"sum by (fate) (rate(pkttrace_packets_total{{{FAM}}}[{RATE}]))", "{{fate}}")], w=10, h=6)
    b.add("timeseries", "Fates by family", [
        q(f"sum by (family, fate) (rate(pkttrace_packets_total{{{FAM}}}[{RATE}]))", "{{family}} {{fate}}")],
        w=14, h=6, overrides=[_regex_color(".* dropped$", "red")])

    # The classic netfilter diagram, left to right:
    #   PREROUTING -> routing decision -> FORWARD -> POSTROUTING
    #                      |                            ^
    #                    INPUT -> local process -> OUTPUT
    b.row("Netfilter hooks",
          "Laid out like the classic diagram: top line prerouting, routing decision, forward, postrouting; "
          "below, input to the local process and output back up to postrouting.")
    _hook(b, "①", "prerouting", 0, "Every received packet.")
    b.add("timeseries", "② routing decision", [
        q(f"sum by (result) (rate(pkttrace_route_lookups_total{{{FAM}}}[{RATE}]))", "{{result}}"),
        q(f'sum by (reason) (rate(pkttrace_drops_total{{{FAM},stage="route"}}[{RATE}]))', "drop {{reason}}"),
    ], w=6, h=7, x=6, unit="ops", description="FIB lookups per second by result, and drops at routing (red).",
        overrides=[_regex_color("^drop .*", "red")])
    _hook(b, "③", "forward", 12, "Routed through this host.")
    _hook(b, "④", "postrouting", 18, "Every packet leaving, forwarded or sent locally.")
    b.add("timeseries", "drops outside the hooks", [
        q(f'sum by (stage, reason) (rate(pkttrace_drops_total{{{FAM},'
          f'stage!~"prerouting|input|forward|output|postrouting|route"}}[{RATE}]))', "{{stage}} {{reason}}"),
        q(f"sum(rate(pkttrace_drops_total{{{FAM}}}[{RATE}]))", "all drops"),
    ], w=6, h=7, x=0, description="Drops before, between or after the netfilter hooks (tc, device, socket).",
        overrides=[_regex_color("^all drops$", "red")])
    _hook(b, "↓", "input", 6, "Addressed to this host.")
    b.add("timeseries", "local process", [
        q(f'sum by (fate) (rate(pkttrace_packets_total{{{FAM},fate=~"delivered|consumed|sent"}}[{RATE}]))',
          "{{fate}}"),
    ], w=6, h=7, x=12, description="Delivered to a socket or consumed by the stack (input side), "
                                   "sent by a local socket (output side).")
    _hook(b, "↑", "output", 18, "Sent by local processes, on its way to postrouting.")

    b.row("Drops")
    b.add("timeseries", "Drops by reason and table", [
        q(f"sum by (reason, table) (rate(pkttrace_drops_total{{{FAM}}}[{RATE}]))", "{{reason}} {{table}}")],
        description="Table is empty when no netfilter table dropped the packet.")
    b.add("table", "Where packets were dropped (time range)", [
        qt(f"sort_desc(sum by (netns, family, stage, table, reason) "
           f"(increase(pkttrace_drops_total{{{FAM}}}[$__range])))")],
        unit="short", options={"sortBy": [{"displayName": "Value", "desc": True}]})

    b.row("Paths")
    b.add("table", "Top paths", [
        qt(f"topk(10, sum by (netns, family, path, fate) (rate(pkttrace_paths_total{{{FAM}}}[{RATE}])))")],
        w=24, h=9, description="The ten most frequent stage sequences right now, packets/s.")
    b.add("timeseries", "Top paths over time", [
        q(f"topk(5, sum by (path) (rate(pkttrace_paths_total{{{FAM}}}[{RATE}])))", "{{path}}")], w=24, h=8)

    b.row("Routing")
    b.add("timeseries", "Route lookups by table and result", [
        q(f"sum by (table, result) (rate(pkttrace_route_lookups_total{{{FAM}}}[{RATE}]))",
          "table {{table}}: {{result}}")], unit="ops",
        description="no_match: the rule's table had no route, the next rule is tried.")
    b.add("table", "Route lookups (time range)", [
        qt(f"sort_desc(sum by (netns, family, table, result) "
           f"(increase(pkttrace_route_lookups_total{{{FAM}}}[$__range])))")], unit="short")

    b.row("NAT and marks")
    b.add("timeseries", "NAT rewrites", [
        q(f"sum by (hook, kind) (rate(pkttrace_nat_rewrites_total{{{FAM}}}[{RATE}]))", "{{kind}} at {{hook}}")])
    b.add("timeseries", "Mark changes", [
        q(f"sum by (hook, table) (rate(pkttrace_mark_changes_total{{{FAM}}}[{RATE}]))", "{{table}} at {{hook}}")])

    b.row("Interfaces")
    b.add("timeseries", "Packets/s per interface (rx up, tx down)", [
        q(f"sum by (netns, device, direction) (rate(pkttrace_interface_packets_total{{{NS}}}[{RATE}]))",
          "{{netns}} {{device}} {{direction}}")], w=24,
        overrides=[{"matcher": {"id": "byRegexp", "options": ".* tx$"},
                    "properties": [{"id": "custom.transform", "value": "negative-Y"}]}])
    return b


def health_board() -> Board:
    b = Board("pkttrace / tracer health", "pkttrace-health",
              "Is pkttrace keeping up: lost and aged-out records, map fill, BPF CPU time, attachments.",
              [_var_ds(), _var_query("instance", "label_values(pkttrace_build_info, instance)")])

    b.row("Keeping up")
    b.add("stat", "Events lost/s", [q(f"sum(rate(pkttrace_events_lost_total{{{I}}}[{RATE}]))")],
          w=4, h=4, unit="short", defaults=RED_WHEN_NONZERO,
          description="Records or counter updates the kernel could not keep (ring or map full).")
    b.add("stat", "Aged out/s", [q(f"sum(rate(pkttrace_records_aged_out_total{{{I}}}[{RATE}]))")],
          w=4, h=4, unit="short", description="In-flight records whose end was never seen.")
    b.add("stat", "In flight", [q(f"sum(pkttrace_inflight_records{{{I}}})")], w=4, h=4, unit="short")
    b.add("stat", "Attach failures (time range)",
          [q(f"sum(increase(pkttrace_attach_failures_total{{{I}}}[$__range]))")], w=4, h=4, unit="short",
          defaults=RED_WHEN_NONZERO)
    b.add("stat", "Observers attached", [q(f"sum(pkttrace_observers{{{I}}})")], w=4, h=4, unit="short")
    b.add("stat", "Scrape duration", [q(f"max(pkttrace_scrape_duration_seconds{{{I}}})")], w=4, h=4, unit="s")
    b.add("timeseries", "Lost and aged out", [
        q(f"sum(rate(pkttrace_events_lost_total{{{I}}}[{RATE}]))", "lost"),
        q(f"sum(rate(pkttrace_records_aged_out_total{{{I}}}[{RATE}]))", "aged out")], unit="short",
        overrides=[_regex_color("^lost$", "red")])
    b.add("timeseries", "In-flight records", [q(f"sum by (instance) (pkttrace_inflight_records{{{I}}})",
                                                "{{instance}}")], unit="short")

    b.row("Kernel maps")
    b.add("bargauge", "Map fill", [
        q(f"max by (map) (pkttrace_map_entries{{{I}}} / pkttrace_map_capacity{{{I}}})", "{{map}}")],
        unit="percentunit", description="Entries / capacity of each bounded map.")
    b.add("timeseries", "Map updates refused (full)", [
        q(f"sum by (map) (rate(pkttrace_map_overflow_total{{{I}}}[{RATE}]))", "{{map}}")], unit="short",
        description="Counted, never lost silently: a non-zero rate means the map is too small for the load.")

    b.row("BPF programs", "From kernel BPF stats (run time and count per program).")
    b.add("timeseries", "CPU per program", [
        q(f"sum by (program) (rate(pkttrace_bpf_run_seconds_total{{{I}}}[{RATE}]))", "{{program}}")],
        unit="percentunit", description="CPU seconds per second: 100% is one core.",
        defaults={"custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 30, "showPoints": "never",
                             "spanNulls": False, "stacking": {"mode": "normal", "group": "A"}}})
    b.add("timeseries", "Average run time per program", [
        q(f"sum by (program) (rate(pkttrace_bpf_run_seconds_total{{{I}}}[{RATE}])) / "
          f"sum by (program) (rate(pkttrace_bpf_runs_total{{{I}}}[{RATE}]))", "{{program}}")], unit="s")
    b.add("timeseries", "Runs per program", [
        q(f"sum by (program) (rate(pkttrace_bpf_runs_total{{{I}}}[{RATE}]))", "{{program}}")], w=24,
        unit="ops")

    b.row("Attachments")
    b.add("table", "Observers per namespace, family and hook", [
        qt(f"sum by (netns, family, hook) (pkttrace_observers{{{I}}})")], unit="short")
    b.add("timeseries", "Attach failures", [
        q(f"sum by (instance) (increase(pkttrace_attach_failures_total{{{I}}}[{RATE}]))", "{{instance}}")],
        unit="short", overrides=[_regex_color(".*", "red")])
    b.add("table", "Build", [qt(f"pkttrace_build_info{{{I}}}")], w=24, h=5, unit="short")
    return b


BOARDS = {"pkttrace-paths.json": paths_board, "pkttrace-health.json": health_board}


def render() -> dict[str, str]:
    """File name -> JSON text, as committed."""
    return {name: json.dumps(make().json(), indent=2, ensure_ascii=False) + "\n" for name, make in BOARDS.items()}


def main() -> int:
    for name, text in render().items():
        with open(os.path.join(HERE, name), "w") as f:
            f.write(text)
        print(f"wrote dashboards/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
