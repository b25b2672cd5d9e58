#!/usr/bin/env python3
"""Write the Grafana dashboards (pkttrace-*.json next to this file).

Built with grafana-foundation-sdk (`pip install 'grafana-foundation-sdk==1769699379!11.6.0'`:
the SDK's types for Grafana 11.6, generated from Grafana's own schemas), so a
field name or an enum value Grafana does not know is a type error here, not
a field Grafana silently drops.  Ids, grid positions, datasources and label
matchers stay consistent; edit this script, run it, commit both
(tests/unit/test_dashboards.py fails when they differ, and checks the JSON
against the SDK's models of Grafana's schema):
`.venv/bin/python dashboards/build.py`.

Metric names and labels: docs/metrics.md.
"""
from __future__ import annotations

import json
import os
import sys
import typing

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

HERE = os.path.dirname(os.path.abspath(__file__))

# A datasource variable: the provisioned Prometheus (uid "prometheus", see
# provisioning/datasource.yaml) by default, any other one can be picked.
DS = dm.DataSourceRef(type_val="prometheus", uid="${DS_PROMETHEUS}")
RATE = "$__rate_interval"

# Matchers every query of a metric with these labels carries.
I = 'instance=~"$instance"'
NS = f'{I},netns=~"$netns"'
FAM = f'{NS},family=~"$family"'


def _var_ds() -> dashboard.DatasourceVariable:
    return (dashboard.DatasourceVariable("DS_PROMETHEUS").label("Prometheus").type("prometheus")
            .current(dm.VariableOption(text="Prometheus", value="prometheus")))


