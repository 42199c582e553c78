"""Tests of hostile and broken files in a shard directory: each costs only itself.

Hostile files are built from real shards of either format.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import gatemetrics.aggregate as aggregate_module
from gatemetrics import (
    MAX_COUNT,
    CounterStore,
    Family,
    Identity,
    Schema,
    SchemaError,
    Shard,
    new_identity,
    shard_for,
)
from gatemetrics._format import (
    Layout,
    v1_names,
    v2_names,
)
from gatemetrics.aggregate import MAX_SHARD_BYTES, QUARANTINE_DIR
from tests.engine.aggregate_helpers import (
    agg,
    assert_bounded,
    incarnation_of,
    live_v2_name,
    orders,
    shard_names,
    shop_store,
    tear,
    v2_slots,
)
from tests.engine.schema import (
    SHOP_SCHEMA,
    TILLS,
    TILLS_AGGREGATE_SERIES,
    TILLS_SCHEMA,
    dead_shop_shard,
    dead_shop_v1_shard,
    record_order,
)
from tests.processes import Reaper, run_python
from tests.shard_tools import (
    LegacyV1Shard,
)

# -- hostile and broken files: each costs only itself -------------------------------------------

HostileMaker = Callable[[Path, str, bytes], object]


def _v1_source(directory: Path) -> tuple[str, bytes]:
    """A valid v1 shard's name and bytes (its files then removed): the material of a forgery."""
    name = dead_shop_v1_shard(directory, paid=1)
    data = (directory / name).read_bytes()
    for leftover in v1_names(incarnation_of(name))[:2]:
        (directory / leftover).unlink()
    return name, data


def _v2_source(directory: Path) -> tuple[str, bytes]:
    name = dead_shop_shard(directory, paid=1)
    data = (directory / name).read_bytes()
    (directory / name).unlink()
    return name, data


def _v1_doc(mutate: Callable[[dict[str, Any]], None]) -> HostileMaker:
    def make(path: Path, _name: str, data: bytes) -> None:
        doc = orjson.loads(data)
        doc["incarnation"] = incarnation_of(path.name)  # only the mutation is wrong
        mutate(doc)
        path.write_bytes(orjson.dumps(doc))

    return make


def _v1_nan(path: Path, name: str, data: bytes) -> None:
    _v1_doc(lambda d: None)(path, name, data)
    path.write_bytes(path.read_bytes().replace(b'"paid":1', b'"paid":NaN'))


def _raw(content: bytes) -> HostileMaker:
    return lambda path, _name, _data: path.write_bytes(content)


def _copied(path: Path, _name: str, data: bytes) -> None:
    path.write_bytes(data)  # the original incarnation's content under another name


def _symlink(path: Path, name: str, data: bytes) -> None:
    target = path.parent / name  # a valid shard of another (dead) incarnation
    target.write_bytes(data)
    path.symlink_to(target)


def _huge(path: Path, _name: str, _data: bytes) -> None:
    with open(path, "wb") as f:
        f.truncate(2**31)  # sparse: 2 GiB that must never be read into memory


_COMMON: dict[str, HostileMaker] = {
    "empty": _raw(b""),
    "huge": _huge,
    "copied-shard": _copied,
    "symlink": _symlink,
    "directory": lambda path, _name, _data: path.mkdir(),
    "fifo": lambda path, _name, _data: os.mkfifo(path),
}

