"""Per-process shards: a store's cumulative counts on disk, owned by one process incarnation.

A *shard* is one file, ``DIR/shard-<incarnation>.json``, holding the whole cumulative state of one
store in one process incarnation. Its owner:

* takes an exclusive ``flock`` on ``DIR/shard-<incarnation>.lock`` *before* the shard first
  appears and holds it until it dies (the kernel frees it on any death, SIGKILL included). The
  aggregator treats a shard whose lock it can take as dead, and only a dead shard is ever folded
  into the archive or deleted;
* saves by writing ``DIR/shard-<incarnation>.tmp``, optionally fsyncing it, ``os.replace``-ing it
  over the shard and optionally fsyncing the directory, so no reader ever sees a torn shard. A
  temp file left by a killed writer carries its incarnation in its name, so the aggregator
  removes only dead writers' temp files.

An *incarnation* id is unique across pid reuse and across containers sharing the directory: a
host tag (hostname and boot id), the pid, the start time in nanoseconds and 64 random bits.

Fork: counts made before a fork stay with the parent (:mod:`gatemetrics.store` zeroes every store
in a forked child). A child's shards start over as new incarnations; the lifetime lock the child
inherited is the parent's and is never released by the child (filelock 4 closes the inherited
descriptor). A pid guard repeats the reset for forks that bypass ``os.register_at_fork``.

Binding: :func:`bind` makes a store persist itself, either after every public write
(``"write-through"``: exact even if the process is SIGKILLed right after the write returned; one
save per write, about 1 ms with full durability on ext4 (benchmarks figure 2); concurrent writers
share saves, see :meth:`Shard.save`) or from a background thread every ``interval`` seconds
(``"periodic"``). Both save once more at interpreter exit (``atexit``) and in
:func:`close_all_bindings` (gunicorn's ``worker_exit``). Periodic threads are stopped before any
``os.fork`` and restarted after it in parent and child, so a process that forks never does so
with one of our threads running.

Hazards, stated plainly:

* One directory holds one schema. Saving stores of different schemas into one directory makes
  the aggregator quarantine the shards that do not fit its schema.
* A lifetime lock needs a file system with working ``flock`` (local disks, tmpfs; not every NFS).
  There is no silent fallback: without ``flock`` saving fails and is counted as a write failure.
* A process that exits through ``os._exit`` (multiprocessing children do) skips ``atexit``: with
  periodic saving, counts since the last save are lost. Use write-through there, or call
  :meth:`Binding.close` before exiting.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson
from filelock import FileLock, Timeout

from gatemetrics import _faults
from gatemetrics.errors import GatemetricsError, ShardWriteError
from gatemetrics.store import CounterStore, Snapshot

__all__ = [
    "SAVE_STEPS",
    "SHARD_FORMAT",
    "SHARD_VERSION",
    "Binding",
    "Durability",
    "Identity",
    "Shard",
    "bind",
    "close_all_bindings",
    "new_identity",
    "save_to_dir",
    "shard_for",
]

SHARD_FORMAT = "gatemetrics-shard"
SHARD_VERSION = 1

#: The named crash points of a save, in order (see :mod:`gatemetrics._faults`).
SAVE_STEPS = (
    "save.locked",  # lifetime lock held, nothing written yet
    "save.tmp_written",  # temp file complete, not yet fsynced
    "save.tmp_synced",  # temp file fsynced (per durability)
    "save.replaced",  # shard replaced, directory not yet fsynced
    "save.done",  # directory fsynced (per durability)
)

_log = logging.getLogger("gatemetrics.shards")

_INCARNATION = r"[0-9a-f]{8}-[0-9]{1,10}-[0-9a-f]{1,16}-[0-9a-f]{16}"
_NAME = re.compile(rf"shard-(?P<inc>{_INCARNATION})\.(?P<kind>json|lock|tmp)\Z")
_INCARNATION_RE = re.compile(rf"{_INCARNATION}\Z")

# Attempts at a fresh incarnation when its lifetime lock cannot be taken at once: an aggregator
# may be probing or removing that very lock file (see Shard._open_locked).
_LOCK_ATTEMPTS = 5
# One log line per shard at most this often while saves keep failing (they are all counted).
_LOG_EVERY_S = 10.0


class Durability(StrEnum):
    """How hard a save tries to survive a power loss (a process crash never loses a save)."""

    NONE = "none"  # write + rename: survives process death, not a kernel crash
    FILE = "file"  # + fsync of the shard file
    FULL = "full"  # + fsync of the directory after the rename (the default)


def parse_shard_name(name: str) -> tuple[str, Literal["json", "lock", "tmp"]] | None:
    """``(incarnation, kind)`` for a well-formed shard, lock or temp file name, else ``None``."""
    m = _NAME.match(name)
    if m is None:
        return None
    return m["inc"], m["kind"]  # type: ignore[return-value]


def shard_file_names(incarnation: str) -> tuple[str, str, str]:
    """The shard, lock and temp file names of ``incarnation``."""
    return (f"shard-{incarnation}.json", f"shard-{incarnation}.lock", f"shard-{incarnation}.tmp")


def check_writable(store: CounterStore) -> None:
    """``TypeError`` for a read-only view: saved as a shard, it would count every shard twice."""
    if store.read_only:
        raise TypeError(
            f"{type(store).__name__} is a read-only merged view; saving it as a shard would "
            "count every shard in it twice"
        )


def valid_incarnation(value: object) -> bool:
    return isinstance(value, str) and _INCARNATION_RE.match(value) is not None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who owns a shard: one process incarnation."""

    incarnation: str
    pid: int
    host: str
    started_at: float

    def __post_init__(self) -> None:
        if not valid_incarnation(self.incarnation):
            raise ValueError(f"malformed incarnation id {self.incarnation!r}")


