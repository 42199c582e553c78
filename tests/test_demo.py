"""Tests of backend.app.demo: the demo is reproducible and its summary is honest."""

from __future__ import annotations

import io

from backend.app.demo import _plan, run_demo


def test_plan_is_reproducible_and_mixed() -> None:
    plan = _plan(1000, seed=3)
    assert plan == _plan(1000, seed=3)
    assert plan != _plan(1000, seed=4)
    assert any(a for a, _, _ in plan)
    assert any(not a for a, _, _ in plan)
    assert any(b for *_, b in plan)


def test_run_demo_reports_exact_counts() -> None:
    out = io.StringIO()
    assert run_demo(decisions=300, seed=1, out=out) == 0
    assert "result: exact" in out.getvalue()
