"""gatemetrics: exact, crash-safe, multiprocess counters with a deterministic Prometheus exposition.

The engine knows nothing of release gates: it offers counter and histogram families with fixed
label values, one label or several, and a histogram's fixed buckets (:class:`Family`,
:class:`Schema`), a thread-safe in-memory store (:class:`CounterStore`: ``increment``,
``observe``, and prometheus_client-style handles: :class:`FamilyHandle`), deterministic
rendering (:func:`render_prometheus`, :func:`render_openmetrics`, :func:`render_json`),
per-process shards on disk (:func:`save_to_dir`, :func:`bind`, :class:`Shard`), the aggregator
that merges and compacts a shard directory (:func:`aggregate_dir`) and its shared-lock read for
scrapes (:func:`read_dir`), and anyio helpers (:func:`periodic_saver`, :func:`asave`,
:func:`aread_dir`). ``/metrics`` for an app: :mod:`gatemetrics.http` (ASGI and WSGI, no
dependency) and :mod:`gatemetrics.prometheus_client` (a collector for a prometheus_client
registry; the ``prometheus`` extra).
:mod:`gatemetrics.persistence` holds the public types of persistence (durability,
modes, the :class:`PersistedStore` protocol between a store and its shard). Two file helpers
are public for applications that persist next to the engine: :func:`write_file_atomically`
(replace a whole file by temp file and rename) and :func:`try_flock`/:func:`flock_until` (the
engine's one classification of ``flock`` contention); :func:`check_seconds` is the one check of
every interval and timeout the engine takes.
"""

from __future__ import annotations

from gatemetrics._checks import check_seconds
from gatemetrics._flock import flock_until, try_flock
from gatemetrics.aggregate import (
    Aggregate,
    ArchiveReport,
    CompactionReport,
    RecordedSchema,
    ShardReport,
    aggregate_dir,
    default_namespace,
    is_shard_file,
    pipeline_schema,
    read_dir,
    recorded_schema,
)
from gatemetrics.aio import aread_dir, asave, periodic_saver
from gatemetrics.errors import GatemetricsError, LockTimeoutError, SchemaError, ShardWriteError
from gatemetrics.exposition import (
    CONTENT_TYPE,
    OPENMETRICS_CONTENT_TYPE,
    FamilySamples,
    Sample,
    escape_help,
    escape_label_value,
    le_labels,
    openmetrics_text,
    render_json,
    render_openmetrics,
    render_prometheus,
    samples,
)
from gatemetrics.http import ExpositionFormat, metrics_asgi_app, metrics_wsgi_app, negotiate
from gatemetrics.persistence import CellImage, LockedHook, PersistedStore, SaveState
from gatemetrics.schema import (
    MAX_COUNT,
    CountsDict,
    Family,
    HistogramSeries,
    Kind,
    LabelValues,
    Schema,
    check_generation,
    check_sum,
    check_timestamp,
)
from gatemetrics.shards import (
    Binding,
    Durability,
    Identity,
    Mode,
    Shard,
    bind,
    close_all_bindings,
    fsync_directory,
    new_identity,
    save_to_dir,
    shard_for,
    write_file_atomically,
)
from gatemetrics.store import (
    CounterStore,
    FamilyHandle,
    HistogramHandle,
    SeriesHandle,
    Snapshot,
)

__all__ = [
    "CONTENT_TYPE",
    "MAX_COUNT",
    "OPENMETRICS_CONTENT_TYPE",
    "Aggregate",
    "ArchiveReport",
    "Binding",
    "CellImage",
    "CompactionReport",
    "CounterStore",
    "CountsDict",
    "Durability",
    "ExpositionFormat",
    "Family",
    "FamilyHandle",
    "FamilySamples",
    "GatemetricsError",
    "HistogramHandle",
    "HistogramSeries",
    "Identity",
    "Kind",
    "LabelValues",
    "LockTimeoutError",
    "LockedHook",
    "Mode",
    "PersistedStore",
    "RecordedSchema",
    "Sample",
    "SaveState",
    "Schema",
    "SchemaError",
    "SeriesHandle",
    "Shard",
    "ShardReport",
    "ShardWriteError",
    "Snapshot",
    "aggregate_dir",
    "aread_dir",
    "asave",
    "bind",
    "check_generation",
    "check_seconds",
    "check_sum",
    "check_timestamp",
    "close_all_bindings",
    "default_namespace",
    "escape_help",
    "escape_label_value",
    "flock_until",
    "fsync_directory",
    "is_shard_file",
    "le_labels",
    "metrics_asgi_app",
    "metrics_wsgi_app",
    "negotiate",
    "new_identity",
    "openmetrics_text",
    "periodic_saver",
    "pipeline_schema",
    "read_dir",
    "recorded_schema",
    "render_json",
    "render_openmetrics",
    "render_prometheus",
    "samples",
    "save_to_dir",
    "shard_for",
    "try_flock",
    "write_file_atomically",
]