_host_cache: tuple[str, str] | None = None


def _host() -> tuple[str, str]:
    """``(hostname, 8-hex tag of hostname and boot id)``; the same for every process here."""
    global _host_cache  # noqa: PLW0603 - a per-host constant, computed once
    if _host_cache is None:
        name = socket.gethostname()
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                boot = f.read().strip()
        except OSError:
            boot = ""
        tag = hashlib.sha256(f"{name}\0{boot}".encode()).hexdigest()[:8]
        _host_cache = (name, tag)
    return _host_cache


def new_identity(*, clock: Callable[[], float] = time.time) -> Identity:
    """A fresh incarnation of the calling process."""
    host, tag = _host()
    pid = os.getpid()
    ns = time.time_ns()
    incarnation = f"{tag}-{pid}-{ns:x}-{secrets.token_hex(8)}"
    return Identity(incarnation, pid, host, float(clock()))


class Shard:
    """The persistence of one store in one directory, by the current process incarnation.

    Obtain it with :func:`shard_for` (one per store and directory, so a store can never own two
    shards of one directory). Thread-safe: saves are serialised. :meth:`save` never raises for
    I/O trouble; it logs, counts a failure in ``failure_key`` (a family without label, if
    given), rolls the store's generation back and returns False.

    After :meth:`close` the lifetime lock is released and the shard is an ordinary dead shard for
    the aggregator to absorb. Saving again starts a new incarnation that carries only the counts
    made since (the closed incarnation keeps what it saved), so nothing is counted twice.
    """

    def __init__(
        self,
        store: CounterStore,
        directory: str | os.PathLike[str],
        *,
        durability: Durability | str = Durability.FULL,
        failure_key: str | None = None,
        identity_factory: Callable[[], Identity] = new_identity,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_writable(store)
        self._store_ref = weakref.ref(store)
        self._schema = store.schema
        self._directory = os.path.abspath(os.fspath(directory))
        self._durability = Durability(durability)
        self._failure_slot = None if failure_key is None else store.schema.slot(failure_key)
        self._identity_factory = identity_factory
        self._clock = clock
        self._save_lock = threading.Lock()
        self._pid = os.getpid()
        self._identity: Identity | None = None
        self._lock: FileLock | None = None
        self._lock_inode: tuple[int, int] | None = None
        # Counts of closed predecessor incarnations, and of this incarnation's last good save.
        self._baseline: tuple[int, ...] = tuple(store.schema.zeros())
        self._last_saved: tuple[int, ...] | None = None
        self._last_log = 0.0
        # Group commit (see save): every save draws a ticket before it takes its snapshot, and
        # records the ticket of the latest save that reached the disk. Both only ever grow, also
        # across incarnations and forks, so durable <= issued always holds.
        self._ticket_lock = threading.Lock()
        self._tickets_issued = 0
        self._ticket_durable = 0
        _SHARDS.add(self)

    # -- introspection -----------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def durability(self) -> Durability:
        return self._durability

    @property
    def identity(self) -> Identity | None:
        """The current incarnation, or None before the first save (and after close/fork)."""
        return self._identity

    @property
    def path(self) -> str | None:
        """The shard file of the current incarnation (None while there is none)."""
        ident = self._identity
        if ident is None:
            return None
        return os.path.join(self._directory, shard_file_names(ident.incarnation)[0])

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> Identity:
        """Create the directory and take the lifetime lock of a new incarnation, if not held.

        Raises :class:`ShardWriteError` when that is impossible (bad directory, no ``flock``).
        Runs on the calling thread and never waits: the lock is taken non-blockingly.
        """
        with self._save_lock:
            self._guard_pid()
            return self._open_locked()

    def save(self) -> bool:
        """Write the store's cumulative counts as this incarnation's shard; never raises.

        Returns once everything the store counted before the call is on disk. Concurrent
        callers share saves (group commit): a caller that waited for another thread's save
        returns without writing when a save that began after its call reached the disk, since
        that save already holds its counts. Under load, one save (and its fsyncs) then serves
        every write-through call that queued behind the previous one.
        """
        store = self._store_ref()
        if store is None:
            return False
        # A save with a ticket above the current one takes its snapshot after this point, so
        # it includes every count the caller made before calling.
        with self._ticket_lock:
            wanted = self._tickets_issued + 1
        with self._save_lock:
            self._guard_pid()
            if self._ticket_durable >= wanted:
                return True
            bumped: tuple[Snapshot, int] | None = None
            path = self._directory
            try:
                ident = self._open_locked()
                path = os.path.join(self._directory, shard_file_names(ident.incarnation)[0])
                _faults.point("save.locked")
                with self._ticket_lock:  # drawn before the snapshot (see above)
                    self._tickets_issued += 1
                    ticket = self._tickets_issued
                bumped = store._bump_generation()
                snap = bumped[0]
                counts = tuple(c - b for c, b in zip(snap.counts, self._baseline, strict=True))
                self._check_monotonic(counts, path)
                self._write(ident, snap, counts)
            except Exception as exc:  # noqa: BLE001 - save never raises; the failure is counted
                if bumped is not None:
                    store._rollback_generation(bumped[0].generation, bumped[1])
                if self._failure_slot is not None:
                    store._count_quietly(self._failure_slot)
                self._log_failure(path, exc)
                return False
            self._last_saved = counts
            self._ticket_durable = ticket
            return True

    def close(self, *, save: bool = True) -> bool:
        """Optionally save once more, then release the lifetime lock (the shard becomes dead).

        Returns the result of the final save (True when none was asked for).
        """
        ok = self.save() if save else True
        with self._save_lock:
            self._guard_pid()
            self._end_incarnation()
        return ok

    def _end_incarnation(self) -> None:
        """Release the lifetime lock; what it saved becomes the baseline of the next one."""
        lock, self._lock = self._lock, None
        if self._last_saved is not None:
            self._baseline = tuple(
                b + s for b, s in zip(self._baseline, self._last_saved, strict=True)
            )
        self._identity = None
        self._lock_inode = None
        self._last_saved = None
        if lock is not None:
            try:
                lock.release()
            except Exception as exc:  # noqa: BLE001 - the kernel frees it at exit anyway
                _log.warning("releasing %s failed: %s", lock.lock_file, exc)

    def unsaved(self) -> bool:
        """Whether the store has counts this incarnation has not saved yet."""
        store = self._store_ref()
        if store is None:
            return False
        counts = store.snapshot().counts
        last = self._last_saved
        if last is None:
            return counts != self._baseline
        return any(c - b != s for c, b, s in zip(counts, self._baseline, last, strict=True))

    # -- internals ---------------------------------------------------------------------------

    def _guard_pid(self) -> None:
        # Called with _save_lock held. The at-fork hook normally did this already; a fork that
        # bypassed it (a C extension calling fork()) must not reuse the parent's incarnation.
        if self._pid != os.getpid():
            store = self._store_ref()
            if store is not None and store.pid != os.getpid():
                store._reset_after_fork()
            self._reset_in_child()

    def _reset_in_child(self) -> None:
        # The inherited lock belongs to the parent: drop it without releasing (filelock 4 has
        # closed the inherited descriptor; a release here would unlock the parent's lock).
        self._save_lock = threading.Lock()
        self._ticket_lock = threading.Lock()  # a parent thread may have held it at the fork
        self._pid = os.getpid()
        self._identity = None
        self._lock = None
        self._lock_inode = None
        self._baseline = tuple(self._schema.zeros())
        self._last_saved = None

    def _still_owned(self, ident: Identity) -> bool:
        """Whether our lock file is still the inode we locked.

        If it vanished or was replaced (the directory removed and recreated, a stray ``rm``),
        aggregators see our shard as dead and may absorb it; writing it again would count it
        twice. Then this incarnation ends and the next one carries only unsaved counts.
        """
        path = os.path.join(self._directory, shard_file_names(ident.incarnation)[1])
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._lock_inode

    def _open_locked(self) -> Identity:
        ident = self._identity
        if ident is not None and self._lock is not None:
            if self._still_owned(ident):
                return ident
            _log.warning(
                "the lifetime lock file of shard %s vanished or was replaced; continuing as a "
                "new incarnation",
                ident.incarnation,
            )
            self._end_incarnation()
        try:
            os.makedirs(self._directory, exist_ok=True)
        except OSError as exc:
            raise ShardWriteError(self._directory, f"cannot create directory: {exc}") from exc
        last: Exception | None = None
        for _ in range(_LOCK_ATTEMPTS):
            ident = self._identity_factory()
            lock_path = os.path.join(self._directory, shard_file_names(ident.incarnation)[1])
            # thread_local=False: the lock is held for the incarnation's whole life and may be
            # released by another thread at exit. fallback_to_soft=False: a marker file that no
            # death removes would make a dead owner look alive forever.
            lock = FileLock(lock_path, timeout=0, thread_local=False, fallback_to_soft=False)
            try:
                lock.acquire(timeout=0)
            except Timeout as exc:
                # Either an aggregator is probing this brand-new lock file, or it removed it as
                # an orphan before our flock (filelock then refuses the unlinked inode). Never
                # wait for it: a fresh incarnation has a fresh lock file.
                last = exc
                continue
            except OSError as exc:
                raise ShardWriteError(lock_path, f"cannot take the lifetime lock: {exc}") from exc
            try:
                st = os.stat(lock_path)
            except OSError as exc:
                lock.release()
                raise ShardWriteError(lock_path, f"lock file vanished: {exc}") from exc
            self._identity, self._lock, self._lock_inode = ident, lock, (st.st_dev, st.st_ino)
            return ident
        raise ShardWriteError(self._directory, f"no lifetime lock after retries: {last}")

    def _check_monotonic(self, counts: tuple[int, ...], path: str) -> None:
        last = self._last_saved
        low = any(c < 0 for c in counts) or (
            last is not None and any(c < s for c, s in zip(counts, last, strict=True))
        )
        if low:
            # restore() with smaller counts on a store that already saved: writing them would
            # make the aggregate go down. Refuse, loudly.
            raise ShardWriteError(path, "store counts went down since the last save; refusing")

    def _write(self, ident: Identity, snap: Snapshot, counts: tuple[int, ...]) -> None:
        name, _, tmp_name = shard_file_names(ident.incarnation)
        path = os.path.join(self._directory, name)
        tmp = os.path.join(self._directory, tmp_name)
        doc: dict[str, Any] = {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "incarnation": ident.incarnation,
            "pid": ident.pid,
            "host": ident.host,
            "started_at": ident.started_at,
            "generation": snap.generation,
            "saved_at": float(self._clock()),
            "counts": Snapshot(
                self._schema, counts, snap.generation, snap.start_timestamp
            ).to_dict(),
        }
        data = orjson.dumps(doc)
        write_file_atomically(
            tmp, path, data, durability=self._durability, mode=0o644, step_prefix="save"
        )

    def _log_failure(self, path: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S or self._last_log == 0.0:
            self._last_log = now
            _log.warning("saving shard %s failed (counted; counts stay in memory): %s", path, exc)


def write_file_atomically(
    tmp: str,
    path: str,
    data: bytes,
    *,
    durability: Durability,
    mode: int,
    step_prefix: str,
) -> None:
    """Write ``data`` to ``tmp``, (fsync), ``os.replace`` it over ``path``, (fsync the directory).

    ``tmp`` is opened without following symlinks and truncated, so one writer per temp name is
    assumed (the caller guarantees it). The mode is set explicitly, whatever the umask. On an
    error before the rename the temp file is removed; a crash leaves it for the aggregator.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            _faults.point(f"{step_prefix}.tmp_written")
            if durability is not Durability.NONE:
                os.fsync(fd)
            _faults.point(f"{step_prefix}.tmp_synced")
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _faults.point(f"{step_prefix}.replaced")
    if durability is Durability.FULL:
        fsync_directory(os.path.dirname(path))
    _faults.point(f"{step_prefix}.done")


def fsync_directory(directory: str) -> None:
    """fsync a directory so a rename or unlink in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory (EINVAL); the rename is still atomic.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


# -- one shard per store and directory -------------------------------------------------------

_SHARDS: weakref.WeakSet[Shard] = weakref.WeakSet()
_REGISTRY: weakref.WeakKeyDictionary[CounterStore, dict[str, Shard]] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def shard_for(
    store: CounterStore,
    directory: str | os.PathLike[str],
    *,
    durability: Durability | str = Durability.FULL,
    failure_key: str | None = None,
    identity_factory: Callable[[], Identity] = new_identity,
) -> Shard:
    """The one :class:`Shard` of ``store`` in ``directory`` (created on first use).

    Directories are told apart by their resolved real path, so two spellings of one directory
    (a symlink, a relative path) share a shard instead of counting the store twice. The options
    apply when the shard is created; later calls get the existing shard unchanged.
    """
    check_writable(store)
    key = os.path.realpath(os.fspath(directory))
    with _REGISTRY_LOCK:
        shards = _REGISTRY.setdefault(store, {})
        shard = shards.get(key)
        if shard is None:
            shard = Shard(
                store,
                key,
                durability=durability,
                failure_key=failure_key,
                identity_factory=identity_factory,
            )
            shards[key] = shard
        return shard


def save_to_dir(
    store: CounterStore,
    directory: str | os.PathLike[str],
    *,
    durability: Durability | str = Durability.FULL,
    failure_key: str | None = None,
) -> bool:
    """Save ``store`` as this process's shard in ``directory``; False (never an error) on failure.

    Raises only ``TypeError`` for a read-only view, which can never be saved.
    """
    try:
        shard = shard_for(store, directory, durability=durability, failure_key=failure_key)
    except (TypeError, GatemetricsError):
        raise
    except Exception as exc:  # noqa: BLE001 - a path that cannot even be resolved
        if failure_key is not None:
            store._count_quietly(store.schema.slot(failure_key))
        _log.warning("saving to %s failed (counted): %s", directory, exc)
        return False
    return shard.save()


# -- binding ----------------------------------------------------------------------------------

Mode = Literal["write-through", "periodic"]


class Binding:
    """A store that persists itself into one directory; see :func:`bind`."""

    def __init__(
        self,
        store: CounterStore,
        directory: str | os.PathLike[str],
        *,
        mode: Mode = "write-through",
        interval: float = 5.0,
        durability: Durability | str = Durability.FULL,
        failure_key: str | None = None,
    ) -> None:
        if mode not in ("write-through", "periodic"):
            raise ValueError(f"mode must be 'write-through' or 'periodic', not {mode!r}")
        if not (isinstance(interval, int | float) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if store._on_change is not None:
            raise GatemetricsError(f"{type(store).__name__} is already bound")
        self._store_ref = weakref.ref(store)
        self._shard = shard_for(store, directory, durability=durability, failure_key=failure_key)
        self._mode = mode
        self._interval = float(interval)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The shard exists, locked, from now on: a bind that cannot work fails here, loudly.
        self._shard.open()
        if mode == "write-through":
            store._set_change_hook(self._shard.save)
        else:
            self._start_thread()
        with _REGISTRY_LOCK:
            _BINDINGS.add(self)
        _ensure_atexit()

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def shard(self) -> Shard:
        return self._shard

    @property
    def closed(self) -> bool:
        return self._closed

    def save(self) -> bool:
        """Save now (any mode); False on failure, never raises."""
        return self._shard.save()

    def close(self, *, save: bool = True) -> bool:
        """Stop persisting: unhook, stop the thread, save once more, release the shard's lock.

        Idempotent. Returns the result of the final save.
        """
        if self._closed:
            return True
        self._closed = True
        store = self._store_ref()
        if store is not None and self._mode == "write-through":
            store._set_change_hook(None)
        self._stop_thread()
        with _REGISTRY_LOCK:
            _BINDINGS.discard(self)
        return self._shard.close(save=save)

    # -- periodic thread ---------------------------------------------------------------------

    def _start_thread(self) -> None:
        if self._closed or self._mode != "periodic":
            return
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(self._stop,), name="gatemetrics-periodic-save", daemon=True
        )
        self._thread = thread
        thread.start()

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30.0)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval):
            if self._shard.unsaved():
                self._shard.save()

    def _before_fork(self) -> bool:
        """Stop the thread before a fork; True if it ran (to restart it afterwards)."""
        running = self._thread is not None
        if running:
            self._stop_thread()
        return running

    def _after_fork(self) -> None:
        self._start_thread()


