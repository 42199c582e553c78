"""gatemetrics: exact, crash-safe, multiprocess counters with a deterministic Prometheus exposition.

The engine knows nothing of release gates: it offers counter families with fixed label values
(:class:`Family`, :class:`Schema`), a thread-safe in-memory store (:class:`CounterStore`) and
deterministic rendering (:func:`render_prometheus`, :func:`render_json`).
"""

from __future__ import annotations

from gatemetrics.errors import GatemetricsError, LockTimeoutError, SchemaError, ShardWriteError
from gatemetrics.exposition import CONTENT_TYPE, render_json, render_prometheus
from gatemetrics.schema import MAX_COUNT, Family, Schema
from gatemetrics.store import CounterStore, Snapshot

__all__ = [
    "CONTENT_TYPE",
    "MAX_COUNT",
    "CounterStore",
    "Family",
    "GatemetricsError",
    "LockTimeoutError",
    "Schema",
    "SchemaError",
    "ShardWriteError",
    "Snapshot",
    "render_json",
    "render_prometheus",
]
