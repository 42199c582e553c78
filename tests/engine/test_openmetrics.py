"""OpenMetrics 1.0.0: render_openmetrics / openmetrics_text, Aggregate.render_openmetrics and
``gatemetrics aggregate --format openmetrics``, checked by prometheus_client's OpenMetrics parser
(which no one here wrote) and byte for byte where the spec fixes the bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from gatemetrics import (
    OPENMETRICS_CONTENT_TYPE,
    FamilySamples,
    Sample,
    Snapshot,
    openmetrics_text,
    render_openmetrics,
)
from tests.engine.aggregate_helpers import agg
from tests.engine.schema import SHOP_NAMESPACE, dead_shop_shard
from tests.engine.test_exposition import TRICKY
from tests.processes import run_cli


def om_parse(text: str) -> dict[str, Metric]:
    """prometheus_client's OpenMetrics parser over ``text``: {family name: Metric}."""
    return {m.name: m for m in text_string_to_metric_families(text)}


def test_the_snapshot_renders_byte_for_byte_as_the_spec_says() -> None:
    text = render_openmetrics(Snapshot(TRICKY, (1, 2, 3, 4, 5, 6, 7)))
    assert text.splitlines() == [
        # HELP escapes the double quote too in OpenMetrics; the names lose _total.
        '# HELP tricky Help with a backslash \\\\ and a \\"quote\\"\\nand a second line.',
        "# TYPE tricky counter",
        'tricky_total{v="plain"} 1',
        'tricky_total{v="quo\\"te"} 2',
        'tricky_total{v="back\\\\slash"} 3',
        'tricky_total{v="new\\nline"} 4',
        'tricky_total{v="ünïcode"} 5',
        "# HELP plain Plain.",
        "# TYPE plain counter",
        "plain_total 6",
        "# HELP level A gauge.",
        "# TYPE level gauge",
        "level 7",
        "# EOF",
    ]
    assert text.endswith("# EOF\n")


def test_prometheus_clients_parser_reads_back_every_value_and_help() -> None:
    families = om_parse(render_openmetrics(Snapshot(TRICKY, (1, 2, 3, 4, 5, 6, 7))))
    assert list(families) == ["tricky", "plain", "level"]
    tricky = families["tricky"]
    assert tricky.type == "counter"
    assert tricky.documentation == TRICKY.families[0].documentation
    got = {s.labels["v"]: s.value for s in tricky.samples}
    assert got == dict(zip(TRICKY.families[0].values, [1, 2, 3, 4, 5], strict=True))
    assert [s.name for s in tricky.samples] == ["tricky_total"] * 5
    assert families["level"].type == "gauge"


@given(st.lists(st.integers(0, 2**63 - 1), min_size=7, max_size=7))
def test_any_counts_parse_and_render_the_same_bytes_twice(counts: list[int]) -> None:
    snap = Snapshot(TRICKY, tuple(counts))
    text = render_openmetrics(snap)
    assert text == render_openmetrics(Snapshot(TRICKY, tuple(counts)))
    values = [s.value for m in om_parse(text).values() for s in m.samples]
    assert values == counts  # integers, never 1e+18


# A histogram as the engine's histogram families give it: cumulative buckets, then sum, count.
LATENCY = FamilySamples(
    "shop_latency_seconds",
    "Checkout latency.",
    "histogram",
    (
        Sample("_bucket", (("till", "a"), ("le", "0.05")), 1),
        Sample("_bucket", (("till", "a"), ("le", "1")), 3),
        Sample("_bucket", (("till", "a"), ("le", "1e6")), 4),
        Sample("_bucket", (("till", "a"), ("le", "+Inf")), 5),
        Sample("_sum", (("till", "a"),), 12.5),
        Sample("_count", (("till", "a"),), 5),
        Sample("_bucket", (("till", 'b"q'), ("le", "0.05")), 0),
        Sample("_bucket", (("till", 'b"q'), ("le", "1")), 0),
        Sample("_bucket", (("till", 'b"q'), ("le", "1e6")), 0),
        Sample("_bucket", (("till", 'b"q'), ("le", "+Inf")), 0),
        Sample("_sum", (("till", 'b"q'),), 0.0),
        Sample("_count", (("till", 'b"q'),), 0),
    ),
)


