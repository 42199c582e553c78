"""Tests of gatemetrics.store: the thread-safe in-memory counter store."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatemetrics import (
    MAX_COUNT,
    CounterStore,
    Family,
    PersistedStore,
    Schema,
    SchemaError,
    Snapshot,
)
from tests.shard_tools import in_forked_child

SCHEMA = Schema(
    (
        Family("hits_total", "Hits.", key="hits", label="kind", values=("a", "b", "c")),
        Family("misses_total", "Misses.", key="misses"),
    )
)


def test_a_new_store_is_all_zero_with_injected_start_time() -> None:
    store = CounterStore(SCHEMA, clock=lambda: 1234.5)
    assert store.snapshot().counts == (0, 0, 0, 0)
    assert store.start_timestamp == 1234.5
    assert store.generation == 0


def test_increment_and_get() -> None:
    store = CounterStore(SCHEMA)
    store.increment("hits", "b")
    store.increment("hits", "b", 4)
    store.increment("misses")
    assert store.get("hits", "b") == 5
    assert store.get("misses") == 1
    assert store.snapshot().family("hits") == {"a": 0, "b": 5, "c": 0}


@pytest.mark.parametrize("amount", [-1, 1.5, True, "1"])
def test_increment_rejects_bad_amounts(amount: object) -> None:
    store = CounterStore(SCHEMA)
    with pytest.raises(SchemaError):
        store.increment("misses", None, amount)  # type: ignore[arg-type]
    assert store.get("misses") == 0


def test_increment_outside_schema_raises_and_changes_nothing() -> None:
    store = CounterStore(SCHEMA)
    with pytest.raises(SchemaError):
        store.increment("hits", "z")
    with pytest.raises(SchemaError):
        store.increment("nope")
    assert store.snapshot().counts == (0, 0, 0, 0)


def test_increment_refuses_to_overflow_64_bits() -> None:
    store = CounterStore(SCHEMA)
    store.increment("misses", None, MAX_COUNT)
    with pytest.raises(SchemaError, match="exceed"):
        store.increment("misses")
    assert store.get("misses") == MAX_COUNT


def test_increment_slots_is_all_or_nothing() -> None:
    store = CounterStore(SCHEMA)
    store.increment_slots([0, 2, 2])
    assert store.snapshot().counts == (1, 0, 2, 0)
    with pytest.raises(SchemaError, match="out of range"):
        store.increment_slots([1, 99])
    assert store.snapshot().counts == (1, 0, 2, 0)


def test_many_threads_count_exactly() -> None:
    store = CounterStore(SCHEMA)
    threads_n, per_thread = 8, 5000
    barrier = threading.Barrier(threads_n)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(per_thread):
            store.increment("hits", "abc"[i % 3])
            store.increment_slots([3])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = store.snapshot()
    assert sum(snap.counts[:3]) == threads_n * per_thread
    assert snap.get("misses") == threads_n * per_thread
    assert snap.family("hits") == {"a": 3 * per_thread, "b": 3 * per_thread, "c": 2 * per_thread}


def test_snapshot_is_a_copy() -> None:
    store = CounterStore(SCHEMA)
    snap = store.snapshot()
    store.increment("misses")
    assert snap.get("misses") == 0


def test_snapshot_checks_its_length() -> None:
    with pytest.raises(SchemaError):
        Snapshot(SCHEMA, (1, 2))


def test_restore_replaces_state_and_metadata() -> None:
    store = CounterStore(SCHEMA)
    store.restore(
        {"hits": {"a": 1}, "misses": 2, "store_generation": 7, "store_start_timestamp": 99}
    )
    assert store.to_dict() == {
        "hits": {"a": 1, "b": 0, "c": 0},
        "misses": 2,
        "store_generation": 7,
        "store_start_timestamp": 99.0,
    }


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"misses": 1, "store_start_timestamp": 1.0}, "store_generation"),
        ({"misses": 1, "store_generation": 0}, "store_start_timestamp"),
        ({"store_generation": -1, "store_start_timestamp": 1.0}, "store_generation"),
        ({"store_generation": 1.5, "store_start_timestamp": 1.0}, "store_generation"),
        ({"store_generation": 0, "store_start_timestamp": float("nan")}, "store_start_timestamp"),
        ({"store_generation": 0, "store_start_timestamp": float("inf")}, "store_start_timestamp"),
        ({"store_generation": 0, "store_start_timestamp": -5}, "store_start_timestamp"),
        ({"store_generation": 0, "store_start_timestamp": "now"}, "store_start_timestamp"),
        (
            {"hits": {"a": 1}, "misses": -3, "store_generation": 0, "store_start_timestamp": 1},
            "misses",
        ),
    ],
)
def test_restore_rejects_malformed_documents_without_changing_anything(
    data: dict[str, object], field: str
) -> None:
    store = CounterStore(SCHEMA, clock=lambda: 5.0)
    store.increment("hits", "c", 3)
    before = store.to_dict()
    with pytest.raises(SchemaError) as err:
        store.restore(data)
    assert err.value.field == field
    assert store.to_dict() == before


def test_restore_rejects_non_mapping() -> None:
    with pytest.raises(SchemaError, match="mapping"):
        CounterStore(SCHEMA).restore([])  # type: ignore[arg-type]


def test_store_requires_a_schema() -> None:
    with pytest.raises(TypeError):
        CounterStore(object())  # type: ignore[arg-type]


@given(st.lists(st.sampled_from([("hits", "a"), ("hits", "b"), ("hits", "c"), ("misses", None)])))
def test_counts_equal_the_number_of_increments(ops: list[tuple[str, str | None]]) -> None:
    store = CounterStore(SCHEMA)
    for key, value in ops:
        store.increment(key, value)
    for key, value in set(ops):
        assert store.get(key, value) == ops.count((key, value))


# -- persistence hooks -----------------------------------------------------------------------


def test_the_change_hook_runs_once_per_public_write_after_the_counts_are_visible() -> None:
    store = CounterStore(SCHEMA)
    seen: list[tuple[int, ...]] = []
    store.set_change_hook(lambda: seen.append(store.snapshot().counts))
    assert store.change_hook is not None
    store.increment("hits", "a")
    store.increment("misses", None, 3)
    store.increment_slots([1, 2])
    assert seen == [(1, 0, 0, 0), (1, 0, 0, 3), (1, 1, 1, 3)]
    with pytest.raises(SchemaError):
        store.increment("nope")
    assert len(seen) == 3  # a rejected write changes nothing and notifies nobody
    store.set_change_hook(None)
    assert store.change_hook is None
    store.increment("hits", "a")
    assert len(seen) == 3


def test_a_forked_child_starts_from_zero_with_a_fresh_lock() -> None:
    store = CounterStore(SCHEMA, clock=lambda: 5.0)
    store.increment("hits", "a", 7)

    def child() -> bool:
        zero = store.snapshot().counts == (0, 0, 0, 0) and store.pid == os.getpid()
        store.increment("misses")  # would deadlock on the inherited, held lock
        return zero and store.get("misses") == 1 and store.generation == 0

    store._lock.acquire()  # as if another thread held it at the moment of the fork
    try:
        assert in_forked_child(child)
    finally:
        store._lock.release()
    assert store.get("hits", "a") == 7  # the parent keeps its counts
    assert store.pid == os.getpid()


def test_a_save_advances_the_generation_and_an_aborted_one_gives_it_back() -> None:
    store = CounterStore(SCHEMA, clock=lambda: 5.0)
    store.increment("hits", "b")
    counts, generation, start, restores = store.begin_save()
    assert (counts, generation, start, restores) == ((0, 1, 0, 0), 1, 5.0, 0)
    assert store.generation == 1
    store.abort_save(generation)
    assert store.generation == 0
    a = store.begin_save()[1]
    b = store.begin_save()[1]
    store.abort_save(a)  # a later save moved on: keep it
    assert store.generation == b == 2


def test_a_counted_failure_does_not_notify_the_change_hook() -> None:
    store = CounterStore(SCHEMA)
    seen: list[int] = []
    store.set_change_hook(lambda: seen.append(1))
    store.count_failure(store.schema.slot("misses"))
    assert store.get("misses") == 1
    assert seen == []


def test_a_counter_store_implements_the_persistence_protocol() -> None:
    # Every member the protocol declares exists on a store (the static check is mypy's).
    store = CounterStore(SCHEMA)
    members = [n for n in vars(PersistedStore) if not n.startswith("_") and n not in {"read_only"}]
    assert members
    for name in members:
        assert hasattr(store, name), name
    assert store.read_only is False
    protocol: PersistedStore = store
    assert protocol.schema is SCHEMA
