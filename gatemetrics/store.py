"""A thread-safe, in-memory counter store over a :class:`~gatemetrics.schema.Schema`.

One store per process holds that process's cumulative counts. Every increment takes one
``threading.Lock``, so a store is safe to share between threads; reads return copies, never
live views. The store has no I/O of its own: persistence (shards) and merging (the aggregator)
are built on :meth:`CounterStore.snapshot` and the dictionary layout.

Every write goes through one mechanism, :meth:`CounterStore._add`: add to some slots (and, for
a histogram observation, to one float sum) under the lock, then notify the change hook once
(:meth:`CounterStore.set_change_hook`: after the lock is released, or, for a hook installed
``under_lock``, before it is, and then what that hook returned after).
:meth:`CounterStore.increment`, :meth:`CounterStore.increment_slots` and
:meth:`CounterStore.observe` validate their arguments and call it; a subclass whose
recorders resolve their slots from constants of its schema (the release gate's) calls it
directly, skipping the validation it does not need. The handles of :meth:`CounterStore.family`
(``store.family("requests").labels(route="create", code="2xx").inc()``) resolve their slot once
and make the same write for that one slot, inlined (:meth:`SeriesHandle.inc`): the hot path of
a prometheus_client user.

A store implements :class:`gatemetrics.persistence.PersistedStore`, the protocol through which
shards and bindings persist it (the change hook, the save exchange, the lent slot image, the
fork reset), and costs an unbound store nothing measurable. A store bound write-through with the
default durability counts in a slot image its shard lent it (:meth:`CounterStore.lend_cells`):
its cells are then ``memoryview`` casts of the slot's bytes instead of lists, which costs an
increment about 50 ns and saves the save its snapshot and packing (benchmarks/PROFILE.md).

Fork safety: counts made before ``os.fork()`` belong to the
parent; in a forked child every store starts again at zero (``gatemetrics._process``), with a
fresh lock (the parent's may have been held by a thread that does not exist in the child) and a
new start time, so nothing is ever counted twice.
"""

from __future__ import annotations

import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gatemetrics._process import PROCESS
from gatemetrics.errors import SchemaError
from gatemetrics.persistence import CellImage, LockedHook, SaveState
from gatemetrics.schema import (
    GENERATION_KEY,
    MAX_COUNT,
    START_TIMESTAMP_KEY,
    Family,
    HistogramSeries,
    LabelValues,
    Schema,
    check_generation,
    check_timestamp,
)

__all__ = ["CounterStore", "FamilyHandle", "HistogramHandle", "SeriesHandle", "Snapshot"]

