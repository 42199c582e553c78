"""Tests of benchmarks/_apps.py: the variants the gunicorn figure compares do the gate's work."""

from __future__ import annotations

from pathlib import Path

from tests.processes import run_python


def test_the_prometheus_variant_counts_a_real_gate_check_with_its_duration(
    tmp_path: Path,
) -> None:
    # A fresh process: prometheus_client chooses multiprocess mode when it is first imported.
    result = run_python(
        """
        import os, sys
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
        # The module builds the app it serves at import, with the variant chosen here.
        os.environ["GATEMETRICS_BENCH_VARIANT"] = "prometheus"
        from benchmarks import _apps
        from backend.app.testing.audit import InMemoryAuditLog
        from backend.app.testing.gate_metrics import GateMetricStore
        from backend.app.testing.release_gate import ReleaseGate
        from backend.app.testing.release_policy import (
            BlockReasonCode, ReleasePolicyResult, ReleaseVerdict,
        )
        gate = ReleaseGate(InMemoryAuditLog(), GateMetricStore())
        held = ReleasePolicyResult(ReleaseVerdict.RELEASE_HOLD, [BlockReasonCode.TIER_FAIL])
        assert not gate.check(held, now_ms=1).allowed
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        print(generate_latest(registry).decode())
        """,
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "metric emission failed" not in result.stderr  # the gate did not fail open
    assert 'release_gate_decision_total{decision="DENY"} 1.0' in result.stdout
    assert "release_gate_check_duration_seconds_count 1.0" in result.stdout
