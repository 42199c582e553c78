"""Build the release-gate Grafana dashboard: ``release-gate-dashboard.json`` beside this file.

    python monitoring/grafana/build_dashboard.py          # rewrite the JSON
    python monitoring/grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date

The JSON is generated so that the layout (24-column grid), the datasource reference and the
query conventions are written once, and committed so that Grafana users import it as is;
tests/monitoring/test_dashboard.py fails when the two disagree. Validation, all in that test
module: every PromQL expression parses (promtool) and returns data from a real Prometheus, and
the JSON type-checks against Grafana's published types (``@grafana/schema``, ``npm run typecheck``).

Conventions: every panel and every query uses the ``${datasource}`` variable; release-gate
series are filtered by the ``$job`` and ``$instance`` variables (default: all); fleet-wide panels
``sum`` across instances (the latency panel sums the histogram's buckets before
``histogram_quantile``), and the per-instance panels say so in their description. A panel that
shows an alert links that alert's runbook section, with the URL of the alert rule's
``runbook_url`` (read from ``monitoring/prometheus/ptf-admin-alerts.yml``; needs PyYAML).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "release-gate-dashboard.json"
ALERT_RULES = HERE.parent / "prometheus" / "ptf-admin-alerts.yml"

UID = "release-gate"
SCHEMA_VERSION = 42  # Grafana's current dashboard schemaVersion (@grafana/schema 13.x)
GRID_COLUMNS = 24
RUNBOOK = (
    "https://github.com/ptf-admin/gatemetrics/blob/main/monitoring/runbooks/ptf-admin-runbook.md"
)
#: Same file selector as the alert rules: node_exporter 1.5 puts the full path in `file`.
TEXTFILE = 'file=~"(.*/)?release_gate[.]prom"'
#: Same threshold as ReleaseGateTextfileStale.
TEXTFILE_STALE_SECONDS = 300
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Every release-gate selector is filtered by both variables (default: all of each).
FILTER = 'job=~"$job", instance=~"$instance"'
#: Same threshold as ReleaseGateSlowChecks (a bucket bound of the histogram).
SLOW_CHECK_SECONDS = 0.25
CHECK_BUCKETS = "release_gate_check_duration_seconds_bucket"

JSON = dict[str, Any]


def _target(expr: str, legend: str = "__auto", *, ref: str = "A", instant: bool = False) -> JSON:
    target: JSON = {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if instant:
        target["format"] = "table"
    return target


def _thresholds(red_at: float | None = None) -> JSON:
    """Green, turning red at ``red_at`` when given."""
    steps: list[JSON] = [{"color": "green", "value": None}]
    if red_at is not None:
        steps.append({"color": "red", "value": red_at})
    return {"mode": "absolute", "steps": steps}


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: list[JSON],
    *,
    defaults: JSON,
    options: JSON,
    overrides: list[JSON] | None = None,
) -> JSON:
    """What every panel has: its type, text, the datasource variable, queries and options."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options,
    }


def _stat(title: str, description: str, expr: str, *, unit: str, red_at: float | None) -> JSON:
    """A single number over the dashboard's time range."""
    return _panel(
        "stat",
        title,
        description,
        [_target(expr, instant=True)],
        defaults={
            "unit": unit,
            "decimals": 0 if unit == "none" else 1,
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds(red_at),
        },
        options={
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "percentChangeColorMode": "standard",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": "value",
            "wideLayout": True,
        },
    )


