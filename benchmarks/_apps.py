"""The backend app with its metric persistence switched, for figure 5 (gunicorn throughput).

``backend.app.main`` has no setting to run without metrics, so these wrappers change one thing in
the process that imports them: what ``GateMetricStore.bind_to_dir`` does when a worker starts.
Everything else (HTTP parsing, validation, ``ReleaseGate.acheck`` with its two worker-thread
hops, the durable ``JsonlAuditLog`` with its fsync) is the unchanged app.

* ``off``: the store is not bound. The gate still counts, in memory only; nothing of the
  metrics touches the disk. This is "metrics off" as far as cost goes (an unbound store costs
  about a microsecond per check, figure 2), without a code path the app does not have.
* ``metrics_periodic``: the store is bound in ``periodic`` mode (a save every 5 s from a thread)
  instead of the default write-through.

gunicorn imports the app module in each worker (or once in the master with ``--preload``, before
the fork); either way the patch applies to that server's processes only.
"""

from __future__ import annotations

import os
from typing import Any

from backend.app.main import create_app

from backend.app.testing.gate_metrics import GateMetricStore

_bind_to_dir = GateMetricStore.bind_to_dir


class _NoBinding:
    """Stands in for the ``Binding`` the app closes at shutdown."""

    def save(self) -> bool:
        return True

    def close(self, *, save: bool = True) -> bool:
        return True


def _unbound(self: GateMetricStore, path: object, **_: Any) -> _NoBinding:
    return _NoBinding()


def _periodic(self: GateMetricStore, path: Any, **kwargs: Any) -> Any:
    kwargs["mode"] = "periodic"
    return _bind_to_dir(self, path, **kwargs)


def _no_fsync(self: GateMetricStore, path: Any, **kwargs: Any) -> Any:
    kwargs["durability"] = "none"
    return _bind_to_dir(self, path, **kwargs)


_VARIANTS = {"off": _unbound, "periodic": _periodic, "write-through-none": _no_fsync}


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
#: by ``GATEMETRICS_BENCH_PERSISTENCE`` (``off``, ``periodic``, ``write-through-none``). The
#: default variant serves the real ``backend.app.main:app`` itself.
app = _select()
