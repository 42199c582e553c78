"""The repository's tests get the gate's stores from gatemetrics' pytest plugin: the root
conftest overrides the plugin's schema, store factory and namespace with the gate's (the
plugin's own behaviour is tested in tests/engine/test_pytest_plugin.py, on a schema of its own)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backend.app.testing.gate_metrics import GateMetricStore
from gatemetrics import Aggregate


def test_this_repositorys_tests_get_gate_stores(
    gatemetrics_store: GateMetricStore,
    gatemetrics_dir: Path,
    gatemetrics_aggregate: Callable[..., Aggregate],
) -> None:
    gatemetrics_store.record_outcome(False, ["OPS_GATE_FAIL"], breach=True)
    result = gatemetrics_aggregate()
    assert result.snapshot().get("breach_counts", "NO_OVERRIDE") == 1
    assert "release_gate_shards" in result.render_prometheus()
    assert GateMetricStore.load_from_dir(gatemetrics_dir).decision_counts()["DENY"] == 1