_BINDINGS: weakref.WeakSet[Binding] = weakref.WeakSet()


def bind(
    store: CounterStore,
    directory: str | os.PathLike[str],
    *,
    mode: Mode = "write-through",
    interval: float = 5.0,
    durability: Durability | str = Durability.FULL,
    failure_key: str | None = None,
) -> Binding:
    """Make ``store`` persist itself as this process's shard in ``directory``.

    ``"write-through"`` saves after every public write, on the writing thread, before the write
    returns; ``"periodic"`` saves every ``interval`` seconds from a daemon thread, when something
    changed. Both save at interpreter exit and in :func:`close_all_bindings`. Takes the lifetime
    lock now (raising :class:`ShardWriteError` if the directory is unusable); a store can have
    one binding at a time (:class:`GatemetricsError` otherwise).
    """
    return Binding(
        store,
        directory,
        mode=mode,
        interval=interval,
        durability=durability,
        failure_key=failure_key,
    )


def close_all_bindings() -> int:
    """Save and close every binding of this process (gunicorn ``worker_exit``, ``atexit``).

    Returns how many final saves failed. Never raises.
    """
    with _REGISTRY_LOCK:
        bindings = list(_BINDINGS)
    failed = 0
    for binding in bindings:
        try:
            if not binding.close():
                failed += 1
        except Exception as exc:  # noqa: BLE001 - exit paths must not raise
            failed += 1
            _log.warning("closing a binding failed: %s", exc)
    return failed


_atexit_registered = False


def _ensure_atexit() -> None:
    global _atexit_registered  # noqa: PLW0603 - registered once per process (inherited by forks)
    with _REGISTRY_LOCK:
        if not _atexit_registered:
            atexit.register(close_all_bindings)
            _atexit_registered = True


# -- fork ------------------------------------------------------------------------------------

_restart_after_fork: list[Binding] = []


def _before_fork() -> None:
    # Never fork with one of our threads running (it may hold a lock the child then inherits
    # held), and never start one in the child before the stores were reset.
    _restart_after_fork[:] = [b for b in list(_BINDINGS) if b._before_fork()]


def _after_fork_in_parent() -> None:
    bindings, _restart_after_fork[:] = list(_restart_after_fork), []
    for binding in bindings:
        binding._after_fork()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK  # noqa: PLW0603 - a lock held by a parent thread is dead here
    _REGISTRY_LOCK = threading.Lock()
    for shard in list(_SHARDS):
        shard._reset_in_child()
    bindings, _restart_after_fork[:] = list(_restart_after_fork), []
    for binding in bindings:
        binding._after_fork()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
