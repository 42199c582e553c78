"""Fixtures of the monitoring tests only (the suite-wide ones are in tests/conftest.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import require_tool


@pytest.fixture(scope="session")
def kubernetes_validate() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Validates manifests against the Prometheus Operator CRD schemas (``npm ci`` once if
    needed); call it with the manifest paths."""
    from tests.monitoring_tools import kubernetes_validate as make

    return make(require_tool("npm"), require_tool("node"))


@pytest.fixture
def extracted_rules_dir(tmp_path: Path) -> Path:
    """An empty ``prometheus/`` directory with a ``tests/`` below it, laid out like
    monitoring/prometheus so the unit tests' ``rule_files: [../ptf-admin-alerts.yml]`` resolve."""
    directory = tmp_path / "prometheus"
    (directory / "tests").mkdir(parents=True)
    return directory
