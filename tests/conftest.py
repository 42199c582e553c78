"""Shared fixtures and settings for the whole test suite.

Real tools (promtool, node_exporter, Prometheus, gunicorn) are looked up on PATH. On a laptop
without them the tests that need them skip; with ``GATEMETRICS_REQUIRE_TOOLS=1`` (set by
``.ci/run``) a missing tool fails the test instead, and any skip at all fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tests.processes import Attacker, Reaper

if TYPE_CHECKING:
    from backend.app.main import ReleaseGateApp
    from gatemetrics import CounterStore, Schema
    from tests.monitoring_tools import MonitoringStack

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


# Prepended to a child's code by run_python(honour_file_modes=True). Root ignores file modes
# through CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH, CAP_FOWNER); without them it is an ordinary
# owner, so a 0444 file is really read-only to it. Dropping capabilities needs no privilege and
# keeps the child's access to the project wherever CI cloned it (switching to "nobody" would not).
_DROP_FILE_OVERRIDES = """
import ctypes as _ct, os as _os
if _os.geteuid() == 0:
    class _Header(_ct.Structure):
        _fields_ = [("version", _ct.c_uint32), ("pid", _ct.c_int)]
    class _Data(_ct.Structure):
        _fields_ = [("effective", _ct.c_uint32), ("permitted", _ct.c_uint32),
                    ("inheritable", _ct.c_uint32)]
    _libc = _ct.CDLL(None, use_errno=True)
    _header, _data = _Header(0x20080522, 0), (_Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if _libc.capget(_ct.byref(_header), _data) != 0:
        raise OSError(_ct.get_errno(), "capget")
    _mask = ~((1 << 1) | (1 << 2) | (1 << 3)) & 0xFFFFFFFF
    for _field in ("effective", "permitted", "inheritable"):
        setattr(_data[0], _field, getattr(_data[0], _field) & _mask)
    if _libc.capset(_ct.byref(_header), _data) != 0:
        raise OSError(_ct.get_errno(), "capset")
"""


def run_python(
    code: str, *args: str, honour_file_modes: bool = False, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment, a real separate process.

    ``honour_file_modes=True`` makes file permission bits apply even when the suite runs as root
    (CI does), by dropping the capabilities that bypass them in the child only.
    """
    prefix = _DROP_FILE_OVERRIDES if honour_file_modes else ""
    return subprocess.run(
        [sys.executable, "-c", prefix + code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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


# -- the backend ASGI app (tests/test_main.py) -------------------------------------------------

#: The server clock of the ``gate_app`` fixture, in milliseconds since the epoch.
GATE_APP_CLOCK_MS = 1_800_000_000_000


@pytest.fixture
def gate_app(tmp_path: Path) -> Iterator[ReleaseGateApp]:
    """The backend app over a fresh shard directory (``tmp_path/shards``) and audit log
    (``tmp_path/audit.jsonl``), its server clock fixed at ``GATE_APP_CLOCK_MS``. Not started:
    a test drives the lifespan, or its first request starts the app. Teardown shuts down what
    is left (final save, shard lock released)."""
    import anyio

    from backend.app.main import Settings, create_app

    settings = Settings(str(tmp_path / "shards"), str(tmp_path / "audit.jsonl"))
    app = create_app(settings, clock_ms=lambda: GATE_APP_CLOCK_MS)
    yield app
    anyio.run(app.shutdown)
