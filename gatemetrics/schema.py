"""Counter families with a fixed set of label values, and the schema that lays them out.

Cardinality is bounded by construction: a family declares every label value it will ever carry,
and nothing (no API call, no file on disk) can add another. A :class:`Schema` gives every
``(family, label value)`` pair a fixed *slot* in a flat list of integers; stores, shards and the
aggregator all work on those flat lists, and the exposition renders them in schema order.

The dictionary layout (``to_dict``/``from_dict``, and the payload of a shard) is::

    {<family key>: {<label value>: n, ...},   # a labelled family
     <family key>: n,                          # a family without a label
     "store_generation": n, "store_start_timestamp": seconds}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

from gatemetrics.errors import SchemaError

__all__ = [
    "GENERATION_KEY",
    "MAX_COUNT",
    "START_TIMESTAMP_KEY",
    "CountsDict",
    "Family",
    "Kind",
    "Schema",
    "check_generation",
    "check_timestamp",
]

#: Largest count a store or file may hold: JSON writers and readers (orjson) stop at 64-bit ints.
MAX_COUNT = 2**63 - 1
GENERATION_KEY = "store_generation"
START_TIMESTAMP_KEY = "store_start_timestamp"
_METADATA_KEYS = frozenset({GENERATION_KEY, START_TIMESTAMP_KEY})

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_KEY = re.compile(r"[a-z_][a-z0-9_]*\Z")

#: What a family is: a ``counter`` (only goes up) or a ``gauge``.
Kind: TypeAlias = Literal["counter", "gauge"]
#: The dictionary layout's type (see the module documentation).
CountsDict: TypeAlias = dict[str, Any]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: a name, its HELP text and, optionally, one label with fixed values.

    ``key`` is the family's name in the dictionary layout (``"decision_counts"``). The order of
    ``values`` is the order of the series in the exposition.
    """

    name: str
    documentation: str
    key: str
    label: str | None = None
    values: tuple[str, ...] = ()
    kind: Kind = "counter"

    def __post_init__(self) -> None:
        where = f"family {self.name!r}"
        if not isinstance(self.name, str) or not _METRIC_NAME.match(self.name):
            raise SchemaError(where, "metric name must match [a-zA-Z_:][a-zA-Z0-9_:]*")
        if self.kind not in ("counter", "gauge"):
            raise SchemaError(where, f"kind must be 'counter' or 'gauge', not {self.kind!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise SchemaError(where, "a counter's name must end in _total")
        if not isinstance(self.documentation, str) or not self.documentation.strip():
            raise SchemaError(where, "documentation (HELP) must be a non-empty string")
        if not isinstance(self.key, str) or not _KEY.match(self.key):
            raise SchemaError(where, "key must be a lower-case identifier")
        if self.key in _METADATA_KEYS:
            raise SchemaError(where, f"key {self.key!r} is reserved for store metadata")
        if self.label is None:
            if self.values:
                raise SchemaError(where, "values given without a label name")
            return
        if not _LABEL_NAME.match(self.label) or self.label.startswith("__"):
            raise SchemaError(where, f"invalid label name {self.label!r}")
        values = tuple(self.values)
        object.__setattr__(self, "values", values)
        if not values:
            raise SchemaError(where, "a labelled family needs at least one label value")
        if any(not isinstance(v, str) or not v for v in values):
            raise SchemaError(where, "label values must be non-empty strings")
        if len(set(values)) != len(values):
            raise SchemaError(where, "label values must be unique")

    @property
    def width(self) -> int:
        """How many series (slots) the family has."""
        return len(self.values) if self.label is not None else 1

    @property
    def series_labels(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        """Per series, in slot order, its ``(label name, label value)`` pairs (``()`` for a
        family without a label). Every renderer and bridge names a series through this."""
        if self.label is None:
            return ((),)
        return tuple(((self.label, v),) for v in self.values)


@dataclass(frozen=True)
class Schema:
    """An ordered set of families and the flat slot layout derived from it. Immutable."""

    families: tuple[Family, ...]
    _offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    _slots: dict[tuple[str, str | None], int] = field(init=False, repr=False, compare=False)
    _by_key: dict[str, Family] = field(init=False, repr=False, compare=False)
    # Derived data computed once per schema; see derived().
    _cache: dict[str, Any] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __init__(self, families: Iterable[Family]) -> None:
        fams = tuple(families)
        if not fams:
            raise SchemaError("", "a schema needs at least one family")
        for fam in fams:
            if not isinstance(fam, Family):
                raise SchemaError("", f"not a Family: {fam!r}")
        names = [f.name for f in fams]
        keys = [f.key for f in fams]
        if len(set(names)) != len(names):
            raise SchemaError("", "family names must be unique")
        if len(set(keys)) != len(keys):
            raise SchemaError("", "family keys must be unique")
        offsets: dict[str, int] = {}
        slots: dict[tuple[str, str | None], int] = {}
        i = 0
        for fam in fams:
            offsets[fam.key] = i
            if fam.label is None:
                slots[(fam.key, None)] = i
                i += 1
            else:
                for value in fam.values:
                    slots[(fam.key, value)] = i
                    i += 1
        object.__setattr__(self, "families", fams)
        object.__setattr__(self, "_offsets", offsets)
        object.__setattr__(self, "_slots", slots)
        object.__setattr__(self, "_by_key", {f.key: f for f in fams})
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_hash", hash(fams))

    def __hash__(self) -> int:
        # Computed once: schemas key the caches of every reader, and hashing the nested
        # families again on each lookup cost more than decoding a shard.
        return self._hash

    @property
    def size(self) -> int:
        """Total number of slots (series) in the schema."""
        return len(self._slots)

    def family(self, key: str) -> Family:
        """The family with dictionary key ``key``; :class:`SchemaError` if there is none."""
        try:
            return self._by_key[key]
        except KeyError:
            raise SchemaError(key, "unknown family") from None

    def slot(self, key: str, value: str | None = None) -> int:
        """The slot index of one series; :class:`SchemaError` for anything outside the schema."""
        try:
            return self._slots[(key, value)]
        except (KeyError, TypeError):
            fam = self.family(key)
            if fam.label is None:
                raise SchemaError(key, "family has no label") from None
            raise SchemaError(f"{key}.{value}", "unknown label value") from None

    def offset(self, key: str) -> int:
        """The first slot of family ``key``."""
        self.family(key)
        return self._offsets[key]

    def extend(self, families: Iterable[Family]) -> Schema:
        """A new schema with ``families`` appended (slots of existing families do not move)."""
        return Schema((*self.families, *families))

    def derived(self, name: str, compute: Callable[[Schema], _T]) -> _T:
        """``compute(self)``, computed once per schema and ``name`` and kept for its life.

        For data other modules derive from a schema and need on every call (the exposition's
        line templates, the parser's slot table). A schema is immutable, so the result never
        goes stale; two threads racing on the first call may both compute it, and one result
        wins (``compute`` must be pure).
        """
        try:
            return self._cache[name]  # type: ignore[no-any-return]
        except KeyError:
            return self._cache.setdefault(name, compute(self))  # type: ignore[no-any-return]

    def zeros(self) -> list[int]:
        """A fresh, all-zero slot list."""
        return [0] * self.size

    # -- dictionary layout -------------------------------------------------------------------

    def counts_to_dict(self, counts: Iterable[int]) -> CountsDict:
        """Turn a slot list into the dictionary layout (families only, no metadata)."""
        values = list(counts)
        if len(values) != self.size:
            raise SchemaError("", f"expected {self.size} counts, got {len(values)}")
        out: CountsDict = {}
        i = 0
        for fam in self.families:
            if fam.label is None:
                out[fam.key] = values[i]
                i += 1
            else:
                out[fam.key] = dict(zip(fam.values, values[i : i + fam.width], strict=True))
                i += fam.width
        return out

    def parse_counts(self, data: object, *, allow_extra: Iterable[str] = ()) -> list[int]:
        """Validate the family part of a dictionary layout and return its slot list.

        Strict on everything that could corrupt an aggregate or the label set: the document must
        be a mapping with string keys; a family key or label value outside the schema, a count
        that is not an ``int`` (``bool`` and ``float`` included), negative or above
        :data:`MAX_COUNT` raises :class:`SchemaError` naming the field. A family or label value
        that is *missing* counts as zero, so a shard written by an older schema with fewer label
        values still reads. Keys in ``allow_extra`` (and the metadata keys) are ignored here.
        """
        if not isinstance(data, Mapping):
            raise SchemaError("", f"expected a mapping, got {type(data).__name__}")
        extra = frozenset(allow_extra)
        extra = extra | _METADATA_KEYS if extra else _METADATA_KEYS
        # The aggregator parses every shard on every read: the common case (exact ``str`` keys,
        # ``int`` counts in range) is checked inline; anything else takes the slow path below,
        # which raises the precise error.
        value_slots = self._value_slots()
        counts = self.zeros()
        for key, value in data.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise SchemaError(repr(key), "keys must be strings")
                key = str.__str__(key)  # noqa: PLW2901 - a str subclass counts by its value
            if key in extra:
                continue
            slots = value_slots.get(key)
            if slots is None:
                raise SchemaError(key, "unknown family")
            if type(slots) is int:  # a family without a label: one slot
                if type(value) is int and 0 <= value <= MAX_COUNT:
                    counts[slots] = value
                else:
                    counts[slots] = _check_count(key, value)
                continue
            _parse_labelled(key, value, slots, counts)
        return counts

    def _value_slots(self) -> dict[str, Any]:
        """Per family key: its slot (no label) or a dict of label value to slot. Cached."""
        return self.derived("value_slots", _value_slots)


def _value_slots(schema: Schema) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for fam in schema.families:
        if fam.label is None:
            table[fam.key] = schema.slot(fam.key)
        else:
            table[fam.key] = {v: schema.slot(fam.key, v) for v in fam.values}
    return table


def _parse_labelled(key: str, value: object, slots: dict[str, int], counts: list[int]) -> None:
    """Validate one labelled family's mapping into ``counts`` (see :meth:`Schema.parse_counts`)."""
    if not isinstance(value, Mapping):
        raise SchemaError(key, f"expected a mapping of label values, got {_tname(value)}")
    for label_value, n in value.items():
        idx = slots.get(label_value) if type(label_value) is str else None
        if idx is None:
            if not isinstance(label_value, str):
                raise SchemaError(f"{key}.{label_value!r}", "label values must be strings")
            idx = slots.get(str.__str__(label_value))
            if idx is None:
                raise SchemaError(f"{key}.{label_value}", "unknown label value")
        if type(n) is int and 0 <= n <= MAX_COUNT:
            counts[idx] = n
        else:
            counts[idx] = _check_count(f"{key}.{label_value}", n)


def _tname(value: object) -> str:
    return type(value).__name__


def _check_count(where: str, value: object) -> int:
    # bool is an int subclass; True as a count is a type error, not 1.
    if type(value) is not int:
        raise SchemaError(where, f"count must be an integer, got {_tname(value)}")
    if value < 0:
        raise SchemaError(where, f"count must not be negative, got {value}")
    if value > MAX_COUNT:
        raise SchemaError(where, f"count exceeds 2**63-1, got {value}")
    return value


def check_generation(value: object) -> int:
    """Validate ``store_generation``: an ``int`` in ``[0, MAX_COUNT]``."""
    return _check_count(GENERATION_KEY, value)


def check_timestamp(value: object) -> float:
    """Validate ``store_start_timestamp``: a finite, non-negative number of seconds."""
    if type(value) not in (int, float):
        raise SchemaError(START_TIMESTAMP_KEY, f"must be a number, got {_tname(value)}")
    ts = float(value)  # type: ignore[arg-type]
    if not math.isfinite(ts) or ts < 0:
        raise SchemaError(START_TIMESTAMP_KEY, f"must be finite and non-negative, got {value!r}")
    return ts
