"""Timing harness shared by the figures: warm-up, interleaved runs, median with min and max.

Absolute times on a shared machine drift (other processes, the page cache, the disk's queue), so
every comparison runs its sides in the same process, alternating side by side within each round,
and reports the ratio of medians together with the range of the per-round ratios.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    """Samples of one side (per call, in nanoseconds unless a figure says otherwise)."""

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

    def scaled(self, factor: float) -> Figure:
        return Figure(self.name, tuple(v * factor for v in self.runs_ns))

    def to_json(self, scale: float = 1.0) -> dict[str, Any]:
        """``{"median", "min", "max", "runs"}`` in the figure's unit divided by ``scale``."""
        return {
            "median": self.median / scale,
            "min": self.low / scale,
            "max": self.high / scale,
            "runs": [v / scale for v in self.runs_ns],
        }


def ratio(slow: Figure, fast: Figure) -> dict[str, float]:
    """``slow / fast``: of the medians, and the lowest and highest of the per-round ratios.

    Samples taken in one round (interleaved) are paired by index, so a disturbance that hit both
    sides of a round cancels out of that round's ratio.
    """
    rounds = [s / f for s, f in zip(slow.runs_ns, fast.runs_ns, strict=True) if f > 0]
    return {
        "median": slow.median / fast.median,
        "min": min(rounds),
        "max": max(rounds),
    }


def paired_ratio(a: Figure, b: Figure) -> dict[str, Any]:
    """``a / b`` round by round: the median, lowest and highest of the per-round ratios.

    For measurements whose rounds drift (requests per second of servers loaded in turn), the
    median of the per-round ratios is steadier than the ratio of the medians: each round's
    ratio compares two runs made a few seconds apart.
    """
    rounds = [x / y for x, y in zip(a.runs_ns, b.runs_ns, strict=True) if y > 0]
    if not rounds:
        raise ValueError(f"no rounds to compare {a.name!r} with {b.name!r}")
    return {
        "median": statistics.median(rounds),
        "min": min(rounds),
        "max": max(rounds),
        "rounds": rounds,
    }


def per_call_ns(
    fn: Callable[[], object], loops: int, *, prepare: Callable[[], object] | None = None
) -> float:
    """Nanoseconds per call of ``fn`` over ``loops`` calls, with the garbage collector off
    (loop overhead included, as for every side alike).

    With ``prepare``, it runs untimed before each call (a change for a save to write) and only
    ``fn`` is timed, call by call (adding the clock's own cost, about 50 ns, to each).
    """
    gc_was = gc.isenabled()
    gc.disable()
    clock = time.perf_counter_ns
    try:
        if prepare is None:
            start = clock()
            for _ in range(loops):
                fn()
            return (clock() - start) / loops
        total = 0
        for _ in range(loops):
            prepare()
            start = clock()
            fn()
            total += clock() - start
        return total / loops
    finally:
        if gc_was:
            gc.enable()


def calibrated_loops(
    fn: Callable[[], object],
    *,
    sample_ns: float,
    low: int = 1,
    high: int = 100_000,
    prepare: Callable[[], object] | None = None,
) -> int:
    """Calls of ``fn`` that take about ``sample_ns`` together, within ``[low, high]``.

    For sides whose cost depends on the engine under test (a save is 10 µs or 1 ms): the number
    of calls per sample follows from a short trial instead of being fixed in advance.
    """
    per_call = per_call_ns(fn, 5, prepare=prepare)
    per_call = min(per_call, per_call_ns(fn, 20, prepare=prepare))
    return max(low, min(high, round(sample_ns / max(per_call, 1.0))))


def interleaved(
    sides: Mapping[str, Callable[[], object]],
    *,
    loops: int | Mapping[str, int],
    runs: int,
    warmup: int = 1,
    prepare: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, Figure]:
    """Time every side ``runs`` times, alternating sides within each round.

    ``loops`` is the number of calls per sample, for all sides or per side (a 5 ms save and a
    1 µs increment cannot share one). ``warmup`` rounds are run first and thrown away.
    ``prepare`` gives a side an untimed step before each call (see :func:`per_call_ns`).
    """

    def n(name: str) -> int:
        return loops if isinstance(loops, int) else loops[name]

    def before(name: str) -> Callable[[], object] | None:
        return None if prepare is None else prepare.get(name)

    for _ in range(warmup):
        for name, fn in sides.items():
            per_call_ns(fn, n(name), prepare=before(name))
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for round_no in range(runs):
        # Alternate the order too, so neither side always runs right after the other.
        order = list(sides.items())
        if round_no % 2:
            order.reverse()
        for name, fn in order:
            samples[name].append(per_call_ns(fn, n(name), prepare=before(name)))
    return {name: Figure(name, tuple(v)) for name, v in samples.items()}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) by nearest rank: a value that was measured."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {q!r}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def fmt_ns(ns: float) -> str:
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def fmt_figure(fig: Figure) -> str:
    """``median [min-max]`` of a figure in nanoseconds."""
    return f"{fmt_ns(fig.median)} [{fmt_ns(fig.low)}-{fmt_ns(fig.high)}]"


def fmt_ratio(r: Mapping[str, float], *, digits: int = 1) -> str:
    """``12.3x [11.0-13.1]``: the ratio of medians and the range of per-round ratios."""
    return f"{r['median']:.{digits}f}x [{r['min']:.{digits}f}-{r['max']:.{digits}f}]"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Context:
    """What the runner gives every figure: a private temporary directory and the size knob."""

    tmp: Path
    quick: bool = False  # smaller sizes and fewer runs, for trying the harness out
