"""The Kubernetes manifests (monitoring/kubernetes/): a PrometheusRule and a PodMonitor.

The PrometheusRule is generated from monitoring/prometheus/ptf-admin-alerts.yml; here it is
shown to be what the generator writes, to carry the file's groups rule for rule (a stale
manifest fails), and to hold groups that promtool accepts and that pass the promtool unit tests
once extracted back out of it. Both manifests validate against the Prometheus Operator's CRD
schemas (compiled from the CRDs' OpenAPI schemas, npm package
@kubernetes-models/prometheus-operator), a check shown to fail on broken manifests; the fields
the operator needs and the schemas do not pin (the keys we use, a named port, the path the
backend serves) are checked structurally.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from backend.app.main import ROUTES
from tests.monitoring_tools import (
    ALERT_RULES,
    KUBERNETES,
    POD_MONITOR,
    PROMETHEUS_RULE,
    PROMTOOL_TESTS,
    load_yaml,
    run,
    set_field,
)

# Run by the nox session `monitoring`; the `tests` session deselects this marker.
pytestmark = pytest.mark.monitoring

Validate = Callable[..., subprocess.CompletedProcess[str]]
BUILDER = KUBERNETES / "build.py"
API_VERSION = "monitoring.coreos.com/v1"
# Kubernetes object names: a DNS-1123 subdomain (lower case, digits, '-' and '.').
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# A container port name (IANA_SVC_NAME): at most 15 characters, lower case letters, digits and
# '-', at least one letter, no leading, trailing or doubled '-'.
_PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_kubernetes", BUILDER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rule_differences(rules_file: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Where the manifest's groups differ from the rules file's, rule by rule (empty: identical)."""
    problems = []
    ours, theirs = rules_file["groups"], manifest["spec"]["groups"]
    if [g["name"] for g in ours] != [g["name"] for g in theirs]:
        return [f"groups {[g['name'] for g in theirs]} != {[g['name'] for g in ours]}"]
    for group, other in zip(ours, theirs, strict=True):
        if set(group) != set(other):
            problems.append(f"{group['name']}: group keys {sorted(other)} != {sorted(group)}")
        if len(group["rules"]) != len(other["rules"]):
            problems.append(
                f"{group['name']}: {len(other['rules'])} rules, not {len(group['rules'])}"
            )
        for rule, copied in zip(group["rules"], other["rules"], strict=False):
            if rule != copied:
                name = rule.get("alert") or rule.get("record")
                problems.append(f"{group['name']}/{name} differs in the manifest")
    return problems


def extract_groups(manifest: dict[str, Any], directory: Path) -> Path:
    """The manifest's spec.groups as a Prometheus rules file named like the original."""
    path = directory / ALERT_RULES.name
    path.write_text(yaml.safe_dump({"groups": manifest["spec"]["groups"]}), encoding="utf-8")
    return path


# -- generated and committed -----------------------------------------------------------------


def test_committed_manifests_are_what_the_builder_generates() -> None:
    for name, text in load_builder().render().items():
        assert (KUBERNETES / name).read_text(encoding="utf-8") == text, (
            f"{name} is out of date: run monitoring/kubernetes/build.py"
        )


def test_builder_check_mode_reports_a_stale_or_missing_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = load_builder()
    assert builder.main(["--check"]) == 0
    assert builder.main([], tmp_path) == 0  # writes every manifest into tmp_path
    assert builder.main(["--check"], tmp_path) == 0
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(stale.read_text("utf-8").replace("> 0", "> 1", 1), encoding="utf-8")
    (tmp_path / "podmonitor.yaml").unlink()
    capsys.readouterr()
    assert builder.main(["--check"], tmp_path) == 1
    err = capsys.readouterr().err
    assert "prometheusrule.yaml is out of date" in err
    assert "podmonitor.yaml is out of date" in err
    assert builder.main(["--bogus"], tmp_path) == 2


def test_builder_runs_as_a_script() -> None:
    result = run(sys.executable, str(BUILDER), "--check")
    assert result.returncode == 0, result.stderr


