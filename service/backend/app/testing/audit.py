"""Audit logs for release-gate decisions: the protocol, an in-memory log and a durable JSONL log.

The gate writes exactly one :class:`AuditEntry` per check and treats any exception from
:meth:`AuditLog.record` as "the entry was not written": the decision is then denied
(fail-closed). A log therefore must raise when it cannot guarantee the entry, and must not
raise once it has.

:class:`JsonlAuditLog` is the durable log: one orjson object per line, appended with
``O_APPEND`` under an exclusive file lock, then fsynced. Any number of threads and worker
processes may share one file: lines never interleave and none is lost. By default it uses
group commit: threads of one process that arrive while a write or fsync is in progress are
written together (one ``write``) and synced together (one ``fsync``) by the next of them, and
the file lock is held for the append only, not across the fsync, so other processes append
while one syncs (an fsync covers every line written before it, theirs included).
``group_commit=False`` keeps one lock + write + fsync per record (for benchmarks comparing
the two).

Lines that stay for denied decisions. A batch's fsync that fails cannot take its lines back
(other processes may have appended after them), and a caller that gave up waiting may find its
line written after all. Such a line stays, its caller raises (the decision is denied, whatever
the line says), and the log gets a marker line, best effort, listing the byte offsets of those
lines::

    {"event":"AUDIT_SYNC_FAILED","audit_error":"EIO","entries":2,"offsets":[4096,4391],
     "pid":1234,"host":"gate-1","logged_at":1700000000.5}

``audit_error`` is the token the gate puts in ``audit_detail`` (an errno name, or
``LockTimeoutError`` for a caller that timed out). A marker has ``event`` and no ``decision``,
so readers that select on ``decision`` skip it; the entry at a listed offset is a decision the
caller was told was denied (``AUDIT_WRITE_FAILED``).

Hazards, stated plainly:

- The log never creates its directory: a directory that vanished (an unmounted volume, a
  removed path) must surface as a write failure, not as a fresh log somewhere unexpected.
- The process needs read and write access to the log (it reads the last byte to repair a torn
  line). Write access to the directory is needed to create the log, and to create
  ``<path>.lock``, which only earlier versions need (see below).
- The log's directory is a trust boundary: it may be writable by a user other than the gate's.
  The log and ``<path>.lock`` are opened relative to one descriptor of the directory, with
  ``O_NOFOLLOW`` and ``O_NONBLOCK``, so nothing is ever created or written through a link or
  outside the directory, and a FIFO cannot hang a check. A symlink at the path is refused
  (``ELOOP``, the decision fails closed) unless ``follow_symlinks=True`` says the link is the
  operator's; so are a FIFO or socket (``EINVAL``) and a file with more than one hard link
  (``EMLINK``: appending would change a file that also lives under another name). What such a
  user can do: delete, replace or fill the log (hide entries, add false ones), or make every
  check fail closed (replace the log with a directory, hold a ``flock`` on it). What they
  cannot do: make the gate write anywhere else, or make a check allowed without its line.
- Exclusion rests on the ``flock`` of the log file's own descriptor, taken after the lock of
  ``<path>.lock`` (what earlier versions lock, so a rolling upgrade never has two versions
  appending at once). Deleting or replacing a file beside the log cannot lose it: once locked,
  the file must still be the one at the path (same device and inode), or it is let go and the
  file now at the path is opened and locked instead, within ``lock_timeout``. Whatever stands
  at ``<path>.lock`` that is not a plain, singly linked file (a symlink, a link loop, a FIFO,
  a socket, a directory, a file we may not open) is left alone and costs one warning per
  minute and process on the ``backend.app.testing.audit`` logger; checks go on. A deleted or
  unusable ``<path>.lock`` only loses exclusion against processes of earlier versions.
- Anyone who may open the log (or ``<path>.lock``) for reading can hold its ``flock``: every
  check then fails closed after ``lock_timeout``. Keep the log's group and mode (0640) tight.
- The lock is ``flock``: a filesystem without it (some network filesystems) makes every write
  fail instead of silently dropping mutual exclusion.
- A record waits at most ``lock_timeout`` seconds in all, for its batch and for the lock (a
  stopped or stuck writer holding it makes later decisions fail closed after that time, never
  hang forever). The fsync itself cannot be bounded: a hung disk hangs the one thread syncing,
  and the threads waiting on it time out. After a failure, writing the marker may take up to
  0.1 s more.
- A line for a denied decision can stay in the log (see above), and so can the line of a
  caller that never returned (its process killed between the write and the fsync's end): lines
  are evidence of attempts; the markers and ``release_gate_audit_write_failures_total`` say
  which attempts failed. After a failed fsync the kernel may have dropped the pages: those
  lines (and the marker) may not survive a crash of the machine.
- A fork while a thread of the process is inside ``record`` gives the child fresh state and
  closes the child's copies of that thread's descriptors (an at-fork hook). A fork that skips
  Python's at-fork hooks only gets the fresh state, on the child's first record.
- Point the path at a regular file. A device such as ``/dev/null`` (reachable only through a
  symlink the operator allowed, or as the path itself) accepts writes and keeps nothing;
  torn-line repair, rollback and marker offsets only apply to regular files.
- A failed append never removes a line it did not write. It truncates its bytes away only when
  the file provably holds nothing after its start but them (its writes ran from the size it
  read under the lock, and the file ends where they end). Otherwise (a writer that ignores the
  lock appended meanwhile: an earlier version whose ``<path>.lock`` was removed, a shell's
  ``>>``) its bytes are overwritten in place with spaces, newlines kept and each write's last
  byte made a newline, then fsynced: blank lines, which ``jq`` and the marker offsets of the
  lines around them tolerate. Against such a writer a small race stays (it appends between the
  size check and the truncate); no writer of this version can.
- Log rotation by rename is safe: every batch opens the path afresh and appends to the file
  at the path when it holds its lock; a batch in flight finishes its marker in the file
  holding its lines.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any, Literal, Protocol, TypedDict, cast

import orjson

from gatemetrics import LockTimeoutError, flock_until

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


# The marker line's event name (see the module docstring).
_SYNC_FAILED_EVENT = "AUDIT_SYNC_FAILED"

# Polling for the flock (the kernel's blocking flock cannot time out). Group commit holds the
# lock for one short write, so the first retry comes soon; the cap keeps a
# stuck holder from costing more than 200 attempts a second per waiting process.
_FIRST_WAIT_S = 0.0001
_MAX_WAIT_S = 0.005
# The extra time a marker may take after a failure (see the hazards).
_MARKER_WAIT_S = 0.1
# At most one warning about an unusable <path>.lock per this many seconds, per log and process.
_WARNING_INTERVAL_S = 60.0

_logger = logging.getLogger(__name__)

# O_PATH: the directory is only a base for the names in it (no read permission needed).
_DIRECTORY_FLAGS: int = os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)

# What a failed open of <path>.lock (O_NOFOLLOW) says about the entry standing there.
_OPEN_FAILURES = {
    errno.ELOOP: "a symbolic link",
    errno.EISDIR: "a directory",
    errno.ENXIO: "a socket",
    errno.EACCES: "a file we may not open",
    errno.EPERM: "a file we may not open",
}

# Where a caller stands in the group commit of its process (_Waiter.status).
_PENDING = 0  # queued; no leader has taken the line yet: giving up leaves no trace
_LEADING = 1  # this caller writes and syncs the next batch
_IN_FLIGHT = 2  # a leader took the line: it may be written whatever happens next
_DONE = 3  # the leader published the outcome (error is None: written and synced)
_ABANDONED = 4  # timed out while in flight: the leader marks the line if it was written


class _Waiter:
    """One record call waiting for its batch; changed only under its process's mutex."""

    __slots__ = ("data", "error", "offset", "status", "wake")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.status = _PENDING
        self.error: BaseException | None = None
        self.offset = -1  # where the line starts in the file, once written (not rolled back)
        # Set once, when the status becomes _DONE or _LEADING: each caller sleeps on its own
        # event, so finishing a batch wakes only that batch and the next leader.
        self.wake = threading.Event()


