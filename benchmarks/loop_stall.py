"""Figure 7. Event-loop stall: a write-through record call made on the asyncio loop thread.

``ReleaseGate.acheck`` moves its audit write and its metric emission off the loop, but an async
service may also count from a coroutine directly. A write-through store saves inside the call,
so the call blocks the loop for as long as the save takes: every other coroutine of that worker
waits. Measured: each ``store.record_outcome(False, [two reasons])`` call, made from a
coroutine under ``asyncio.run``, timed on the loop thread, one call per loop iteration (the
coroutine yields with ``await asyncio.sleep(0)`` between calls, as a handler would between
requests). Sides, interleaved in rounds: a store bound write-through with the engine's default
durability (the target), the same with ``power-loss`` durability, an unbound store, and
prometheus_client's three ``labels(v).inc()`` in multiprocess mode, for reference.

The garbage collector stays on: a collection it triggers inside a call is part of that call's
stall.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks import _engine
from benchmarks._harness import Context, fmt_ns, percentile
from benchmarks._report import target
from benchmarks.hot_path import prometheus_multiproc_dir

TITLE = "Event-loop stall: a write-through record call on the asyncio loop"
TARGET_P99_NS = 50_000.0
_REASONS = ("TIER_FAIL", "DRIFT_ALERT")


async def _sample(sides: dict[str, Callable[[], object]], *, rounds: int, calls: int) -> Any:
    clock = time.perf_counter_ns
    stalls: dict[str, list[int]] = {name: [] for name in sides}
    order = list(sides.items())
    for _name, fn in order:  # warm-up: first saves create files, first increments map pages
        for _ in range(max(1, calls // 10)):
            fn()
            await asyncio.sleep(0)
    for round_no in range(rounds):
        for name, fn in order if round_no % 2 == 0 else reversed(order):
            out = stalls[name]
            for _ in range(calls):
                start = clock()
                fn()
                out.append(clock() - start)
                await asyncio.sleep(0)
    return stalls


def run(ctx: Context) -> dict[str, Any]:
    prometheus_multiproc_dir()
    from prometheus_client import Counter

    from backend.app.testing.gate_metrics import GateMetricStore
    from backend.app.testing.release_policy import BlockReasonCode as R

    rounds = 4 if ctx.quick else 10
    calls = 250 if ctx.quick else 1_000
    reasons = [R(v) for v in _REASONS]
    default_name = _engine.default_durability_name()
    decision = Counter("bench_loop_decision", "Decisions.", ["decision"], registry=None)
    reason = Counter("bench_loop_reason", "Reasons.", ["reason"], registry=None)

    bindings = []
    stores: dict[str, GateMetricStore] = {}

    def bound(key: str, durability: str | None) -> Callable[[], object]:
        store = GateMetricStore()
        directory = ctx.tmp / f"shards-{key}"
        if durability is None:
            bindings.append(store.bind_to_dir(directory))
        else:
            bindings.append(store.bind_to_dir(directory, durability=_engine.durability(durability)))
        stores[key] = store
        return lambda: store.record_outcome(False, reasons)

    def theirs() -> None:
        decision.labels("DENY").inc()
        reason.labels("TIER_FAIL").inc()
        reason.labels("DRIFT_ALERT").inc()

    unbound = GateMetricStore()
    labels = {"default": f"write-through, {default_name} (default)"}
    try:
        sides: dict[str, Callable[[], object]] = {"default": bound("default", None)}
        for name in (_engine.PROCESS_CRASH, _engine.POWER_LOSS):
            if name != default_name:
                labels[name] = f"write-through, {name}"
                sides[name] = bound(name, name)
        labels["unbound"] = "unbound store (in memory only)"
        labels["prometheus"] = "prometheus_client multiprocess, three `labels(v).inc()`"
        sides["unbound"] = lambda: unbound.record_outcome(False, reasons)
        sides["prometheus"] = theirs
        stalls = asyncio.run(_sample(sides, rounds=rounds, calls=calls))
    finally:
        for b in bindings:
            b.close(save=False)
    expected = (rounds * calls) + max(1, calls // 10)
    for key, store in stores.items():
        if store.decision_counts()["DENY"] != expected:
            raise RuntimeError(f"{key}: counted {store.decision_counts()} for {expected} calls")

    rows = []
    data: dict[str, Any] = {}
    for key, values in stalls.items():
        p50 = statistics.median(values)
        p99 = percentile(values, 99)
        p999 = percentile(values, 99.9)
        rows.append([labels[key], fmt_ns(p50), fmt_ns(p99), fmt_ns(p999), fmt_ns(max(values))])
        data[key] = {
            "label": labels[key],
            "calls": len(values),
            "median_ns": p50,
            "p99_ns": p99,
            "p999_ns": p999,
            "max_ns": max(values),
            "mean_ns": statistics.fmean(values),
        }
    default = data["default"]
    return {
        "title": TITLE,
        "method": (
            "Each `record_outcome(False, [TIER_FAIL, DRIFT_ALERT])` call made from a coroutine "
            "under `asyncio.run`, timed on the loop thread with `perf_counter_ns` (the stall "
            "every other coroutine of the worker sees), one call per loop iteration "
            f"(`await asyncio.sleep(0)` between calls); {rounds} rounds of {calls:,} calls per "
            "side after a warm-up, sides alternating (ABBA), garbage collector on. Stores "
            "bound write-through save inside the call, each into its own shard directory."
        ),
        "table": {
            "header": ["record call on the loop", "median", "p99", "p99.9", "max"],
            "rows": rows,
        },
        "targets": [
            target(
                f"p99 stall of a default write-through record call under {fmt_ns(TARGET_P99_NS)}",
                measured=f"p99 {fmt_ns(default['p99_ns'])} (median "
                f"{fmt_ns(default['median_ns'])}, max {fmt_ns(default['max_ns'])})",
                value=default["p99_ns"],
                op="<",
                threshold=TARGET_P99_NS,
            )
        ],
        "notes": [
            "`ReleaseGate.acheck` does not make this call on the loop (its audit write and "
            "emission run on a worker thread); the figure is what a coroutine that counts "
            "directly pays.",
        ],
        "data": data,
    }