_INF = math.inf


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable, consistent copy of a store's counts and metadata.

    ``counts`` holds the integer slots (a histogram's non-cumulative bucket counts among them),
    ``sums`` the float cells (each histogram series' sum, in schema order; empty without
    histograms).
    """

    schema: Schema
    counts: tuple[int, ...]
    generation: int = 0
    start_timestamp: float = 0.0
    sums: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.counts) != self.schema.size:
            raise SchemaError("", f"expected {self.schema.size} counts, got {len(self.counts)}")
        if len(self.sums) != self.schema.float_size:
            raise SchemaError("", f"expected {self.schema.float_size} sums, got {len(self.sums)}")

    def get(self, key: str, /, value: LabelValues = None, **labels: str) -> int:
        """The count of one series (named as :meth:`CounterStore.increment` names it)."""
        return self.counts[self.schema.slot(key, _series(self.schema, key, value, labels))]

    def family(self, key: str) -> dict[str, int]:
        """Counts of a family with one label by label value, in schema order (see
        :meth:`series` for a family with several)."""
        fam = self.schema.family(key)
        if fam.kind == "histogram":
            raise SchemaError(key, "a histogram family; use histogram()")
        if fam.label is None:
            if fam.label_pairs:
                raise SchemaError(key, "family has several labels; use series()")
            raise SchemaError(key, "family has no label; use get()")
        base = self.schema.offset(key)
        return dict(zip(fam.values, self.counts[base : base + fam.width], strict=True))

    def histogram(self, key: str, value: LabelValues = None) -> tuple[tuple[int, ...], float]:
        """One histogram series: its *cumulative* bucket counts (``+Inf`` last, so the last is
        the series' count) and its sum."""
        series = self.schema.histogram(key, value)
        running = 0
        cumulative: list[int] = []
        for n in self.counts[series.first : series.end]:
            running += n
            cumulative.append(running)
        return tuple(cumulative), self.sums[series.sum_cell]

    def series(self, key: str) -> dict[tuple[str, ...], int]:
        """Counts of any family by its series' label values (a tuple in declared label order,
        ``()`` for a family without a label), in schema order."""
        fam = self.schema.family(key)
        if fam.kind == "histogram":
            raise SchemaError(key, "a histogram family; use histogram()")
        base = self.schema.offset(key)
        return dict(zip(fam.series_values, self.counts[base : base + fam.width], strict=True))

    def to_dict(self) -> dict[str, Any]:
        """The dictionary layout, metadata included."""
        out = self.schema.counts_to_dict(self.counts, self.sums)
        out[GENERATION_KEY] = self.generation
        out[START_TIMESTAMP_KEY] = self.start_timestamp
        return out


class CounterStore:
    """Cumulative counters for every series of ``schema``, safe to use from many threads.

    ``schema`` may hold counters and histograms; a gauge family is refused
    (:class:`SchemaError`): see :func:`_refuse_gauges`.

    ``clock`` (seconds since the epoch) is injectable so tests control
    ``store_start_timestamp``.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_counts",
        "_generation",
        "_handles",
        "_hook",
        "_image",
        "_lock",
        "_on_change",
        "_pid",
        "_restores",
        "_schema",
        "_start",
        "_sums",
    )

    #: A read-only store can never be saved as a shard (a subclass may set it).
    read_only: bool = False

    def __init__(self, schema: Schema, *, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a Schema, not {type(schema).__name__}")
        _refuse_gauges(schema)
        self._schema = schema
        self._lock = threading.Lock()
        self._counts: list[int] = schema.zeros()
        self._sums: list[float] = schema.float_zeros()
        self._generation = 0
        self._clock = clock
        self._start = float(clock())
        self._pid = os.getpid()
        # The hook as installed (see set_change_hook), and what every write calls under the
        # lock: the hook itself when installed with under_lock, else a wrapper returning it.
        self._hook: Callable[[], object] | None = None
        self._on_change: LockedHook | None = None
        # The slot image the store's cells are lent to (see lend_cells), or None.
        self._image: CellImage | None = None
        self._restores = 0
        self._handles: dict[str, FamilyHandle] = {}
        PROCESS.stores.add(self)

    @property
    def schema(self) -> Schema:
        return self._schema

    @property
    def generation(self) -> int:
        """How many times this store's state has been persisted (0 for a fresh store)."""
        image = self._image
        return self._generation if image is None else image.generation

    @property
    def start_timestamp(self) -> float:
        """When this store's counting began, in seconds since the epoch."""
        return self._start

    @property
    def restores(self) -> int:
        """How many times :meth:`restore` replaced this store's state (persistence checks that
        a restored store's counts did not go down since its last save)."""
        return self._restores

    @property
    def pid(self) -> int:
        """The process whose counts this store holds (changes in a forked child)."""
        return self._pid

    # -- writes ------------------------------------------------------------------------------

    def increment(
        self, key: str, /, value: LabelValues = None, amount: int = 1, **labels: str
    ) -> None:
        """Add ``amount`` to one series; :class:`SchemaError` for a series outside the schema.

        The series: ``increment("errors")`` (no label), ``increment("orders", "paid")`` (one
        label), ``increment("requests", ("create", "2xx"))`` (several, in declared label order)
        or by name, ``increment("requests", route="create", code="2xx")``. A label value that
        the family does not declare, a missing label or an unknown one raises and counts
        nothing. (Labels named ``value`` or ``amount`` are named through a mapping:
        ``increment("k", {"value": "x"})``.)
        """
        slot = self._schema.slot(key, _series(self._schema, key, value, labels))
        if type(amount) is not int or amount < 0:
            raise SchemaError(key, f"amount must be a non-negative int, got {amount!r}")
        self._add((slot,), amount, check=True)

    def increment_slots(self, slots: Iterable[int]) -> None:
        """Add one to each slot in ``slots`` atomically (all or none are visible to readers).

        For wrappers that resolved their slots once with :meth:`Schema.slot`; every slot is
        checked (:class:`SchemaError` for one out of range, and nothing changes).
        """
        todo = tuple(slots)
        size = self._schema.size
        for s in todo:
            if type(s) is not int or not 0 <= s < size:
                raise SchemaError("", f"slot out of range: {s!r}")
        self._add(todo)

    def observe(
        self, key: str, value: float, /, label_value: LabelValues = None, **labels: str
    ) -> None:
        """Count one observation of ``value`` in histogram ``key``, its series named as
        :meth:`increment` names one (``observe("latency", 0.2, "create")``, or by name:
        ``observe("latency", 0.2, route="create", code="2xx")``).

        The observation goes into the first bucket whose bound is ``>=`` ``value`` (``+Inf``
        if none) and is added to the series' sum, atomically: a reader sees both or neither.
        :class:`SchemaError`, and nothing changes, for a series outside the schema, a value
        that is not a number, NaN, an infinity, or a *negative* value: a histogram's sum here
        is a counter (it never goes down, and readers refuse a shard whose sum did), which is
        what ``rate(x_sum)`` needs. Durations and sizes are never negative; observe an offset
        value (or use two histograms) for anything that can be.
        """
        series = self._schema.histogram(
            key, _series(self._schema, key, label_value, labels) if labels else label_value
        )
        self._observe(series, key, value)

    def _observe(self, series: HistogramSeries, key: str, value: float) -> None:
        """:meth:`observe` into a resolved series (for it and the histogram handles)."""
        if type(value) is not float:
            if type(value) is not int:
                raise SchemaError(key, f"an observation must be a number, got {value!r}"[:200])
            value = float(value) if -(2**1023) < value < 2**1023 else math.inf
        # A chained comparison is False for NaN: this refuses NaN, infinities and negatives.
        if not 0.0 <= value < math.inf:
            raise SchemaError(key, f"an observation must be finite and >= 0, got {value!r}")
        bucket = series.first + bisect_left(series.bounds, value)
        self._add((bucket,), 1, check=True, sum_cell=series.sum_cell, value=value)

    def _add(
        self,
        slots: Sequence[int],
        amount: int = 1,
        *,
        check: bool = False,
        sum_cell: int = -1,
        value: float = 0.0,
    ) -> None:
        """The one write: add ``amount`` to each of ``slots`` under the lock, then notify.

        For subclasses and the public writers above: ``slots`` must be valid slots of this
        store's schema (a subclass resolves them once from its schema's constants) and
        ``amount`` a non-negative int. All or none of the additions become visible. With
        ``check``, a sum above :data:`MAX_COUNT` raises :class:`SchemaError` and changes nothing
        (recorders adding one at a time skip it: 2**63 calls never happen). The change hook runs
        once (see :meth:`set_change_hook`: under the lock, and what it returns after the lock
        is released). :meth:`SeriesHandle.inc` is this write for one slot,
        inlined for the hot path: a change here is a change there.

        With ``sum_cell`` (a histogram observation), ``value`` (finite, non-negative) is added
        to that float cell in the same critical section; a sum that would overflow to infinity
        raises :class:`SchemaError` and changes nothing.
        """
        # acquire/try/finally rather than ``with``: measurably cheaper per call on CPython 3.11
        # (see benchmarks/PROFILE.md), and this is every record call's cost.
        after = None
        lock = self._lock
        lock.acquire()
        try:
            counts = self._counts
            if check:
                for s in slots:
                    if counts[s] + amount > MAX_COUNT:
                        raise SchemaError(_key_of(self._schema, s), "count would exceed 2**63-1")
            if sum_cell >= 0:
                total = self._sums[sum_cell] + value
                if total == math.inf:
                    raise SchemaError(_key_of(self._schema, slots[0]), "sum would overflow")
                self._sums[sum_cell] = total
            for s in slots:
                counts[s] += amount
            hook = self._on_change
            if hook is not None:
                after = hook()
        finally:
            lock.release()
        if after is not None:
            after()

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str, /, value: LabelValues = None, **labels: str) -> int:
        """The current count of one series (named as :meth:`increment` names it)."""
        slot = self._schema.slot(key, _series(self._schema, key, value, labels))
        with self._lock:
            return self._counts[slot]

    def family(self, key: str) -> FamilyHandle:
        """The recording handle of family ``key`` (one per store and family, kept for the
        store's life): ``store.family("requests").labels(route="create", code="2xx").inc()``.
        :class:`SchemaError` for a key outside the schema."""
        handle = self._handles.get(key)
        if handle is None:
            handle = self._handles.setdefault(key, FamilyHandle(self, self._schema.family(key)))
        return handle

    def snapshot(self) -> Snapshot:
        """A consistent copy of all counts and metadata."""
        with self._lock:
            counts = tuple(self._counts)
            sums = tuple(self._sums)
            image = self._image
            generation = self._generation if image is None else image.generation
        return Snapshot(self._schema, counts, generation, self._start, sums)

    def to_dict(self) -> dict[str, Any]:
        """The dictionary layout of the current state (see :mod:`gatemetrics.schema`)."""
        return self.snapshot().to_dict()

    def restore(self, data: Mapping[str, Any]) -> None:
        """Replace the whole state (counts and metadata) with a dictionary-layout document.

        The document is validated completely before anything changes: on :class:`SchemaError`
        the store is left exactly as it was.
        """
        if not isinstance(data, Mapping):
            raise SchemaError("", f"expected a mapping, got {type(data).__name__}")
        counts, sums = self._schema.parse_cells(data)
        for key in (GENERATION_KEY, START_TIMESTAMP_KEY):
            if key not in data:
                raise SchemaError(key, "missing")
        generation = check_generation(data[GENERATION_KEY])
        start = check_timestamp(data[START_TIMESTAMP_KEY])
        with self._lock:
            self._take_cells_back()  # the lender sees it and saves through its checks again
            self._counts = counts
            self._sums = sums
            self._generation = generation
            self._start = start
            self._restores += 1

    # -- the persistence protocol (gatemetrics.persistence.PersistedStore) ---------------------

    @property
    def change_hook(self) -> Callable[[], object] | None:
        """The installed change hook (see :meth:`set_change_hook`), or None."""
        return self._hook

    def set_change_hook(
        self, hook: Callable[[], object] | None, *, under_lock: bool = False
    ) -> None:
        """Install (or remove, with ``None``) the callable every public write calls once.

        The hook runs on the writing thread after the lock is released. It must not raise for
        ordinary failures (write-through saving never does) and must not record into this store
        through a public write method (that would call it again).

        With ``under_lock`` the hook runs *with the store's lock held*, right after the write's
        cells changed (so nothing else changes them while it runs), and returns None or a
        callable that the writer calls once the lock is released. Such a hook must not call any
        method of the store (the lock is not reentrant: that would deadlock); it is how a
        write-through shard writes a lent slot image (:meth:`lend_cells`).
        """
        if hook is not None and self.read_only:
            raise TypeError(f"{type(self).__name__} is read-only")
        self._hook = hook
        if hook is None or under_lock:
            self._on_change = hook  # type: ignore[assignment] # under_lock: it returns the rest
        else:
            self._on_change = lambda: hook

    def begin_save(self) -> SaveState:
        """Advance the generation for a save: ``(counts, generation, start, restores)``."""
        return self.begin_save_cells()[0]

    def begin_save_cells(self) -> tuple[SaveState, tuple[float, ...]]:
        """:meth:`begin_save`, and the float cells (histogram sums) of the same state."""
        # Every periodic and power-loss save calls this: acquire/try/finally, as in _add.
        lock = self._lock
        lock.acquire()
        try:
            image = self._image
            if image is None:
                self._generation = generation = self._generation + 1
            else:
                image.generation = generation = image.generation + 1
            state = (tuple(self._counts), generation, self._start, self._restores)
            return state, tuple(self._sums)
        finally:
            lock.release()

    def abort_save(self, generation: int) -> None:
        """Undo the :meth:`begin_save` that returned ``generation``, unless another save has
        moved the generation on since."""
        with self._lock:
            image = self._image
            if image is not None:
                if image.generation == generation:
                    image.generation = generation - 1
            elif self._generation == generation:
                self._generation = generation - 1

    def lend_cells(self, image: CellImage) -> threading.Lock:
        """Count in ``image`` from now on: its ``counts`` and ``sums`` (views of the same sizes
        as this store's cells) take the current values and become the cells, its ``generation``
        the store's generation and its ``start`` the store's start timestamp. Returns the lock
        every write holds.

        While the image is lent, whoever holds that lock may read the image's bytes as the
        store's exact state (a write-through shard writes them as its slot, see
        :class:`gatemetrics.shards.Shard`). The store takes its cells back, setting
        ``image.lent`` to False, on :meth:`reclaim_cells`, :meth:`restore` and in a forked
        child; only one image is lent at a time.
        """
        if self.read_only:
            raise TypeError(f"{type(self).__name__} is read-only")
        if len(image.counts) != len(self._counts) or len(image.sums) != len(self._sums):
            raise ValueError("the image's cells do not match this store's schema")
        with self._lock:
            self._take_cells_back()
            for i, v in enumerate(self._counts):
                image.counts[i] = v
            for i, f in enumerate(self._sums):
                image.sums[i] = f
            image.generation = self._generation
            image.start = self._start
            image.lent = True
            self._counts = image.counts  # type: ignore[assignment] # a view of int64 cells
            self._sums = image.sums  # type: ignore[assignment] # a view of float64 cells
            self._image = image
            return self._lock

    def reclaim_cells(self) -> None:
        """Take the cells back from a lent image (a no-op if none is lent)."""
        with self._lock:
            self._take_cells_back()

    def _take_cells_back(self) -> None:
        # Called with the lock held: lists again, with the image's values (it keeps them).
        image = self._image
        if image is not None:
            self._counts = list(image.counts)
            self._sums = list(image.sums)
            self._generation = image.generation
            image.lent = False
            self._image = None

    def count_failure(self, slot: int) -> None:
        """Add one to ``slot`` without calling the change hook (for failures of the hook)."""
        with self._lock:
            self._counts[slot] += 1

    def reset_for_new_process(self) -> None:
        """Start again from zero as a new process's store (runs in a forked child)."""
        self._lock = threading.Lock()
        image, self._image = self._image, None
        if image is not None:  # the child's copy of the parent's image: its cells stay there
            image.lent = False
        self._counts = self._schema.zeros()
        self._sums = self._schema.float_zeros()
        self._generation = 0
        self._start = float(self._clock())
        self._pid = os.getpid()


class FamilyHandle:
    """One family of one store, for recording as prometheus_client users do (see
    :meth:`CounterStore.family`).

    :meth:`labels` returns the :class:`SeriesHandle` of one series, resolving its slot once and
    keeping it: at most one handle per declared series, so the handles are bounded exactly as
    the family is. A family without a label counts with :meth:`inc` directly.
    """

    __slots__ = ("_children", "_store", "_unlabelled", "family")

    def __init__(self, store: CounterStore, family: Family) -> None:
        self._store = store
        self.family = family
        self._children: dict[tuple[str, ...], SeriesHandle] = {}
        self._unlabelled: HistogramHandle | None = None  # an unlabelled histogram's series

    def labels(self, *values: str, **named: str) -> SeriesHandle:
        """The handle of one series, by its label values in declared label order
        (``labels("create", "2xx")``) or by name (``labels(route="create", code="2xx")``).

        :class:`SchemaError` for a value the family does not declare, a missing or unknown
        label, or both forms at once; nothing is cached for a refused series.
        """
        if named:
            if values:
                raise SchemaError(self.family.key, "give label values by position or by name")
            values = self.family.label_values(named)
        try:
            child = self._children.get(values)
        except TypeError:  # an unhashable value: refused as any undeclared one, below
            child = None
        if child is None:
            child = self._resolve(values)
        return child

    def _resolve(self, values: tuple[str, ...]) -> SeriesHandle:
        fam = self.family
        if not fam.label_pairs:
            raise SchemaError(fam.key, "family has no label; use inc() on the family")
        if len(values) != len(fam.label_pairs):
            names = ", ".join(fam.label_names)
            raise SchemaError(fam.key, f"expected {len(fam.label_pairs)} label values ({names})")
        if fam.kind == "histogram":
            # Through Schema.histogram, the one check of a histogram series.
            series = self._store.schema.histogram(fam.key, fam.series_key(values))
            values = tuple(str.__str__(v) for v in values)
            return self._children.setdefault(
                values, HistogramHandle(self._store, fam.key, values, series)
            )
        # Through Schema.slot, the one check of a series: a handle can name nothing it refuses.
        slot = self._store.schema.slot(fam.key, fam.series_key(values))
        if not all(type(v) is str for v in values):
            # Equal to a declared value, yet not a str (a str subclass): kept as the plain value,
            # so the cache and the handle hold only the family's own strings.
            values = tuple(str.__str__(v) for v in values)
        return self._children.setdefault(values, SeriesHandle(self._store, fam.key, values, slot))

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` to a family without a label (:class:`SchemaError` for a labelled one:
        name the series with :meth:`labels`)."""
        if self.family.label_pairs:
            names = ", ".join(self.family.label_names)
            raise SchemaError(self.family.key, f"missing label values ({names}); use labels()")
        self._store.increment(self.family.key, None, amount)

    def observe(self, value: float) -> None:
        """Observe ``value`` in a histogram without a label (see :meth:`CounterStore.observe`;
        :class:`SchemaError` for a labelled one: name the series with :meth:`labels`)."""
        series = self._unlabelled
        if series is None:
            fam = self.family
            if fam.label_pairs:
                names = ", ".join(fam.label_names)
                raise SchemaError(fam.key, f"missing label values ({names}); use labels()")
            # Refuses a family that is not a histogram.
            histogram = self._store.schema.histogram(fam.key)
            series = self._unlabelled = HistogramHandle(self._store, fam.key, (), histogram)
        series.observe(value)


class SeriesHandle:
    """One series of one store, its slot resolved once (see :meth:`FamilyHandle.labels`).

    :meth:`inc` is :meth:`CounterStore.increment` without the lookup: the same checks of
    ``amount``, the same lock, and the change hook, so write-through and periodic bindings
    persist it exactly as they persist ``increment``. It stays valid across a fork (the child's
    store starts again at zero, and the handle counts into it).
    """

    __slots__ = ("_slot", "_store", "key", "values")

    def __init__(self, store: CounterStore, key: str, values: tuple[str, ...], slot: int) -> None:
        self._store = store
        self._slot = slot
        self.key = key
        self.values = values

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` (a non-negative int) to the series; :class:`SchemaError` otherwise,
        or when the count would exceed 2**63-1, and nothing changes."""
        if type(amount) is not int or amount < 0:
            raise SchemaError(self.key, f"amount must be a non-negative int, got {amount!r}")
        # CounterStore._add for one slot, inlined: the call it saves is a third of a handle's
        # cost (benchmarks figure 1). Keep the two the same: the store's lock and counts read
        # afresh each time (a fork or a restore replaces them), the sum checked (an
        # inc(2**63 - 1) may have come first), the change hook once, as _add calls it.
        after = None
        store = self._store
        lock = store._lock
        lock.acquire()
        try:
            counts = store._counts
            total = counts[self._slot] + amount
            if total > MAX_COUNT:
                raise SchemaError(self.key, "count would exceed 2**63-1")
            counts[self._slot] = total
            hook = store._on_change
            if hook is not None:
                after = hook()
        finally:
            lock.release()
        if after is not None:
            after()

    def get(self) -> int:
        """The series' current count."""
        store = self._store
        return store.get(self.key, store.schema.family(self.key).series_key(self.values))

    def observe(self, value: float) -> None:
        """Refused (:class:`SchemaError`): a counter's series counts with :meth:`inc`."""
        raise SchemaError(self.key, "a counter's series counts with inc(), not observe()")


class HistogramHandle(SeriesHandle):
    """One series of a histogram family (see :meth:`FamilyHandle.labels`): :meth:`observe`
    is :meth:`CounterStore.observe` with the series resolved once (the same checks, the same
    one write, so bindings persist it exactly as they persist ``observe``)."""

    __slots__ = ("_bounds", "_first", "_series", "_sum_cell")

    def __init__(
        self, store: CounterStore, key: str, values: tuple[str, ...], series: HistogramSeries
    ) -> None:
        super().__init__(store, key, values, -1)
        self._series = series
        self._first = series.first
        self._bounds = series.bounds
        self._sum_cell = series.sum_cell

    def observe(self, value: float) -> None:
        """Count one observation (:class:`SchemaError` for anything but a finite number
        ``>= 0``, and nothing changes)."""
        # A plain float in range takes CounterStore._add for one bucket and the sum, inlined
        # (the call it saves is a third of an observation's cost, benchmarks figure 1); any
        # other value takes CounterStore.observe's own checks. Keep the two the same: the
        # store's lock, counts and sums read afresh each time (a fork or a restore replaces
        # them), both changed or neither, the change hook once, as _add calls it.
        if type(value) is not float or not 0.0 <= value < _INF:
            self._store._observe(self._series, self.key, value)
            return
        bucket = self._first + bisect_left(self._bounds, value)
        after = None
        store = self._store
        lock = store._lock
        lock.acquire()
        try:
            sums = store._sums
            total = sums[self._sum_cell] + value
            counts = store._counts
            n = counts[bucket] + 1
            if total == _INF or n > MAX_COUNT:
                raise SchemaError(self.key, "sum would overflow or count would exceed 2**63-1")
            sums[self._sum_cell] = total
            counts[bucket] = n
            hook = store._on_change
            if hook is not None:
                after = hook()
        finally:
            lock.release()
        if after is not None:
            after()

    def inc(self, amount: int = 1) -> None:
        """Refused (:class:`SchemaError`): a histogram's series records with :meth:`observe`."""
        raise SchemaError(self.key, "a histogram's series records with observe(), not inc()")

    def get(self) -> int:
        """The series' count of observations."""
        snap = self._store.snapshot()
        buckets, _ = snap.histogram(self.key, snap.schema.family(self.key).series_key(self.values))
        return buckets[-1]


def _series(schema: Schema, key: str, value: LabelValues, labels: Mapping[str, str]) -> LabelValues:
    """The series a reader or writer names: ``value``, or the label values given by name in
    the form :meth:`Schema.slot` looks up directly (a mapping would take its slow path)."""
    if not labels:
        return value
    if value is not None:
        raise SchemaError(key, "give the label values either positionally or by name")
    fam = schema.family(key)
    if not fam.label_pairs:
        raise SchemaError(key, "family has no label")
    return fam.series_key(fam.label_values(labels))


def _refuse_gauges(schema: Schema) -> None:
    """:class:`SchemaError` for a schema with a gauge family: a store cannot record one.

    A gauge here would only go up, and each worker's value would be summed across processes,
    a dead worker's forever: no semantics a gauge's reader expects (prometheus_client's
    livesum, max, min or mostrecent). Until gauges have such modes, a store refuses them
    rather than export a number that means nothing. The aggregator's own pipeline gauge
    (``<namespace>_shards{state}``) is computed by each aggregation, never stored in a shard,
    and is unaffected; shards of the previous release that hold a gauge family still read.
    """
    for fam in schema.families:
        if fam.kind == "gauge":
            raise SchemaError(
                f"family {fam.name!r}",
                "a store cannot record a gauge: gauges have no cross-process semantics yet "
                "(each worker's value would be summed, a dead worker's forever); use a counter "
                "or a histogram",
            )


def _key_of(schema: Schema, slot: int) -> str:
    """The family key of ``slot`` (for error messages)."""
    first = 0
    for fam in schema.families:
        if slot < first + fam.width:
            return fam.key
        first += fam.width
    return ""
