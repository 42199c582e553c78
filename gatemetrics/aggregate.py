"""The aggregator: merge a shard directory into one exact aggregate, and compact it.

Directory layout (file formats in :mod:`gatemetrics._format`; the shard side in
:mod:`gatemetrics.shards`)::

    DIR/v2-<incarnation>.shard     one per process incarnation (cumulative counts, two slots);
                                   its owner holds an flock on it for its whole life
    DIR/v2-<incarnation>.creating  a shard being created (or a dead creator's orphan)
    DIR/shard-<incarnation>.json   a shard of the previous release (format v1), with
    DIR/shard-<incarnation>.lock   its owner's lifetime lock and
    DIR/shard-<incarnation>.tmp    its owner's temp file while saving
    DIR/archive.json               totals of absorbed (dead) incarnations; written atomically
    DIR/schema.json                the schema and namespace the archive is laid out for (see
                                   :func:`recorded_schema`); written atomically by compaction
    DIR/aggregate.lock             the previous release's directory lock (still taken for it)
    DIR/quarantine/                broken or hostile files moved aside (bounded)

Every aggregation takes the directory lock (with a timeout): an ``flock`` on the directory
itself, then ``aggregate.lock`` for aggregators of the previous release, so aggregations and
compactions never interleave; shard owners never take it and are never blocked by it. No file
planted, removed or replaced in the directory can lose the directory's own flock.

Liveness: a v2 shard whose own ``flock`` the aggregator can take has no living owner, and
neither has a v1 shard whose lock file it can take. One open per v2 shard serves the probe and
the read; a dead shard's lock stays held by the aggregator until the run ends. Reading needs no
write permission: a reader that may not create ``aggregate.lock`` goes on under the directory's
flock alone.

Scrapes read with :func:`read_dir`: the same run, never compacting, under *shared* locks (the
directory's flock and ``aggregate.lock`` both taken ``LOCK_SH``), so any number of readers run
at once and never queue behind each other, while every compaction or :func:`aggregate_dir`
(exclusive, on both, like the previous release's aggregators on ``aggregate.lock``) excludes
them and is excluded by them. A reader probes liveness with a shared ``flock`` as well: an
owner's lifetime lock is exclusive, so the probe fails against it exactly as an exclusive one
would, and two readers that find the same dead shard both take it (an exclusive probe would
make the second reader believe that shard live, and count an absorbed one twice). A reader
writes nothing: at most it creates the empty ``aggregate.lock`` when missing, as every
aggregation does. (A compaction that finds readers waits for them, up to its own timeout; scrapes
hold the lock for milliseconds, so that wait is short unless scrapes never stop overlapping.)

Compaction (crash-safe; a kill at any step leaves a directory whose next aggregate is exact):

1. The new archive is written first: old totals plus the dead shards' counts, together with the
   ids just absorbed (and the names of files about to be quarantined, with the new quarantine
   count). A shard whose id the archive lists is never counted again, so a crash between this
   write and the deletions cannot double count.
2. Quarantined files are moved; absorbed shards, dead creators' orphan temp files, dead v1
   writers' temp files and dead v1 lock files are deleted. A lock or temp file is deleted only
   while holding its ``flock``, so an owner that opened it just before cannot believe it holds a
   lock on a file that is gone (v2 creators then retry as a new incarnation).
3. The archive is written once more without the ids and names whose files are now gone, so it
   does not grow with history.

Broken or hostile files (truncated, not JSON or UTF-8, a v2 file with a bad header, the wrong
size, bad checksums in both slots or another schema's fingerprint, too large, wrongly typed,
negative, NaN, out of schema, label injection, a symlink, a directory or FIFO named like a shard)
cost only themselves: when no live owner can write them any more they are
quarantined (moved aside) and counted in ``<namespace>_quarantined_shards_total``; a live
owner's broken file is skipped. A v2 shard the aggregator cannot even open (permissions) cannot
be probed either, so it is treated as live and skipped on every run (never deleted); an
unreadable v1 shard is quarantined once its lock file shows no owner. Each costs one log line
per run. Nothing outside the schema ever
reaches the result. A well-formed archive that does not fit the schema is *not* quarantined: that
means the aggregator was given the wrong schema, and dropping the history would be worse than
stopping (:class:`~gatemetrics.SchemaError`).

The directory is a trust boundary (the README's "A user who can write the directory"). Every
name is resolved against the directory's descriptor, never through the path again, and opened
with ``O_NOFOLLOW``; temp files are created with ``O_EXCL`` (a planted one is unlinked first).
A link, FIFO, socket, directory or hard link under a name we own (``aggregate.lock``,
``archive.json``, ``archive.json.tmp``, shard and temp names, a non-directory ``quarantine``)
costs only itself: one log line, quarantined (or replaced) by compaction, and the run goes on.
Liveness beats the archive: an archive that lists a live incarnation as absorbed is wrong, and
the shard is counted and kept. Totals past 2**63-1 follow the rule of :meth:`_Run._settle`
(the absurd shard is left out; an absurd archive saturates), and whatever compaction writes is
clamped so that a later run reads it back.

Upgrading from the previous release: its shards (v1) are read, counted and compacted like v2
ones, so workers of both releases can share a directory during a rolling upgrade. A compactor of
the previous release (an old gunicorn master's ``child_exit``) ignores v2 files (their names do
not start with ``shard-``) and reads the archive this release writes (still archive version 1).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import operator
import os
import re
import shutil
import stat
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import orjson

from gatemetrics import _faults
from gatemetrics._checks import check_seconds
from gatemetrics._flock import HostileLockFile, exclusive_flock, flock_fd, shared_flock, try_flock
from gatemetrics._format import (
    ARCHIVE_NAME,
    ARCHIVE_TMP,
    MAX_ARCHIVE_BYTES,
    MAX_SCHEMA_FILE_BYTES,
    MAX_SHARD_BYTES,
    OWNED_PREFIXES,
    SCHEMA_NAME,
    SCHEMA_TMP,
    Archive,
    BadFile,
    ForeignSchema,
    Layout,
    ShardRecord,
    V2Header,
    decode_schema_file,
    decode_v1,
    decode_v2_header,
    decode_v2_schema,
    decode_v2_slots,
    encode_schema_file,
    layout_for,
    parse_name,
    schema_fingerprint,
    schema_fits,
    v1_names,
    v2_names,
)
from gatemetrics.errors import LockTimeoutError, SchemaError, ShardWriteError
from gatemetrics.exposition import render_openmetrics, render_prometheus
from gatemetrics.schema import MAX_COUNT, Family, Schema
from gatemetrics.shards import fsync_directory, write_file_atomically
from gatemetrics.store import Snapshot

__all__ = [
    "ARCHIVE_NAME",
    "COMPACT_STEPS",
    "FALLBACK_NAMESPACE",
    "LOCK_NAME",
    "MAX_SHARD_BYTES",
    "PIPELINE_QUARANTINED_KEY",
    "PIPELINE_SHARDS_KEY",
    "QUARANTINE_DIR",
    "QUARANTINE_KEEP",
    "SCHEMA_NAME",
    "Aggregate",
    "ArchiveReport",
    "CompactionReport",
    "RecordedSchema",
    "ShardReport",
    "aggregate_dir",
    "default_namespace",
    "is_shard_file",
    "pipeline_schema",
    "read_dir",
    "recorded_schema",
]

LOCK_NAME = "aggregate.lock"
QUARANTINE_DIR = "quarantine"
#: Entries kept in the quarantine directory; the oldest go first beyond this.
QUARANTINE_KEEP = 200

PIPELINE_QUARANTINED_KEY = "pipeline_quarantined_shards"
PIPELINE_SHARDS_KEY = "pipeline_shards"

#: The named crash points of a compaction, in order (see :mod:`gatemetrics._faults`).
COMPACT_STEPS = (
    "compact.locked",  # directory lock held, nothing read yet
    "compact.scanned",  # archive and shards read, nothing written
    "schema.tmp_written",  # schema.json's temp file written (only when it changes)
    "schema.replaced",  # schema.json in place, the archive not yet written
    "archive.tmp_written",  # new archive's temp file written
    "archive.replaced",  # new archive in place (absorbed ids recorded), nothing deleted
    "compact.quarantined",  # one file moved to quarantine
    "compact.shard_deleted",  # one absorbed shard deleted
    "compact.tmp_deleted",  # one orphan temp file deleted
    "compact.lock_deleted",  # one dead lock file deleted
    "compact.pruned",  # archive rewritten without the ids whose files are gone
)

_log = logging.getLogger("gatemetrics.aggregate")
_NAMESPACE = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*\Z")

_State = Literal["live", "dead", "absorbed"]
_OPEN_RO = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_A_NAME = "not a shard file name"
# Names the aggregator itself creates (quarantine/ is handled where it is opened).
_FIXED_NAMES = (LOCK_NAME, ARCHIVE_TMP)
_PIPELINE_CACHE: dict[tuple[Schema, str], Schema] = {}


def is_shard_file(name: str) -> bool:
    """Whether ``name`` is the name of a shard-family file of either format: a shard, one being
    created, or a previous-release shard's lock or temp file (what compaction reaps when dead).

    For tools that list a shard directory (backups, a demo's summary) without knowing its
    formats; the fixed names (``archive.json``, ``schema.json``, ``aggregate.lock``,
    ``quarantine/``) are not shard files.
    """
    return parse_name(name) is not None


def pipeline_schema(schema: Schema, namespace: str) -> Schema:
    """``schema`` followed by the two pipeline families of ``namespace`` (cached per schema).

    ``<namespace>_quarantined_shards_total`` (counter) and ``<namespace>_shards{state}`` (gauge,
    ``live``/``dead``).
    """
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        # No leading underscore or colon: "__" is Prometheus's, colons are for recording rules.
        raise SchemaError("namespace", f"must match [a-zA-Z][a-zA-Z0-9_]*, not {namespace!r}")
    cached = _PIPELINE_CACHE.get((schema, namespace))
    if cached is None:
        cached = schema.extend(
            (
                Family(
                    f"{namespace}_quarantined_shards_total",
                    "Shard files the aggregator quarantined as broken or hostile (cumulative).",
                    key=PIPELINE_QUARANTINED_KEY,
                ),
                Family(
                    f"{namespace}_shards",
                    "Shard files the last aggregation found, by whether their owner is alive.",
                    key=PIPELINE_SHARDS_KEY,
                    label="state",
                    values=("live", "dead"),
                    kind="gauge",
                ),
            )
        )
        _PIPELINE_CACHE[(schema, namespace)] = cached
    result: Schema = cached
    return result


#: The namespace of the pipeline families when neither the caller nor the directory names one
#: and the schema's family names share no prefix.
FALLBACK_NAMESPACE = "gatemetrics"
#: Distinct schemas :func:`recorded_schema` weighs against each other; more is hostile.
_MAX_CANDIDATES = 16


def default_namespace(schema: Schema) -> str:
    """The pipeline namespace to use when none is given or recorded: the longest prefix, up to
    an underscore, that every family name of ``schema`` shares (``shop`` for ``shop_orders_total``
    and ``shop_errors_total``), else :data:`FALLBACK_NAMESPACE`."""
    # Whole words only: "shop" is not the prefix of "shop_orders_total" and "shopping_total".
    words = [f.name.split("_")[:-1] for f in schema.families]
    shared: list[str] = []
    for column in zip(*words, strict=False):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    prefix = "_".join(shared)
    return prefix if _NAMESPACE.match(prefix) else FALLBACK_NAMESPACE


@dataclass(frozen=True, slots=True)
class RecordedSchema:
    """What a directory says about the schema its files are written with.

    ``schema`` is ``None`` when nothing in the directory records one (no ``schema.json`` and no
    readable v2 shard). ``source`` says where it came from (``"schema.json"``, ``"shards"`` or
    ``"nothing"``); ``namespace`` is the recorded pipeline namespace (only ``schema.json``
    records one); ``problems`` lists what was ignored on the way (one line each).
    """

    schema: Schema | None
    namespace: str | None
    source: Literal["schema.json", "shards", "nothing"]
    problems: tuple[str, ...] = ()


def recorded_schema(directory: str | os.PathLike[str]) -> RecordedSchema:
    """The schema ``directory`` records, by this rule:

    1. ``schema.json``, written by every compaction, wins when it is valid: it describes the
       archive's totals. Shards that do not fit it are quarantined as usual (or, when none
       fits, the aggregation refuses: see :func:`aggregate_dir`).
    2. Else the schemas recorded in the v2 shards' headers: the one that the most shards fit
       (a shard fits a schema that has all its families and label values, so during a rolling
       upgrade that adds a label value, the new schema wins and the old shards still count);
       ties go to the schema with more series, then to the lower fingerprint.
    3. Else nothing (``schema`` is ``None``): v1 shards of the previous release record none.

    Every record is validated and bounded before use (:func:`gatemetrics._format.
    schema_from_record`); a record that fails is ignored and named in ``problems``. Reads only:
    files are opened relative to the directory without following links, and at most
    :data:`MAX_SHARD_BYTES` of each. Raises ``OSError`` for a directory that cannot be listed.
    """
    path = os.path.abspath(os.fspath(directory))
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    problems: list[str] = []
    try:
        names = sorted(os.listdir(dir_fd))
        if SCHEMA_NAME in names:
            try:
                schema, namespace = decode_schema_file(
                    _read_file(dir_fd, SCHEMA_NAME, MAX_SCHEMA_FILE_BYTES)
                )
            except (BadFile, OSError) as exc:
                problems.append(f"ignored {SCHEMA_NAME}: {exc}")
            else:
                return RecordedSchema(schema, namespace, "schema.json")
        candidates: dict[bytes, Schema] = {}
        found: list[bytes] = []
        for name in names:
            parsed = parse_name(name)
            if parsed is None or parsed[1] != "v2":
                continue
            try:
                fp, schema = decode_v2_schema(_read_file(dir_fd, name, MAX_SHARD_BYTES))
            except (BadFile, OSError):
                continue  # a broken shard records nothing; the aggregation reports it
            if fp not in candidates and len(candidates) >= _MAX_CANDIDATES:
                problems.append(f"more than {_MAX_CANDIDATES} schemas recorded; ignored {name}")
                continue
            candidates.setdefault(fp, schema)
            found.append(fp)
    finally:
        os.close(dir_fd)
    if not candidates:
        return RecordedSchema(None, None, "nothing", tuple(problems))

    def rank(fp: bytes) -> tuple[int, int, str]:
        schema = candidates[fp]
        fitting = sum(schema_fits(candidates[f], schema) for f in found)
        return (-fitting, -schema.size, fp.hex())

    best = min(candidates, key=rank)
    return RecordedSchema(candidates[best], None, "shards", tuple(problems))


def _read_file(dir_fd: int, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``name`` (never through a link)."""
    fd = os.open(name, _OPEN_RO, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadFile("not a regular file")
        if st.st_size > limit:
            raise BadFile(f"too large ({st.st_size} bytes, limit {limit})")
        data = os.pread(fd, limit + 1, 0)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BadFile(f"too large (more than {limit} bytes)")
    return data


@dataclass(frozen=True, slots=True)
class ShardReport:
    """One shard file as an aggregation found it."""

    name: str
    incarnation: str | None
    state: _State | None  # None: no owner can be named (a hostile name)
    action: Literal["counted", "absorbed", "quarantined", "skipped"]
    pid: int | None = None
    host: str | None = None
    saved_at: float | None = None
    generation: int | None = None
    counts: tuple[int, ...] | None = None
    problem: str | None = None
    format: int | None = None  # 1 (previous release's JSON) or 2; None when unreadable


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    """The archive as an aggregation found (and, when compacting, left) it."""

    exists: bool
    absorbed_total: int = 0
    quarantined_total: int = 0
    updated_at: float | None = None
    problem: str | None = None
    saturated: bool = False  # some total held at 2**63-1: the archive is hostile or corrupt


@dataclass(frozen=True, slots=True)
class CompactionReport:
    """What a compaction changed."""

    absorbed: int = 0
    quarantined: int = 0
    removed_shards: int = 0
    removed_temp_files: int = 0
    removed_lock_files: int = 0


@dataclass(frozen=True)
class Aggregate:
    """The merged counts of one directory, and how they were found. Immutable."""

    directory: str
    schema: Schema
    namespace: str
    counts: tuple[int, ...]
    quarantined_total: int
    live: int
    dead: int
    start_timestamp: float
    archive: ArchiveReport
    shards: tuple[ShardReport, ...]
    files_read: int
    quarantine_entries: int
    compaction: CompactionReport | None = None
    #: The merged float cells (histogram sums; empty without histograms): each the
    #: ``math.fsum`` of the archive's and the counted shards' sums, so the same files give the
    #: same bits whatever order they were read in.
    sums: tuple[float, ...] = ()

    def snapshot(self) -> Snapshot:
        """The merged counts over the caller's schema (no pipeline families)."""
        return Snapshot(self.schema, self.counts, 0, self.start_timestamp, self._sums())

    def pipeline_snapshot(self) -> Snapshot:
        """The merged counts followed by the pipeline families."""
        full = pipeline_schema(self.schema, self.namespace)
        counts = (*self.counts, self.quarantined_total, self.live, self.dead)
        # The pipeline families come after the caller's and have no float cells.
        return Snapshot(full, counts, 0, self.start_timestamp, self._sums())

    def _sums(self) -> tuple[float, ...]:
        return self.sums or tuple(self.schema.float_zeros())

    def render_prometheus(self) -> str:
        """The deterministic text exposition: the schema's families, then the pipeline's."""
        return render_prometheus(self.pipeline_snapshot())

    def render_openmetrics(self) -> str:
        """The same families and samples as :meth:`render_prometheus`, in OpenMetrics 1.0.0."""
        return render_openmetrics(self.pipeline_snapshot())

    def render_json(self) -> str:
        """The dictionary layout of all families as JSON with sorted keys (no metadata)."""
        snap = self.pipeline_snapshot()
        return orjson.dumps(
            snap.schema.counts_to_dict(snap.counts, snap.sums), option=orjson.OPT_SORT_KEYS
        ).decode()


def aggregate_dir(
    directory: str | os.PathLike[str],
    schema: Schema,
    *,
    namespace: str,
    compact: bool = False,
    lock_timeout: float = 10.0,
    clock: Callable[[], float] = time.time,
) -> Aggregate:
    """Merge every shard of ``directory`` with its archive; optionally compact it.

    Raises ``FileNotFoundError``/``NotADirectoryError``/``PermissionError`` (``OSError``) for a
    directory that cannot be used, :class:`LockTimeoutError` when the directory lock is not
    free within ``lock_timeout`` seconds, :class:`ShardWriteError` when compaction cannot write
    the archive (nothing is deleted then) and :class:`SchemaError` for a well-formed archive
    that does not fit ``schema``. Broken shards never raise.
    """
    return _aggregate(
        directory,
        schema,
        namespace=namespace,
        compact=compact,
        lock_timeout=lock_timeout,
        clock=clock,
        shared=False,
    )


def read_dir(
    directory: str | os.PathLike[str],
    schema: Schema,
    *,
    namespace: str,
    lock_timeout: float = 10.0,
    clock: Callable[[], float] = time.time,
) -> Aggregate:
    """The merged counts of ``directory`` for a scrape: :func:`aggregate_dir` without
    compaction, under shared locks (see the module documentation).

    Readers never wait for each other; :class:`LockTimeoutError` only when an exclusive holder
    (a compaction, an :func:`aggregate_dir`, an aggregator of the previous release) keeps the
    lock past ``lock_timeout`` seconds. Raises what :func:`aggregate_dir` raises, except
    :class:`ShardWriteError` (nothing is written).
    """
    return _aggregate(
        directory,
        schema,
        namespace=namespace,
        compact=False,
        lock_timeout=lock_timeout,
        clock=clock,
        shared=True,
    )


def _aggregate(
    directory: str | os.PathLike[str],
    schema: Schema,
    *,
    namespace: str,
    compact: bool,
    lock_timeout: float,
    clock: Callable[[], float],
    shared: bool,
) -> Aggregate:
    path = os.path.abspath(os.fspath(directory))
    pipeline_schema(schema, namespace)  # a bad namespace fails before any I/O
    lock_timeout = check_seconds("lock_timeout", lock_timeout, allow_zero=True)
    run = _Run(path, schema, namespace, compact=compact, clock=clock, shared=shared)
    # Every name below is resolved against this descriptor, never against the path again: a
    # directory renamed or replaced while we work cannot redirect a write.
    run.dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _ACTIVE.add(run)
    try:
        deadline = time.monotonic() + lock_timeout
        # The directory's own flock is the exclusion: no file planted, removed or replaced in
        # the directory can lose it. aggregate.lock is taken as well, for aggregators of the
        # previous release (they lock only that). Bare flocks, not filelock: this runs on every
        # aggregation and every GET /metrics (see _flock).
        flock_fd(run.dir_fd, os.path.join(path, LOCK_NAME), lock_timeout, shared=shared)
        try:
            with _lock_file(run, deadline, lock_timeout):
                return run.run()
        finally:
            run.release()
            if run.dir_fd >= 0:
                fcntl.flock(run.dir_fd, fcntl.LOCK_UN)
    finally:
        _ACTIVE.discard(run)
        if run.dir_fd >= 0:  # -1 in a child forked meanwhile (see _after_fork_in_child)
            os.close(run.dir_fd)
            run.dir_fd = -1


@contextlib.contextmanager
def _lock_file(run: _Run, deadline: float, lock_timeout: float) -> Iterator[None]:
    """Hold ``aggregate.lock`` too, unless something planted sits under its name.

    A planted entry (a symlink, FIFO, directory, a hard link of a live shard...) is never
    followed, created through or waited on: the run goes on under the directory's flock alone,
    and compaction quarantines the entry so that the next run creates a real lock file.
    """
    shown = run._p(LOCK_NAME)
    timeout = max(0.0, deadline - time.monotonic())
    held = shared_flock if run.shared else exclusive_flock
    try:
        with held(LOCK_NAME, timeout=timeout, dir_fd=run.dir_fd, shown=shown):
            yield
            return
    except LockTimeoutError:
        raise LockTimeoutError(shown, lock_timeout) from None  # the caller's whole wait
    except HostileLockFile as exc:
        run.problems[LOCK_NAME] = exc.strerror or "not a lock file"
    except (PermissionError, FileNotFoundError) as exc:
        # A reader that may not create the lock file (a directory it can read but not write,
        # where no lock file exists yet: ENOENT once creating it was refused): the directory
        # flock still excludes every aggregator of this release.
        _log.warning("cannot open %s (%s); going on without it", LOCK_NAME, exc.strerror)
    yield


# -- one run ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    """The files of one incarnation found in the directory."""

    v1: bool = False
    v1_lock: bool = False
    v1_tmp: bool = False
    v2: bool = False
    v2_creating: bool = False


_ENTRY_FIELD = {
    "v1": "v1",
    "v1-lock": "v1_lock",
    "v1-tmp": "v1_tmp",
    "v2": "v2",
    "v2-creating": "v2_creating",
}


class _Run:
    """One aggregation (and compaction) of one directory, under its directory lock."""

    def __init__(
        self,
        directory: str,
        schema: Schema,
        namespace: str,
        *,
        compact: bool,
        clock: Callable[[], float],
        shared: bool = False,
    ) -> None:
        self.dir = directory
        self.shared = shared  # a read_dir run: shared locks, shared liveness probes
        self.schema = schema
        self.layout = layout_for(schema)  # once per run: hashing a schema is not free
        # The size of a v2 shard of this schema whose header fits its first page (all real
        # ones: the header is the identity and the schema record, well under 4 KiB).
        self.v2_size = self.layout.file_size(1)
        self.dir_fd = -1  # the directory (aggregate_dir opens and closes it): names resolve here
        self.quarantine_fd = -1  # quarantine/, opened when first needed
        # Live v2 shards kept open between runs of this process (see _KeptShards): those the
        # last run left (taken out for this run), and those this run leaves for the next one.
        self.kept_key: tuple[int, int, Layout] | None = None
        self.kept_before: dict[str, tuple[int, V2Header]] = {}
        self.kept_after: dict[str, tuple[int, V2Header]] | None = None
        self.namespace = namespace
        self.compact = compact
        self.clock = clock
        self.files_read = 0
        self.names: list[str] = []
        self.entries: dict[str, _Entry] = {}
        # Liveness of v1 owners (by their lock file) and v2 owners (by the shard's own flock).
        self.states: dict[str, Literal["live", "dead"]] = {}
        # Descriptors of dead v2 shards: their flock stays ours until the run ends.
        self.held: dict[str, int] = {}
        self.archive = Archive(schema.zeros(), set(), sums=schema.float_zeros())
        self.totals: list[int] = schema.zeros()
        self.sum_totals: list[float] = schema.float_zeros()
        self.starts: list[float] = []
        self.reports: list[ShardReport] = []
        self.absorb: dict[str, tuple[int, ...]] = {}
        self.absorb_sums: dict[str, tuple[float, ...]] = {}
        # Shards read and valid, not yet summed: (report index, name, incarnation, state, record).
        self.counted: list[tuple[int, str, str, _State, ShardRecord]] = []
        self.problems: dict[str, str] = {}  # file name -> why it is to be quarantined
        self.live = self.dead = 0
        self.saturated = False  # some archive total had to be held at MAX_COUNT
        # Fingerprints of the v2 shards written with a schema that does not fit ours.
        self.foreign: list[bytes] = []

    def _p(self, name: str) -> str:
        """The path of ``name``, for messages only: every operation goes through ``dir_fd``."""
        return os.path.join(self.dir, name)

    def release(self) -> None:
        for fd in self.held.values():
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the flock we took on a dead shard
        self.held.clear()
        for fd, _ in self.kept_before.values():  # no longer listed, or not read this time
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kept_before = {}
        if self.kept_key is not None and self.kept_after is not None:
            _KEPT.check_in(self.kept_key, self.kept_after)
        self.kept_after = None
        if self.quarantine_fd >= 0:
            os.close(self.quarantine_fd)
            self.quarantine_fd = -1

    def run(self) -> Aggregate:
        if self.compact:
            _faults.point("compact.locked")
        st = os.fstat(self.dir_fd)
        self.kept_key = (st.st_dev, st.st_ino, self.layout)
        self.kept_before = _KEPT.check_out(self.kept_key)
        self.kept_after = {}
        self._list()
        self.archive = self._read_archive()
        self.totals = list(self.archive.counts)
        self.sum_totals = list(self.archive.sums) or self.schema.float_zeros()
        if self.archive.first_start is not None:
            self.starts.append(self.archive.first_start)
        for inc, entry in sorted(self.entries.items()):
            if entry.v2:
                self._count_v2(inc)
            if entry.v1 or entry.v1_lock or entry.v1_tmp:
                self.states.setdefault(inc, self._probe_v1(inc))
            if entry.v1:
                self._count_v1(inc)
        self._refuse_if_nothing_fits()
        self._settle()
        self._report_nameless()

        to_quarantine = sorted(self.problems)
        pending = [n for n in to_quarantine if n not in self.archive.quarantining]
        for name in to_quarantine:
            if self.compact:
                _log.warning("quarantined %s: %s", name, self.problems[name])
            else:
                why = self.problems[name]
                _log.warning("skipped %s (compaction will quarantine it): %s", name, why)
        # A broken archive counts as one quarantined file too (compaction moves it aside).
        broken = int(self.archive.problem is not None)
        quarantined_total = min(self.archive.quarantined_total + len(pending) + broken, MAX_COUNT)

        compaction: CompactionReport | None = None
        report_archive = ArchiveReport(
            self.archive.exists,
            self.archive.absorbed_total,
            self.archive.quarantined_total,
            self.archive.updated_at,
            self.archive.problem,
            self.saturated,
        )
        if self.compact:
            _faults.point("compact.scanned")
            compaction, report_archive = self._compact(to_quarantine, pending)
        return Aggregate(
            directory=self.dir,
            schema=self.schema,
            namespace=self.namespace,
            counts=tuple(self.totals),
            quarantined_total=quarantined_total,
            live=self.live,
            dead=self.dead,
            start_timestamp=min(self.starts, default=0.0),
            archive=report_archive,
            shards=tuple(self.reports),
            files_read=self.files_read,
            quarantine_entries=self._quarantine_entries(),
            compaction=compaction,
            sums=tuple(self.sum_totals),
        )

    def _refuse_if_nothing_fits(self) -> None:
        """Refuse (:class:`SchemaError`, before anything is moved) when shards were written with
        another schema and none fits ours: the caller most likely gave the wrong schema, and
        quarantining every shard would throw their counts away."""
        if not self.foreign or self.counted:
            return
        theirs = sorted({fp.hex()[:12] for fp in self.foreign})
        ours = schema_fingerprint(self.schema).hex()[:12]
        first = self.schema.families[0].name
        raise SchemaError(
            "",
            f"none of its {len(self.foreign)} v2 shard(s) fits the schema given (fingerprint "
            f"{ours}, first family {first}): they record schema(s) {', '.join(theirs[:3])}"
            f"{' ...' if len(theirs) > 3 else ''}; nothing was moved (give their schema, or "
            "none to use the one the directory records)",
        )

    def _report_nameless(self) -> None:
        """Reports for the problems that name no incarnation (hostile names, planted files
        under the names the aggregator itself creates)."""
        for name in self.names:
            if self.problems.get(name) == _NOT_A_NAME:
                self.reports.append(
                    ShardReport(name, None, None, "quarantined", problem=_NOT_A_NAME)
                )
        for name in _FIXED_NAMES:
            if name in self.problems:
                self.reports.append(
                    ShardReport(name, None, None, "quarantined", problem=self.problems[name])
                )

    def _list(self) -> None:
        """Sort the directory's names into incarnations; a bad name under ours is a problem."""
        self.names = sorted(os.listdir(self.dir_fd))
        for name in self.names:
            parsed = parse_name(name)
            if parsed is None:
                if name.startswith(OWNED_PREFIXES):
                    self.problems[name] = _NOT_A_NAME
                elif name == ARCHIVE_TMP:
                    # A crashed compaction leaves a regular file (removed by compaction);
                    # anything else there was planted.
                    kind = self._kind(name)
                    if kind is not None:
                        self.problems[name] = kind
                continue
            inc, kind = parsed
            setattr(self.entries.setdefault(inc, _Entry()), _ENTRY_FIELD[kind], True)

    def _kind(self, name: str) -> str | None:
        """``None`` for a regular file (or a name gone meanwhile), else what it is instead."""
        try:
            mode = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False).st_mode
        except OSError:
            return None
        if stat.S_ISREG(mode):
            return None
        if stat.S_ISLNK(mode):
            return "a symlink, not a regular file"
        return "a directory" if stat.S_ISDIR(mode) else "not a regular file"

    # -- counting ------------------------------------------------------------------------------

    def _count_v2(self, inc: str) -> None:
        name = v2_names(inc)[0]
        kept = self.kept_before.pop(name, None)
        try:
            found = None if kept is None else self._read_kept(name, inc, *kept)
            state, record = found or self._read_v2(name, inc)
        except _Unreadable as bad:
            # Nobody can hold a lock on a symlink or a directory: such an entry has no owner.
            self.states[inc] = "dead"
            self.dead += 1
            self._bad(name, inc, "dead", str(bad), 2)
            return
        self.states[inc] = state
        if state == "live":
            self.live += 1
        else:
            self.dead += 1
        # Liveness beats the archive: an owner holding its shard's lock was never absorbed
        # (absorbing needs that lock), whatever the archive lists.
        if state == "dead" and inc in self.archive.absorbed:
            self.reports.append(ShardReport(name, inc, "absorbed", "absorbed", format=2))
            return
        if isinstance(record, BadFile):
            if isinstance(record, ForeignSchema):
                self.foreign.append(record.fingerprint)
            self._bad(name, inc, state, str(record), 2)
            return
        self._add(name, inc, state, record)

    def _count_v1(self, inc: str) -> None:
        name = v1_names(inc)[0]
        # Liveness beats the archive here too: absorbing needs the owner's lock to be free.
        state: _State = self.states[inc]
        if state == "dead" and inc in self.archive.absorbed:
            state = "absorbed"
        if state == "live":
            self.live += 1
        else:
            self.dead += 1
        if state == "absorbed":
            # Already in the archive's totals; a crash kept the file. Never count it again.
            self.reports.append(ShardReport(name, inc, "absorbed", "absorbed", format=1))
            return
        try:
            data = self._read_bounded(name, MAX_SHARD_BYTES)
        except FileNotFoundError:
            # Only another process breaking the protocol removes a shard under our lock.
            self._bad(name, inc, state, "vanished while being read", 1)
            return
        except BadFile as bad:
            self._bad(name, inc, state, str(bad), 1)
            return
        try:
            record = decode_v1(data, self.schema, inc)
        except BadFile as bad:
            self._bad(name, inc, state, str(bad), 1)
            return
        self._add(name, inc, state, record)

    def _add(self, name: str, inc: str, state: _State, record: ShardRecord) -> None:
        # Summed once all shards are read (see _settle): one pass over columns in C instead of
        # one Python addition per cell per shard.
        self.counted.append((len(self.reports), name, inc, state, record))
        self.reports.append(
            ShardReport(  # positional: one is built per shard per scrape
                name,
                inc,
                state,
                "counted",
                record.pid,
                record.host,
                record.saved_at,
                record.generation,
                record.counts,
                None,
                record.format,
            )
        )

    def _settle(self) -> None:
        """Sum the counted shards into the totals, by the documented rule for the 64-bit limit.

        The common case sums every column at once. No real counter ever nears ``MAX_COUNT``
        (2**63-1 increments), so a total past it means a hostile or corrupt file, and the rule
        blames the one that cannot be real:

        * shards whose own counts together pass the limit in a column: the shards with the
          largest counts in that column are left out (quarantined if dead, skipped if live)
          until the rest fits, so the absurd shard goes, not the ones read after it;
        * an archive whose totals plus the shards' pass the limit: the archive is the
          suspicious party (shards are checked one by one, it is not): the total saturates at
          ``MAX_COUNT``, stays there, and every run logs it. No shard is blamed, and
          compaction writes the saturated total, which every later run reads back.
        """
        counted, self.counted = self.counted, []
        rows = [row[4].counts for row in counted]
        width = len(self.totals)
        sums = list(map(sum, zip(*rows, strict=True))) if rows else [0] * width
        if max(sums, default=0) > MAX_COUNT:
            dropped: set[int] = set()
            for column in range(width):
                # Largest count in this column first; ties by file name (deterministic).
                order = sorted((-row[column], counted[i][1], i) for i, row in enumerate(rows))
                for _, _, i in order:
                    if sums[column] <= MAX_COUNT:
                        break
                    if i not in dropped:
                        dropped.add(i)
                        sums = list(map(operator.sub, sums, rows[i]))
            problem = "its counts would push the aggregate past 2**63-1"
            for i in sorted(dropped):
                index, name, inc, state, _ = counted[i]
                self.reports[index] = self._bad_report(name, inc, state, problem, 0)
            counted = [row for i, row in enumerate(counted) if i not in dropped]
        totals = list(map(operator.add, self.totals, sums))
        if max(totals, default=0) > MAX_COUNT:
            self.saturated = True
            _log.error(
                "%s's totals push %d series past 2**63-1 (no real counter gets there: the "
                "archive is hostile or corrupt); those totals are saturated at 2**63-1",
                ARCHIVE_NAME,
                sum(1 for t in totals if t > MAX_COUNT),
            )
            totals = [min(t, MAX_COUNT) for t in totals]
        self.totals = totals
        if self.sum_totals:
            # fsum is exactly rounded, so the order of its terms cannot change the result;
            # they go in a fixed order anyway (the archive, then shards by incarnation).
            columns = zip(self.sum_totals, *(row[4].sums for row in counted), strict=True)
            self.sum_totals = [_finite_sum(column) for column in columns]
        for _, _, inc, state, record in counted:
            self.starts.append(record.start)
            if state == "dead" and self.compact:
                self.absorb[inc] = record.counts
                self.absorb_sums[inc] = record.sums

    def _bad(self, name: str, inc: str, state: _State, problem: str, fmt: int) -> None:
        self.reports.append(self._bad_report(name, inc, state, problem, fmt))

    def _bad_report(
        self, name: str, inc: str, state: _State, problem: str, fmt: int
    ) -> ShardReport:
        form = fmt or (2 if name.startswith("v2-") else 1)
        if state == "live":
            _log.warning("skipped %s (its owner is alive): %s", name, problem)
            return ShardReport(name, inc, state, "skipped", problem=problem, format=form)
        self.problems[name] = problem
        return ShardReport(name, inc, state, "quarantined", problem=problem, format=form)

    # -- reading -----------------------------------------------------------------------------

    def _read_v2(
        self, name: str, inc: str
    ) -> tuple[Literal["live", "dead"], ShardRecord | BadFile]:
        """Probe and read one v2 shard: ``(state, record or problem)``.

        One open (relative to the directory), one non-blocking lock probe and one read of the
        size a shard of our schema has: this runs once per live shard on every scrape, so the
        common case makes no other system call. A live shard's descriptor and checked header
        are kept for the next run of this process (:class:`_KeptShards`), which then probes
        and reads only the slots. Raises :class:`_Unreadable` for an entry that cannot be a
        shard at all (a symlink, a directory, a FIFO): no owner can hold its lock, so it is
        dead.
        """
        try:
            fd = os.open(name, _OPEN_RO, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Unreadable("a symlink, not a regular file") from None
            if exc.errno == errno.ENOENT:
                raise _Unreadable("vanished while being read") from None
            # Cannot tell: treat as live (only dead shards are ever changed).
            return "live", BadFile(f"cannot be read: {exc.strerror}")
        return self._read_open(fd, name, inc, self._probe(fd, name))

    def _read_open(
        self, fd: int, name: str, inc: str, state: Literal["live", "dead"]
    ) -> tuple[Literal["live", "dead"], ShardRecord | BadFile]:
        """Read a whole v2 shard through ``fd`` (probed: ``state``), which this takes over."""
        keep = False
        if state == "dead":  # the flock is ours until the run ends
            keep = True
            self.held[inc] = fd
        try:
            try:
                data = self._read_whole(fd)
            except BadFile as bad:
                return state, bad
            self.files_read += 1

            def reread(offset: int, size: int) -> bytes:
                return os.pread(fd, size, offset)

            try:
                head = decode_v2_header(data, self.layout, inc)
                record = decode_v2_slots(
                    data, 0, head, self.layout, reread=reread if state == "live" else None
                )
            except BadFile as bad:
                return state, bad
            if state == "live" and self.kept_after is not None:
                self.kept_after[name] = (fd, head)
                keep = True
            return state, record
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise _Unreadable("a directory, not a shard") from None
            if exc.errno in (errno.ESPIPE, errno.EINVAL, errno.ENXIO):
                raise _Unreadable("not a regular file, not a shard") from None
            return "live", BadFile(f"cannot be read: {exc.strerror}")
        finally:
            if not keep:
                os.close(fd)

    def _read_kept(
        self, name: str, inc: str, fd: int, head: V2Header
    ) -> tuple[Literal["live", "dead"], ShardRecord | BadFile] | None:
        """Read a shard kept open since an earlier run (see :class:`_KeptShards`): probe its
        lock, then read only its two slots.

        A dead owner's shard (the probe took its lock) is read whole, like any dead shard.
        ``None`` (the descriptor closed) when anything else is unusual: the caller then opens
        the name afresh and reads the whole file, as for a shard never seen.
        """
        if self._probe(fd, name) == "dead":
            return self._read_open(fd, name, inc, "dead")
        size = 2 * head.slot_stride

        def reread(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        try:
            data = os.pread(fd, size + 1, head.slot_offset)
            if len(data) != size:
                raise BadFile("changed size")
            record = decode_v2_slots(data, head.slot_offset, head, self.layout, reread=reread)
        except (OSError, BadFile):
            os.close(fd)
            return None
        self.files_read += 1
        if self.kept_after is not None:
            self.kept_after[name] = (fd, head)
        else:
            os.close(fd)
        return "live", record

    def _probe(self, fd: int, name: str) -> Literal["live", "dead"]:
        """Dead if we can take the lifetime lock (then it stays ours), else live. A reader's
        probe is shared (see the module documentation)."""
        try:
            return "dead" if try_flock(fd, shared=self.shared) else "live"
        except OSError as exc:
            _log.warning("cannot probe %s (treated as live): %s", name, exc.strerror)
            return "live"

    def _read_whole(self, fd: int) -> bytes:
        """The bytes of a v2 shard's descriptor; :class:`BadFile` when it is too large.

        Reads one byte more than a shard of our schema has, so a file of that size (the common
        case) needs no ``fstat``; any other size is measured before it is read.
        """
        expected = self.v2_size
        data = os.pread(fd, expected + 1, 0)
        if len(data) == expected:
            return data
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ESPIPE, "not a regular file")
        if st.st_size > MAX_SHARD_BYTES:
            raise BadFile(f"too large ({st.st_size} bytes, limit {MAX_SHARD_BYTES})")
        return os.pread(fd, st.st_size, 0) if st.st_size != len(data) else data

    def _read_bounded(self, name: str, limit: int) -> bytes:
        try:
            fd = os.open(name, _OPEN_RO, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BadFile("a symlink, not a regular file") from None
            if exc.errno == errno.ENOENT:
                raise
            raise BadFile(f"cannot be read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise BadFile(f"{kind}, not a shard")
            if st.st_size > limit:
                raise BadFile(f"too large ({st.st_size} bytes, limit {limit})")
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise BadFile(f"too large (more than {limit} bytes)")
        except OSError as exc:
            raise BadFile(f"cannot be read: {exc.strerror}") from None
        finally:
            os.close(fd)
        self.files_read += 1
        return b"".join(chunks)

    def _read_archive(self) -> Archive:
        empty = Archive(self.schema.zeros(), set())
        try:
            data = self._read_bounded(ARCHIVE_NAME, MAX_ARCHIVE_BYTES)
            return Archive.decode(data, self.schema)
        except FileNotFoundError:
            return empty
        except BadFile as bad:
            return self._broken_archive(empty, str(bad))

    def _broken_archive(self, empty: Archive, problem: str) -> Archive:
        if self.compact:
            _log.error("quarantined %s: %s; its totals are lost", ARCHIVE_NAME, problem)
        else:
            _log.error(
                "ignored %s: %s; its totals are lost (compaction will quarantine it)",
                ARCHIVE_NAME,
                problem,
            )
        empty.problem = problem
        return empty

    def _probe_v1(self, inc: str) -> Literal["live", "dead"]:
        """Whether ``inc``'s v1 owner holds its lifetime lock file. Never creates a file.

        Anything we cannot prove dead is treated as live: only dead shards are ever changed.
        """
        lock = v1_names(inc)[1]
        try:
            fd = os.open(lock, _OPEN_RO, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return "dead"  # owners create the lock before the shard: nobody owns this one
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "dead"  # owners never follow or create a symlink: no owner
            _log.warning("cannot probe %s (treated as live): %s", lock, exc.strerror)
            return "live"
        try:
            return self._probe(fd, lock)
        finally:
            os.close(fd)  # closing releases a flock we took

    def _quarantine_entries(self) -> int:
        if self.quarantine_fd < 0 and QUARANTINE_DIR not in self.names:
            return 0  # no quarantine/ was seen (and none was made)
        try:
            if self.quarantine_fd >= 0:
                return len(os.listdir(self.quarantine_fd))
            fd = os.open(QUARANTINE_DIR, _OPEN_DIR, dir_fd=self.dir_fd)
        except OSError:
            return 0  # not a directory (a planted entry: compaction replaces it), or gone
        try:
            return len(os.listdir(fd))
        finally:
            os.close(fd)

    # -- compaction --------------------------------------------------------------------------

    def _compact(
        self, to_quarantine: list[str], pending: list[str]
    ) -> tuple[CompactionReport, ArchiveReport]:
        old = self.archive
        broken_archive = old.problem is not None
        if broken_archive:
            self._move_to_quarantine(ARCHIVE_NAME)
        early = 0
        if ARCHIVE_TMP in self.problems:  # planted where step 1 writes: out of the way first
            early = int(self._move_to_quarantine(ARCHIVE_TMP))
        # Liveness beats the archive: absorbing a v2 shard takes its owner's lock, so an id
        # listed as absorbed whose shard is locked by its owner right now never was (a hostile
        # or corrupted archive). Drop the claim now, so that the shard is counted and absorbed
        # for real once its owner exits, instead of vanishing from the aggregate then.
        disproved = {
            inc
            for inc in old.absorbed
            if self.states.get(inc) == "live"
            and inc in self.entries
            and (self.entries[inc].v2 or self.entries[inc].v1)
        }
        if disproved:
            _log.warning(
                "%s lists %d live shard(s) as absorbed (impossible); dropped from it",
                ARCHIVE_NAME,
                len(disproved),
            )
        # Everything written here is something a later run reads back: totals saturate at
        # MAX_COUNT (see _settle), timestamps are finite and non-negative.
        new = Archive(
            counts=list(self._totals_absorbed(old)),
            sums=self._sums_absorbed(old),
            absorbed=(old.absorbed - disproved) | set(self.absorb),
            absorbed_total=min(old.absorbed_total + len(self.absorb), MAX_COUNT),
            quarantined_total=min(
                old.quarantined_total + len(pending) + int(broken_archive), MAX_COUNT
            ),
            quarantining=old.quarantining | set(to_quarantine),
            updated_at=_timestamp(self.clock()),
            first_start=min(self.starts, default=None),
            exists=True,
        )
        changed = bool(self.absorb or pending or broken_archive or disproved)
        changed = changed or new.quarantining != old.quarantining
        if changed or old.exists:
            # Before the archive: the schema its totals are laid out for is on disk whenever
            # they are (a crash between the two leaves a schema.json that the next run reads).
            self._record_schema()
        if changed:
            self._write_archive(new)  # step 1: totals and ids first, deletions after

        removed = self._remove_files(new, [n for n in to_quarantine if n != ARCHIVE_TMP], early)

        # Step 3: forget ids and names whose files are gone, so the archive stays small.
        present = set(os.listdir(self.dir_fd))
        kept_absorbed = {
            i for i in new.absorbed if v1_names(i)[0] in present or v2_names(i)[0] in present
        }
        kept_quarantining = {n for n in new.quarantining if n in present}
        if kept_absorbed != new.absorbed or kept_quarantining != new.quarantining:
            new.absorbed, new.quarantining = kept_absorbed, kept_quarantining
            new.updated_at = float(self.clock())
            self._write_archive(new)
            changed = True
            _faults.point("compact.pruned")
        archive_report = ArchiveReport(
            new.exists if changed else old.exists,
            new.absorbed_total,
            new.quarantined_total,
            new.updated_at if changed else old.updated_at,
            old.problem,
            self.saturated,
        )
        return removed, archive_report

    def _totals_absorbed(self, old: Archive) -> list[int]:
        """The archive's totals after absorbing this run's dead shards, saturated."""
        counts = list(old.counts)
        for absorbed in self.absorb.values():
            counts = list(map(operator.add, counts, absorbed))
        return [min(c, MAX_COUNT) for c in counts]

    def _sums_absorbed(self, old: Archive) -> list[float]:
        """The archive's histogram sums after absorbing this run's dead shards (fsum)."""
        base = old.sums or self.schema.float_zeros()
        if not base:
            return []
        rows = [self.absorb_sums[inc] for inc in sorted(self.absorb_sums)]
        return [_finite_sum(column) for column in zip(base, *rows, strict=True)]

    def _remove_files(
        self, new: Archive, to_quarantine: list[str], quarantined: int
    ) -> CompactionReport:
        """Step 2: everything the new archive made redundant, and what is broken."""
        dead = {inc for inc, s in self.states.items() if s == "dead"}
        for name in to_quarantine:
            if self._move_to_quarantine(name):
                quarantined += 1
                _faults.point("compact.quarantined")
        gone = {p[0] for n in to_quarantine if (p := parse_name(n))}
        removed_shards = removed_tmp = removed_locks = 0
        for inc, entry in sorted(self.entries.items()):
            if inc not in new.absorbed:
                continue
            if entry.v2 and inc in self.held and self._unlink_held(inc):
                removed_shards += 1
                _faults.point("compact.shard_deleted")
            if entry.v1 and inc in dead and self._unlink(v1_names(inc)[0]):
                removed_shards += 1
                gone.add(inc)
                _faults.point("compact.shard_deleted")
        for inc, entry in sorted(self.entries.items()):
            if entry.v1_tmp and inc in dead and self._unlink(v1_names(inc)[2]):
                removed_tmp += 1
                _faults.point("compact.tmp_deleted")
            if entry.v2_creating and self._unlink_if_free(v2_names(inc)[1]):
                removed_tmp += 1
                _faults.point("compact.tmp_deleted")
        for inc, entry in sorted(self.entries.items()):
            no_shard = not entry.v1 or inc in gone
            if (
                entry.v1_lock
                and inc in dead
                and no_shard
                and self._unlink_if_free(v1_names(inc)[1])
            ):
                removed_locks += 1
                _faults.point("compact.lock_deleted")
        if ARCHIVE_TMP in self.names and ARCHIVE_TMP not in self.problems:
            self._unlink(ARCHIVE_TMP)  # a crashed compaction's; only lock holders write it
        with contextlib.suppress(OSError):
            fsync_directory(self.dir_fd)
        return CompactionReport(
            absorbed=len(self.absorb),
            quarantined=quarantined,
            removed_shards=removed_shards,
            removed_temp_files=removed_tmp,
            removed_lock_files=removed_locks,
        )

    def _record_schema(self) -> None:
        """Write ``schema.json`` (the schema and namespace of this run) unless it already says
        so. Advisory: a failure costs one log line, never the compaction."""
        data = encode_schema_file(self.schema, self.namespace)
        try:
            if _read_file(self.dir_fd, SCHEMA_NAME, MAX_SCHEMA_FILE_BYTES) == data:
                return
        except (BadFile, OSError):
            pass  # missing, or something planted under its name: replaced below
        try:
            write_file_atomically(
                SCHEMA_TMP,
                SCHEMA_NAME,
                data,
                sync=True,
                mode=0o644,
                step_prefix="schema",
                dir_fd=self.dir_fd,
            )
        except OSError as exc:
            _log.warning("cannot write %s: %s", self._p(SCHEMA_NAME), exc.strerror or exc)

    def _write_archive(self, archive: Archive) -> None:
        try:
            write_file_atomically(
                ARCHIVE_TMP,
                ARCHIVE_NAME,
                archive.encode(self.schema),
                sync=True,
                mode=0o644,
                step_prefix="archive",
                dir_fd=self.dir_fd,
            )
        except OSError as exc:
            path = self._p(ARCHIVE_NAME)
            raise ShardWriteError(path, f"cannot write the archive: {exc}") from exc

    def _unlink(self, name: str) -> bool:
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            _log.warning("cannot remove %s (will retry next run): %s", name, exc.strerror)
            return False
        return True

    def _unlink_held(self, inc: str) -> bool:
        """Delete an absorbed dead v2 shard whose flock we hold, if its name is still it."""
        name = v2_names(inc)[0]
        fd = self.held[inc]
        try:
            here = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            ours = os.fstat(fd)
        except OSError:
            return False
        if (here.st_dev, here.st_ino) != (ours.st_dev, ours.st_ino):
            return False  # replaced since we read it: leave it for the next run
        return self._unlink(name)

    def _unlink_if_free(self, name: str) -> bool:
        """Delete a lock or temp file while holding its flock (see the module doc)."""
        try:
            fd = os.open(name, _OPEN_RO, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._unlink(name)  # a symlink: no owner can hold it
            _log.warning("cannot remove %s: %s", name, exc.strerror)
            return False
        try:
            # Held by someone (a live owner), or not lockable at all: leave it.
            return try_flock(fd) and self._unlink(name)
        except OSError:
            return False
        finally:
            os.close(fd)

    def _move_to_quarantine(self, name: str) -> bool:
        qfd = self._quarantine_dir()
        if qfd < 0:
            return False
        try:
            # Both ends are directory descriptors: a quarantine/ swapped for a symlink after
            # we opened it cannot send the file anywhere else.
            os.rename(name, f"{name}.{time.time_ns()}", src_dir_fd=self.dir_fd, dst_dir_fd=qfd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            _log.error("cannot quarantine %s: %s", name, exc.strerror)
            return False
        self._trim_quarantine(qfd)
        return True

    def _quarantine_dir(self) -> int:
        """A descriptor of ``quarantine/`` (made if missing), or -1 after one log line.

        A non-directory under that name (a symlink, file, FIFO) was planted: it is removed,
        never followed, and a real directory made in its place.
        """
        if self.quarantine_fd >= 0:
            return self.quarantine_fd
        for _ in range(2):
            try:
                os.mkdir(QUARANTINE_DIR, 0o700, dir_fd=self.dir_fd)
            except FileExistsError:
                pass
            except OSError as exc:
                _log.error("cannot create %s: %s", self._p(QUARANTINE_DIR), exc.strerror)
                return -1
            try:
                self.quarantine_fd = os.open(QUARANTINE_DIR, _OPEN_DIR, dir_fd=self.dir_fd)
                return self.quarantine_fd
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    _log.error("cannot open %s: %s", self._p(QUARANTINE_DIR), exc.strerror)
                    return -1
            _log.error(
                "%s is not a directory (planted?): removed, a real one is made",
                self._p(QUARANTINE_DIR),
            )
            if not self._unlink(QUARANTINE_DIR):
                return -1
        return -1

    @staticmethod
    def _trim_quarantine(qfd: int) -> None:
        try:
            names = os.listdir(qfd)
        except OSError:
            return
        if len(names) <= QUARANTINE_KEEP:
            return

        def age(n: str) -> tuple[int, str]:
            suffix = n.rsplit(".", 1)[-1]
            return (int(suffix) if suffix.isdigit() else 0, n)

        for old in sorted(names, key=age)[: len(names) - QUARANTINE_KEEP]:
            try:
                if stat.S_ISDIR(os.stat(old, dir_fd=qfd, follow_symlinks=False).st_mode):
                    shutil.rmtree(old, dir_fd=qfd)  # fd-based: never follows a link inside
                else:
                    os.unlink(old, dir_fd=qfd)
            except OSError as exc:
                _log.warning("cannot trim quarantine entry %s: %s", old, exc.strerror)


class _KeptShards:
    """Descriptors of live v2 shards that a process keeps open between its runs.

    A process that serves scrapes aggregates the same directory again and again, and most of
    what it reads are the same live shards. Keeping each one's descriptor and checked header
    saves an open, a close and the header on every later run: only the lock probe and the
    slots remain. Why this is safe:

    * only *live* shards are kept, and a kept descriptor never holds a lock: the owner's flock
      is untouched, and when the owner dies the next probe takes the lock through it and the
      shard is read whole and handled like any dead shard (its descriptor then closes at the
      end of that run);
    * a name no longer listed (absorbed, removed) closes its descriptor at the end of the run;
      a v2 name is never reused by another incarnation, so a kept descriptor is the file the
      owner writes through (a file renamed over it by hand is not seen until the owner dies);
    * entries are per directory inode and schema layout, taken out for the length of a run
      (concurrent readers of one directory, which shared locks allow, each get a set or none:
      a run that finds none opens the shards afresh, and the set checked in last is kept),
      at most :attr:`LIMIT`
      descriptors in all (the directories aggregated least recently give theirs up first),
      and a forked child closes its copies.

    The cost: up to ``LIMIT`` descriptors held by a long-lived reader, and the disk space of a
    removed shard stays in use until the next run of the process that kept it.
    """

    LIMIT = 512

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By directory, least recently checked in first.
        self._entries: OrderedDict[tuple[int, int, Layout], dict[str, tuple[int, V2Header]]]
        self._entries = OrderedDict()

    def check_out(self, key: tuple[int, int, Layout]) -> dict[str, tuple[int, V2Header]]:
        with self._lock:
            return self._entries.pop(key, {})

    def check_in(self, key: tuple[int, int, Layout], kept: dict[str, tuple[int, V2Header]]) -> None:
        """Keep ``kept`` for the next run of ``key``; beyond :attr:`LIMIT`, the directories
        aggregated least recently lose theirs first."""
        extra: list[int] = []
        with self._lock:
            if key in self._entries:  # a concurrent run of the same directory: keep one set
                extra.extend(fd for fd, _ in self._entries.pop(key).values())
            if len(kept) > self.LIMIT:
                for name in sorted(kept)[self.LIMIT :]:
                    extra.append(kept.pop(name)[0])
            total = len(kept) + sum(len(v) for v in self._entries.values())
            while total > self.LIMIT:
                _, oldest = self._entries.popitem(last=False)
                total -= len(oldest)
                extra.extend(fd for fd, _ in oldest.values())
            if kept:
                self._entries[key] = kept  # the most recent, last
        for fd in extra:
            with contextlib.suppress(OSError):
                os.close(fd)

    def reset_in_child(self) -> None:
        # The child's copies share the parent's open file descriptions; none holds a lock, so
        # closing them changes nothing for the parent.
        self._lock = threading.Lock()
        entries, self._entries = self._entries, OrderedDict()
        for kept in entries.values():
            for fd, _ in kept.values():
                with contextlib.suppress(OSError):
                    os.close(fd)


_KEPT = _KeptShards()
# Runs in progress in this process (in other threads at a fork).
_ACTIVE: weakref.WeakSet[_Run] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A fork while another thread aggregates copies that run's descriptors, among them the
    # flocks it holds on dead shards: the child's copies would keep those locks (and the shards
    # "live" for every other aggregator) until the child exits. The run does not go on in the
    # child, so drop its copies; closing a copy never releases the parent's lock.
    for run in list(_ACTIVE):
        fds = [*run.held.values(), *(fd for fd, _ in run.kept_before.values())]
        fds.extend(fd for fd, _ in (run.kept_after or {}).values())
        fds.extend(fd for fd in (run.quarantine_fd, run.dir_fd) if fd >= 0)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # never unlocks: the parent's copy keeps its flock
        run.held, run.kept_before, run.kept_after = {}, {}, None
        run.quarantine_fd = run.dir_fd = -1
    _ACTIVE.clear()
    _KEPT.reset_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _finite_sum(column: Iterable[float]) -> float:
    """``math.fsum`` of non-negative finite sums, held at the largest float if it would
    overflow (no real histogram gets there: the files are hostile; every reader refuses an
    infinite sum, so an archive must never hold one)."""
    try:
        total = math.fsum(column)
    except OverflowError:
        return sys.float_info.max
    return total if total < math.inf else sys.float_info.max


def _timestamp(value: float) -> float | None:
    ts = float(value)
    return ts if math.isfinite(ts) and ts >= 0 else None


class _Unreadable(Exception):
    """An entry under a shard's name that cannot be a shard at all (no owner can lock it)."""
