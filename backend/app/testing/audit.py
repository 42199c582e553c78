"""Audit logs for release-gate decisions: the protocol, an in-memory log and a durable JSONL log.

The gate writes exactly one :class:`AuditEntry` per check and treats any exception from
:meth:`AuditLog.record` as "the entry was not written": the decision is then denied
(fail-closed). A log therefore must raise when it cannot guarantee the entry, and must not
raise once it has.

:class:`JsonlAuditLog` is the durable log: one orjson object per line, appended with
``O_APPEND`` under an exclusive file lock, then fsynced. Any number of threads and worker
processes may share one file: lines never interleave and none is lost.

Hazards, stated plainly:

- The log never creates its directory: a directory that vanished (an unmounted volume, a
  removed path) must surface as a write failure, not as a fresh log somewhere unexpected.
- The process needs read and write access to the log (it reads the last byte to repair a torn
  line) and write access to the directory of its lock file (``<path>.lock``).
- The lock is ``flock``: a filesystem without it (some network filesystems) makes every write
  fail instead of silently dropping mutual exclusion (``fallback_to_soft=False``).
- A record waits at most ``lock_timeout`` seconds for the lock (a stopped or stuck writer
  holding it makes later decisions fail closed after that time, never hang forever).
- Point the path at a regular file. A device such as ``/dev/null`` accepts writes and keeps
  nothing; torn-line repair and rollback only apply to regular files.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Mapping
from contextlib import suppress
from typing import Any, Literal, Protocol, TypedDict, cast

import orjson

from gatemetrics._flock import exclusive_flock
from gatemetrics.errors import LockTimeoutError

__all__ = ["AuditEntry", "AuditLog", "InMemoryAuditLog", "JsonlAuditLog", "OverrideRecord"]


class OverrideRecord(TypedDict):
    """The fields of a ``ReleaseOverride`` as written in an audit entry."""

    ttl_seconds: int
    created_at_ms: int
    scope: str
    reason: str
    created_by: str


class AuditEntry(TypedDict):
    """One gate decision as written to the audit log (one JSON object per line)."""

    ts_ms: int  # the now_ms the gate used
    logged_at: float  # wall clock, seconds since the epoch
    decision: Literal["ALLOW", "DENY"]
    allowed: bool
    verdict: str  # a ReleaseVerdict value
    reasons: list[str]  # BlockReasonCode values
    override_applied: bool
    override: OverrideRecord | None
    release_scope: str
    audit_detail: str
    pid: int
    host: str


class AuditLog(Protocol):
    """Anything that durably records one audit entry per call."""

    def record(self, entry: AuditEntry) -> None:
        """Record ``entry``; raise if it cannot be guaranteed written, return only once it is."""


def _encode(entry: Mapping[str, Any]) -> bytes:
    # orjson escapes every control character inside strings, so the line is one line whatever
    # the entry holds; it raises TypeError (JSONEncodeError) for what JSON cannot hold (lone
    # surrogates, integers beyond 64 bits, arbitrary objects).
    return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)


class InMemoryAuditLog:
    """An audit log in a list, for tests and development. Thread-safe.

    Entries go through the same JSON encoding as :class:`JsonlAuditLog`, so :attr:`entries`
    holds exactly what a reader of the durable log would see and an entry the durable log
    would refuse is refused here too. Set :attr:`failing` to make every record raise
    ``OSError(EIO)`` (a write failure on demand).

    Unbounded: it keeps every entry for the life of the object. Production wants
    :class:`JsonlAuditLog`.
    """

    __slots__ = ("_entries", "_lock", "failing")

    def __init__(self) -> None:
        self._entries: list[AuditEntry] = []
        self._lock = threading.Lock()
        self.failing = False

    def record(self, entry: AuditEntry) -> None:
        if self.failing:
            raise OSError(errno.EIO, "InMemoryAuditLog is set to fail")
        decoded = cast("AuditEntry", orjson.loads(_encode(entry)))
        with self._lock:
            self._entries.append(decoded)

    @property
    def entries(self) -> list[AuditEntry]:
        """A copy of the entries recorded so far, oldest first."""
        with self._lock:
            return list(self._entries)


class JsonlAuditLog:
    """A durable audit log: JSON lines appended under a file lock and fsynced.

    ``path`` is the log file (created on first write, mode 0640 before umask; its directory
    must exist). The lock file is ``<path>.lock``. ``lock_timeout`` bounds the wait for the
    lock, in seconds.

    A record either returns with its line complete and fsynced, or raises (``OSError``,
    :class:`gatemetrics.LockTimeoutError`, or ``TypeError`` for an entry JSON cannot hold).
    On a failed append of a regular file the bytes already written are truncated away (best
    effort), so a failed write does not leave half a line or an entry for a decision that was
    then denied. A line torn by a crash (no trailing newline) is left as it is, and the next
    append starts on a fresh line so every later line stays valid.

    Safe to share between threads and processes, and across ``fork`` (the lock file is opened
    per append, so no process ever holds a lock through a descriptor it inherited).
    """

    __slots__ = ("_lock_path", "_lock_timeout", "_path", "_thread_lock")

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 5.0) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        fspath = os.fspath(path)
        if not isinstance(fspath, str):
            raise TypeError("path must be a text path, not bytes")
        if not fspath or fspath.endswith(os.sep) or "\0" in fspath:
            raise ValueError(f"not a usable file path: {fspath!r}")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float):
            raise TypeError(f"lock_timeout must be a number, not {type(lock_timeout).__name__}")
        if not 0 < lock_timeout < float("inf"):
            raise ValueError(f"lock_timeout must be positive and finite, got {lock_timeout!r}")
        self._path = fspath
        self._lock_path = fspath + ".lock"
        self._lock_timeout = float(lock_timeout)
        self._thread_lock = threading.Lock()

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"JsonlAuditLog({self._path!r})"

    def record(self, entry: AuditEntry) -> None:
        """Append ``entry`` as one fsynced line; raise if that cannot be guaranteed."""
        data = _encode(entry)
        deadline = time.monotonic() + self._lock_timeout
        # Threads of this process queue here, so they do not all poll the file lock.
        if not self._thread_lock.acquire(timeout=self._lock_timeout):
            raise LockTimeoutError(self._lock_path, self._lock_timeout)
        try:
            # Open the log first: a vanished log directory must fail here, never be recreated.
            fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                # A bare flock per append (opened per call, so a forked child never shares it):
                # filelock's acquire+release cost about 0.17 ms of every check here.
                with exclusive_flock(
                    self._lock_path, timeout=max(deadline - time.monotonic(), 0.0)
                ):
                    _append_line(fd, data)
            except LockTimeoutError:
                raise LockTimeoutError(self._lock_path, self._lock_timeout) from None
            finally:
                os.close(fd)
        finally:
            self._thread_lock.release()


def _append_line(fd: int, data: bytes) -> None:
    """Append ``data`` at the end of ``fd`` and fsync; on failure undo what was written.

    The caller holds the file lock, so nobody else appends between the size read here and the
    writes: the line lands whole at ``start`` and truncating back to ``start`` removes exactly
    our bytes.
    """
    info = os.fstat(fd)
    regular = stat.S_ISREG(info.st_mode)
    start = info.st_size if regular else 0
    if start and os.pread(fd, 1, start - 1) != b"\n":
        # A writer died mid-line: start on a fresh line so ours parses.
        data = b"\n" + data
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):
            n = os.write(fd, view[written:])
            if n <= 0:  # pragma: no cover - write(2) reports errors by raising
                raise OSError(errno.EIO, "write made no progress")
            written += n
        os.fsync(fd)
    except BaseException:
        if regular and written:
            # Best effort: the caller reports the entry as not written, so it must not stay.
            with suppress(OSError):
                os.ftruncate(fd, start)
        raise
