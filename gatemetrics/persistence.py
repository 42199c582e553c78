"""The public types of persistence: durability, binding modes, and the store/shard protocol.

:class:`PersistedStore` is the whole contract between a store and the :class:`~gatemetrics.Shard`
and :class:`~gatemetrics.Binding` that persist it; :class:`~gatemetrics.CounterStore` implements
it, and persistence uses nothing else of a store. A save is a three-step exchange:

1. :meth:`PersistedStore.begin_save` advances the store's generation and returns, atomically,
   the :data:`SaveState` that carries it (counts, generation, start time, restores);
2. the shard writes it; if that fails, :meth:`PersistedStore.abort_save` gives the generation
   back (unless a later save moved it on) and :meth:`PersistedStore.count_failure` counts the
   failure without notifying the change hook (which is what was failing);
3. between saves, the *change hook* (:meth:`PersistedStore.set_change_hook`) is how a
   write-through binding hears of each public write: called once per write, on the writing
   thread, after the counts are visible and the store's lock released.

The write-through fast path (the default durability, ``process-crash``): a shard lends the
store a :class:`CellImage` (:meth:`PersistedStore.lend_cells`), the slot it writes, kept in
memory. The store's cells *are* that slot's cells from then on, and the shard's change hook,
installed ``under_lock``, runs with the store's lock held after each write: it seals the image
(sequence, generation, checksum) and writes it with one ``pwrite``, and no snapshot, no packing
and no second lock are needed. The store takes its cells back (``lent`` becomes False) on a
restore, in a forked child and on :meth:`PersistedStore.reclaim_cells`; the shard then saves
through the exchange above again.

:meth:`PersistedStore.reset_for_new_process` is the store's part of the forked child's reset
(``gatemetrics._process``): counts made before a fork belong to the parent.
"""

from __future__ import annotations

import enum
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

if TYPE_CHECKING:
    from gatemetrics.schema import Schema
    from gatemetrics.store import Snapshot

__all__ = ["CellImage", "Durability", "LockedHook", "Mode", "PersistedStore", "SaveState"]

#: How a bound store persists itself: after every public write, or from a thread.
Mode = Literal["write-through", "periodic"]

#: What :meth:`PersistedStore.begin_save` returns: ``(counts, generation, start_timestamp,
#: restores)``, a plain tuple because it is built on every write-through save.
SaveState: TypeAlias = tuple[tuple[int, ...], int, float, int]

#: A change hook installed ``under_lock``: called with the store's lock held, it returns None
#: or what the writer calls once the lock is released.
LockedHook: TypeAlias = Callable[[], Callable[[], object] | None]


class CellImage(Protocol):
    """What a store needs of an image it counts in (see :meth:`PersistedStore.lend_cells`;
    :class:`gatemetrics._format.SlotImage` is the one the engine lends)."""

    #: The integer cells (int64) and float cells (float64), in the schema's slot order.
    counts: memoryview[int]
    sums: memoryview[float]
    #: The store's generation while the image is lent (the store's own otherwise), and its
    #: start timestamp (set when lent).
    generation: int
    start: float
    #: True from :meth:`PersistedStore.lend_cells` until the store takes its cells back.
    lent: bool


# The previous release's durability names, accepted with a DeprecationWarning.
_LEGACY_DURABILITY = {"none": "process-crash", "file": "power-loss", "full": "power-loss"}


class Durability(enum.StrEnum):
    """What a save that returned survives.

    ``process-crash`` (the default): any process death (SIGKILL, OOM kill, a crash); no fsync on
    the request path. ``power-loss``: also a kernel crash or power loss, at the price of an
    ``fdatasync`` per save. The previous release's ``none`` maps to ``process-crash``, ``file``
    and ``full`` to ``power-loss``, with a ``DeprecationWarning``.
    """

    PROCESS_CRASH = "process-crash"
    POWER_LOSS = "power-loss"

    @classmethod
    def from_setting(cls, value: str) -> tuple[Durability, str | None]:
        """The member a setting names, and a deprecation message for a legacy name (or None).

        ``ValueError`` for anything else. For settings read from the environment, which log
        the message rather than raise a warning.
        """
        new = _LEGACY_DURABILITY.get(value)
        if new is None:
            return cls(value), None
        return cls(new), (
            f"durability {value!r} is deprecated since shard format v2; it now means {new!r}. "
            "Use 'process-crash' (the default: survives any process death, no fsync) or "
            "'power-loss' (an fdatasync per save)"
        )

    @classmethod
    def _missing_(cls, value: object) -> Durability | None:
        if not isinstance(value, str) or value not in _LEGACY_DURABILITY:
            return None
        member, message = cls.from_setting(value)
        warnings.warn(message or "", DeprecationWarning, stacklevel=_outside_stacklevel())
        return member


def _outside_stacklevel() -> int:
    """The ``stacklevel`` that names the first caller outside gatemetrics and :mod:`enum`.

    ``Durability("full")`` reaches ``_missing_`` through the enum machinery and maybe through
    our own constructors; a warning attributed to either would be hidden by Python's default
    filters (which show a DeprecationWarning only when ``__main__`` triggers it) and would not
    tell the user which line to change. (``skip_file_prefixes`` needs Python 3.12.)
    """
    skip = (os.path.dirname(__file__) + os.sep, enum.__file__)
    frame = sys._getframe(1)  # the caller of this function: stacklevel 1 of warnings.warn
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
        level += 1
    return level


class PersistedStore(Protocol):
    """What a shard or binding needs of the store it persists (see the module documentation).

    Implemented by :class:`~gatemetrics.CounterStore`. Every method is thread-safe.
    """

    #: A read-only store (a merged view) can never be saved or hooked.
    read_only: bool

    @property
    def schema(self) -> Schema: ...

    @property
    def pid(self) -> int:
        """The process whose counts the store holds."""

    @property
    def restores(self) -> int:
        """How many times the store's state was replaced (a restored store is checked not to
        have gone down since its last save)."""

    @property
    def start_timestamp(self) -> float: ...

    @property
    def change_hook(self) -> Callable[[], object] | None:
        """The installed change hook, or None."""

    def snapshot(self) -> Snapshot: ...

    def set_change_hook(
        self, hook: Callable[[], object] | None, *, under_lock: bool = False
    ) -> None:
        """Install (or remove, with None) the callable every public write calls once.

        The hook must not raise for ordinary failures and must not record into the store
        through a public write method (that would call it again). ``TypeError`` for a read-only
        store. With ``under_lock`` it is a :data:`LockedHook`: it runs with the store's lock
        held and must not call the store at all.
        """

    def lend_cells(self, image: CellImage) -> threading.Lock:
        """Make ``image``'s views the store's cells (current values copied in) and its
        ``generation`` the store's; the lock every write holds (``ValueError`` for an image of
        other sizes)."""

    def reclaim_cells(self) -> None:
        """Take the cells back from a lent image (lists again; ``image.lent`` becomes False)."""

    def begin_save(self) -> SaveState:
        """Advance the generation; the counts and metadata that carry it, atomically."""

    def begin_save_cells(self) -> tuple[SaveState, tuple[float, ...]]:
        """:meth:`begin_save`, and the float cells (histogram sums) of the same state."""

    def abort_save(self, generation: int) -> None:
        """Undo the ``begin_save`` that returned ``generation``, unless a later one moved on."""

    def count_failure(self, slot: int) -> None:
        """Add one to ``slot`` without calling the change hook (it is what failed)."""

    def reset_for_new_process(self) -> None:
        """Start again from zero as a forked child's store, with a fresh lock."""