HOSTILE_V1: dict[str, HostileMaker] = {
    **_COMMON,
    "truncated": lambda path, _name, data: path.write_bytes(data[:40]),
    "not-json": _raw(b"shop_orders_total 5\n"),
    "not-utf8": _raw(b'{"format": "\xff\xfe"}'),
    "nan": _v1_nan,
    "json-array": _raw(b"[1, 2, 3]"),
    "negative-count": _v1_doc(lambda d: d["counts"]["orders"].update(paid=-5)),
    "float-count": _v1_doc(lambda d: d["counts"]["orders"].update(paid=1.5)),
    "bool-count": _v1_doc(lambda d: d["counts"]["orders"].update(paid=True)),
    "string-count": _v1_doc(lambda d: d["counts"].update(errors="7")),
    "overflowing-count": _v1_doc(lambda d: d["counts"].update(errors=MAX_COUNT + 1)),
    "wrongly-typed-family": _v1_doc(lambda d: d["counts"].update(refusals=[1, 2])),
    "unknown-family": _v1_doc(lambda d: d["counts"].update(evil_counts={"x": 1})),
    "unknown-label-value": _v1_doc(lambda d: d["counts"]["orders"].update(MAYBE=1)),
    "label-injection": _v1_doc(
        lambda d: d["counts"]["refusals"].update(
            {'no_money"} 1\nshop_orders_total{outcome="paid': 1000}
        )
    ),
    "missing-field": _v1_doc(lambda d: d.pop("saved_at")),
    "missing-store-generation": _v1_doc(lambda d: d["counts"].pop("store_generation")),
    "extra-field": _v1_doc(lambda d: d.update(evil=1)),
    "wrong-format": _v1_doc(lambda d: d.update(format="prometheus-mmap")),
    "future-version": _v1_doc(lambda d: d.update(version=2)),
    "wrong-pid": _v1_doc(lambda d: d.update(pid="1234")),
    "nan-timestamp-as-string": _v1_doc(lambda d: d.update(saved_at="NaN")),
    "negative-timestamp": _v1_doc(lambda d: d["counts"].update(store_start_timestamp=-1.0)),
}


# v2 forgeries: the documented layout (gatemetrics._format), rebuilt with valid checksums so that
# only the one thing each case breaks is wrong. The prefix is magic, version, flags, header
# length, slot offset, slot stride, slot size, the lengths of the JSON sections that follow it
# (the first is the owner's identity) and the schema fingerprint; then the sections, then the
# header's crc32.
_PREFIX = Layout.PREFIX
_CRC = struct.Struct("<I")
_LAYOUT = Layout(SHOP_SCHEMA)
_FIELDS = {"magic": 0, "version": 1, "flags": 2, "header_len": 3, "stride": 5, "fingerprint": -1}


def _v2_sections(data: bytes) -> list[bytes]:
    """The JSON sections of a v2 header, in order (the owner's identity first)."""
    fields = list(_PREFIX.unpack_from(data))
    sections, at = [], _PREFIX.size
    for length in fields[7:-1]:
        sections.append(data[at : at + length])
        at += length
    return sections


def _v2_reheader(
    data: bytes, *, sections: list[bytes] | None = None, crc: bool = True, **changes: Any
) -> bytes:
    """``data`` with a new header (same slot offset), its checksum recomputed when ``crc``."""
    fields = list(_PREFIX.unpack_from(data))
    if sections is None:
        sections = _v2_sections(data)
    assert len(sections) == len(fields) - 8
    fields[7:-1] = [len(s) for s in sections]
    fields[3] = _PREFIX.size + sum(map(len, sections)) + _CRC.size
    for key, value in changes.items():
        fields[_FIELDS[key]] = value
    body = _PREFIX.pack(*fields) + b"".join(sections)
    header = body + _CRC.pack(zlib.crc32(body) if crc else zlib.crc32(body) ^ 1)
    slot_offset = _PREFIX.unpack_from(data)[4]
    assert len(header) <= slot_offset, "a forged header must fit in its first page"
    return header.ljust(slot_offset, b"\0") + data[slot_offset:]


def _v2_with_ident(
    mutate: Callable[[dict[str, Any]], None] = lambda ident: None,
    record: Callable[[Any], Any] | None = None,
    **changes: Any,
) -> HostileMaker:
    """Forge the identity (``mutate``) and the schema record (``record`` returns the new one)."""

    def make(path: Path, _name: str, data: bytes) -> None:
        path.write_bytes(_forge(data, path, mutate, record, **changes))

    return make


def _forge(
    data: bytes,
    path: Path,
    mutate: Callable[[dict[str, Any]], None] = lambda ident: None,
    record: Callable[[Any], Any] | None = None,
    **changes: Any,
) -> bytes:
    sections = _v2_sections(data)
    ident = orjson.loads(sections[0])
    ident["incarnation"] = incarnation_of(path.name)
    mutate(ident)
    if record is not None:
        if len(sections) > 1:  # the schema record in a section of its own
            sections[1] = orjson.dumps(record(orjson.loads(sections[1])))
        else:  # the schema record inside the identity
            ident["schema"] = record(ident["schema"])
    sections[0] = orjson.dumps(ident)
    return _v2_reheader(data, sections=sections, **changes)


def _v2_as_written_for(data: bytes, path: Path) -> bytes:
    """A valid v2 shard's bytes as if ``path``'s incarnation had written them."""
    return _forge(data, path)


