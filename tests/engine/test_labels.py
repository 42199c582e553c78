"""Families with several labels: declaration, the cross product, recording by name and through
handles, persistence (shards, archive, schema.json, older formats and readers), rendering.

The schema is the shop's web front (tests.engine.schema.REQUESTS_SCHEMA): ``shop_requests_total``
by ``route`` (6 values) and ``code`` (3), next to the shop's single-label and unlabelled
families.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatemetrics import (
    CounterStore,
    Family,
    Schema,
    SchemaError,
    Snapshot,
    aggregate_dir,
    bind,
    render_json,
    render_prometheus,
    samples,
    shard_for,
)
from gatemetrics._format import (
    MAX_RECORDED_SERIES,
    BadFile,
    Layout,
    decode_schema_file,
    schema_fingerprint,
    schema_from_record,
    schema_record,
)
from gatemetrics.schema import MAX_FAMILY_LABELS, MAX_FAMILY_SERIES
from tests.engine.schema import (
    CODES,
    REQUESTS_AGGREGATE_SERIES,
    REQUESTS_SCHEMA,
    ROUTES,
    SHOP_NAMESPACE,
    SHOP_SCHEMA,
    WIDER_REQUESTS_SCHEMA,
    dead_shard,
    dead_shop_shard,
    dead_shop_v1_shard,
    request_mix,
)
from tests.exposition_parser import parse
from tests.processes import Reaper, read_line, run_cli, run_python
from tests.readme_examples import run_readme_example

REQUESTS = REQUESTS_SCHEMA.family("requests")


def fam(**kwargs: Any) -> Family:
    return Family("web_requests_total", "Requests.", key="requests", **kwargs)


def agg(directory: Path, schema: Schema = REQUESTS_SCHEMA, *, compact: bool = False) -> Any:
    return aggregate_dir(directory, schema, namespace=SHOP_NAMESPACE, compact=compact)


def requests_of(snapshot: Snapshot) -> dict[tuple[str, str], int]:
    return {k: v for k, v in snapshot.series("requests").items() if len(k) == 2}


def model(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The expected counts of ``pairs``: every declared series, zero unless counted."""
    counted = Counter(pairs)
    return {(r, c): counted[(r, c)] for r in ROUTES for c in CODES}


# -- declaration ---------------------------------------------------------------------------------


def test_series_are_the_cross_product_in_declared_order_last_label_fastest() -> None:
    f = fam(labels=(("route", ("b", "a")), ("code", ("2xx", "5xx", "4xx"))))
    assert f.label_names == ("route", "code")
    assert f.label is None
    assert f.values == ()
    assert f.width == 6
    assert f.series_values == (
        ("b", "2xx"),
        ("b", "5xx"),
        ("b", "4xx"),
        ("a", "2xx"),
        ("a", "5xx"),
        ("a", "4xx"),
    )
    assert f.series_labels[1] == (("route", "b"), ("code", "5xx"))
    schema = Schema([Family("x_total", "X.", key="x"), f])
    assert [schema.slot("requests", v) for v in f.series_values] == list(range(1, 7))
    assert schema.size == 7


def test_a_mapping_declares_the_same_family_as_the_tuple_of_pairs() -> None:
    pairs = (("route", ("create", "read")), ("code", ("2xx", "5xx")))
    assert fam(labels=dict(pairs)) == fam(labels=pairs)
    assert fam(labels=[list(p) for p in pairs]) == fam(labels=pairs)


def test_one_label_through_labels_is_the_label_values_family() -> None:
    one = fam(labels=(("route", ("create", "read")),))
    assert one == fam(label="route", values=("create", "read"))
    assert (one.label, one.values, one.labels) == ("route", ("create", "read"), ())
    assert one.label_names == ("route",)
    assert schema_fingerprint(Schema([one])) == schema_fingerprint(
        Schema([fam(label="route", values=("create", "read"))])
    )
    # dataclasses.replace keeps working on both kinds (a wider value set for a rolling upgrade).
    assert dataclasses.replace(one, values=("create", "read", "delete")).width == 3
    two = fam(labels=(("route", ("a",)), ("code", ("x", "y"))))
    assert dataclasses.replace(two, labels=(("route", ("a", "b")), ("code", ("x",)))).width == 2


