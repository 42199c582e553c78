"""release_gate_check_duration_seconds: every gate check observed once, audit write included,
in the same atomic step (and the same save) as the check's counts; fail-open like the rest."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from backend.app.testing.audit import InMemoryAuditLog, JsonlAuditLog
from backend.app.testing.gate_metrics import (
    CHECK_DURATION_BUCKETS,
    GATE_SCHEMA,
    GateMetricExporter,
    GateMetricStore,
)
from backend.app.testing.release_gate import ReleaseGate
from backend.app.testing.release_policy import BlockReasonCode, ReleasePolicyResult, ReleaseVerdict
from gatemetrics import CounterStore, Schema, shard_for
from tests.exposition_parser import parse
from tests.gate.gate_shards import CHECK_DURATION_LE
from tests.processes import require_tool
from tests.strategies import GATE_NOW_MS

OK_RESULT = ReleasePolicyResult(ReleaseVerdict.RELEASE_OK, [])
BLOCKED = ReleasePolicyResult(ReleaseVerdict.RELEASE_BLOCK, [BlockReasonCode.TIER_FAIL])
SLOW_AUDIT_S = 0.03


class SlowAuditLog(InMemoryAuditLog):
    """An audit log whose write takes at least SLOW_AUDIT_S of real time (a slow fsync)."""

    def record(self, entry: Any) -> None:
        began = time.perf_counter()
        super().record(entry)
        # Spin on the clock the gate measures with, rather than sleep: the write is then at
        # least this long whatever the scheduler does, and the test waits only that long.
        while time.perf_counter() - began < SLOW_AUDIT_S:
            pass


def _bucket_of(seconds: float) -> str:
    """The le of the first bucket that holds ``seconds``."""
    return next((repr(b) for b in CHECK_DURATION_BUCKETS if seconds <= b), "+Inf")


def test_the_histogram_is_declared_exactly_as_the_dashboard_and_alert_expect() -> None:
    fam = GATE_SCHEMA.family("check_duration")
    assert fam.name == "release_gate_check_duration_seconds"
    assert fam.kind == "histogram"
    assert fam.label is None
    assert fam.buckets == (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
    assert fam.documentation == "Time a release-gate check spends, audit write included."
    assert list(fam.bucket_labels) == CHECK_DURATION_LE


def test_a_check_observes_its_whole_duration_audit_write_included() -> None:
    store = GateMetricStore()
    gate = ReleaseGate(SlowAuditLog(), store)
    before = time.perf_counter()
    gate.check(OK_RESULT, now_ms=GATE_NOW_MS)
    elapsed = time.perf_counter() - before
    buckets, total = store.check_durations()
    assert buckets[-1] == 1  # one check, one observation
    # The slow audit write is inside what was measured, and nothing outside the call is.
    assert SLOW_AUDIT_S <= total <= elapsed
    index = CHECK_DURATION_LE.index(_bucket_of(total))
    assert buckets[index] == 1
    assert index == 0 or buckets[index - 1] == 0


@pytest.mark.anyio
async def test_acheck_observes_its_duration_once_too() -> None:
    store = GateMetricStore()
    gate = ReleaseGate(SlowAuditLog(), store)
    before = time.perf_counter()
    await gate.acheck(BLOCKED, now_ms=GATE_NOW_MS)
    elapsed = time.perf_counter() - before
    buckets, total = store.check_durations()
    assert buckets[-1] == 1
    assert SLOW_AUDIT_S <= total <= elapsed
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 1}


def test_a_failed_audit_write_is_timed_as_well() -> None:
    class Broken(InMemoryAuditLog):
        def record(self, entry: Any) -> None:
            raise OSError(28, "No space left on device")

    store = GateMetricStore()
    ReleaseGate(Broken(), store, failure_log_interval=3600).check(OK_RESULT, now_ms=GATE_NOW_MS)
    assert store.audit_write_failures() == 1
    assert store.check_durations()[0][-1] == 1


def test_each_check_is_one_save_holding_its_counts_and_its_duration(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path / "shards")
    gate = ReleaseGate(JsonlAuditLog(tmp_path / "audit.jsonl"), store)
    for i in range(5):
        gate.check(OK_RESULT if i % 2 else BLOCKED, now_ms=GATE_NOW_MS)
        # Write-through: one save per check, the observation in the same one as the decision.
        assert store.generation == i + 1
        view = GateMetricStore.load_from_dir(tmp_path / "shards")
        assert sum(view.decision_counts().values()) == i + 1
        buckets, total = view.check_durations()
        assert buckets[-1] == i + 1
        assert total == store.check_durations()[1] > 0.0
    binding.close()
    view = GateMetricStore.load_from_dir(tmp_path / "shards")
    assert view.check_durations() == store.check_durations()


@pytest.mark.parametrize(
    "duration", [math.nan, -0.5, math.inf, -math.inf, "0.1", True, 10**400, [0.1]]
)
def test_a_duration_that_is_not_a_finite_non_negative_number_is_skipped_not_raised(
    duration: object,
) -> None:
    store = GateMetricStore()
    store.record_outcome(False, [BlockReasonCode.TIER_FAIL], duration=duration)  # type: ignore[arg-type]
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 1}  # the rest is counted
    assert store.reason_counts()["TIER_FAIL"] == 1
    assert store.check_durations() == ((0,) * len(CHECK_DURATION_LE), 0.0)


def test_record_outcome_puts_a_duration_in_the_first_bucket_that_holds_it() -> None:
    store = GateMetricStore()
    for seconds in (0.0, 0.001, 0.0011, 2.5, 3.0, 7):
        store.record_outcome(True, duration=seconds)
    buckets, total = store.check_durations()
    by_le = dict(zip(CHECK_DURATION_LE, buckets, strict=True))
    assert by_le["0.001"] == 2  # 0.0 and the bound itself
    assert by_le["0.0025"] == 3
    assert by_le["2.5"] == 4
    assert by_le["+Inf"] == 6
    assert total == 0.0 + 0.001 + 0.0011 + 2.5 + 3.0 + 7.0
    assert store.decision_counts()["ALLOW"] == 6


def test_a_sink_that_does_not_take_the_duration_is_called_as_before() -> None:
    calls: list[dict[str, Any]] = []

    class OldSink:
        def record_outcome(
            self, allowed: bool, reasons: Any, *, breach: bool, audit_write_failure: bool
        ) -> None:
            calls.append({"allowed": allowed, "breach": breach})

    class TimedSink(OldSink):
        records_check_duration = True

        def record_outcome(self, allowed: bool, reasons: Any, **kwargs: Any) -> None:
            calls.append(kwargs)

    ReleaseGate(InMemoryAuditLog(), OldSink()).check(OK_RESULT, now_ms=GATE_NOW_MS)
    ReleaseGate(InMemoryAuditLog(), TimedSink()).check(OK_RESULT, now_ms=GATE_NOW_MS)
    old, timed = calls
    assert old == {"allowed": True, "breach": False}
    assert set(timed) == {"breach", "audit_write_failure", "duration"}
    assert timed["duration"] >= 0.0


def test_the_exposition_renders_the_histogram_and_promtool_accepts_it() -> None:
    promtool = require_tool("promtool")
    store = GateMetricStore()
    for seconds in (0.0004, 0.003, 0.003, 0.2, 4.0):
        store.record_outcome(True, duration=seconds)
    text = GateMetricExporter.export_prometheus(store)
    assert (
        "# HELP release_gate_check_duration_seconds Time a release-gate check spends, audit "
        "write included.\n# TYPE release_gate_check_duration_seconds histogram\n"
        'release_gate_check_duration_seconds_bucket{le="0.001"} 1\n'
        'release_gate_check_duration_seconds_bucket{le="0.0025"} 1\n'
        'release_gate_check_duration_seconds_bucket{le="0.005"} 3\n'
    ) in text
    assert text.endswith(
        'release_gate_check_duration_seconds_bucket{le="2.5"} 4\n'
        'release_gate_check_duration_seconds_bucket{le="+Inf"} 5\n'
        f"release_gate_check_duration_seconds_sum {0.0004 + 0.003 + 0.003 + 0.2 + 4.0!r}\n"
        "release_gate_check_duration_seconds_count 5\n"
    )
    series = parse(text)["release_gate_check_duration_seconds"].histograms[None]
    assert series.count == 5
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_shards_written_before_the_histogram_existed_still_read(tmp_path: Path) -> None:
    # The previous gate schema: the same five counters, no histogram (it is appended last, so
    # the counters keep their slots and such a shard fits the new schema).
    old = Schema(GATE_SCHEMA.families[:5])
    store = CounterStore(old)
    store.increment("decision_counts", "DENY", 3)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    shard.close()
    view = GateMetricStore.load_from_dir(tmp_path, strict=True)
    assert view.decision_counts() == {"ALLOW": 0, "DENY": 3}
    assert view.check_durations() == ((0,) * len(CHECK_DURATION_LE), 0.0)
