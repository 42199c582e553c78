"""The backend's check path, layer by layer: what one HTTP gate check costs a worker.

Run: ``python -m benchmarks.bench_backend``. In one process and one event loop, on temporary
directories, interleaved round by round (absolute times drift on shared machines; compare
within a run):

``gate``            ``acheck`` with an in-memory audit log and an unpersisted store: the
                    decision plus two worker-thread round trips
``+ audit log``     with :class:`JsonlAuditLog`: file lock, append, fsync
``+ write-through`` and the store bound write-through (full durability: temp file, fsync,
                    rename, directory fsync): the gate exactly as ``backend.app.main`` runs it
``app``             a whole ``POST /release-gate/check`` through the ASGI app: body read, JSON
                    parse, validation, the gate above, JSON response

Then the same app under concurrency (16 checks in flight in one worker): checks per second,
which shows how far overlapping fsyncs in worker threads carry one process.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from backend.app.main import Settings, create_app
from backend.app.testing.audit import InMemoryAuditLog, JsonlAuditLog
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_gate import ReleaseGate
from backend.app.testing.release_policy import ReleasePolicyResult
from benchmarks._harness import Figure, fmt_figure

LOOPS = 200
ROUNDS = 7
CONCURRENCY = 16
CONCURRENT_CHECKS = 800
BODY = b'{"verdict": "release_hold", "reasons": ["TIER_FAIL", "DRIFT_ALERT"]}'


def asgi_check(app: Callable[..., Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """One POST /release-gate/check through ``app``'s ASGI interface."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/release-gate/check",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"check answered {message['status']}")

    async def call() -> None:
        await app(scope, receive, send)

    return call


async def per_call_ns(fn: Callable[[], Awaitable[object]], loops: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(loops):
        await fn()
    return (time.perf_counter_ns() - start) / loops


async def measure(root: Path) -> tuple[dict[str, Figure], float]:
    result = ReleasePolicyResult("release_hold", ["TIER_FAIL", "DRIFT_ALERT"])
    bound = GateMetricStore()
    binding = bound.bind_to_dir(root / "gate-shards")
    gates = {
        "gate": ReleaseGate(InMemoryAuditLog(), GateMetricStore()),
        "+ audit log": ReleaseGate(JsonlAuditLog(root / "audit-a.jsonl"), GateMetricStore()),
        "+ write-through": ReleaseGate(JsonlAuditLog(root / "audit-b.jsonl"), bound),
    }
    sides: dict[str, Callable[[], Awaitable[object]]] = {
        name: (lambda gate=gate: gate.acheck(result, None, "bench", 1))
        for name, gate in gates.items()
    }
    app = create_app(Settings(str(root / "app-shards"), str(root / "app-audit.jsonl")))
    await app.startup()
    sides["app"] = asgi_check(app)
    try:
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for fn in sides.values():  # warm-up: files, locks, thread pool
            await per_call_ns(fn, 20)
        for _ in range(ROUNDS):
            for name, fn in sides.items():
                samples[name].append(await per_call_ns(fn, LOOPS))

        limiter = anyio.Semaphore(CONCURRENCY)
        check = asgi_check(app)

        async def limited() -> None:
            async with limiter:
                await check()

        rates = []
        for _ in range(3):
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(CONCURRENT_CHECKS):
                    tg.start_soon(limited)
            rates.append(CONCURRENT_CHECKS / (time.perf_counter() - start))
    finally:
        await app.shutdown()
        binding.close()
    return {n: Figure(n, tuple(v)) for n, v in samples.items()}, statistics.median(rates)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gm-bench-backend-") as tmp:
        figures, rate = anyio.run(measure, Path(tmp))
    print(f"python {sys.version.split()[0]}; one check, sequential (median [min-max] per check)")
    base = figures["gate"].median
    for name, fig in figures.items():
        print(f"  {name:<16} {fmt_figure(fig)}  ({fig.median / base:.1f}x gate)")
    durable = figures["+ write-through"].median - figures["gate"].median
    print(f"  the two durable writes cost {durable / 1e6:.2f} ms of every check")
    print(f"app with {CONCURRENCY} checks in flight in one worker: {rate:.0f} checks/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