def _timeseries(
    title: str,
    description: str,
    targets: list[JSON],
    *,
    unit: str,
    draw: str = "line",
    threshold_line: float | None = None,
    overrides: list[JSON] | None = None,
) -> JSON:
    return _panel(
        "timeseries",
        title,
        description,
        targets,
        defaults={
            "unit": unit,
            "min": 0,
            "color": {"mode": "palette-classic"},
            "thresholds": _thresholds(threshold_line),
            "custom": {
                "drawStyle": draw,
                "lineWidth": 1,
                "fillOpacity": 10 if draw == "line" else 80,
                "showPoints": "never",
                "spanNulls": False,
                "thresholdsStyle": {"mode": "off" if threshold_line is None else "line+area"},
            },
        },
        overrides=overrides,
        options={
            "legend": {
                "calcs": ["max", "lastNotNull"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def _color(name: str, color: str) -> JSON:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": "color", "value": {"fixedColor": color, "mode": "fixed"}}],
    }


def _increase_by_instance(metric: str, legend: str = "{{instance}}", ref: str = "A") -> JSON:
    """A counter's increase per instance in each interval (the per-host panels)."""
    return _target(
        f"sum by (instance) (increase({metric}{{{FILTER}}}[$__rate_interval]))", legend, ref=ref
    )


def _quantile(q: float) -> str:
    """The fleet-wide ``q`` quantile of check durations: buckets summed per bound first."""
    return (
        f"histogram_quantile({q}, sum by (le) (rate({CHECK_BUCKETS}{{{FILTER}}}"
        "[$__rate_interval])))"
    )


def _counter_bars(title: str, description: str, *targets: JSON) -> JSON:
    """Rare events as bars: one bar per interval that counted any."""
    return _timeseries(title, description, list(targets), unit="none", draw="bars")


def _panels() -> list[tuple[JSON, tuple[int, int]]]:
    """Panels in reading order, each with its (width, height); _layout() places them."""
    deny = f'decision="DENY", {FILTER}'
    stat_h, graph_h = 5, 9
    return [
        (
            _stat(
                "Contract breaches",
                "Overrides attempted on releases blocked for an absolute reason (GUARD_VIOLATION,"
                " OPS_GATE_FAIL), summed over the selected instances for the dashboard's time "
                "range. Anything above 0 is a ReleaseGateContractBreach alert: see the runbook.",
                f"sum(increase(release_gate_contract_breach_total{{{FILTER}}}[$__range]))",
                unit="none",
                red_at=1,
            ),
            (6, stat_h),
        ),
        (
            _stat(
                "Audit write failures",
                "Gate checks whose audit entry could not be written, and which were therefore "
                "denied (fail-closed), summed over the selected instances for the time range.",
                f"sum(increase(release_gate_audit_write_failures_total{{{FILTER}}}[$__range]))",
                unit="none",
                red_at=1,
            ),
            (6, stat_h),
        ),
        (
            _stat(
                "DENY decisions",
                "Gate checks that returned DENY, summed over the selected instances for the "
                "time range. ReleaseGateDenySpike fires above 10 in 15 minutes fleet-wide.",
                f"sum(increase(release_gate_decision_total{{{deny}}}[$__range]))",
                unit="none",
                red_at=None,
            ),
            (6, stat_h),
        ),
        (
            _stat(
                "Deny ratio",
                "Share of gate checks that returned DENY over the time range, across the "
                "selected instances.",
                f"sum(increase(release_gate_decision_total{{{deny}}}[$__range]))"
                f" / sum(increase(release_gate_decision_total{{{FILTER}}}[$__range]))",
                unit="percentunit",
                red_at=None,
            ),
            (6, stat_h),
        ),
        (
            _timeseries(
                "Allow vs deny rate",
                "Gate decisions per second by decision, summed across the selected instances.",
                [
                    _target(
                        "sum by (decision) (rate(release_gate_decision_total"
                        f"{{{FILTER}}}[$__rate_interval]))",
                        "{{decision}}",
                    )
                ],
                unit="ops",
                overrides=[_color("ALLOW", "green"), _color("DENY", "red")],
            ),
            (14, graph_h),
        ),
        (
            {
                **_panel(
                    "barchart",
                    "Top deny reasons",
                    "Reasons attached to DENY decisions over the time range, most frequent "
                    "first, summed across the selected instances (a decision with two reasons "
                    "counts once for each).",
                    [
                        _target(
                            "sort_desc(sum by (reason) (increase(release_gate_reason_total"
                            f"{{{FILTER}}}[$__range])))",
                            "{{reason}}",
                            instant=True,
                        )
                    ],
                    defaults={
                        "unit": "none",
                        "decimals": 0,
                        "color": {"mode": "fixed", "fixedColor": "red"},
                        "thresholds": _thresholds(),
                    },
                    options={
                        "barRadius": 0,
                        "barWidth": 0.8,
                        "colorByField": "Value",
                        "fullHighlight": False,
                        "groupWidth": 0.7,
                        "legend": {
                            "calcs": [],
                            "displayMode": "list",
                            "placement": "bottom",
                            "showLegend": False,
                        },
                        "orientation": "horizontal",
                        "showValue": "auto",
                        "stacking": "none",
                        "tooltip": {"mode": "single", "sort": "none"},
                        "xField": "reason",
                        "xTickLabelMaxLength": 0,
                        "xTickLabelRotation": 0,
                        "xTickLabelSpacing": 0,
                    },
                ),
                # An instant query as a table has a Time column the bar chart must not plot.
                "transformations": [
                    {"id": "organize", "options": {"excludeByName": {"Time": True}}},
                ],
            },
            (10, graph_h),
        ),
        (
            _timeseries(
                "Check latency",
                "p50 and p99 of the time one gate check spends, its audit write included "
                "(release_gate_check_duration_seconds), across the selected instances: their "
                "buckets are summed, never their quantiles averaged. ReleaseGateSlowChecks fires "
                f"when one host's p99 stays above {SLOW_CHECK_SECONDS * 1000:.0f} ms (the red "
                "area) for 15 minutes. No line: no checks in the interval.",
                [
                    _target(_quantile(0.5), "p50"),
                    _target(_quantile(0.99), "p99", ref="B"),
                ],
                unit="s",
                threshold_line=SLOW_CHECK_SECONDS,
            ),
            (12, 8),
        ),
        (
            _counter_bars(
                "Breaches and audit write failures per instance",
                "Per instance, to tell which host's audit log to read: contract breaches and "
                "audit write failures counted in each interval.",
                _increase_by_instance("release_gate_contract_breach_total", "breach {{instance}}"),
                _increase_by_instance(
                    "release_gate_audit_write_failures_total", "audit failure {{instance}}", "B"
                ),
            ),
            (12, 8),
        ),
        (
            _timeseries(
                "Textfile age",
                "Per instance: seconds since the aggregator last wrote release_gate.prom "
                "(time() - node_textfile_mtime_seconds). The cron rewrites it every minute; "
                f"ReleaseGateTextfileStale fires past {TEXTFILE_STALE_SECONDS} s (the red "
                "area) held for 5 minutes. A line that stops means the file is gone "
                "(ReleaseGateTextfileMissing).",
                [
                    _target(
                        "max by (instance) (time() - node_textfile_mtime_seconds"
                        f"{{{TEXTFILE}, {FILTER}}})",
                        "{{instance}}",
                    )
                ],
                unit="s",
                threshold_line=TEXTFILE_STALE_SECONDS,
            ),
            (12, 8),
        ),
        (
            _counter_bars(
                "Incomplete scrapes",
                "Per instance: scrapes node_exporter served without some of its metrics because "
                'gathering failed (promhttp_metric_handler_errors_total{cause="gathering"}), '
                "in each interval; most often two .prom files export the same series. See "
                "ReleaseGateTextfileGatheringErrors.",
                _target(
                    "sum by (instance) (increase(promhttp_metric_handler_errors_total"
                    f'{{cause="gathering", {FILTER}}}[$__rate_interval]))',
                    "{{instance}}",
                ),
            ),
            (12, 8),
        ),
        (
            _counter_bars(
                "Shard write failures",
                "Per instance: failed attempts of gate processes to persist their metric shard "
                "(release_gate_metric_write_failures_total) in each interval. Counts stay in "
                "memory until a save succeeds; see ReleaseGateMetricWriteFailures.",
                _increase_by_instance("release_gate_metric_write_failures_total"),
            ),
            (12, 8),
        ),
        (
            _counter_bars(
                "Quarantined shards",
                "Per instance: shard files the aggregator quarantined because it could not "
                "read them (their counts are lost), in each interval; see "
                "ReleaseGateShardsQuarantined.",
                _increase_by_instance("release_gate_quarantined_shards_total"),
            ),
            (12, 8),
        ),
        (
            _timeseries(
                "Shard files by state",
                "Shard files the last aggregation found, by whether their owner process was "
                "alive, summed across the selected instances. Dead shards are folded into the "
                "archive by compaction, so a dead count that keeps growing means compaction is "
                "not running.",
                [
                    _target(
                        f"sum by (state) (release_gate_shards{{{FILTER}}})",
                        "{{state}}",
                    )
                ],
                unit="none",
            ),
            (24, 8),
        ),
    ]


#: The alerts each panel shows, by panel title: the panel links their runbook sections.
PANEL_ALERTS: dict[str, tuple[str, ...]] = {
    "Contract breaches": ("ReleaseGateContractBreach",),
    "Audit write failures": ("ReleaseGateAuditWriteFailure",),
    "DENY decisions": ("ReleaseGateDenySpike",),
    "Allow vs deny rate": ("ReleaseGateDenySpike",),
    "Top deny reasons": ("ReleaseGateDenySpike",),
    "Check latency": ("ReleaseGateSlowChecks",),
    "Breaches and audit write failures per instance": (
        "ReleaseGateContractBreach",
        "ReleaseGateAuditWriteFailure",
    ),
    "Textfile age": ("ReleaseGateTextfileStale", "ReleaseGateTextfileMissing"),
    "Incomplete scrapes": ("ReleaseGateTextfileGatheringErrors",),
    "Shard write failures": ("ReleaseGateMetricWriteFailures",),
    "Quarantined shards": ("ReleaseGateShardsQuarantined",),
}


def runbook_urls() -> dict[str, str]:
    """Each alert's runbook_url annotation, as ptf-admin-alerts.yml declares it."""
    with ALERT_RULES.open(encoding="utf-8") as f:
        groups = yaml.safe_load(f)["groups"]
    return {
        rule["alert"]: rule["annotations"]["runbook_url"]
        for group in groups
        for rule in group["rules"]
        if "alert" in rule
    }


def _runbook_links(title: str, urls: dict[str, str]) -> list[JSON]:
    """Panel links to the runbook sections of the panel's alerts, taken from the alert rules
    (so a renamed alert or a moved section cannot leave a dead link behind)."""
    links = []
    for alert in PANEL_ALERTS.get(title, ()):
        if alert not in urls:
            raise KeyError(f"panel {title!r} names {alert}, which no alert rule defines")
        links.append(
            {
                "asDropdown": False,
                "icon": "doc",
                "includeVars": False,
                "keepTime": False,
                "tags": [],
                "targetBlank": True,
                "title": f"Runbook: {alert}",
                "tooltip": f"What to do when {alert} fires",
                "type": "link",
                "url": urls[alert],
            }
        )
    return links


def _with_runbook_links(
    panels: list[tuple[JSON, tuple[int, int]]],
) -> list[tuple[JSON, tuple[int, int]]]:
    titles = {panel["title"] for panel, _ in panels}
    if unknown := sorted(set(PANEL_ALERTS) - titles):
        raise KeyError(f"PANEL_ALERTS names panels that do not exist: {unknown}")
    urls = runbook_urls()
    linked = []
    for panel, size in panels:
        links = _runbook_links(panel["title"], urls)
        linked.append(({**panel, "links": links} if links else panel, size))
    return linked


def _layout(panels: list[tuple[JSON, tuple[int, int]]]) -> list[JSON]:
    """Place panels left to right, wrapping onto a new row when the 24 columns are full."""
    placed: list[JSON] = []
    x = y = row_height = 0
    for panel_id, (panel, (w, h)) in enumerate(panels, start=1):
        if x + w > GRID_COLUMNS:
            x, y, row_height = 0, y + row_height, 0
        placed.append({"id": panel_id, "gridPos": {"h": h, "w": w, "x": x, "y": y}, **panel})
        x += w
        row_height = max(row_height, h)
    return placed


def dashboard() -> JSON:
    """The dashboard as a JSON-ready dictionary."""
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "Release gate (gatemetrics): decisions, deny reasons, contract breaches, "
        "audit write failures and the health of the metrics pipeline.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "asDropdown": False,
                "icon": "doc",
                "includeVars": False,
                "keepTime": False,
                "tags": [],
                "targetBlank": True,
                "title": "Runbook",
                "tooltip": "ptf-admin runbook for the release-gate alerts",
                "type": "link",
                "url": RUNBOOK,
            }
        ],
        "panels": _layout(_with_runbook_links(_panels())),
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["gatemetrics", "ptf-admin", "release-gate"],
        "templating": {
            "list": [
                {
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "type": "datasource",
                },
                {
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "datasource": DATASOURCE,
                    "hide": 0,
                    "includeAll": True,
                    "label": "Job",
                    "multi": True,
                    "name": "job",
                    "options": [],
                    "query": {
                        "qryType": 1,
                        "query": "label_values(release_gate_decision_total, job)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "type": "query",
                },
                {
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "datasource": DATASOURCE,
                    "hide": 0,
                    "includeAll": True,
                    "label": "Instance",
                    "multi": True,
                    "name": "instance",
                    "options": [],
                    "query": {
                        "qryType": 1,
                        "query": "label_values(release_gate_decision_total, instance)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "type": "query",
                },
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "utc",
        "title": "Release gate",
        "uid": UID,
        "version": 1,
    }


def render() -> str:
    """The dashboard JSON exactly as committed (2-space indent, trailing newline)."""
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv == ["--check"]:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{OUTPUT.name} is out of date: run {Path(__file__).name}\n")
            return 1
        return 0
    if argv:
        sys.stderr.write(f"usage: {Path(__file__).name} [--check]\n")
        return 2
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
