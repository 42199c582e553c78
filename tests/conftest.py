"""Shared fixtures and settings for the whole test suite.

Real tools (promtool, node_exporter, Prometheus, gunicorn) are looked up on PATH. On a laptop
without them the tests that need them skip; with ``GATEMETRICS_REQUIRE_TOOLS=1`` (set by
``.ci/run``) a missing tool fails the test instead, and any skip at all fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tests.processes import REQUIRE_TOOLS, Attacker, Reaper, require_tool

if TYPE_CHECKING:
    from gatemetrics import CounterStore, Schema
    from tests.monitoring_tools import MonitoringStack

# deadline=None: fsync and process start-up jitter on shared machines.
settings.register_profile(
    "ci",
    max_examples=50,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile("thorough", max_examples=2000, stateful_step_count=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def promtool() -> str:
    """Path of Prometheus's promtool (Debian package ``prometheus``)."""
    return require_tool("promtool")


@pytest.fixture
def node_exporter() -> str:
    """Path of node_exporter (Debian package ``prometheus-node-exporter``)."""
    return require_tool("prometheus-node-exporter")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI every skip is a failure: a skipped check is a check that did not run."""
    if not REQUIRE_TOOLS:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(
                f"FAILED: {skipped} test(s) skipped with GATEMETRICS_REQUIRE_TOOLS=1", red=True
            )


@pytest.fixture
def anyio_backend() -> str:
    """anyio's pytest plugin runs ``@pytest.mark.anyio`` tests on asyncio only (no trio here)."""
    return "asyncio"


@pytest.fixture(scope="session")
def monitoring_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitoringStack]:
    """A real node_exporter serving a healthy release_gate.prom, scraped every second by a real
    Prometheus that evaluates monitoring/prometheus/ptf-admin-alerts.yml. Started once, on
    first use (about 8 s: Prometheus 2.42 scrapes 5.5 s after start); stopped by pid."""
    # Imported on first use: the rest of the suite needs neither PyYAML nor these servers.
    from tests.monitoring_tools import monitoring_stack as start

    node_exporter = require_tool("prometheus-node-exporter")
    prometheus = require_tool("prometheus")
    with start(node_exporter, prometheus, tmp_path_factory.mktemp("stack")) as stack:
        yield stack


@pytest.fixture(scope="session")
def grafana_typecheck() -> Callable[[Path], subprocess.CompletedProcess[str]]:
    """Type-checks a dashboard JSON against @grafana/schema (runs ``npm ci`` once if needed)."""
    from tests.monitoring_tools import grafana_typecheck as make

    return make(require_tool("npm"), require_tool("node"))


# -- gatemetrics pytest plugin: this repository's stores are the release gate's ----------------
# (the plugin itself is registered through the pytest11 entry point; pytester tests it.)

pytest_plugins = ["pytester"]


@pytest.fixture
def gatemetrics_schema() -> Schema:
    from backend.app.testing.gate_metrics import GATE_SCHEMA

    return GATE_SCHEMA


@pytest.fixture
def gatemetrics_store_factory() -> Callable[[], CounterStore]:
    from backend.app.testing.gate_metrics import GateMetricStore

    return GateMetricStore


@pytest.fixture
def gatemetrics_namespace() -> str:
    return "release_gate"


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Child processes a test starts; whatever is still running at teardown is SIGKILLed by pid."""
    reaper = Reaper()
    try:
        yield reaper
    finally:
        reaper.kill_all()


@pytest.fixture
def attacker(reaper: Reaper) -> Iterator[Attacker]:
    """A shard directory an unprivileged attacker may write, and a directory it may not
    (see :class:`tests.processes.Attacker`)."""
    import tempfile

    # Under /tmp, not tmp_path: pytest's base directory is 0700, so nobody could not reach it.
    base = Path(tempfile.mkdtemp(prefix="gatemetrics-attack-"))
    base.chmod(0o755)
    try:
        yield Attacker(reaper, base)
    finally:
        reaper.kill_all()  # the attacker's workers, before their directory goes
        shutil.rmtree(base, ignore_errors=True)
