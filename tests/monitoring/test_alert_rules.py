"""The release-gate alert rules (monitoring/prometheus/ptf-admin-alerts.yml).

Checked with the real tools: promtool lints them and runs their unit tests (and the unit tests
are shown to catch broken rules), node_exporter shows what the textfile series really look
like, and a real Prometheus evaluates the rules on a real scrape.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from backend.app.testing.gate_metrics import GateMetricStore
from tests.monitoring_tools import (
    ALERT_RULES,
    GROUP,
    PROMTOOL_TESTS,
    RUNBOOK_URL,
    MonitoringStack,
    alert_names,
    github_slug,
    http_get,
    load_yaml,
    release_gate_rules,
    rules_by_alert,
    run,
    start_node_exporter,
    textfile_exposition,
    wait_until,
    write_textfile,
)
from tests.monitoring_tools import monitoring_stack as start_stack
from tests.processes import require_tool

# Run by the nox session `monitoring`; the `tests` session deselects this marker.
pytestmark = pytest.mark.monitoring

# What the issue asks of each alert: severity and `for` (None: fires at once).
EXPECTED: dict[str, tuple[str, str | None]] = {
    "ReleaseGateContractBreach": ("critical", None),
    "ReleaseGateAuditWriteFailure": ("warning", None),
    "ReleaseGateDenySpike": ("warning", "5m"),
    "ReleaseGateTextfileStale": ("warning", "5m"),
    "ReleaseGateTextfileMissing": ("warning", "5m"),
    "ReleaseGateMetricWriteFailures": ("warning", "15m"),
    "ReleaseGateShardsQuarantined": ("warning", None),
    "ReleaseGateTextfileGatheringErrors": ("warning", "5m"),
    "ReleaseGateSlowChecks": ("warning", "15m"),
}

_SERIES = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a text exposition: (name, labels, value)."""
    samples = []
    for line in http_get(f"{url}/metrics").splitlines():
        if line.startswith("#") or not line:
            continue
        m = _SERIES.match(line)
        assert m is not None, line
        labels = dict(_LABEL.findall(m["labels"] or ""))
        samples.append((m["name"], labels, float(m["value"])))
    return samples


def promtool_test(promtool: str, *files: Path) -> subprocess.CompletedProcess[str]:
    return run(promtool, "test", "rules", *map(str, files))


# -- promtool: lint and unit tests -----------------------------------------------------------


def test_rules_pass_promtool_check_with_fatal_lint(promtool: str) -> None:
    result = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(release_gate_rules())} rules found" in result.stdout


def test_lint_findings_fail_only_with_lint_fatal(promtool: str, tmp_path: Path) -> None:
    # Why the session passes --lint-fatal: promtool 2.42 prints lint findings and exits 0.
    rules = load_yaml(ALERT_RULES)
    group = next(g for g in rules["groups"] if g["name"] == GROUP)
    group["rules"].append(dict(group["rules"][0]))  # a duplicate rule
    path = tmp_path / "dup.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    lenient = run(promtool, "check", "rules", "--lint=all", str(path))
    fatal = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", str(path))
    assert lenient.returncode == 0
    assert fatal.returncode == 3
    assert "duplicate rule" in fatal.stdout + fatal.stderr


