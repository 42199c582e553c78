"""The benchmark report's helpers: tables, the rendered RESULTS.md, ratios, targets.

Nothing is timed: the figures' target computations are fed made-up measurements.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from benchmarks import _engine, gunicorn_throughput, hot_path, live_shards
from benchmarks.__main__ import FIGURES, _figures
from benchmarks._harness import (
    Figure,
    fmt_ratio,
    paired_ratio,
    per_call_ns,
    percentile,
    ratio,
)
from benchmarks._report import (
    figure_tables,
    filesystem_of,
    machine,
    markdown_table,
    render_markdown,
    target,
    target_met,
)


def test_markdown_table_has_header_separator_and_escaped_cells() -> None:
    table = markdown_table(["case", "ratio"], [["a|b", "2.0x"], ["two\nlines", 3]])
    assert table.splitlines() == [
        "| case | ratio |",
        "|---|---|",
        "| a\\|b | 2.0x |",
        "| two lines | 3 |",
    ]


def test_markdown_table_refuses_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="2 cells, header 3"):
        markdown_table(["a", "b", "c"], [["1", "2"]])


def _figure(number: int, met: bool | None) -> dict[str, object]:
    if met is None:
        goal: dict[str, object] = {"text": f"target {number}", "measured": "7x", "met": None}
    else:
        # Met or missed from the value against the threshold, as every figure's targets are.
        goal = target(
            f"target {number}", measured="7x", value=7.0, op=">=", threshold=5.0 if met else 9.0
        )
    return {
        "number": number,
        "title": f"Figure title {number}",
        "method": f"method {number}",
        "table": {"header": ["n", "ours"], "rows": [[100, "1 ms"]]},
        "targets": [goal],
        "notes": [f"note {number}"],
        "date": "2026-01-01 00:00 UTC",
        "seconds": 12.0,
    }


def test_report_renders_machine_targets_and_figures_in_number_order() -> None:
    results = {
        "generated": "2026-01-02 03:04 UTC",
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "packages": {"prometheus-client": "0.26.0"},
            "load_average_at_start": [1.0, 0.5, 0.25],
        },
        "figures": {"b": _figure(2, False), "a": _figure(1, True), "c": _figure(3, None)},
    }
    text = render_markdown(results)
    assert "Report generated: 2026-01-02 03:04 UTC." in text
    assert "| CPU | Test CPU (2 cores) |" in text
    assert "| prometheus-client | 0.26.0 |" in text
    assert "| load average at start | 1.0 0.5 0.25 |" in text
    assert "| 1. Figure title 1 | target 1 | 7x | met |" in text
    assert "| 2. Figure title 2 | target 2 | 7x | **missed** |" in text
    assert "| 3. Figure title 3 | target 3 | 7x | n/a |" in text
    sections = [text.index(f"## {n}. Figure title {n}") for n in (1, 2, 3)]
    assert sections == sorted(sections)
    assert "| n | ours |\n|---|---|\n| 100 | 1 ms |" in text
    assert "- note 2" in text
    assert text.endswith("\n")


def test_machine_names_the_temp_dirs_filesystem_and_package_versions(tmp_path: Path) -> None:
    assert filesystem_of(str(tmp_path)) != "unknown"
    info = machine()
    assert info["cores"] >= 1
    assert info["packages"]["gatemetrics"] != "not installed"


def test_ratio_is_of_medians_with_the_range_of_per_round_ratios() -> None:
    slow = Figure("slow", (10.0, 30.0, 20.0))
    fast = Figure("fast", (5.0, 10.0, 2.0))
    r = ratio(slow, fast)
    assert r == {"median": 20.0 / 5.0, "min": 2.0, "max": 10.0}
    assert fmt_ratio(r) == "4.0x [2.0-10.0]"


def test_figure_numbers_are_parsed_and_checked() -> None:
    assert _figures("3,1,3") == [1, 3]
    assert _figures("7") == [7]
    with pytest.raises(argparse.ArgumentTypeError):
        _figures("8")
    with pytest.raises(argparse.ArgumentTypeError):
        _figures("one")


def test_every_figure_module_has_a_title_and_a_run() -> None:
    # Importing a figure must not import prometheus_client: it has to see
    # PROMETHEUS_MULTIPROC_DIR, which the runner sets just before the figures run.
    for number, name in FIGURES.items():
        module = importlib.import_module(f"benchmarks.{name}")
        assert module.TITLE, number
        assert callable(module.run), number


@pytest.mark.parametrize(
    ("value", "op", "threshold", "met"),
    [
        (1.0, ">=", 1.0, True),
        (0.99, ">=", 1.0, False),
        (49_999.0, "<", 50_000.0, True),
        (50_000.0, "<", 50_000.0, False),
        (1.5, "<=", 1.5, True),
        (3.1, ">", 3.0, True),
    ],
)
def test_a_target_is_met_by_comparing_its_value_with_its_threshold(
    value: float, op: str, threshold: float, met: bool
) -> None:
    t = target("t", measured="m", value=value, op=op, threshold=threshold)  # type: ignore[arg-type]
    assert t["met"] is met
    assert target_met(t) is met
    assert (t["value"], t["op"], t["threshold"]) == (value, op, threshold)


def test_a_target_verdict_is_recomputed_from_its_value_when_rendered() -> None:
    # A results.json edited by hand ("met": true on a value under its threshold) renders missed.
    stale = target("ratio >= 3", measured="1.1x", value=1.1, op=">=", threshold=3.0)
    stale["met"] = True
    assert target_met(stale) is False
    figure = _figure(4, True) | {"targets": [stale]}
    text = render_markdown({"figures": {"live": figure}})
    assert "| 4. Figure title 4 | ratio >= 3 | 1.1x | **missed** |" in text


def test_a_target_without_a_measurement_is_missed_and_one_without_a_threshold_is_na() -> None:
    assert target("t", measured="-", value=None, op=">=", threshold=1.0)["met"] is False
    assert target_met({"text": "t", "measured": "-", "met": None}) is None
    assert target_met({"text": "t", "measured": "-", "met": True}) is True
    with pytest.raises(ValueError, match="op must be"):
        target("t", measured="-", value=1.0, op="==", threshold=1.0)  # type: ignore[arg-type]


def test_a_figure_with_several_tables_renders_each_under_its_caption() -> None:
    figure = _figure(2, True)
    del figure["table"]
    figure["tables"] = [
        {"caption": "The record call", "header": ["side", "time"], "rows": [["ours", "3 µs"]]},
        {"caption": None, "header": ["variant", "µs"], "rows": [["no store", "7.3"]]},
    ]
    assert [t["header"][0] for t in figure_tables(figure)] == ["side", "variant"]
    text = render_markdown({"figures": {"gate": figure}})
    first = text.index("**The record call**\n\n| side | time |\n|---|---|\n| ours | 3 µs |")
    assert first < text.index("| variant | µs |\n|---|---|\n| no store | 7.3 |")
    assert figure_tables(_figure(1, True)) == [_figure(1, True)["table"]]


def test_paired_ratio_is_the_median_of_the_per_round_ratios() -> None:
    ours = Figure("ours", (90.0, 200.0, 100.0))
    off = Figure("off", (100.0, 100.0, 100.0))
    r = paired_ratio(ours, off)
    assert r == {"median": 1.0, "min": 0.9, "max": 2.0, "rounds": [0.9, 2.0, 1.0]}
    # Not the ratio of the medians, which a slow round of one side alone would move.
    assert ratio(ours, off)["median"] == 1.0
    assert paired_ratio(Figure("a", (3.0, 1.0)), Figure("b", (1.0, 2.0)))["median"] == 1.75


def test_percentile_is_a_measured_value_by_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 1000.0], 99) == 1000.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 0)


def test_per_call_ns_with_prepare_runs_it_untimed_before_every_call() -> None:
    calls: list[str] = []
    per_call_ns(lambda: calls.append("fn"), 3, prepare=lambda: calls.append("prepare"))
    assert calls == ["prepare", "fn"] * 3


def _rounds(**rps: tuple[float, ...]) -> dict[str, Figure]:
    return {key: Figure(key, values) for key, values in rps.items()}


def test_figure_5_targets_compare_the_default_round_by_round() -> None:
    figs = _rounds(
        off=(1000.0, 1000.0, 800.0),
        default=(960.0, 990.0, 700.0),
        **{"power-loss": (800.0, 800.0, 700.0)},
        periodic=(1000.0, 1000.0, 800.0),
        prometheus=(950.0, 1000.0, 700.0),
        **{"no-group-commit": (700.0, 700.0, 500.0)},
    )
    comparisons = gunicorn_throughput.compare(figs)
    assert comparisons["vs_off"]["default"]["median"] == pytest.approx(0.96)
    assert comparisons["vs_off"]["default"]["min"] == pytest.approx(0.875)
    assert set(comparisons["vs_off"]) == set(figs) - {"off"}
    off, prometheus, group_commit = gunicorn_throughput.targets(comparisons)
    assert off["met"] is True
    assert off["value"] == pytest.approx(0.96)
    assert "4.0% fewer requests/s" in off["measured"]
    assert "[0.88-0.99]" in off["measured"]
    assert prometheus["met"] is True  # 960/950, 990/1000, 700/700: median 1.0
    assert prometheus["value"] == pytest.approx(1.0)
    assert group_commit["met"] is True
    assert group_commit["value"] == pytest.approx(1.4)  # 1.371, 1.414, 1.4


def test_figure_5_targets_are_missed_when_the_default_is_slower() -> None:
    figs = _rounds(
        off=(1000.0, 1000.0),
        default=(900.0, 940.0),
        **{"power-loss": (800.0, 800.0)},
        periodic=(1000.0, 1000.0),
        prometheus=(950.0, 950.0),
        **{"no-group-commit": (800.0, 800.0)},
    )
    verdicts = [t["met"] for t in gunicorn_throughput.targets(gunicorn_throughput.compare(figs))]
    assert verdicts == [False, False, False]


def test_figure_4_target_is_judged_on_the_slowest_of_16_to_256_live_shards() -> None:
    ratios = {
        1: {"median": 1.5, "min": 1.4, "max": 1.6},
        16: {"median": 4.0, "min": 3.5, "max": 4.5},
        64: {"median": 3.2, "min": 3.0, "max": 3.3},
        256: {"median": 5.0, "min": 4.0, "max": 6.0},
    }
    (t,) = live_shards.targets(ratios)
    assert t["met"] is True
    assert t["value"] == 3.2  # k = 1 is not judged
    assert "slowest: 64 live shards" in t["measured"]
    ratios[256]["median"] = 2.9
    (t,) = live_shards.targets(ratios)
    assert t["met"] is False
    assert "slowest: 256 live shards" in t["measured"]
    with pytest.raises(ValueError, match="no size"):
        live_shards.targets({1: ratios[1]})


def test_durability_names_resolve_to_the_engines_settings() -> None:
    from gatemetrics import Durability

    for name in (_engine.PROCESS_CRASH, _engine.POWER_LOSS):
        resolved = _engine.durability(name)
        assert isinstance(resolved, Durability)
        assert resolved.value == name
    assert _engine.default_durability_name() in (_engine.PROCESS_CRASH, _engine.POWER_LOSS)
    with pytest.raises(ValueError, match="durability must be"):
        _engine.durability("full")


def _write_through_data(two_labels: float, histogram: float) -> dict[str, object]:
    def row(r: float) -> dict[str, object]:
        return {
            "gatemetrics_ns": {"median": 1000.0},
            "prometheus_client_ns": {"median": 1000.0 * r},
            "ratio": {"median": r, "min": r - 0.1, "max": r + 0.1},
        }

    return {
        "durability": "process-crash",
        "two labels": row(two_labels),
        "histogram": row(histogram),
    }


def test_figure_1_write_through_targets_need_each_form_no_slower_than_prometheus_client() -> None:
    labels, histogram = hot_path.write_through_targets(_write_through_data(1.0, 0.99))
    assert labels["met"] is True  # exactly as fast is "no slower"
    assert histogram["met"] is False
    assert (labels["op"], labels["threshold"]) == (">=", 1.0)
    assert "process-crash" in labels["text"]
    assert "labels(a, b).inc()" in labels["text"]
    assert "Histogram.observe(v)" in histogram["text"]
    assert histogram["measured"] == "0.99x [0.89-1.09] (1.00 µs against 990 ns)"
    verdicts = [t["met"] for t in hot_path.write_through_targets(_write_through_data(0.5, 1.2))]
    assert verdicts == [False, True]