def test_an_unlabelled_family_has_one_series_and_no_label_names() -> None:
    f = Family("x_total", "X.", key="x")
    assert (f.label_names, f.width, f.series_values, f.series_labels) == ((), 1, ((),), ((),))


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"label": "route", "values": ("a",), "labels": (("code", ("x",)),)}, "not both"),
        ({"labels": (("route", ("a",)), ("route", ("b",)))}, "label names must be unique"),
        ({"labels": (("route", "create"), ("code", ("x",)))}, "values must be a tuple"),
        ({"labels": (("route", ()), ("code", ("x",)))}, "at least one label value"),
        ({"labels": (("route", ("a", "a")), ("code", ("x",)))}, "must be unique"),
        ({"labels": (("route", ("a", "")), ("code", ("x",)))}, "non-empty strings"),
        ({"labels": (("route", ("a", 1)), ("code", ("x",)))}, "non-empty strings"),
        ({"labels": (("__route", ("a",)), ("code", ("x",)))}, "invalid label name"),
        ({"labels": (("ro-ute", ("a",)), ("code", ("x",)))}, "invalid label name"),
        ({"labels": (("route", ("a",)), "code")}, "(name, values) pairs"),
        ({"labels": (("route", ("a",), "extra"),)}, "(name, values) pairs"),
        ({"labels": "route"}, "(name, values) pairs"),
        ({"labels": {"route": ("a",), 3: ("x",)}}, "invalid label name"),
    ],
)
def test_a_bad_declaration_is_refused_naming_the_family(
    kwargs: dict[str, Any], problem: str
) -> None:
    with pytest.raises(SchemaError, match="web_requests_total") as info:
        fam(**kwargs)
    assert problem in str(info.value)


def test_a_cross_product_above_the_bound_is_refused() -> None:
    at_bound = fam(
        labels=(("a", tuple(f"v{i}" for i in range(64))), ("b", tuple(f"w{i}" for i in range(64))))
    )
    assert at_bound.width == MAX_FAMILY_SERIES == 64 * 64
    with pytest.raises(SchemaError, match=f"4160 series .* exceed {MAX_FAMILY_SERIES}"):
        fam(
            labels=(
                ("a", tuple(f"v{i}" for i in range(65))),
                ("b", tuple(f"w{i}" for i in range(64))),
            )
        )
    # Many small labels multiply too.
    with pytest.raises(SchemaError, match="exceed"):
        fam(labels=tuple((f"l{i}", ("x", "y")) for i in range(13)))


def test_more_labels_than_the_bound_are_refused() -> None:
    assert fam(labels=tuple((f"l{i}", ("x",)) for i in range(MAX_FAMILY_LABELS))).width == 1
    with pytest.raises(SchemaError, match=f"more than {MAX_FAMILY_LABELS} labels"):
        fam(labels=tuple((f"l{i}", ("x",)) for i in range(MAX_FAMILY_LABELS + 1)))


# -- recording -------------------------------------------------------------------------------------


def test_every_series_exists_from_the_start_at_zero() -> None:
    snap = CounterStore(REQUESTS_SCHEMA).snapshot()
    assert requests_of(snap) == model([])
    families = parse(render_prometheus(snap))
    assert families["shop_requests_total"].series == {
        (("route", r), ("code", c)): 0 for r in ROUTES for c in CODES
    }


