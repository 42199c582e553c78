"""The files of a shard directory, writer and reader side by side (private).

One module owns every on-disk format, so the shard owner (:mod:`gatemetrics.shards`) and the
aggregator (:mod:`gatemetrics.aggregate`) can never disagree about a byte:

* **names**: which file in a directory is what (:func:`parse_name`);
* **shard format v2** (written by this release): ``v2-<incarnation>.shard``, a fixed-size binary
  file created once per incarnation and then written in place (:class:`Layout`,
  :func:`decode_v2`);
* **shard format v1** (written by the previous release, read for compatibility only):
  ``shard-<incarnation>.json`` with its lock file ``shard-<incarnation>.lock`` (:func:`decode_v1`);
* **the archive** ``archive.json`` (:class:`Archive`), still in the layout the previous release
  reads, so a compactor of either release can run during an upgrade;
* **the directory's schema** ``schema.json`` (:func:`encode_schema_file`,
  :func:`decode_schema_file`): the schema (and pipeline namespace) the archive's totals are
  laid out for, in a file of its own because the previous release's archive reader refuses any
  field it does not know.

Shard format v2, all integers little-endian::

    offset 0            prefix (Layout.PREFIX): magic b"GMSHARD\\0", version 2, flags 0,
                        header length, slot offset, slot stride, slot size, identity length,
                        schema record length, schema fingerprint (16 bytes)
    52                  identity: JSON (orjson) with the owner's incarnation, pid, host,
                        started_at, and the slot's cells (``{"int": n, "float": m}``)
    52 + identity len   schema record: JSON, the schema the slots are laid out for (families,
                        keys, labels, values, kinds); its hash is the fingerprint
    ...                 crc32 of everything above (4 bytes)
    slot offset         slot A (generations with even seq), on a 4 KiB boundary
    + slot stride       slot B (odd seq)

A reader whose schema has the same fingerprint never parses the schema record; one with another
schema maps the cells through it, when the file's schema is a subset of its own. A family with
several labels is recorded with ``"label"`` the list of its names and ``"values"`` one list per
label (:func:`_recorded_labels`), which a reader without several labels never takes for its own.

A slot is ``seq (u64), store_generation (u64), saved_at (f64), store start (f64), one i64 per
integer cell, one f64 per float cell`` followed by the crc32 of those bytes. The identity
describes the cells, so families with several labels or histograms fit without a new version:
the i64 cells are the schema's integer slots (a histogram's non-cumulative bucket counts among
them), the f64 cells its float cells (one sum per histogram series; ``m == 0`` without
histograms, and then a shard is byte for byte what it was before histograms existed).
Slots start on 4 KiB boundaries, so writing one never touches the page of the other.

Why a save can never be seen half done: the owner writes the slot that does *not* hold the
newest state, with one ``pwrite`` of the whole slot, and never renames. A reader takes the valid
slot with the highest ``seq``. A slot caught mid-write (by a concurrent reader, or left by a
SIGKILL) fails its checksum and the other slot, the previous complete save, is used: one save's
increments are visible all together or not at all. A buffered ``pread`` is not atomic against a
concurrent ``pwrite`` of the same page (measured on ext4: 0.09% of concurrent reads were torn), so
readers re-read a torn slot of a live shard before falling back (:data:`REREADS`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeAlias, TypeVar

import orjson

from gatemetrics.errors import SchemaError
from gatemetrics.schema import (
    MAX_BUCKETS,
    MAX_FAMILY_LABELS,
    Family,
    HistogramSeries,
    LabelValues,
    Schema,
    check_generation,
    check_sum,
    check_timestamp,
)

__all__ = [
    "ARCHIVE_NAME",
    "ARCHIVE_TMP",
    "MAX_ARCHIVE_BYTES",
    "MAX_RECORDED_FAMILIES",
    "MAX_RECORDED_SERIES",
    "MAX_SCHEMA_FILE_BYTES",
    "MAX_SHARD_BYTES",
    "REREADS",
    "SCHEMA_NAME",
    "SCHEMA_TMP",
    "STABLE_READS",
    "Archive",
    "BadFile",
    "ForeignSchema",
    "Kind",
    "Layout",
    "ShardRecord",
    "SlotImage",
    "V2Header",
    "decode_schema_file",
    "decode_v1",
    "decode_v2",
    "decode_v2_header",
    "decode_v2_schema",
    "decode_v2_slots",
    "encode_schema_file",
    "layout_for",
    "parse_name",
    "schema_fingerprint",
    "schema_fits",
    "schema_from_record",
    "schema_record",
    "v1_names",
    "v2_names",
    "valid_incarnation",
]

# -- names ---------------------------------------------------------------------------------------

_INCARNATION = r"[0-9a-f]{8}-[0-9]{1,10}-[0-9a-f]{1,16}-[0-9a-f]{16}"
_INCARNATION_RE = re.compile(rf"{_INCARNATION}\Z")
_V1_NAME = re.compile(rf"shard-(?P<inc>{_INCARNATION})\.(?P<kind>json|lock|tmp)\Z")
_V2_NAME = re.compile(rf"v2-(?P<inc>{_INCARNATION})\.(?P<kind>shard|creating)\Z")

#: What a file in a shard directory is: v1 shard/lock/temp, v2 shard, v2 shard being created.
Kind: TypeAlias = Literal["v1", "v1-lock", "v1-tmp", "v2", "v2-creating"]
_V1_KINDS: dict[str, Kind] = {"json": "v1", "lock": "v1-lock", "tmp": "v1-tmp"}
_V2_KINDS: dict[str, Kind] = {"shard": "v2", "creating": "v2-creating"}

#: Prefixes of the names the engine owns; any other name with one of them is hostile or stray.
OWNED_PREFIXES = ("shard-", "v2-")

ARCHIVE_NAME = "archive.json"
ARCHIVE_TMP = "archive.json.tmp"
SCHEMA_NAME = "schema.json"
SCHEMA_TMP = "schema.json.tmp"


def valid_incarnation(value: object) -> bool:
    return isinstance(value, str) and _INCARNATION_RE.match(value) is not None


def parse_name(name: str) -> tuple[str, Kind] | None:
    """``(incarnation, kind)`` for a well-formed shard-family file name, else ``None``."""
    m = _V2_NAME.match(name)
    if m is not None:
        return m["inc"], _V2_KINDS[m["kind"]]
    m = _V1_NAME.match(name)
    if m is not None:
        return m["inc"], _V1_KINDS[m["kind"]]
    return None


def v2_names(incarnation: str) -> tuple[str, str]:
    """The v2 shard file name of ``incarnation`` and the name it is created under."""
    return f"v2-{incarnation}.shard", f"v2-{incarnation}.creating"


def v1_names(incarnation: str) -> tuple[str, str, str]:
    """The v1 shard, lock and temp file names of ``incarnation`` (previous release)."""
    return (f"shard-{incarnation}.json", f"shard-{incarnation}.lock", f"shard-{incarnation}.tmp")


class BadFile(Exception):
    """A file that cannot be counted; the message says why (one log line)."""


class ForeignSchema(BadFile):
    """A well-formed v2 shard whose recorded schema does not fit the reader's.

    ``fingerprint`` is the file's schema fingerprint, so that a run which finds nothing but
    such shards can name both schemas when it refuses.
    """

    def __init__(self, message: str, fingerprint: bytes) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


# -- the schema as recorded in a file --------------------------------------------------------------


def schema_record(schema: Schema) -> dict[str, Any]:
    """The schema as plain data: what a file records of the schema it was written with."""
    return _schema_info(schema)[0]


def schema_fingerprint(schema: Schema) -> bytes:
    """16 bytes that change whenever anything in :func:`schema_record` changes."""
    return _schema_info(schema)[1]


@functools.lru_cache(maxsize=64)
def _schema_info(schema: Schema) -> tuple[dict[str, Any], bytes]:
    families: list[dict[str, Any]] = []
    for f in schema.families:
        fam: dict[str, Any] = {
            "name": f.name,
            "key": f.key,
            "kind": f.kind,
            "documentation": f.documentation,
            **_recorded_labels(f),
        }
        if f.kind == "histogram":
            # Only a histogram has the field: every other family's record (and so every
            # fingerprint of a schema without histograms) is what it was before they existed.
            fam["buckets"] = list(f.buckets)
        families.append(fam)
    record = {"families": families}
    digest = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).digest()[:16]
    return record, digest


def _recorded_labels(fam: Family) -> dict[str, Any]:
    """A family's ``label`` and ``values`` fields in a schema record.

    No label or one label: ``"label": name or null, "values": [value, ...]``, as the previous
    releases write them (so those schemas keep their fingerprints, and their readers read these
    shards). Several labels: ``"label": [name, ...], "values": [[value, ...], ...]`` (one list
    of values per label, in declared order). A reader of a release without several labels
    compares ``label`` with its own family's string (or ``null``), never finds a list equal,
    and quarantines the shard as written with another schema (or, for ``schema.json``, refuses
    the record as malformed): it never maps such cells, so it cannot mis-count them.
    """
    if fam.label is not None or not fam.label_pairs:
        return {"label": fam.label, "values": list(fam.values)}
    return {"label": list(fam.label_names), "values": [list(v) for _, v in fam.label_pairs]}


def _cell_map(
    record: object, schema: Schema, fingerprint: bytes = b""
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For a file written with another schema: the slot of ``schema`` for each of its integer
    cells, and the float cell of ``schema`` for each of its float cells.

    Allowed only when the file's schema is a subset of ``schema`` (same family names, keys and
    kinds, a histogram's same bounds, a subset of the label values): a writer with an older
    schema that had fewer values still counts. Anything else raises :class:`BadFile`.
    """
    fams = record.get("families") if isinstance(record, dict) else None
    if not isinstance(fams, list) or not fams or len(fams) > 1024:
        raise BadFile("its schema record is malformed")
    cells: list[int] = []
    floats: list[int] = []
    for fam in fams:
        if not isinstance(fam, dict):
            raise BadFile("its schema record is malformed")
        ours = _our_family(fam, schema, fingerprint)
        label, values = fam.get("label"), fam.get("values")
        if isinstance(label, list) and isinstance(values, list) and len(ours.label_pairs) > 1:
            for combo in _multi_label_series(ours, label, values, fingerprint):
                _map_series(schema, ours.key, combo, cells, floats)
            continue
        if label != ours.label or not isinstance(values, list) or len(ours.label_pairs) > 1:
            raise ForeignSchema(
                f"written with another schema (labels of {ours.key!r} differ)", fingerprint
            )
        if label is None:
            if values:
                raise BadFile("its schema record is malformed")
            _map_series(schema, ours.key, None, cells, floats)
            continue
        for value in values:
            if not isinstance(value, str) or value not in ours.values:
                raise ForeignSchema(
                    f"written with another schema ({ours.key}.{str(value)[:60]})", fingerprint
                )
            _map_series(schema, ours.key, value, cells, floats)
    if len(set(cells)) != len(cells) or len(set(floats)) != len(floats):
        raise BadFile("its schema record repeats a series")
    return tuple(cells), tuple(floats)


