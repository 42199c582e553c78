"""Shared fixtures and settings for the whole test suite.

Real tools (promtool, node_exporter, Prometheus, gunicorn) are looked up on PATH. On a laptop
without them the tests that need them skip; with ``GATEMETRICS_REQUIRE_TOOLS=1`` (set by
``.ci/run``) a missing tool fails the test instead, and any skip at all fails the run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tests.processes import Reaper

if TYPE_CHECKING:
    from gatemetrics import CounterStore, Schema

REQUIRE_TOOLS = os.environ.get("GATEMETRICS_REQUIRE_TOOLS") == "1"

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


def require_tool(name: str) -> str:
    """The path of tool ``name``; skip without it, or fail when CI requires real tools."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH"
        if REQUIRE_TOOLS:
            pytest.fail(f"{message} (GATEMETRICS_REQUIRE_TOOLS=1 forbids skipping)")
        pytest.skip(message)
    return path


@pytest.fixture
def promtool() -> str:
    """Path of Prometheus's promtool (Debian package ``prometheus``)."""
    return require_tool("promtool")


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
def anyio_backend() -> str:
    """anyio tests run on asyncio (design.md section 6)."""
    return "asyncio"


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Child processes a test starts; whatever is still running at teardown is SIGKILLed by pid."""
    reaper = Reaper()
    try:
        yield reaper
    finally:
        reaper.kill_all()
