"""gatemetrics: exact, crash-safe, multiprocess counters with a deterministic Prometheus exposition.

The engine knows nothing of release gates: it offers counter families with fixed label values
(:class:`Family`, :class:`Schema`), a thread-safe in-memory store (:class:`CounterStore`),
deterministic rendering (:func:`render_prometheus`, :func:`render_json`), per-process shards on
disk (:func:`save_to_dir`, :func:`bind`, :class:`Shard`), the aggregator that merges and
compacts a shard directory (:func:`aggregate_dir`), and anyio helpers (:func:`periodic_saver`,
:func:`asave`).
"""

from __future__ import annotations

from gatemetrics.aggregate import (
    Aggregate,
    ArchiveReport,
    CompactionReport,
    ShardReport,
    aggregate_dir,
    pipeline_schema,
)
from gatemetrics.aio import asave, periodic_saver
from gatemetrics.errors import GatemetricsError, LockTimeoutError, SchemaError, ShardWriteError
from gatemetrics.exposition import CONTENT_TYPE, render_json, render_prometheus
from gatemetrics.schema import MAX_COUNT, Family, Schema
from gatemetrics.shards import (
    Binding,
    Durability,
    Identity,
    Mode,
    Shard,
    bind,
    close_all_bindings,
    new_identity,
    save_to_dir,
    shard_for,
)
from gatemetrics.store import CounterStore, Snapshot

__all__ = [
    "CONTENT_TYPE",
    "MAX_COUNT",
    "Aggregate",
    "ArchiveReport",
    "Binding",
    "CompactionReport",
    "CounterStore",
    "Durability",
    "Family",
    "GatemetricsError",
    "Identity",
    "LockTimeoutError",
    "Mode",
    "Schema",
    "SchemaError",
    "Shard",
    "ShardReport",
    "ShardWriteError",
    "Snapshot",
    "aggregate_dir",
    "asave",
    "bind",
    "close_all_bindings",
    "new_identity",
    "periodic_saver",
    "pipeline_schema",
    "render_json",
    "render_prometheus",
    "save_to_dir",
    "shard_for",
]