def _our_family(fam: dict[str, Any], schema: Schema, fingerprint: bytes) -> Family:
    """The family of ``schema`` a recorded family is (same key, name and kind, and a
    histogram's same bounds); :class:`ForeignSchema` when there is none."""
    key = fam.get("key")
    try:
        ours = schema.family(key) if isinstance(key, str) else None
    except SchemaError:
        ours = None
    if ours is None or fam.get("name") != ours.name or fam.get("kind") != ours.kind:
        raise ForeignSchema(
            f"written with another schema (family {str(key)[:60]!r} differs)", fingerprint
        )
    if ours.kind == "histogram" and fam.get("buckets") != list(ours.buckets):
        raise ForeignSchema(
            f"written with another schema (buckets of {ours.key!r} differ)", fingerprint
        )
    return ours


def _map_series(
    schema: Schema, key: str, value: LabelValues, cells: list[int], floats: list[int]
) -> None:
    """Append one series' cells of ``schema`` (a histogram's buckets and sum, or one slot)."""
    if schema.family(key).kind == "histogram":
        series = schema.histogram(key, value)
        cells.extend(range(series.first, series.end))
        floats.append(series.sum_cell)
    else:
        cells.append(schema.slot(key, value))


def _multi_label_series(
    ours: Family, names: list[Any], values: list[Any], fingerprint: bytes
) -> list[tuple[str, ...]]:
    """The series of ``ours`` (a family with several labels), as tuples of label values, for
    the series of a recorded family with labels ``names`` and per label ``values``: the same
    label names in the same order, and per label a subset of our values, in any order (the
    writer's series are the cross product of its recorded values, last label fastest; each
    takes one cell, or a histogram's bucket cells and sum). Anything else is another schema."""
    if names != list(ours.label_names) or len(values) != len(names):
        raise ForeignSchema(
            f"written with another schema (labels of {ours.key!r} differ)", fingerprint
        )
    for (name, declared), vals in zip(ours.label_pairs, values, strict=True):
        if not isinstance(vals, list) or not vals or len(set(map(str, vals))) != len(vals):
            raise BadFile("its schema record is malformed (label values)")
        for v in vals:
            if not isinstance(v, str) or v not in declared:
                raise ForeignSchema(
                    f"written with another schema ({ours.key}.{name}={str(v)[:60]})", fingerprint
                )
    # Bounded: every value is one of ours and none repeats, so this is at most ours.series.
    return list(itertools.product(*values))