def _raw_ident(content: bytes) -> HostileMaker:
    def make(path: Path, _name: str, data: bytes) -> None:
        sections = _v2_sections(data)
        sections[0] = content
        path.write_bytes(_v2_reheader(data, sections=sections))

    return make


def _v2_slot(
    *, counts: Callable[[list[int]], None] | None = None, saved_at: float = 1.0
) -> HostileMaker:
    """A forged newest slot with a valid checksum but a bad value."""

    def make(path: Path, _name: str, data: bytes) -> None:
        data = _v2_as_written_for(data, path)
        values = [0] * SHOP_SCHEMA.size
        values[SHOP_SCHEMA.slot("orders", "paid")] = 1
        if counts is not None:
            counts(values)
        (offset, seq), _ = sorted(v2_slots(data), key=lambda s: -s[1])
        slot = _LAYOUT.pack(seq + 2, 9, saved_at, 1.0, values)
        path.write_bytes(data[:offset] + slot + data[offset + len(slot) :])

    return make


def _written_with(schema: Schema) -> HostileMaker:
    """A real shard written by this release over ``schema``, under ``path``'s incarnation."""

    def make(path: Path, _name: str, _data: bytes) -> None:
        if any(f.kind == "gauge" for f in schema.families):
            # A store refuses a gauge now; the previous release wrote such shards, through
            # the same layout.
            _write_with_layout(schema, path)
            return
        store = CounterStore(schema)
        store.increment(schema.families[0].key, schema.families[0].values[0], 7)
        ident = Identity(incarnation_of(path.name), 4242, "elsewhere", 1.0)
        with tempfile.TemporaryDirectory(dir=path.parent.parent) as elsewhere:
            shard = Shard(store, elsewhere, identity_factory=lambda: ident)
            assert shard.save()
            written = shard.path
            assert written is not None
            shard.close(save=False)
            os.rename(written, path)

    return make


def _write_with_layout(schema: Schema, path: Path) -> None:
    """The shard ``_written_with`` makes, written through the v2 layout itself."""
    layout = Layout(schema)
    header = layout.header(
        incarnation=incarnation_of(path.name), pid=4242, host="elsewhere", started_at=1.0
    )
    counts = schema.zeros()
    counts[schema.slot(schema.families[0].key, schema.families[0].values[0])] = 7
    data = bytearray(layout.new_file(header, 1.0))
    slot = layout.pack(1, 1, 1.0, 1.0, counts, sums=schema.float_zeros())
    offset = layout.slot_offset(len(header), 1)
    data[offset : offset + len(slot)] = slot
    path.write_bytes(bytes(data))


def _shop_schema_with(key: str, **changes: Any) -> Schema:
    """SHOP_SCHEMA with family ``key`` changed (validated like any family)."""
    return Schema(
        dataclasses.replace(f, **changes) if f.key == key else f for f in SHOP_SCHEMA.families
    )


_INJECTED = 'no_money"} 1\nshop_orders_total{outcome="paid'


def _inject(record: Any) -> Any:
    record["families"][1]["values"][0] = _INJECTED
    return record