class _ProcessState:
    """What one process uses to share writes; a forked child gets a fresh one.

    A child must never wait on a mutex some parent thread held at the fork, nor for waiters
    that exist only in the parent.
    """

    __slots__ = ("busy", "fds", "mutex", "pending", "pid", "quiet_until", "serial", "unlogged")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.mutex = threading.Lock()
        self.busy = False  # a leader is writing or syncing; new callers queue in pending
        self.pending: list[_Waiter] = []
        self.serial = threading.Lock()  # group_commit=False: one record at a time per process
        # Descriptors record calls hold open right now, for the child after a fork (see
        # _after_fork_in_child). Added right after open, removed right before close.
        self.fds: set[int] = set()
        # Rate limit of the warning about an unusable <path>.lock (under mutex).
        self.quiet_until = float("-inf")
        self.unlogged = 0


class JsonlAuditLog:
    """A durable audit log: JSON lines appended under a file lock and fsynced.

    ``path`` is the log file (created on first write, mode 0640 before umask; its directory
    must exist). It is locked through its own descriptor and through ``<path>.lock``. A
    symlink at ``path`` is refused unless ``follow_symlinks=True`` (``<path>.lock`` is never
    followed). :meth:`probe` checks the file at start-up without writing.
    ``lock_timeout`` bounds, in seconds, the wait of a record for its batch and for the lock.

    A record either returns with its line complete and fsynced, or raises (``OSError``,
    :class:`gatemetrics.LockTimeoutError`, or ``TypeError`` for an entry JSON cannot hold).

    ``group_commit=True`` (the default): callers of one process share writes and fsyncs. The
    first caller to find nobody writing leads: it takes the lock, appends its line and those of
    every caller queued behind it in one ``write``, releases the lock, fsyncs, and tells each
    caller the outcome; meanwhile newcomers queue for the next batch, led by the oldest of them.
    No background thread: leading is done by callers, so the object is fork-safe. Every caller
    of a failed batch raises. A batch waits for the lock until the deadline of its leader (its
    oldest caller); a follower waits for its batch's outcome until its own deadline, then
    raises ``LockTimeoutError``: its line is then either never written (still queued) or left
    for the leader to mark (see below).

    ``group_commit=False``: one lock, write and fsync per record, the lock held across the
    fsync (so a failed fsync can still truncate its line away).

    A write that fails part-way (ENOSPC, EFBIG) is taken back, never removing a line it did
    not write: truncated to where its batch started when the file provably ends with its
    bytes, else blanked in place (see the hazards); every caller of the batch raises. A line
    torn by a crash (no trailing newline) is left as it is, and the next append starts on a
    fresh line so every later line stays valid.

    A failed fsync (and a follower that gave up after its line was written) leaves lines for
    denied decisions: they stay, followed by a best-effort ``{"event": "AUDIT_SYNC_FAILED",
    ...}`` marker listing their byte offsets (the format is in the module docstring). A line
    no marker lists was confirmed to its caller, unless that caller's process died before the
    confirmation or the marker itself could not be written.

    Safe to share between threads and processes, and across ``fork``: a forked child starts
    with fresh in-process state and closes its copies of the descriptors its parent's record
    calls held (a parent killed while holding the lock would otherwise leave it held through
    the child's copy). A ``<path>.lock`` left by earlier versions keeps being used; nothing
    else about it is required, and an unusable one is skipped with a rate-limited warning.
    """

    __slots__ = (
        "__weakref__",
        "_directory",
        "_follow_symlinks",
        "_group_commit",
        "_lock_name",
        "_lock_path",
        "_lock_timeout",
        "_name",
        "_path",
        "_state",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 5.0,
        group_commit: bool = True,
        follow_symlinks: bool = False,
    ) -> None:
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
        if not isinstance(group_commit, bool):
            raise TypeError(f"group_commit must be a bool, not {type(group_commit).__name__}")
        if not isinstance(follow_symlinks, bool):
            raise TypeError(f"follow_symlinks must be a bool, not {type(follow_symlinks).__name__}")
        self._path = fspath
        self._lock_path = fspath + ".lock"
        # Every name is opened relative to a descriptor of the directory, taken once per batch:
        # the log and its lock are then in the same directory even if a component of the path
        # is swapped meanwhile, and nothing is ever created outside it.
        directory, self._name = os.path.split(fspath)
        self._directory = directory or os.curdir
        self._lock_name = self._name + ".lock"
        self._follow_symlinks = follow_symlinks
        self._lock_timeout = float(lock_timeout)
        self._group_commit = group_commit
        self._state = _ProcessState()
        _LIVE_LOGS.add(self)

    @property
    def path(self) -> str:
        return self._path

    @property
    def follow_symlinks(self) -> bool:
        """Whether a symlink at the path is followed (the constructor's flag; refused if not)."""
        return self._follow_symlinks

    @property
    def group_commit(self) -> bool:
        """Whether callers of this process share writes and fsyncs (the constructor's flag)."""
        return self._group_commit

    def __repr__(self) -> str:
        return f"JsonlAuditLog({self._path!r})"

    def record(self, entry: AuditEntry) -> None:
        """Append ``entry`` as one fsynced line; raise if that cannot be guaranteed."""
        data = _encode(entry)
        deadline = time.monotonic() + self._lock_timeout
        state = self._current_state()
        if not self._group_commit:
            self._record_alone(state, data, deadline)
            return
        me = _Waiter(data)
        with state.mutex:
            lead = not state.busy
            if lead:
                state.busy = True
                me.status = _LEADING
            else:
                state.pending.append(me)
        if lead or self._follow(state, me, deadline):
            self._lead(state, me, deadline)

    # -- group commit --------------------------------------------------------------------

    def _follow(self, state: _ProcessState, me: _Waiter, deadline: float) -> bool:
        """Wait for the batch; True when this caller must lead the next one.

        Returns False once a leader wrote and synced the line; raises its batch's failure, or
        ``LockTimeoutError`` at the deadline.
        """
        while True:
            try:
                me.wake.wait(max(deadline - time.monotonic(), 0.0))
            except BaseException:
                # Interrupted (KeyboardInterrupt in the main thread): leave like a timeout, or
                # a turn to lead handed to this caller would stall the whole process.
                with state.mutex:
                    if me.status != _DONE:
                        _give_up(state, me)
                raise
            with state.mutex:
                if me.status == _DONE:
                    if me.error is not None:
                        raise _own_copy(me.error) from None
                    return False
                if time.monotonic() < deadline:
                    if me.status == _LEADING:
                        return True
                    continue  # an early wake-up of Event.wait; nothing happened yet
                _give_up(state, me)
                raise LockTimeoutError(self._lock_path, self._lock_timeout)

    def _lead(self, state: _ProcessState, me: _Waiter, deadline: float) -> None:
        batch = [me]
        error: BaseException | None = None
        fd = -1
        try:
            try:
                with state.mutex:
                    batch += state.pending
                    state.pending.clear()
                    for waiter in batch[1:]:
                        waiter.status = _IN_FLIGHT
                fd, lock_fd = self._open_locked(state, deadline)
                try:
                    offsets = _append(fd, [waiter.data for waiter in batch])
                finally:
                    self._unlock(state, fd, lock_fd)
                # Written and the lock released: other processes append while this one syncs.
                for waiter, offset in zip(batch, offsets, strict=True):
                    waiter.offset = offset
                os.fsync(fd)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                error = exc
            finally:
                # Whatever happened, publish the outcome and pass the turn on; first, so the
                # followers return without waiting for a marker.
                abandoned = _settle(state, batch, error)
            unconfirmed = batch if error is not None and me.offset >= 0 else abandoned
            if unconfirmed and fd >= 0:
                token = _error_token(error) if error is not None else LockTimeoutError.__name__
                self._mark_unconfirmed(state, fd, unconfirmed, token, deadline)
        finally:
            if fd >= 0:
                _close(state, fd)
        if error is not None:
            raise error

    def _mark_unconfirmed(
        self, state: _ProcessState, fd: int, waiters: Sequence[_Waiter], token: str, deadline: float
    ) -> None:
        """Append the AUDIT_SYNC_FAILED marker for ``waiters``' lines; best effort, never raises.

        Through the batch's own descriptor, so the marker lands in the file holding the lines
        even if the log was rotated meanwhile.
        """
        marker = {
            "event": _SYNC_FAILED_EVENT,
            "audit_error": token,
            "entries": len(waiters),
            "offsets": [waiter.offset for waiter in waiters],
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "logged_at": time.time(),
        }
        with suppress(Exception):
            # Not _open_locked: the marker belongs in this file even if it is no longer the
            # one at the path.
            dir_fd = self._open_directory(state)
            try:
                wait = max(deadline, time.monotonic() + _MARKER_WAIT_S)
                lock_fd = self._lock(state, fd, dir_fd, wait)
            finally:
                _close(state, dir_fd)
            try:
                _append(fd, [_encode(marker)])
            finally:
                self._unlock(state, fd, lock_fd)
            os.fsync(fd)

    # -- one record at a time ------------------------------------------------------------

    def _record_alone(self, state: _ProcessState, data: bytes, deadline: float) -> None:
        # Threads of this process queue here, so they do not all poll the file lock.
        if not state.serial.acquire(timeout=self._lock_timeout):
            raise LockTimeoutError(self._lock_path, self._lock_timeout)
        try:
            fd, lock_fd = self._open_locked(state, deadline)
            try:
                try:
                    _append(fd, [data], sync=True)
                finally:
                    self._unlock(state, fd, lock_fd)
            finally:
                _close(state, fd)
        finally:
            state.serial.release()

    # -- files and locks -----------------------------------------------------------------

    def probe(self) -> None:
        """Open the log as a record would (creating it if absent), then close it.

        Raises what a record would raise for the file itself (a refused symlink, a FIFO, a
        missing directory, a permission problem), without writing or locking anything: for a
        service that wants to refuse to start rather than deny every decision.
        """
        state = self._current_state()
        dir_fd = self._open_directory(state)
        try:
            _close(state, self._open_log(state, dir_fd))
        finally:
            _close(state, dir_fd)

    def _current_state(self) -> _ProcessState:
        if self._state.pid != os.getpid():
            # A fork the at-fork hook did not see (a fork outside Python's os.fork): at least
            # never share the parent's mutex or waiters.
            self._state = _ProcessState()
        return self._state

    def _open_directory(self, state: _ProcessState) -> int:
        # Opened per batch: a vanished log directory fails here and is never recreated.
        fd = os.open(self._directory, _DIRECTORY_FLAGS)
        state.fds.add(fd)
        return fd

    def _open_log(self, state: _ProcessState, dir_fd: int) -> int:
        # O_NONBLOCK: a FIFO planted at the path must not hang the open or a write.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        if not self._follow_symlinks:
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(self._name, flags, 0o640, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP and not self._follow_symlinks:
                # The name is one component opened relative to its directory, so with
                # O_NOFOLLOW ELOOP means exactly "the path is a symlink".
                raise OSError(
                    errno.ELOOP,
                    "the audit log is a symbolic link: refused"
                    " (JsonlAuditLog(..., follow_symlinks=True) follows it)",
                    self._path,
                ) from None
            raise
        state.fds.add(fd)
        try:
            info = os.fstat(fd)
            if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
                raise OSError(
                    errno.EINVAL, "the audit log is not a regular file (a FIFO)", self._path
                )
            if stat.S_ISREG(info.st_mode) and info.st_nlink != 1:
                # A hard link planted in the directory: appending would change a file that
                # also lives elsewhere, under another name.
                raise OSError(
                    errno.EMLINK,
                    f"the audit log has {info.st_nlink} hard links: refused",
                    self._path,
                )
        except BaseException:
            _close(state, fd)
            raise
        return fd

    def _open_locked(self, state: _ProcessState, deadline: float) -> tuple[int, int]:
        """The log open and locked, the locked file being the one at the path now.

        Returns ``(fd, lock_fd)``; ``lock_fd`` is ``<path>.lock`` (locked too) or -1 when that
        entry is unusable. Release with :meth:`_unlock`, then close ``fd``. A log rotated or
        replaced between the open and the lock is let go and the one now at the path is
        opened instead, until ``deadline``: lines only ever go to the file whose lock is held
        by whoever appends to the path.
        """
        wait = _FIRST_WAIT_S
        while True:
            dir_fd = self._open_directory(state)
            try:
                fd = self._open_log(state, dir_fd)
                try:
                    lock_fd = self._lock(state, fd, dir_fd, deadline)
                    try:
                        current = self._is_at_path(fd, dir_fd)
                    except BaseException:
                        self._unlock(state, fd, lock_fd)
                        raise
                    if current:
                        return fd, lock_fd
                    self._unlock(state, fd, lock_fd)
                except BaseException:
                    _close(state, fd)
                    raise
                _close(state, fd)
            finally:
                _close(state, dir_fd)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeoutError(self._path, self._lock_timeout)
            # Replaced again and again (a rotation loop, or someone doing it on purpose): do
            # not spin.
            time.sleep(min(wait, remaining))
            wait = min(wait * 2, _MAX_WAIT_S)

    def _is_at_path(self, fd: int, dir_fd: int) -> bool:
        try:
            there = os.stat(self._name, dir_fd=dir_fd, follow_symlinks=self._follow_symlinks)
        except FileNotFoundError:
            return False
        here = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _lock(self, state: _ProcessState, fd: int, dir_fd: int, deadline: float) -> int:
        """Take ``<path>.lock`` (if usable) and then the log's own ``flock`` on ``fd``.

        Returns the lock file's descriptor, or -1. Each call opens its own lock file
        description, so two calls in one process exclude each other like two processes do.
        """
        lock_fd = self._open_compat_lock(state, dir_fd)
        try:
            if lock_fd >= 0:
                _flock_until(lock_fd, deadline, self._lock_path, self._lock_timeout)
            try:
                _flock_until(fd, deadline, self._path, self._lock_timeout)
            except BaseException:
                if lock_fd >= 0:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
                raise
        except BaseException:
            if lock_fd >= 0:
                _close(state, lock_fd)
            raise
        return lock_fd

    def _unlock(self, state: _ProcessState, fd: int, lock_fd: int) -> None:
        # Released explicitly (LOCK_UN), which also frees the locks for a forked child's copy
        # of the descriptors; the log's own lock first, the reverse of the order taken.
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            if lock_fd >= 0:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
                finally:
                    _close(state, lock_fd)

    def _open_compat_lock(self, state: _ProcessState, dir_fd: int) -> int:
        """``<path>.lock``, opened without following or creating through anything; or -1.

        Only earlier versions rely on it (they lock nothing else), so whatever stands in its
        place that is not a plain file of ours (a symlink, FIFO, socket, directory, a hard link
        of another file, a file we may not open) is left alone with one rate-limited warning:
        decisions go on under the log's own lock.
        """
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                lock_fd = os.open(
                    self._lock_name, os.O_RDWR | os.O_CREAT | flags, 0o640, dir_fd=dir_fd
                )
            except PermissionError:
                # Another user's lock file that we may read but not write: flock works on any
                # descriptor.
                lock_fd = os.open(self._lock_name, os.O_RDONLY | flags, dir_fd=dir_fd)
        except OSError as exc:
            self._warn_unusable_lock(state, _OPEN_FAILURES.get(exc.errno or 0, str(exc)))
            return -1
        state.fds.add(lock_fd)
        try:
            info = os.fstat(lock_fd)
        except BaseException:
            _close(state, lock_fd)
            raise
        what = ""
        if not stat.S_ISREG(info.st_mode):
            what = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file"
        elif info.st_nlink != 1:
            what = f"a file with {info.st_nlink} hard links"
        if what:
            _close(state, lock_fd)
            self._warn_unusable_lock(state, what)
            return -1
        return lock_fd

    def _warn_unusable_lock(self, state: _ProcessState, what: str) -> None:
        # One line per interval and process, whatever the rate of checks: a planted entry must
        # not become a way to flood the service's log.
        now = time.monotonic()
        with state.mutex:
            if now < state.quiet_until:
                state.unlogged += 1
                return
            state.quiet_until = now + _WARNING_INTERVAL_S
            unlogged, state.unlogged = state.unlogged, 0
        _logger.warning(
            "audit log %s: ignoring %s: %s; exclusion rests on the log's own lock"
            " (%d more since the last such warning)",
            self._path,
            self._lock_path,
            what,
            unlogged,
        )


def _hand_off(state: _ProcessState) -> None:
    """Make the oldest queued caller the next leader, or mark nobody leading (mutex held)."""
    if state.pending:
        nxt = state.pending.pop(0)
        nxt.status = _LEADING
        nxt.wake.set()
    else:
        state.busy = False


def _give_up(state: _ProcessState, me: _Waiter) -> None:
    """Take ``me`` out of the group commit before it returns unconfirmed (mutex held)."""
    if me.status == _PENDING:
        state.pending.remove(me)  # never taken: no line, no trace
    elif me.status == _LEADING:
        _hand_off(state)  # out of time before leading: pass the turn on
    else:
        # In flight: the line may be written already. The leader marks it if so.
        me.status = _ABANDONED


def _settle(
    state: _ProcessState, batch: Sequence[_Waiter], error: BaseException | None
) -> list[_Waiter]:
    """Give every follower of ``batch`` its outcome, pass the lead on; the abandoned ones."""
    abandoned: list[_Waiter] = []
    with state.mutex:
        for waiter in batch[1:]:
            if waiter.status == _ABANDONED:
                if waiter.offset >= 0:
                    abandoned.append(waiter)
                continue
            waiter.error = error
            waiter.status = _DONE
            waiter.wake.set()
        _hand_off(state)
    return abandoned


def _own_copy(error: BaseException) -> BaseException:
    """A follower's own exception for its batch's failure.

    Each thread raises its own object (one shared object would collect every thread's
    traceback); the type and errno stay, so the gate reports the same ``audit_error``. What is
    not an ``Exception`` (a ``KeyboardInterrupt`` in the leader) is the leader's own business:
    a follower only learns that its write was not confirmed.
    """
    if isinstance(error, Exception):
        with suppress(Exception):
            twin = copy.copy(error)
            if type(twin) is type(error):
                return twin
    return OSError(errno.EIO, f"audit batch failed in its leader: {type(error).__name__}")


def _error_token(error: BaseException) -> str:
    # The same token the gate puts in audit_detail (release_gate._error_token).
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return type(error).__name__


def _close(state: _ProcessState, fd: int) -> None:
    # Forget before closing: a fork in between leaves the child an unlocked copy to leak, never
    # a number that a later open in the parent reuses for something else.
    state.fds.discard(fd)
    os.close(fd)


def _flock_until(fd: int, deadline: float, path: str, timeout: float) -> None:
    """Take an exclusive ``flock`` on ``fd``, polling until ``deadline`` (at least one try).

    The engine's one non-blocking attempt and its classification of contention
    (:func:`gatemetrics.flock_until`), with the audit log's shorter back-off (see above).
    """
    flock_until(
        fd, deadline, path=path, timeout=timeout, first_wait=_FIRST_WAIT_S, max_wait=_MAX_WAIT_S
    )


def _append(fd: int, lines: Sequence[bytes], *, sync: bool = False) -> list[int]:
    """Append ``lines`` at the end of ``fd`` in one write; the offset of each line.

    With ``sync``, also fsync before returning. The caller holds the log's lock, so every
    writer of this version is excluded between the size read here and the write; writers that
    ignore the lock (an earlier version whose ``<path>.lock`` was removed, a shell's ``>>``)
    are not, so where each write really landed is read back (the descriptor's own offset,
    which nobody else moves) rather than assumed. On failure, what was written is taken back
    by :func:`_take_back`, which never touches a byte it did not write.
    """
    info = os.fstat(fd)
    regular = stat.S_ISREG(info.st_mode)
    start = info.st_size if regular else 0
    # A writer died mid-line: start on a fresh line so ours parse.
    prefix = b"\n" if start and os.pread(fd, 1, start - 1) != b"\n" else b""
    data = prefix + b"".join(lines)
    view = memoryview(data)
    written = 0
    landed: list[tuple[int, int]] = []  # (offset, length) of each write, regular files only
    try:
        while written < len(data):
            n = os.write(fd, view[written:])
            if n <= 0:  # pragma: no cover - write(2) reports errors by raising
                raise OSError(errno.EIO, "write made no progress")
            if regular:
                landed.append((os.lseek(fd, 0, os.SEEK_CUR) - n, n))
            written += n
        first = landed[0][0] if landed else start
        if regular and not _lands_whole(fd, landed, prefix):
            raise OSError(errno.EIO, "the append was interleaved with a writer ignoring the lock")
        if sync:
            os.fsync(fd)
    except BaseException:
        if landed:
            _take_back(fd, data, landed, start)
        raise
    offsets: list[int] = []
    position = first + len(prefix)
    for line in lines:
        offsets.append(position)
        position += len(line)
    return offsets


def _lands_whole(fd: int, landed: Sequence[tuple[int, int]], prefix: bytes) -> bool:
    """Whether the writes form one run that starts on a fresh line (every line parses)."""
    first, end = landed[0][0], landed[0][0]
    for offset, n in landed:
        if offset != end:
            return False  # someone else's bytes inside ours: a line of ours is cut in two
        end += n
    return bool(prefix) or first == 0 or os.pread(fd, 1, first - 1) == b"\n"


# Blanking: every byte but the newlines becomes a space.
_BLANK = bytes(0x0A if i == 0x0A else 0x20 for i in range(256))


def _take_back(fd: int, data: bytes, landed: Sequence[tuple[int, int]], start: int) -> None:
    """Undo a failed append, best effort (never raises); never remove a line it did not write.

    The callers are told their entries were not written, so the entries must not stay. When
    the file provably holds nothing after ``start`` but ours (our writes ran from ``start``
    and the file ends where they end, under the lock), it is truncated back to ``start``.
    Otherwise someone else's lines may follow ours: each of our writes is overwritten in place
    with spaces, newlines kept and its last byte made a newline, so no entry of ours stays,
    the lines before and after stay byte for byte where they were (marker offsets still
    hold), and readers see blank lines (whitespace, which ``jq`` skips).
    """
    with suppress(OSError):
        end = start
        for offset, n in landed:
            if offset != end:
                break
            end += n
        else:
            if os.fstat(fd).st_size == end:
                os.ftruncate(fd, start)
                return
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        # Off O_APPEND for the positioned writes (Linux appends a pwrite on an O_APPEND
        # descriptor, whatever offset it is given). The descriptor is this batch's own.
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_APPEND)
        try:
            consumed = 0
            for offset, n in landed:
                blank = bytearray(data[consumed : consumed + n].translate(_BLANK))
                blank[-1] = 0x0A  # whatever follows this write starts on a line of its own
                consumed += n
                done = 0
                while done < n:
                    done += os.pwrite(fd, memoryview(blank)[done:], offset + done)
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        # Others' fsyncs may have put our entries on disk already: so must the blanks go.
        os.fsync(fd)


# Every live log, so a forked child can reset them all before any of its code runs.
_LIVE_LOGS: weakref.WeakSet[JsonlAuditLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for log in list(_LIVE_LOGS):
        # Only close: LOCK_UN here would free a lock the parent still holds through the same
        # open file description.
        for fd in list(log._state.fds):
            with suppress(OSError):
                os.close(fd)
        log._state = _ProcessState()


os.register_at_fork(after_in_child=_after_fork_in_child)
