"""Tests of backend.app.demo: the demo is reproducible, multiprocess, and its summary is honest."""

from __future__ import annotations

import io
import re

import pytest

from backend.app.demo import Check, _check, _plan, _series, _shard_files, run_demo
from backend.app.testing.audit import InMemoryAuditLog
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_gate import ReleaseGate
from backend.app.testing.release_policy import BlockReasonCode, ReleasePolicyResult, ReleaseVerdict
from tests.exposition_parser import parse

OK, HOLD, BLOCK = ReleaseVerdict


def test_plan_is_reproducible_mixed_and_valid_for_the_policy() -> None:
    plan = _plan(1000, seed=3)
    assert plan == _plan(1000, seed=3)
    assert plan != _plan(1000, seed=4)
    assert {c.verdict for c in plan} == {OK, HOLD, BLOCK}
    assert any(c.override == "valid" and c.verdict is HOLD for c in plan)
    assert any(c.override == "expired" for c in plan)
    assert any(c.verdict is BLOCK and c.override == "valid" for c in plan)
    for c in plan:
        ReleasePolicyResult(c.verdict, c.reasons)  # every planned result is one the policy allows


@pytest.mark.parametrize(
    ("check", "series"),
    [
        (Check(OK, (), "none"), ["decision ALLOW"]),
        (Check(HOLD, (BlockReasonCode.TIER_FAIL,), "valid"), ["decision ALLOW"]),
        (
            Check(HOLD, (BlockReasonCode.TIER_FAIL,), "expired"),
            ["decision DENY", "reason TIER_FAIL"],
        ),
        (
            Check(BLOCK, (BlockReasonCode.GUARD_VIOLATION,), "valid"),
            ["decision DENY", "reason GUARD_VIOLATION", "contract breach"],
        ),
        (
            Check(BLOCK, (BlockReasonCode.DRIFT_ALERT, BlockReasonCode.NO_TIER_DATA), "none"),
            ["decision DENY", "reason DRIFT_ALERT", "reason NO_TIER_DATA"],
        ),
    ],
)
def test_checks_go_through_the_gate_and_predict_its_emission(
    check: Check, series: list[str]
) -> None:
    store, audit = GateMetricStore(), InMemoryAuditLog()
    decision = _check(ReleaseGate(audit_log=audit, metric_store=store), check)
    assert _series(decision) == series
    assert len(audit.entries) == 1
    counted = [f"decision {d}" for d, n in store.decision_counts().items() for _ in range(n)]
    counted += [f"reason {r}" for r, n in store.reason_counts().items() if n]
    counted += ["contract breach"] * store.breach_counts()["NO_OVERRIDE"]
    assert sorted(counted) == sorted(series)


def test_run_demo_kills_recycles_and_reports_exact_counts() -> None:
    out = io.StringIO()
    assert run_demo(decisions=400, workers=3, seed=1, out=out) == 0
    text = out.getvalue()
    assert "result: exact" in text
    assert "MISMATCH" not in text
    assert re.search(r"SIGKILL worker w1 pid \d+ right after check \d+ \(exit status -9\)", text)
    assert re.search(r"recycle worker w2 pid \d+: exited gracefully", text)
    assert "start   replacement worker w2" in text
    assert "4 worker processes (1 SIGKILLed, 1 recycled)" in text
    assert "progress" in text
    assert re.search(r"audit log entries: (\d+) \(one per returned check: yes\)", text)
    # Compaction left no shard files behind: every worker is dead by now.
    assert "directory after compaction: aggregate.lock, archive.json (0 shard files)" in text
    exposition = "".join(
        line + "\n" for line in text.splitlines() if line.startswith(("#", "release_"))
    )
    families = parse(exposition)
    returned = int(re.search(r"returned (\d+)", text)[1])  # type: ignore[index]
    assert sum(families["release_gate_decision_total"].samples.values()) == returned
    assert 0 < returned < 400  # the killed worker never made the rest of its checks


def test_run_demo_needs_two_workers() -> None:
    with pytest.raises(ValueError, match="at least 2 workers"):
        run_demo(decisions=10, workers=1, out=io.StringIO())


def test_the_summary_counts_shard_files_of_both_formats() -> None:
    inc = "0a1b2c3d-42-18ebf5946eb0ba90-7a033879b067252c"
    v2 = [f"v2-{inc}.shard", f"v2-{inc}.creating"]
    v1 = [f"shard-{inc}.json", f"shard-{inc}.lock", f"shard-{inc}.tmp"]
    other = ["aggregate.lock", "archive.json", "archive.json.tmp", "quarantine", "v2-junk.shard"]
    assert _shard_files(v2 + v1 + other) == 5
    assert _shard_files(other) == 0
