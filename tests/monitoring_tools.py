"""Helpers for the monitoring tests (alert rules, dashboard, runbook): paths, YAML, GitHub
heading slugs, PromQL checks through promtool, and a real node_exporter + Prometheus stack.

Real tools only: promtool parses PromQL, node_exporter serves the textfile, Prometheus scrapes
it, evaluates the alert rules and answers queries. Every process is started here and stopped by
its own handle (pid), also when a test fails.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from backend.app.testing.gate_metrics import GateMetricExporter, GateMetricStore

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
ALERT_RULES = MONITORING / "prometheus" / "ptf-admin-alerts.yml"
PROMTOOL_TESTS = sorted((MONITORING / "prometheus" / "tests").glob("*.test.yml"))
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "release-gate-dashboard.json"
RUNBOOK = MONITORING / "runbooks" / "ptf-admin-runbook.md"
KUBERNETES = MONITORING / "kubernetes"
PROMETHEUS_RULE = KUBERNETES / "prometheusrule.yaml"
POD_MONITOR = KUBERNETES / "podmonitor.yaml"
RUNBOOK_URL = (
    "https://github.com/ptf-admin/gatemetrics/blob/main/monitoring/runbooks/ptf-admin-runbook.md"
)
GROUP = "ptf-admin-release-gate"
TEXTFILE_NAME = "release_gate.prom"

# Concrete values for Grafana's built-in variables and the dashboard's own, so that panel
# expressions become plain PromQL. A variable missing here is an error, never left in place.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "job": ".*",
    "instance": ".*",
}
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def run(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion, capturing its output as text; never raises on its status."""
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def release_gate_rules() -> list[dict[str, Any]]:
    """The rules of group ptf-admin-release-gate (other groups of the file are not ours)."""
    groups = load_yaml(ALERT_RULES)["groups"]
    (group,) = (g for g in groups if g["name"] == GROUP)
    rules: list[dict[str, Any]] = group["rules"]
    return rules


def rules_by_alert() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in release_gate_rules() if "alert" in r}


def alert_names() -> list[str]:
    return [r["alert"] for r in release_gate_rules() if "alert" in r]


def grafana_to_promql(expr: str, variables: Mapping[str, str] = GRAFANA_VARIABLES) -> str:
    """``expr`` with Grafana variables replaced by concrete values; KeyError for an unknown one."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no concrete value for Grafana variable ${name} in {expr!r}")
        return variables[name]

    return _GRAFANA_VARIABLE.sub(substitute, expr)


def promtool_check_expressions(
    promtool: str, expressions: Iterable[str], directory: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``promtool check rules`` on a rules file of one recording rule per expression.

    promtool has no "parse this expression" command; a recording rule is the smallest thing it
    parses fully (and a parse error names the rule, so the message points at the expression).
    """
    rules = [
        {"record": f"gatemetrics_check:expression_{i}", "expr": e}
        for i, e in enumerate(expressions)
    ]
    if not rules:
        raise ValueError("no expressions to check")
    path = directory / "expressions.rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}, sort_keys=False),
        encoding="utf-8",
    )
    return run(promtool, "check", "rules", "--lint=all", "--lint-fatal", str(path))


# -- GitHub heading anchors ------------------------------------------------------------------

_CODE_SPAN = re.compile(r"`([^`]*)`")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_)(?=\S)(.+?)(?<=\S)\1")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger's rules), before de-duplication.

    GitHub slugs the rendered text: markup (code spans, links, emphasis) is dropped first. Then
    lower case; every character that is not a letter, mark, number, connector (``_``), hyphen
    or space is removed; each space becomes a hyphen (runs are not collapsed).
    """
    text = _CODE_SPAN.sub(r"\1", heading)
    text = _LINK.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\2", text)
    kept = []
    for ch in text.strip().lower():
        category = unicodedata.category(ch)
        if ch in "- " or ch == "_" or category[0] in "LMN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str
    line: int


def markdown_headings(markdown: str) -> list[Heading]:
    """ATX headings outside fenced code blocks, with GitHub's de-duplicated anchors."""
    headings: list[Heading] = []
    seen: dict[str, int] = {}
    in_fence = False
    for number, line in enumerate(markdown.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if in_fence or match is None:
            continue
        slug = github_slug(match.group(2))
        # github-slugger: the second "x" becomes "x-1", the third "x-2", and so on.
        anchor = slug
        while anchor in seen:
            seen[slug] += 1
            anchor = f"{slug}-{seen[slug]}"
        seen[anchor] = 0
        headings.append(Heading(len(match.group(1)), match.group(2), anchor, number))
    return headings


def fenced_blocks(markdown: str, language: str) -> list[str]:
    """The bodies of the fenced code blocks tagged ``language``, in order."""
    return [
        m.group(1)
        for m in re.finditer(
            rf"^```{re.escape(language)}[ \t]*\n(.*?)^```[ \t]*$", markdown, re.DOTALL | re.M
        )
    ]


# -- the textfile node_exporter serves -------------------------------------------------------

# The aggregator's two pipeline families, as the team fixed them (common notes): a counter
# without labels and a gauge by `state`. Written by hand here because the aggregator that
# renders them is another module's work; the names and shapes are the contract the alert rules
# and the dashboard depend on.
PIPELINE_FAMILIES = """\
# HELP release_gate_quarantined_shards_total Shard files the aggregator has quarantined.
# TYPE release_gate_quarantined_shards_total counter
release_gate_quarantined_shards_total {quarantined}
# HELP release_gate_shards Shard files the last aggregation found, by owner liveness.
# TYPE release_gate_shards gauge
release_gate_shards{{state="live"}} {live}
release_gate_shards{{state="dead"}} {dead}
"""


def textfile_exposition(
    store: GateMetricStore, *, quarantined: int = 0, live: int = 2, dead: int = 0
) -> str:
    """What the aggregator writes for ``store``: the gate's families, then the pipeline's."""
    gate = GateMetricExporter.export_prometheus(store)
    return gate + PIPELINE_FAMILIES.format(quarantined=quarantined, live=live, dead=dead)


def write_textfile(directory: Path, text: str, name: str = TEXTFILE_NAME) -> Path:
    """Write atomically like the aggregator does (node_exporter may read at any moment)."""
    path = directory / name
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str
) -> Any:
    """Poll ``condition`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = condition()
        except OSError as e:  # connection refused while a server starts, and the like
            result, last_error = None, e
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what} ({last_error})")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> str:
    """GET ``url``; an HTTP error status raises (an OSError) with its connection closed."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - loopback only
    except urllib.error.HTTPError as e:
        e.close()  # an HTTPError holds the open response: unclosed, it leaks the socket
        raise
    with response:
        body: bytes = response.read()
        return body.decode("utf-8")


