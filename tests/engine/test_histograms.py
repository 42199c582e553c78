"""Histogram families end to end: declaration, observe(), the dictionary layout, v2 shards with
float cells, the archive, compaction, quarantine, SIGKILL at every step, and the exposition."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import subprocess
from bisect import bisect_left
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatemetrics import (
    Aggregate,
    CounterStore,
    Durability,
    Family,
    Schema,
    SchemaError,
    aggregate_dir,
    bind,
    new_identity,
    recorded_schema,
    render_json,
    render_prometheus,
    samples,
    shard_for,
)
from gatemetrics._format import (
    Archive,
    BadFile,
    Layout,
    decode_v2,
    parse_name,
    schema_from_record,
    schema_record,
    v2_names,
)
from gatemetrics.schema import MAX_BUCKETS
from gatemetrics.shards import CREATE_STEPS, SAVE_STEPS
from tests.engine.schema import (
    BASKET_BUCKETS,
    CHECKOUT_BUCKETS,
    HISTOGRAM_SCHEMA,
    SHOP_NAMESPACE,
    SHOP_SCHEMA,
    dead_shard,
)
from tests.exposition_parser import parse
from tests.processes import Reaper, require_tool, run_cli
from tests.readme_examples import run_readme_example

SCHEMA = HISTOGRAM_SCHEMA
CLEAN = ["aggregate.lock", "archive.json", "schema.json"]


def agg(directory: Path, *, compact: bool = False) -> Aggregate:
    return aggregate_dir(directory, SCHEMA, namespace=SHOP_NAMESPACE, compact=compact)


def model(values: list[float], bounds: tuple[float, ...]) -> tuple[list[int], float]:
    """Cumulative buckets (``+Inf`` last) and the sequential float sum of ``values``."""
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for v in values:
        counts[bisect_left(bounds, v)] += 1
        total += v
    running, cumulative = 0, []
    for n in counts:
        running += n
        cumulative.append(running)
    return cumulative, total


def dead_histogram_shard(directory: Path, checkouts: list[float], baskets: int = 0) -> str:
    """Save a store of SCHEMA whose owner then goes; returns the file name."""
    store = CounterStore(SCHEMA)
    for v in checkouts:
        store.observe("checkout", v)
    for i in range(baskets):
        store.observe("basket", float(i), "paid")
    return dead_shard(store, directory)


# -- declaration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs at least one finite bucket"),
        ({"buckets": (0.1, math.inf)}, "finite"),
        ({"buckets": (math.nan,)}, "finite"),
        ({"buckets": (0.1, 0.1)}, "strictly increasing"),
        ({"buckets": (1.0, 0.5)}, "strictly increasing"),
        ({"buckets": tuple(range(1, MAX_BUCKETS + 2))}, f"at most {MAX_BUCKETS}"),
        ({"buckets": (True,)}, "must be a number"),
        ({"buckets": ("0.1",)}, "must be a number"),
        ({"buckets": "0.1"}, "sequence of numbers"),
        ({"buckets": (0.1,), "name": "x_total"}, "must not end in _total"),
        ({"buckets": (0.1,), "name": "x_bucket"}, "_bucket"),
        ({"buckets": (0.1,), "name": "x_sum"}, "_sum"),
        ({"buckets": (0.1,), "name": "x_count"}, "_count"),
        ({"buckets": (0.1,), "name": "x_created"}, "_created"),
        ({"buckets": (0.1,), "label": "le", "values": ("a",)}, "must not be 'le'"),
    ],
)
def test_a_histogram_declaration_is_refused_for_each_rule(
    kwargs: dict[str, Any], message: str
) -> None:
    base: dict[str, Any] = {"name": "x_seconds", "documentation": "X.", "key": "x"}
    with pytest.raises(SchemaError, match=message):
        Family(**{**base, "kind": "histogram", **kwargs})


def test_only_a_histogram_declares_buckets() -> None:
    with pytest.raises(SchemaError, match="only a histogram declares buckets"):
        Family("x_total", "X.", key="x", buckets=(1.0,))


def test_a_histogram_takes_a_slot_per_bucket_and_a_float_cell_per_series() -> None:
    assert SCHEMA.size == 2 + 4 + 2 * 5 + 1
    assert SCHEMA.float_size == 3
    assert SCHEMA.family("checkout").buckets == CHECKOUT_BUCKETS
    assert SCHEMA.family("basket").bucket_labels == ("1.0", "5.0", "10.0", "50.0", "+Inf")
    assert SCHEMA.histogram("basket", "refused").first == 2 + 4 + 5
    assert SCHEMA.histogram("basket", "refused").sum_cell == 2
    assert SCHEMA.slot("errors") == SCHEMA.size - 1  # counters after it keep one slot each
    with pytest.raises(SchemaError, match="recorded with observe"):
        SCHEMA.slot("checkout")
    with pytest.raises(SchemaError, match="not a histogram"):
        SCHEMA.histogram("errors")
    with pytest.raises(SchemaError, match="unknown label value"):
        SCHEMA.histogram("basket", "stolen")
    # Integer bounds are floats once declared: le renders as prometheus_client renders them.
    assert Family("n_items", "N.", key="n", kind="histogram", buckets=(1, 2)).buckets == (1.0, 2.0)


# -- observe -------------------------------------------------------------------------------


def test_observe_counts_the_first_bucket_whose_bound_holds_the_value_and_adds_to_the_sum() -> None:
    store = CounterStore(SCHEMA)
    values = [0.0, 0.01, 0.0100001, 0.1, 0.5, 1.0, 1.5, 1e9]
    for v in values:
        store.observe("checkout", v)
    buckets, total = store.snapshot().histogram("checkout")
    assert buckets == (2, 4, 6, 8)  # le=0.01 holds 0.0 and the bound itself
    assert total == model(values, CHECKOUT_BUCKETS)[1]
    store.observe("basket", 7, "refused")  # an int is a number too
    assert store.snapshot().histogram("basket", "refused") == ((0, 0, 1, 1, 1), 7.0)
    assert store.snapshot().histogram("basket", "paid") == ((0,) * 5, 0.0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-0.001, "finite and >= 0"),
        (-1, "finite and >= 0"),
        (math.nan, "finite and >= 0"),
        (math.inf, "finite and >= 0"),
        (-math.inf, "finite and >= 0"),
        (10**400, "finite and >= 0"),
        (True, "must be a number"),
        ("0.1", "must be a number"),
        (None, "must be a number"),
    ],
)
def test_observe_refuses_what_would_make_the_sum_go_down_or_stop_being_a_number(
    value: object, message: str
) -> None:
    store = CounterStore(SCHEMA)
    store.observe("checkout", 0.5)
    calls: list[int] = []
    store.set_change_hook(lambda: calls.append(1))
    with pytest.raises(SchemaError, match=message):
        store.observe("checkout", value)  # type: ignore[arg-type]
    assert store.snapshot().histogram("checkout") == ((0, 0, 1, 1), 0.5)  # nothing changed
    assert calls == []
    store.observe("checkout", 0.25)
    assert calls == [1]  # one observation, one notification


def test_a_sum_that_would_overflow_is_refused_and_nothing_changes() -> None:
    store = CounterStore(SCHEMA)
    store.observe("checkout", 1.7e308)
    with pytest.raises(SchemaError, match="overflow"):
        store.observe("checkout", 1.7e308)
    assert store.snapshot().histogram("checkout") == ((0, 0, 0, 1), 1.7e308)


def test_observe_refuses_a_series_outside_the_schema() -> None:
    store = CounterStore(SCHEMA)
    with pytest.raises(SchemaError):
        store.observe("errors", 1.0)
    with pytest.raises(SchemaError):
        store.observe("basket", 1.0)  # a labelled histogram needs its label value
    with pytest.raises(SchemaError):
        store.observe("basket", 1.0, "stolen")
    with pytest.raises(SchemaError, match="observe"):
        store.increment("checkout")
    with pytest.raises(SchemaError, match="use histogram"):
        store.snapshot().family("basket")  # its slots are buckets, not series
    with pytest.raises(SchemaError, match="use histogram"):
        store.snapshot().series("basket")
    assert store.snapshot() == CounterStore(SCHEMA, clock=lambda: store.start_timestamp).snapshot()


# -- the dictionary layout -----------------------------------------------------------------


def test_the_dictionary_layout_has_cumulative_buckets_count_and_sum_and_round_trips() -> None:
    store = CounterStore(SCHEMA, clock=lambda: 3.0)
    for v in (0.005, 0.2, 4.0):
        store.observe("checkout", v)
    store.observe("basket", 3, "paid")
    doc = store.to_dict()
    assert doc["checkout"] == {
        "buckets": {"0.01": 1, "0.1": 1, "1.0": 2, "+Inf": 3},
        "count": 3,
        "sum": 0.005 + 0.2 + 4.0,
    }
    assert doc["basket"]["paid"] == {
        "buckets": {"1.0": 0, "5.0": 1, "10.0": 1, "50.0": 1, "+Inf": 1},
        "count": 1,
        "sum": 3.0,
    }
    again = CounterStore(SCHEMA)
    again.restore(orjson.loads(orjson.dumps(doc)))
    assert again.snapshot() == store.snapshot()
    assert render_json(again.snapshot()) == render_json(store.snapshot())


def _checkout_doc(**changes: Any) -> dict[str, Any]:
    series = {"buckets": {"0.01": 1, "0.1": 1, "1.0": 2, "+Inf": 3}, "count": 3, "sum": 4.0}
    series.update(changes)
    return {"checkout": series, "store_generation": 0, "store_start_timestamp": 1.0}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_checkout_doc(buckets={"0.01": 2, "0.1": 1, "1.0": 2, "+Inf": 3}), "went down"),
        (_checkout_doc(buckets={"0.01": 1, "0.1": 1, "+Inf": 3}), "declared bounds"),
        (_checkout_doc(buckets={"0.01": 1, "0.1": 1, "1": 2, "+Inf": 3}), "declared bounds"),
        (_checkout_doc(count=4), "does not equal the \\+Inf bucket"),
        (_checkout_doc(sum=math.nan), "finite and non-negative"),
        (_checkout_doc(sum=-1.0), "finite and non-negative"),
        (_checkout_doc(sum=math.inf), "finite and non-negative"),
        (_checkout_doc(sum="4.0"), "must be a number"),
        (_checkout_doc(sum=True), "must be a number"),
        (_checkout_doc(buckets={"0.01": -1, "0.1": 1, "1.0": 2, "+Inf": 3}), "negative"),
        (_checkout_doc(buckets={"0.01": 1.0, "0.1": 1, "1.0": 2, "+Inf": 3}), "integer"),
        (
            {
                "checkout": {"buckets": {"0.01": 0, "0.1": 0, "1.0": 0, "+Inf": 0}, "count": 0},
                "store_generation": 0,
                "store_start_timestamp": 1.0,
            },
            "buckets, count, sum",
        ),
        (
            {
                "checkout": {
                    "buckets": {"0.01": 0, "0.1": 0, "1.0": 0, "+Inf": 0},
                    "count": 0,
                    "sum": 0.5,
                },
                "store_generation": 0,
                "store_start_timestamp": 1.0,
            },
            "without observations",
        ),
        ({"checkout": 3, "store_generation": 0, "store_start_timestamp": 1.0}, "buckets"),
        ({"basket": {"stolen": {}}, "store_generation": 0, "store_start_timestamp": 1.0}, "stolen"),
    ],
)
def test_restore_refuses_a_histogram_that_does_not_add_up_and_changes_nothing(
    doc: dict[str, Any], message: str
) -> None:
    store = CounterStore(SCHEMA)
    store.observe("checkout", 0.5)
    before = store.snapshot()
    with pytest.raises(SchemaError, match=message):
        store.restore(doc)
    assert store.snapshot() == before


# -- exposition ----------------------------------------------------------------------------


def _observed_store() -> CounterStore:
    store = CounterStore(SCHEMA)
    store.increment("orders", "paid", 2)
    for v in (0.005, 0.05, 0.05, 2.0):
        store.observe("checkout", v)
    store.observe("basket", 12, "paid")
    store.observe("basket", 0.5, "refused")
    return store


EXPECTED_TEXT = (
    "# HELP shop_orders_total Orders, by outcome.\n"
    "# TYPE shop_orders_total counter\n"
    'shop_orders_total{outcome="paid"} 2\n'
    'shop_orders_total{outcome="refused"} 0\n'
    "# HELP shop_checkout_seconds Time a checkout takes.\n"
    "# TYPE shop_checkout_seconds histogram\n"
    'shop_checkout_seconds_bucket{le="0.01"} 1\n'
    'shop_checkout_seconds_bucket{le="0.1"} 3\n'
    'shop_checkout_seconds_bucket{le="1.0"} 3\n'
    'shop_checkout_seconds_bucket{le="+Inf"} 4\n'
    f"shop_checkout_seconds_sum {0.005 + 0.05 + 0.05 + 2.0!r}\n"
    "shop_checkout_seconds_count 4\n"
    "# HELP shop_basket_items Items per basket, by outcome.\n"
    "# TYPE shop_basket_items histogram\n"
    'shop_basket_items_bucket{outcome="paid",le="1.0"} 0\n'
    'shop_basket_items_bucket{outcome="paid",le="5.0"} 0\n'
    'shop_basket_items_bucket{outcome="paid",le="10.0"} 0\n'
    'shop_basket_items_bucket{outcome="paid",le="50.0"} 1\n'
    'shop_basket_items_bucket{outcome="paid",le="+Inf"} 1\n'
    'shop_basket_items_sum{outcome="paid"} 12.0\n'
    'shop_basket_items_count{outcome="paid"} 1\n'
    'shop_basket_items_bucket{outcome="refused",le="1.0"} 1\n'
    'shop_basket_items_bucket{outcome="refused",le="5.0"} 1\n'
    'shop_basket_items_bucket{outcome="refused",le="10.0"} 1\n'
    'shop_basket_items_bucket{outcome="refused",le="50.0"} 1\n'
    'shop_basket_items_bucket{outcome="refused",le="+Inf"} 1\n'
    'shop_basket_items_sum{outcome="refused"} 0.5\n'
    'shop_basket_items_count{outcome="refused"} 1\n'
    "# HELP shop_errors_total Errors while counting.\n"
    "# TYPE shop_errors_total counter\n"
    "shop_errors_total 0\n"
)


def test_the_text_exposition_of_a_histogram_is_exactly_the_documented_bytes() -> None:
    assert render_prometheus(_observed_store().snapshot()) == EXPECTED_TEXT


def test_samples_carry_the_same_series_as_the_text() -> None:
    families = {f.name: f for f in samples(_observed_store().snapshot())}
    checkout = families["shop_checkout_seconds"]
    assert checkout.kind == "histogram"
    assert [(s.suffix, s.labels, s.value) for s in checkout.samples] == [
        ("_bucket", (("le", "0.01"),), 1),
        ("_bucket", (("le", "0.1"),), 3),
        ("_bucket", (("le", "1.0"),), 3),
        ("_bucket", (("le", "+Inf"),), 4),
        ("_sum", (), 0.005 + 0.05 + 0.05 + 2.0),
        ("_count", (), 4),
    ]
    basket = families["shop_basket_items"].samples
    assert basket[0].labels == (("outcome", "paid"), ("le", "1.0"))
    assert [s.suffix for s in basket] == (["_bucket"] * 5 + ["_sum", "_count"]) * 2
    # Rebuilding the text from the model gives the renderer's bytes (the two never disagree).
    lines = []
    for fam in samples(_observed_store().snapshot()):
        lines += [f"# HELP {fam.name} {fam.documentation}", f"# TYPE {fam.name} {fam.kind}"]
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels)
            value = repr(s.value) if isinstance(s.value, float) else str(s.value)
            lines.append(f"{fam.name}{s.suffix}{'{' + labels + '}' if labels else ''} {value}")
    assert "\n".join(lines) + "\n" == EXPECTED_TEXT


def test_promtool_accepts_the_exposition_of_histograms(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    dead_histogram_shard(tmp_path, [0.001, 0.3, 7.5], baskets=3)
    text = agg(tmp_path).render_prometheus()
    assert "# TYPE shop_checkout_seconds histogram\n" in text
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- shards --------------------------------------------------------------------------------


def test_a_v2_shard_carries_the_sums_as_float_cells_and_reads_back_exactly(tmp_path: Path) -> None:
    store = _observed_store()
    shard = shard_for(store, tmp_path)
    assert shard.save()
    assert shard.path is not None
    data = Path(shard.path).read_bytes()
    inc = parse_name(os.path.basename(shard.path))
    assert inc is not None
    record = decode_v2(data, SCHEMA, inc[0])
    assert record.counts == store.snapshot().counts
    assert record.sums == store.snapshot().sums
    assert json.loads(data[52 : 52 + Layout.PREFIX.unpack_from(data)[7]])["cells"] == {
        "int": SCHEMA.size,
        "float": 3,
    }
    shard.close(save=False)
    merged = agg(tmp_path).snapshot()
    assert (merged.counts, merged.sums) == (store.snapshot().counts, store.snapshot().sums)


def test_a_schema_without_histograms_keeps_its_record_fingerprint_and_slot_format() -> None:
    # No float cell, no "buckets" field: every existing schema's shards are byte for byte what
    # they were, so this release and the previous one keep reading each other's.
    layout = Layout(SHOP_SCHEMA)
    record = {
        "families": [
            {
                "name": f.name,
                "key": f.key,
                "kind": f.kind,
                "documentation": f.documentation,
                "label": f.label,
                "values": list(f.values),
            }
            for f in SHOP_SCHEMA.families
        ]
    }
    assert schema_record(SHOP_SCHEMA) == record
    digest = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).digest()[:16]
    assert layout.fingerprint == digest
    assert layout.cells_record == {"int": SHOP_SCHEMA.size, "float": 0}
    assert layout.slot.format == f"<QQdd{SHOP_SCHEMA.size}q"


def test_a_new_incarnation_saves_only_its_own_sum_never_a_negative_one(tmp_path: Path) -> None:
    store = CounterStore(SCHEMA)
    values = [0.1, 0.2, 0.3, 1e-17, 0.7, 1 / 3]
    shard = shard_for(store, tmp_path)
    for v in values[:3]:
        store.observe("checkout", v)
    assert shard.save()
    shard.close()  # ends the incarnation: what it saved becomes the next one's baseline
    for v in values[3:]:
        store.observe("checkout", v)
    again = shard_for(store, tmp_path)
    assert again.save()
    result = agg(tmp_path)
    assert [r.action for r in result.shards] == ["counted", "counted"]
    buckets, total = result.snapshot().histogram("checkout")
    assert buckets[-1] == len(values)
    assert total == pytest.approx(sum(values), rel=1e-15)
    again.close()


def test_a_restored_store_whose_sum_went_down_is_refused_a_save(tmp_path: Path) -> None:
    store = CounterStore(SCHEMA)
    store.observe("checkout", 0.5)
    store.observe("checkout", 0.5)
    shard = shard_for(store, tmp_path, failure_key="errors")
    assert shard.save()
    doc = store.to_dict()
    doc["checkout"]["sum"] = 0.25  # the same counts, a smaller sum
    store.restore(doc)
    assert not shard.save()  # refused, counted as a failure, the file keeps the last save
    assert store.get("errors") == 1
    assert agg(tmp_path).snapshot().histogram("checkout") == ((0, 0, 2, 2), 1.0)
    shard.close(save=False)


# -- hostile and broken shards -------------------------------------------------------------


def _rewrite_newest(path: Path, counts: list[int], sums: list[float]) -> None:
    """Write a well-checksummed slot with ``counts`` and ``sums`` and the highest sequence."""
    data = path.read_bytes()
    layout = Layout(SCHEMA)
    header_len = Layout.PREFIX.unpack_from(data)[3]
    seq = 1001
    slot = layout.pack(seq, 9, 1.0, 1.0, counts, sums=sums)
    with open(path, "r+b") as f:
        f.seek(layout.slot_offset(header_len, seq))
        f.write(slot)


def _counts_with(checkout: list[int]) -> list[int]:
    counts = SCHEMA.zeros()
    first = SCHEMA.histogram("checkout").first
    counts[first : first + len(checkout)] = checkout
    return counts


@pytest.mark.parametrize(
    ("checkout", "sums", "problem"),
    [
        ([0, 1, 0, 0], [math.nan, 0.0, 0.0], "finite and non-negative"),
        ([0, 1, 0, 0], [-0.5, 0.0, 0.0], "finite and non-negative"),
        ([0, 1, 0, 0], [math.inf, 0.0, 0.0], "finite and non-negative"),
        ([0, 0, 0, 0], [0.5, 0.0, 0.0], "without observations"),
        ([0, 0, 0, 0], [0.0, 0.0, 2.0], "without observations"),  # basket{refused}
    ],
)
def test_a_shard_with_a_bad_sum_is_quarantined_not_counted(
    tmp_path: Path, checkout: list[int], sums: list[float], problem: str
) -> None:
    good = dead_histogram_shard(tmp_path, [0.05, 0.05])
    bad = dead_histogram_shard(tmp_path, [0.5])
    _rewrite_newest(tmp_path / bad, _counts_with(checkout), sums)
    result = agg(tmp_path)
    (report,) = [r for r in result.shards if r.name == bad]
    assert report.action == "quarantined"
    assert report.problem is not None
    assert problem in report.problem
    assert result.snapshot().histogram("checkout") == ((0, 2, 2, 2), 0.1)  # the good one only
    result = agg(tmp_path, compact=True)
    (moved,) = os.listdir(tmp_path / "quarantine")
    assert moved.startswith(f"{bad}.")  # quarantine keeps the name, with a unique suffix
    assert result.snapshot().histogram("checkout") == ((0, 2, 2, 2), 0.1)
    assert agg(tmp_path).snapshot().histogram("checkout") == ((0, 2, 2, 2), 0.1)
    assert good not in os.listdir(tmp_path)  # absorbed into the archive


def _planted(directory: Path, layout: Layout) -> str:
    ident = new_identity()
    header = layout.header(
        incarnation=ident.incarnation, pid=ident.pid, host=ident.host, started_at=1.0
    )
    name = v2_names(ident.incarnation)[0]
    (directory / name).write_bytes(layout.new_file(header, 1.0))
    return name


def test_a_shard_whose_cells_do_not_match_its_histograms_is_quarantined(tmp_path: Path) -> None:
    dead_histogram_shard(tmp_path, [0.05])
    wrong = Layout(SCHEMA)
    wrong.cells_record = {"int": SCHEMA.size, "float": 0}  # a writer that lost its sums
    fewer = Layout(SCHEMA)
    fewer.cells_record = {"int": SCHEMA.size - 1, "float": 3}  # a bucket short
    names = {_planted(tmp_path, wrong), _planted(tmp_path, fewer)}
    result = agg(tmp_path)
    bad = {r.name: r.problem for r in result.shards if r.action == "quarantined"}
    assert set(bad) == names
    assert all(p == "its slot layout does not match its schema" for p in bad.values())
    assert result.snapshot().histogram("checkout") == ((0, 1, 1, 1), 0.05)


def test_a_shard_written_with_other_buckets_is_another_schema(tmp_path: Path) -> None:
    other = Schema(
        [
            *SCHEMA.families[:1],
            Family(
                "shop_checkout_seconds",
                "Time a checkout takes.",
                key="checkout",
                kind="histogram",
                buckets=(0.01, 0.1, 2.0),
            ),
            *SCHEMA.families[2:],
        ]
    )
    store = CounterStore(other)
    store.observe("checkout", 1.5)
    dead_shard(store, tmp_path)
    dead_histogram_shard(tmp_path, [0.05])
    result = agg(tmp_path)
    problems = [r.problem for r in result.shards if r.action == "quarantined"]
    assert problems == ["written with another schema (buckets of 'checkout' differ)"]
    assert result.snapshot().histogram("checkout") == ((0, 1, 1, 1), 0.05)


def test_a_shard_with_fewer_label_values_maps_its_buckets_and_sum(tmp_path: Path) -> None:
    older = Schema(
        [
            *SCHEMA.families[:2],
            Family(
                "shop_basket_items",
                "Items per basket, by outcome.",
                key="basket",
                label="outcome",
                values=("refused",),
                kind="histogram",
                buckets=BASKET_BUCKETS,
            ),
            *SCHEMA.families[3:],
        ]
    )
    store = CounterStore(older)
    store.observe("basket", 20.0, "refused")
    store.observe("checkout", 0.5)
    dead_shard(store, tmp_path)
    snap = agg(tmp_path).snapshot()
    assert snap.histogram("basket", "refused") == ((0, 0, 0, 1, 1), 20.0)
    assert snap.histogram("basket", "paid") == ((0,) * 5, 0.0)
    assert snap.histogram("checkout") == ((0, 0, 1, 1), 0.5)


# -- the archive ---------------------------------------------------------------------------


def test_compaction_folds_dead_shards_buckets_and_sums_and_the_output_never_changes(
    tmp_path: Path, reaper: Reaper
) -> None:
    runs = [[0.005, 0.3], [0.02] * 3, [5.0, 0.0], [0.1 + 0.2]]
    for values in runs[:3]:
        dead_histogram_shard(tmp_path, values, baskets=2)
    live = reaper.python(
        """
        from gatemetrics import CounterStore, bind
        from tests.engine.schema import HISTOGRAM_SCHEMA
        store = CounterStore(HISTOGRAM_SCHEMA)
        binding = bind(store, sys.argv[1])
        store.observe("checkout", float(sys.argv[2]))
        print("ready", flush=True)
        sys.stdin.readline()
        """,
        str(tmp_path),
        repr(runs[3][0]),
        stdin=True,
    )
    assert live.stdout is not None
    assert live.stdout.readline() == "ready\n"
    every = [v for values in runs for v in values]
    buckets, _ = model(every, CHECKOUT_BUCKETS)
    total = math.fsum(math.fsum([0.0, *values]) for values in runs)
    before = agg(tmp_path)
    assert before.snapshot().histogram("checkout") == (tuple(buckets), total)
    # The caller's families only: the pipeline's shop_shards{state} changes as shards go.
    text = render_prometheus(before.snapshot())
    compacted = agg(tmp_path, compact=True)
    assert compacted.compaction is not None
    assert compacted.compaction.absorbed == 3
    assert render_prometheus(compacted.snapshot()) == text
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    folded, folded_sum = model([v for values in runs[:3] for v in values], CHECKOUT_BUCKETS)
    assert archive["counts"]["checkout"] == {
        "buckets": dict(zip(SCHEMA.family("checkout").bucket_labels, folded, strict=True)),
        "count": folded[-1],
        "sum": math.fsum(math.fsum([0.0, *values]) for values in runs[:3]),
    }
    assert archive["counts"]["basket"]["paid"]["count"] == 6
    assert folded_sum == pytest.approx(archive["counts"]["checkout"]["sum"])
    assert render_prometheus(agg(tmp_path).snapshot()) == text  # read back from the archive
    assert live.stdin is not None
    live.stdin.write("\n")
    live.stdin.flush()
    assert live.wait(timeout=30) == 0
    assert (
        agg(tmp_path, compact=True).render_prometheus().split("# HELP shop_errors")[0]
        == (text.split("# HELP shop_errors")[0])
    )
    assert sorted(os.listdir(tmp_path)) == CLEAN


def test_an_archive_without_histograms_is_byte_identical_to_the_previous_release() -> None:
    archive = Archive([1, 2, 3, 4, 5, 6], {"a" * 8 + "-1-1-" + "0" * 16}, 1, 0, set(), 5.0, 1.0)
    assert archive.encode(SHOP_SCHEMA) == (
        b'{"format":"gatemetrics-archive","version":1,"counts":{"orders":{"paid":1,"refused":2},'
        b'"refusals":{"no_stock":3,"no_money":4,"fraud":5},"errors":6},"absorbed":["aaaaaaaa-1-1-'
        b'0000000000000000"],"absorbed_total":1,"quarantined_total":0,"quarantining":[],'
        b'"updated_at":5.0,"first_start":1.0}'
    )


def test_a_reader_without_the_histogram_refuses_an_archive_that_has_it(tmp_path: Path) -> None:
    # What the previous release does too: its archive reader knows no such family, so it
    # refuses the directory (SchemaError, nothing moved) instead of dropping the histogram.
    dead_histogram_shard(tmp_path, [0.5])
    agg(tmp_path, compact=True)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SchemaError, match="unknown family"):
        aggregate_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, compact=True)
    assert sorted(os.listdir(tmp_path)) == before


def test_the_archive_refuses_a_histogram_that_does_not_add_up(tmp_path: Path) -> None:
    dead_histogram_shard(tmp_path, [0.5])
    agg(tmp_path, compact=True)
    doc = orjson.loads((tmp_path / "archive.json").read_bytes())
    doc["counts"]["checkout"]["sum"] = -1.0
    (tmp_path / "archive.json").write_bytes(orjson.dumps(doc))
    with pytest.raises(SchemaError, match="finite and non-negative"):
        agg(tmp_path)


# -- crash points: SIGKILL at every step of creating a shard and of a save ------------------

KILLED_OBSERVER = """
from gatemetrics import CounterStore, bind, save_to_dir
from tests.engine.schema import HISTOGRAM_SCHEMA
directory, step, durability = sys.argv[1:4]
store = CounterStore(HISTOGRAM_SCHEMA)
binding = bind(store, directory, durability=durability)
for v in (0.005, 0.05, 0.5):
    store.observe("checkout", v)