def test_a_series_is_named_by_keywords_by_tuple_or_by_mapping() -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    store.increment("requests", route="search", code="5xx")
    store.increment("requests", ("search", "5xx"), 2)
    store.increment("requests", {"code": "5xx", "route": "search"}, amount=3)
    store.increment("requests", route="login", code="2xx", amount=4)
    assert store.get("requests", route="search", code="5xx") == 6
    assert store.get("requests", ("login", "2xx")) == 4
    snap = store.snapshot()
    assert snap.get("requests", code="5xx", route="search") == 6
    assert sum(requests_of(snap).values()) == 10
    # Single-label and unlabelled families take the same forms as before, and names too.
    store.increment("orders", "paid")
    store.increment("orders", outcome="paid")
    store.increment("errors")
    assert store.snapshot().family("orders") == {"paid": 2, "refused": 0}
    assert store.get("errors") == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ((), {"route": "search", "code": "3xx"}, "requests.code: unknown label value '3xx'"),
        ((), {"route": "SEARCH", "code": "2xx"}, "requests.route: unknown label value"),
        ((), {"route": "search"}, "missing label code"),
        ((), {"route": "search", "code": "2xx", "method": "GET"}, "unknown label method"),
        ((("search",),), {}, "expected a tuple of 2 label values (route, code)"),
        ((("search", "2xx", "x"),), {}, "expected a tuple of 2 label values"),
        (("search",), {}, "expected a tuple of 2 label values"),
        ((["search", "2xx"],), {}, "expected a tuple of 2 label values"),
        ((("search", "2xx"),), {"route": "search", "code": "2xx"}, "either positionally"),
        (({"route": "search", "code": 2},), {}, "label values must be strings"),
        ((), {}, "expected a tuple of 2 label values"),
    ],
)
def test_a_series_outside_the_declaration_is_refused_and_counts_nothing(
    args: tuple[Any, ...], kwargs: dict[str, Any], problem: str
) -> None:
    """As for a single label today: ``increment`` raises for an undeclared value (callers that
    must never raise skip such values before recording, as the gate's record_decision does)."""
    store = CounterStore(REQUESTS_SCHEMA)
    before = store.snapshot().counts
    with pytest.raises(SchemaError) as info:
        store.increment("requests", *args, **kwargs)
    assert problem in str(info.value)
    assert store.snapshot().counts == before


def test_the_single_label_rules_are_unchanged() -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    with pytest.raises(SchemaError, match=r"orders\.maybe: unknown label value"):
        store.increment("orders", "maybe")
    with pytest.raises(SchemaError, match="family has no label"):
        store.increment("errors", "x")
    with pytest.raises(SchemaError, match="unknown family"):
        store.increment("nope", route="search", code="2xx")
    with pytest.raises(SchemaError, match="several labels; use series"):
        store.snapshot().family("requests")
    assert store.snapshot().counts == (0,) * REQUESTS_SCHEMA.size


def test_a_label_named_like_a_parameter_is_named_through_a_mapping() -> None:
    schema = Schema([fam(labels=(("value", ("a", "b")), ("amount", ("x",))))])
    store = CounterStore(schema)
    store.increment("requests", {"value": "b", "amount": "x"}, 5)
    store.family("requests").labels(value="b", amount="x").inc()
    assert store.get("requests", {"value": "b", "amount": "x"}) == 6


