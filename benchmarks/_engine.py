"""What the figures need to know about the engine, asked in one place, never hard-coded.

The figures name durability settings the way the engine does since its shard format v2:
``process-crash`` (the default: survives any process death, no fsync on the request path) and
``power-loss`` (an fdatasync per save). Defaults (the engine's durability, the backend's
persistence mode) are read from the code itself, so a row labelled "default" is whatever the
code under test defaults to.

Transition (TODO(engine v2), remove once the v2 shard format and the audit log's group commit
have landed): an engine without ``Durability.PROCESS_CRASH`` only knows ``none``/``file``/``full``;
there :func:`durability` maps ``process-crash`` to ``none`` (the same guarantee, v1 format) and
``power-loss`` to ``full``, and :func:`transition_notes` says so in every figure that depends on
it. Likewise a ``JsonlAuditLog`` without ``group_commit`` is the per-entry-fsync log.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gatemetrics import Durability

#: The durability names the figures measure, in the engine's v2 spelling.
PROCESS_CRASH = "process-crash"
POWER_LOSS = "power-loss"
_V1_EQUIVALENT = {PROCESS_CRASH: "none", POWER_LOSS: "full"}


def engine_v2() -> bool:
    """Whether the engine spells its durability settings ``process-crash`` / ``power-loss``."""
    from gatemetrics import Durability

    return any(d.value == PROCESS_CRASH for d in Durability)


def durability(name: str) -> Durability:
    """The engine's :class:`Durability` for ``process-crash`` or ``power-loss``."""
    from gatemetrics import Durability

    if name not in _V1_EQUIVALENT:
        raise ValueError(f"durability must be {PROCESS_CRASH!r} or {POWER_LOSS!r}, not {name!r}")
    return Durability(name if engine_v2() else _V1_EQUIVALENT[name])


def durability_label(name: str) -> str:
    """``process-crash``, or ``process-crash (v1: none)`` on an engine before v2."""
    actual = durability(name).value
    return name if actual == name else f"{name} (v1: {actual})"


def default_durability() -> Durability:
    """What ``GateMetricStore.bind_to_dir`` uses when no durability is given."""
    from backend.app.testing.gate_metrics import GateMetricStore
    from gatemetrics import Durability

    default = inspect.signature(GateMetricStore.bind_to_dir).parameters["durability"].default
    return Durability(default)


def default_durability_name() -> str:
    """The default durability in the figures' spelling (``process-crash`` ...)."""
    value = default_durability().value
    for name in _V1_EQUIVALENT:
        if durability(name).value == value:
            return name
    return value  # a v1 setting with no v2 equivalent (v1 ``file``)


def backend_defaults() -> dict[str, Any]:
    """The backend's persistence settings when none is configured (``Settings.from_env``)."""
    from backend.app.main import Settings

    settings = Settings.from_env({"GATEMETRICS_DIR": "/unused", "RELEASE_GATE_AUDIT_LOG": "/x"})
    return {
        "persistence": settings.persistence,
        "save_interval": settings.save_interval,
        "durability": str(settings.durability.value),
    }


def audit_group_commit() -> bool:
    """Whether ``JsonlAuditLog`` takes ``group_commit`` (without it, every entry is fsynced)."""
    from backend.app.testing.audit import JsonlAuditLog

    return "group_commit" in inspect.signature(JsonlAuditLog).parameters


def transition_notes(*, audit: bool = False) -> list[str]:
    """Notes for a figure measured on an engine that predates this wave's changes."""
    notes = []
    if not engine_v2():
        notes.append(
            "Measured on an engine before the v2 shard format: `process-crash` ran as v1 "
            "`none` and `power-loss` as v1 `full` (temp file and rename per save). Not the "
            "figure this report is meant to show: rerun once the engine has landed."
        )
    if audit and not audit_group_commit():
        notes.append(
            "Measured before the audit log's group commit: `JsonlAuditLog` has no "
            "`group_commit` option, so every variant fsyncs once per entry."
        )
    return notes
