"""Per-process shards: a store's cumulative counts on disk, owned by one process incarnation.

A *shard* is one file, ``DIR/v2-<incarnation>.shard`` (format in :mod:`gatemetrics._format`),
holding the whole cumulative state of one store in one process incarnation. Its owner:

* creates it once, at its full fixed size: writes ``DIR/v2-<incarnation>.creating``, takes an
  exclusive ``flock`` on it, then renames it into place, so a shard never appears short or torn
  and is locked from the moment it exists. The owner keeps that descriptor, and with it the
  lock, for its whole life (the kernel frees it on any death, SIGKILL included). The aggregator
  treats a shard whose ``flock`` it can take as dead, and only a dead shard is ever folded into
  the archive or deleted;
* saves by writing the slot that does not hold its newest state, in place, with one ``pwrite``
  through that descriptor: no temp file, no rename, no fsync by default. A reader takes the valid
  slot with the highest sequence, so a save is visible all at once or not at all, to readers and
  after a SIGKILL at any instant. Because a save never goes through the file's name, a shard that
  was removed (an absorbed dead owner's, or a directory an operator recreated) can never
  reappear with counts that were already counted or thrown away.

An *incarnation* id is unique across pid reuse and across containers sharing the directory: a
host tag (hostname and boot id), the pid, the start time in nanoseconds and 64 random bits.

Durability (:class:`Durability`): a save that returned is in the page cache, which survives any
process death (SIGKILL, OOM kill, a crash). Only a kernel crash or power loss can lose it, unless
``durability="power-loss"`` adds an ``fdatasync`` per save.

Fork: counts made before a fork stay with the parent. The forked child's one reset
(``gatemetrics._process``) zeroes every store and makes every shard start over as a new
incarnation; the child closes its copy of the parent's shard descriptor without unlocking it (an
``flock`` belongs to the open file description, which the parent still holds). A pid guard
repeats the reset of a shard and its store for forks that bypass ``os.register_at_fork`` (on the
write-through fast path, a ``MADV_WIPEONFORK`` byte: :func:`gatemetrics._process.fork_flag`).

A shard talks to its store only through :class:`gatemetrics.persistence.PersistedStore`.

Binding: :func:`bind` makes a store persist itself, either after every public write
(``"write-through"``: exact even if the process is SIGKILLed right after the write returned; one
``pwrite`` of a few hundred bytes per write) or from a background thread every ``interval``
seconds (``"periodic"``).

The write-through fast path (the default durability): the shard lends its store a slot image
(:class:`gatemetrics._format.SlotImage`, see :meth:`gatemetrics.CounterStore.lend_cells`), so
the store counts in the very bytes of the slot, and its change hook, installed ``under_lock``,
writes the image while the write's own lock is held: a checksum and one ``pwrite``, no snapshot,
no packing, no second lock (:meth:`Shard.write_through_hook`). ``power-loss`` durability, a
restored store and an incarnation with a baseline save through the snapshot instead, where
concurrent callers share a save (group commit).

Both modes save once more at interpreter exit (``atexit``) and in
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
* A shard removed or replaced behind its owner's back (``rm``, the directory recreated) is
  noticed within :data:`VANISHED_CHECK_S`: the owner then starts a new incarnation carrying only
  the counts made after its last save into the removed file. Saves made into the removed file in
  that window are lost, never counted twice.
* On the write-through fast path the store's lock is held during the ``pwrite``: a file system
  that stalls a write (a hung network mount) stalls every thread recording into that store, and
  its readers (:meth:`gatemetrics.CounterStore.snapshot`), not only the savers. A local disk or
  tmpfs answers a ``pwrite`` of a few hundred bytes in well under a microsecond of kernel time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from gatemetrics import _faults
from gatemetrics._checks import check_seconds, check_writable
from gatemetrics._flock import try_flock
from gatemetrics._format import SlotImage, layout_for, v2_names, valid_incarnation
from gatemetrics._process import PROCESS, fork_flag
from gatemetrics.errors import GatemetricsError, ShardWriteError
from gatemetrics.persistence import Durability, LockedHook, Mode, PersistedStore

__all__ = [
    "CREATE_STEPS",
    "SAVE_STEPS",
    "VANISHED_CHECK_S",
    "Binding",
    "Durability",
    "Identity",
    "Mode",
    "Shard",
    "bind",
    "close_all_bindings",
    "fsync_directory",
    "new_identity",
    "save_to_dir",
    "shard_for",
    "write_file_atomically",
]

#: The named crash points of creating a shard, in order (see :mod:`gatemetrics._faults`).
CREATE_STEPS = (
    "create.locked",  # temp file created and locked, empty
    "create.written",  # temp file complete (header and both slots), not yet renamed
    "create.renamed",  # the shard is in place
    "create.done",  # directory fsynced (power-loss durability only)
)
#: The named crash points of a save, in order.
SAVE_STEPS = (
    "save.locked",  # save lock held, shard open, nothing written yet
    "save.written",  # the slot is written (the save is visible and survives process death)
    "save.done",  # fdatasync done (power-loss durability only)
)
#: How often (seconds, at most) a saving owner checks that its shard is still at its path.
VANISHED_CHECK_S = 1.0

_log = logging.getLogger("gatemetrics.shards")

# The functions of the write-through fast path, looked up once (Shard._changed).
_crc32 = zlib.crc32
_pwrite = os.pwrite

# Attempts at a fresh incarnation when creating its shard collides with an aggregator that is
# probing or removing that very temp file (see Shard._create).
_CREATE_ATTEMPTS = 5
# One log line per shard at most this often while saves keep failing (they are all counted).
_LOG_EVERY_S = 10.0


class _Retry(Exception):
    """Creating a shard should be tried again with a fresh incarnation."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


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
        store: PersistedStore,
        directory: str | os.PathLike[str],
        *,
        durability: Durability | str = Durability.PROCESS_CRASH,
        failure_key: str | None = None,
        identity_factory: Callable[[], Identity] = new_identity,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_writable(store)
        self._store_ref = weakref.ref(store)
        self._schema = store.schema
        self._layout = layout_for(store.schema)
        self._directory = os.path.abspath(os.fspath(directory))
        self._durability = Durability(durability)
        self._sync = self._durability is Durability.POWER_LOSS
        self._failure_slot = None if failure_key is None else store.schema.slot(failure_key)
        self._identity_factory = identity_factory
        self._clock = clock
        self._save_lock = threading.Lock()
        self._pid = os.getpid()
        self._identity: Identity | None = None
        self._fd: int | None = None  # the shard's descriptor; holds the lifetime lock
        self._inode: tuple[int, int] | None = None
        self._header_len = 0
        # Where slot A (even seq) and slot B (odd seq) start, from the header's length.
        self._slot_offsets = (0, 0)
        self._seq = 0  # the slot sequence of the last good save of this incarnation
        # The wall-clock time of the last and of the next "still at its path?" check (the
        # clock the saves stamp anyway; one that went back makes the check due at once).
        self._checked_at = 0.0
        self._next_check = 0.0
        # Counts of closed predecessor incarnations (None: all zero, the common case), and of
        # this incarnation's last good save.
        self._baseline: tuple[int, ...] | None = None
        self._last_saved: tuple[int, ...] | None = None
        # Histogram sums are floats: a baseline built by adding saved differences back up could
        # round above the store's own sum, and the next incarnation would save a negative one.
        # So the baseline is the store's absolute sums at the ended incarnation's last save.
        self._sum_baseline: tuple[float, ...] | None = None
        self._last_sums: tuple[float, ...] | None = None  # absolute, at the last save
        self._restores_seen = store.restores
        self._last_log = 0.0
        # Group commit (see save): every save draws a ticket before it takes its snapshot, and
        # records the ticket of the latest save that reached the file. Both only ever grow, also
        # across incarnations and forks, so durable <= issued always holds.
        self._ticket_lock = threading.Lock()
        self._tickets_issued = 0
        self._ticket_durable = 0
        # The write-through fast path (see _changed): whether this shard lends its store a slot
        # image, the image lent (None while none is), the store's lock that guards it, and
        # whether the image's cells are exactly what the file holds (False after a write that
        # failed, or that never ran because an exception stopped it).
        self._lends = False
        self._image: SlotImage | None = None
        self._cells_lock: threading.Lock | None = None
        self._image_clean = False
        self._image_error: Exception | None = None
        self._image_fd = -1  # the shard's descriptor while an image is lent
        # 0 in a forked child however it forked: the fast path's pid guard (see fork_flag).
        self._same_process = fork_flag()
        PROCESS.shards.add(self)

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
        return os.path.join(self._directory, v2_names(ident.incarnation)[0])

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> Identity:
        """Create this incarnation's shard (locked for life), if there is none yet.

        Raises :class:`ShardWriteError` when that is impossible (bad directory, no ``flock``).
        Runs on the calling thread and never waits: the lock is taken non-blockingly.
        """
        with self._save_lock:
            self._guard_pid()
            return self._open_locked()

    def write_through_hook(self) -> LockedHook:
        """The change hook a write-through binding installs ``under_lock`` (see
        :meth:`gatemetrics.CounterStore.set_change_hook`): after every write, with the store's
        lock held, it saves the write before the lock is released.

        With the default durability it makes the shard lend its store a slot image
        (:class:`gatemetrics._format.SlotImage`): the store counts in the slot's own bytes, and
        a save is a checksum and one ``pwrite`` under the lock the write already holds, with no
        snapshot, no packing and no other lock. ``power-loss`` durability never lends (an
        ``fdatasync`` must not run under the store's lock): its hook runs :meth:`save` once the
        lock is released, where concurrent savers share an ``fdatasync`` (group commit).
        """
        self._lends = not self._sync and self._layout.image() is not None
        return self._changed

    def _changed(self, checks: bool = True) -> Callable[[], object] | None:
        """The write-through hook: called with the store's lock held, right after a write, it
        writes the lent image as the next slot (so no write lands between the checksum and the
        ``pwrite``).

        Returns None once the write is in the shard, else what the writer runs after the lock
        is released: :meth:`save` (no image lent, a fork, or the throttled "still at its
        path?" check due) or the handling of a failed write. A failed write leaves the last
        good slot untouched; the next one rewrites the same slot with everything. Never raises
        (but for a test's simulated crash). :meth:`save` calls it with ``checks`` False, the
        save lock held and those checks done.
        """
        image = self._image
        now = self._clock()
        if checks:
            if image is None or not image.lent or not self._same_process[0]:
                return self.save  # not lent (yet, or any more), or a fork that bypassed hooks
            if not self._checked_at <= now < self._next_check:
                # The check comes first, as in save(): a write into a removed shard would be
                # lost. Until save() writes it, this write is only in the image.
                self._image_clean = False
                return self.save
        assert image is not None
        # Every write-through record call pays what follows, so it is one function (each call
        # and attribute lookup shows in figure 1, benchmarks/PROFILE.md, fifth round): the
        # crash points skipped inline when no test hook is installed, and SlotImage.seal
        # inlined (the same two steps; test_shard_saving checks the bytes against it).
        self._image_clean = False
        seq = self._seq + 1
        generation = image.generation + 1
        faults = _faults.HOOK
        try:
            if faults is not None:
                _faults.point("save.locked")
            data = image.buffer
            image.pack_head(data, 0, seq, generation, now, image.start)
            image.crc[0] = _crc32(image.body)
            if _pwrite(self._image_fd, data, self._slot_offsets[seq & 1]) != image.size:
                raise OSError(errno.EIO, "short write to the shard")
            if faults is not None:
                _faults.point("save.written")
                _faults.point("save.done")
        except Exception as exc:  # noqa: BLE001 - a save never raises; the failure is counted
            self._image_error = exc
            return self._after_image_failure
        self._seq = seq
        image.generation = generation
        self._image_clean = True
        return None

    def _after_image_failure(self) -> None:
        # Run by the writer once the store's lock is released.
        store = self._store_ref()
        if store is not None:
            exc = self._image_error or OSError(errno.EIO, "write to the shard failed")
            self._count_failure(store, exc)

    def save(self) -> bool:  # noqa: PLR0912, PLR0915 - the write-through hot path, inlined
        """Write the store's cumulative counts into this incarnation's shard; never raises.

        Returns once everything the store counted before the call is in the file. Concurrent
        callers share saves (group commit): a caller that waited for another thread's save
        returns without writing when a save that began after its call reached the file, since
        that save already holds its counts.
        """
        store = self._store_ref()
        if store is None:
            return False
        # A save with a ticket above the current one takes its snapshot after this point, so
        # it includes every count the caller made before calling.
        with self._ticket_lock:
            wanted = self._tickets_issued + 1
        # This is every write-through record call's cost, so the lock is taken with
        # acquire/try/finally (cheaper than ``with`` on CPython 3.11, benchmarks/PROFILE.md) and
        # the crash points are skipped inline when no test hook is installed (a call each
        # otherwise). The lock released is the one acquired, even when _guard_pid replaces it.
        save_lock = self._save_lock
        save_lock.acquire()
        try:
            if self._pid != os.getpid():
                self._guard_pid()
            if self._ticket_durable >= wanted:
                return True
            generation = 0
            try:
                fd = self._fd
                if fd is None or not self._checked_at <= self._clock() < self._next_check:
                    self._open_locked()
                    fd = self._fd
                    assert fd is not None
                with self._ticket_lock:  # drawn before the snapshot (see above)
                    self._tickets_issued += 1
                    ticket = self._tickets_issued
                if self._lends and self._save_lent(store):
                    self._ticket_durable = ticket
                    return True
                if _faults.HOOK is not None:
                    _faults.point("save.locked")
                (counts, generation, start, restores), totals = store.begin_save_cells()
                sums = totals
                if (
                    self._baseline is not None
                    or self._sum_baseline is not None
                    or restores != self._restores_seen
                ):
                    counts, sums = self._this_incarnation(counts, totals, restores)
                seq = self._seq + 1
                data = self._layout.pack(seq, generation, self._clock(), start, counts, sums=sums)
                if os.pwrite(fd, data, self._slot_offsets[seq & 1]) != len(data):
                    raise OSError(errno.EIO, "short write to the shard")
                if _faults.HOOK is not None:
                    _faults.point("save.written")
                if self._sync:
                    os.fdatasync(fd)
                if _faults.HOOK is not None:
                    _faults.point("save.done")
            except Exception as exc:  # noqa: BLE001 - save never raises; the failure is counted
                # The slot with the last good save was not touched: the next save rewrites the
                # same (possibly torn) slot with the same sequence.
                if generation:
                    store.abort_save(generation)
                self._count_failure(store, exc)
                return False
            self._seq = seq
            self._last_saved = counts
            self._last_sums = totals
            self._restores_seen = restores
            self._ticket_durable = ticket
            return True
        finally:
            save_lock.release()

    def _save_lent(self, store: PersistedStore) -> bool:
        """The save of a shard that lends its store an image (save lock held): lend one if
        none is lent and the store may count in it, then write it under the store's lock. False
        when no image is lent (the caller saves through the snapshot); raises the write's
        error when it failed."""
        image = self._image
        if image is not None and not image.lent:
            self._drop_image()  # the store took its cells back (a restore)
            image = None
        if image is None:
            if (
                self._baseline is not None
                or self._sum_baseline is not None
                or store.restores != self._restores_seen
                or self._fd is None
            ):
                return False  # the snapshot path subtracts baselines and checks restores
            image = self._layout.image()
            assert image is not None  # _lends is only set where images exist
            self._image_fd = self._fd
            self._cells_lock = store.lend_cells(image)
            self._image = image
        lock = self._cells_lock
        assert lock is not None
        lock.acquire()
        try:
            lent = image.lent
            failed = lent and self._changed(False) is not None
        finally:
            lock.release()
        if not lent:  # taken back since (a restore): the snapshot path
            self._drop_image()
            return False
        if failed:
            raise self._image_error or OSError(errno.EIO, "write to the shard failed")
        return True

    def _drop_image(self) -> None:
        """Forget an image the store no longer counts in (save lock held): what the file's
        newest slot holds becomes this incarnation's last save.

        Read back from the file rather than taken from the image: the image may hold counts
        that never reached the file (a failed write, or a write made after the hook was
        removed), and those must be saved by the next incarnation, not counted as saved.
        """
        image, self._image = self._image, None
        self._cells_lock = None
        if image is None or self._seq == 0:
            return  # nothing saved in this incarnation yet
        live = (tuple(image.counts), tuple(image.sums))
        cells = self._read_own_slot(live)
        if cells is None:
            # Unreadable, or not what this owner wrote (someone with write access to the
            # file): the image stands for it. Counts that are in the image but never reached
            # the file (failed saves, and the write that found the shard gone) are then lost,
            # never counted twice: a copy of the file may still be counted by an aggregator.
            _log.warning("shard %s: its last save cannot be read back", self.path)
            cells = live
        self._last_saved, self._last_sums = cells

    def _read_own_slot(
        self, live: tuple[tuple[int, ...], tuple[float, ...]]
    ) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """The cells of this owner's newest slot, if it reads back as what this owner last
        wrote: its sequence, checksum, and cells no higher than the store's ``live`` ones."""
        fd = self._fd
        if fd is None:
            return None
        try:
            data = os.pread(fd, self._layout.slot_size, self._slot_offsets[self._seq & 1])
        except OSError:
            return None
        slot = self._layout.unpack_slot(data)
        if slot is None:
            return None
        seq, counts, sums = slot
        ours = (
            seq == self._seq
            and all(0 <= c <= n for c, n in zip(counts, live[0], strict=True))
            and all(0.0 <= f <= n for f, n in zip(sums, live[1], strict=True))
        )
        return (counts, sums) if ours else None

    def close(self, *, save: bool = True) -> bool:
        """Optionally save once more, then release the lifetime lock (the shard becomes dead).

        Returns the result of the final save (True when none was asked for).
        """
        # The final save checks that the shard is still at its path whatever the throttle says:
        # counts written into a removed file would be lost with the process.
        self._next_check = 0.0
        ok = self.save() if save else True
        with self._save_lock:
            self._guard_pid()
            self._end_incarnation()
        return ok

    def unsaved(self) -> bool:
        """Whether the store has counts this incarnation has not saved yet."""
        store = self._store_ref()
        if store is None:
            return False
        image = self._image
        if image is not None and image.lent:
            return not self._image_clean
        counts = store.snapshot().counts
        baseline = self._baseline or (0,) * len(counts)
        last = self._last_saved
        if last is None:
            return counts != baseline
        return any(c - b != s for c, b, s in zip(counts, baseline, last, strict=True))

    # -- internals ---------------------------------------------------------------------------

    def _end_incarnation(self) -> None:
        """Close the shard (releasing its lock); what it saved becomes the next baseline."""
        image = self._image
        if image is not None:
            store = self._store_ref()
            if store is not None and image.lent:
                store.reclaim_cells()
            self._drop_image()
        fd, self._fd = self._fd, None
        if self._last_saved is not None:
            base = self._baseline or (0,) * len(self._last_saved)
            self._baseline = tuple(b + s for b, s in zip(base, self._last_saved, strict=True))
            self._sum_baseline = self._last_sums
        self._identity = None
        self._inode = None
        self._last_saved = None
        self._seq = 0
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:  # the kernel frees the lock at exit anyway
                _log.warning("closing shard descriptor %d failed: %s", fd, exc)

    def _guard_pid(self) -> None:
        # Called with _save_lock held. The at-fork hook normally did this already; a fork that
        # bypassed it (a C extension calling fork()) must not reuse the parent's incarnation.
        if self._pid != os.getpid():
            store = self._store_ref()
            if store is not None and store.pid != os.getpid():
                store.reset_for_new_process()
            self.reset_for_new_process()

    def reset_for_new_process(self) -> None:
        """Forget the parent's incarnation (the engine calls this in a forked child).

        The next save starts a new incarnation with only the child's counts. Not for callers:
        in the process that owns the shard it would abandon the lifetime lock's descriptor.
        """
        # The inherited descriptor shares the parent's open file description, and with it the
        # parent's flock: close our copy without LOCK_UN (which would unlock the parent's).
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._save_lock = threading.Lock()
        self._ticket_lock = threading.Lock()  # a parent thread may have held it at the fork
        self._image = None  # the parent's; the store's reset took its cells back
        self._cells_lock = None
        self._same_process = fork_flag()
        self._pid = os.getpid()
        self._identity = None
        self._inode = None
        self._seq = 0
        self._baseline = None
        self._last_saved = None
        self._sum_baseline = None
        self._last_sums = None
        store = self._store_ref()
        self._restores_seen = store.restores if store is not None else 0

    def _still_in_place(self) -> bool:
        """Whether our shard is still the file at its path.

        If it vanished or was replaced (the directory removed and recreated, a stray ``rm``),
        what we write there is invisible to aggregators; recreating it with every count would
        bring back counts that were thrown away. Then this incarnation ends and the next one
        carries only the counts made after its last save.
        """
        path = self.path
        if path is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def _schedule_check(self) -> None:
        # The next "still at its path?" check, VANISHED_CHECK_S from now on the saves' clock.
        self._checked_at = now = self._clock()
        self._next_check = now + VANISHED_CHECK_S

    def _open_locked(self) -> Identity:
        ident = self._identity
        if ident is not None and self._fd is not None:
            self._schedule_check()
            if self._still_in_place():
                return ident
            _log.warning(
                "shard %s vanished or was replaced; continuing as a new incarnation",
                ident.incarnation,
            )
            self._end_incarnation()
        return self._create()

    def _create(self) -> Identity:
        """Create a new incarnation's shard: temp file, flock, full contents, rename."""
        store = self._store_ref()
        start = store.start_timestamp if store is not None else 0.0
        try:
            os.makedirs(self._directory, exist_ok=True)
        except OSError as exc:
            raise ShardWriteError(self._directory, f"cannot create directory: {exc}") from exc
        last: Exception | None = None
        for _ in range(_CREATE_ATTEMPTS):
            ident = self._identity_factory()
            header = self._layout.header(
                incarnation=ident.incarnation,
                pid=ident.pid,
                host=ident.host,
                started_at=ident.started_at,
            )
            try:
                fd, st = self._create_file(ident, header, start)
            except _Retry as retry:
                last = retry.cause
                continue
            self._fd, self._identity = fd, ident
            self._inode = (st.st_dev, st.st_ino)
            self._header_len = len(header)
            layout = self._layout
            self._slot_offsets = (
                layout.slot_offset(self._header_len, 0),
                layout.slot_offset(self._header_len, 1),
            )
            self._seq = 0
            self._last_saved = None
            self._schedule_check()
            return ident
        raise ShardWriteError(self._directory, f"no new shard after retries: {last}")

    def _create_file(
        self, ident: Identity, header: bytes, start: float
    ) -> tuple[int, os.stat_result]:
        """One attempt at ``ident``'s shard: its locked descriptor and its stat.

        Raises :class:`_Retry` when a fresh incarnation should try again, and
        :class:`ShardWriteError` when no attempt can succeed.
        """
        name, tmp_name = v2_names(ident.incarnation)
        path = os.path.join(self._directory, name)
        tmp = os.path.join(self._directory, tmp_name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileExistsError as exc:  # an id collision or a planted file: a new id
            raise _Retry(exc) from None
        except OSError as exc:
            raise ShardWriteError(tmp, f"cannot create the shard: {exc}") from exc
        done = False
        try:
            try:
                locked = try_flock(fd)
            except OSError as exc:
                raise ShardWriteError(tmp, f"cannot take the lifetime lock: {exc}") from exc
            if not locked:
                # An aggregator is probing this brand-new temp file (it may remove it as an
                # orphan): never wait for it, a fresh incarnation has a fresh file.
                raise _Retry(BlockingIOError(errno.EWOULDBLOCK, "locked by another process"))
            _faults.point("create.locked")
            os.fchmod(fd, 0o644)  # whatever the umask: aggregators of other users read it
            view = memoryview(self._layout.new_file(header, start))
            while view:
                view = view[os.write(fd, view) :]
            _faults.point("create.written")
            if self._sync:
                os.fsync(fd)
            try:
                os.rename(tmp, path)
            except FileNotFoundError as exc:  # an aggregator removed it before our flock
                raise _Retry(exc) from None
            _faults.point("create.renamed")
            if self._sync:
                fsync_directory(self._directory)
            _faults.point("create.done")
            st = os.fstat(fd)
            done = True
        except OSError as exc:
            raise ShardWriteError(tmp, f"cannot create the shard: {exc}") from exc
        finally:
            if not done:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return fd, st

    def _this_incarnation(
        self, counts: tuple[int, ...], totals: tuple[float, ...], restores: int
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The counts and sums this incarnation saves, from the store's absolute ones: less
        the closed predecessors' (the baselines), checked not to have gone down after a
        restore (:class:`ShardWriteError`). Only a reopened shard or a restored store needs it;
        a save without either writes the store's cells as they are."""
        baseline = self._baseline
        if baseline is not None:
            counts = tuple(c - b for c, b in zip(counts, baseline, strict=True))
        if restores != self._restores_seen:
            self._check_monotonic(counts, totals)
        sums = totals
        if self._sum_baseline is not None:
            # Never below zero: totals >= baseline (sums only grow), and a float
            # difference of two ordered floats is >= 0; max() keeps that explicit.
            sums = tuple(max(0.0, t - b) for t, b in zip(totals, self._sum_baseline, strict=True))
        return counts, sums

    def _check_monotonic(self, counts: tuple[int, ...], sums: tuple[float, ...]) -> None:
        # Only after a restore(): a restored store with smaller counts (or histogram sums) than
        # it saved would make the aggregate go down. Refuse, loudly (restore the larger
        # counts, or use a new store).
        last = self._last_saved
        low = any(c < 0 for c in counts) or (
            last is not None and any(c < s for c, s in zip(counts, last, strict=True))
        )
        floor = self._last_sums if self._last_sums is not None else self._sum_baseline
        if floor is not None and any(t < f for t, f in zip(sums, floor, strict=True)):
            low = True
        if low:
            raise ShardWriteError(
                self.path or self._directory, "store counts went down since the last save"
            )

    def _count_failure(self, store: PersistedStore, exc: Exception) -> None:
        """Count a failed save in the failure key (if any) and log it (rate-limited)."""
        if self._failure_slot is not None:
            store.count_failure(self._failure_slot)
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S or self._last_log == 0.0:
            self._last_log = now
            path = self.path or self._directory
            _log.warning("saving shard %s failed (counted; counts stay in memory): %s", path, exc)


def write_file_atomically(
    tmp: str,
    path: str,
    data: bytes,
    *,
    sync: bool = True,
    mode: int,
    step_prefix: str,
    dir_fd: int | None = None,
) -> None:
    """Write ``data`` to ``tmp``, (fsync), ``os.replace`` it over ``path``, (fsync the directory).

    For the files that are replaced whole (the archive, the textfile). With ``dir_fd`` both
    names are relative to that directory descriptor (and must be plain names); without it they
    are paths in one directory. One writer per temp name is assumed (the caller guarantees it,
    by a lock or by a per-process name), so whatever sits under ``tmp`` is a crashed writer's
    leftover or was planted: it is removed (never followed, never truncated in place, so a
    planted symlink or hard link cannot redirect the write) and the temp file is created
    exclusively. The rename replaces whatever is at ``path`` (a symlink there is replaced, not
    followed). The mode is set explicitly, whatever the umask. On an error before the rename
    the temp file is removed; a crash leaves it for the next run to remove.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(tmp, dir_fd=dir_fd)  # IsADirectoryError for a planted directory
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            _faults.point(f"{step_prefix}.tmp_written")
            if sync:
                os.fsync(fd)
            _faults.point(f"{step_prefix}.tmp_synced")
        finally:
            os.close(fd)
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except Exception:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    _faults.point(f"{step_prefix}.replaced")
    if sync:
        fsync_directory(os.path.dirname(path) if dir_fd is None else dir_fd)
    _faults.point(f"{step_prefix}.done")


def fsync_directory(directory: str | int) -> None:
    """fsync a directory (a path, or a descriptor of it) so a rename or unlink in it survives
    a power loss."""
    fd = (
        os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if isinstance(directory, str)
        else directory
    )
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory (EINVAL); the rename is still atomic.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        if fd is not directory:
            os.close(fd)


# -- one shard per store and directory -------------------------------------------------------


def shard_for(
    store: PersistedStore,
    directory: str | os.PathLike[str],
    *,
    durability: Durability | str = Durability.PROCESS_CRASH,
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
    with PROCESS.lock:
        shards = PROCESS.shards_of.setdefault(store, {})
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
    store: PersistedStore,
    directory: str | os.PathLike[str],
    *,
    durability: Durability | str = Durability.PROCESS_CRASH,
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
            store.count_failure(store.schema.slot(failure_key))
        # Like a shard's own failures: one line per directory at most every _LOG_EVERY_S.
        key = repr(directory)[:300]
        now = time.monotonic()
        logged = PROCESS.unusable_logged
        last = logged.get(key)
        if last is None or now - last >= _LOG_EVERY_S:
            if len(logged) >= 64:
                logged.clear()
            logged[key] = now
            _log.warning("saving to %s failed (counted): %s", directory, exc)
        return False
    return shard.save()


# -- binding ----------------------------------------------------------------------------------


class Binding:
    """A store that persists itself into one directory; see :func:`bind`."""

    def __init__(
        self,
        store: PersistedStore,
        directory: str | os.PathLike[str],
        *,
        mode: Mode = "write-through",
        interval: float = 5.0,
        durability: Durability | str = Durability.PROCESS_CRASH,
        failure_key: str | None = None,
    ) -> None:
        if mode not in ("write-through", "periodic"):
            raise ValueError(f"mode must be 'write-through' or 'periodic', not {mode!r}")
        seconds = check_seconds("interval", interval)
        check_writable(store)
        if store.change_hook is not None:
            raise GatemetricsError(f"{type(store).__name__} is already bound")
        self._store_ref = weakref.ref(store)
        self._shard = shard_for(store, directory, durability=durability, failure_key=failure_key)
        self._mode = mode
        self._interval = seconds
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The shard exists, locked, from now on: a bind that cannot work fails here, loudly.
        self._shard.open()
        if mode == "write-through":
            store.set_change_hook(self._shard.write_through_hook(), under_lock=True)
        else:
            self._start_thread()
        with PROCESS.lock:
            PROCESS.bindings.add(self)
        PROCESS.ensure_atexit(close_all_bindings)

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
            store.set_change_hook(None)
        self._stop_thread()
        with PROCESS.lock:
            PROCESS.bindings.discard(self)
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

    # -- fork (called by gatemetrics._process, see gatemetrics._process.Pausable) -------------

    def pause_for_fork(self) -> bool:
        """Stop the thread before a fork; True if it ran (to restart it afterwards)."""
        running = self._thread is not None
        if running:
            self._stop_thread()
        return running

    def resume_after_fork(self) -> None:
        """Start the periodic thread again after a fork (a no-op unless periodic and open)."""
        self._start_thread()


def bind(
    store: PersistedStore,
    directory: str | os.PathLike[str],
    *,
    mode: Mode = "write-through",
    interval: float = 5.0,
    durability: Durability | str = Durability.PROCESS_CRASH,
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
    with PROCESS.lock:
        bindings = list(PROCESS.bindings)
    failed = 0
    for binding in bindings:
        try:
            if not binding.close():
                failed += 1
        except Exception as exc:  # noqa: BLE001 - exit paths must not raise
            failed += 1
            _log.warning("closing a binding failed: %s", exc)
    return failed
