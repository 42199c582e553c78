"""The aggregator: merge a shard directory into one exact aggregate, and compact it.

Directory layout (see :mod:`gatemetrics.shards` for the shard side)::

    DIR/shard-<incarnation>.json   one per process incarnation (cumulative counts)
    DIR/shard-<incarnation>.lock   its owner's lifetime lock
    DIR/shard-<incarnation>.tmp    its owner's temp file while saving (or a dead writer's orphan)
    DIR/archive.json               totals of absorbed (dead) incarnations; written atomically
    DIR/aggregate.lock             the directory lock: one aggregation or compaction at a time
    DIR/quarantine/                broken or hostile files moved aside (bounded)

Every aggregation takes the directory lock (with a timeout), so aggregations and compactions
never interleave; shard owners never take it and are never blocked by it. Liveness: a shard whose
lock file the aggregator can ``flock`` has no living owner. The probe opens the lock file
read-only and never creates one (a lock file appears before its shard, so a shard without one
has no owner), so reading needs no write permission except for the directory lock.

Compaction (crash-safe; a kill at any step leaves a directory whose next aggregate is exact):

1. The new archive is written first: old totals plus the dead shards' counts, together with the
   ids just absorbed (and the names of files about to be quarantined, with the new quarantine
   count). A shard whose id the archive lists is never counted again, so a crash between this
   write and the deletions cannot double count.
2. Quarantined files are moved, absorbed shards, dead writers' orphan temp files and dead lock
   files are deleted. A lock file is deleted only while holding its ``flock``, so an owner that
   opened it just before cannot believe it holds a lock on a file that is gone (filelock checks
   that the inode it locked is still linked, and our shards then take a fresh incarnation).
3. The archive is written once more without the ids and names whose files are now gone, so it
   does not grow with history.

Broken or hostile files (truncated, not JSON or UTF-8, too large, wrongly typed, negative, NaN,
out of schema, label injection, a symlink, a directory or FIFO named like a shard, unreadable)
cost only themselves: when no live owner can write them any more they are quarantined (moved
aside) and counted in ``<namespace>_quarantined_shards_total``; a live owner's broken file is
skipped (its next save replaces it). Each costs one log line per run. Nothing outside the schema
ever reaches the result. A well-formed archive that does not fit the schema is *not* quarantined:
that means the aggregator was given the wrong schema, and dropping the history would be worse
than stopping (:class:`~gatemetrics.SchemaError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gatemetrics import _faults
from gatemetrics._flock import exclusive_flock
from gatemetrics.errors import SchemaError, ShardWriteError
from gatemetrics.exposition import render_prometheus
from gatemetrics.schema import MAX_COUNT, Family, Schema, check_generation, check_timestamp
from gatemetrics.shards import (
    SHARD_FORMAT,
    SHARD_VERSION,
    Durability,
    fsync_directory,
    parse_shard_name,
    shard_file_names,
    valid_incarnation,
    write_file_atomically,
)
from gatemetrics.store import Snapshot

__all__ = [
    "ARCHIVE_NAME",
    "COMPACT_STEPS",
    "LOCK_NAME",
    "MAX_SHARD_BYTES",
    "QUARANTINE_DIR",
    "Aggregate",
    "ArchiveReport",
    "CompactionReport",
    "ShardReport",
    "aggregate_dir",
    "pipeline_schema",
]

ARCHIVE_NAME = "archive.json"
ARCHIVE_TMP = "archive.json.tmp"
ARCHIVE_FORMAT = "gatemetrics-archive"
ARCHIVE_VERSION = 1
LOCK_NAME = "aggregate.lock"
QUARANTINE_DIR = "quarantine"
#: A shard is a few hundred bytes; anything beyond this is hostile and never read into memory.
MAX_SHARD_BYTES = 1 << 20
# The archive lists absorbed ids only between two writes of one compaction; a crash can leave
# one batch there, so allow for a big batch.
MAX_ARCHIVE_BYTES = 256 << 20
#: Entries kept in the quarantine directory; the oldest go first beyond this.
QUARANTINE_KEEP = 200

PIPELINE_QUARANTINED_KEY = "pipeline_quarantined_shards"
PIPELINE_SHARDS_KEY = "pipeline_shards"

#: The named crash points of a compaction, in order (see :mod:`gatemetrics._faults`).
COMPACT_STEPS = (
    "compact.locked",  # directory lock held, nothing read yet
    "compact.scanned",  # archive and shards read, nothing written
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

State = Literal["live", "dead", "absorbed"]
_CONTENTION = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
_ARCHIVE_KEYS = frozenset(
    {
        "format",
        "version",
        "counts",
        "absorbed",
        "absorbed_total",
        "quarantined_total",
        "quarantining",
        "updated_at",
        "first_start",
    }
)
_SHARD_KEYS = frozenset(
    {
        "format",
        "version",
        "incarnation",
        "pid",
        "host",
        "started_at",
        "generation",
        "saved_at",
        "counts",
    }
)


def pipeline_schema(schema: Schema, namespace: str) -> Schema:
    """``schema`` followed by the two pipeline families of ``namespace`` (cached per schema).

    ``<namespace>_quarantined_shards_total`` (counter) and ``<namespace>_shards{state}`` (gauge,
    ``live``/``dead``).
    """
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        # No leading underscore or colon: "__" is Prometheus's, colons are for recording rules.
        raise SchemaError("namespace", f"must match [a-zA-Z][a-zA-Z0-9_]*, not {namespace!r}")
    key = f"pipeline:{namespace}"
    cached = schema._cache.get(key)
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
        schema._cache[key] = cached
    result: Schema = cached
    return result


@dataclass(frozen=True, slots=True)
class ShardReport:
    """One shard file as an aggregation found it."""

    name: str
    incarnation: str | None
    state: State | None  # None: no owner can be named (a hostile name)
    action: Literal["counted", "absorbed", "quarantined", "skipped"]
    pid: int | None = None
    host: str | None = None
    saved_at: float | None = None
    generation: int | None = None
    counts: tuple[int, ...] | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    """The archive as an aggregation found (and, when compacting, left) it."""

    exists: bool
    absorbed_total: int = 0
    quarantined_total: int = 0
    updated_at: float | None = None
    problem: str | None = None


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

    def snapshot(self) -> Snapshot:
        """The merged counts over the caller's schema (no pipeline families)."""
        return Snapshot(self.schema, self.counts, 0, self.start_timestamp)

    def pipeline_snapshot(self) -> Snapshot:
        """The merged counts followed by the pipeline families."""
        full = pipeline_schema(self.schema, self.namespace)
        counts = (*self.counts, self.quarantined_total, self.live, self.dead)
        return Snapshot(full, counts, 0, self.start_timestamp)

    def render_prometheus(self) -> str:
        """The deterministic text exposition: the schema's families, then the pipeline's."""
        return render_prometheus(self.pipeline_snapshot())

    def render_json(self) -> str:
        """The dictionary layout of all families as JSON with sorted keys (no metadata)."""
        snap = self.pipeline_snapshot()
        return orjson.dumps(
            snap.schema.counts_to_dict(snap.counts), option=orjson.OPT_SORT_KEYS
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
    path = os.path.abspath(os.fspath(directory))
    pipeline_schema(schema, namespace)  # a bad namespace fails before any I/O
    if not math.isfinite(lock_timeout) or lock_timeout < 0:
        raise ValueError(f"lock_timeout must be a finite number >= 0, not {lock_timeout!r}")
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    # A bare flock, not filelock: this runs on every aggregation and every GET /metrics, and
    # filelock's acquire+release costs about 0.3 ms of the run's fixed cost (see _flock).
    with exclusive_flock(os.path.join(path, LOCK_NAME), timeout=lock_timeout):
        return _Run(path, schema, namespace, compact=compact, clock=clock).run()


# -- one run ---------------------------------------------------------------------------------


class _Bad(Exception):
    """A file that cannot be counted; the message says why, for the log line."""


@dataclass
class _Archive:
    counts: list[int]
    absorbed: set[str]
    absorbed_total: int = 0
    quarantined_total: int = 0
    quarantining: set[str] = field(default_factory=set)
    updated_at: float | None = None
    first_start: float | None = None
    exists: bool = False
    problem: str | None = None

    def to_json(self, schema: Schema) -> bytes:
        doc: dict[str, Any] = {
            "format": ARCHIVE_FORMAT,
            "version": ARCHIVE_VERSION,
            "counts": schema.counts_to_dict(self.counts),
            "absorbed": sorted(self.absorbed),
            "absorbed_total": self.absorbed_total,
            "quarantined_total": self.quarantined_total,
            "quarantining": sorted(self.quarantining),
            "updated_at": self.updated_at,
            "first_start": self.first_start,
        }
        return orjson.dumps(doc)


@dataclass
class _Entry:
    json: bool = False
    tmp: bool = False
    lock: bool = False


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
    ) -> None:
        self.dir = directory
        self.schema = schema
        self.namespace = namespace
        self.compact = compact
        self.clock = clock
        self.files_read = 0
        self.names: list[str] = []
        self.entries: dict[str, _Entry] = {}
        self.states: dict[str, Literal["live", "dead"]] = {}
        self.archive = _Archive(schema.zeros(), set())
        self.totals: list[int] = schema.zeros()
        self.starts: list[float] = []
        self.reports: list[ShardReport] = []
        self.absorb: dict[str, tuple[int, ...]] = {}
        self.problems: dict[str, str] = {}  # file name -> why it is to be quarantined
        self.live = self.dead = 0

    def _p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def run(self) -> Aggregate:
        if self.compact:
            _faults.point("compact.locked")
        self.names = sorted(os.listdir(self.dir))
        for name in self.names:
            parsed = parse_shard_name(name)
            if parsed is None:
                if name.startswith("shard-"):
                    self.problems[name] = "not a shard file name"
                continue
            inc, kind = parsed
            setattr(self.entries.setdefault(inc, _Entry()), kind, True)
        self.archive = self._read_archive()
        self.totals = list(self.archive.counts)
        if self.archive.first_start is not None:
            self.starts.append(self.archive.first_start)
        self.states = {inc: self._probe(inc) for inc in self.entries}
        for inc in sorted(i for i, e in self.entries.items() if e.json):
            self._count_shard(inc)
        for name in self.names:
            if self.problems.get(name) == "not a shard file name":
                self.reports.append(
                    ShardReport(name, None, None, "quarantined", problem=self.problems[name])
                )

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
        quarantined_total = self.archive.quarantined_total + len(pending) + broken

        compaction: CompactionReport | None = None
        report_archive = ArchiveReport(
            self.archive.exists,
            self.archive.absorbed_total,
            self.archive.quarantined_total,
            self.archive.updated_at,
            self.archive.problem,
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
        )

    def _count_shard(self, inc: str) -> None:
        name = shard_file_names(inc)[0]
        state: State = "absorbed" if inc in self.archive.absorbed else self.states[inc]
        if state == "live":
            self.live += 1
        else:
            self.dead += 1
        if state == "absorbed":
            # Already in the archive's totals; a crash kept the file. Never count it again.
            self.reports.append(ShardReport(name, inc, "absorbed", "absorbed"))
            return
        try:
            counts, meta = self._read_shard(name, inc)
            summed = [t + c for t, c in zip(self.totals, counts, strict=True)]
            if max(summed, default=0) > MAX_COUNT:
                raise _Bad("its counts would push the aggregate past 2**63-1")
        except _Bad as bad:
            if state == "dead":
                self.problems[name] = str(bad)
                self.reports.append(ShardReport(name, inc, state, "quarantined", problem=str(bad)))
            else:
                _log.warning("skipped %s (its owner is alive and rewrites it): %s", name, bad)
                self.reports.append(ShardReport(name, inc, state, "skipped", problem=str(bad)))
            return
        self.totals = summed
        self.starts.append(meta["start"])
        if state == "dead" and self.compact:
            self.absorb[inc] = counts
        self.reports.append(
            ShardReport(
                name,
                inc,
                state,
                "counted",
                pid=meta["pid"],
                host=meta["host"],
                saved_at=meta["saved_at"],
                generation=meta["generation"],
                counts=counts,
            )
        )

    # -- reading -----------------------------------------------------------------------------

    def _read_bounded(self, name: str, limit: int) -> bytes:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self._p(name), flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Bad("a symlink, not a regular file") from None
            if exc.errno == errno.ENOENT:
                raise
            raise _Bad(f"cannot be read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise _Bad(f"{kind}, not a shard")
            if st.st_size > limit:
                raise _Bad(f"too large ({st.st_size} bytes, limit {limit})")
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise _Bad(f"too large (more than {limit} bytes)")
        except OSError as exc:
            raise _Bad(f"cannot be read: {exc.strerror}") from None
        finally:
            os.close(fd)
        self.files_read += 1
        return b"".join(chunks)

    def _read_shard(self, name: str, inc: str) -> tuple[tuple[int, ...], dict[str, Any]]:
        try:
            data = self._read_bounded(name, MAX_SHARD_BYTES)
        except FileNotFoundError:
            # Only another process breaking the protocol removes a shard under our lock.
            raise _Bad("vanished while being read") from None
        if not data:
            raise _Bad("empty (0 bytes)")
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _Bad(f"not valid JSON or not UTF-8 ({exc})") from None
        if not isinstance(doc, dict):
            raise _Bad(f"a JSON {type(doc).__name__}, not an object")
        if set(doc) != _SHARD_KEYS:
            missing = sorted(_SHARD_KEYS - set(doc))
            extra = sorted(set(doc) - _SHARD_KEYS)
            raise _Bad(f"wrong fields (missing {missing}, unexpected {extra[:5]})")
        if doc["format"] != SHARD_FORMAT or doc["version"] != SHARD_VERSION:
            raise _Bad(f"unknown format {doc['format']!r} version {doc['version']!r}")
        if doc["incarnation"] != inc:
            raise _Bad("incarnation inside does not match the file name (a copied shard?)")
        pid, host = doc["pid"], doc["host"]
        if type(pid) is not int or not 0 < pid < 2**32:
            raise _Bad(f"pid must be a positive int, got {pid!r}"[:200])
        if not isinstance(host, str) or len(host) > 255:
            raise _Bad("host must be a string of at most 255 characters")
        try:
            check_timestamp(doc["started_at"])
            saved_at = check_timestamp(doc["saved_at"])
            generation = check_generation(doc["generation"])
            raw = doc["counts"]
            counts = self.schema.parse_counts(raw)
            if not isinstance(raw, dict) or "store_generation" not in raw:
                raise SchemaError("counts.store_generation", "missing")
            check_generation(raw["store_generation"])
            start = check_timestamp(raw.get("store_start_timestamp"))
        except SchemaError as exc:
            raise _Bad(f"invalid: {exc}"[:300]) from None
        meta = {
            "pid": pid,
            "host": host,
            "saved_at": saved_at,
            "generation": generation,
            "start": start,
        }
        return tuple(counts), meta

    def _read_archive(self) -> _Archive:
        empty = _Archive(self.schema.zeros(), set())
        try:
            data = self._read_bounded(ARCHIVE_NAME, MAX_ARCHIVE_BYTES)
        except FileNotFoundError:
            return empty
        except _Bad as bad:
            return self._broken_archive(empty, str(bad))
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return self._broken_archive(empty, f"not valid JSON or not UTF-8 ({exc})")
        if (
            not isinstance(doc, dict)
            or set(doc) != _ARCHIVE_KEYS
            or doc["format"] != ARCHIVE_FORMAT
            or doc["version"] != ARCHIVE_VERSION
        ):
            return self._broken_archive(empty, "not a gatemetrics archive (wrong fields)")
        try:
            counts = self.schema.parse_counts(doc["counts"])
            absorbed = doc["absorbed"]
            quarantining = doc["quarantining"]
            if not isinstance(absorbed, list) or not all(valid_incarnation(a) for a in absorbed):
                raise SchemaError("absorbed", "must be a list of incarnation ids")
            if not isinstance(quarantining, list) or not all(
                isinstance(q, str) and q.startswith("shard-") and "/" not in q for q in quarantining
            ):
                raise SchemaError("quarantining", "must be a list of shard file names")
            absorbed_total = check_generation(doc["absorbed_total"])
            quarantined_total = check_generation(doc["quarantined_total"])
            updated_at = None if doc["updated_at"] is None else check_timestamp(doc["updated_at"])
            first = None if doc["first_start"] is None else check_timestamp(doc["first_start"])
        except SchemaError as exc:
            # Well-formed but not ours: most likely the wrong schema was passed. Quarantining
            # would throw the history away, so stop and say so.
            raise SchemaError(
                f"{ARCHIVE_NAME}.{exc.field}",
                f"{exc.problem} (is this directory written with another schema?)",
            ) from None
        return _Archive(
            counts,
            set(absorbed),
            absorbed_total,
            quarantined_total,
            set(quarantining),
            updated_at,
            first,
            exists=True,
        )

    def _broken_archive(self, empty: _Archive, problem: str) -> _Archive:
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

    def _probe(self, inc: str) -> Literal["live", "dead"]:
        """Whether ``inc``'s owner holds its lifetime lock. Never creates a file.

        Anything we cannot prove dead is treated as live: only dead shards are ever changed.
        """
        lock = self._p(shard_file_names(inc)[1])
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return "dead"  # owners create the lock before the shard: nobody owns this one
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "dead"  # filelock never follows or creates a symlink: no owner
            _log.warning("cannot probe %s (treated as live): %s", lock, exc.strerror)
            return "live"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _CONTENTION:
                _log.warning("cannot probe %s (treated as live): %s", lock, exc.strerror)
            return "live"
        finally:
            os.close(fd)  # closing releases a flock we took
        return "dead"

    def _quarantine_entries(self) -> int:
        try:
            return len(os.listdir(self._p(QUARANTINE_DIR)))
        except OSError:
            return 0

    # -- compaction --------------------------------------------------------------------------

    def _compact(
        self, to_quarantine: list[str], pending: list[str]
    ) -> tuple[CompactionReport, ArchiveReport]:
        old = self.archive
        broken_archive = old.problem is not None
        if broken_archive:
            self._move_to_quarantine(ARCHIVE_NAME)
        new = _Archive(
            counts=list(old.counts),
            absorbed=old.absorbed | set(self.absorb),
            absorbed_total=old.absorbed_total + len(self.absorb),
            quarantined_total=old.quarantined_total + len(pending) + int(broken_archive),
            quarantining=old.quarantining | set(to_quarantine),
            updated_at=float(self.clock()),
            first_start=min(self.starts, default=None),
            exists=True,
        )
        for counts in self.absorb.values():
            for i, c in enumerate(counts):
                new.counts[i] += c
        changed = bool(self.absorb or pending or broken_archive)
        changed = changed or new.quarantining != old.quarantining
        if changed:
            self._write_archive(new)  # step 1: totals and ids first, deletions after

        removed = self._remove_files(new, to_quarantine)

        # Step 3: forget ids and names whose files are gone, so the archive stays small.
        present = set(os.listdir(self.dir))
        kept_absorbed = {i for i in new.absorbed if shard_file_names(i)[0] in present}
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
        )
        return removed, archive_report

    def _remove_files(self, new: _Archive, to_quarantine: list[str]) -> CompactionReport:
        """Step 2: everything the new archive made redundant, and what is broken."""
        dead = {inc for inc, s in self.states.items() if s == "dead"}
        quarantined = 0
        for name in to_quarantine:
            if self._move_to_quarantine(name):
                quarantined += 1
                _faults.point("compact.quarantined")
        gone = {p[0] for n in to_quarantine if (p := parse_shard_name(n))}
        removed_shards = removed_tmp = removed_locks = 0
        for inc, entry in sorted(self.entries.items()):
            if entry.json and inc in new.absorbed and self._unlink(shard_file_names(inc)[0]):
                removed_shards += 1
                gone.add(inc)
                _faults.point("compact.shard_deleted")
        for inc, entry in sorted(self.entries.items()):
            if entry.tmp and inc in dead and self._unlink(shard_file_names(inc)[2]):
                removed_tmp += 1
                _faults.point("compact.tmp_deleted")
        for inc, entry in sorted(self.entries.items()):
            no_shard = not entry.json or inc in gone
            if entry.lock and inc in dead and no_shard and self._unlink_free_lock(inc):
                removed_locks += 1
                _faults.point("compact.lock_deleted")
        if ARCHIVE_TMP in self.names:
            self._unlink(ARCHIVE_TMP)  # a crashed compaction's; only lock holders write it
        with contextlib.suppress(OSError):
            fsync_directory(self.dir)
        return CompactionReport(
            absorbed=len(self.absorb),
            quarantined=quarantined,
            removed_shards=removed_shards,
            removed_temp_files=removed_tmp,
            removed_lock_files=removed_locks,
        )

    def _write_archive(self, archive: _Archive) -> None:
        try:
            write_file_atomically(
                self._p(ARCHIVE_TMP),
                self._p(ARCHIVE_NAME),
                archive.to_json(self.schema),
                durability=Durability.FULL,
                mode=0o644,
                step_prefix="archive",
            )
        except OSError as exc:
            path = self._p(ARCHIVE_NAME)
            raise ShardWriteError(path, f"cannot write the archive: {exc}") from exc

    def _unlink(self, name: str) -> bool:
        try:
            os.unlink(self._p(name))
        except FileNotFoundError:
            return False
        except OSError as exc:
            _log.warning("cannot remove %s (will retry next run): %s", name, exc.strerror)
            return False
        return True

    def _unlink_free_lock(self, inc: str) -> bool:
        """Delete a dead incarnation's lock file while holding its flock (see module doc)."""
        name = shard_file_names(inc)[1]
        try:
            fd = os.open(self._p(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._unlink(name)  # a symlink: no owner can hold it
            _log.warning("cannot remove %s: %s", name, exc.strerror)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # someone holds it after all: leave it
        else:
            return self._unlink(name)
        finally:
            os.close(fd)

    def _move_to_quarantine(self, name: str) -> bool:
        qdir = self._p(QUARANTINE_DIR)
        try:
            os.mkdir(qdir, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            _log.error("cannot create %s: %s", qdir, exc.strerror)
            return False
        try:
            if not stat.S_ISDIR(os.lstat(qdir).st_mode):
                _log.error("%s is not a directory; cannot quarantine %s", qdir, name)
                return False
            os.rename(self._p(name), os.path.join(qdir, f"{name}.{time.time_ns()}"))
        except FileNotFoundError:
            return False
        except OSError as exc:
            _log.error("cannot quarantine %s: %s", name, exc.strerror)
            return False
        self._trim_quarantine(qdir)
        return True

    @staticmethod
    def _trim_quarantine(qdir: str) -> None:
        try:
            names = os.listdir(qdir)
        except OSError:
            return
        if len(names) <= QUARANTINE_KEEP:
            return

        def age(n: str) -> tuple[int, str]:
            suffix = n.rsplit(".", 1)[-1]
            return (int(suffix) if suffix.isdigit() else 0, n)

        for old in sorted(names, key=age)[: len(names) - QUARANTINE_KEEP]:
            victim = os.path.join(qdir, old)
            try:
                if stat.S_ISDIR(os.lstat(victim).st_mode):
                    shutil.rmtree(victim)
                else:
                    os.unlink(victim)
            except OSError as exc:
                _log.warning("cannot trim quarantine entry %s: %s", old, exc.strerror)
