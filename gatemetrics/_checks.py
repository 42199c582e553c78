"""The checks every engine entry point shares: durations, and that a store may be saved.

The one validation of durations (intervals, timeouts) every engine entry point shares.

A duration reaches us from keyword arguments, settings and environment variables; each caller
used to check it its own way, and they disagreed (``bind(interval=float("inf"))`` was accepted
and its saver thread then died at once; ``interval=True`` meant one second). One function keeps
them agreeing: a real ``int`` or ``float`` (``bool`` is refused: ``True`` is not a number of
seconds), finite, not NaN, at most :data:`MAX_SECONDS`, and positive, or non-negative where zero
has a meaning (a lock timeout of ``0`` is one attempt).
"""

from __future__ import annotations

import math
import threading

__all__ = ["MAX_SECONDS", "check_seconds", "check_writable"]

#: The longest duration accepted: the longest a thread may wait (``threading.TIMEOUT_MAX``, a
#: few hundred years here), beyond which ``Event.wait`` and ``Lock.acquire`` raise
#: ``OverflowError`` in the thread that waits, not in the caller.
MAX_SECONDS: float = float(threading.TIMEOUT_MAX)


def check_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a float number of seconds, or ``ValueError`` naming ``name``.

    ``TypeError`` (a ``bool``, a string, ``None``) and out-of-range values (NaN, infinities,
    negative, zero unless ``allow_zero``, above :data:`MAX_SECONDS`) are both reported as
    ``ValueError``, the way every caller documented them.
    """
    if type(value) not in (int, float):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float: certainly above MAX_SECONDS
        seconds = math.inf
    low_ok = seconds >= 0 if allow_zero else seconds > 0
    if not math.isfinite(seconds) or not low_ok or seconds > MAX_SECONDS:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be a finite number of seconds {bound} and at most "
            f"{MAX_SECONDS:g}, not {value!r}"
        )
    return seconds


def check_writable(store: object) -> None:
    """``TypeError`` for a read-only view: saved as a shard, it would count every shard twice.

    Anything without ``read_only = False`` (a :class:`~gatemetrics.persistence.PersistedStore`
    says it is writable) counts as read-only.
    """
    if getattr(store, "read_only", True) is not False:
        raise TypeError(
            f"{type(store).__name__} is a read-only merged view; saving it as a shard would "
            "count every shard in it twice"
        )
