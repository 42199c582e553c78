"""Named crash points for tests (private).

Saves, compactions and textfile writes call :func:`point` between their steps. In production
:data:`HOOK` is ``None`` and a point costs one global lookup. Tests install a hook that raises at
a chosen step (an in-process "crash") or that SIGKILLs the process there (a real one), so every
step of every protocol can be proven crash-safe.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

__all__ = ["HOOK", "SimulatedCrash", "install_kill_at", "point"]

#: Called with the step name at every crash point, when set.
HOOK: Callable[[str], None] | None = None


class SimulatedCrash(BaseException):
    """Raised by test hooks to stop a protocol at a step, the way a crash would.

    A ``BaseException`` so that code which survives ordinary errors (``save`` never raises) does
    not survive this: like a kill, it unwinds everything up to the test.
    """


def point(step: str) -> None:
    """Mark crash point ``step``."""
    hook = HOOK
    if hook is not None:
        hook(step)


def install_kill_at(step: str, *, skip: int = 0) -> None:
    """Make this process SIGKILL itself at ``step`` (after passing it ``skip`` times)."""
    global HOOK  # noqa: PLW0603 - the hook is process-wide by design
    remaining = [skip]

    def hook(name: str) -> None:
        if name == step:
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            remaining[0] -= 1

    HOOK = hook