HOSTILE_V2: dict[str, HostileMaker] = {
    **_COMMON,
    "truncated": lambda path, _name, data: path.write_bytes(_v2_as_written_for(data, path)[:-1]),
    "truncated-in-the-prefix": lambda path, _name, data: path.write_bytes(data[:40]),
    "truncated-in-the-header": lambda path, _name, data: path.write_bytes(data[:100]),
    "extended": lambda path, _name, data: path.write_bytes(
        _v2_as_written_for(data, path) + b"\0" * 4096
    ),
    "v1-json-under-a-v2-name": _raw(b'{"format": "gatemetrics-shard", "version": 1}'),
    "bad-magic": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), magic=b"PROMMMAP")
    ),
    "unknown-version": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), version=3)
    ),
    "unknown-flags": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), flags=1)
    ),
    "bad-header-length": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), header_len=4000)
    ),
    "bad-slot-layout": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), stride=8192)
    ),
    "bad-header-checksum": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), crc=False)
    ),
    "identity-not-json": _raw_ident(b"{not json"),
    "identity-not-an-object": _raw_ident(b"[1, 2]"),
    "wrong-pid": _v2_with_ident(lambda m: m.update(pid="1234")),
    "zero-pid": _v2_with_ident(lambda m: m.update(pid=0)),
    "host-too-long": _v2_with_ident(lambda m: m.update(host="h" * 300)),
    "nan-started-at": _v2_with_ident(lambda m: m.update(started_at="NaN")),
    "cells-do-not-match": _v2_with_ident(lambda m: m["cells"].update(int=m["cells"]["int"] + 1)),
    "another-fingerprint-and-a-malformed-schema-record": _v2_with_ident(
        record=lambda r: {"families": "all of them"}, fingerprint=b"\1" * 16
    ),
    "both-slots-torn": lambda path, _name, data: path.write_bytes(
        tear(tear(_v2_as_written_for(data, path), v2_slots(data)[0][0]), v2_slots(data)[1][0])
    ),
    "negative-count": _v2_slot(counts=lambda c: c.__setitem__(0, -5)),
    "nan-saved-at": _v2_slot(saved_at=float("nan")),
    "negative-saved-at": _v2_slot(saved_at=-1.0),
    "label-injection-in-its-schema-record": _v2_with_ident(record=_inject, fingerprint=b"\0" * 16),
    "schema-with-an-unknown-label-value": _written_with(
        _shop_schema_with("orders", values=("paid", "refused", "MAYBE"))
    ),
    "schema-with-an-unknown-family": _written_with(
        SHOP_SCHEMA.extend([Family("evil_total", "Not ours.", key="evil_counts")])
    ),
    "schema-with-another-label-name": _written_with(_shop_schema_with("orders", label="verdict")),
    "schema-with-another-kind": _written_with(_shop_schema_with("orders", kind="gauge")),
    "schema-with-another-metric-name": _written_with(
        _shop_schema_with("orders", name="shop_order_total")
    ),
}


def _assert_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str, expected: dict[str, int]
) -> None:
    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path)
    # The good shards still count, the bad one does not, nothing out of schema appears.
    assert result.snapshot().family("orders") == expected
    assert result.quarantined_total == 1
    assert_bounded(result)
    (report,) = [s for s in result.shards if s.name == bad]
    assert (report.state, report.action) == ("dead", "quarantined")
    lines = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"skipped {bad} (compaction will quarantine it): ")
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path, compact=True)
    assert result.snapshot().family("orders") == expected
    assert result.quarantined_total == 1
    lines = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"quarantined {bad}: ")
    assert bad not in os.listdir(tmp_path)
    (moved,) = os.listdir(tmp_path / QUARANTINE_DIR)
    assert moved.startswith(f"{bad}.")
    assert shard_names(tmp_path) == []  # the good ones absorbed as usual

    later = agg(tmp_path)
    assert later.quarantined_total == 1  # persisted in the archive, never decreasing
    assert later.snapshot().family("orders") == expected
    assert_bounded(later)


@pytest.mark.parametrize("case", list(HOSTILE_V1))
def test_a_hostile_v1_shard_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    dead_shop_shard(tmp_path, paid=2, refused=1)
    dead_shop_v1_shard(tmp_path, paid=3)
    source, data = _v1_source(tmp_path)
    bad = v1_names(new_identity().incarnation)[0]
    HOSTILE_V1[case](tmp_path / bad, source, data)
    expected = {"paid": 5 + int(case == "symlink"), "refused": 1}
    _assert_costs_only_itself(tmp_path, caplog, bad, expected)


# What the aggregator must have found wrong, where the route matters (a forgery that broke the
# wrong thing would still be quarantined, proving nothing about the case).
V2_PROBLEMS = {
    "copied-shard": "incarnation",
    "truncated": "wrong size",
    "extended": "wrong size",
    "bad-magic": "magic",
    "bad-header-checksum": "checksum",
    "both-slots-torn": "both slots",
    "negative-count": "negative",
    "label-injection-in-its-schema-record": "another schema",
    **{case: "another schema" for case in HOSTILE_V2 if case.startswith("schema-with")},
}


@pytest.mark.parametrize("case", list(HOSTILE_V2))
def test_a_hostile_v2_shard_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    dead_shop_shard(tmp_path, paid=2, refused=1)
    dead_shop_v1_shard(tmp_path, paid=3)
    source, data = _v2_source(tmp_path)
    bad = v2_names(new_identity().incarnation)[0]
    HOSTILE_V2[case](tmp_path / bad, source, data)
    (report,) = [s for s in agg(tmp_path).shards if s.name == bad]
    assert report.problem is not None
    assert V2_PROBLEMS.get(case, "") in report.problem
    caplog.clear()
    expected = {"paid": 5 + int(case == "symlink"), "refused": 1}
    _assert_costs_only_itself(tmp_path, caplog, bad, expected)