#: Bounds on a schema read from a file (a shard header or ``schema.json``): whoever may write the
#: directory could otherwise declare a schema that widens the label set or exhausts memory.
MAX_RECORDED_FAMILIES = 256
MAX_RECORDED_SERIES = 4096
_MAX_RECORDED_NAME = 200
_MAX_RECORDED_VALUE = 128
_MAX_RECORDED_HELP = 1024
_RECORD_KEYS = frozenset({"name", "key", "kind", "documentation", "label", "values"})
_HISTOGRAM_RECORD_KEYS = _RECORD_KEYS | {"buckets"}
#: schema.json holds one schema record: a few hundred KiB at the bounds above.
MAX_SCHEMA_FILE_BYTES = 1 << 20
SCHEMA_FORMAT = "gatemetrics-schema"
SCHEMA_VERSION = 1


def _bounded_text(value: object, limit: int, what: str) -> str:
    """``value`` if it is a string of at most ``limit`` characters without control characters
    (which no metric name, label value or HELP line needs); else :class:`BadFile`."""
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadFile(f"its schema record has a bad {what} (a string of 1-{limit} characters)")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value):
        raise BadFile(f"its schema record has a control character in a {what}")
    return value


def schema_from_record(record: object) -> Schema:
    """The :class:`Schema` a file records (the inverse of :func:`schema_record`), validated.

    Every family goes through :class:`~gatemetrics.Family` (Prometheus name rules, unique label
    values, a counter's ``_total``), and the record is bounded first: at most
    :data:`MAX_RECORDED_FAMILIES` families and :data:`MAX_RECORDED_SERIES` series, names of at
    most 200 characters, label values of at most 128 and HELP texts of at most 1024, none
    with a control character, and no field beyond those :func:`schema_record` writes. A family
    with several labels counts the cross product of its recorded values toward the series bound
    and has at most :data:`~gatemetrics.schema.MAX_FAMILY_LABELS` labels.
    :class:`BadFile` for anything else.
    """
    fams = record.get("families") if isinstance(record, dict) else None
    if not isinstance(fams, list) or not fams:
        raise BadFile("its schema record is malformed (no families)")
    if len(fams) > MAX_RECORDED_FAMILIES:
        raise BadFile(f"its schema record has more than {MAX_RECORDED_FAMILIES} families")
    families: list[Family] = []
    series = 0
    for fam in fams:
        kind = fam.get("kind") if isinstance(fam, dict) else None
        fields = _HISTOGRAM_RECORD_KEYS if kind == "histogram" else _RECORD_KEYS
        if not isinstance(fam, dict) or set(fam) != fields:
            raise BadFile("its schema record is malformed (a family's fields)")
        labels = _record_labels(fam["label"], fam["values"])
        buckets = fam.get("buckets", [])
        if not isinstance(buckets, list) or len(buckets) > MAX_BUCKETS:
            raise BadFile("its schema record is malformed (buckets)")
        width = 1
        for _, vals in labels:
            # Bounded as it grows: a hostile record's product never gets computed in full.
            width = min(width * max(1, len(vals)), MAX_RECORDED_SERIES + 1)
        # Cells, not just series: a histogram series takes one per bucket (and +Inf).
        series += width * (len(buckets) + 1 if kind == "histogram" else 1)
        if series > MAX_RECORDED_SERIES:
            raise BadFile(f"its schema record has more than {MAX_RECORDED_SERIES} series")
        if kind not in ("counter", "gauge", "histogram"):
            raise BadFile("its schema record has a bad kind")
        try:
            families.append(
                Family(
                    _bounded_text(fam["name"], _MAX_RECORDED_NAME, "metric name"),
                    _bounded_text(fam["documentation"], _MAX_RECORDED_HELP, "HELP text"),
                    key=_bounded_text(fam["key"], _MAX_RECORDED_NAME, "key"),
                    kind=kind,
                    labels=_bounded_labels(labels),
                    buckets=tuple(buckets),
                )
            )
        except SchemaError as exc:
            raise BadFile(f"its schema record is invalid: {exc}"[:300]) from None
    try:
        return Schema(families)
    except SchemaError as exc:
        raise BadFile(f"its schema record is invalid: {exc}"[:300]) from None


def _record_labels(label: object, values: object) -> list[tuple[object, list[Any]]]:
    """A recorded family's ``label``/``values`` fields (see :func:`_recorded_labels`) as
    ``(name, values)`` pairs, their shape checked (names and values are checked, bounded,
    by the caller once the series bound holds); :class:`BadFile` if malformed."""
    if not isinstance(values, list):
        raise BadFile("its schema record is malformed (label values)")
    if label is None:
        if values:
            raise BadFile("its schema record is malformed (values without a label)")
        return []
    if not isinstance(label, list):
        return [(label, values)]
    if len(label) < 2 or len(label) != len(values):
        raise BadFile("its schema record is malformed (label names)")
    if len(label) > MAX_FAMILY_LABELS:
        raise BadFile(f"its schema record has a family with more than {MAX_FAMILY_LABELS} labels")
    if not all(isinstance(v, list) for v in values):
        raise BadFile("its schema record is malformed (label values)")
    return list(zip(label, values, strict=True))


