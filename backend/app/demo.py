"""``gatemetrics demo``: make realistic release-gate decisions and check the counts.

Several threads share one :class:`GateMetricStore` and record a seeded, realistic mix of
decisions; the demo then prints the Prometheus exposition and compares the totals it expected
with the totals the store counted.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import TextIO

from backend.app.testing.gate_metrics import GateMetricExporter, GateMetricStore
from backend.app.testing.release_policy import BlockReasonCode

__all__ = ["run_demo"]

_THREADS = 4


def _plan(decisions: int, seed: int) -> list[tuple[bool, tuple[BlockReasonCode, ...], bool]]:
    """A seeded mix: mostly allows, denies with one to three reasons, a few breach attempts."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible demo mix, not security
    reasons = list(BlockReasonCode)
    plan: list[tuple[bool, tuple[BlockReasonCode, ...], bool]] = []
    for _ in range(decisions):
        roll = rng.random()
        if roll < 0.6:
            plan.append((True, (), False))
        elif roll < 0.97:
            plan.append((False, tuple(rng.sample(reasons, rng.randint(1, 3))), False))
        else:
            plan.append((False, (BlockReasonCode.GUARD_VIOLATION,), True))
    return plan


def run_demo(*, decisions: int, seed: int, out: TextIO) -> int:
    plan = _plan(decisions, seed)
    store = GateMetricStore()
    chunks = [plan[i::_THREADS] for i in range(_THREADS)]

    def work(chunk: list[tuple[bool, tuple[BlockReasonCode, ...], bool]]) -> None:
        for allowed, reasons, breach in chunk:
            store.record_decision(allowed, reasons)
            if breach:
                store.record_breach()

    print(f"demo: {decisions} decisions on {_THREADS} threads (seed {seed})", file=out)
    threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    expected_decisions = Counter("ALLOW" if a else "DENY" for a, _, _ in plan)
    expected_reasons = Counter(r.value for a, rs, _ in plan if not a for r in set(rs))
    expected_breaches = sum(1 for *_, b in plan if b)
    got_decisions = store.decision_counts()
    got_reasons = store.reason_counts()
    got_breaches = store.breach_counts()["NO_OVERRIDE"]

    out.write(GateMetricExporter.export_prometheus(store))
    rows = [(f"decision {d}", expected_decisions[d], got_decisions[d]) for d in ("ALLOW", "DENY")]
    rows += [
        (f"reason {r.value}", expected_reasons[r.value], got_reasons[r.value])
        for r in BlockReasonCode
    ]
    rows.append(("contract breach", expected_breaches, got_breaches))
    print("\nsummary:", file=out)
    print(f"  {'series':<28} {'expected':>9} {'counted':>9}", file=out)
    ok = True
    for name, want, got in rows:
        mark = "" if want == got else "  MISMATCH"
        ok = ok and want == got
        print(f"  {name:<28} {want:>9} {got:>9}{mark}", file=out)
    print("result: exact" if ok else "result: MISMATCH", file=out)
    return 0 if ok else 1
