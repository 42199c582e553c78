"""Hot path: ``record_decision`` against prometheus_client's multiprocess counters.

Run: ``python -m benchmarks.bench_hot_path`` (needs the ``bench`` extra: prometheus-client).
Both sides make the same labelled increments in the same process, interleaved run by run:
a DENY with two reasons is three labelled increments (decision, reason, reason).
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib.metadata import version

from benchmarks._harness import fmt_figure, interleaved


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as mp_dir:
        # prometheus_client reads the variable at import time: set it first.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
        from prometheus_client import Counter

        from backend.app.testing.gate_metrics import GateMetricExporter, GateMetricStore
        from backend.app.testing.release_policy import BlockReasonCode

        store = GateMetricStore()
        reasons = [BlockReasonCode.TIER_FAIL, BlockReasonCode.DRIFT_ALERT]
        decision = Counter("bench_decision", "d", ["decision"])
        reason = Counter("bench_reason", "r", ["reason"])

        def ours_deny2() -> None:
            store.record_decision(False, reasons)

        def theirs_deny2() -> None:
            decision.labels("DENY").inc()
            for r in reasons:
                reason.labels(r.value).inc()

        def ours_render() -> None:
            GateMetricExporter.export_prometheus(store)

        figures = interleaved(
            {"gatemetrics": ours_deny2, "prometheus_client mp": theirs_deny2},
            loops=20_000,
            runs=9,
        )
        render = interleaved({"render": ours_render}, loops=2_000, runs=9)["render"]

        ours, theirs = figures["gatemetrics"], figures["prometheus_client mp"]
        print(f"prometheus_client {version('prometheus-client')}, python {sys.version.split()[0]}")
        print("record_decision(False, [2 reasons])  (median [min-max] per call)")
        print(f"  {'gatemetrics':<22} {fmt_figure(ours)}")
        print(f"  {'prometheus_client mp':<22} {fmt_figure(theirs)}")
        print(f"  ratio: gatemetrics is {theirs.median / ours.median:.1f}x faster")
        print(f"render exposition: {fmt_figure(render)}")
        ok = ours.median <= 1000 and theirs.median / ours.median >= 5 and render.median < 100_000
        print("targets (<= 1 µs, >= 5x, render < 100 µs):", "met" if ok else "MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