if step.startswith("create."):
    binding.close()  # a dead incarnation holding the three; the next save creates another
    store.observe("basket", 7.0, "paid")
    _faults.install_kill_at(step)
    save_to_dir(store, directory, durability=durability)
else:
    _faults.install_kill_at(step)
    store.observe("basket", 7.0, "paid")  # killed in its save
print("not killed", flush=True)
"""


@pytest.mark.parametrize("durability", list(Durability))
@pytest.mark.parametrize("step", [*CREATE_STEPS, *SAVE_STEPS])
def test_an_observer_killed_at_any_step_leaves_exact_buckets_and_sums(
    tmp_path: Path, reaper: Reaper, step: str, durability: Durability
) -> None:
    proc = reaper.python(KILLED_OBSERVER, str(tmp_path), step, durability.value)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, out + err
    # The last observation (bucket and sum together) is all there or not at all.
    completed = step in ("save.written", "save.done")
    checkout = ((1, 2, 3, 3), 0.005 + 0.05 + 0.5)
    basket = ((0, 0, 1, 1, 1), 7.0) if completed else ((0,) * 5, 0.0)
    for compact in (False, True, False):
        result = agg(tmp_path, compact=compact)
        assert result.quarantined_total == 0
        snap = result.snapshot()
        assert snap.histogram("checkout") == checkout
        assert snap.histogram("basket", "paid") == basket
    assert sorted(os.listdir(tmp_path)) == CLEAN


# -- properties ----------------------------------------------------------------------------

observations = st.lists(
    st.tuples(
        st.integers(0, 2),  # which store (process) observes
        st.sampled_from([None, "paid", "refused"]),  # None: checkout, else basket{outcome}
        st.one_of(
            st.floats(0.0, 100.0, allow_nan=False),
            st.sampled_from([0.0, *CHECKOUT_BUCKETS, *BASKET_BUCKETS]),  # on a bound
        ),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(observations, st.permutations(range(3)))
def test_any_observations_render_as_their_model_whatever_the_read_order(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[int, str | None, float]],
    order: list[int],
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    stores = [CounterStore(SCHEMA) for _ in range(3)]
    seen: dict[tuple[int, str | None], list[float]] = {}
    for who, outcome, value in ops:
        if outcome is None:
            stores[who].observe("checkout", value)
        else:
            stores[who].observe("basket", value, outcome)
        seen.setdefault((who, outcome), []).append(value)
    for who in order:  # shards created in another order: the output must not depend on it
        shard = shard_for(stores[who], directory)
        assert shard.save()
        shard.close(save=False)
    text = agg(directory).render_prometheus()
    families = parse(text)
    own = render_prometheus(agg(directory).snapshot())  # without the pipeline families
    for outcome, name, bounds in (
        (None, "shop_checkout_seconds", CHECKOUT_BUCKETS),
        ("paid", "shop_basket_items", BASKET_BUCKETS),
        ("refused", "shop_basket_items", BASKET_BUCKETS),
    ):
        every = [v for who in range(3) for v in seen.get((who, outcome), [])]
        buckets, _ = model(every, bounds)
        per_store = [model(seen.get((who, outcome), []), bounds)[1] for who in range(3)]
        key = None if outcome is None else ("outcome", outcome)
        series = families[name].histograms[key]
        assert list(series.buckets.values()) == buckets
        assert series.count == len(every)
        assert series.sum == math.fsum([0.0, *per_store])
    # Compaction folds the shards into the archive: the same buckets and sums, bit for bit.
    assert render_prometheus(agg(directory, compact=True).snapshot()) == own
    assert render_prometheus(agg(directory).snapshot()) == own


# -- several labels and handles ------------------------------------------------------------

LATENCY = Family(
    "web_request_seconds",
    "Request latency, by route and status class.",
    key="latency",
    labels=(("route", ("create", "read")), ("code", ("2xx", "5xx"))),
    kind="histogram",
    buckets=(0.1, 1.0),
)
WEB_SCHEMA = Schema([Family("web_errors_total", "Errors.", key="errors"), LATENCY])


def test_a_histogram_with_two_labels_has_a_series_per_combination_rendered_in_order() -> None:
    store = CounterStore(WEB_SCHEMA)
    store.observe("latency", 0.05, route="read", code="2xx")
    store.observe("latency", 3.0, ("create", "5xx"))
    store.family("latency").labels(route="read", code="5xx").observe(0.5)
    store.family("latency").labels("read", "2xx").observe(0.25)
    assert WEB_SCHEMA.size == 1 + 4 * 3
    assert WEB_SCHEMA.float_size == 4
    snap = store.snapshot()
    assert snap.histogram("latency", ("read", "2xx")) == ((1, 2, 2), 0.3)
    assert snap.histogram("latency", {"route": "create", "code": "5xx"}) == ((0, 0, 1), 3.0)
    text = render_prometheus(snap)
    assert text.splitlines()[5:12] == [
        'web_request_seconds_bucket{route="create",code="2xx",le="0.1"} 0',
        'web_request_seconds_bucket{route="create",code="2xx",le="1.0"} 0',
        'web_request_seconds_bucket{route="create",code="2xx",le="+Inf"} 0',
        'web_request_seconds_sum{route="create",code="2xx"} 0.0',
        'web_request_seconds_count{route="create",code="2xx"} 0',
        'web_request_seconds_bucket{route="create",code="5xx",le="0.1"} 0',
        'web_request_seconds_bucket{route="create",code="5xx",le="1.0"} 0',
    ]
    parsed = parse(text)["web_request_seconds"].histograms
    assert parsed[(("route", "read"), ("code", "5xx"))].buckets == {"0.1": 0, "1.0": 1, "+Inf": 1}
    doc = store.to_dict()
    assert doc["latency"]["read"]["2xx"] == {
        "buckets": {"0.1": 1, "1.0": 2, "+Inf": 2},
        "count": 2,
        "sum": 0.3,
    }
    again = CounterStore(WEB_SCHEMA)
    again.restore(doc)
    assert again.snapshot() == snap
    with pytest.raises(SchemaError, match="unknown label value"):
        again.restore({**doc, "latency": {"read": {"3xx": doc["latency"]["read"]["2xx"]}}})
    with pytest.raises(SchemaError, match="must not be 'le'"):
        Family(
            "x_seconds",
            "X.",
            key="x",
            labels=(("a", ("1",)), ("le", ("2",))),
            kind="histogram",
            buckets=(1.0,),
        )


def test_a_shard_with_fewer_values_of_two_labels_maps_into_a_wider_histogram(
    tmp_path: Path,
) -> None:
    promtool = require_tool("promtool")
    narrow = Schema(
        [
            WEB_SCHEMA.families[0],
            Family(
                LATENCY.name,
                LATENCY.documentation,
                key="latency",
                labels=(("route", ("read",)), ("code", ("5xx", "2xx"))),
                kind="histogram",
                buckets=LATENCY.buckets,
            ),
        ]
    )
    store = CounterStore(narrow)
    store.observe("latency", 0.7, route="read", code="5xx")
    dead_shard(store, tmp_path)
    wide = CounterStore(WEB_SCHEMA)
    wide.observe("latency", 0.01, route="create", code="2xx")
    dead_shard(wide, tmp_path)
    result = aggregate_dir(tmp_path, WEB_SCHEMA, namespace="web", compact=True)
    snap = result.snapshot()
    assert snap.histogram("latency", ("read", "5xx")) == ((0, 1, 1), 0.7)
    assert snap.histogram("latency", ("create", "2xx")) == ((1, 1, 1), 0.01)
    assert snap.histogram("latency", ("read", "2xx")) == ((0, 0, 0), 0.0)
    text = aggregate_dir(tmp_path, WEB_SCHEMA, namespace="web").render_prometheus()
    assert render_prometheus(snap) in text
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_histogram_handles_observe_once_per_call_and_refuse_what_is_not_theirs(
    tmp_path: Path,
) -> None:
    store = CounterStore(SCHEMA)
    binding = bind(store, tmp_path)
    basket = store.family("basket").labels(outcome="paid")
    assert store.family("basket").labels("paid") is basket  # resolved once, kept
    generation = store.generation
    basket.observe(3)
    store.family("checkout").observe(0.2)
    assert store.generation == generation + 2  # write-through: one save per observation
    assert basket.get() == 1
    with pytest.raises(SchemaError, match="observe"):
        basket.inc()
    with pytest.raises(SchemaError, match="inc"):
        store.family("orders").labels("paid").observe(1.0)
    with pytest.raises(SchemaError, match="finite and >= 0"):
        basket.observe(-1.0)
    with pytest.raises(SchemaError, match="unknown label value"):
        store.family("basket").labels("stolen")
    with pytest.raises(SchemaError, match="use labels"):
        store.family("basket").observe(1.0)
    binding.close()
    snap = agg(tmp_path).snapshot()
    assert snap.histogram("basket", "paid") == ((0, 1, 1, 1, 1), 3.0)
    assert snap.histogram("checkout") == ((0, 0, 1, 1), 0.2)


# -- gauges --------------------------------------------------------------------------------


def test_a_store_refuses_a_gauge_family_and_says_why(tmp_path: Path) -> None:
    schema = Schema([Family("queue_depth", "Jobs waiting.", key="depth", kind="gauge")])
    with pytest.raises(SchemaError, match="no cross-process semantics"):
        CounterStore(schema)
    assert os.listdir(tmp_path) == []


def test_the_aggregators_own_gauge_still_counts_live_and_dead_shards(
    tmp_path: Path, reaper: Reaper
) -> None:
    dead_histogram_shard(tmp_path, [0.5])
    live = reaper.python(
        """
        from gatemetrics import CounterStore, bind
        from tests.engine.schema import HISTOGRAM_SCHEMA
        binding = bind(CounterStore(HISTOGRAM_SCHEMA), sys.argv[1])
        binding.save()
        print("ready", flush=True)
        sys.stdin.readline()
        """,
        str(tmp_path),
        stdin=True,
    )
    assert live.stdout is not None
    assert live.stdout.readline() == "ready\n"
    families = parse(agg(tmp_path).render_prometheus())
    assert families["shop_shards"].kind == "gauge"
    assert families["shop_shards"].samples == {("state", "live"): 1, ("state", "dead"): 1}
    assert live.stdin is not None
    live.stdin.write("\n")
    live.stdin.flush()
    assert live.wait(timeout=30) == 0


def test_a_histogram_handle_refuses_an_overflowing_sum_and_follows_a_restore() -> None:
    store = CounterStore(SCHEMA)
    checkout = store.family("checkout")
    checkout.observe(1.7e308)
    with pytest.raises(SchemaError, match="overflow"):
        checkout.observe(1.7e308)  # the inlined path: both or neither
    assert store.snapshot().histogram("checkout") == ((0, 0, 0, 1), 1.7e308)
    store.restore(CounterStore(SCHEMA, clock=lambda: 2.0).to_dict())
    checkout.observe(0.05)  # into the restored state, not the one it replaced
    assert store.snapshot().histogram("checkout") == ((0, 1, 1, 1), 0.05)
    basket = store.family("basket").labels("refused")
    basket.observe(5)  # an int: the checked path, same result
    basket.observe(5.0)
    assert store.snapshot().histogram("basket", "refused") == ((0, 2, 2, 2, 2), 10.0)


# -- the README's example ------------------------------------------------------------------


def test_the_readmes_histogram_example_records_in_a_worker_and_aggregates_as_shown(
    tmp_path: Path,
) -> None:
    run = run_readme_example("### Histograms", "myshop", tmp_path)
    directory = run.directory
    invoice = parse(run.stdout)["myshop_checkout_seconds"].histograms[("method", "invoice")]
    assert (invoice.count, invoice.sum) == (1, 0.04)
    assert sorted(os.listdir(directory)) == CLEAN  # the dead worker's shard compacted


# -- the schema as recorded in files -------------------------------------------------------


def test_a_directory_records_a_schema_with_histograms_and_reads_it_back(tmp_path: Path) -> None:
    dead_histogram_shard(tmp_path, [0.5])
    agg(tmp_path, compact=True)  # writes schema.json
    recorded = recorded_schema(tmp_path)
    assert recorded.schema == SCHEMA
    assert recorded.schema.family("basket").buckets == BASKET_BUCKETS
    assert schema_from_record(schema_record(SCHEMA)) == SCHEMA


def _record_with(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = copy.deepcopy(schema_record(SCHEMA))  # the cached one is shared
    record["families"][1].update(changes)
    return record


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (_record_with(buckets=[]), "at least one finite bucket"),
        (_record_with(buckets=[0.1, 0.05]), "strictly increasing"),
        (_record_with(buckets=["0.1"]), "must be a number"),
        (_record_with(buckets=[True]), "must be a number"),
        (_record_with(buckets=list(range(1, 66))), "malformed \\(buckets\\)"),
        (_record_with(buckets={"0.1": 1}), "malformed \\(buckets\\)"),
        (_record_with(kind="counter"), "a family's fields"),  # buckets on a counter record
        ({"families": [{**_record_with()["families"][0], "buckets": [1.0]}]}, "fields"),
        (
            {
                "families": [
                    {
                        **_record_with()["families"][1],
                        "label": "route",
                        "values": [f"r{i}" for i in range(1100)],
                    }
                ]
            },
            "more than 4096 series",  # 1100 series x 4 cells: bounded as cells, not series
        ),
    ],
)
def test_a_recorded_histogram_that_breaks_a_rule_is_refused(
    record: dict[str, Any], problem: str
) -> None:
    with pytest.raises(BadFile, match=problem):
        schema_from_record(record)


def test_prometheus_clients_own_parser_reads_the_histograms_as_histograms() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    text = render_prometheus(_observed_store().snapshot())
    parsed = {f.name: f for f in parser.text_string_to_metric_families(text)}
    checkout = parsed["shop_checkout_seconds"]
    assert checkout.type == "histogram"
    assert [(s.name, s.labels, s.value) for s in checkout.samples] == [
        ("shop_checkout_seconds_bucket", {"le": "0.01"}, 1.0),
        ("shop_checkout_seconds_bucket", {"le": "0.1"}, 3.0),
        ("shop_checkout_seconds_bucket", {"le": "1.0"}, 3.0),
        ("shop_checkout_seconds_bucket", {"le": "+Inf"}, 4.0),
        ("shop_checkout_seconds_sum", {}, 0.005 + 0.05 + 0.05 + 2.0),
        ("shop_checkout_seconds_count", {}, 4.0),
    ]
    basket = parsed["shop_basket_items"]
    assert basket.type == "histogram"
    assert len(basket.samples) == 14
    sample = basket.samples[5]
    assert (sample.name, sample.labels, sample.value) == (
        "shop_basket_items_sum",
        {"outcome": "paid"},
        12.0,
    )


def test_status_counts_a_histogram_series_once_and_totals_its_observations(
    tmp_path: Path,
) -> None:
    dead_histogram_shard(tmp_path, [0.5, 0.01, 7.0], baskets=2)
    result = run_cli(
        "status", "--dir", str(tmp_path), "--schema", "tests.engine.schema:HISTOGRAM_SCHEMA",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    # Declared series, not slots: a histogram series counts once, however many buckets it has.
    assert doc["schema"]["series"] == sum(f.series for f in SCHEMA.families)
    totals = doc["totals"]
    assert totals["shop_checkout_seconds_count"] == 3
    assert totals['shop_basket_items_count{outcome="paid"}'] == 2
    assert totals['shop_basket_items_count{outcome="refused"}'] == 0
    assert not any("_bucket" in series or "_sum" in series for series in totals)