@pytest.mark.parametrize("field", ["saved_at", "started_at"])
def test_a_v1_shards_bad_timestamp_is_reported_under_its_own_name(
    tmp_path: Path, field: str
) -> None:
    source, data = _v1_source(tmp_path)
    bad = tmp_path / v1_names(new_identity().incarnation)[0]
    _v1_doc(lambda d: d.update({field: "NaN"}))(bad, source, data)
    (report,) = agg(tmp_path).shards
    assert report.action == "quarantined"
    assert report.problem is not None
    assert field in report.problem
    assert "store_start_timestamp" not in report.problem


def test_the_v2_forgery_helpers_alone_break_nothing(tmp_path: Path) -> None:
    """Each forged v2 case breaks one thing only: the same helpers with no change still count."""
    source, data = _v2_source(tmp_path)
    for make in (
        lambda path: path.write_bytes(_v2_as_written_for(data, path)),
        lambda path: path.write_bytes(_v2_reheader(_v2_as_written_for(data, path))),
        lambda path: _v2_with_ident()(path, source, data),
        lambda path: _v2_with_ident(record=lambda r: r, fingerprint=b"\0" * 16)(path, source, data),
        lambda path: _v2_slot()(path, source, data),
        lambda path: _written_with(SHOP_SCHEMA)(path, source, data),
    ):
        make(tmp_path / v2_names(new_identity().incarnation)[0])
    result = agg(tmp_path)
    assert result.quarantined_total == 0
    assert [s.action for s in result.shards] == ["counted"] * 6
    assert result.snapshot().get("orders", "paid") == 1 + 1 + 1 + 1 + 1 + 7


def test_a_torn_newest_slot_falls_back_to_the_previous_save(tmp_path: Path) -> None:
    store = shop_store()
    shard = shard_for(store, tmp_path)
    record_order(store, True)
    record_order(store, True)
    assert shard.save()
    first = store.generation
    record_order(store, False, ["no_money"])
    assert shard.save()
    assert shard.path is not None
    path = Path(shard.path)
    shard.close(save=False)
    full = agg(tmp_path).snapshot()
    assert full.family("orders") == {"paid": 2, "refused": 1}
    data = path.read_bytes()
    (newest, seq), (_older, older_seq) = sorted(v2_slots(data), key=lambda s: -s[1])
    assert (seq, older_seq) == (2, 1)
    path.write_bytes(tear(data, newest))  # a save cut short, as a SIGKILL mid-pwrite leaves it
    result = agg(tmp_path)
    assert result.snapshot().family("orders") == {"paid": 2, "refused": 0}
    assert result.snapshot().get("refusals", "no_money") == 0
    (report,) = result.shards
    assert (report.action, report.generation, report.format) == ("counted", first, 2)
    assert result.quarantined_total == 0  # a torn slot is no broken shard
    result = agg(tmp_path, compact=True)  # and it is absorbed with the older save's counts
    assert result.compaction is not None
    assert result.compaction.absorbed == 1
    assert orders(tmp_path) == {"paid": 2, "refused": 0}


def test_a_live_shards_torn_newest_slot_is_read_again_then_the_previous_save_counts(
    tmp_path: Path, live: Callable[[Path, int], CounterStore]
) -> None:
    store = live(tmp_path, 2)
    record_order(store, False, ["no_money"])
    path = tmp_path / live_v2_name(store, tmp_path)
    data = path.read_bytes()
    newest, _ = max(v2_slots(data), key=lambda s: s[1])
    at = newest + 40
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([data[at] ^ 0xFF]), at)  # in place: the owner's inode, its lock
    finally:
        os.close(fd)
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("orders") == {"paid": 2, "refused": 0}
    (report,) = result.shards
    assert (report.state, report.action) == ("live", "counted")
    assert path.exists()
    record_order(store, True)  # the owner's next save goes to the other slot, complete
    assert orders(tmp_path) == {"paid": 3, "refused": 1}


