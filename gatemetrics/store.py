"""A thread-safe, in-memory counter store over a :class:`~gatemetrics.schema.Schema`.

One store per process holds that process's cumulative counts. Every increment takes one
``threading.Lock`` (uncontended: about 0.1 µs), so a store is safe to share between threads;
reads return copies, never live views. The store has no I/O of its own: persistence (shards) and
merging (the aggregator) are built on :meth:`CounterStore.snapshot` and the dictionary layout.

Two hooks connect a store to persistence without costing an unbound store anything measurable:

* a *change hook* (one callable, ``None`` by default) that every public write method calls once,
  after its counts are visible. :mod:`gatemetrics.shards` uses it for write-through saving.
* fork safety: counts made before ``os.fork()`` belong to the parent. In a forked child every
  store starts again at zero, with a fresh lock (the parent's may have been held by a thread that
  does not exist in the child) and a new start time, so nothing is ever counted twice.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from gatemetrics.errors import SchemaError
from gatemetrics.schema import (
    GENERATION_KEY,
    MAX_COUNT,
    START_TIMESTAMP_KEY,
    Schema,
    check_generation,
    check_timestamp,
)

__all__ = ["CounterStore", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable, consistent copy of a store's counts and metadata."""

    schema: Schema
    counts: tuple[int, ...]
    generation: int = 0
    start_timestamp: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != self.schema.size:
            raise SchemaError("", f"expected {self.schema.size} counts, got {len(self.counts)}")

    def get(self, key: str, value: str | None = None) -> int:
        """The count of one series."""
        return self.counts[self.schema.slot(key, value)]

    def family(self, key: str) -> dict[str, int]:
        """Counts of a labelled family by label value, in schema order."""
        fam = self.schema.family(key)
        if fam.label is None:
            raise SchemaError(key, "family has no label; use get()")
        base = self.schema.offset(key)
        return dict(zip(fam.values, self.counts[base : base + fam.width], strict=True))

    def to_dict(self) -> dict[str, Any]:
        """The dictionary layout, metadata included."""
        out = self.schema.counts_to_dict(self.counts)
        out[GENERATION_KEY] = self.generation
        out[START_TIMESTAMP_KEY] = self.start_timestamp
        return out


class CounterStore:
    """Cumulative counters for every series of ``schema``, safe to use from many threads.

    ``clock`` (seconds since the epoch) is injectable so tests control
    ``store_start_timestamp``.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_counts",
        "_generation",
        "_lock",
        "_on_change",
        "_pid",
        "_restores",
        "_schema",
        "_start",
    )

    #: A read-only store (a merged view of a directory) can never be saved as a shard.
    read_only: ClassVar[bool] = False

    def __init__(self, schema: Schema, *, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a Schema, not {type(schema).__name__}")
        self._schema = schema
        self._lock = threading.Lock()
        self._counts: list[int] = schema.zeros()
        self._generation = 0
        self._clock = clock
        self._start = float(clock())
        self._pid = os.getpid()
        self._on_change: Callable[[], object] | None = None
        self._restores = 0
        _STORES.add(self)

    @property
    def schema(self) -> Schema:
        return self._schema

    @property
    def generation(self) -> int:
        """How many times this store's state has been persisted (0 for a fresh store)."""
        return self._generation

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

    def increment(self, key: str, value: str | None = None, amount: int = 1) -> None:
        """Add ``amount`` to one series; :class:`SchemaError` for a series outside the schema."""
        slot = self._schema.slot(key, value)
        if type(amount) is not int or amount < 0:
            raise SchemaError(key, f"amount must be a non-negative int, got {amount!r}")
        with self._lock:
            new = self._counts[slot] + amount
            if new > MAX_COUNT:
                raise SchemaError(key, "count would exceed 2**63-1")
            self._counts[slot] = new
        hook = self._on_change
        if hook is not None:
            hook()

    def increment_slots(self, slots: Iterable[int]) -> None:
        """Add one to each slot in ``slots`` atomically (all or none are visible to readers).

        The fast path for wrappers that resolved their slots once with :meth:`Schema.slot`.
        """
        todo = tuple(slots)
        size = self._schema.size
        for s in todo:
            if type(s) is not int or not 0 <= s < size:
                raise SchemaError("", f"slot out of range: {s!r}")
        with self._lock:
            counts = self._counts
            for s in todo:
                counts[s] += 1
        hook = self._on_change
        if hook is not None:
            hook()

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str, value: str | None = None) -> int:
        """The current count of one series."""
        slot = self._schema.slot(key, value)
        with self._lock:
            return self._counts[slot]

    def snapshot(self) -> Snapshot:
        """A consistent copy of all counts and metadata."""
        with self._lock:
            counts = tuple(self._counts)
            generation = self._generation
        return Snapshot(self._schema, counts, generation, self._start)

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
        counts = self._schema.parse_counts(data)
        for key in (GENERATION_KEY, START_TIMESTAMP_KEY):
            if key not in data:
                raise SchemaError(key, "missing")
        generation = check_generation(data[GENERATION_KEY])
        start = check_timestamp(data[START_TIMESTAMP_KEY])
        with self._lock:
            self._counts = counts
            self._generation = generation
            self._start = start
            self._restores += 1

    # -- persistence hooks (used by gatemetrics.shards) ----------------------------------------

    def _set_change_hook(self, hook: Callable[[], object] | None) -> None:
        """Install (or remove, with ``None``) the callable every public write calls once.

        The hook runs on the writing thread after the lock is released. It must not raise for
        ordinary failures (write-through saving never does) and must not record into this store
        through a public write method (that would call it again).
        """
        if hook is not None and self.read_only:
            raise TypeError(f"{type(self).__name__} is read-only")
        self._on_change = hook

    def _bump_generation(self) -> tuple[Snapshot, int]:
        """Advance the generation and return the snapshot that carries it, atomically.

        Returns ``(snapshot, previous generation)`` so a failed save can roll back with
        :meth:`_rollback_generation`.
        """
        with self._lock:
            previous = self._generation
            self._generation = previous + 1
            snap = Snapshot(self._schema, tuple(self._counts), self._generation, self._start)
        return snap, previous

    def _next_save(self) -> tuple[tuple[int, ...], int, float, int]:
        """Advance the generation for a save; ``(counts, generation, start, restores)``.

        The lean form of :meth:`_bump_generation` for the save path (no :class:`Snapshot`).
        """
        with self._lock:
            self._generation = generation = self._generation + 1
            return tuple(self._counts), generation, self._start, self._restores

    def _rollback_generation(self, expected: int, previous: int) -> None:
        """Undo :meth:`_bump_generation` if no other save has moved the generation since."""
        with self._lock:
            if self._generation == expected:
                self._generation = previous

    def _count_quietly(self, slot: int) -> None:
        """Add one to ``slot`` without calling the change hook (for failures of the hook)."""
        with self._lock:
            self._counts[slot] += 1

    def _reset_after_fork(self) -> None:
        """Start again from zero as a new process's store (runs in a forked child)."""
        self._lock = threading.Lock()
        self._counts = self._schema.zeros()
        self._generation = 0
        self._start = float(self._clock())
        self._pid = os.getpid()


# Every live store, so a forked child can reset them all (weak: stores die normally).
_STORES: weakref.WeakSet[CounterStore] = weakref.WeakSet()


def _reset_stores_in_child() -> None:
    for store in list(_STORES):
        store._reset_after_fork()


os.register_at_fork(after_in_child=_reset_stores_in_child)
