"""Tests of gatemetrics.schema: family declaration, slot layout, strict parsing."""

from __future__ import annotations

import pytest

from gatemetrics import MAX_COUNT, Family, Schema, SchemaError


def _schema() -> Schema:
    return Schema(
        (
            Family("a_total", "A.", key="a", label="kind", values=("x", "y")),
            Family("b_total", "B.", key="b"),
        )
    )


def test_slots_are_laid_out_in_declaration_order() -> None:
    schema = _schema()
    assert schema.size == 3
    assert [schema.slot("a", "x"), schema.slot("a", "y"), schema.slot("b")] == [0, 1, 2]
    assert schema.offset("b") == 2


def test_extend_keeps_existing_slots() -> None:
    schema = _schema().extend([Family("c_total", "C.", key="c")])
    assert schema.slot("a", "y") == 1
    assert schema.slot("c") == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name_total"}, "metric name"),
        ({"name": "no_suffix"}, "_total"),
        ({"documentation": " "}, "documentation"),
        ({"key": "Bad-Key"}, "key"),
        ({"key": "store_generation"}, "reserved"),
        ({"label": "__reserved"}, "label name"),
        ({"label": "kind", "values": ()}, "at least one"),
        ({"label": "kind", "values": ("x", "x")}, "unique"),
        ({"label": "kind", "values": ("x", "")}, "non-empty"),
        ({"label": None, "values": ("x",)}, "without a label"),
        ({"kind": "histogram"}, "kind"),
    ],
)
def test_family_rejects_invalid_declarations(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "ok_total", "documentation": "Ok.", "key": "ok"}
    base.update(kwargs)
    with pytest.raises(SchemaError, match=message):
        Family(**base)  # type: ignore[arg-type]


def test_gauge_needs_no_total_suffix() -> None:
    assert Family("live", "Live.", key="live", kind="gauge").width == 1


def test_schema_rejects_duplicates_and_empty() -> None:
    fam = Family("a_total", "A.", key="a")
    with pytest.raises(SchemaError, match="names"):
        Schema((fam, Family("a_total", "A.", key="b")))
    with pytest.raises(SchemaError, match="keys"):
        Schema((fam, Family("b_total", "B.", key="a")))
    with pytest.raises(SchemaError, match="at least one"):
        Schema(())


def test_slot_outside_schema_names_the_series() -> None:
    schema = _schema()
    with pytest.raises(SchemaError) as err:
        schema.slot("a", "z")
    assert err.value.field == "a.z"
    with pytest.raises(SchemaError, match="unknown family"):
        schema.slot("nope")
    with pytest.raises(SchemaError, match="no label"):
        schema.slot("b", "x")


def test_parse_counts_round_trips_counts_to_dict() -> None:
    schema = _schema()
    layout = schema.counts_to_dict([3, 4, 5])
    assert layout == {"a": {"x": 3, "y": 4}, "b": 5}
    assert schema.parse_counts(layout) == [3, 4, 5]


def test_parse_counts_treats_missing_series_as_zero() -> None:
    # A shard written before a label value was added must still read.
    assert _schema().parse_counts({"a": {"y": 2}}) == [0, 2, 0]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"a": {"z": 1}}, "a.z"),
        ({"c": 1}, "c"),
        ({"a": 1}, "a"),
        ({"a": {"x": -1}}, "a.x"),
        ({"a": {"x": 1.0}}, "a.x"),
        ({"a": {"x": True}}, "a.x"),
        ({"a": {"x": "1"}}, "a.x"),
        ({"a": {"x": None}}, "a.x"),
        ({"b": MAX_COUNT + 1}, "b"),
        ({"b": [1]}, "b"),
        ({"a": {1: 1}}, "a.1"),
        ({1: 1}, "1"),
    ],
)
def test_parse_counts_rejects_malformed_fields(data: object, field: str) -> None:
    with pytest.raises(SchemaError) as err:
        _schema().parse_counts(data)
    assert err.value.field == field


def test_parse_counts_rejects_non_mapping() -> None:
    with pytest.raises(SchemaError, match="mapping"):
        _schema().parse_counts([1, 2, 3])


def test_counts_to_dict_checks_length() -> None:
    with pytest.raises(SchemaError, match="expected 3"):
        _schema().counts_to_dict([1])


def test_parse_counts_reads_str_subclass_keys_by_their_value() -> None:
    class Key(str):
        __slots__ = ()

        def __hash__(self) -> int:  # a hostile hash must not matter: the value is what counts
            return 0

    assert _schema().parse_counts({Key("a"): {Key("y"): 2}, Key("b"): 3}) == [0, 2, 3]


def test_series_key_names_a_series_as_slot_looks_it_up() -> None:
    plain = Family("plain_total", "P.", key="plain")
    one = Family("one_total", "O.", key="one", label="v", values=("a", "b"))
    two = Family("two_total", "T.", key="two", labels=(("x", ("a",)), ("y", ("b", "c"))))
    assert plain.series_key(()) is None
    assert one.series_key(("b",)) == "b"
    assert two.series_key(("a", "c")) == ("a", "c")
    schema = Schema((plain, one, two))
    for fam in schema.families:
        slots = [schema.slot(fam.key, fam.series_key(v)) for v in fam.series_values]
        assert slots == list(range(schema.offset(fam.key), schema.offset(fam.key) + fam.width))