def test_a_shard_of_an_older_writer_with_a_subset_schema_maps_and_counts(
    tmp_path: Path,
) -> None:
    """A v2 writer whose schema had fewer label values (in another order) and fewer families."""
    older = Schema(
        [
            SHOP_SCHEMA.family("orders"),
            Family(
                "shop_refusals_total",
                "Refused orders, by why.",
                key="refusals",
                label="why",
                values=("fraud", "no_money"),
            ),
            SHOP_SCHEMA.family("errors"),
        ]
    )
    store = CounterStore(older)
    store.increment("orders", "refused", 3)
    store.increment("refusals", "fraud", 2)
    store.increment("refusals", "no_money", 1)
    store.increment("errors", None, 5)
    shard = Shard(store, tmp_path)
    assert shard.save()
    shard.close(save=False)
    dead_shop_shard(tmp_path, paid=1, refused=1)
    # Read with the shop's superset by till: the older writer had no such family.
    result = agg(tmp_path, compact=True, schema=TILLS_SCHEMA)
    assert result.quarantined_total == 0
    snap = result.snapshot()
    assert snap.family("orders") == {"paid": 1, "refused": 4}
    reasons = snap.family("refusals")
    assert (reasons["fraud"], reasons["no_money"], reasons["no_stock"]) == (2, 1, 1)
    assert sum(reasons.values()) == 4
    assert snap.get("errors") == 5
    assert snap.family("tills") == dict.fromkeys(TILLS, 0)
    assert shard_names(tmp_path) == []  # absorbed like any other
    assert agg(tmp_path, schema=TILLS_SCHEMA).counts == result.counts
    assert_bounded(result, TILLS_AGGREGATE_SERIES)


def test_a_file_with_a_hostile_name_is_quarantined(tmp_path: Path) -> None:
    dead_shop_shard(tmp_path, paid=1)
    dead_shop_v1_shard(tmp_path, paid=2)
    names = [
        "shard-evil.json",
        "shard-.lock",
        "shard-x.json.bak",
        "v2-evil.shard",
        "v2-.creating",
        f"{v2_names(new_identity().incarnation)[0]}.bak",
        "v2-x.shard.tmp",
    ]
    for name in names:
        (tmp_path / name).write_text("{}")
    (tmp_path / "notes.txt").write_text("ignored: not ours")
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == len(names)
    assert sorted(n.rsplit(".", 1)[0] for n in os.listdir(tmp_path / QUARANTINE_DIR)) == sorted(
        names
    )
    assert (tmp_path / "notes.txt").exists()
    assert orders(tmp_path) == {"paid": 3, "refused": 0}


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_unreadable_shard_costs_only_itself(tmp_path: Path, reaper: Reaper, fmt: int) -> None:
    """Real EACCES: as root, run the aggregator as an unprivileged user (after its imports).

    A v1 shard's liveness is its lock file, so an unreadable dead one is quarantined. A v2
    shard's liveness is its own flock, which needs an open descriptor: an unreadable one cannot
    be proven dead, so it is skipped as live (never changed), and still costs only itself.
    """
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        directory = Path(top) / "shards"
        directory.mkdir()
        dead_shop_shard(directory, paid=3)
        if fmt == 1:
            source, data = _v1_source(directory)
            bad = directory / v1_names(new_identity().incarnation)[0]
            _v1_doc(lambda d: None)(bad, source, data)
        else:
            source, data = _v2_source(directory)
            bad = directory / v2_names(new_identity().incarnation)[0]
            bad.write_bytes(_v2_as_written_for(data, bad))
        bad.chmod(0)
        for path in (Path(top), directory, *directory.iterdir()):
            if path != bad:
                path.chmod(0o777 if path.is_dir() else 0o666)
        drop = "os.setgroups([]); os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else ""
        done = run_python(
            f"""
            import gatemetrics.aggregate as a
            from tests.engine.schema import SHOP_SCHEMA
            import gatemetrics.shards, gatemetrics.exposition, orjson, logging
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            {drop}
            r = a.aggregate_dir(sys.argv[1], SHOP_SCHEMA, namespace="shop", compact=True)
            print(r.snapshot().get("orders", "paid"), r.quarantined_total, r.live)
            """,
            str(directory),
        )
        code, out, err = done.returncode, done.stdout, done.stderr
        assert code == 0, err
        if fmt == 1:
            assert out.split() == ["3", "1", "0"]
            assert f"quarantined {bad.name}: cannot be read: Permission denied" in err
            assert not bad.exists()
        else:
            assert out.split() == ["3", "0", "1"]
            assert f"skipped {bad.name} (its owner is alive): cannot be read" in err
            assert bad.exists()


