"""Tests of backend.app.demo: the demo is reproducible, multiprocess, and its summary is honest."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backend.app.demo import Check, _check, _plan, _series, _shard_files, run_demo
from backend.app.testing.audit import InMemoryAuditLog
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_gate import ReleaseGate
from backend.app.testing.release_policy import BlockReasonCode, ReleasePolicyResult, ReleaseVerdict
from tests.exposition_parser import parse
from tests.gate.gate_shards import GATE_FAMILIES, PIPELINE_FAMILIES
from tests.processes import ROOT, Reaper, read_line, run_cli, wait_until

FAMILIES = GATE_FAMILIES + PIPELINE_FAMILIES


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
    timed = re.search(r"checks timed \(histogram\) +(\d+) +(\d+)\n", text)
    returned = re.search(r"returned (\d+) ", text)
    assert timed is not None
    assert returned is not None
    assert timed[1] == timed[2] == returned[1]  # one observation per returned check
    assert "progress" in text
    assert re.search(r"audit log entries: (\d+) \(one per returned check: yes\)", text)
    # Compaction left no shard files behind: every worker is dead by now.
    assert (
        "directory after compaction: aggregate.lock, archive.json, schema.json (0 shard files)"
        in text
    )
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


# -- gatemetrics demo, the command the service registers ---------------------------------


def test_demo_without_arguments_prints_exposition_and_an_exact_summary() -> None:
    result = run_cli("demo", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "result: exact" in result.stdout
    assert "MISMATCH" not in result.stdout
    exposition = "".join(
        line + "\n" for line in result.stdout.splitlines() if line.startswith(("#", "release_"))
    )
    families = parse(exposition)
    assert list(families) == FAMILIES
    returned = int(re.search(r"returned (\d+)", result.stdout)[1])  # type: ignore[index]
    assert sum(families["release_gate_decision_total"].samples.values()) == returned


@pytest.mark.parametrize(
    ("option", "value"),
    [("--decisions", "0"), ("--decisions", "-3"), ("--decisions", "many"), ("--workers", "1")],
)
def test_demo_rejects_bad_arguments(option: str, value: str) -> None:
    result = run_cli("demo", option, value, timeout=120)
    assert result.returncode == 2
    assert option in result.stderr


def test_closed_stdout_is_not_a_traceback_and_leaves_no_worker(reaper: Reaper) -> None:
    proc = reaper.track(
        subprocess.Popen(
            [sys.executable, "-m", "gatemetrics", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    )
    line = read_line(proc)
    while "pid" not in line:
        line = read_line(proc)
    worker = int(re.search(r"pid (\d+)", line)[1])  # type: ignore[index]
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    assert proc.returncode in (0, 141)

    def gone() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout=10)


def test_without_the_service_installed_demo_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    """The engine alone (the service's distribution absent from the environment): the engine
    imports nothing of the service, and ``gatemetrics demo`` says what to install."""
    site = Path(
        subprocess.check_output(
            [
                sys.executable,
                "-c",
                "import orjson, os; print(os.path.dirname(os.path.dirname(orjson.__file__)))",
            ],
            text=True,
        ).strip()
    )
    alone = tmp_path / "site"
    alone.mkdir()
    for entry in site.iterdir():
        # Everything but the service's distribution and the editable installs' path hooks.
        if (
            entry.name.startswith(("release_gate", "__editable__", "_release_gate"))
            or entry.suffix == ".pth"
        ):
            continue
        (alone / entry.name).symlink_to(entry)
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{alone}", "PYTHONNOUSERSITE": "1"}
    code = (
        "import sys, runpy; sys.argv = ['gatemetrics', *sys.argv[1:]]; "
        "runpy.run_module('gatemetrics', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env},
    )
    assert result.returncode == 2, result.stderr
    assert "command 'demo' is not installed" in result.stderr
    assert "./service" in result.stderr
    assert "Traceback" not in result.stderr
    # aggregate and status still work without it.
    helped = subprocess.run(
        [sys.executable, "-S", "-c", code, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env},
    )
    assert helped.returncode == 0, helped.stderr
    assert "demo" not in helped.stdout
    assert "aggregate" in helped.stdout