def test_a_histogram_renders_with_canonical_bounds_and_parses() -> None:
    text = openmetrics_text([LATENCY])
    lines = text.splitlines()
    assert lines[:8] == [
        "# HELP shop_latency_seconds Checkout latency.",
        "# TYPE shop_latency_seconds histogram",
        'shop_latency_seconds_bucket{till="a",le="0.05"} 1',
        'shop_latency_seconds_bucket{till="a",le="1.0"} 3',
        'shop_latency_seconds_bucket{till="a",le="1e+06"} 4',
        'shop_latency_seconds_bucket{till="a",le="+Inf"} 5',
        'shop_latency_seconds_sum{till="a"} 12.5',
        'shop_latency_seconds_count{till="a"} 5',
    ]
    (metric,) = text_string_to_metric_families(text)
    assert metric.type == "histogram"
    a = [(s.name, s.labels.get("le"), s.value) for s in metric.samples if s.labels["till"] == "a"]
    assert a[-2:] == [
        ("shop_latency_seconds_sum", None, 12.5),
        ("shop_latency_seconds_count", None, 5),
    ]
    assert {s.labels["till"] for s in metric.samples} == {"a", 'b"q'}


@pytest.mark.parametrize(
    ("family", "problem"),
    [
        (FamilySamples("x_total", "", "summary", ()), "no OpenMetrics type for kind 'summary'"),
        (FamilySamples("x", "", "counter", ()), "must end in _total"),
        (FamilySamples("x_total", "", "counter", (Sample("_sum", (), 1),)), "no '_sum' sample"),
        (FamilySamples("g", "", "gauge", (Sample("_count", (), 1),)), "no '_count' sample"),
        (FamilySamples("h", "", "histogram", (Sample("", (), 1),)), "no '' sample"),
        (FamilySamples("h", "", "histogram", (Sample("_bucket", (), 1),)), "without an le"),
        (
            FamilySamples("h", "", "histogram", (Sample("_bucket", (("le", "x"),), 1),)),
            "le='x' is not a number",
        ),
        (
            FamilySamples("h", "", "histogram", (Sample("_bucket", (("le", "NaN"),), 1),)),
            "le='NaN' is not a number",
        ),
        (FamilySamples("g", "", "gauge", (Sample("", (), True),)), "not a sample value"),
    ],
)
def test_what_the_format_cannot_say_is_refused_naming_the_family(
    family: FamilySamples, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        openmetrics_text([family])
    assert family.name in str(err.value) or "sample value" in problem


def test_the_content_type_names_the_version() -> None:
    assert OPENMETRICS_CONTENT_TYPE == "application/openmetrics-text; version=1.0.0; charset=utf-8"


def test_an_aggregate_renders_the_same_samples_as_its_text_exposition(tmp_path: Path) -> None:
    dead_shop_shard(tmp_path, paid=2, refused=1)
    result = agg(tmp_path)
    families = om_parse(result.render_openmetrics())
    assert list(families) == [
        "shop_orders",
        "shop_refusals",
        "shop_errors",
        "shop_quarantined_shards",
        "shop_shards",
    ]
    paid = [s for s in families["shop_orders"].samples if s.labels == {"outcome": "paid"}]
    assert [s.value for s in paid] == [2]
    shards = {s.labels["state"]: s.value for s in families["shop_shards"].samples}
    assert shards == {"live": 0, "dead": 1}
    assert result.render_openmetrics() == render_openmetrics(result.pipeline_snapshot())


def test_the_cli_prints_openmetrics_and_still_compacts(tmp_path: Path) -> None:
    dead_shop_shard(tmp_path, paid=3)
    result = run_cli(
        "aggregate",
        "--dir",
        str(tmp_path),
        "--namespace",
        SHOP_NAMESPACE,
        "--format",
        "openmetrics",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("# EOF\n")
    families = om_parse(result.stdout)
    assert [s.value for s in families["shop_orders"].samples][:1] == [3]
    again = run_cli("aggregate", "--dir", str(tmp_path), "--format", "openmetrics")
    assert again.returncode == 0, again.stderr
    # Compacted by the first run: the dead shard is in the archive, no dead shard is left.
    assert om_parse(again.stdout)["shop_shards"].samples[1].value == 0


def test_the_cli_refuses_openmetrics_into_a_textfile(tmp_path: Path) -> None:
    dead_shop_shard(tmp_path, paid=3)
    target = tmp_path / "out.prom"
    result = run_cli(
        "aggregate", "--dir", str(tmp_path), "--format", "openmetrics", "--textfile", str(target)
    )
    assert result.returncode == 2
    assert "--format openmetrics writes to stdout only" in result.stderr
    assert not target.exists()
    assert len(list(tmp_path.glob("v2-*.shard"))) == 1  # refused before anything was compacted
