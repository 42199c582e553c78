"""Counter and histogram families with fixed label values, and the schema that lays them out.

Cardinality is bounded by construction: a family declares every label value it will ever carry,
and nothing (no API call, no file on disk) can add another. A :class:`Schema` gives every
``(family, label value)`` pair a fixed *slot* in a flat list of integers; stores, shards and the
aggregator all work on those flat lists, and the exposition renders them in schema order.

The dictionary layout (``to_dict``/``from_dict``, and the payload of a shard) is::

    {<family key>: {<label value>: n, ...},   # a labelled family
     <family key>: n,                          # a family without a label
     "store_generation": n, "store_start_timestamp": seconds}

A histogram's series (one per label value, or one without a label) is, in that layout::

    {"buckets": {"0.001": n, ..., "+Inf": n}, "count": n, "sum": x}

with cumulative bucket counts keyed by their upper bound as the exposition renders it
(``repr(float)``; ``"+Inf"`` last), ``count`` equal to the ``+Inf`` bucket, and ``sum`` a finite,
non-negative float. In the flat slot list a histogram series takes one *integer* slot per
bucket, ``+Inf`` included, holding the *non-cumulative* count of that bucket (an observation
adds one to one slot), and one *float* cell, its sum; :attr:`Schema.float_size` counts the
float cells, which live in a list of their own (``Snapshot.sums``).
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
    "MAX_BUCKETS",
    "MAX_COUNT",
    "START_TIMESTAMP_KEY",
    "CountsDict",
    "Family",
    "HistogramSeries",
    "Kind",
    "Schema",
    "check_generation",
    "check_sum",
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

#: Most buckets a histogram family may declare (``+Inf`` not included): every bucket is a
#: series of its own in every scrape.
MAX_BUCKETS = 64
#: Name endings a histogram's name must not have: the exposition appends ``_bucket``, ``_sum``
#: and ``_count`` to it, and ``_total``/``_created`` are what a counter's samples end in.
_HISTOGRAM_RESERVED_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")

#: What a family is: a ``counter`` (only goes up), a ``gauge`` (only the aggregator's own
#: pipeline families: see :class:`~gatemetrics.CounterStore`) or a ``histogram``.
Kind: TypeAlias = Literal["counter", "gauge", "histogram"]
#: The dictionary layout's type (see the module documentation).
CountsDict: TypeAlias = dict[str, Any]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: a name, its HELP text and, optionally, one label with fixed values.

    ``key`` is the family's name in the dictionary layout (``"decision_counts"``). The order of
    ``values`` is the order of the series in the exposition.

    A ``histogram`` declares ``buckets``: its finite upper bounds, strictly increasing, at most
    :data:`MAX_BUCKETS` (``+Inf`` is implicit and always last). Its name must not end in
    ``_total``, ``_bucket``, ``_sum``, ``_count`` or ``_created`` (the exposition appends
    ``_bucket``, ``_sum`` and ``_count``). An observation counts in the first bucket whose
    bound is ``>=`` the value, as in prometheus_client.
    """

    name: str
    documentation: str
    key: str
    label: str | None = None
    values: tuple[str, ...] = ()
    kind: Kind = "counter"
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        where = f"family {self.name!r}"
        if not isinstance(self.name, str) or not _METRIC_NAME.match(self.name):
            raise SchemaError(where, "metric name must match [a-zA-Z_:][a-zA-Z0-9_:]*")
        self._check_kind(where)
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
        if self.kind == "histogram" and self.label == "le":
            raise SchemaError(where, "a histogram's label must not be 'le' (its buckets' label)")
        values = tuple(self.values)
        object.__setattr__(self, "values", values)
        if not values:
            raise SchemaError(where, "a labelled family needs at least one label value")
        if any(not isinstance(v, str) or not v for v in values):
            raise SchemaError(where, "label values must be non-empty strings")
        if len(set(values)) != len(values):
            raise SchemaError(where, "label values must be unique")

    def _check_kind(self, where: str) -> None:
        """The kind, and what it asks of the name and the buckets."""
        if self.kind not in ("counter", "gauge", "histogram"):
            raise SchemaError(
                where, f"kind must be 'counter', 'gauge' or 'histogram', not {self.kind!r}"
            )
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise SchemaError(where, "a counter's name must end in _total")
        if self.kind == "histogram":
            object.__setattr__(self, "buckets", _check_buckets(where, self.buckets))
            if self.name.endswith(_HISTOGRAM_RESERVED_SUFFIXES):
                raise SchemaError(
                    where,
                    "kind 'histogram': the name must not end in _total, _bucket, _sum, _count "
                    "or _created (its samples append _bucket, _sum and _count)",
                )
        elif self.buckets != ():
            raise SchemaError(where, "only a histogram declares buckets")

    @property
    def series(self) -> int:
        """How many series (label value combinations) the family has."""
        return len(self.values) if self.label is not None else 1

    @property
    def width(self) -> int:
        """How many integer slots the family takes: one per series, or for a histogram one per
        bucket (``+Inf`` included) per series."""
        if self.kind == "histogram":
            return self.series * (len(self.buckets) + 1)
        return self.series

    @property
    def float_width(self) -> int:
        """How many float cells the family takes: a histogram's sum per series, else none."""
        return self.series if self.kind == "histogram" else 0

    @property
    def bucket_labels(self) -> tuple[str, ...]:
        """A histogram's ``le`` values as rendered (``repr(float)``, then ``"+Inf"``), the way
        prometheus_client renders them; ``()`` for any other kind."""
        if self.kind != "histogram":
            return ()
        return (*(repr(b) for b in self.buckets), "+Inf")

    @property
    def series_labels(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        """Per series, in slot order, its ``(label name, label value)`` pairs (``()`` for a
        family without a label). Every renderer and bridge names a series through this."""
        if self.label is None:
            return ((),)
        return tuple(((self.label, v),) for v in self.values)


def _check_buckets(where: str, buckets: object) -> tuple[float, ...]:
    """A histogram's bounds as a tuple of floats; :class:`SchemaError` unless they are finite
    numbers (not ``bool``), strictly increasing, between 1 and :data:`MAX_BUCKETS` of them."""
    if isinstance(buckets, str | bytes) or not isinstance(buckets, Iterable):
        raise SchemaError(where, "buckets must be a sequence of numbers")
    bounds = tuple(buckets)
    if not bounds:
        raise SchemaError(where, "kind 'histogram' needs at least one finite bucket bound")
    if len(bounds) > MAX_BUCKETS:
        raise SchemaError(where, f"at most {MAX_BUCKETS} buckets, got {len(bounds)}")
    out: list[float] = []
    for b in bounds:
        if type(b) not in (int, float):
            raise SchemaError(where, f"a bucket bound must be a number, got {_tname(b)}")
        bound = float(b)
        if not math.isfinite(bound):
            raise SchemaError(
                where, f"bucket bounds must be finite (+Inf is implicit), got {bound!r}"
            )
        if out and bound <= out[-1]:
            raise SchemaError(where, "bucket bounds must be strictly increasing")
        out.append(bound)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class HistogramSeries:
    """Where one histogram series lives: its first bucket slot, its sum's float cell, and the
    family's bounds (``len(bounds) + 1`` bucket slots, ``+Inf`` last)."""

    first: int
    sum_cell: int
    bounds: tuple[float, ...]
    key: str


@dataclass(frozen=True)
class Schema:
    """An ordered set of families and the flat slot layout derived from it. Immutable."""

    families: tuple[Family, ...]
    _offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    _slots: dict[tuple[str, str | None], int] = field(init=False, repr=False, compare=False)
    _histograms: dict[tuple[str, str | None], HistogramSeries] = field(
        init=False, repr=False, compare=False
    )
    _by_key: dict[str, Family] = field(init=False, repr=False, compare=False)
    _size: int = field(init=False, repr=False, compare=False)
    _float_size: int = field(init=False, repr=False, compare=False)
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
        histograms: dict[tuple[str, str | None], HistogramSeries] = {}
        i = 0
        f = 0
        for fam in fams:
            offsets[fam.key] = i
            values: tuple[str | None, ...] = fam.values if fam.label is not None else (None,)
            if fam.kind == "histogram":
                for value in values:
                    histograms[(fam.key, value)] = HistogramSeries(i, f, fam.buckets, fam.key)
                    i += len(fam.buckets) + 1
                    f += 1
                continue
            for value in values:
                slots[(fam.key, value)] = i
                i += 1
        object.__setattr__(self, "families", fams)
        object.__setattr__(self, "_offsets", offsets)
        object.__setattr__(self, "_slots", slots)
        object.__setattr__(self, "_histograms", histograms)
        object.__setattr__(self, "_by_key", {f.key: f for f in fams})
        object.__setattr__(self, "_size", i)
        object.__setattr__(self, "_float_size", f)
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_hash", hash(fams))

    def __hash__(self) -> int:
        # Computed once: schemas key the caches of every reader, and hashing the nested
        # families again on each lookup cost more than decoding a shard.
        return self._hash

    @property
    def size(self) -> int:
        """Total number of integer slots in the schema (one per counter series, one per bucket
        of each histogram series)."""
        return self._size

    @property
    def float_size(self) -> int:
        """Total number of float cells (one sum per histogram series; 0 without histograms)."""
        return self._float_size

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
            if fam.kind == "histogram":
                raise SchemaError(key, "a histogram family is recorded with observe()") from None
            if fam.label is None:
                raise SchemaError(key, "family has no label") from None
            raise SchemaError(f"{key}.{value}", "unknown label value") from None

    def histogram(self, key: str, value: str | None = None) -> HistogramSeries:
        """Where one histogram series lives; :class:`SchemaError` for anything else."""
        try:
            return self._histograms[(key, value)]
        except (KeyError, TypeError):
            fam = self.family(key)
            if fam.kind != "histogram":
                raise SchemaError(key, f"a {fam.kind}, not a histogram") from None
            if fam.label is None:
                raise SchemaError(key, "family has no label") from None
            raise SchemaError(f"{key}.{value}", "unknown label value") from None

    def histogram_series(self) -> tuple[HistogramSeries, ...]:
        """Every histogram series in slot order (its float cell order too)."""
        return tuple(self._histograms.values())

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

    def float_zeros(self) -> list[float]:
        """A fresh, all-zero list of float cells."""
        return [0.0] * self._float_size

    # -- dictionary layout -------------------------------------------------------------------

    def counts_to_dict(self, counts: Iterable[int], sums: Iterable[float] = ()) -> CountsDict:
        """Turn a slot list (and the float cells, for a schema with histograms) into the
        dictionary layout (families only, no metadata)."""
        values = list(counts)
        floats = list(sums)
        if len(values) != self.size:
            raise SchemaError("", f"expected {self.size} counts, got {len(values)}")
        if len(floats) != self._float_size:
            raise SchemaError("", f"expected {self._float_size} sums, got {len(floats)}")
        out: CountsDict = {}
        i = 0
        f = 0
        for fam in self.families:
            if fam.kind == "histogram":
                n = len(fam.buckets) + 1
                series: list[dict[str, Any]] = []
                for _ in range(fam.series):
                    series.append(_histogram_dict(fam, values[i : i + n], floats[f]))
                    i += n
                    f += 1
                if fam.label is None:
                    out[fam.key] = series[0]
                else:
                    out[fam.key] = dict(zip(fam.values, series, strict=True))
            elif fam.label is None:
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

        Only the integer slots: a caller that keeps a histogram's sums uses :meth:`parse_cells`.
        """
        return self.parse_cells(data, allow_extra=allow_extra)[0]

    def parse_cells(
        self, data: object, *, allow_extra: Iterable[str] = ()
    ) -> tuple[list[int], list[float]]:
        """:meth:`parse_counts`, and the float cells (histogram sums) as well.

        A histogram series must have exactly the layout the module documents: its bounds as
        the schema declares them, cumulative counts that never go down, ``count`` equal to the
        ``+Inf`` bucket, and a finite, non-negative sum that is 0 when nothing was observed.
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
        sums = self.float_zeros()
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
            if type(slots) is HistogramSeries:
                _parse_histogram(key, value, slots, counts, sums)
                continue
            if isinstance(slots, tuple):  # a labelled histogram: value -> its series
                _parse_labelled_histograms(key, value, slots[0], counts, sums)
                continue
            _parse_labelled(key, value, slots, counts)
        return counts, sums

    def _value_slots(self) -> dict[str, Any]:
        """Per family key: its slot (no label) or a dict of label value to slot. Cached."""
        return self.derived("value_slots", _value_slots)


def _value_slots(schema: Schema) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for fam in schema.families:
        if fam.kind == "histogram":
            if fam.label is None:
                table[fam.key] = schema.histogram(fam.key)
            else:  # in a 1-tuple, so that the parser tells it from a counter's value table
                table[fam.key] = ({v: schema.histogram(fam.key, v) for v in fam.values},)
        elif fam.label is None:
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


_HISTOGRAM_KEYS = frozenset({"buckets", "count", "sum"})


def _histogram_dict(fam: Family, buckets: list[int], total: float) -> dict[str, Any]:
    """One histogram series in the dictionary layout (cumulative buckets)."""
    cumulative: dict[str, int] = {}
    running = 0
    for le, n in zip(fam.bucket_labels, buckets, strict=True):
        running += n
        cumulative[le] = running
    return {"buckets": cumulative, "count": running, "sum": total}


def _parse_labelled_histograms(
    key: str,
    value: object,
    series: dict[str, HistogramSeries],
    counts: list[int],
    sums: list[float],
) -> None:
    if not isinstance(value, Mapping):
        raise SchemaError(key, f"expected a mapping of label values, got {_tname(value)}")
    for label_value, one in value.items():
        found = series.get(label_value) if isinstance(label_value, str) else None
        if found is None:
            if not isinstance(label_value, str):
                raise SchemaError(f"{key}.{label_value!r}", "label values must be strings")
            raise SchemaError(f"{key}.{label_value}", "unknown label value")
        _parse_histogram(f"{key}.{label_value}", one, found, counts, sums)


def _parse_histogram(
    where: str, value: object, series: HistogramSeries, counts: list[int], sums: list[float]
) -> None:
    """Validate one histogram series' mapping (see the module documentation) into ``counts``
    (non-cumulative, one slot per bucket) and ``sums``."""
    if not isinstance(value, Mapping) or set(value) != _HISTOGRAM_KEYS:
        raise SchemaError(where, "a histogram series must be {buckets, count, sum}")
    buckets = value["buckets"]
    les = (*(repr(b) for b in series.bounds), "+Inf")
    if not isinstance(buckets, Mapping) or set(buckets) != set(les):
        raise SchemaError(f"{where}.buckets", "must have exactly the declared bounds and +Inf")
    previous = 0
    for i, le in enumerate(les):
        n = _check_count(f"{where}.buckets.{le}", buckets[le])
        if n < previous:
            raise SchemaError(f"{where}.buckets.{le}", "cumulative bucket counts went down")
        counts[series.first + i] = n - previous
        previous = n
    if _check_count(f"{where}.count", value["count"]) != previous:
        raise SchemaError(f"{where}.count", "does not equal the +Inf bucket")
    sums[series.sum_cell] = check_sum(f"{where}.sum", value["sum"], previous)


def check_sum(where: str, value: object, count: int) -> float:
    """Validate a histogram sum: a finite, non-negative number (not ``bool``), and 0 when
    ``count`` (the series' observations) is 0."""
    if type(value) not in (int, float):
        raise SchemaError(where, f"a sum must be a number, got {_tname(value)}")
    total = float(value)  # type: ignore[arg-type]
    # A chained comparison is False for NaN: this refuses NaN, infinities and negatives.
    if not 0.0 <= total < math.inf:
        raise SchemaError(where, f"a sum must be finite and non-negative, got {total!r}")
    if count == 0 and total != 0.0:
        raise SchemaError(where, "a sum without observations")
    return total


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