@given(
    st.lists(
        st.tuples(
            st.sampled_from([*ROUTES, "wishlist", ""]),
            st.sampled_from([*CODES, "1xx", "2XX"]),
            st.integers(min_value=0, max_value=2**40),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_counts_equal_a_dict_model_of_random_label_values(
    calls: list[tuple[str, str, int, bool]],
) -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    expected = dict.fromkeys(((r, c) for r in ROUTES for c in CODES), 0)
    for route, code, amount, by_handle in calls:
        declared = (route, code) in expected
        try:
            if by_handle:
                store.family("requests").labels(route, code).inc(amount)
            else:
                store.increment("requests", route=route, code=code, amount=amount)
        except SchemaError:
            assert not declared
        else:
            assert declared
            expected[(route, code)] += amount
    snap = store.snapshot()
    assert requests_of(snap) == expected
    # The dictionary layout and the schema record carry exactly these counts.
    again = CounterStore(REQUESTS_SCHEMA)
    again.restore(orjson.loads(render_json(snap)))
    assert again.snapshot().counts == snap.counts
    assert schema_from_record(schema_record(REQUESTS_SCHEMA)) == REQUESTS_SCHEMA
    # Handles never outnumber the declared series.
    assert len(store.family("requests")._children) <= REQUESTS.width


# -- handles -------------------------------------------------------------------------------------


def test_a_handle_resolves_once_and_counts_into_its_series() -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    requests = store.family("requests")
    assert store.family("requests") is requests
    child = requests.labels(route="checkout", code="4xx")
    assert requests.labels("checkout", "4xx") is child
    child.inc()
    child.inc(4)
    store.family("orders").labels("refused").inc(2)
    store.family("errors").inc()
    assert child.get() == 5
    assert store.get("requests", route="checkout", code="4xx") == 5
    assert store.get("orders", "refused") == 2
    assert store.get("errors") == 1
    assert sum(store.snapshot().counts) == 8


@pytest.mark.parametrize(
    ("values", "named", "problem"),
    [
        (("checkout", "3xx"), {}, "requests.code: unknown label value"),
        (("checkout",), {}, "expected 2 label values (route, code)"),
        ((), {"route": "checkout"}, "missing label code"),
        ((), {"route": "checkout", "code": "2xx", "x": "y"}, "unknown label x"),
        (("checkout",), {"code": "2xx"}, "by position or by name"),
        ((["checkout"], "2xx"), {}, "requests.route: unknown label value"),
        ((7, "2xx"), {}, "requests.route: unknown label value"),
        ((), {}, "expected 2 label values"),
    ],
)
def test_a_handle_outside_the_declaration_is_refused_and_not_kept(
    values: tuple[str, ...], named: dict[str, str], problem: str
) -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    requests = store.family("requests")
    with pytest.raises(SchemaError) as info:
        requests.labels(*values, **named)
    assert problem in str(info.value)
    assert requests._children == {}


def test_a_handle_checks_its_amount_like_increment() -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    child = store.family("requests").labels("login", "5xx")
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(SchemaError, match="amount must be a non-negative int"):
            child.inc(bad)  # type: ignore[arg-type]
    child.inc(2**63 - 1)
    with pytest.raises(SchemaError, match="exceed 2\\*\\*63-1"):
        child.inc()
    assert child.get() == 2**63 - 1


def test_a_labelled_family_handle_needs_its_labels_and_an_unlabelled_one_has_none() -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    with pytest.raises(SchemaError, match=r"missing label values \(route, code\)"):
        store.family("requests").inc()
    with pytest.raises(SchemaError, match="family has no label"):
        store.family("errors").labels("x")
    with pytest.raises(SchemaError, match="unknown family"):
        store.family("nope")
    assert store.snapshot().counts == (0,) * REQUESTS_SCHEMA.size


def test_handles_shared_by_threads_count_exactly_and_notify_once_per_inc() -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    calls: list[int] = []
    store.set_change_hook(lambda: calls.append(1))
    child = store.family("requests").labels("search", "4xx")
    threads, per_thread = 8, 2_000
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            child.inc()
            store.family("requests").labels(route="search", code="5xx").inc(2)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert child.get() == threads * per_thread
    assert store.get("requests", ("search", "5xx")) == 2 * threads * per_thread
    assert len(calls) == 2 * threads * per_thread


def test_a_handle_counts_into_restored_counts() -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    child = store.family("requests").labels("refund", "5xx")
    child.inc()
    saved = store.to_dict()
    saved["requests"]["refund"]["5xx"] = 40
    store.restore(saved)
    child.inc(2)
    assert store.get("requests", route="refund", code="5xx") == 42


def test_a_write_through_handle_saves_every_inc(tmp_path: Path) -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    binding = bind(store, tmp_path, mode="write-through")
    child = store.family("requests").labels(route="refund", code="2xx")
    for n in range(1, 4):
        child.inc()
        # Saved before inc returned: the aggregator already sees it.
        assert agg(tmp_path).snapshot().get("requests", ("refund", "2xx")) == n
    binding.close()


def test_a_periodic_binding_saves_a_handles_counts(tmp_path: Path) -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    binding = bind(store, tmp_path, mode="periodic", interval=0.05)
    store.family("requests").labels("account", "4xx").inc(7)

    def seen() -> int:
        return int(agg(tmp_path).snapshot().get("requests", ("account", "4xx")))

    from tests.processes import wait_until

    wait_until(lambda: seen() == 7)
    binding.close()
    assert seen() == 7


def test_a_handle_counts_into_a_forked_childs_fresh_store(tmp_path: Path) -> None:
    from tests.shard_tools import in_forked_child

    store = CounterStore(REQUESTS_SCHEMA)
    binding = bind(store, tmp_path)
    child = store.family("requests").labels("basket", "2xx")
    child.inc(3)

    def in_child() -> bool:
        zero = child.get() == 0
        child.inc(2)
        return zero and child.get() == 2

    assert in_forked_child(in_child)
    assert child.get() == 3
    assert agg(tmp_path).snapshot().get("requests", ("basket", "2xx")) == 5
    binding.close()


# -- rendering -------------------------------------------------------------------------------------

ESCAPES = Schema(
    [
        Family(
            "esc_total",
            "Escapes.",
            key="esc",
            labels=(("a", ('q"t', "b\\s")), ("b", ("n\nl", "plain"))),
        )
    ]
)


def test_rendering_is_byte_exact_with_values_escaped() -> None:
    snap = Snapshot(ESCAPES, (1, 2, 3, 4))
    assert render_prometheus(snap) == (
        "# HELP esc_total Escapes.\n"
        "# TYPE esc_total counter\n"
        'esc_total{a="q\\"t",b="n\\nl"} 1\n'
        'esc_total{a="q\\"t",b="plain"} 2\n'
        'esc_total{a="b\\\\s",b="n\\nl"} 3\n'
        'esc_total{a="b\\\\s",b="plain"} 4\n'
    )
    assert parse(render_prometheus(snap))["esc_total"].series[(("a", 'q"t'), ("b", "n\nl"))] == 1
    assert orjson.loads(render_json(snap))["esc"] == {
        'q"t': {"n\nl": 1, "plain": 2},
        "b\\s": {"n\nl": 3, "plain": 4},
    }
    [family] = samples(snap)
    assert [(s.labels, s.value) for s in family.samples][3] == ((("a", "b\\s"), ("b", "plain")), 4)


def test_rendering_is_the_same_in_another_process_whatever_the_recording_order() -> None:
    pairs = request_mix(3, 50)
    store = CounterStore(REQUESTS_SCHEMA)
    for route, code in reversed(pairs):
        store.increment("requests", route=route, code=code)
    child = run_python(
        """
        from gatemetrics import CounterStore, render_json, render_prometheus
        from tests.engine.schema import REQUESTS_SCHEMA, request_mix
        store = CounterStore(REQUESTS_SCHEMA, clock=lambda: 0.0)
        for route, code in request_mix(3, 50):
            store.family("requests").labels(route, code).inc()
        sys.stdout.write(render_prometheus(store.snapshot()) + render_json(store.snapshot()))
        """
    )
    assert child.returncode == 0, child.stderr
    snap = dataclasses.replace(store.snapshot(), start_timestamp=0.0)
    assert child.stdout == render_prometheus(snap) + render_json(snap)


def test_promtool_accepts_a_two_label_exposition(promtool: str, tmp_path: Path) -> None:
    store = CounterStore(REQUESTS_SCHEMA)
    for route, code in request_mix(1, 40):
        store.increment("requests", route=route, code=code)
    shard_for(store, tmp_path).save()
    for text in (render_prometheus(store.snapshot()), agg(tmp_path).render_prometheus()):
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == result.stderr.strip() == ""


# -- persistence: the schema record ----------------------------------------------------------------


def test_the_schema_record_lists_each_labels_values_and_reads_back() -> None:
    record = schema_record(REQUESTS_SCHEMA)
    requests = record["families"][-1]
    assert requests["label"] == ["route", "code"]
    assert requests["values"] == [list(ROUTES), list(CODES)]
    assert schema_from_record(orjson.loads(orjson.dumps(record))) == REQUESTS_SCHEMA
    # The families of before keep their records, so their fingerprints do not move.
    assert record["families"][:3] == schema_record(SHOP_SCHEMA)["families"]
    assert schema_record(SHOP_SCHEMA)["families"][0]["label"] == "outcome"


def _with_requests(change: dict[str, Any]) -> dict[str, Any]:
    record = orjson.loads(orjson.dumps(schema_record(REQUESTS_SCHEMA)))
    record["families"][-1].update(change)
    return record


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"label": ["route"], "values": [list(ROUTES)]}, "malformed (label names)"),
        ({"label": ["route", "code"], "values": [list(ROUTES)]}, "malformed (label names)"),
        ({"label": ["route", "code"], "values": [list(ROUTES), "2xx"]}, "malformed"),
        ({"label": ["route", 7], "values": [list(ROUTES), ["x"]]}, "bad label name"),
        ({"label": ["route", "code"], "values": [list(ROUTES), ["x" * 129]]}, "bad label value"),
        ({"label": ["route", "code"], "values": [list(ROUTES), ["a\x07"]]}, "control character"),
        ({"label": ["route", "route"], "values": [["a"], ["b"]]}, "label names must be unique"),
        ({"label": ["route", "code"], "values": [["a", "a"], ["b"]]}, "must be unique"),
        ({"label": ["route", "code"], "values": [[], ["b"]]}, "at least one label value"),
        (
            {"label": ["a", "b"], "values": [[f"v{i}" for i in range(100)]] * 2},
            f"more than {MAX_RECORDED_SERIES} series",
        ),
        (
            {"label": [f"l{i}" for i in range(17)], "values": [["x"]] * 17},
            f"more than {MAX_FAMILY_LABELS} labels",
        ),
    ],
)
def test_a_hostile_multi_label_record_is_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadFile) as info:
        schema_from_record(_with_requests(change))
    assert problem in str(info.value)


