"""Developer and CI sessions. ``python3 -m nox`` runs the default set (what CI runs).

Sessions install the project (the engine at the root, the release-gate service in service/)
into their own virtual environments, so a machine needs only Python, pip and nox. Tool versions
are pinned here so a lint or type failure means the code changed, not the tool.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typing", "tests", "monitoring", "e2e"]
nox.options.error_on_missing_interpreters = True

RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (pytest, hypothesis; real promtool when installed; real gunicorn)."""
    session.install("-e", ".[test]", "-e", "./service[server]")
    # The monitoring tests run in their own session (with promtool, Prometheus and tsc), and so
    # do the end-to-end tests (real gunicorn, node_exporter and Prometheus).
    session.run("pytest", "-m", "not monitoring and not e2e", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over gatemetrics and backend."""
    session.install("-e", ".[test]", "-e", "./service[server]", MYPY)
    session.run("mypy", "--strict", "gatemetrics", "service/backend")


# Real tools of the monitoring session, from Debian packages (.ci/run installs them).
MONITORING_TOOLS = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "prometheus-node-exporter": "prometheus-node-exporter",
    "node": "nodejs",
    "npm": "npm",
    "jq": "jq",
}


@nox.session
def monitoring(session: nox.Session) -> None:
    """Alert rules, dashboard, runbook and Kubernetes manifests: promtool lint and unit tests,
    the dashboard's type-check against @grafana/schema, the manifests against the Prometheus
    Operator CRD schemas, and their Python tests (real tools, never skipped in CI)."""
    missing = sorted({pkg for tool, pkg in MONITORING_TOOLS.items() if not shutil.which(tool)})
    if missing:
        message = f"missing tools; install the Debian packages {' '.join(missing)}"
        if os.environ.get("GATEMETRICS_REQUIRE_TOOLS") == "1":
            session.error(message)
        session.skip(message)
    rules = "monitoring/prometheus/ptf-admin-alerts.yml"
    unit_tests = sorted(str(p) for p in Path("monitoring/prometheus/tests").glob("*.test.yml"))
    if not unit_tests:
        session.error("no promtool unit tests in monitoring/prometheus/tests")
    # --lint-fatal: without it promtool 2.42 prints lint findings and still exits 0.
    session.run("promtool", "check", "rules", "--lint=all", "--lint-fatal", rules, external=True)
    session.run("promtool", "test", "rules", *unit_tests, external=True)
    with session.chdir("monitoring/grafana"):
        session.run("npm", "ci", "--no-audit", "--no-fund", external=True)
        session.run("npm", "run", "typecheck", external=True)
    # The Kubernetes manifests against the Prometheus Operator's CRD schemas (npm package).
    with session.chdir("monitoring/kubernetes"):
        session.run("npm", "ci", "--no-audit", "--no-fund", external=True)
        session.run("npm", "run", "validate", external=True)
    session.install("-e", ".[test]", "-e", "./service")
    session.run(
        "pytest",
        "tests/monitoring",
        *session.posargs,
    )


@nox.session
def e2e(session: nox.Session) -> None:
    """End to end with real servers: a multi-worker gunicorn serving the backend app, the
    aggregator cron, node_exporter's textfile collector and Prometheus with our alert rules.
    Prints what it measured (-rP)."""
    session.install("-e", ".[test]", "-e", "./service[server]")
    session.run("pytest", "-m", "e2e", "-rP", "tests/e2e", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks side by side with prometheus_client; regenerates benchmarks/RESULTS.md and
    results.json (not part of the test run; a few minutes). ``-- --only 1,3`` runs some
    figures, ``-- --quick`` a small trial into a temp directory. Figure 5 loads a real gunicorn
    with wrk (Debian package ``wrk``)."""
    if not shutil.which("wrk"):
        session.error("figure 5 needs wrk on PATH; install the Debian package wrk")
    session.install("-e", ".[bench]", "-e", "./service[server]")
    session.run("python", "-m", "benchmarks", *session.posargs)