def test_builder_refuses_a_rules_file_it_would_not_copy_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = load_builder()
    rules = tmp_path / "rules.yml"
    monkeypatch.setattr(builder, "ALERT_RULES", rules)
    rules.write_text("groups: []\nextra: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unexpected top-level keys"):
        builder.prometheus_rule()
    rules.write_text("- not a mapping\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no list of groups"):
        builder.prometheus_rule()


# -- the PrometheusRule carries the rules file -----------------------------------------------


def test_prometheus_rule_carries_the_rules_file_rule_for_rule() -> None:
    manifest = load_yaml(PROMETHEUS_RULE)
    assert manifest["apiVersion"] == API_VERSION
    assert manifest["kind"] == "PrometheusRule"
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(manifest["spec"]) == {"groups"}
    assert rule_differences(load_yaml(ALERT_RULES), manifest) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["spec"]["groups"][0]["rules"].pop(), "rules, not"),
        (
            lambda m: m["spec"]["groups"][0]["rules"][0].update(expr="vector(1)"),
            "ReleaseGateContractBreach differs",
        ),
        (lambda m: m["spec"]["groups"][0]["rules"][1]["labels"].update(x="y"), "differs"),
        (lambda m: m["spec"]["groups"][0].update(name="renamed"), "groups ['renamed']"),
        (lambda m: m["spec"]["groups"][0].update(interval="1m"), "group keys"),
    ],
    ids=["a rule dropped", "an expression changed", "a label added", "group renamed", "interval"],
)
def test_rule_comparison_finds_a_stale_manifest(
    edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    manifest = copy.deepcopy(load_yaml(PROMETHEUS_RULE))
    edit(manifest)
    problems = rule_differences(load_yaml(ALERT_RULES), manifest)
    assert any(message in p for p in problems), problems


def test_extracted_groups_pass_promtool_check_with_fatal_lint(
    promtool: str, extracted_rules_dir: Path
) -> None:
    path = extract_groups(load_yaml(PROMETHEUS_RULE), extracted_rules_dir)
    result = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in load_yaml(ALERT_RULES)["groups"])
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_promtool_unit_tests_pass_against_the_extracted_groups(
    promtool: str, extracted_rules_dir: Path
) -> None:
    extract_groups(load_yaml(PROMETHEUS_RULE), extracted_rules_dir)
    copies = [shutil.copy(t, extracted_rules_dir / "tests") for t in PROMTOOL_TESTS]
    result = run(promtool, "test", "rules", *map(str, copies))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(PROMTOOL_TESTS)


def test_unit_tests_fail_against_groups_extracted_from_a_broken_manifest(
    promtool: str, extracted_rules_dir: Path
) -> None:
    # What makes the previous test worth having: the unit tests read the extracted file.
    manifest = load_yaml(PROMETHEUS_RULE)
    breach = manifest["spec"]["groups"][0]["rules"][0]
    assert breach["alert"] == "ReleaseGateContractBreach"
    breach["expr"] = breach["expr"].replace("[5m]", "[10m]")
    extract_groups(manifest, extracted_rules_dir)
    copies = [shutil.copy(t, extracted_rules_dir / "tests") for t in PROMTOOL_TESTS]
    result = run(promtool, "test", "rules", *map(str, copies))
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


# -- the CRD schemas -------------------------------------------------------------------------


