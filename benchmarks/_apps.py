"""The backend app with one thing changed: figure 5's variants that have no setting in the app.

``backend.app.main`` always binds its store (write-through by default; periodic and the
durability are settings, ``GATEMETRICS_PERSISTENCE`` and ``GATEMETRICS_DURABILITY``, which the
other variants use) and always writes its audit log with group commit. ``GATEMETRICS_BENCH_VARIANT``
picks one change, made in the process that imports this module before the app builds anything:

``off``
    ``GateMetricStore.bind_to_dir`` becomes a no-op, so the store counts in memory only and
    nothing of the metrics touches the disk (an unbound store costs well under a microsecond per
    check, figure 1).
``prometheus``
    The same no-op binding, and ``GateMetricStore.record_outcome`` makes the same increments in
    prometheus_client's multiprocess mode instead (``Counter(...).labels(v).inc()``: the decision,
    each distinct reason of a DENY, a breach, an audit write failure), into
    ``PROMETHEUS_MULTIPROC_DIR`` (the figure gives each server a fresh one). Its counters are
    created with every label value, as ours are exported from the start.
``no-group-commit``
    The shipped app, except that its ``JsonlAuditLog`` is built with ``group_commit=False``
    (one lock, write and fsync per entry: the log before group commit).

Everything else (HTTP parsing, validation, ``ReleaseGate.acheck``, the durable ``JsonlAuditLog``)
is the unchanged app. ``GATEMETRICS_BENCH_PERSISTENCE=off`` (the earlier name) still selects
``off``.

gunicorn imports the app module in each worker (or once in the master with ``--preload``, before
the fork); either way the change applies to that server's processes only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import backend.app.main as backend_main
from backend.app.main import create_app
from backend.app.testing.gate_metrics import GATE_SCHEMA, GateMetricStore


class _NoBinding:
    """Stands in for the ``Binding`` the app closes at shutdown."""

    def save(self) -> bool:
        return True

    def close(self, *, save: bool = True) -> bool:
        return True


def _unbound(self: GateMetricStore, path: object, **_: Any) -> _NoBinding:
    return _NoBinding()


def _off() -> None:
    GateMetricStore.bind_to_dir = _unbound  # type: ignore[method-assign]


def _prometheus_record_outcome() -> Callable[..., None]:
    """A ``record_outcome`` making the gate's increments with prometheus_client counters."""
    from prometheus_client import Counter, Histogram, values

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or not getattr(
        values.ValueClass, "_multiprocess", False
    ):
        raise SystemExit("the prometheus variant needs PROMETHEUS_MULTIPROC_DIR set before start")
    counters: dict[str, Any] = {}
    for fam in GATE_SCHEMA.families:
        if fam.kind == "histogram":
            # The same buckets as ours: the variant does the work the gate's store does.
            counters[fam.key] = Histogram(fam.name, fam.documentation, buckets=fam.buckets)
            continue
        labels = [fam.label] if fam.label else []
        counter = Counter(fam.name.removesuffix("_total"), fam.documentation, labels)
        for value in fam.values:
            counter.labels(value)
        counters[fam.key] = counter
    decision = counters["decision_counts"]
    reason = counters["reason_counts"]
    breach_counter = counters["breach_counts"]
    audit_failures = counters["audit_write_failures"]
    check_duration = counters["check_duration"]

    def record_outcome(
        self: GateMetricStore,
        allowed: bool,
        reasons: Iterable[Any] | None = (),
        *,
        breach: bool = False,
        audit_write_failure: bool = False,
        duration: float | None = None,
    ) -> None:
        # The gate passes ``duration`` (GateMetricStore.records_check_duration): a variant
        # without it would fail open on every check and count nothing.
        if allowed is True:
            decision.labels("ALLOW").inc()
        elif allowed is False:
            decision.labels("DENY").inc()
            for value in dict.fromkeys(getattr(r, "value", r) for r in reasons or ()):
                reason.labels(value).inc()
        else:
            raise TypeError(f"allowed must be a bool, not {type(allowed).__name__}")
        if breach:
            breach_counter.labels("NO_OVERRIDE").inc()
        if audit_write_failure:
            audit_failures.inc()
        if duration is not None:
            check_duration.observe(duration)

    return record_outcome


def _prometheus() -> None:
    _off()
    GateMetricStore.record_outcome = _prometheus_record_outcome()  # type: ignore[method-assign]


def _no_group_commit() -> None:
    jsonl = backend_main.JsonlAuditLog

    def per_entry_fsync(*args: Any, **kwargs: Any) -> Any:
        return jsonl(*args, **{**kwargs, "group_commit": False})

    backend_main.JsonlAuditLog = per_entry_fsync  # type: ignore[assignment,misc]


VARIANTS: dict[str, Callable[[], None]] = {
    "off": _off,
    "prometheus": _prometheus,
    "no-group-commit": _no_group_commit,
}


def _select() -> Any:
    variant = os.environ.get("GATEMETRICS_BENCH_VARIANT", "") or os.environ.get(
        "GATEMETRICS_BENCH_PERSISTENCE", ""
    )
    if variant not in VARIANTS:
        raise SystemExit(
            f"GATEMETRICS_BENCH_VARIANT must be one of {sorted(VARIANTS)}: {variant!r}"
        )
    VARIANTS[variant]()
    return create_app()


#: What gunicorn serves in figure 5's changed variants: ``benchmarks._apps:app``, the change
#: chosen by ``GATEMETRICS_BENCH_VARIANT``. The other variants serve ``backend.app.main:app``.
app = _select()
