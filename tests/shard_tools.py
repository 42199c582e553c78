"""Helpers shared by the shard, aggregator, CLI and gate tests: lock probes, running a check in a
forked child, and the previous release's shard writer (format v1) for compatibility tests.

Nothing here knows a schema: the engine's tests bring theirs (tests/engine/schema.py), the gate's
tests the gate's (tests/gate/gate_shards.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gatemetrics import _faults
from gatemetrics._format import v1_names
from gatemetrics.shards import Identity, fsync_directory, new_identity
from gatemetrics.store import CounterStore, Snapshot


def is_locked(path: str | Path) -> bool:
    """Whether some open file description holds an flock on ``path`` (the aggregator's probe)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def in_forked_child(check: Callable[[], bool]) -> bool:
    """Run ``check`` in a real ``os.fork()`` child; True if it returned True there.

    The child always leaves through ``os._exit`` (never through pytest's machinery).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = False
        try:
            ok = check()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


# -- the previous release's writer (shard format v1), for compatibility tests --------------------

#: The crash points of a v1 save, in order, as the previous release named them.
LEGACY_V1_SAVE_STEPS = (
    "save.locked",  # lifetime lock held, nothing written yet
    "save.tmp_written",  # temp file complete, not yet fsynced
    "save.tmp_synced",  # temp file fsynced (per durability)
    "save.replaced",  # shard replaced, directory not yet fsynced
    "save.done",  # directory fsynced (per durability)
)
_LEGACY_DURABILITY = ("none", "file", "full")


class LegacyV1Shard:
    """A shard written exactly the way the previous release (commit 8925d99) wrote one.

    Protocol, step for step as ``gatemetrics.shards.Shard`` did then:

    * the owner takes an exclusive non-blocking ``flock`` on ``shard-<inc>.lock`` (created if
      missing, never following a symlink) *before* its shard first appears, and refuses a lock
      file that was unlinked before its ``flock`` succeeded (filelock's check), retrying as a
      new incarnation; it holds that descriptor for its whole life;
    * before each save it checks the lock file is still the inode it locked (else: a new
      incarnation carrying only the counts made since);
    * a save writes the JSON document to ``shard-<inc>.tmp`` (``O_TRUNC | O_NOFOLLOW``, mode
      0644), fsyncs it unless durability is ``none``, ``os.replace``-s it over
      ``shard-<inc>.json`` and fsyncs the directory with durability ``full`` (the default),
      passing the crash points of :data:`LEGACY_V1_SAVE_STEPS`.

    Unlike the old release, a failed save raises (tests want to see it) instead of being counted.
    Usable in this process (an old-release owner living next to the test) or in a real child
    process (an old-release worker): see :func:`legacy_bind`.
    """

    def __init__(
        self,
        store: CounterStore,
        directory: str | os.PathLike[str],
        *,
        durability: str = "full",
        identity_factory: Callable[[], Identity] = new_identity,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if durability not in _LEGACY_DURABILITY:
            raise ValueError(f"durability must be one of {_LEGACY_DURABILITY}")
        self.store = store
        self.directory = os.path.abspath(os.fspath(directory))
        self.durability = durability
        self._identity_factory = identity_factory
        self._clock = clock
        self._save_lock = threading.Lock()
        self.identity: Identity | None = None
        self.lock_fd: int | None = None
        self._lock_inode: tuple[int, int] | None = None
        self._baseline = tuple(store.schema.zeros())
        self._last_saved: tuple[int, ...] | None = None

    def names(self) -> tuple[str, str, str]:
        """The shard, lock and temp file names of the current incarnation."""
        assert self.identity is not None, "no incarnation yet"
        return v1_names(self.identity.incarnation)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.names()[0])

    def open(self) -> Identity:
        """Take the lifetime lock of a new incarnation, if not held (the old ``open``)."""
        with self._save_lock:
            return self._open_locked()

    def save(self) -> bool:
        """Write the store's cumulative counts (since this shard's baseline) as the v1 shard."""
        with self._save_lock:
            ident = self._open_locked()
            _faults.point("save.locked")
            state = self.store.begin_save()
            snap = Snapshot(self.store.schema, state[0], state[1], state[2])
            try:
                counts = tuple(c - b for c, b in zip(snap.counts, self._baseline, strict=True))
                self._write(ident, snap, counts)
            except BaseException:
                self.store.abort_save(snap.generation)
                raise
            self._last_saved = counts
            return True

    def close(self, *, save: bool = True) -> None:
        """Optionally save, then release the lifetime lock: the shard becomes dead."""
        if save:
            self.save()
        with self._save_lock:
            self._end_incarnation()

    def die(self) -> None:
        """What a SIGKILL does to the owner: the kernel drops the lock, nothing else happens."""
        fd, self.lock_fd = self.lock_fd, None
        self.identity = None
        if fd is not None:
            os.close(fd)

    def _end_incarnation(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if self._last_saved is not None:
            self._baseline = tuple(
                b + s for b, s in zip(self._baseline, self._last_saved, strict=True)
            )
        self.identity = None
        self._lock_inode = None
        self._last_saved = None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _still_owned(self, ident: Identity) -> bool:
        lock = os.path.join(self.directory, v1_names(ident.incarnation)[1])
        try:
            st = os.stat(lock)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._lock_inode

    def _open_locked(self) -> Identity:
        ident = self.identity
        if ident is not None and self.lock_fd is not None:
            if self._still_owned(ident):
                return ident
            self._end_incarnation()
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(5):
            ident = self._identity_factory()
            lock = os.path.join(self.directory, v1_names(ident.incarnation)[1])
            flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(lock, flags, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # an aggregator probing it: never wait, take a fresh id
                continue
            if os.fstat(fd).st_nlink == 0:  # an aggregator removed it before our flock
                os.close(fd)
                continue
            st = os.stat(lock)
            self.identity, self.lock_fd, self._lock_inode = ident, fd, (st.st_dev, st.st_ino)
            return ident
        raise OSError(errno.EAGAIN, "no lifetime lock after retries", self.directory)

    def _write(self, ident: Identity, snap: Snapshot, counts: tuple[int, ...]) -> None:
        name, _, tmp_name = v1_names(ident.incarnation)
        doc: dict[str, Any] = {
            "format": "gatemetrics-shard",
            "version": 1,
            "incarnation": ident.incarnation,
            "pid": ident.pid,
            "host": ident.host,
            "started_at": ident.started_at,
            "generation": snap.generation,
            "saved_at": float(self._clock()),
            "counts": Snapshot(
                self.store.schema, counts, snap.generation, snap.start_timestamp
            ).to_dict(),
        }
        path = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, tmp_name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644)
        try:
            try:
                os.fchmod(fd, 0o644)
                view = memoryview(orjson.dumps(doc))
                while view:
                    view = view[os.write(fd, view) :]
                _faults.point("save.tmp_written")
                if self.durability != "none":
                    os.fsync(fd)
                _faults.point("save.tmp_synced")
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except Exception:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _faults.point("save.replaced")
        if self.durability == "full":
            fsync_directory(self.directory)
        _faults.point("save.done")


def legacy_bind(
    store: CounterStore, directory: str | os.PathLike[str], *, durability: str = "full"
) -> LegacyV1Shard:
    """The previous release's write-through binding: lock now, save after every public write."""
    shard = LegacyV1Shard(store, directory, durability=durability)
    shard.open()
    store.set_change_hook(shard.save)
    return shard