def test_manifests_validate_against_the_operator_crd_schemas(
    kubernetes_validate: Validate,
) -> None:
    result = kubernetes_validate(PROMETHEUS_RULE, POD_MONITOR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(PrometheusRule ptf-admin-alerts): valid" in result.stdout
    assert "(PodMonitor release-gate): valid" in result.stdout


BROKEN = {
    "rule without expr": (
        PROMETHEUS_RULE,
        set_field("spec.groups.0.rules.0.expr", None),
        "must have required property 'expr'",
    ),
    "for in words": (
        PROMETHEUS_RULE,
        set_field("spec.groups.0.rules.2.for", "5 minutes"),
        "/spec/groups/0/rules/2/for must match pattern",
    ),
    "group without name": (
        PROMETHEUS_RULE,
        set_field("spec.groups.0.name", None),
        "must have required property 'name'",
    ),
    "pod monitor without selector": (
        POD_MONITOR,
        set_field("spec.selector", None),
        "spec must have required property 'selector'",
    ),
    "scrape interval in words": (
        POD_MONITOR,
        set_field("spec.podMetricsEndpoints.0.interval", "15 seconds"),
        "/spec/podMetricsEndpoints/0/interval must match pattern",
    ),
    "endpoints not a list": (
        POD_MONITOR,
        set_field("spec.podMetricsEndpoints", {"port": "http"}),
        "/spec/podMetricsEndpoints must be array",
    ),
    "apiVersion v2": (
        POD_MONITOR,
        set_field("apiVersion", "monitoring.coreos.com/v2"),
        "no schema",
    ),
    "kind misspelt": (PROMETHEUS_RULE, set_field("kind", "PrometheusRules"), "no schema"),
}


@pytest.mark.parametrize(("source", "edit", "message"), BROKEN.values(), ids=BROKEN.keys())
def test_crd_validation_rejects_a_broken_manifest(
    kubernetes_validate: Validate,
    tmp_path: Path,
    source: Path,
    edit: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    data = copy.deepcopy(load_yaml(source))
    edit(data)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = kubernetes_validate(path)
    output = result.stdout + result.stderr
    # 1: the schema rejects the document; 2: there is no schema for what it claims to be.
    assert result.returncode == (2 if message == "no schema" else 1), output
    assert message.replace("'", "") in output.replace("'", ""), output


def test_crd_validation_refuses_what_is_not_a_manifest(
    kubernetes_validate: Validate, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [\n", encoding="utf-8")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n", encoding="utf-8")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n", encoding="utf-8")
    for path, message in [
        (broken, "not YAML"),
        (empty, "no Kubernetes object"),
        (scalar, "not a mapping"),
        (tmp_path / "absent.yaml", "ENOENT"),
    ]:
        result = kubernetes_validate(path)
        assert result.returncode == 2, (path, result.stdout + result.stderr)
        assert message in result.stderr, result.stderr
    assert kubernetes_validate().returncode == 2  # usage


# -- the PodMonitor: what Prometheus Operator needs ------------------------------------------


def test_pod_monitor_has_the_fields_prometheus_operator_requires() -> None:
    monitor = load_yaml(POD_MONITOR)
    assert monitor["apiVersion"] == API_VERSION
    assert monitor["kind"] == "PodMonitor"
    name = monitor["metadata"]["name"]
    assert _DNS_SUBDOMAIN.fullmatch(name), name
    assert len(name) <= 253
    # An empty selector would select every pod of the namespace: each must be named.
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels
    assert all(isinstance(v, str) and v for v in labels.values()), labels
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # The schemas accept unknown keys (the API server prunes them): a misspelt one would be
    # dropped silently, so only keys of the operator's PodMetricsEndpoint are allowed.
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}, endpoint
    # A named container port, as the operator resolves it (not a number: pods differ).
    assert _PORT_NAME.fullmatch(endpoint["port"]), endpoint["port"]
    assert len(endpoint["port"]) <= 15
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"]), endpoint["interval"]


def test_pod_monitor_scrapes_the_path_the_backend_serves() -> None:
    (endpoint,) = load_yaml(POD_MONITOR)["spec"]["podMetricsEndpoints"]
    assert "GET" in ROUTES[endpoint["path"]]


def test_manifests_are_single_documents_with_the_shared_labels() -> None:
    for path in (PROMETHEUS_RULE, POD_MONITOR):
        with path.open(encoding="utf-8") as f:
            documents = list(yaml.safe_load_all(f))
        assert len(documents) == 1, path.name
        assert documents[0]["metadata"]["labels"] == {
            "app.kubernetes.io/part-of": "gatemetrics",
            "team": "ptf-admin",
        }
        assert "namespace" not in documents[0]["metadata"]  # kubectl apply -n chooses it