def _var_query(name: str, query: str, label: str | None = None) -> dashboard.QueryVariable:
    # All = ".*": it also matches an absent label, i.e. the host's netns,
    # whose `netns` label value is empty (Prometheus drops empty labels).
    return (dashboard.QueryVariable(name).label(label or name).datasource(DS)
            .query({"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(True).multi(True).all_value(".*")
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"])))


AnyPanel = typing.Union[timeseries.Panel, stat.Panel, table.Panel, bargauge.Panel]


class Board:
    """Panels laid out left to right, wrapping at Grafana's 24 columns."""

    def __init__(self, title: str, uid: str, description: str, variables: list):
        self.dash = (dashboard.Dashboard(title).uid(uid).description(description).tags(["pkttrace"])
                     .editable().tooltip(dm.DashboardCursorSync.CROSSHAIR).timezone("browser")
                     .time("now-15m", "now").refresh("10s").fiscal_year_start_month(0).live_now(False)
                     .week_start("").version(1)
                     .link(dashboard.DashboardLink("pkttrace").type(dm.DashboardLinkType.DASHBOARDS)
                           .tags(["pkttrace"]).as_dropdown(False).include_vars(True).keep_time(True)))
        for v in variables:
            self.dash.with_variable(v)
        self.n = 0
        self.x = self.y = self.line_h = 0

    def _pos(self, w: int, h: int, x: int | None = None) -> dm.GridPos:
        if x is not None and x < self.x or self.x + w > 24:
            self.y, self.x, self.line_h = self.y + self.line_h, 0, 0
        if x is not None:
            self.x = x
        pos = dm.GridPos(h=h, w=w, x=self.x, y=self.y)
        self.x += w
        self.line_h = max(self.line_h, h)
        self.n += 1
        return pos

    def row(self, title: str) -> None:
        """A row: title and position only (a row has no description in
        Grafana's schema; the old hand-written rows had one, and Grafana
        dropped it)."""
        if self.x:
            self.y, self.x, self.line_h = self.y + self.line_h, 0, 0
        pos = self._pos(24, 1)
        self.dash.with_row(dashboard.Row(title).id(self.n).collapsed(False).grid_pos(pos))
        self.y, self.x, self.line_h = self.y + 1, 0, 0

    def add(self, panel: AnyPanel, title: str, targets: list[prometheus.Dataquery], *, w: int = 12, h: int = 8,
            x: int | None = None, unit: str = "pps", description: str = "",
            overrides: typing.Sequence[tuple[str, list[dm.DynamicConfigValue]]] = ()) -> None:
        for i, t in enumerate(targets):
            panel.with_target(t.ref_id(chr(ord("A") + i)).datasource(DS))
        panel.title(title).description(description).datasource(DS).unit(unit)
        for regex, props in overrides:
            panel.override_by_regexp(regex, props)
        pos = self._pos(w, h, x)
        self.dash.with_panel(panel.id(self.n).grid_pos(pos))

    def build(self) -> dm.Dashboard:
        return self.dash.build()


def q(expr: str, legend: str = "") -> prometheus.Dataquery:
    """A range query (time series)."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).range()


def qt(expr: str) -> prometheus.Dataquery:
    """An instant query shown as a table."""
    return prometheus.Dataquery().expr(expr).format(pm.PromQueryFormat.TABLE).instant()


def _thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps])


def ts(fill: int = 10, stacking: cm.StackingMode = cm.StackingMode.NONE) -> timeseries.Panel:
    return (timeseries.Panel().color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
            .draw_style(cm.GraphDrawStyle.LINE).line_width(1).fill_opacity(fill)
            .show_points(cm.VisibilityMode.NEVER).span_nulls(False)
            .stacking(common.StackingConfig().mode(stacking).group("A"))
            .legend(common.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                    .placement(cm.LegendPlacement.BOTTOM).show_legend(True))
            .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))


def st(red_when_nonzero: bool = False) -> stat.Panel:
    steps: list[tuple[float | None, str]] = [(None, "green")] + ([(1e-9, "red")] if red_when_nonzero else [])
    return (stat.Panel().color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
            .thresholds(_thresholds(*steps))
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
            .color_mode(cm.BigValueColorMode.VALUE).graph_mode(cm.BigValueGraphMode.AREA)
            .text_mode(cm.BigValueTextMode.AUTO).orientation(cm.VizOrientation.AUTO)
            .justify_mode(cm.BigValueJustifyMode.AUTO))


def tb(sort_by_value: bool = False) -> table.Panel:
    p = (table.Panel().show_header(True).cell_height(cm.TableCellHeight.SM)
         .footer(common.TableFooterOptions().show(False).reducer(["sum"]))
         .with_transformation(dm.DataTransformerConfig(id_val="organize",
                                                       options={"excludeByName": {"Time": True}})))
    if sort_by_value:
        p.sort_by([common.TableSortByFieldState().display_name("Value").desc(True)])
    return p


def bg() -> bargauge.Panel:
    return (bargauge.Panel().min(0).max(1).color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
            .thresholds(_thresholds((None, "green"), (0.8, "orange"), (0.95, "red")))
            .orientation(cm.VizOrientation.HORIZONTAL).display_mode(cm.BarGaugeDisplayMode.GRADIENT)
            .show_unfilled(True)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)))


def color(c: str) -> list[dm.DynamicConfigValue]:
    return [dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": c})]


NEGATIVE_Y = [dm.DynamicConfigValue(id_val="custom.transform", value="negative-Y")]


def _hook(b: Board, n: str, hook: str, x: int, what: str) -> None:
    """One box of the netfilter diagram: entered, accepted per table, drops."""
    b.add(ts(), f"{n} {hook.upper()}", [
        q(f'sum(rate(pkttrace_hook_packets_total{{{FAM},hook="{hook}"}}[{RATE}]))', "entered"),
        q(f'sum by (table) (rate(pkttrace_table_packets_total{{{FAM},hook="{hook}"}}[{RATE}]))', "{{table}}"),
        q(f'sum by (table, reason) (rate(pkttrace_drops_total{{{FAM},stage="{hook}"}}[{RATE}]))',
          "drop {{table}} {{reason}}"),
    ], w=6, h=7, x=x, description=f"{what} Packets/s that entered the hook, left each table (or nft base "
                                  "chain) accepted, and were dropped there (red).",
        overrides=[("^drop .*", color("red")), ("^entered$", color("text"))])


def paths_board() -> Board:
    b = Board("pkttrace / packet paths", "pkttrace-paths",
              "Where packets go through the Linux network stack, from pkttrace's in-kernel counters.",
              [_var_ds(),
               _var_query("instance", "label_values(pkttrace_build_info, instance)"),
               _var_query("netns", 'label_values(pkttrace_packets_total{instance=~"$instance"}, netns)'),
               _var_query("family", 'label_values(pkttrace_hook_packets_total{instance=~"$instance"}, family)')])

    # How each packet's traversal ended.
    b.row("Fates")
    b.add(st(), "Packets/s by fate", [
        q(f"sum by (fate) (rate(pkttrace_packets_total{{{FAM}}}[{RATE}]))", "{{fate}}")], w=10, h=6)
    b.add(ts(), "Fates by family", [
        q(f"sum by (family, fate) (rate(pkttrace_packets_total{{{FAM}}}[{RATE}]))", "{{family}} {{fate}}")],
        w=14, h=6, overrides=[(".* dropped$", color("red"))])

    # The classic netfilter diagram, left to right:
    #   PREROUTING -> routing decision -> FORWARD -> POSTROUTING
    #                      |                            ^
    #                    INPUT -> local process -> OUTPUT
    # Laid out like the classic diagram: top line prerouting, routing decision, forward, postrouting;  below, input to the local process and output back up to postrouting.
    b.row("Netfilter hooks")
    _hook(b, "①", "prerouting", 0, "Every received packet.")
    b.add(ts(), "② routing decision", [
        q(f"sum by (result) (rate(pkttrace_route_lookups_total{{{FAM}}}[{RATE}]))", "{{result}}"),
        q(f'sum by (reason) (rate(pkttrace_drops_total{{{FAM},stage="route"}}[{RATE}]))', "drop {{reason}}"),
    ], w=6, h=7, x=6, unit="ops", description="FIB lookups per second by result, and drops at routing (red).",
        overrides=[("^drop .*", color("red"))])
    _hook(b, "③", "forward", 12, "Routed through this host.")
    _hook(b, "④", "postrouting", 18, "Every packet leaving, forwarded or sent locally.")
    b.add(ts(), "drops outside the hooks", [
        q(f'sum by (stage, reason) (rate(pkttrace_drops_total{{{FAM},'
          f'stage!~"prerouting|input|forward|output|postrouting|route"}}[{RATE}]))', "{{stage}} {{reason}}"),
        q(f"sum(rate(pkttrace_drops_total{{{FAM}}}[{RATE}]))", "all drops"),
    ], w=6, h=7, x=0, description="Drops before, between or after the netfilter hooks (tc, device, socket).",
        overrides=[("^all drops$", color("red"))])
    _hook(b, "↓", "input", 6, "Addressed to this host.")
    b.add(ts(), "local process", [
        q(f'sum by (fate) (rate(pkttrace_packets_total{{{FAM},fate=~"delivered|consumed|sent"}}[{RATE}]))',
          "{{fate}}"),
    ], w=6, h=7, x=12, description="Delivered to a socket or consumed by the stack (input side), "
                                   "sent by a local socket (output side).")
    _hook(b, "↑", "output", 18, "Sent by local processes, on its way to postrouting.")

    b.row("Drops")
    b.add(ts(), "Drops by reason and table", [
        q(f"sum by (reason, table) (rate(pkttrace_drops_total{{{FAM}}}[{RATE}]))", "{{reason}} {{table}}")],
        description="Table is empty when no netfilter table dropped the packet.")
    b.add(tb(sort_by_value=True), "Where packets were dropped (time range)", [
        qt(f"sort_desc(sum by (netns, family, stage, table, reason) "
           f"(increase(pkttrace_drops_total{{{FAM}}}[$__range])))")],
        unit="short")

    # QoS: the devices' queues (qdiscs), where shaping makes packets wait or drops them
    b.row("Queues (qdiscs)")
    b.add(ts(), "Time queued per qdisc (p50, p99)", [
        q(f"histogram_quantile(0.99, sum by (netns, dev, qdisc, handle, le) "
          f"(rate(pkttrace_qdisc_queue_seconds_bucket{{{NS}}}[{RATE}])))", "p99 {{dev}} {{qdisc}} {{handle}}"),
        q(f"histogram_quantile(0.5, sum by (netns, dev, qdisc, handle, le) "
          f"(rate(pkttrace_qdisc_queue_seconds_bucket{{{NS}}}[{RATE}])))", "p50 {{dev}} {{qdisc}} {{handle}}"),
    ], unit="s", description="Enqueue to dequeue in each device's root qdisc (buckets: powers of 4 from 1 µs).")
    b.add(ts(), "Qdisc drops by device, qdisc and reason", [
        q(f"sum by (netns, dev, qdisc, handle, reason) (rate(pkttrace_qdisc_drops_total{{{NS}}}[{RATE}]))",
          "{{dev}} {{qdisc}} {{handle}} {{reason}}")], unit="pps",
        description="Packets a qdisc refused (tail drop) or dropped after queueing them (AQM, overlimit).",
        overrides=[(".*", color("red"))])

    b.row("Paths")
    b.add(tb(), "Top paths", [
        qt(f"topk(10, sum by (netns, family, path, fate) (rate(pkttrace_paths_total{{{FAM}}}[{RATE}])))")],
        w=24, h=9, description="The ten most frequent stage sequences right now, packets/s.")
    b.add(ts(), "Top paths over time", [
        q(f"topk(5, sum by (path) (rate(pkttrace_paths_total{{{FAM}}}[{RATE}])))", "{{path}}")], w=24, h=8)

    b.row("Routing")
    b.add(ts(), "Route lookups by table and result", [
        q(f"sum by (table, result) (rate(pkttrace_route_lookups_total{{{FAM}}}[{RATE}]))",
          "table {{table}}: {{result}}")], unit="ops",
        description="no_match: the rule's table had no route, the next rule is tried.")
    b.add(tb(), "Route lookups (time range)", [
        qt(f"sort_desc(sum by (netns, family, table, result) "
           f"(increase(pkttrace_route_lookups_total{{{FAM}}}[$__range])))")], unit="short")

    b.row("NAT and marks")
    b.add(ts(), "NAT rewrites", [
        q(f"sum by (hook, kind) (rate(pkttrace_nat_rewrites_total{{{FAM}}}[{RATE}]))", "{{kind}} at {{hook}}")])
    b.add(ts(), "Mark changes", [
        q(f"sum by (hook, table) (rate(pkttrace_mark_changes_total{{{FAM}}}[{RATE}]))", "{{table}} at {{hook}}")])

    b.row("Interfaces")
    b.add(ts(), "Packets/s per interface (rx up, tx down)", [
        q(f"sum by (netns, device, direction) (rate(pkttrace_interface_packets_total{{{NS}}}[{RATE}]))",
          "{{netns}} {{device}} {{direction}}")], w=24,
        overrides=[(".* tx$", NEGATIVE_Y)])
    return b


def health_board() -> Board:
    b = Board("pkttrace / tracer health", "pkttrace-health",
              "Is pkttrace keeping up: lost and aged-out records, map fill, BPF CPU time, attachments.",
              [_var_ds(), _var_query("instance", "label_values(pkttrace_build_info, instance)")])

    b.row("Keeping up")
    b.add(st(red_when_nonzero=True), "Events lost/s", [q(f"sum(rate(pkttrace_events_lost_total{{{I}}}[{RATE}]))")],
          w=4, h=4, unit="short",
          description="Records or counter updates the kernel could not keep (ring or map full).")
    b.add(st(), "Aged out/s", [q(f"sum(rate(pkttrace_records_aged_out_total{{{I}}}[{RATE}]))")],
          w=4, h=4, unit="short", description="In-flight records whose end was never seen.")
    b.add(st(), "In flight", [q(f"sum(pkttrace_inflight_records{{{I}}})")], w=4, h=4, unit="short")
    b.add(st(red_when_nonzero=True), "Attach failures (time range)",
          [q(f"sum(increase(pkttrace_attach_failures_total{{{I}}}[$__range]))")], w=4, h=4, unit="short")
    b.add(st(), "Observers attached", [q(f"sum(pkttrace_observers{{{I}}})")], w=4, h=4, unit="short")
    b.add(st(), "Scrape duration", [q(f"max(pkttrace_scrape_duration_seconds{{{I}}})")], w=4, h=4, unit="s")
    b.add(ts(), "Lost and aged out", [
        q(f"sum(rate(pkttrace_events_lost_total{{{I}}}[{RATE}]))", "lost"),
        q(f"sum(rate(pkttrace_records_aged_out_total{{{I}}}[{RATE}]))", "aged out")], unit="short",
        overrides=[("^lost$", color("red"))])
    b.add(ts(), "In-flight records", [q(f"sum by (instance) (pkttrace_inflight_records{{{I}}})",
                                                "{{instance}}")], unit="short")

    b.row("Kernel maps")
    b.add(bg(), "Map fill", [
        q(f"max by (map) (pkttrace_map_entries{{{I}}} / pkttrace_map_capacity{{{I}}})", "{{map}}")],
        unit="percentunit", description="Entries / capacity of each bounded map.")
    b.add(ts(), "Map updates refused (full)", [
        q(f"sum by (map) (rate(pkttrace_map_overflow_total{{{I}}}[{RATE}]))", "{{map}}")], unit="short",
        description="Counted, never lost silently: a non-zero rate means the map is too small for the load.")

    # From kernel BPF stats (run time and count per program).
    b.row("BPF programs")
    b.add(ts(fill=30, stacking=cm.StackingMode.NORMAL), "CPU per program", [
        q(f"sum by (program) (rate(pkttrace_bpf_run_seconds_total{{{I}}}[{RATE}]))", "{{program}}")],
        unit="percentunit", description="CPU seconds per second: 100% is one core.")
    b.add(ts(), "Average run time per program", [
        q(f"sum by (program) (rate(pkttrace_bpf_run_seconds_total{{{I}}}[{RATE}])) / "
          f"sum by (program) (rate(pkttrace_bpf_runs_total{{{I}}}[{RATE}]))", "{{program}}")], unit="s")
    b.add(ts(), "Runs per program", [
        q(f"sum by (program) (rate(pkttrace_bpf_runs_total{{{I}}}[{RATE}]))", "{{program}}")], w=24,
        unit="ops")

    b.row("Attachments")
    b.add(tb(), "Observers per namespace, family and hook", [
        qt(f"sum by (netns, family, hook) (pkttrace_observers{{{I}}})")], unit="short")
    b.add(ts(), "Attach failures", [
        q(f"sum by (instance) (increase(pkttrace_attach_failures_total{{{I}}}[{RATE}]))", "{{instance}}")],
        unit="short", overrides=[(".*", color("red"))])
    b.add(tb(), "Build", [qt(f"pkttrace_build_info{{{I}}}")], w=24, h=5, unit="short")
    return b


BOARDS = {"pkttrace-paths.json": paths_board, "pkttrace-health.json": health_board}


def render() -> dict[str, str]:
    """File name -> JSON text, as committed."""
    return {name: json.dumps(make().build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"
            for name, make in BOARDS.items()}


def main() -> int:
    for name, text in render().items():
        with open(os.path.join(HERE, name), "w") as f:
            f.write(text)
        print(f"wrote dashboards/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
