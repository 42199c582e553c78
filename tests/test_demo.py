"""Tests of backend.app.demo: the demo is reproducible, multiprocess, and its summary is honest."""

from __future__ import annotations

import io
import re

import pytest

from backend.app.demo import Check, Outcome, _decide, _plan, run_demo
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_policy import BlockReasonCode
from tests.exposition_parser import parse


def test_plan_is_reproducible_and_mixed() -> None:
    plan = _plan(1000, seed=3)
    assert plan == _plan(1000, seed=3)
    assert plan != _plan(1000, seed=4)
    verdicts = {c.verdict for c in plan}
    assert verdicts == {"release_ok", "release_hold", "release_block"}
    assert any(c.override == "valid" and c.verdict == "release_hold" for c in plan)
    assert any(c.override == "expired" for c in plan)
    assert any(c.verdict == "release_block" and c.override == "valid" for c in plan)


@pytest.mark.parametrize(
    ("check", "outcome"),
    [
        (Check("release_ok", (), "none"), Outcome(True, (), False)),
        (
            Check("release_hold", (BlockReasonCode.TIER_FAIL,), "valid"),
            Outcome(True, ("TIER_FAIL",), False),
        ),
        (
            Check("release_hold", (BlockReasonCode.TIER_FAIL,), "expired"),
            Outcome(False, ("TIER_FAIL",), False),
        ),
        (
            Check("release_block", (BlockReasonCode.GUARD_VIOLATION,), "valid"),
            Outcome(False, ("GUARD_VIOLATION",), True),
        ),
        (
            Check("release_block", (BlockReasonCode.DRIFT_ALERT,), "none"),
            Outcome(False, ("DRIFT_ALERT",), False),
        ),
    ],
)
def test_decide_follows_the_gate_table_and_emits_once(check: Check, outcome: Outcome) -> None:
    store = GateMetricStore()
    assert _decide(store, check) == outcome
    counts = store.decision_counts()
    assert sum(counts.values()) == 1
    assert counts["ALLOW" if outcome.allowed else "DENY"] == 1
    assert store.breach_counts()["NO_OVERRIDE"] == int(outcome.breach)


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
    # Compaction left no shard files behind: every worker is dead by now.
    assert "(0 shard files)" in text
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
