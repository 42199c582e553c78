"""The release gate's series, for the gate's, the app's and the monitoring tests: every family
and label value the gate's expositions may carry (the engine's tests use a schema of their own,
in tests/engine/schema.py)."""

from __future__ import annotations

from backend.app.testing.release_policy import BlockReasonCode

__all__ = [
    "CHECK_DURATION_LE",
    "GATE_COUNTER_FAMILIES",
    "GATE_FAMILIES",
    "GATE_SERIES",
    "PIPELINE_FAMILIES",
    "REASONS",
]

REASONS = [r.value for r in BlockReasonCode]
GATE_COUNTER_FAMILIES = [
    "release_gate_decision_total",
    "release_gate_reason_total",
    "release_gate_contract_breach_total",
    "release_gate_audit_write_failures_total",
    "release_gate_metric_write_failures_total",
]
#: Every family of the gate's exposition, in order: the counters, then the one histogram.
GATE_FAMILIES = [*GATE_COUNTER_FAMILIES, "release_gate_check_duration_seconds"]
#: The ``le`` values of release_gate_check_duration_seconds, as rendered (the monitoring
#: helper's alert and dashboard are written for exactly these).
CHECK_DURATION_LE = [
    "0.001",
    "0.0025",
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    "1.0",
    "2.5",
    "+Inf",
]
PIPELINE_FAMILIES = ["release_gate_quarantined_shards_total", "release_gate_shards"]
# Every series an exposition may ever carry (design.md section 4, invariant 1).
GATE_SERIES: dict[str, set[tuple[str, str] | None]] = {
    "release_gate_decision_total": {("decision", "ALLOW"), ("decision", "DENY")},
    "release_gate_reason_total": {("reason", r) for r in REASONS},
    "release_gate_contract_breach_total": {("kind", "NO_OVERRIDE")},
    "release_gate_audit_write_failures_total": {None},
    "release_gate_metric_write_failures_total": {None},
    "release_gate_check_duration_seconds": {None},  # a histogram: its one series
}