def _break_v2_header(path: Path) -> None:
    path.write_bytes(b"{ torn")  # the same inode: the owner keeps its lock and descriptor


def _break_v2_slots(path: Path) -> None:
    data = path.read_bytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, _seq in v2_slots(data):
            os.pwrite(fd, bytes([data[offset + 40] ^ 0xFF]), offset + 40)
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", ["v1-json", "v2-slots", "v2-header"])
def test_a_live_owners_broken_shard_is_skipped_not_quarantined(
    tmp_path: Path,
    live: Callable[[Path, int], CounterStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    if damage == "v1-json":
        old = live_v1(tmp_path, 3)
        store = old.store
        path = Path(old.path)
        path.write_bytes(b"{ torn")
    else:
        store = live(tmp_path, 3)
        path = tmp_path / live_v2_name(store, tmp_path)
        (_break_v2_slots if damage == "v2-slots" else _break_v2_header)(path)
    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 0
    assert [(s.state, s.action) for s in result.shards] == [("live", "skipped")]
    assert result.live == 1
    assert path.exists()  # its owner rewrites it; moving it could lose a fresh save
    assert any("its owner is alive" in r.getMessage() for r in caplog.records)
    assert isinstance(store, CounterStore)
    record_order(store, True)
    if damage != "v2-header":  # the next save repairs it (a whole new file, or a whole slot)
        assert orders(tmp_path) == {"paid": 4, "refused": 0}
        return
    # A v2 save rewrites a slot, never the header: broken until its owner goes, then the
    # documented exception (a shard corrupt on disk is quarantined, its counts lost).
    assert [s.action for s in agg(tmp_path).shards] == ["skipped"]
    shard_for(store, tmp_path).close(save=False)
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 1
    assert not path.exists()
    assert orders(tmp_path) == {"paid": 0, "refused": 0}


@pytest.mark.parametrize(
    "content", [b"", b"{ not json", b"[]", b'{"format": "gatemetrics-archive"}', b"\xff"]
)
def test_a_broken_archive_is_quarantined_and_its_totals_lost(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    dead_shop_shard(tmp_path, paid=5)
    agg(tmp_path, compact=True)
    dead_shop_shard(tmp_path, paid=2)
    (tmp_path / "archive.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="gatemetrics"):
        result = agg(tmp_path)
    assert result.snapshot().family("orders") == {"paid": 2, "refused": 0}
    assert result.quarantined_total == 1
    assert any("its totals are lost" in r.getMessage() for r in caplog.records)
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 1
    assert [n.split(".")[0] for n in os.listdir(tmp_path / QUARANTINE_DIR)] == ["archive"]
    after = agg(tmp_path)
    assert after.snapshot().family("orders") == {"paid": 2, "refused": 0}
    assert after.quarantined_total == 1
    assert after.archive.problem is None


def test_an_archive_of_another_schema_stops_the_run_and_changes_nothing(tmp_path: Path) -> None:
    dead_shop_shard(tmp_path, paid=5)
    agg(tmp_path, compact=True)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    archive["counts"]["jobs"] = {"a": 1}
    (tmp_path / "archive.json").write_bytes(orjson.dumps(archive))
    dead_shop_shard(tmp_path, paid=1)
    dead_shop_v1_shard(tmp_path, paid=1)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SchemaError, match="another schema"):
        agg(tmp_path, compact=True)
    assert sorted(os.listdir(tmp_path)) == before


def test_the_archive_keeps_the_v1_layout_the_previous_release_reads(tmp_path: Path) -> None:
    """An old compactor may run during an upgrade: same fields, version 1, v1 counts layout."""
    dead_shop_shard(tmp_path, paid=2)
    dead_shop_v1_shard(tmp_path, paid=1, refused=1)
    (tmp_path / v2_names(new_identity().incarnation)[0]).write_bytes(b"hostile")
    agg(tmp_path, compact=True)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert sorted(archive) == sorted(
        [
            "format",
            "version",
            "counts",
            "absorbed",
            "absorbed_total",
            "quarantined_total",
            "quarantining",
            "updated_at",
            "first_start",
        ]
    )
    assert (archive["format"], archive["version"]) == ("gatemetrics-archive", 1)
    assert SHOP_SCHEMA.parse_counts(archive["counts"]) == list(agg(tmp_path).counts)
    assert archive["counts"]["orders"] == {"paid": 3, "refused": 1}
    assert (archive["absorbed_total"], archive["quarantined_total"]) == (2, 1)
    assert archive["quarantining"] == [] == archive["absorbed"]


def test_the_quarantine_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate_module, "QUARANTINE_KEEP", 3)
    for round_ in range(3):
        (tmp_path / f"shard-bad{round_}.json").write_text("x")
        (tmp_path / f"v2-bad{round_}.shard").write_text("x")
        agg(tmp_path, compact=True)
    assert len(os.listdir(tmp_path / QUARANTINE_DIR)) == 3
    assert agg(tmp_path).quarantined_total == 6
    (tmp_path / QUARANTINE_DIR / "shard-dir.json.1").mkdir()  # an old quarantined directory
    (tmp_path / "shard-bad-last.json").write_text("x")
    agg(tmp_path, compact=True)
    assert len(os.listdir(tmp_path / QUARANTINE_DIR)) == 3


def test_a_quarantine_that_is_a_symlink_is_replaced_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / QUARANTINE_DIR).symlink_to(elsewhere)
    (shards / "shard-bad.json").write_text("x")
    bad_v2 = v2_names(new_identity().incarnation)[0]
    (shards / bad_v2).write_text("x")
    result = agg(shards, compact=True)
    assert result.quarantined_total == 2
    assert os.listdir(elsewhere) == []
    quarantine = shards / QUARANTINE_DIR
    assert quarantine.is_dir()
    assert not quarantine.is_symlink()
    assert sorted(n.rsplit(".", 1)[0] for n in os.listdir(quarantine)) == sorted(
        ["shard-bad.json", bad_v2]
    )
    assert agg(shards, compact=True).quarantined_total == 2  # counted once, not per run


@pytest.mark.parametrize("formats", [(2, 2), (1, 2), (2, 1)])
def test_counts_that_would_overflow_the_aggregate_are_quarantined(
    tmp_path: Path, formats: tuple[int, int]
) -> None:
    for fmt in formats:
        store = shop_store()
        store.increment("errors", None, MAX_COUNT - 10)
        if fmt == 1:
            old = LegacyV1Shard(store, tmp_path, durability="none")
            old.save()
            old.close(save=False)
        else:
            shard = shard_for(store, tmp_path)
            assert shard.save()
            shard.close(save=False)
    result = agg(tmp_path)
    assert result.snapshot().get("errors") == MAX_COUNT - 10
    assert result.quarantined_total == 1
    assert sorted(s.action for s in result.shards) == ["counted", "quarantined"]
    assert_bounded(result)


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_shard_vanishing_is_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: int
) -> None:
    name = (dead_shop_v1_shard if fmt == 1 else dead_shop_shard)(tmp_path, paid=1)
    real_open = os.open

    def vanishing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(name):
            raise FileNotFoundError(errno.ENOENT, "gone", path)
        return real_open(path, flags, *args, **kwargs)

    # A file removed between listing and opening (only a process breaking the protocol can do
    # that under the directory lock); forcing the interleaving needs the open to fail here.
    monkeypatch.setattr("gatemetrics.aggregate.os.open", vanishing_open)
    result = agg(tmp_path)
    assert result.counts == tuple(SHOP_SCHEMA.zeros())
    assert [s.problem for s in result.shards] == ["vanished while being read"]


def test_max_shard_bytes_is_generous_for_real_shards_of_both_formats(tmp_path: Path) -> None:
    store = shop_store()
    for slot in range(SHOP_SCHEMA.size):
        store.increment_slots([slot])
    store.increment("orders", "paid", MAX_COUNT - 1)
    store.increment("refusals", "no_stock", MAX_COUNT - 1)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    assert shard.path is not None
    v2 = Path(shard.path)
    shard.close(save=False)
    old = LegacyV1Shard(store, tmp_path, durability="none")
    old.save()
    v1 = Path(old.path)
    old.close(save=False)
    assert v2.stat().st_size <= MAX_SHARD_BYTES // 64  # a fixed size: a few pages
    assert v1.stat().st_size < MAX_SHARD_BYTES // 100  # JSON grows with the digits