def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert PROMTOOL_TESTS, "no promtool unit tests found"
    result = promtool_test(promtool, *PROMTOOL_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(PROMTOOL_TESTS)


# Each mutation breaks a rule the way a careless edit would, and the unit tests of the named file
# (gate-alerts or pipeline-alerts) must notice. The original text must occur exactly once, so a
# mutation cannot silently become a no-op.
MUTATIONS = {
    "breach window too long": (
        "gate",
        "increase(release_gate_contract_breach_total[5m])",
        "increase(release_gate_contract_breach_total[10m])",
    ),
    "breach read with delta, which a reset fools": (
        "gate",
        "increase(release_gate_contract_breach_total[5m])",
        "delta(release_gate_contract_breach_total[5m])",
    ),
    "audit failure window too short": (
        "gate",
        "increase(release_gate_audit_write_failures_total[15m])",
        "increase(release_gate_audit_write_failures_total[10m])",
    ),
    "spike threshold inclusive": (
        "gate",
        'sum(increase(release_gate_decision_total{decision="DENY"}[15m])) > 10',
        'sum(increase(release_gate_decision_total{decision="DENY"}[15m])) >= 10',
    ),
    "spike per host instead of fleet-wide": (
        "gate",
        'sum(increase(release_gate_decision_total{decision="DENY"}[15m])) > 10',
        'sum by (instance) (increase(release_gate_decision_total{decision="DENY"}[15m])) > 10',
    ),
    "spike summed before increase, so resets cancel denies": (
        "gate",
        'sum(increase(release_gate_decision_total{decision="DENY"}[15m])) > 10',
        'increase(sum(release_gate_decision_total{decision="DENY"})[15m:1m]) > 10',
    ),
    "spike without for": (
        "gate",
        '{decision="DENY"}[15m])) > 10\n        for: 5m\n',
        '{decision="DENY"}[15m])) > 10\n',
    ),
    "stale threshold too low": (
        "pipeline",
        'release_gate[.]prom"} > 300',
        'release_gate[.]prom"} > 240',
    ),
    "stale matches the base name only (node_exporter 1.5 reports the full path)": (
        "pipeline",
        'time() - node_textfile_mtime_seconds{file=~"(.*/)?release_gate[.]prom"}',
        'time() - node_textfile_mtime_seconds{file="release_gate.prom"}',
    ),
    "missing fires for decommissioned hosts": (
        "pipeline",
        "            and on (job, instance)\n            up\n",
        "",
    ),
    "missing fires when only the file label changes": (
        "pipeline",
        "              unless on (job, instance)\n",
        "              unless\n",
    ),
    "missing without the fleet-wide absent()": (
        "pipeline",
        'absent(node_textfile_mtime_seconds{file=~"(.*/)?release_gate[.]prom"})\n          or\n',
        "",
    ),
    "metric write failures page on a single failure": (
        "pipeline",
        "increase(release_gate_metric_write_failures_total[15m]) > 0\n        for: 15m\n",
        "increase(release_gate_metric_write_failures_total[15m]) > 0\n        for: 10m\n",
    ),
    "quarantine read with delta, which a reset fools": (
        "pipeline",
        "increase(release_gate_quarantined_shards_total[15m])",
        "delta(release_gate_quarantined_shards_total[15m])",
    ),
    "runbook anchor of another alert": (
        "pipeline",
        "ptf-admin-runbook.md#releasegateshardsquarantined",
        "ptf-admin-runbook.md#releasegatemetricwritefailures",
    ),
    "missing fires for a fleet of pods that has no textfile": (
        "pipeline",
        "          absent(group by (job) (release_gate_decision_total))\n          and\n",
        "",
    ),
    "gathering errors of hosts without the gate": (
        "pipeline",
        "          and on (job, instance)\n          group by (job, instance) (node_textfile_mtime",
        "          or on (job, instance)\n          group by (job, instance) (node_textfile_mtime",
    ),
    "encoding errors counted as gathering errors": (
        "pipeline",
        'increase(promhttp_metric_handler_errors_total{cause="gathering"}[5m])',
        "increase(promhttp_metric_handler_errors_total[5m])",
    ),
    "gathering errors fire on a single failed scrape": (
        "pipeline",
        'release_gate[.]prom"})\n        for: 5m\n        labels:\n          severity: warning\n'
        "          team: ptf-admin\n          service: release-gate\n        annotations:\n"
        '          summary: "node_exporter',
        'release_gate[.]prom"})\n        labels:\n          severity: warning\n'
        "          team: ptf-admin\n          service: release-gate\n        annotations:\n"
        '          summary: "node_exporter',
    ),
    "slow checks at the median instead of p99": (
        "latency",
        "histogram_quantile(0.99, sum by (job, instance, le)",
        "histogram_quantile(0.5, sum by (job, instance, le)",
    ),
    "slow checks over the fleet instead of per host": (
        "latency",
        "histogram_quantile(0.99, sum by (job, instance, le)",
        "histogram_quantile(0.99, sum by (le)",
    ),
    "slow checks threshold a bucket higher": (
        "latency",
        "(rate(release_gate_check_duration_seconds_bucket[10m]))) > 0.25",
        "(rate(release_gate_check_duration_seconds_bucket[10m]))) > 0.5",
    ),
    "slow checks without the traffic guard": (
        "latency",
        "increase(release_gate_check_duration_seconds_count[10m])) >= 10",
        "increase(release_gate_check_duration_seconds_count[10m])) >= 0",
    ),
    "slow checks traffic guard exclusive": (
        "latency",
        "increase(release_gate_check_duration_seconds_count[10m])) >= 10",
        "increase(release_gate_check_duration_seconds_count[10m])) > 10",
    ),
    "slow checks fire before 15 minutes": (
        "latency",
        "[10m])) >= 10\n        for: 15m\n",
        "[10m])) >= 10\n        for: 10m\n",
    ),
}


@pytest.mark.parametrize(("suite", "old", "new"), MUTATIONS.values(), ids=MUTATIONS.keys())
def test_unit_tests_catch_a_broken_rule(
    promtool: str, tmp_path: Path, suite: str, old: str, new: str
) -> None:
    text = ALERT_RULES.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"mutation does not apply: {old!r}"
    prometheus_dir = tmp_path / "prometheus"
    (prometheus_dir / "tests").mkdir(parents=True)
    (prometheus_dir / ALERT_RULES.name).write_text(text.replace(old, new), encoding="utf-8")
    (original,) = (t for t in PROMTOOL_TESTS if t.name == f"{suite}-alerts.test.yml")
    result = promtool_test(promtool, Path(shutil.copy(original, prometheus_dir / "tests")))
    assert result.returncode != 0, "the promtool unit tests did not notice the broken rule"
    assert "FAILED" in result.stdout + result.stderr


# -- the rules themselves --------------------------------------------------------------------


def test_group_holds_exactly_the_release_gate_alerts() -> None:
    assert sorted(alert_names()) == sorted(EXPECTED)
    assert len(alert_names()) == len(set(alert_names()))


@pytest.mark.parametrize(("alert", "expected"), EXPECTED.items(), ids=EXPECTED.keys())
def test_severity_and_for_are_what_the_issue_asks(alert: str, expected: tuple[str, Any]) -> None:
    rule = rules_by_alert()[alert]
    severity, hold = expected
    assert rule["labels"]["severity"] == severity
    assert rule.get("for") == hold


@pytest.mark.parametrize("alert", EXPECTED)
def test_every_alert_routes_and_explains_itself(alert: str) -> None:
    rule = rules_by_alert()[alert]
    assert set(rule["labels"]) == {"severity", "team", "service"}
    assert rule["labels"]["team"] == "ptf-admin"
    assert rule["labels"]["service"] == "release-gate"
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    # Its own section of the runbook (tests/monitoring/test_runbook.py checks the heading exists).
    assert annotations["runbook_url"] == f"{RUNBOOK_URL}#{github_slug(alert)}"
    description = annotations["description"]
    # Where it came from: the host, or the fleet for the fleet-wide spike.
    assert "$labels.instance" in description or "across all instances" in description
    # The value, except for a missing series, which has none (absent() yields 1).
    if alert != "ReleaseGateTextfileMissing":
        assert "$value" in description


def test_counters_are_read_through_increase_so_resets_are_handled() -> None:
    # A counter compared or subtracted raw would fire on a reset or miss increments after one;
    # the only other use is as a presence check (group by ... (counter)).
    for rule in release_gate_rules():
        expr = rule["expr"]
        for m in re.finditer(r"release_gate_\w+_total\b", expr):
            before = expr[: m.start()]
            assert before.endswith("increase(") or re.search(r"group by \([^)]*\) \($", before), (
                f"{rule.get('alert')}: {m.group(0)} is not read through increase()"
            )


def test_every_alert_has_a_firing_case_and_a_near_miss() -> None:
    firing: dict[str, int] = dict.fromkeys(EXPECTED, 0)
    quiet: dict[str, int] = dict.fromkeys(EXPECTED, 0)
    for path in PROMTOOL_TESTS:
        spec = load_yaml(path)
        assert spec["rule_files"] == [f"../{ALERT_RULES.name}"]
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                name = check["alertname"]
                assert name in EXPECTED, f"{path.name}: unknown alert {name}"
                if not check["exp_alerts"]:
                    quiet[name] += 1
                    continue
                firing[name] += 1
                rule = rules_by_alert()[name]
                for alert in check["exp_alerts"]:
                    # Exact labels and every annotation, as promtool compares them.
                    assert rule["labels"].items() <= alert["exp_labels"].items()
                    assert set(alert["exp_annotations"]) == set(rule["annotations"])
    assert all(firing.values()), f"alerts without a firing case: {firing}"
    assert all(quiet.values()), f"alerts without a near miss: {quiet}"


# -- node_exporter: what the textfile series really look like --------------------------------


def test_textfile_series_of_real_node_exporter_match_the_rules(
    promtool: str, node_exporter: str, tmp_path: Path
) -> None:
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    path = write_textfile(textfile_dir, textfile_exposition(GateMetricStore()))
    with ExitStack() as stack:
        url = start_node_exporter(node_exporter, textfile_dir, tmp_path / "ne.log", stack)
        samples = scrape(url)
    mtimes = [labels for name, labels, _ in samples if name == "node_textfile_mtime_seconds"]
    # node_exporter 1.5 labels the file with its full path (older versions: the base name).
    assert mtimes == [{"file": str(path)}]
    assert ("node_textfile_scrape_error", {}, 0.0) in samples
    # Every metric the rules read is one node_exporter really exports (or Prometheus's `up`).
    exported = {name for name, _, _ in samples} | {"up"}
    for rule in release_gate_rules():
        for name in re.findall(r"\b((?:release_gate|node_textfile)_\w+)", rule["expr"]):
            assert name in exported, f"{rule.get('alert')} reads {name}, never exported"

    # Feed the exact label set node_exporter produced to the stale alert.
    labels = ", ".join(f'{k}="{v}"' for k, v in {**mtimes[0], "job": "node"}.items())
    (tmp_path / "rules.yml").write_text(ALERT_RULES.read_text(encoding="utf-8"), "utf-8")
    spec = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'node_textfile_mtime_seconds{{{labels}, instance="h:9100"}}',
                        "values": "0x30",
                    }
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "11m",
                        "alertname": "ReleaseGateTextfileStale",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **rules_by_alert()["ReleaseGateTextfileStale"]["labels"],
                                    "file": str(path),
                                    "instance": "h:9100",
                                    "job": "node",
                                },
                                "exp_annotations": {
                                    "summary": "Release gate textfile stale on h:9100",
                                    "description": f"{path} on h:9100 (job node) was last "
                                    "written 11m 0s ago (node_textfile_mtime_seconds); the "
                                    "aggregator cron should rewrite it every minute. Gate "
                                    "counts from this host are frozen, so breaches there are "
                                    "not being reported.",
                                    "runbook_url": f"{RUNBOOK_URL}#releasegatetextfilestale",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "real-labels.test.yml"
    test_file.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = promtool_test(promtool, test_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_node_exporter_drops_the_mtime_of_a_rejected_textfile(
    node_exporter: str, tmp_path: Path
) -> None:
    # What ReleaseGateTextfileMissing relies on: a file node_exporter rejects loses its mtime
    # series, and the only other sign is node_textfile_scrape_error, which has no file label.
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    exposition = textfile_exposition(GateMetricStore())
    # A client-side timestamp: node_exporter refuses the whole file.
    write_textfile(textfile_dir, exposition + "release_gate_shards_extra 1 1700000000000\n")
    with ExitStack() as stack:
        url = start_node_exporter(node_exporter, textfile_dir, tmp_path / "ne.log", stack)
        samples = scrape(url)
        names = {name for name, _, _ in samples}
        assert "node_textfile_mtime_seconds" not in names
        assert not any(n.startswith("release_gate_") for n in names)
        assert ("node_textfile_scrape_error", {}, 1.0) in samples
        # Fixed file: back on the next scrape, no restart needed.
        write_textfile(textfile_dir, exposition)
        samples = scrape(url)
        assert ("node_textfile_scrape_error", {}, 0.0) in samples
        assert "node_textfile_mtime_seconds" in {name for name, _, _ in samples}


# -- a real Prometheus -----------------------------------------------------------------------


def test_rules_evaluate_in_real_prometheus_and_a_breach_fires(
    monitoring_stack: MonitoringStack,
) -> None:
    stack = monitoring_stack

    def evaluated() -> list[dict[str, Any]] | None:
        groups = stack.api("rules")["groups"]
        (group,) = (g for g in groups if g["name"] == GROUP)
        rules: list[dict[str, Any]] = group["rules"]
        return rules if all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None

    rules = wait_until(evaluated, timeout=30, what="a first evaluation of every rule")
    assert {r["name"] for r in rules} == set(EXPECTED)
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # A healthy host: the textfile is fresh and every counter is at 0.
    assert [a for a in stack.alerts() if a["labels"]["alertname"] in EXPECTED] == []

    store = GateMetricStore()
    store.record_outcome(False, ["GUARD_VIOLATION"], breach=True)
    write_textfile(stack.textfile_dir, textfile_exposition(store))

    def breach_alert() -> dict[str, Any] | None:
        for alert in stack.alerts():
            if alert["labels"]["alertname"] == "ReleaseGateContractBreach":
                return alert
        return None

    alert = wait_until(breach_alert, timeout=30, what="ReleaseGateContractBreach")
    instance = stack.node_exporter_url.removeprefix("http://")
    assert alert["state"] == "firing"  # no `for`: straight to firing
    assert alert["labels"] == {
        "alertname": "ReleaseGateContractBreach",
        "instance": instance,
        "job": "node",
        "kind": "NO_OVERRIDE",
        "severity": "critical",
        "team": "ptf-admin",
        "service": "release-gate",
    }
    assert alert["annotations"]["summary"] == f"Release gate contract breach on {instance}"
    assert f"on {instance} (job node)" in alert["annotations"]["description"]


def test_duplicate_series_across_textfiles_break_gathering_in_real_node_exporter(
    promtool: str, node_exporter: str, tmp_path: Path
) -> None:
    # What ReleaseGateTextfileGatheringErrors relies on, with node_exporter 1.5: a second .prom
    # file exporting the same series parses fine (no scrape error), but gathering refuses the
    # duplicate, serves the first file's copy by name, and counts an error on every scrape.
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    store = GateMetricStore()
    store.record_outcome(True, [])
    path = write_textfile(textfile_dir, textfile_exposition(store))
    # An old copy left under another name that sorts first: its counts are the ones served.
    copy = write_textfile(textfile_dir, textfile_exposition(GateMetricStore()), "a-copy.prom")

    def values(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> Any:
        return [v for n, lab, v in samples if n == name and lab == labels]

    def gathering_errors(samples: list[tuple[str, dict[str, str], float]]) -> float:
        (value,) = values(samples, "promhttp_metric_handler_errors_total", cause="gathering")
        return float(value)

    with ExitStack() as stack:
        url = start_node_exporter(node_exporter, textfile_dir, tmp_path / "ne.log", stack)
        # The counter a scrape shows was counted by the scrapes before it.
        samples = wait_until(
            lambda: (s := scrape(url)) and gathering_errors(s) >= 2 and s,
            timeout=30,
            what="two gathering errors",
        )
        assert ("node_textfile_scrape_error", {}, 0.0) in samples  # the other signal misses it
        mtimes = [labels for name, labels, _ in samples if name == "node_textfile_mtime_seconds"]
        assert sorted(m["file"] for m in mtimes) == sorted([str(path), str(copy)])
        # The stale copy's count, not the 1 of release_gate.prom.
        assert values(samples, "release_gate_decision_total", decision="ALLOW") == [0.0]
        assert "was collected before with the same name and label values" in (
            tmp_path / "ne.log"
        ).read_text(errors="replace")
        # The copy removed: the next scrapes gather cleanly, the counter stops rising.
        copy.unlink()
        after = gathering_errors(scrape(url))
        samples = scrape(url)
        assert gathering_errors(samples) == after
        assert values(samples, "release_gate_decision_total", decision="ALLOW") == [1.0]

    # Feed the exact label sets node_exporter produced to the alert: errors on every scrape
    # (4 a minute) from 10m on a host that exports release_gate.prom.
    (tmp_path / "rules.yml").write_text(ALERT_RULES.read_text(encoding="utf-8"), "utf-8")
    host = 'instance="h:9100", job="node"'
    errors = f'promhttp_metric_handler_errors_total{{cause="gathering", {host}}}'
    rule = rules_by_alert()["ReleaseGateTextfileGatheringErrors"]
    spec = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": errors,
                        "values": "0x10 4+4x29",
                    },
                    {
                        "series": f'node_textfile_mtime_seconds{{file="{path}", {host}}}',
                        "values": "0+60x40",
                    },
                    {
                        "series": f'node_textfile_mtime_seconds{{file="{copy}", {host}}}',
                        "values": "0x40",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "16m",
                        "alertname": "ReleaseGateTextfileGatheringErrors",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **rule["labels"],
                                    "cause": "gathering",
                                    "instance": "h:9100",
                                    "job": "node",
                                },
                                "exp_annotations": {
                                    "summary": "node_exporter serves incomplete scrapes on h:9100",
                                    "description": rule["annotations"]["description"]
                                    .replace("{{ $labels.instance }}", "h:9100")
                                    .replace("{{ $labels.job }}", "node")
                                    .replace("{{ $value | humanize }}", "20"),
                                    "runbook_url": rule["annotations"]["runbook_url"],
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "real-labels.test.yml"
    test_file.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = promtool_test(promtool, test_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_duplicate_textfile_makes_the_gathering_alert_pending_in_real_prometheus(
    node_exporter: str, tmp_path: Path
) -> None:
    # Its own stack (the shared one must stay healthy): a copy of release_gate.prom appears,
    # real Prometheus scrapes the real node_exporter, and the rule holds the alert pending (its
    # `for: 5m` is longer than a test should wait), labelled as the unit tests expect.
    prometheus = require_tool("prometheus")
    with start_stack(node_exporter, prometheus, tmp_path) as stack:
        name = "ReleaseGateTextfileGatheringErrors"
        assert [a for a in stack.alerts() if a["labels"]["alertname"] == name] == []
        exposition = (stack.textfile_dir / "release_gate.prom").read_text(encoding="utf-8")
        write_textfile(stack.textfile_dir, exposition, "release_gate-copy.prom")

        def pending() -> list[dict[str, Any]]:
            return [a for a in stack.alerts() if a["labels"]["alertname"] == name]

        (alert,) = wait_until(pending, timeout=30, what=f"{name} pending")
        instance = stack.node_exporter_url.removeprefix("http://")
        assert alert["state"] == "pending"
        assert alert["labels"] == {
            "alertname": name,
            "cause": "gathering",
            "instance": instance,
            "job": "node",
            **rules_by_alert()[name]["labels"],
        }
        assert alert["annotations"]["summary"] == (
            f"node_exporter serves incomplete scrapes on {instance}"
        )
