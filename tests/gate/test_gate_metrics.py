"""Tests of backend.app.testing.gate_metrics: the gate's counters on the engine."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import backend.app.testing.gate_metrics as gm
import gatemetrics
from backend.app.testing.gate_metrics import (
    GATE_NAMESPACE,
    GATE_SCHEMA,
    GateMetricExporter,
    GateMetricStore,
    GateMetricView,
)
from backend.app.testing.release_policy import BlockReasonCode
from gatemetrics import (
    CounterStore,
    LockTimeoutError,
    SchemaError,
    bind,
    save_to_dir,
    shard_for,
)
from tests.exposition_parser import parse
from tests.gate.gate_shards import (
    CHECK_DURATION_LE,
    GATE_COUNTER_FAMILIES,
    GATE_FAMILIES,
    GATE_SERIES,
    REASONS,
)
from tests.processes import run_python
from tests.shard_tools import in_forked_child
from tests.strategies import any_reason, store_ops, valid_reason

FAMILIES = GATE_FAMILIES
ALLOWED_SERIES = GATE_SERIES


def apply(store: GateMetricStore, ops: list[tuple[Any, ...]]) -> None:
    for op in ops:
        if op[0] == "decision":
            store.record_decision(op[1], op[2])
        elif op[0] == "breach":
            store.record_breach()
        elif op[0] == "audit_failure":
            store.record_audit_write_failure()
        else:
            store.record_metric_write_failure()


def valid_distinct(reasons: list[Any]) -> set[str]:
    out = set()
    for r in reasons:
        if isinstance(r, str) and r in REASONS:
            out.add(str(r))
    return out


# -- unit tests ------------------------------------------------------------------------------


def test_a_new_store_counts_zero_everywhere() -> None:
    store = GateMetricStore()
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 0}
    assert store.reason_counts() == dict.fromkeys(REASONS, 0)
    assert list(store.reason_counts()) == REASONS
    assert store.breach_counts() == {"NO_OVERRIDE": 0}
    assert store.audit_write_failures() == 0
    assert store.metric_write_failures() == 0
    assert store.store_generation == 0


def test_store_start_timestamp_comes_from_the_injected_clock() -> None:
    assert GateMetricStore(clock=lambda: 1_700_000_000.25).store_start_timestamp == 1_700_000_000.25


def test_allow_counts_allow_and_ignores_reasons() -> None:
    store = GateMetricStore()
    store.record_decision(True, [BlockReasonCode.TIER_FAIL])
    store.record_decision(True)
    assert store.decision_counts() == {"ALLOW": 2, "DENY": 0}
    assert sum(store.reason_counts().values()) == 0


def test_deny_counts_each_distinct_reason_once() -> None:
    store = GateMetricStore()
    store.record_decision(
        False, [BlockReasonCode.TIER_FAIL, "TIER_FAIL", BlockReasonCode.DRIFT_ALERT]
    )
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 1}
    assert store.reason_counts()["TIER_FAIL"] == 1
    assert store.reason_counts()["DRIFT_ALERT"] == 1
    assert sum(store.reason_counts().values()) == 2


def test_deny_without_reasons_counts_only_the_decision() -> None:
    store = GateMetricStore()
    store.record_decision(False)
    store.record_decision(False, None)
    store.record_decision(False, [])
    assert store.decision_counts()["DENY"] == 3
    assert sum(store.reason_counts().values()) == 0


@pytest.mark.parametrize(
    "reasons",
    [
        ["tier_fail", "TIER_FAIL ", "", "NO_OVERRIDE", "ALLOW"],
        [None, 3, 2.5, b"TIER_FAIL", ["TIER_FAIL"], {"TIER_FAIL": 1}],
        12,  # not iterable at all
        ['TIER_FAIL"} 1\nrelease_gate_reason_total{reason="X'],
    ],
)
def test_invalid_reasons_are_skipped_silently(reasons: Any) -> None:
    store = GateMetricStore()
    store.record_decision(False, reasons)
    assert store.decision_counts()["DENY"] == 1
    assert sum(store.reason_counts().values()) == 0


def test_a_lone_string_reason_counts_as_one_reason() -> None:
    store = GateMetricStore()
    store.record_decision(False, "FLAKY_TESTS")
    store.record_decision(False, BlockReasonCode.NO_DRIFT_DATA)
    assert store.reason_counts()["FLAKY_TESTS"] == 1
    assert store.reason_counts()["NO_DRIFT_DATA"] == 1
    assert sum(store.reason_counts().values()) == 2


def test_a_failing_reason_iterator_keeps_what_it_yielded() -> None:
    def reasons() -> Any:
        yield "OPS_GATE_FAIL"
        raise RuntimeError("broken generator")

    store = GateMetricStore()
    store.record_decision(False, reasons())
    assert store.reason_counts()["OPS_GATE_FAIL"] == 1
    assert store.decision_counts()["DENY"] == 1


@pytest.mark.parametrize("allowed", ["false", 0, 1, None])
def test_allowed_must_be_a_bool(allowed: Any) -> None:
    store = GateMetricStore()
    with pytest.raises(TypeError, match="bool"):
        store.record_decision(allowed, [])
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 0}


def test_breach_audit_and_metric_failure_counters() -> None:
    store = GateMetricStore()
    store.record_breach()
    store.record_breach()
    store.record_audit_write_failure()
    for _ in range(3):
        store.record_metric_write_failure()
    assert store.breach_counts() == {"NO_OVERRIDE": 2}
    assert store.audit_write_failures() == 1
    assert store.metric_write_failures() == 3
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 0}


def test_many_threads_count_exactly() -> None:
    store = GateMetricStore()
    threads_n, per_thread = 8, 4000
    barrier = threading.Barrier(threads_n)

    def work() -> None:
        barrier.wait()
        for i in range(per_thread):
            if i % 2:
                store.record_decision(True)
            else:
                store.record_decision(False, [BlockReasonCode.TIER_FAIL, "CANARY_BREAKING"])
            if i % 4 == 0:
                store.record_breach()
                store.record_audit_write_failure()
                store.record_metric_write_failure()

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = threads_n * per_thread
    assert store.decision_counts() == {"ALLOW": total // 2, "DENY": total // 2}
    assert store.reason_counts()["TIER_FAIL"] == total // 2
    assert store.reason_counts()["CANARY_BREAKING"] == total // 2
    assert store.breach_counts()["NO_OVERRIDE"] == total // 4
    assert store.audit_write_failures() == total // 4
    assert store.metric_write_failures() == total // 4


# -- to_dict / from_dict -----------------------------------------------------------------------


def test_to_dict_has_the_documented_layout() -> None:
    store = GateMetricStore(clock=lambda: 42.0)
    store.record_decision(False, ["GUARD_VIOLATION"])
    assert store.to_dict() == {
        "decision_counts": {"ALLOW": 0, "DENY": 1},
        "reason_counts": {r: int(r == "GUARD_VIOLATION") for r in REASONS},
        "breach_counts": {"NO_OVERRIDE": 0},
        "audit_write_failures": 0,
        "metric_write_failures": 0,
        "check_duration": {
            "buckets": dict.fromkeys(CHECK_DURATION_LE, 0),
            "count": 0,
            "sum": 0.0,
        },
        "store_generation": 0,
        "store_start_timestamp": 42.0,
    }


def _valid_doc() -> dict[str, Any]:
    return GateMetricStore(clock=lambda: 1.0).to_dict()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["decision_counts"].update(MAYBE=1), "decision_counts.MAYBE"),
        (lambda d: d["reason_counts"].update(tier_fail=1), "reason_counts.tier_fail"),
        (lambda d: d["breach_counts"].update(OTHER=1), "breach_counts.OTHER"),
        (lambda d: d.update(extra_family={}), "extra_family"),
        (lambda d: d["decision_counts"].update(ALLOW=-1), "decision_counts.ALLOW"),
        (lambda d: d["decision_counts"].update(ALLOW=1.0), "decision_counts.ALLOW"),
        (lambda d: d["decision_counts"].update(ALLOW="1"), "decision_counts.ALLOW"),
        (lambda d: d["decision_counts"].update(ALLOW=True), "decision_counts.ALLOW"),
        (lambda d: d.update(audit_write_failures=None), "audit_write_failures"),
        (lambda d: d.update(metric_write_failures=-2), "metric_write_failures"),
        (lambda d: d.update(reason_counts=[1, 2]), "reason_counts"),
        (lambda d: d.update(store_generation="7"), "store_generation"),
        (lambda d: d.pop("store_start_timestamp"), "store_start_timestamp"),
    ],
)
def test_from_dict_rejects_malformed_input_naming_the_field(mutate: Any, field: str) -> None:
    doc = _valid_doc()
    mutate(doc)
    with pytest.raises(SchemaError) as err:
        GateMetricStore.from_dict(doc)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("doc", [None, [], "{}", 3])
def test_from_dict_rejects_non_mappings(doc: Any) -> None:
    with pytest.raises(SchemaError):
        GateMetricStore.from_dict(doc)


def test_from_dict_restores_metadata() -> None:
    doc = _valid_doc() | {"store_generation": 9, "store_start_timestamp": 1_700_000_000.5}
    store = GateMetricStore.from_dict(doc)
    assert store.store_generation == 9
    assert store.store_start_timestamp == 1_700_000_000.5


@given(store_ops, st.floats(0, 4e9, allow_nan=False), st.integers(0, 2**40))
def test_from_dict_of_to_dict_round_trips(ops: list[Any], start: float, generation: int) -> None:
    """P6: from_dict(to_dict()) gives back an equal store, through JSON too."""
    store = GateMetricStore(clock=lambda: start)
    apply(store, ops)
    doc = store.to_dict() | {"store_generation": generation}
    clone = GateMetricStore.from_dict(doc)
    assert clone.to_dict() == doc
    assert GateMetricStore.from_dict(orjson.loads(orjson.dumps(doc))).to_dict() == doc
    assert GateMetricExporter.export_json(clone) == GateMetricExporter.export_json(
        GateMetricStore.from_dict(doc)
    )


# -- properties ------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.booleans(), st.lists(any_reason, max_size=5)), max_size=80))
def test_decision_totals_match_calls_and_reasons_match_denies(
    calls: list[tuple[bool, list[Any]]],
) -> None:
    """P1: decision totals equal the number of calls; reason counts match the DENY calls."""
    store = GateMetricStore()
    for allowed, reasons in calls:
        store.record_decision(allowed, reasons)
    allows = sum(1 for allowed, _ in calls if allowed)
    assert store.decision_counts() == {"ALLOW": allows, "DENY": len(calls) - allows}
    expected = Counter(r for allowed, rs in calls if not allowed for r in valid_distinct(rs))
    assert store.reason_counts() == {r: expected[r] for r in REASONS}


@given(store_ops)
def test_labels_stay_bounded_under_any_operations(ops: list[Any]) -> None:
    """P4: whatever is recorded, hostile reasons included, only the declared series exist."""
    store = GateMetricStore()
    apply(store, ops)
    families = parse(GateMetricExporter.export_prometheus(store))
    assert list(families) == FAMILIES
    for name, fam in families.items():
        assert (
            set(fam.histograms if fam.kind == "histogram" else fam.samples)
            == (ALLOWED_SERIES[name])
        )
    doc = store.to_dict()
    assert set(doc["reason_counts"]) == set(REASONS)
    assert set(doc["decision_counts"]) == {"ALLOW", "DENY"}


@given(
    st.lists(st.tuples(st.booleans(), st.lists(valid_reason, max_size=4)), max_size=40),
    st.randoms(),
)
def test_equal_counts_give_byte_identical_exposition(
    calls: list[tuple[bool, list[Any]]], rnd: Any
) -> None:
    """P7: equal counts give byte-identical exposition and JSON, with every family present."""
    a, b = GateMetricStore(clock=lambda: 1.0), GateMetricStore(clock=lambda: 1.0)
    for allowed, reasons in calls:
        a.record_decision(allowed, reasons)
    shuffled = list(calls)
    rnd.shuffle(shuffled)
    for allowed, reasons in shuffled:
        b.record_decision(allowed, list(reversed(reasons)))
    text = GateMetricExporter.export_prometheus(a)
    assert text == GateMetricExporter.export_prometheus(b)
    assert GateMetricExporter.export_json(a) == GateMetricExporter.export_json(b)
    for name in GATE_COUNTER_FAMILIES:
        assert f"# TYPE {name} counter\n" in text
    assert "# TYPE release_gate_check_duration_seconds histogram\n" in text


# -- exposition ------------------------------------------------------------------------------


def test_exposition_has_every_series_at_zero_from_the_start() -> None:
    families = parse(GateMetricExporter.export_prometheus(GateMetricStore()))
    assert list(families) == FAMILIES
    for name in GATE_COUNTER_FAMILIES:
        fam = families[name]
        assert fam.kind == "counter"
        assert fam.help
        assert set(fam.samples) == ALLOWED_SERIES[name]
        assert set(fam.samples.values()) == {0}
    durations = families["release_gate_check_duration_seconds"]
    assert durations.kind == "histogram"
    assert durations.help == "Time a release-gate check spends, audit write included."
    (series,) = durations.histograms.values()
    assert list(series.buckets) == CHECK_DURATION_LE
    assert set(series.buckets.values()) == {0}
    assert (series.sum, series.count) == (0.0, 0)


def test_exposition_reflects_counts() -> None:
    store = GateMetricStore()
    store.record_decision(False, [BlockReasonCode.OPS_GATE_FAIL])
    store.record_breach()
    text = GateMetricExporter.export_prometheus(store)
    assert 'release_gate_decision_total{decision="DENY"} 1\n' in text
    assert 'release_gate_reason_total{reason="OPS_GATE_FAIL"} 1\n' in text
    assert 'release_gate_contract_breach_total{kind="NO_OVERRIDE"} 1\n' in text


def test_export_json_is_sorted_to_dict() -> None:
    store = GateMetricStore()
    store.record_decision(True)
    text = GateMetricExporter.export_json(store)
    assert orjson.loads(text) == store.to_dict()
    assert text == orjson.dumps(store.to_dict(), option=orjson.OPT_SORT_KEYS).decode()


def test_exporter_works_as_instance_and_class() -> None:
    store = GateMetricStore()
    assert GateMetricExporter().export_prometheus(store) == GateMetricExporter.export_prometheus(
        store
    )


def test_schema_reason_labels_are_the_block_reason_codes() -> None:
    assert GATE_SCHEMA.family("reason_counts").values == tuple(REASONS)


def test_promtool_check_metrics_has_no_findings(promtool: str) -> None:
    store = GateMetricStore()
    store.record_decision(False, ["TIER_FAIL", "NO_CANARY_DATA"])
    store.record_breach()
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=GateMetricExporter.export_prometheus(store),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


# -- record_outcome --------------------------------------------------------------------------


def test_record_outcome_counts_a_whole_check_at_once() -> None:
    store = GateMetricStore()
    store.record_outcome(False, ["GUARD_VIOLATION", "GUARD_VIOLATION"], breach=True)
    store.record_outcome(False, [], audit_write_failure=True)
    store.record_outcome(True, ["TIER_FAIL"])
    assert store.decision_counts() == {"ALLOW": 1, "DENY": 2}
    assert store.reason_counts()["GUARD_VIOLATION"] == 1
    assert sum(store.reason_counts().values()) == 1
    assert store.breach_counts() == {"NO_OVERRIDE": 1}
    assert store.audit_write_failures() == 1


def test_record_outcome_rejects_non_bool_and_counts_nothing() -> None:
    store = GateMetricStore()
    with pytest.raises(TypeError):
        store.record_outcome(1, [], breach=True)  # type: ignore[arg-type]
    assert store.to_dict() == GateMetricStore(clock=lambda: store.store_start_timestamp).to_dict()


@given(st.lists(st.tuples(st.booleans(), st.lists(any_reason, max_size=4)), max_size=30))
def test_record_outcome_counts_like_record_decision(calls: list[tuple[bool, list[Any]]]) -> None:
    """P1 for record_outcome: it counts exactly what record_decision counts."""
    a, b = GateMetricStore(clock=lambda: 0.0), GateMetricStore(clock=lambda: 0.0)
    for allowed, reasons in calls:
        a.record_decision(allowed, reasons)
        b.record_outcome(allowed, reasons)
    assert a.to_dict() == b.to_dict()


# -- persistence: save_to_dir / bind_to_dir / load_from_dir -------------------------------------


def test_save_and_load_from_dir_round_trip_through_shards(tmp_path: Path) -> None:
    a, b = GateMetricStore(), GateMetricStore()
    a.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True)
    b.record_decision(True)
    b.record_audit_write_failure()
    assert a.save_to_dir(tmp_path)
    assert b.save_to_dir(tmp_path)
    view = GateMetricStore.load_from_dir(tmp_path)
    assert isinstance(view, GateMetricView)
    assert view.decision_counts() == {"ALLOW": 1, "DENY": 1}
    assert view.reason_counts()["DRIFT_ALERT"] == 1
    assert view.breach_counts() == {"NO_OVERRIDE": 1}
    assert view.audit_write_failures() == 1
    assert view.aggregate.live == 2
    assert view.store_start_timestamp == min(a.store_start_timestamp, b.store_start_timestamp)
    for store in (a, b):
        shard_for(store, tmp_path).close(save=False)


def test_a_view_is_read_only_and_can_never_be_saved(tmp_path: Path) -> None:
    view = GateMetricStore.load_from_dir(tmp_path)
    # By construction: a view has no write, restore or save method at all.
    for name in (
        "record_decision",
        "record_outcome",
        "record_breach",
        "record_audit_write_failure",
        "record_metric_write_failure",
        "increment",
        "increment_slots",
        "restore",
        "save_to_dir",
        "bind_to_dir",
        "set_change_hook",
        "begin_save",
    ):
        assert not hasattr(view, name), name
    assert not isinstance(view, CounterStore)
    # And the engine's persistence refuses it whatever it is called through.
    writes = [
        lambda: save_to_dir(view, tmp_path),  # type: ignore[arg-type]
        lambda: shard_for(view, tmp_path),  # type: ignore[arg-type]
        lambda: bind(view, tmp_path),  # type: ignore[arg-type]
    ]
    for write in writes:
        with pytest.raises(TypeError, match="read-only"):
            write()
    assert view.read_only
    assert view.problem is None
    assert os.listdir(tmp_path) == ["aggregate.lock"]


def test_the_exposition_of_a_view_carries_the_pipeline_families(tmp_path: Path) -> None:
    store = GateMetricStore()
    store.record_decision(False, ["GUARD_VIOLATION"])
    assert store.save_to_dir(tmp_path)
    families = parse(GateMetricExporter.export_prometheus(GateMetricStore.load_from_dir(tmp_path)))
    assert list(families) == [
        *FAMILIES,
        "release_gate_quarantined_shards_total",
        "release_gate_shards",
    ]
    assert families["release_gate_shards"].samples == {("state", "live"): 1, ("state", "dead"): 0}
    assert families["release_gate_reason_total"].samples[("reason", "GUARD_VIOLATION")] == 1
    # The JSON export stays the store layout.
    assert orjson.loads(GateMetricExporter.export_json(GateMetricStore.load_from_dir(tmp_path)))[
        "decision_counts"
    ] == {"ALLOW": 0, "DENY": 1}
    shard_for(store, tmp_path).close(save=False)


def test_a_view_survives_a_fork_unchanged(tmp_path: Path) -> None:
    store = GateMetricStore()
    store.record_decision(True)
    assert store.save_to_dir(tmp_path)
    view = GateMetricStore.load_from_dir(tmp_path)
    assert in_forked_child(lambda: view.decision_counts() == {"ALLOW": 1, "DENY": 0})
    shard_for(store, tmp_path).close(save=False)


@pytest.mark.parametrize("kind", ["missing", "a file", "lock busy"])
def test_load_from_dir_is_fail_open_and_says_why_once(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "shards"
    if kind == "a file":
        target.write_text("")
    elif kind == "lock busy":
        target.mkdir()
        fd = os.open(target, os.O_RDONLY)  # the directory's own flock is the aggregation lock
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with caplog.at_level(logging.WARNING):
            views = [GateMetricStore.load_from_dir(target, lock_timeout=0) for _ in range(3)]
        for view in views:
            assert view.problem is not None
            assert str(target) in view.problem
            assert view.decision_counts() == {"ALLOW": 0, "DENY": 0}
            assert view.aggregate is None
            # An empty view renders the gate's families, at zero.
            assert list(parse(GateMetricExporter.export_prometheus(view))) == FAMILIES
        assert [r.getMessage() for r in caplog.records].count(
            f"gate metrics: an empty view of {target}: {views[0].problem}"
        ) == 1  # logged once, not once per call
    finally:
        if kind == "lock busy":
            os.close(fd)


def test_load_from_dir_of_an_unreadable_directory_is_an_empty_view_that_says_why(
    tmp_path: Path,
) -> None:
    # A real process for which file modes apply even when the suite runs as root.
    target = tmp_path / "shards"
    target.mkdir()
    target.chmod(0o000)
    try:
        result = run_python(
            """
            import sys
            from backend.app.testing.gate_metrics import GateMetricStore
            view = GateMetricStore.load_from_dir(sys.argv[1], lock_timeout=0)
            assert view.decision_counts() == {"ALLOW": 0, "DENY": 0}
            print(view.problem)
            """,
            str(target),
            honour_file_modes=True,
        )
    finally:
        target.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "Permission denied" in result.stdout
    assert str(target) in result.stdout


def test_load_from_dir_strict_keeps_the_loud_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        GateMetricStore.load_from_dir(tmp_path / "missing", strict=True)
    (tmp_path / "busy").mkdir()
    fd = os.open(tmp_path / "busy", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(LockTimeoutError):
            GateMetricStore.load_from_dir(tmp_path / "busy", lock_timeout=0, strict=True)
    finally:
        os.close(fd)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0, True, "1", 10**400])
def test_load_from_dir_refuses_a_lock_timeout_that_is_not_a_duration(
    tmp_path: Path, timeout: object
) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        GateMetricStore.load_from_dir(tmp_path, lock_timeout=timeout)  # type: ignore[arg-type]


def test_the_plans_names_mean_what_the_plan_says() -> None:
    # The label sets are what the schema is built from.
    assert GATE_SCHEMA.family("decision_counts").values == gm._DECISION_LABELS
    assert GATE_SCHEMA.family("reason_counts").values == gm._REASON_LABELS
    assert tuple(r.value for r in BlockReasonCode) == gm._REASON_LABELS
    assert GATE_SCHEMA.family("breach_counts").values == gm._BREACH_KINDS
    # The atomic write is the engine's helper itself, not a copy.
    assert gm._atomic_write is gatemetrics.write_file_atomically


def test_bind_to_dir_persists_every_check_once(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    store.record_outcome(False, ["OPS_GATE_FAIL"], breach=True, audit_write_failure=True)
    assert store.store_generation == 1  # one persist for the whole check
    assert (
        GateMetricStore.load_from_dir(tmp_path).to_dict()
        | {
            "store_generation": 1,
            "store_start_timestamp": store.store_start_timestamp,
        }
        == store.to_dict()
    )
    binding.close()


def test_a_failed_save_counts_a_metric_write_failure(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = GateMetricStore()
    assert store.save_to_dir(tmp_path / "file") is False
    assert store.metric_write_failures() == 1
    assert store.store_generation == 0


def test_the_gate_namespace_names_the_pipeline_families() -> None:
    assert GATE_NAMESPACE == "release_gate"
