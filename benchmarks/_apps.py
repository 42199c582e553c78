"""The backend app with its metrics not persisted: figure 5's "metrics off" variant.

``backend.app.main`` always binds its store (write-through by default; periodic and the
durability are settings, ``GATEMETRICS_PERSISTENCE`` and ``GATEMETRICS_DURABILITY``, which the
other variants use). To measure what the metrics cost at all, this wrapper changes one thing in
the process that imports it: ``GateMetricStore.bind_to_dir`` becomes a no-op, so the store counts
in memory only and nothing of the metrics touches the disk (an unbound store costs about a
microsecond per check, figure 2). Everything else (HTTP parsing, validation,
``ReleaseGate.acheck`` with its two worker-thread hops, the durable ``JsonlAuditLog`` with its
fsync) is the unchanged app.

gunicorn imports the app module in each worker (or once in the master with ``--preload``, before
the fork); either way the patch applies to that server's processes only.
"""

from __future__ import annotations

import os
from typing import Any

from backend.app.main import create_app
from backend.app.testing.gate_metrics import GateMetricStore


class _NoBinding:
    """Stands in for the ``Binding`` the app closes at shutdown."""

    def save(self) -> bool:
        return True

    def close(self, *, save: bool = True) -> bool:
        return True


def _unbound(self: GateMetricStore, path: object, **_: Any) -> _NoBinding:
    return _NoBinding()


_VARIANTS = {"off": _unbound}


def _app_with(bind: Any) -> Any:
    GateMetricStore.bind_to_dir = bind  # type: ignore[method-assign]
    return create_app()


def _select() -> Any:
    mode = os.environ.get("GATEMETRICS_BENCH_PERSISTENCE", "")
    if mode not in _VARIANTS:
        raise SystemExit(
            f"GATEMETRICS_BENCH_PERSISTENCE must be one of {sorted(_VARIANTS)}: {mode!r}"
        )
    return _app_with(_VARIANTS[mode])


#: What gunicorn serves in figure 5's variants: ``benchmarks._apps:app``, persistence chosen
#: by ``GATEMETRICS_BENCH_PERSISTENCE`` (only ``off``). The other variants serve the real
#: ``backend.app.main:app`` itself.
app = _select()
