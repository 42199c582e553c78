"""Tests of gatemetrics.store: the thread-safe in-memory counter store."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

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
from gatemetrics._format import SlotImage, layout_for
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


# -- hooks under the lock and lent cells (the write-through fast path) -----------------------

HISTOGRAMS = Schema(
    (
        Family("hits_total", "Hits.", key="hits", label="kind", values=("a", "b", "c")),
        Family(
            "wait_seconds",
            "Waits.",
            key="wait",
            label="kind",
            values=("a", "b"),
            kind="histogram",
            buckets=(1.0, 2.0),
        ),
    )
)


class _LockedHookProbe:
    """An ``under_lock`` hook that records, for every call, whether the store's lock was held
    and the cells it saw; the callable it returns records whether the lock was released."""

    def __init__(self, store: CounterStore) -> None:
        self.store = store
        self.under: list[tuple[bool, tuple[int, ...], tuple[float, ...]]] = []
        self.after: list[bool] = []

    def __call__(self) -> Callable[[], object]:
        store = self.store
        # No store method here (the lock is held and not reentrant): the cells directly.
        self.under.append((store._lock.locked(), tuple(store._counts), tuple(store._sums)))
        return lambda: self.after.append(store._lock.locked())


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda s: s.increment("hits", "b", 2), id="increment"),
        pytest.param(lambda s: s.increment_slots([0, 2]), id="increment_slots"),
        pytest.param(lambda s: s.family("hits").labels("c").inc(3), id="SeriesHandle.inc"),
        pytest.param(lambda s: s.observe("wait", 1.5, "a"), id="observe"),
        pytest.param(lambda s: s.family("wait").labels("b").observe(0.5), id="HistogramHandle"),
        pytest.param(lambda s: s.family("wait").labels("b").observe(3), id="HistogramHandle-int"),
    ],
)
def test_a_hook_under_the_lock_sees_the_changed_cells_and_its_rest_runs_after_release_once(
    write: Callable[[CounterStore], None],
) -> None:
    store = CounterStore(HISTOGRAMS)
    probe = _LockedHookProbe(store)
    store.set_change_hook(probe, under_lock=True)
    assert store.change_hook is probe
    write(store)
    expected = store.snapshot()
    assert expected.counts != tuple(HISTOGRAMS.zeros())  # the write changed something
    assert probe.under == [(True, expected.counts, expected.sums)]
    assert probe.after == [False]
    write(store)
    assert [held for held, _, _ in probe.under] == [True, True]
    assert probe.after == [False, False]


def test_a_hook_under_the_lock_that_returns_none_leaves_nothing_to_run() -> None:
    store = CounterStore(SCHEMA)
    calls: list[bool] = []

    def hook() -> None:
        calls.append(store._lock.locked())

    store.set_change_hook(hook, under_lock=True)
    store.increment("misses")
    store.family("hits").labels("a").inc()
    assert calls == [True, True]
    assert store.get("misses") == 1


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda s: s.increment("hits", "b"), id="increment"),
        pytest.param(lambda s: s.family("hits").labels("c").inc(), id="SeriesHandle.inc"),
        pytest.param(lambda s: s.family("wait").labels("b").observe(0.5), id="HistogramHandle"),
    ],
)
def test_a_public_hook_still_runs_once_after_the_lock_is_released(
    write: Callable[[CounterStore], None],
) -> None:
    store = CounterStore(HISTOGRAMS)
    seen: list[tuple[bool, tuple[int, ...]]] = []
    # A public hook may call the store: snapshot() takes the lock, so it must be free.
    store.set_change_hook(lambda: seen.append((store._lock.locked(), store.snapshot().counts)))
    write(store)
    assert seen == [(False, store.snapshot().counts)]


def _image_for(schema: Schema) -> SlotImage:
    image = layout_for(schema).image()
    assert image is not None  # a little-endian machine
    return image


def _is_lent(image: SlotImage) -> bool:
    return image.lent  # read afresh (mypy narrows the attribute after an assert)


def test_lent_cells_carry_values_and_generation_both_ways() -> None:
    store = CounterStore(HISTOGRAMS, clock=lambda: 7.0)
    store.increment("hits", "a", 5)
    store.observe("wait", 1.5, "b")
    store.begin_save()
    store.begin_save()
    before = store.snapshot()
    image = _image_for(HISTOGRAMS)
    lock = store.lend_cells(image)
    assert lock is store._lock
    assert image.lent
    assert (tuple(image.counts), tuple(image.sums)) == (before.counts, before.sums)
    assert (image.generation, image.start) == (2, 7.0)
    # The store counts in the image from now on; its snapshot and generation read it.
    store.increment("hits", "c", 4)
    store.family("wait").labels("a").observe(0.25)
    assert tuple(image.counts) == store.snapshot().counts
    assert tuple(image.sums) == store.snapshot().sums == (0.25, 1.5)
    assert store.get("hits", "c") == 4
    assert store.begin_save()[1] == 3
    assert image.generation == 3 == store.generation == store.snapshot().generation
    store.abort_save(3)
    assert image.generation == 2 == store.generation
    image.generation = 9  # the shard's fast path counts its saves in the image
    assert store.generation == 9
    lent = store.snapshot()
    store.reclaim_cells()
    assert not _is_lent(image)
    assert store.snapshot().counts == lent.counts
    assert store.snapshot().sums == lent.sums
    assert store.generation == 9
    store.increment("hits", "a")  # lists again: the image keeps what it had
    assert tuple(image.counts) == lent.counts
    assert store.get("hits", "a") == 6
    store.reclaim_cells()  # nothing lent: a no-op
    assert store.get("hits", "a") == 6


class _OddImage:
    """A :class:`gatemetrics.CellImage` of any sizes (a slot image always fits its schema)."""

    def __init__(self, ints: int, floats: int) -> None:
        self.counts = memoryview(bytearray(8 * ints)).cast("q")
        self.sums = memoryview(bytearray(8 * floats)).cast("d")
        self.generation = 0
        self.start = 0.0
        self.lent = False


def test_lending_an_image_of_other_sizes_or_to_a_read_only_store_is_refused() -> None:
    store = CounterStore(SCHEMA)
    store.increment("misses")
    with pytest.raises(ValueError, match="do not match"):
        store.lend_cells(_image_for(HISTOGRAMS))  # other int cells and float cells
    wider = Schema((*SCHEMA.families, Family("more_total", "More.", key="more")))
    with pytest.raises(ValueError, match="do not match"):
        store.lend_cells(_image_for(wider))
    odd = _OddImage(len(SCHEMA.zeros()), 1)  # the int cells fit, but a float cell too many
    with pytest.raises(ValueError, match="do not match"):
        store.lend_cells(odd)
    assert not odd.lent
    assert store.get("misses") == 1
    store.increment("misses")  # still counting in its own cells
    assert store.get("misses") == 2

    class ReadOnly(CounterStore):
        read_only = True

    image = _image_for(SCHEMA)
    with pytest.raises(TypeError, match="read-only"):
        ReadOnly(SCHEMA).lend_cells(image)
    assert not image.lent


def test_a_restore_while_lent_takes_the_cells_back() -> None:
    store = CounterStore(SCHEMA)
    store.increment("hits", "a", 3)
    image = _image_for(SCHEMA)
    store.lend_cells(image)
    store.increment("hits", "b")
    donor = CounterStore(SCHEMA)
    donor.increment("misses", None, 2)
    donor.begin_save()
    store.restore(donor.to_dict())
    assert not image.lent
    assert tuple(image.counts) == (3, 1, 0, 0)  # the image keeps what it had
    assert store.snapshot().counts == (0, 0, 0, 2)
    assert store.generation == 1
    assert store.restores == 1
    store.increment("hits", "a")
    assert tuple(image.counts) == (3, 1, 0, 0)
    assert store.snapshot().counts == (1, 0, 0, 2)


def test_a_forked_child_takes_its_cells_back_from_the_parents_image() -> None:
    store = CounterStore(SCHEMA)
    image = _image_for(SCHEMA)
    store.lend_cells(image)
    store.increment("hits", "a", 2)

    def child() -> bool:
        store.increment("misses")
        return (
            not image.lent
            and store.snapshot().counts == (0, 0, 0, 1)
            and tuple(image.counts) == (2, 0, 0, 0)
        )

    assert in_forked_child(child)
    assert image.lent
    store.increment("hits", "a")
    assert tuple(image.counts) == (3, 0, 0, 0)
