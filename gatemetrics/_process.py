"""The engine's process-wide state, in one object with one reset for a forked child.

Stores, shards and bindings are per object; what belongs to the *process* is kept here and only
here: every live store and shard (weakly, so they die normally), the one shard per store and
directory, the live bindings, whether the ``atexit`` save is registered, and the rate limit of
the log lines about unusable directories. :data:`PROCESS` is the single instance; its three
methods are the ``os.register_at_fork`` hooks:

* before a fork, periodic saver threads stop (a process never forks with one of our threads
  running: it may hold a lock the child would inherit held);
* in the parent afterwards, they start again;
* in the child, :meth:`ProcessState.reset_in_child` runs once: a fresh registry lock (a parent
  thread may have held it), every store back to zero as a new process's store (counts made
  before the fork belong to the parent), every shard without an incarnation (its next save
  starts a new one), and then the stopped threads start again.

The members are reached through what they publish for the purpose (the methods named in
:class:`ForkAware` and :class:`Pausable`), never through their private attributes.
"""

from __future__ import annotations

import atexit
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gatemetrics.persistence import PersistedStore
    from gatemetrics.shards import Binding, Shard

__all__ = ["PROCESS", "ForkAware", "ForkFlag", "Pausable", "ProcessState", "fork_flag"]


class ForkAware(Protocol):
    """An object whose state belongs to one process, reset in a forked child."""

    def reset_for_new_process(self) -> None:
        """Forget the parent's state; runs in a forked child before anything else."""


class Pausable(Protocol):
    """An object with a background thread that must not run across a fork."""

    def pause_for_fork(self) -> bool:
        """Stop the thread; True if one ran (it is then resumed on both sides)."""

    def resume_after_fork(self) -> None:
        """Start the thread again (in the parent, and in the child after the reset)."""


class ProcessState:
    """What the engine keeps per process (see the module documentation)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        #: Guards :attr:`shards_of`, :attr:`bindings` and the ``atexit`` registration.
        self.lock = threading.Lock()
        self.stores: weakref.WeakSet[PersistedStore] = weakref.WeakSet()
        self.shards: weakref.WeakSet[Shard] = weakref.WeakSet()
        #: The one shard of each store per directory (by real path).
        self.shards_of: weakref.WeakKeyDictionary[PersistedStore, dict[str, Shard]] = (
            weakref.WeakKeyDictionary()
        )
        self.bindings: weakref.WeakSet[Binding] = weakref.WeakSet()
        #: When each unusable directory was last logged by ``save_to_dir`` (bounded).
        self.unusable_logged: dict[str, float] = {}
        self._atexit: Callable[[], object] | None = None
        self._paused: list[Pausable] = []

    def ensure_atexit(self, func: Callable[[], object]) -> None:
        """Register ``func`` with :mod:`atexit` once per process (a forked child inherits it)."""
        with self.lock:
            if self._atexit is None:
                atexit.register(func)
                self._atexit = func

    # -- fork hooks ----------------------------------------------------------------------------

    def before_fork(self) -> None:
        # Never start a thread in the child before its stores were reset (see reset_in_child).
        self._paused = [b for b in list(self.bindings) if b.pause_for_fork()]

    def after_fork_in_parent(self) -> None:
        self._resume()

    def reset_in_child(self) -> None:
        """The one reset of a forked child: lock, stores, shards, then the paused threads."""
        self.pid = os.getpid()
        self.lock = threading.Lock()
        for store in list(self.stores):
            store.reset_for_new_process()
        for shard in list(self.shards):
            shard.reset_for_new_process()
        self._resume()

    def _resume(self) -> None:
        paused, self._paused = self._paused, []
        for binding in paused:
            binding.resume_after_fork()


class ForkFlag(Protocol):
    """``flag[0]`` is 1 in the process that made the flag and 0 in any process forked from it."""

    def __getitem__(self, index: int, /) -> int: ...


# Linux's MADV_WIPEONFORK (since 4.14): the kernel gives a forked child zeros in place of the
# region's pages. The mmap module of Python 3.11 lacks the constant; the number is the ABI's.
_MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18)


class _PidFlag:
    """The fallback flag, where the kernel cannot wipe a page: a ``getpid`` system call."""

    __slots__ = ("_pid",)

    def __init__(self) -> None:
        self._pid = os.getpid()

    def __getitem__(self, index: int, /) -> int:
        return int(os.getpid() == self._pid)


def fork_flag() -> ForkFlag:
    """A flag that tells, without a system call where the kernel allows it, whether this is
    still the process that made it, however the fork happened (a C extension calling libc's
    ``fork()`` runs no ``os.register_at_fork`` hook, and a child of one would otherwise write
    its counts through its parent's descriptors).

    A byte of a private anonymous page marked ``MADV_WIPEONFORK``, set to 1 here; a forked
    child reads 0. Reading it costs about a tenth of ``os.getpid()``, which is a real system
    call on every call (glibc caches nothing) and measured on every write-through record call
    (benchmarks/PROFILE.md, fifth round). Elsewhere (another kernel, or ``madvise`` refused)
    the flag compares ``os.getpid()``.
    """
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, AttributeError, ValueError):
        return _PidFlag()
    try:
        page.madvise(_MADV_WIPEONFORK)
    except (OSError, AttributeError, ValueError):
        page.close()
        return _PidFlag()
    page[0] = 1
    return page


#: The engine's process-wide state.
PROCESS = ProcessState()

os.register_at_fork(
    before=PROCESS.before_fork,
    after_in_parent=PROCESS.after_fork_in_parent,
    after_in_child=PROCESS.reset_in_child,
)