def _bounded_labels(
    labels: list[tuple[object, list[Any]]],
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """:func:`_record_labels`' pairs with every name and value checked by :func:`_bounded_text`."""
    return tuple(
        (
            _bounded_text(name, _MAX_RECORDED_NAME, "label name"),
            tuple(_bounded_text(v, _MAX_RECORDED_VALUE, "label value") for v in vals),
        )
        for name, vals in labels
    )


def schema_fits(written: Schema, reader: Schema) -> bool:
    """Whether a shard written with ``written`` counts under ``reader``: same families, keys
    and kinds, and a subset of the label values (see :func:`decode_v2_header`)."""
    if written is reader or schema_fingerprint(written) == schema_fingerprint(reader):
        return True
    try:
        _cell_map(schema_record(written), reader)
    except BadFile:
        return False
    return True


def encode_schema_file(schema: Schema, namespace: str) -> bytes:
    """The bytes of ``schema.json``: the schema record, its fingerprint and the namespace."""
    doc = {
        "format": SCHEMA_FORMAT,
        "version": SCHEMA_VERSION,
        "fingerprint": schema_fingerprint(schema).hex(),
        "namespace": namespace,
        "schema": schema_record(schema),
    }
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


_SCHEMA_FILE_KEYS = frozenset({"format", "version", "fingerprint", "namespace", "schema"})
_NAMESPACE_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*\Z")


def decode_schema_file(data: bytes) -> tuple[Schema, str]:
    """``(schema, namespace)`` from the bytes of ``schema.json``; :class:`BadFile` if bad.

    The fingerprint must be the record's own: a file edited by hand (or by a hostile writer)
    that changed one without the other is refused rather than half believed.
    """
    if len(data) > MAX_SCHEMA_FILE_BYTES:
        raise BadFile(f"too large ({len(data)} bytes, limit {MAX_SCHEMA_FILE_BYTES})")
    doc = _versioned_document(data, _SCHEMA_FILE_KEYS, SCHEMA_FORMAT, SCHEMA_VERSION, "schema file")
    namespace = doc["namespace"]
    if not isinstance(namespace, str) or len(namespace) > 100 or not _NAMESPACE_RE.match(namespace):
        raise BadFile("its namespace is not a valid metric name prefix")
    schema = schema_from_record(doc["schema"])
    if doc["fingerprint"] != schema_fingerprint(schema).hex():
        raise BadFile("its fingerprint does not match its schema record")
    return schema, namespace


def decode_v2_schema(data: bytes) -> tuple[bytes, Schema]:
    """``(fingerprint, schema)`` recorded in the header of a whole v2 shard file's bytes.

    The header's checksum is verified, then the record is validated and bounded as
    :func:`schema_from_record` says, and must hash to the header's fingerprint (a reader whose
    schema has that fingerprint maps the cells one to one, so a record that disagrees with it
    would describe other cells than the slots hold). :class:`BadFile` otherwise.
    """
    _, _, _, _, ident_len, schema_len, fp = _decode_prefix(data)
    start = _PREFIX.size + ident_len
    record = _json_object(memoryview(data)[start : start + schema_len], "schema record")
    schema = schema_from_record(record)
    if schema_fingerprint(schema) != fp:
        raise BadFile("its schema record does not match its fingerprint")
    return fp, schema


# -- shard format v2 -----------------------------------------------------------------------------

MAGIC = b"GMSHARD\0"
VERSION = 2
PAGE = 4096
#: A v2 shard is a few pages; anything beyond this is hostile and never read into memory.
MAX_SHARD_BYTES = 1 << 20
#: How often a reader re-reads a live shard's torn slot before falling back to the other one.
REREADS = 3
#: How often a reader re-reads both slots of a live shard that it found both torn.
STABLE_READS = 20
_PREFIX = struct.Struct("<8sHHIIIIII16s")
_CRC = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_SLOT_HEAD = "<QQdd"  # seq, store_generation, saved_at, store start timestamp
_SLOT_HEAD_FIELDS = 4


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class Layout:
    """The v2 byte layout for one schema: header encoding, slot packing and decoding. Immutable.

    Obtain it with :func:`layout_for` (cached per schema); a reader that decodes many shards
    keeps it, since hashing a schema for the cache costs more than decoding a slot.
    """

    PREFIX = _PREFIX

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.int_cells = schema.size
        self.float_cells = schema.float_size
        self.slot = _slot_struct(self.int_cells, self.float_cells)
        self.slot_size = self.slot.size + _CRC.size
        self.slot_stride = _round_up(self.slot_size, PAGE)
        self.fingerprint = schema_fingerprint(schema)
        self.cells_record = {"int": self.int_cells, "float": self.float_cells}

    def header(self, *, incarnation: str, pid: int, host: str, started_at: float) -> bytes:
        """The header of a new shard (prefix, identity, schema record, crc), before the slots."""
        ident = orjson.dumps(
            {
                "incarnation": incarnation,
                "pid": pid,
                "host": host,
                "started_at": started_at,
                "cells": self.cells_record,
            }
        )
        schema = orjson.dumps(schema_record(self.schema))
        header_len = _PREFIX.size + len(ident) + len(schema) + _CRC.size
        slot_offset = _round_up(header_len, PAGE)
        prefix = _PREFIX.pack(
            MAGIC,
            VERSION,
            0,
            header_len,
            slot_offset,
            self.slot_stride,
            self.slot_size,
            len(ident),
            len(schema),
            self.fingerprint,
        )
        body = prefix + ident + schema
        return body + _CRC.pack(zlib.crc32(body))

    def new_file(self, header: bytes, start: float) -> bytes:
        """The complete initial file: header, padding, then both slots at seq 0, all zeros."""
        slot_offset = _round_up(len(header), PAGE)
        zeros = (0,) * self.int_cells
        no_sums = (0.0,) * self.float_cells
        slot = self.pack(0, 0, 0.0, start, zeros, sums=no_sums).ljust(self.slot_stride, b"\0")
        return header.ljust(slot_offset, b"\0") + slot + slot

    def pack(
        self,
        seq: int,
        generation: int,
        saved_at: float,
        start: float,
        counts: Iterable[int],
        *,
        sums: Iterable[float] = (),
    ) -> bytes:
        """One slot's bytes (with its checksum). ``struct.error`` for a count out of range (or
        a wrong number of cells)."""
        body = self.slot.pack(seq, generation, saved_at, start, *counts, *sums)
        return body + _CRC.pack(zlib.crc32(body))

    def unpack_slot(self, data: bytes) -> tuple[int, tuple[int, ...], tuple[float, ...]] | None:
        """The sequence and cells of one slot's bytes (as :meth:`pack` wrote them), or None
        when its checksum fails or ``data`` is not one slot long."""
        if len(data) != self.slot_size:
            return None
        fields = _decode_slot(data, 0, self.slot)
        if fields is None:
            return None
        ints_end = _SLOT_HEAD_FIELDS + self.int_cells
        return fields[0], tuple(fields[_SLOT_HEAD_FIELDS:ints_end]), tuple(fields[ints_end:])

    def image(self) -> SlotImage | None:
        """A new :class:`SlotImage` for this layout, or None where this machine cannot hold
        one (a big-endian machine: the image's cells are native integers)."""
        return SlotImage(self) if _NATIVE_IS_LAYOUT else None

    def slot_offset(self, header_len: int, seq: int) -> int:
        return _round_up(header_len, PAGE) + (seq & 1) * self.slot_stride

    def file_size(self, header_len: int) -> int:
        return _round_up(header_len, PAGE) + 2 * self.slot_stride


# A slot image keeps its cells as native machine integers and floats: that is the slot's own
# little-endian layout only on a little-endian machine with 8-byte "q"/"d" and 4-byte "I".
_NATIVE_IS_LAYOUT = (
    sys.byteorder == "little"
    and struct.calcsize("=q") == struct.calcsize("q") == 8
    and struct.calcsize("d") == 8
    and struct.calcsize("I") == 4
)
_HEAD = struct.Struct(_SLOT_HEAD)


class SlotImage:
    """One v2 slot held in memory, whose cells a store counts in directly.

    A write-through save of the default durability writes a whole slot after every record
    call. Packing the cells into a slot is most of that cost, so a shard lends a store an image
    instead (:meth:`gatemetrics.CounterStore.lend_cells`): ``counts`` and ``sums`` are views
    of the slot's own bytes, the store's increments land in them, and a save is :meth:`seal`
    (the slot's header fields and checksum) and one ``pwrite`` of :attr:`buffer`. The bytes
    are exactly what :meth:`Layout.pack` writes for the same fields.

    Not thread-safe by itself: the store's lock guards the cells, and whoever seals and
    writes the image holds that lock, so no increment lands between the checksum and the
    write. ``lent``, ``generation`` and ``start`` belong to the store while the image is lent
    (it sets ``lent`` to False when it takes its cells back, counts its saves in
    ``generation``, and ``start`` is its start timestamp).
    """

    __slots__ = (
        "body",
        "buffer",
        "counts",
        "crc",
        "generation",
        "lent",
        "pack_head",
        "size",
        "start",
        "sums",
    )

    def __init__(self, layout: Layout) -> None:
        if not _NATIVE_IS_LAYOUT:
            raise RuntimeError("a slot image needs a little-endian machine")
        head = _HEAD.size
        ints_end = head + 8 * layout.int_cells
        body_end = layout.slot.size
        self.buffer = bytearray(layout.slot_size)
        view = memoryview(self.buffer)
        self.counts = view[head:ints_end].cast("q")
        self.sums = view[ints_end:body_end].cast("d")
        #: The slot's header fields (seq, generation, saved_at, start): ``pack_head(buffer, 0,
        #: ...)``; the checksummed bytes, and the checksum's cell.
        self.pack_head = _HEAD.pack_into
        self.body = view[:body_end]
        self.crc = view[body_end:].cast("I")
        self.size = layout.slot_size
        self.lent = False
        self.generation = 0
        self.start = 0.0

    def seal(self, seq: int, generation: int, saved_at: float, start: float) -> bytearray:
        """Set the slot's header fields and checksum; the buffer, ready to be written.

        The write-through hot path (``Shard._changed``) inlines these two steps.
        """
        self.pack_head(self.buffer, 0, seq, generation, saved_at, start)
        self.crc[0] = zlib.crc32(self.body)
        return self.buffer


@functools.lru_cache(maxsize=64)
def _slot_struct(int_cells: int, float_cells: int = 0) -> struct.Struct:
    # Without float cells the format string is exactly what it was before histograms.
    floats = f"{float_cells}d" if float_cells else ""
    return struct.Struct(f"{_SLOT_HEAD}{int_cells}q{floats}")


@functools.lru_cache(maxsize=64)
def layout_for(schema: Schema) -> Layout:
    return Layout(schema)


class ShardRecord(NamedTuple):
    """What a reader found in one shard file (either format).

    A named tuple, not a dataclass: one is built per shard per scrape, and a frozen
    dataclass's ``__init__`` costs several times as much.
    """

    format: Literal[1, 2]
    incarnation: str
    pid: int
    host: str
    started_at: float
    generation: int  # the store's generation at its last save
    saved_at: float
    start: float  # the store's start timestamp
    counts: tuple[int, ...]  # over the reader's schema
    seq: int = 0  # v2: the slot sequence the counts come from
    torn_slots: int = 0  # v2: slots read that failed their checksum
    sums: tuple[float, ...] = ()  # the float cells (histogram sums) over the reader's schema


@dataclass(frozen=True, slots=True)
class V2Header:
    """A checked v2 header: whose shard it is and where its slots are. Immutable.

    A header never changes once its shard is in place, so a reader that keeps a shard open
    may decode it once and then read only the slots (:func:`decode_v2_slots`).
    """

    incarnation: str
    pid: int
    host: str
    started_at: float
    slot_offset: int
    slot_stride: int
    slot: struct.Struct  # the slot's body (without its checksum)
    cells: tuple[int, ...] | None  # None: the reader's schema, cells map one to one
    float_cells: tuple[int, ...] | None = None  # as ``cells``, for the float cells

    @property
    def file_size(self) -> int:
        return self.slot_offset + 2 * self.slot_stride


def _decode_prefix(data: bytes) -> tuple[int, int, int, int, int, int, bytes]:
    """The checked prefix: header length, slot offset, stride, slot size, ident and schema
    lengths, fingerprint."""
    if len(data) < _PREFIX.size:
        raise BadFile(f"too short for a v2 shard ({len(data)} bytes)")
    magic, version, flags, header_len, slot_offset, stride, slot_size, ident_len, schema_len, fp = (
        _PREFIX.unpack_from(data)
    )
    if magic != MAGIC:
        raise BadFile("not a v2 shard (bad magic)")
    if version != VERSION or flags != 0:
        raise BadFile(f"unknown v2 shard version {version} (flags {flags})")
    if header_len != _PREFIX.size + ident_len + schema_len + _CRC.size or header_len > len(data):
        raise BadFile("bad header length")
    if slot_offset != _round_up(header_len, PAGE) or stride != _round_up(slot_size, PAGE):
        raise BadFile("bad slot layout")
    if len(data) != slot_offset + 2 * stride:
        raise BadFile(f"wrong size ({len(data)} bytes, its header says {slot_offset + 2 * stride})")
    (crc,) = _CRC.unpack_from(data, header_len - _CRC.size)
    if zlib.crc32(memoryview(data)[: header_len - _CRC.size]) != crc:
        raise BadFile("bad header checksum")
    return header_len, slot_offset, stride, slot_size, ident_len, schema_len, fp


def _versioned_document(
    data: bytes, keys: frozenset[str], fmt: str, version: int, what: str
) -> dict[str, Any]:
    """The JSON object of one of our whole-file documents (the archive, ``schema.json``):
    exactly ``keys``, of format ``fmt`` and ``version``; :class:`BadFile` otherwise."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadFile(f"not valid JSON or not UTF-8 ({exc})") from None
    if (
        not isinstance(doc, dict)
        or set(doc) != keys
        or doc["format"] != fmt
        or doc["version"] != version
    ):
        raise BadFile(f"not a gatemetrics {what} (wrong fields)")
    return doc


def _json_object(data: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadFile(f"its {what} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadFile(f"its {what} is not an object")
    return value


def decode_v2_header(data: bytes, layout: Layout, incarnation: str) -> V2Header:
    """The checked header of a whole v2 shard file's bytes; :class:`BadFile` if it is bad."""
    _, slot_offset, stride, slot_size, ident_len, schema_len, fp = _decode_prefix(data)
    view = memoryview(data)
    ident = _json_object(view[_PREFIX.size : _PREFIX.size + ident_len], "identity")
    if ident.get("incarnation") != incarnation:
        raise BadFile("incarnation inside does not match the file name (a copied shard?)")
    if fp == layout.fingerprint:
        # The fingerprint is the reader's own schema's: the cells are ours one to one, and the
        # schema record (which only a hostile writer could make disagree) is not needed.
        cells = floats = None
        expected_ints, expected_floats = layout.int_cells, layout.float_cells
    else:
        start = _PREFIX.size + ident_len
        record = _json_object(view[start : start + schema_len], "schema record")
        cells, floats = _cell_map(record, layout.schema, fp)
        expected_ints, expected_floats = len(cells), len(floats)
    # The cells record must say exactly what the schema lays out: a histogram whose bucket
    # cells do not match its bounds (or a sum cell too many or too few) never counts.
    if ident.get("cells") != {"int": expected_ints, "float": expected_floats}:
        raise BadFile("its slot layout does not match its schema")
    slot = layout.slot if cells is None else _slot_struct(expected_ints, expected_floats)
    if slot_size != slot.size + _CRC.size:
        raise BadFile("its slot size does not match its schema")
    pid, host = ident.get("pid"), ident.get("host")
    if type(pid) is not int or not 0 < pid < 2**32:
        raise BadFile(f"pid must be a positive int, got {pid!r}"[:200])
    if not isinstance(host, str) or len(host) > 255:
        raise BadFile("host must be a string of at most 255 characters")
    try:
        started_at = check_timestamp(ident.get("started_at"))
    except SchemaError as exc:
        raise BadFile(f"invalid: started_at: {exc.problem}") from None
    return V2Header(incarnation, pid, host, started_at, slot_offset, stride, slot, cells, floats)


_Slot: TypeAlias = tuple[Any, ...]  # seq, generation, saved_at, start, *counts


def _decode_slot(data: bytes | memoryview, offset: int, slot: struct.Struct) -> _Slot | None:
    """The fields of the slot at ``offset`` if its checksum holds, else ``None`` (torn)."""
    end = offset + slot.size
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(memoryview(data)[offset:end]) != crc:
        return None
    return slot.unpack_from(data, offset)


def _newest_slot(
    data: bytes, base: int, head: V2Header, reread: Callable[[int, int], bytes] | None
) -> tuple[_Slot, int]:
    """The valid slot with the highest sequence, and how many slots were found torn.

    ``data`` holds the file's bytes from offset ``base`` on (0: the whole file).
    """
    first = head.slot_offset - base
    second = first + head.slot_stride
    if _SEQ.unpack_from(data, second)[0] > _SEQ.unpack_from(data, first)[0]:
        first, second = second, first
    # The slot that claims the higher sequence first: if it is valid, it is the newest (the
    # other one holds an older save), and the other slot need not be checked at all.
    size = head.slot.size + _CRC.size
    for torn, offset in enumerate((first, second)):
        found = _decode_slot(data, offset, head.slot)
        attempts = REREADS if reread is not None else 0
        while found is None and attempts:
            attempts -= 1
            again = reread(base + offset, size) if reread is not None else b""
            if len(again) == size:
                found = _decode_slot(again, 0, head.slot)
        if found is not None:
            return found, torn
    raise BadFile("both slots fail their checksum")


def _stable_slot(
    data: bytes, base: int, head: V2Header, reread: Callable[[int, int], bytes] | None
) -> tuple[_Slot, int]:
    """:func:`_newest_slot`, and for a live shard whose two slots were both caught mid-write,
    both read again (up to :data:`STABLE_READS` times) instead of giving up.

    A live owner saving in a tight loop can be writing one slot while the other is re-read:
    skipping its shard for this run would make the aggregate go down, and a writer cannot keep
    both slots torn for long (a save completes before the other slot is touched).
    """
    try:
        return _newest_slot(data, base, head, reread)
    except BadFile:
        if reread is None:
            raise
    size = 2 * head.slot_stride
    for _ in range(STABLE_READS):
        again = reread(head.slot_offset, size)
        if len(again) != size:
            break
        try:
            return _newest_slot(again, head.slot_offset, head, None)
        except BadFile:
            continue
    raise BadFile("both slots fail their checksum")


def decode_v2_slots(
    data: bytes,
    base: int,
    head: V2Header,
    layout: Layout,
    *,
    reread: Callable[[int, int], bytes] | None = None,
) -> ShardRecord:
    """The record in a v2 shard's slots: ``data`` holds the file from offset ``base`` on, at
    least both slots (``base`` is 0 for the whole file, ``head.slot_offset`` for the slots
    alone). :class:`BadFile` if it cannot count.

    ``reread(offset, size) -> bytes``, when given (a live shard), is called to read a torn slot
    again, up to :data:`REREADS` times, before the other slot is used.
    """
    if len(data) < head.file_size - base:
        raise BadFile(f"wrong size (its header says {head.file_size} bytes)")
    best, torn = _stable_slot(data, base, head, reread)
    seq, generation, saved_at, start = best[:_SLOT_HEAD_FIELDS]
    n_floats = layout.float_cells if head.float_cells is None else len(head.float_cells)
    sums: tuple[float, ...] = ()
    if n_floats:
        raw: tuple[int, ...] = best[_SLOT_HEAD_FIELDS:-n_floats]
        sums = best[-n_floats:]
    else:
        raw = best[_SLOT_HEAD_FIELDS:]
    if raw and min(raw) < 0:
        raise BadFile("a count is negative")
    # Chained comparisons are False for NaN, so this refuses NaN, infinities and negatives.
    if not (0.0 <= saved_at < math.inf and 0.0 <= start < math.inf):
        raise BadFile("invalid: saved_at and the store start must be finite and non-negative")
    if head.cells is not None:
        mapped = [0] * layout.int_cells
        for cell, value in zip(head.cells, raw, strict=True):
            mapped[cell] = value
        raw = tuple(mapped)
    if head.float_cells is not None:
        mapped_sums = [0.0] * layout.float_cells
        for cell, total in zip(head.float_cells, sums, strict=True):
            mapped_sums[cell] = total
        sums = tuple(mapped_sums)
    if sums:
        _check_sums(layout.schema, raw, sums)
    return ShardRecord(
        2,
        head.incarnation,
        head.pid,
        head.host,
        head.started_at,
        generation,
        saved_at,
        start,
        raw,
        seq,
        torn,
        sums,
    )


def _check_sums(schema: Schema, counts: tuple[int, ...], sums: tuple[float, ...]) -> None:
    """:class:`BadFile` unless every histogram sum is finite, non-negative, and 0 for a series
    without observations (a sum only the writer's own observations could have made)."""
    # Every shard of every aggregation passes here: the common case (a valid sum, observed or
    # zero) is checked inline over spans computed once per schema; anything else takes
    # check_sum, which names the problem.
    for first, end, cell, series in schema.derived("sum_spans", _sum_spans):
        total = sums[cell]
        if 0.0 < total < math.inf and any(counts[first:end]):
            continue
        if total == 0.0:
            continue
        try:
            check_sum(series.key, total, sum(counts[first:end]))
        except SchemaError as exc:
            raise BadFile(f"invalid histogram sum: {exc}"[:300]) from None


def _sum_spans(schema: Schema) -> tuple[tuple[int, int, int, HistogramSeries], ...]:
    """Per histogram series: its first bucket slot, the slot after its last, its sum cell."""
    return tuple(
        (series.first, series.end, series.sum_cell, series) for series in schema.histogram_series()
    )


def decode_v2(
    data: bytes,
    source: Schema | Layout,
    incarnation: str,
    *,
    reread: Callable[[int, int], bytes] | None = None,
) -> ShardRecord:
    """Decode a whole v2 shard file's bytes over a schema (or its layout); :class:`BadFile` if
    it cannot count. ``reread`` as for :func:`decode_v2_slots`."""
    layout = source if isinstance(source, Layout) else layout_for(source)
    head = decode_v2_header(data, layout, incarnation)
    return decode_v2_slots(data, 0, head, layout, reread=reread)


# -- shard format v1 (previous release; read only) ------------------------------------------------

V1_FORMAT = "gatemetrics-shard"
_V1_KEYS = frozenset(
    {
        "format",
        "version",
        "incarnation",
        "pid",
        "host",
        "started_at",
        "generation",
        "saved_at",
        "counts",
    }
)


_T = TypeVar("_T")


def _as_field(name: str, check: Callable[[object], _T], value: object) -> _T:
    """``check(value)``, its :class:`SchemaError` naming ``name`` (the checks name the store's
    own keys, ``store_start_timestamp`` and ``store_generation``)."""
    try:
        return check(value)
    except SchemaError as exc:
        raise SchemaError(name, exc.problem) from None


def decode_v1(data: bytes, schema: Schema, incarnation: str) -> ShardRecord:
    """Decode a v1 JSON shard (written by the previous release); :class:`BadFile` if bad."""
    if not data:
        raise BadFile("empty (0 bytes)")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadFile(f"not valid JSON or not UTF-8 ({exc})") from None
    if not isinstance(doc, dict):
        raise BadFile(f"a JSON {type(doc).__name__}, not an object")
    if set(doc) != _V1_KEYS:
        missing = sorted(_V1_KEYS - set(doc))
        extra = sorted(set(doc) - _V1_KEYS)
        raise BadFile(f"wrong fields (missing {missing}, unexpected {extra[:5]})")
    if doc["format"] != V1_FORMAT or doc["version"] != 1:
        raise BadFile(f"unknown format {doc['format']!r} version {doc['version']!r}"[:200])
    if doc["incarnation"] != incarnation:
        raise BadFile("incarnation inside does not match the file name (a copied shard?)")
    pid, host = doc["pid"], doc["host"]
    if type(pid) is not int or not 0 < pid < 2**32:
        raise BadFile(f"pid must be a positive int, got {pid!r}"[:200])
    if not isinstance(host, str) or len(host) > 255:
        raise BadFile("host must be a string of at most 255 characters")
    try:
        started_at = _as_field("started_at", check_timestamp, doc["started_at"])
        saved_at = _as_field("saved_at", check_timestamp, doc["saved_at"])
        generation = _as_field("generation", check_generation, doc["generation"])
        raw = doc["counts"]
        counts, sums = schema.parse_cells(raw)
        if not isinstance(raw, dict) or "store_generation" not in raw:
            raise SchemaError("counts.store_generation", "missing")
        check_generation(raw["store_generation"])
        start = check_timestamp(raw.get("store_start_timestamp"))
    except SchemaError as exc:
        raise BadFile(f"invalid: {exc}"[:300]) from None
    return ShardRecord(
        1,
        incarnation,
        pid,
        host,
        started_at,
        generation,
        saved_at,
        start,
        tuple(counts),
        sums=tuple(sums),
    )


# -- the archive -----------------------------------------------------------------------------------

ARCHIVE_FORMAT = "gatemetrics-archive"
#: Still 1: a compactor of the previous release may run during an upgrade and reads only this
#: layout (it quarantines an archive with any other field set). Do not add fields here until
#: no such compactor can run; record new facts in a file of their own.
ARCHIVE_VERSION = 1
#: The archive lists absorbed ids only between two writes of one compaction; a crash can leave
#: one batch there, so allow for a big batch.
MAX_ARCHIVE_BYTES = 256 << 20
_ARCHIVE_KEYS = frozenset(
    {
        "format",
        "version",
        "counts",
        "absorbed",
        "absorbed_total",
        "quarantined_total",
        "quarantining",
        "updated_at",
        "first_start",
    }
)


_ARCHIVE_CACHE_BYTES = 64 << 10
_ARCHIVE_CACHE_ENTRIES = 8


@dataclass
class Archive:
    """The totals of absorbed (dead) incarnations, and the bookkeeping of compaction.

    A histogram's totals live inside ``counts`` in the dictionary layout (cumulative buckets,
    count, sum; see :mod:`gatemetrics.schema`): no new field, so an archive without histograms
    is byte for byte the previous release's. The previous release's reader, given an archive
    with a histogram family, finds a family its schema lacks and stops (``SchemaError``,
    nothing moved); it never drops or mis-counts the histogram.
    """

    counts: list[int]
    absorbed: set[str]
    absorbed_total: int = 0
    quarantined_total: int = 0
    quarantining: set[str] = field(default_factory=set)
    updated_at: float | None = None
    first_start: float | None = None
    exists: bool = False
    problem: str | None = None
    #: The float cells (histogram sums). They live inside ``counts``'s histogram entries in
    #: the file, so an archive without histograms is byte for byte what it was before.
    sums: list[float] = field(default_factory=list)

    def encode(self, schema: Schema) -> bytes:
        sums = self.sums if self.sums or not schema.float_size else schema.float_zeros()
        doc: dict[str, Any] = {
            "format": ARCHIVE_FORMAT,
            "version": ARCHIVE_VERSION,
            "counts": schema.counts_to_dict(self.counts, sums),
            "absorbed": sorted(self.absorbed),
            "absorbed_total": self.absorbed_total,
            "quarantined_total": self.quarantined_total,
            "quarantining": sorted(self.quarantining),
            "updated_at": self.updated_at,
            "first_start": self.first_start,
        }
        return orjson.dumps(doc)

    def copy(self) -> Archive:
        return Archive(
            list(self.counts),
            set(self.absorbed),
            self.absorbed_total,
            self.quarantined_total,
            set(self.quarantining),
            self.updated_at,
            self.first_start,
            self.exists,
            self.problem,
            list(self.sums),
        )

    @classmethod
    def decode(cls, data: bytes, schema: Schema) -> Archive:
        """Decode an archive's bytes.

        :class:`BadFile` when it is not an archive at all (broken: quarantined, its totals
        lost); :class:`SchemaError` when it is a well-formed archive that does not fit
        ``schema`` (most likely the wrong schema was given: stop rather than drop history).
        """
        # The archive changes only when a compaction writes it, and a process that serves
        # scrapes reads the same one every time: decode each version once (a small one: the
        # bytes are the key).
        if len(data) > _ARCHIVE_CACHE_BYTES:
            return cls._decode(data, schema)
        key = (schema, data)
        hit = _ARCHIVES.get(key)
        if hit is None:
            hit = cls._decode(data, schema)
            if len(_ARCHIVES) >= _ARCHIVE_CACHE_ENTRIES:
                _ARCHIVES.clear()
            _ARCHIVES[key] = hit
        return hit.copy()

    @classmethod
    def _decode(cls, data: bytes, schema: Schema) -> Archive:
        doc = _versioned_document(data, _ARCHIVE_KEYS, ARCHIVE_FORMAT, ARCHIVE_VERSION, "archive")
        try:
            counts, sums = schema.parse_cells(doc["counts"])
            absorbed = doc["absorbed"]
            quarantining = doc["quarantining"]
            if not isinstance(absorbed, list) or not all(valid_incarnation(a) for a in absorbed):
                raise SchemaError("absorbed", "must be a list of incarnation ids")
            if not isinstance(quarantining, list) or not all(
                isinstance(q, str) and q.startswith(OWNED_PREFIXES) and "/" not in q
                for q in quarantining
            ):
                raise SchemaError("quarantining", "must be a list of shard file names")
            absorbed_total = check_generation(doc["absorbed_total"])
            quarantined_total = check_generation(doc["quarantined_total"])
            updated_at = None if doc["updated_at"] is None else check_timestamp(doc["updated_at"])
            first = None if doc["first_start"] is None else check_timestamp(doc["first_start"])
        except SchemaError as exc:
            raise SchemaError(
                f"{ARCHIVE_NAME}.{exc.field}",
                f"{exc.problem} (is this directory written with another schema?)",
            ) from None
        return cls(
            counts,
            set(absorbed),
            absorbed_total,
            quarantined_total,
            set(quarantining),
            updated_at,
            first,
            exists=True,
            sums=sums,
        )


_ARCHIVES: dict[tuple[Schema, bytes], Archive] = {}
