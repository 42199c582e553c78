"""Figure 6. Peak memory of ``gatemetrics aggregate`` at 10,000 shards.

The real command line, as the cron runs it (``python -m gatemetrics aggregate --dir DIR
--textfile FILE``), in its own process; its peak resident set size is the ``ru_maxrss`` the
kernel reports for it when it is reaped (``os.wait4``, in a small launcher process: see
``_LAUNCHER``). Cases:

* 10,000 dead shards, compacting (the first cron run after a burst of worker churn);
* the same 10,000 shards with ``--no-compact`` (a read-only run over all of them);
* the compacted directory (every later run);
* prometheus_client 0.26: ``MultiProcessCollector`` + ``generate_latest`` over 10,000
  ``counter_<pid>.db`` files, written to a file, in its own process;
* for reference, the interpreter with each side's imports and nothing else.

Each run of the compacting case gets a fresh copy of the 10,000 shards (hard links: compaction
deletes the copies' names, never the originals). Runs are interleaved case by case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import Context, Figure, fmt_bytes
from benchmarks._populate import our_lifetimes, prometheus_lifetimes, prometheus_template

TITLE = "Peak memory of the aggregator at 10,000 shards"

_PROMETHEUS_SCRAPE = """
import sys
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
with open(sys.argv[2], "wb") as f:
    f.write(generate_latest(registry))
"""


# A small launcher between us and the measured process. Linux carries a parent's peak RSS
# into a child across fork and exec (the child's ru_maxrss starts at the forking process's
# resident size), so a child of this benchmark process would report at least our own size. The
# launcher is a bare interpreter (-I -S, only os and sys), far smaller than anything measured:
# it forks, execs the command, reaps it with wait4 and prints its exit code and ru_maxrss.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        os.execv(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def measure(argv: list[str]) -> tuple[int, float]:
    """Run ``argv``; return (its peak RSS in bytes, wall seconds). Fails on a non-zero exit."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LAUNCHER, *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    code, maxrss_kib = (int(x) for x in out.stdout.split())
    if code != 0:
        raise RuntimeError(f"{argv} exited with {code}: {out.stderr[-2000:]}")
    return maxrss_kib * 1024, elapsed  # ru_maxrss is in KiB on Linux


def _link_copy(src: Path, dst: Path) -> None:
    dst.mkdir()
    for entry in os.scandir(src):
        if entry.is_file(follow_symlinks=False):
            os.link(entry.path, dst / entry.name)


def run(ctx: Context) -> dict[str, Any]:
    n = 1_000 if ctx.quick else 10_000
    runs = 2 if ctx.quick else 3
    shards = ctx.tmp / "shards"
    our_lifetimes(shards, n)
    compacted = ctx.tmp / "compacted"
    _link_copy(shards, compacted)
    prom = ctx.tmp / "prometheus"
    prometheus_lifetimes(prom, prometheus_template(ctx.tmp), range(1000, 1000 + n))
    textfile = ctx.tmp / "release_gate.prom"
    cli = [sys.executable, "-m", "gatemetrics", "aggregate"]
    # The steady state: one compaction first, then every later run reads archive + live shards.
    measure([*cli, "--dir", str(compacted), "--textfile", str(textfile)])

    counter = iter(range(1_000_000))

    def compacting() -> list[str]:
        copy = ctx.tmp / f"copy-{next(counter)}"
        _link_copy(shards, copy)
        return [*cli, "--dir", str(copy), "--textfile", str(textfile)]

    cases = {
        f"gatemetrics aggregate, {n:,} dead shards, compacting": compacting,
        f"gatemetrics aggregate --no-compact, {n:,} shards": lambda: [
            *cli,
            "--no-compact",
            "--dir",
            str(shards),
            "--textfile",
            str(textfile),
        ],
        "gatemetrics aggregate, compacted directory": lambda: [
            *cli,
            "--dir",
            str(compacted),
            "--textfile",
            str(textfile),
        ],
        f"prometheus_client collector, {n:,} files": lambda: [
            sys.executable,
            "-c",
            _PROMETHEUS_SCRAPE,
            str(prom),
            str(ctx.tmp / "theirs.prom"),
        ],
        "interpreter + gatemetrics imports only": lambda: [
            sys.executable,
            "-c",
            "import gatemetrics.cli, backend.app.testing.gate_metrics",
        ],
        "interpreter + prometheus_client imports only": lambda: [
            sys.executable,
            "-c",
            "import prometheus_client.multiprocess",
        ],
    }
    rss: dict[str, list[float]] = {name: [] for name in cases}
    wall: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, argv in cases.items():
            peak, seconds = measure(argv())
            rss[name].append(peak)
            wall[name].append(seconds)
    figs = {name: Figure(name, tuple(v)) for name, v in rss.items()}
    times = {name: Figure(name, tuple(v)) for name, v in wall.items()}
    rows = [
        [
            name,
            fmt_bytes(fig.median),
            f"{fmt_bytes(fig.low)}-{fmt_bytes(fig.high)}",
            f"{times[name].median:.2f} s",
        ]
        for name, fig in figs.items()
    ]
    ours = figs[f"gatemetrics aggregate, {n:,} dead shards, compacting"]
    theirs = figs[f"prometheus_client collector, {n:,} files"]
    floor = figs["interpreter + gatemetrics imports only"]
    return {
        "title": TITLE if not ctx.quick else TITLE.replace("10,000", f"{n:,}"),
        "method": (
            "The real CLI in its own process, peak RSS from `os.wait4` (`ru_maxrss`); "
            f"{runs} runs per case, interleaved case by case; wall time includes the "
            "interpreter's start. The compacting case gets a fresh hard-linked copy of the "
            f"{n:,} shards each run."
        ),
        "table": {
            "header": ["process", "peak RSS (median)", "min-max", "wall time (median)"],
            "rows": rows,
        },
        "targets": [
            {
                "text": f"peak memory of `gatemetrics aggregate` at {n:,} shards (no target set)",
                "measured": f"{fmt_bytes(ours.median)} "
                f"({fmt_bytes(ours.median - floor.median)} above its imports; "
                f"prometheus_client: {fmt_bytes(theirs.median)})",
                "met": None,
            }
        ],
        "notes": [
            "The aggregator reads one shard at a time and keeps per shard only a small report "
            "(name, state, counts), so its memory above the interpreter grows slowly with the "
            "number of shards, and only on the run that meets them all: after compaction it "
            "reads about one shard per live worker.",
        ],
        "data": {
            "shards": n,
            "peak_rss_bytes": {name: fig.to_json() for name, fig in figs.items()},
            "wall_s": {name: fig.to_json() for name, fig in times.items()},
        },
    }
