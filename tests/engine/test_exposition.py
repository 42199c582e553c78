"""Tests of gatemetrics.exposition: escaping, fixed order, determinism, promtool's verdict."""

from __future__ import annotations

import subprocess

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gatemetrics import CounterStore, Family, Schema, Snapshot, render_json, render_prometheus
from gatemetrics.exposition import CONTENT_TYPE, escape_help, escape_label_value, samples
from tests.exposition_parser import parse

TRICKY = Schema(
    (
        Family(
            "tricky_total",
            'Help with a backslash \\ and a "quote"\nand a second line.',
            key="tricky",
            label="v",
            values=("plain", 'quo"te', "back\\slash", "new\nline", "ünïcode"),
        ),
        Family("plain_total", "Plain.", key="plain"),
        Family("level", "A gauge.", key="level", kind="gauge"),
    )
)
# TRICKY as a store can hold it: a store refuses a gauge (no cross-process semantics yet), so
# the gauge's slot is a counter here, under the same key.
STORABLE = Schema(
    (*TRICKY.families[:2], Family("level_total", "A counter in the gauge's place.", key="level"))
)


def test_escaping_follows_the_text_format() -> None:
    assert escape_help('a\\b\n"c"') == 'a\\\\b\\n"c"'
    assert escape_label_value('a\\b\n"c"') == 'a\\\\b\\n\\"c\\"'


def test_rendering_is_in_schema_order_with_help_and_type() -> None:
    snap = Snapshot(TRICKY, (1, 2, 3, 4, 5, 6, 7))
    text = render_prometheus(snap)
    assert text.splitlines() == [
        '# HELP tricky_total Help with a backslash \\\\ and a "quote"\\nand a second line.',
        "# TYPE tricky_total counter",
        'tricky_total{v="plain"} 1',
        'tricky_total{v="quo\\"te"} 2',
        'tricky_total{v="back\\\\slash"} 3',
        'tricky_total{v="new\\nline"} 4',
        'tricky_total{v="ünïcode"} 5',
        "# HELP plain_total Plain.",
        "# TYPE plain_total counter",
        "plain_total 6",
        "# HELP level A gauge.",
        "# TYPE level gauge",
        "level 7",
    ]
    assert text.endswith("7\n")


def test_escaped_output_parses_back_to_the_original_values() -> None:
    families = parse(render_prometheus(Snapshot(TRICKY, (1, 2, 3, 4, 5, 6, 7))))
    assert {k[1] for k in families["tricky_total"].samples if k} == set(TRICKY.families[0].values)
    assert families["tricky_total"].help == TRICKY.families[0].documentation


def test_large_counts_render_as_integers() -> None:
    store = CounterStore(STORABLE)
    store.increment("plain", None, 2**62)
    assert f"plain_total {2**62}\n" in render_prometheus(store.snapshot())
    assert "e+" not in render_prometheus(store.snapshot())


def test_json_has_sorted_keys_and_metadata() -> None:
    text = render_json(Snapshot(TRICKY, (0,) * 7, generation=3, start_timestamp=10.5))
    data = orjson.loads(text)
    assert list(data) == sorted(data)
    assert list(data["tricky"]) == sorted(data["tricky"])
    assert data["store_generation"] == 3
    assert data["store_start_timestamp"] == 10.5


def test_content_type_names_the_text_format_version() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


@given(st.lists(st.integers(0, 2**63 - 1), min_size=7, max_size=7), st.randoms())
def test_equal_counts_render_byte_identical_whatever_the_store_history(
    counts: list[int], rnd: object
) -> None:
    """P7 (engine): the same counts give the same bytes, however they were accumulated."""
    a = CounterStore(STORABLE)
    b = CounterStore(STORABLE)
    slots = list(range(7))
    for slot in slots:
        a.increment(*_series(slot), counts[slot])
    rnd.shuffle(slots)  # type: ignore[attr-defined]
    for slot in slots:
        if counts[slot]:
            b.increment(*_series(slot), counts[slot] - 1)
            b.increment(*_series(slot))
    assert render_prometheus(a.snapshot()) == render_prometheus(b.snapshot())
    assert render_prometheus(a.snapshot()).encode() == render_prometheus(a.snapshot()).encode()


def _series(slot: int) -> tuple[str, str | None]:
    fam = TRICKY.families[0]
    if slot < fam.width:
        return ("tricky", fam.values[slot])
    return (("plain", None), ("level", None))[slot - fam.width]


def test_promtool_accepts_escaped_output_without_findings(promtool: str) -> None:
    text = render_prometheus(Snapshot(TRICKY, (1, 2, 3, 4, 5, 6, 7)))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == ""


def test_samples_name_every_series_as_the_text_renders_it() -> None:
    snap = Snapshot(TRICKY, (1, 2, 3, 4, 5, 6, 7))
    lines = []
    for fam in samples(snap):
        for sample in fam.samples:
            inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels)
            labels = f"{{{inner}}}" if inner else ""
            lines.append(f"{fam.name}{sample.suffix}{labels} {sample.value}")
    rendered = [ln for ln in render_prometheus(snap).splitlines() if not ln.startswith("#")]
    assert lines == rendered
    kinds = [(f.name, f.kind) for f in samples(snap)]
    assert kinds == [("tricky_total", "counter"), ("plain_total", "counter"), ("level", "gauge")]


def test_series_labels_are_the_pairs_in_slot_order() -> None:
    fam = TRICKY.family("tricky")
    assert fam.series_labels[0] == (("v", "plain"),)
    assert len(fam.series_labels) == fam.width
    assert TRICKY.family("plain").series_labels == ((),)