def test_a_hostile_product_is_bounded_before_it_is_built() -> None:
    """Sixteen labels of 4096 values each would be 2**192 series: refused on the bound, without
    building a single value tuple."""
    record = _with_requests(
        {"label": [f"l{i}" for i in range(16)], "values": [[f"v{j}" for j in range(4096)]] * 16}
    )
    with pytest.raises(BadFile, match=f"more than {MAX_RECORDED_SERIES} series"):
        schema_from_record(record)


# -- persistence: shards, archive, compaction, through real processes ------------------------------

WORKER = """
from gatemetrics import CounterStore, bind
from tests.engine.schema import REQUESTS_SCHEMA, request_mix
directory, seed, n, mode, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
store = CounterStore(REQUESTS_SCHEMA)
binding = bind(store, directory, mode=mode, interval=0.01, failure_key="errors")
requests = store.family("requests")
pairs = request_mix(seed, n)
for i, (route, code) in enumerate(pairs):
    if i % 2:
        requests.labels(route=route, code=code).inc()
    else:
        store.increment("requests", route=route, code=code)
store.increment("orders", "paid")
if end == "kill-in-save":
    # Killed inside the save of one more request, after its slot was written: it counts.
    _faults.install_kill_at("save.written")
    requests.labels("login", "5xx").inc()
if end == "close":
    binding.close()
print("done", flush=True)
sys.stdin.readline()
"""


