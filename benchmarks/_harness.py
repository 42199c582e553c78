"""Small timing harness shared by the benchmarks: interleaved runs, median with min and max.

Absolute times on shared machines drift, so every comparison runs both sides in the same
process, alternating run by run, and reports the ratio of medians.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """Per-call timings of one side, in nanoseconds, over several runs."""

    name: str
    runs_ns: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs_ns)

    @property
    def low(self) -> float:
        return min(self.runs_ns)

    @property
    def high(self) -> float:
        return max(self.runs_ns)


def per_call_ns(fn: Callable[[], object], loops: int) -> float:
    """Nanoseconds per call of ``fn`` over ``loops`` calls (loop overhead included, as for
    every side alike)."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        return (time.perf_counter_ns() - start) / loops
    finally:
        if gc_was:
            gc.enable()


def interleaved(
    sides: dict[str, Callable[[], object]], *, loops: int, runs: int, warmup: int = 1
) -> dict[str, Figure]:
    """Time every side ``runs`` times, alternating sides within each round."""
    for _ in range(warmup):
        for fn in sides.values():
            per_call_ns(fn, loops)
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, fn in sides.items():
            samples[name].append(per_call_ns(fn, loops))
    return {name: Figure(name, tuple(v)) for name, v in samples.items()}


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def fmt_figure(fig: Figure) -> str:
    """``median [min-max]`` of a figure."""
    return f"{fmt_ns(fig.median):>10}  [{fmt_ns(fig.low)}-{fmt_ns(fig.high)}]"