@contextmanager
def running(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` for the duration of the block; stop it by its pid afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _started(
    stack: ExitStack, args: Callable[[int], list[str]], log: Path, ready: Callable[[int], bool]
) -> int:
    """Start a server on a free port, retrying when another process took the port first."""
    for _ in range(3):
        port = free_port()
        proc = stack.enter_context(running(args(port), log))

        def state(proc: subprocess.Popen[bytes] = proc, port: int = port) -> str | None:
            if proc.poll() is not None:
                return "exited"  # e.g. the port was taken meanwhile: try another one
            return "ready" if ready(port) else None

        if wait_until(state, timeout=30, what=f"{args(port)[0]} on port {port}") == "ready":
            return port
    raise RuntimeError(f"{args(0)[0]} did not start: {log.read_text(errors='replace')[-2000:]}")


def start_node_exporter(binary: str, textfile_dir: Path, log: Path, stack: ExitStack) -> str:
    """node_exporter with only the textfile collector; returns its base URL."""

    def args(port: int) -> list[str]:
        return [
            binary,
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={textfile_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]

    def ready(port: int) -> bool:
        return "node_textfile_scrape_error" in http_get(f"http://127.0.0.1:{port}/metrics")

    return f"http://127.0.0.1:{_started(stack, args, log, ready)}"


@dataclass
class MonitoringStack:
    """node_exporter serving a textfile, scraped every second by Prometheus with our rules."""

    textfile_dir: Path
    node_exporter_url: str
    prometheus_url: str

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.prometheus_url}/api/v1/{path}?{query}"))
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (AssertionError on a query error)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts


@contextmanager
def monitoring_stack(
    node_exporter: str, prometheus: str, directory: Path
) -> Iterator[MonitoringStack]:
    """Start the stack with a healthy textfile (all counters 0) and wait for real data."""
    textfile_dir = directory / "textfile"
    textfile_dir.mkdir()
    write_textfile(textfile_dir, textfile_exposition(GateMetricStore()))
    with ExitStack() as stack:
        ne_url = start_node_exporter(node_exporter, textfile_dir, directory / "ne.log", stack)
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERT_RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "node",
                            "static_configs": [{"targets": [ne_url.removeprefix("http://")]}],
                        }
                    ],
                }
            ),
            encoding="utf-8",
        )

        def args(port: int) -> list[str]:
            return [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ]

        def ready(port: int) -> bool:
            return "Ready" in http_get(f"http://127.0.0.1:{port}/-/ready")

        port = _started(stack, args, directory / "prometheus.log", ready)
        result = MonitoringStack(textfile_dir, ne_url, f"http://127.0.0.1:{port}")
        # Prometheus 2.42 scrapes about 5.5 s after start; wait for a few samples so that
        # rate() and increase() over short windows have two points to work with.
        wait_until(
            lambda: result.query("count_over_time(up[1m]) >= 5"),
            timeout=60,
            interval=0.25,
            what="five scrapes of node_exporter",
        )
        yield result


def set_field(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of a parsed document (a corruption, in the validators' tests) that sets one field
    by a dotted path with integer list indices, or with ``value`` None removes it."""

    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return edit


# -- Grafana's published types ---------------------------------------------------------------


def npm_ci(npm: str, project: Path) -> None:
    """Install the pinned npm project in ``project`` with ``npm ci`` when its node_modules is
    missing or older than package-lock.json, as CI's clean clone needs."""
    installed = project / "node_modules" / ".package-lock.json"
    lock = project / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=project,
            check=True,
            timeout=300,
        )


def grafana_typecheck(npm: str, node: str) -> Callable[[Path], subprocess.CompletedProcess[str]]:
    """A function that type-checks a dashboard JSON file (monitoring/grafana/typecheck.mjs)."""
    npm_ci(npm, GRAFANA)

    def typecheck(dashboard: Path) -> subprocess.CompletedProcess[str]:
        return run(node, str(GRAFANA / "typecheck.mjs"), str(dashboard))

    return typecheck


# -- Prometheus Operator's CRD schemas -------------------------------------------------------


def kubernetes_validate(npm: str, node: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """A function that validates manifest files against the Prometheus Operator CRD schemas
    (monitoring/kubernetes/validate.mjs, schemas from @kubernetes-models/prometheus-operator)."""
    npm_ci(npm, KUBERNETES)

    def validate(*manifests: Path) -> subprocess.CompletedProcess[str]:
        return run(node, str(KUBERNETES / "validate.mjs"), *map(str, manifests))

    return validate