def test_workers_killed_or_closed_count_exactly_through_aggregate_and_compaction(
    tmp_path: Path, reaper: Reaper, promtool: str
) -> None:
    runs = [
        (1, 60, "write-through", "wait"),  # SIGKILLed by the test once done
        (2, 45, "write-through", "kill-in-save"),  # SIGKILLed by itself in a save
        (3, 30, "periodic", "close"),  # closed cleanly, then SIGKILLed idle
    ]
    procs = []
    for seed, n, mode, end in runs:
        procs.append(reaper.python(WORKER, str(tmp_path), str(seed), str(n), mode, end))
    expected_pairs: list[tuple[str, str]] = []
    for proc, (seed, n, _, end) in zip(procs, runs, strict=True):
        expected_pairs += request_mix(seed, n)
        if end == "kill-in-save":
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            expected_pairs.append(("login", "5xx"))
        else:
            assert read_line(proc) == "done"
    expected = model(expected_pairs)
    # While two owners live: their shards count live, the killed one's dead.
    live = agg(tmp_path)
    assert requests_of(live.snapshot()) == expected
    assert live.snapshot().family("orders") == {"paid": 3, "refused": 0}
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    compacted = agg(tmp_path, compact=True)
    assert requests_of(compacted.snapshot()) == expected
    assert compacted.quarantined_total == 0
    assert sorted(os.listdir(tmp_path)) == ["aggregate.lock", "archive.json", "schema.json"]
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert archive["counts"]["requests"]["login"]["5xx"] == expected[("login", "5xx")]
    assert decode_schema_file((tmp_path / "schema.json").read_bytes())[0] == REQUESTS_SCHEMA
    # The command line reads the directory's recorded schema: the same totals, every series.
    cli = run_cli("aggregate", "--dir", str(tmp_path))
    assert cli.returncode == 0, cli.stderr
    families = parse(cli.stdout)
    assert list(families) == list(REQUESTS_AGGREGATE_SERIES)
    for name, family in families.items():
        assert set(family.series) == REQUESTS_AGGREGATE_SERIES[name]
    assert {
        (dict(k)["route"], dict(k)["code"]): v
        for k, v in families["shop_requests_total"].series.items()
    } == expected
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=cli.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_shards_and_archives_written_before_still_read(tmp_path: Path) -> None:
    """Shards of the single-label shop (v1 of the previous release, and v2) and an archive
    compacted with it read under the schema that adds a two-label family: its series at 0."""
    dead_shop_shard(tmp_path, paid=2)
    dead_shop_v1_shard(tmp_path, paid=1, refused=1)
    aggregate_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, compact=True)
    dead_shop_shard(tmp_path, paid=4)
    store = CounterStore(REQUESTS_SCHEMA)
    store.family("requests").labels("search", "2xx").inc(5)
    store.increment("orders", "paid")
    shard_for(store, tmp_path).save()
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("orders") == {"paid": 8, "refused": 1}
    assert result.snapshot().family("refusals")["no_stock"] == 1
    assert requests_of(result.snapshot()) == {**model([]), ("search", "2xx"): 5}
    assert result.quarantined_total == 0
    assert agg(tmp_path).snapshot().counts == result.snapshot().counts


