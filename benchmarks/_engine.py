"""What the figures need to know about the engine, asked in one place, never hard-coded.

The figures name durability settings the way the engine does: ``process-crash`` (the default:
survives any process death, no fsync on the request path) and ``power-loss`` (an fdatasync per
save). Defaults (the engine's durability, the backend's persistence mode) are read from the code
itself, so a row labelled "default" is whatever the code under test defaults to.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gatemetrics import Durability

#: The durability names the figures measure.
PROCESS_CRASH = "process-crash"
POWER_LOSS = "power-loss"
_NAMES = (PROCESS_CRASH, POWER_LOSS)


def durability(name: str) -> Durability:
    """The engine's :class:`Durability` for ``process-crash`` or ``power-loss``."""
    from gatemetrics import Durability

    if name not in _NAMES:
        raise ValueError(f"durability must be {PROCESS_CRASH!r} or {POWER_LOSS!r}, not {name!r}")
    return Durability(name)


def default_durability() -> Durability:
    """What ``GateMetricStore.bind_to_dir`` uses when no durability is given."""
    from backend.app.testing.gate_metrics import GateMetricStore
    from gatemetrics import Durability

    default = inspect.signature(GateMetricStore.bind_to_dir).parameters["durability"].default
    return Durability(default)


def default_durability_name() -> str:
    """The default durability's name (``process-crash`` ...)."""
    return str(default_durability().value)


def backend_defaults() -> dict[str, Any]:
    """The backend's persistence settings when none is configured (``Settings.from_env``)."""
    from backend.app.settings import Settings

    settings = Settings.from_env({"GATEMETRICS_DIR": "/unused", "RELEASE_GATE_AUDIT_LOG": "/x"})
    return {
        "persistence": settings.persistence,
        "save_interval": settings.save_interval,
        "durability": str(settings.durability.value),
    }
