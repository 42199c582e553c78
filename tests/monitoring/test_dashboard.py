"""The release-gate Grafana dashboard (monitoring/grafana/release-gate-dashboard.json).

Validated for real: it is what build_dashboard.py generates; every expression parses (promtool)
and returns data from a real Prometheus scraping a real node_exporter; and the JSON type-checks
against Grafana's published types (@grafana/schema, pinned typescript), a check shown to fail on
corrupted dashboards. Plus the conventions Grafana does not check: datasource variable, grid,
descriptions, fleet-wide sums.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.monitoring_tools import (
    DASHBOARD,
    GRAFANA,
    GRAFANA_VARIABLES,
    MonitoringStack,
    grafana_to_promql,
    promtool_check_expressions,
    rules_by_alert,
    run,
    set_field,
)

# Run by the nox session `monitoring`; the `tests` session deselects this marker.
pytestmark = pytest.mark.monitoring

Typecheck = Callable[[Path], subprocess.CompletedProcess[str]]
BUILDER = GRAFANA / "build_dashboard.py"


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = dashboard()["panels"]
    return result


def expressions() -> list[tuple[str, str]]:
    """(panel title, expr) of every query target."""
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def overlaps(items: list[dict[str, Any]], columns: int = 24) -> list[str]:
    """Problems of a layout: off-grid panels and pairs of panels that share a cell."""
    problems = []
    cells: dict[tuple[int, int], str] = {}
    for panel in items:
        pos, title = panel["gridPos"], panel["title"]
        if not all(type(pos[k]) is int for k in "xywh"):
            problems.append(f"{title}: non-integer gridPos")
            continue
        if pos["w"] < 1 or pos["h"] < 1 or pos["x"] < 0 or pos["y"] < 0:
            problems.append(f"{title}: empty or negative gridPos")
        if pos["x"] + pos["w"] > columns:
            problems.append(f"{title}: wider than the {columns}-column grid")
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                if (x, y) in cells:
                    problems.append(f"{title} overlaps {cells[(x, y)]} at {(x, y)}")
                cells[(x, y)] = title
    return sorted(set(problems))


# -- generated and committed -----------------------------------------------------------------


def test_committed_json_is_what_the_builder_generates() -> None:
    builder = load_builder()
    assert DASHBOARD.read_text(encoding="utf-8") == builder.render(), (
        "release-gate-dashboard.json is out of date: run monitoring/grafana/build_dashboard.py"
    )


def test_builder_check_mode_reports_an_out_of_date_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = load_builder()
    assert builder.main(["--check"]) == 0
    stale = tmp_path / "dashboard.json"
    stale.write_text(builder.render().replace('"Release gate"', '"Old title"'), encoding="utf-8")
    monkeypatch.setattr(builder, "OUTPUT", stale)
    assert builder.main(["--check"]) == 1
    assert builder.main(["--bogus"]) == 2
    assert builder.main([]) == 0  # rewrites it
    assert stale.read_text(encoding="utf-8") == builder.render()


def test_builder_runs_as_a_script() -> None:
    result = run(sys.executable, str(BUILDER), "--check")
    assert result.returncode == 0, result.stderr


# -- Grafana's own types ---------------------------------------------------------------------


def test_dashboard_type_checks_against_grafana_schema(grafana_typecheck: Typecheck) -> None:
    result = grafana_typecheck(DASHBOARD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "type-checks against @grafana/schema" in result.stdout


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "gridPos.w as a string": (
        set_field("panels.0.gridPos.w", "12"),
        "Type 'string' is not assignable to type 'number'",
    ),
    "misspelt panel key": (set_field("panels.0.titel", "x"), "'\"titel\"' does not exist"),
    "unknown thresholds mode": (
        set_field("panels.0.fieldConfig.defaults.thresholds.mode", "absolut"),
        "'\"absolut\"' is not assignable",
    ),
    "stat option outside its enum": (
        set_field("panels.0.options.colorMode", "rainbow"),
        "'\"rainbow\"' is not assignable",
    ),
    "panel type without published types": (
        set_field("panels.0.type", "piechart"),
        "'\"piechart\"' is not assignable",
    ),
    "schemaVersion as a string": (
        set_field("schemaVersion", "42"),
        "not assignable to type 'number'",
    ),
    "variable of unknown type": (
        set_field("templating.list.0.type", "datasourc"),
        "'\"datasourc\"' is not assignable",
    ),
    "query without expr": (
        lambda d: d["panels"][0]["targets"][0].pop("expr"),
        "Property 'expr' is missing",
    ),
}


@pytest.mark.parametrize(("corrupt", "message"), CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_type_check_rejects_a_corrupted_dashboard(
    grafana_typecheck: Typecheck,
    tmp_path: Path,
    corrupt: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    data = copy.deepcopy(dashboard())
    corrupt(data)
    path = tmp_path / "corrupted.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    result = grafana_typecheck(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout
    # Errors point into the JSON file, not into the generated TypeScript.
    assert re.search(r"corrupted\.json:\d+:\d+: error TS\d+", result.stdout), result.stdout


def test_type_check_refuses_a_file_that_is_not_json(
    grafana_typecheck: Typecheck, tmp_path: Path
) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"panels": [', encoding="utf-8")
    result = grafana_typecheck(path)
    assert result.returncode == 2
    assert "broken.json" in result.stderr


def test_type_check_leaves_no_scratch_files(grafana_typecheck: Typecheck) -> None:
    grafana_typecheck(DASHBOARD)
    assert list(GRAFANA.glob(".typecheck-*")) == []


# -- conventions -----------------------------------------------------------------------------


def test_identity_is_stable_and_current() -> None:
    data = dashboard()
    assert data["uid"] == "release-gate"
    assert data["schemaVersion"] == 42
    assert data["title"] == "Release gate"
    assert data["id"] is None  # assigned by the Grafana it is imported into


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["instance"]["datasource"] == reference
    for panel in panels():
        assert panel["datasource"] == reference, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == reference, panel["title"]


def test_panels_fill_the_grid_without_overlap() -> None:
    assert overlaps(panels()) == []
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))


def test_overlap_check_finds_overlaps_and_overflow() -> None:
    a = {"title": "a", "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8}}
    b = {"title": "b", "gridPos": {"x": 11, "y": 7, "w": 12, "h": 8}}
    c = {"title": "c", "gridPos": {"x": 20, "y": 20, "w": 5, "h": 1}}
    d = {"title": "d", "gridPos": {"x": 0, "y": 30, "w": "6", "h": 1}}
    assert overlaps([a, b, c, d]) == [
        "b overlaps a at (11, 7)",
        "c: wider than the 24-column grid",
        "d: non-integer gridPos",
    ]


def test_every_panel_has_a_title_and_a_description() -> None:
    for panel in panels():
        assert panel["title"].strip()
        assert len(panel["description"]) > 40, panel["title"]


def test_the_panels_the_issue_asks_for_are_there() -> None:
    def find(kind: str, metric: str) -> list[str]:
        return [
            p["title"]
            for p in panels()
            if p["type"] == kind and any(metric in t["expr"] for t in p["targets"])
        ]

    # Filtered by both variables (the job variable came second, so its matcher comes first).
    assert find(
        "timeseries", 'rate(release_gate_decision_total{job=~"$job", instance=~"$instance"}'
    )
    assert find("barchart", "release_gate_reason_total")
    assert find("stat", "release_gate_contract_breach_total")
    assert find("stat", "release_gate_audit_write_failures_total")
    assert find("timeseries", "release_gate_metric_write_failures_total")
    assert find("timeseries", "release_gate_quarantined_shards_total")
    assert find("timeseries", "node_textfile_mtime_seconds")
    assert find(
        "timeseries", "histogram_quantile(0.99, sum by (le) (rate(release_gate_check_duration"
    )
    assert find("timeseries", 'promhttp_metric_handler_errors_total{cause="gathering"')


def test_fleet_wide_queries_sum_across_instances() -> None:
    for panel in panels():
        per_instance = panel["description"].startswith("Per instance")
        for target in panel["targets"]:
            expr = target["expr"]
            # Every query aggregates: a raw selector would draw one line per host and series.
            # A quantile aggregates the buckets first (sum by (le)), then takes the quantile.
            assert re.match(
                r"(sort_desc\()?(sum|max)\b|histogram_quantile\(0\.\d+, sum by \(le\) ", expr
            ), (panel["title"], expr)
            by_instance = any("instance" in g for g in re.findall(r"\bby \(([^)]*)\)", expr))
            # A per-instance breakdown is deliberate and says so; all else is fleet-wide.
            assert by_instance == per_instance, (panel["title"], expr)


def test_textfile_age_panel_shows_the_alert_threshold() -> None:
    (panel,) = (p for p in panels() if p["title"] == "Textfile age")
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    stale_rule = rules_by_alert()["ReleaseGateTextfileStale"]["expr"]
    threshold = float(re.search(r"> (\d+)$", stale_rule.strip()).group(1))  # type: ignore[union-attr]
    assert steps[-1]["value"] == threshold
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"


# -- PromQL: parses, and returns data --------------------------------------------------------


def test_every_expression_parses(promtool: str, tmp_path: Path) -> None:
    exprs = [grafana_to_promql(e) for _, e in expressions()]
    result = promtool_check_expressions(promtool, exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_expression_check_fails_on_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    result = promtool_check_expressions(promtool, ["sum(rate(x[5m])", "up"], tmp_path)
    assert result.returncode != 0
    assert "unclosed left parenthesis" in result.stdout + result.stderr


def test_unknown_grafana_variables_are_never_left_in_an_expression() -> None:
    assert grafana_to_promql('x{instance=~"$instance"}[$__rate_interval]') == (
        f'x{{instance=~"{GRAFANA_VARIABLES["instance"]}"}}[{GRAFANA_VARIABLES["__rate_interval"]}]'
    )
    with pytest.raises(KeyError, match="__interval_ms"):
        grafana_to_promql("rate(x[$__interval_ms])")
    with pytest.raises(KeyError, match="cluster"):
        grafana_to_promql('x{cluster="${cluster:regex}"}')


def test_every_query_returns_data_from_real_prometheus(monitoring_stack: MonitoringStack) -> None:
    # Short history here (a few seconds of 1 s scrapes): windows just long enough for rate().
    variables = {**GRAFANA_VARIABLES, "__rate_interval": "10s", "__range": "1h"}
    for title, expr in expressions():
        result = monitoring_stack.query(grafana_to_promql(expr, variables))
        assert result, f"{title}: no data for {expr}"
    # The instance variable's values come from a series that exists.
    (variable,) = (v for v in dashboard()["templating"]["list"] if v["name"] == "instance")
    m = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
    assert m is not None
    assert monitoring_stack.query(f"group by ({m[2]}) ({m[1]})")


# -- the job variable, the runbook links, the latency panel ----------------------------------

_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def test_job_variable_filters_every_query() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance"]
    job = variables["job"]
    assert job["type"] == "query"
    assert job["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert job["query"]["query"] == "label_values(release_gate_decision_total, job)"
    assert job["includeAll"] is True
    assert job["allValue"] == ".*"
    for title, expr in expressions():
        selectors = _SELECTOR.findall(expr)
        assert selectors, (title, expr)
        for metric, matchers in selectors:
            assert 'job=~"$job"' in matchers, (title, metric)
            assert 'instance=~"$instance"' in matchers, (title, metric)


def test_job_variable_selects_in_real_prometheus(monitoring_stack: MonitoringStack) -> None:
    # Its values exist, and a job that is not there empties every panel: the filter is real.
    assert monitoring_stack.query("group by (job) (release_gate_decision_total)")
    variables = {**GRAFANA_VARIABLES, "__rate_interval": "10s", "__range": "1h"}
    for title, expr in expressions():
        ours = grafana_to_promql(expr, {**variables, "job": "node"})
        assert monitoring_stack.query(ours), title
        other = grafana_to_promql(expr, {**variables, "job": "no-such-job"})
        assert monitoring_stack.query(other) == [], title


def test_panels_link_the_runbook_sections_of_their_alerts() -> None:
    rules = rules_by_alert()
    linked: set[str] = set()
    for panel in panels():
        for link in panel.get("links", []):
            alert = link["title"].removeprefix("Runbook: ")
            assert alert in rules, (panel["title"], link["title"])
            assert link["url"] == rules[alert]["annotations"]["runbook_url"]
            assert link["targetBlank"] is True
            linked.add(alert)
    # Every alert is one click away from a panel that shows it.
    assert linked == set(rules)


def test_builder_refuses_links_it_cannot_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = load_builder()
    monkeypatch.setattr(builder, "PANEL_ALERTS", {"Check latency": ("NoSuchAlert",)})
    with pytest.raises(KeyError, match="NoSuchAlert, which no alert rule defines"):
        builder.render()
    monkeypatch.setattr(builder, "PANEL_ALERTS", {"No such panel": ()})
    with pytest.raises(KeyError, match="No such panel"):
        builder.render()


def test_latency_panel_shows_fleet_p50_and_p99_with_the_alert_threshold() -> None:
    (panel,) = (p for p in panels() if p["title"] == "Check latency")
    quantiles = {
        t["legendFormat"]: re.match(r"histogram_quantile\(([\d.]+), sum by \(le\) ", t["expr"])
        for t in panel["targets"]
    }
    assert {k: m and m.group(1) for k, m in quantiles.items()} == {"p50": "0.5", "p99": "0.99"}
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"
    rule = rules_by_alert()["ReleaseGateSlowChecks"]["expr"]
    threshold = float(re.search(r"\) > ([\d.]+) and on ", rule).group(1))  # type: ignore[union-attr]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == threshold
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