def dead_requests_shard(directory: Path, pairs: list[tuple[str, str]]) -> str:
    store = CounterStore(REQUESTS_SCHEMA)
    for route, code in pairs:
        store.increment("requests", route=route, code=code)
    store.increment("orders", "refused")
    return dead_shard(store, directory)


def test_a_reader_with_more_values_maps_every_series_by_name(tmp_path: Path) -> None:
    """A rolling upgrade: shards of REQUESTS_SCHEMA under a schema with one more route and
    code. The writer's cells are its own cross product; each lands on its series by name."""
    pairs = request_mix(5, 40)
    dead_requests_shard(tmp_path, pairs)
    result = aggregate_dir(tmp_path, WIDER_REQUESTS_SCHEMA, namespace=SHOP_NAMESPACE)
    series = result.snapshot().series("requests")
    assert {k: v for k, v in series.items() if k[0] != "wishlist" and k[1] != "1xx"} == model(pairs)
    assert sum(v for k, v in series.items() if "wishlist" in k or "1xx" in k) == 0
    # And with the values declared in another order.
    reordered = SHOP_SCHEMA.extend(
        [dataclasses.replace(REQUESTS, labels=(("route", ROUTES[::-1]), ("code", CODES[::-1])))]
    )
    result = aggregate_dir(tmp_path, reordered, namespace=SHOP_NAMESPACE)
    assert result.snapshot().series("requests") == {
        (r, c): model(pairs)[(r, c)] for r in ROUTES[::-1] for c in CODES[::-1]
    }


@pytest.mark.parametrize(
    "reader",
    [
        # This release's (and an older release's) single-label family under the same key.
        SHOP_SCHEMA.extend(
            [
                Family(
                    REQUESTS.name,
                    REQUESTS.documentation,
                    key="requests",
                    label="route",
                    values=ROUTES,
                )
            ]
        ),
        # Fewer values than the writer: a code the reader does not declare.
        SHOP_SCHEMA.extend(
            [dataclasses.replace(REQUESTS, labels=(("route", ROUTES), ("code", CODES[:2])))]
        ),
        # The labels in another order.
        SHOP_SCHEMA.extend(
            [dataclasses.replace(REQUESTS, labels=(("code", CODES), ("route", ROUTES)))]
        ),
        # Another label name.
        SHOP_SCHEMA.extend(
            [dataclasses.replace(REQUESTS, labels=(("path", ROUTES), ("code", CODES)))]
        ),
    ],
    ids=["single-label", "fewer-values", "label-order", "label-name"],
)
def test_a_reader_that_does_not_fit_quarantines_the_shard_and_never_miscounts(
    tmp_path: Path, reader: Schema
) -> None:
    bad = dead_requests_shard(tmp_path, request_mix(2, 30))
    dead_shop_shard(tmp_path, paid=3)  # fits every reader
    result = aggregate_dir(tmp_path, reader, namespace=SHOP_NAMESPACE, compact=True)
    assert result.snapshot().family("orders") == {"paid": 3, "refused": 0}
    assert sum(result.snapshot().series("requests").values()) == 0
    [report] = [r for r in result.shards if r.name == bad]
    assert report.action == "quarantined"
    assert "written with another schema" in (report.problem or "")
    assert [n.startswith(f"{bad}.") for n in os.listdir(tmp_path / "quarantine")] == [True]


