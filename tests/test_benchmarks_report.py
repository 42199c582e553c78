"""The benchmark report's helpers: tables, the rendered RESULTS.md, ratios. Nothing is timed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.__main__ import _figures
from benchmarks._harness import Figure, fmt_ratio, ratio
from benchmarks._report import filesystem_of, machine, markdown_table, render_markdown


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
    return {
        "number": number,
        "title": f"Figure title {number}",
        "method": f"method {number}",
        "table": {"header": ["n", "ours"], "rows": [[100, "1 ms"]]},
        "targets": [{"text": f"target {number}", "measured": "7x", "met": met}],
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
    with pytest.raises(argparse.ArgumentTypeError):
        _figures("7")
    with pytest.raises(argparse.ArgumentTypeError):
        _figures("one")
