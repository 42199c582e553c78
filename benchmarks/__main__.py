"""Run the benchmark figures and regenerate ``benchmarks/RESULTS.md`` and ``results.json``.

    python -m benchmarks                 # every figure (about 6 minutes on 2 cores)
    python -m benchmarks --only 1,3      # some figures; the others keep their last results
    python -m benchmarks --quick         # small sizes, few runs, written to a temp directory

Needs the ``bench`` and ``server`` extras (prometheus-client, gunicorn, uvicorn-worker) and
``wrk`` on PATH for figure 5 (Debian: ``apt-get install wrk``). Figure 5 is most of the run: six
gunicorn servers, 12 rounds of 3 s each (about 4 minutes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import Context
from benchmarks._report import (
    figure_tables,
    machine,
    markdown_table,
    now_utc,
    render_markdown,
    target_met,
)

FIGURES = {
    1: "hot_path",
    2: "gate_overhead",
    3: "history",
    4: "live_shards",
    5: "gunicorn_throughput",
    6: "aggregate_memory",
    7: "loop_stall",
}
HERE = Path(__file__).resolve().parent


def _figures(text: str) -> list[int]:
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected figure numbers like 1,3 not {text!r}") from None
    unknown = [n for n in numbers if n not in FIGURES]
    if unknown or not numbers:
        raise argparse.ArgumentTypeError(f"figures are {sorted(FIGURES)}, not {text!r}")
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", type=_figures, default=sorted(FIGURES), metavar="N,N")
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs")
    parser.add_argument("--out", type=Path, help="where results.json and RESULTS.md go")
    args = parser.parse_args(argv)
    out: Path = args.out or (
        Path(tempfile.gettempdir()) / "gatemetrics-bench-quick" if args.quick else HERE
    )
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: dict[str, Any] = {"figures": {}}
    if results_path.exists():
        results = json.loads(results_path.read_text(encoding="utf-8"))

    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        # prometheus_client picks its value class when it is first imported: multiprocess mode
        # only if the variable is set by then. No figure module imports it at module level.
        assert "prometheus_client" not in sys.modules
        mp_dir = Path(tmp) / "prometheus-multiproc"
        mp_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp_dir)
        results["machine"] = machine()
        for number in args.only:
            name = FIGURES[number]
            module = importlib.import_module(f"benchmarks.{name}")
            fig_tmp = Path(tmp) / name
            fig_tmp.mkdir()
            print(f"\n== {number}. {module.TITLE}", flush=True)
            start = time.monotonic()
            figure = module.run(Context(fig_tmp, quick=args.quick))
            figure.update(
                id=name,
                number=number,
                date=now_utc(),
                seconds=time.monotonic() - start,
                quick=args.quick,
            )
            if args.quick:
                figure.setdefault("notes", []).append("Quick run: small sizes, few runs.")
            results["figures"][name] = figure
            for table in figure_tables(figure):
                if table.get("caption"):
                    print(f"\n{table['caption']}")
                print(markdown_table(table["header"], table["rows"]))
            for target in figure.get("targets", []):
                verdict = {True: "met", False: "MISSED"}.get(target_met(target), "no target")
                print(f"target {target['text']}: {target['measured']} -> {verdict}")
            # Written after every figure: an interrupted run keeps what it measured.
            results["generated"] = now_utc()
            results_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
            (out / "RESULTS.md").write_text(render_markdown(results), encoding="utf-8")
    print(f"\nwrote {results_path} and {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