def test_a_reader_refuses_a_directory_of_multi_label_shards_it_cannot_read(
    tmp_path: Path,
) -> None:
    dead_requests_shard(tmp_path, request_mix(2, 30))
    single = SHOP_SCHEMA.extend(
        [Family(REQUESTS.name, "Requests.", key="requests", label="route", values=ROUTES)]
    )
    with pytest.raises(SchemaError, match="none of its 1 v2 shard"):
        aggregate_dir(tmp_path, single, namespace=SHOP_NAMESPACE, compact=True)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".shard")]) == 1  # nothing moved


def _forge_record(data: bytes, record: dict[str, Any]) -> bytes:
    """A v2 shard's bytes with another schema record, its fingerprint that record's own hash
    (as a hostile writer would make it) and the header checksum recomputed."""
    prefix = Layout.PREFIX
    crc = struct.Struct("<I")
    fields = list(prefix.unpack_from(data))
    ident = data[prefix.size : prefix.size + fields[7]]
    new_record = orjson.dumps(record)
    fields[8] = len(new_record)
    fields[3] = prefix.size + len(ident) + len(new_record) + crc.size
    fields[9] = b"\7" * 16
    body = prefix.pack(*fields) + ident + new_record
    header = body + crc.pack(zlib.crc32(body))
    assert len(header) <= fields[4]
    return header.ljust(fields[4], b"\0") + data[fields[4] :]


@pytest.mark.parametrize(
    "change",
    [
        {"values": [[*ROUTES, "admin"], list(CODES)]},  # a route it never declared
        {"values": [list(ROUTES), ["2xx", "2xx", "4xx"]]},  # a repeated value
        {"values": [list(ROUTES), [*CODES, 7]]},  # not a string
        {"label": ["route", "code", "method"], "values": [list(ROUTES), list(CODES), ["GET"]]},
        {"label": "route", "values": list(ROUTES)},  # one label where the reader has two
    ],
    ids=["undeclared-value", "repeated-value", "not-a-string", "extra-label", "one-label"],
)
def test_a_hostile_shard_header_cannot_widen_the_label_set(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    name = dead_requests_shard(tmp_path, [("search", "2xx")] * 3)
    path = tmp_path / name
    path.write_bytes(_forge_record(path.read_bytes(), _with_requests(change)))
    dead_shop_shard(tmp_path, paid=1)
    result = agg(tmp_path)
    [report] = [r for r in result.shards if r.name == name]
    assert report.action == "quarantined"
    assert sum(result.snapshot().series("requests").values()) == 0
    families = parse(result.render_prometheus())
    assert (
        set(families["shop_requests_total"].series)
        == REQUESTS_AGGREGATE_SERIES["shop_requests_total"]
    )


def test_an_unbounded_multi_label_schema_json_is_ignored(tmp_path: Path) -> None:
    """schema.json's series bound counts the cross product: 100 x 100 routes and codes are
    10000 series, more than a recorded schema may hold, and the shards' own schema is used."""
    dead_requests_shard(tmp_path, [("search", "2xx")] * 2)
    record = _with_requests(
        {"values": [[f"r{i}" for i in range(100)], [f"c{i}" for i in range(100)]]}
    )
    doc = {
        "format": "gatemetrics-schema",
        "version": 1,
        "namespace": "shop",
        "fingerprint": "0" * 32,
        "schema": record,
    }
    (tmp_path / "schema.json").write_bytes(orjson.dumps(doc))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "gatemetrics",
            "aggregate",
            "--dir",
            str(tmp_path),
            "--no-compact",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "ignored schema.json" in cli.stderr
    assert orjson.loads(cli.stdout)["requests"]["search"] == {"2xx": 2, "4xx": 0, "5xx": 0}


# -- the README's engine example, run as written -------------------------------------------------


def test_the_readmes_two_label_example_records_in_a_worker_and_aggregates_as_shown(
    tmp_path: Path,
) -> None:
    run = run_readme_example("### A schema of your own, with two labels", "myapp", tmp_path)
    directory = run.directory
    families = parse(run.stdout)
    assert sum(families["myapp_http_requests_total"].series.values()) == 2  # not the bad route
    assert families["myapp_jobs_total"].samples[("outcome", "done")] == 1
    # The worker exited: its shard was dead, and is compacted into the archive.
    assert families["myapp_shards"].samples == {("state", "live"): 0, ("state", "dead"): 1}
    assert sorted(os.listdir(directory)) == ["aggregate.lock", "archive.json", "schema.json"]
