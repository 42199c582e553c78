"""Counter and histogram families with fixed label values, and the schema that lays them out.

Cardinality is bounded by construction: a family declares every label value it will ever carry,
and nothing (no API call, no file on disk) can add another. A family has no label, one label
(``label=``, ``values=``) or several (``labels=``, a tuple of ``(name, values)`` pairs); its
series are the cross product of its labels' values, at most :data:`MAX_FAMILY_SERIES`. A
:class:`Schema` gives every series a fixed *slot* in a flat list of integers; stores, shards and
the aggregator all work on those flat lists, and the exposition renders them in schema order.

The dictionary layout (``to_dict``/``from_dict``, and the payload of a shard) is::

    {<family key>: {<label value>: n, ...},   # a family with one label
     <family key>: {<value of label 1>: {<value of label 2>: n, ...}, ...},  # several labels
     <family key>: n,                          # a family without a label
     "store_generation": n, "store_start_timestamp": seconds}

(one level of nesting per label, in declared label order).

A histogram's series (one per label value combination, or one without a label) is, in that
layout, at the place a counter's count would be::

    {"buckets": {"0.001": n, ..., "+Inf": n}, "count": n, "sum": x}

with cumulative bucket counts keyed by their upper bound as the exposition renders it
(``repr(float)``; ``"+Inf"`` last), ``count`` equal to the ``+Inf`` bucket, and ``sum`` a finite,
non-negative float. In the flat slot list a histogram series takes one *integer* slot per
bucket, ``+Inf`` included, holding the *non-cumulative* count of that bucket (an observation
adds one to one slot), and one *float* cell, its sum; :attr:`Schema.float_size` counts the
float cells, which live in a list of their own (``Snapshot.sums``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

from gatemetrics.errors import SchemaError

__all__ = [
    "GENERATION_KEY",
    "MAX_BUCKETS",
    "MAX_COUNT",
    "MAX_FAMILY_LABELS",
    "MAX_FAMILY_SERIES",
    "START_TIMESTAMP_KEY",
    "CountsDict",
    "Family",
    "HistogramSeries",
    "Kind",
    "LabelValues",
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

#: Most series a family with several labels may declare (the cross product of its labels'
#: values): as many as a schema recorded in a file may hold
#: (``gatemetrics._format.MAX_RECORDED_SERIES``), so such a family, once declared, can also be
#: saved and read back. (A family with one label keeps its old rule: no bound of its own.)
MAX_FAMILY_SERIES = 4096
#: Most labels one family may declare.
MAX_FAMILY_LABELS = 16

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
#: How a caller names one series of a family: ``None`` (no label), the value (one label), the
#: values in declared label order (several labels), or a mapping of label name to value.
LabelValues: TypeAlias = str | tuple[str, ...] | Mapping[str, str] | None
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: a name, its HELP text and its labels, each with fixed values.

    ``key`` is the family's name in the dictionary layout (``"decision_counts"``). A family has
    no label, one label (``label="route", values=("create", "read")``) or several
    (``labels=(("route", ("create", "read")), ("code", ("2xx", "5xx")))``; a mapping of name to
    values is accepted too). Its series are the cross product of its labels' values, in declared
    label order with values in declared order and the last label varying fastest; that is the
    order of the series in the exposition. A family declared through ``labels=`` with one pair
    *is* the ``label=``/``values=`` family (equal, same fields), so the two spellings never
    differ on disk.

    After construction a family with one label holds it in ``label``/``values`` (and ``labels``
    is empty), a family with several holds them in ``labels`` (and ``label`` is ``None``):
    :attr:`label_pairs` and :attr:`label_names` describe either, and are what generic code
    reads (``label is None`` does not mean "no label" any more).

    A ``histogram`` declares ``buckets``: its finite upper bounds, strictly increasing, at most
    :data:`MAX_BUCKETS` (``+Inf`` is implicit and always last). Its name must not end in
    ``_total``, ``_bucket``, ``_sum``, ``_count`` or ``_created`` (the exposition appends
    ``_bucket``, ``_sum`` and ``_count``), and no label of it may be ``le``. An observation
    counts in the first bucket whose bound is ``>=`` the value, as in prometheus_client.
    """

    name: str
    documentation: str
    key: str
    label: str | None = None
    values: tuple[str, ...] = ()
    kind: Kind = "counter"
    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()
    buckets: tuple[float, ...] = ()
    # Every label's (name, values), however declared, and the number of series: computed once
    # (the exposition and the slot tables ask on every use).
    _pairs: tuple[tuple[str, tuple[str, ...]], ...] = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _width: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"family {self.name!r}"
        if not isinstance(self.name, str) or not _METRIC_NAME.match(self.name):
            raise SchemaError(where, "metric name must match [a-zA-Z_:][a-zA-Z0-9_:]*")
        if self.kind not in ("counter", "gauge", "histogram"):
            raise SchemaError(
                where, f"kind must be 'counter', 'gauge' or 'histogram', not {self.kind!r}"
            )
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise SchemaError(where, "a counter's name must end in _total")
        if not isinstance(self.documentation, str) or not self.documentation.strip():
            raise SchemaError(where, "documentation (HELP) must be a non-empty string")
        if not isinstance(self.key, str) or not _KEY.match(self.key):
            raise SchemaError(where, "key must be a lower-case identifier")
        if self.key in _METADATA_KEYS:
            raise SchemaError(where, f"key {self.key!r} is reserved for store metadata")
        pairs = _declared_labels(where, self.label, self.values, self.labels)
        if len(pairs) == 1:
            # One label is always held as label/values (so dataclasses.replace(values=...)
            # keeps working and both spellings are the same family).
            object.__setattr__(self, "label", pairs[0][0])
            object.__setattr__(self, "values", pairs[0][1])
            object.__setattr__(self, "labels", ())
        else:
            object.__setattr__(self, "labels", pairs)
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "_names", tuple(n for n, _ in pairs))
        width = 1
        for _, values in pairs:
            width *= len(values)
        object.__setattr__(self, "_width", width)
        self._check_histogram(where)

    def _check_histogram(self, where: str) -> None:
        """What the kind asks of the name, the labels and the buckets."""
        if self.kind != "histogram":
            if self.buckets != ():
                raise SchemaError(where, "only a histogram declares buckets")
            return
        object.__setattr__(self, "buckets", _check_buckets(where, self.buckets))
        if self.name.endswith(_HISTOGRAM_RESERVED_SUFFIXES):
            raise SchemaError(
                where,
                "kind 'histogram': the name must not end in _total, _bucket, _sum, _count "
                "or _created (its samples append _bucket, _sum and _count)",
            )
        if "le" in self._names:
            raise SchemaError(where, "a histogram's label must not be 'le' (its buckets' label)")
        cells = self._width * (len(self.buckets) + 1)
        if cells > MAX_FAMILY_SERIES:
            raise SchemaError(
                where,
                f"{cells} bucket series (series times buckets and +Inf) exceed {MAX_FAMILY_SERIES}",
            )

    @property
    def label_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Every label's ``(name, values)`` in declared order, one label or several (``()``
        for a family without a label)."""
        return self._pairs

    @property
    def label_names(self) -> tuple[str, ...]:
        """The family's label names in declared order (``()`` for a family without a label)."""
        return self._names

    @property
    def series(self) -> int:
        """How many series (label value combinations) the family has."""
        return self._width

    @property
    def width(self) -> int:
        """How many integer slots the family takes: one per series, or for a histogram one per
        bucket (``+Inf`` included) per series."""
        if self.kind == "histogram":
            return self._width * (len(self.buckets) + 1)
        return self._width

    @property
    def float_width(self) -> int:
        """How many float cells the family takes: a histogram's sum per series, else none."""
        return self._width if self.kind == "histogram" else 0

    @property
    def bucket_labels(self) -> tuple[str, ...]:
        """A histogram's bucket keys in the dictionary layout and JSON (``repr(float)``, then
        ``"+Inf"``); ``()`` for any other kind. The expositions' ``le`` values are
        :func:`gatemetrics.exposition.le_labels`, the same up to a million (then ``2.5e+06``
        there, ``2500000.0`` here)."""
        if self.kind != "histogram":
            return ()
        return (*(repr(b) for b in self.buckets), "+Inf")

    @property
    def series_values(self) -> tuple[tuple[str, ...], ...]:
        """Per series, in slot order, its label values in declared label order (``((),)`` for
        a family without a label)."""
        return tuple(itertools.product(*(values for _, values in self._pairs)))

    @property
    def series_labels(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        """Per series, in slot order, its ``(label name, label value)`` pairs (``()`` for a
        family without a label). Every renderer and bridge names a series through this."""
        names = self.label_names
        return tuple(tuple(zip(names, vals, strict=True)) for vals in self.series_values)

    def label_values(self, labels: Mapping[str, object]) -> tuple[str, ...]:
        """The values of ``labels`` (label name to value) in declared label order.

        :class:`SchemaError` when a declared label is missing or a name is not one of the
        family's (the values themselves are checked by :meth:`Schema.slot`).
        """
        # map() over the names and one plain loop: this runs on every record call by name.
        names = self._names
        try:
            out: tuple[object, ...] = tuple(map(labels.__getitem__, names))
        except KeyError:
            out = ()
        if len(out) != len(labels) or not out:
            self._raise_label_mismatch(labels)
        for i in range(len(out)):
            if not isinstance(out[i], str):
                raise SchemaError(
                    f"{self.key}.{names[i]}", f"label values must be strings, got {_tname(out[i])}"
                )
        return out  # type: ignore[return-value]  # every element checked to be a str

    def series_key(self, values: tuple[str, ...]) -> str | tuple[str, ...] | None:
        """How :meth:`Schema.slot` and :meth:`Schema.histogram` name the series whose label
        values (in declared label order) are ``values``: ``None`` without a label, the one
        value for one label, the tuple for several."""
        if self.label is not None:
            return values[0]
        return values or None

    def _raise_label_mismatch(self, labels: Mapping[str, object]) -> None:
        names = self._names
        unknown = sorted(str(n)[:60] for n in labels if n not in names)
        missing = [n for n in names if n not in labels]
        problem = "unknown label " + ", ".join(unknown) if unknown else ""
        if missing:
            problem += ("; " if problem else "") + "missing label " + ", ".join(missing)
        raise SchemaError(self.key, problem or "labels do not match the family's")


def _declared_labels(
    where: str, label: object, values: object, labels: object
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A family's checked ``(name, values)`` pairs from either spelling (see :class:`Family`)."""
    if labels:
        if label is not None or values:
            raise SchemaError(where, "give either label= and values= or labels=, not both")
        pairs = _label_pairs(where, labels)
    elif label is None:
        if values:
            raise SchemaError(where, "values given without a label name")
        return ()
    else:
        pairs = (_label(where, label, values),)
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise SchemaError(where, "label names must be unique")
    width = 1
    for _, vals in pairs:
        width *= len(vals)
    if len(pairs) > 1 and width > MAX_FAMILY_SERIES:
        raise SchemaError(
            where, f"{width} series (the cross product of its labels) exceed {MAX_FAMILY_SERIES}"
        )
    return pairs


def _label(where: str, name: object, values: object) -> tuple[str, tuple[str, ...]]:
    """One label's checked ``(name, values)`` (see :class:`Family`)."""
    if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
        raise SchemaError(where, f"invalid label name {name!r}"[:200])
    if isinstance(values, str) or not isinstance(values, Iterable):
        # A string would iterate into one-character values: never what was meant.
        raise SchemaError(where, f"label {name!r}: values must be a tuple of strings")
    vals = tuple(values)
    if not vals:
        raise SchemaError(where, "a labelled family needs at least one label value")
    if any(not isinstance(v, str) or not v for v in vals):
        raise SchemaError(where, "label values must be non-empty strings")
    if len(set(vals)) != len(vals):
        raise SchemaError(where, "label values must be unique")
    return name, vals  # every value was checked to be a str above


def _label_pairs(where: str, labels: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``labels=`` as checked ``(name, values)`` pairs, in declared order."""
    if isinstance(labels, Mapping):
        items: Iterable[object] = labels.items()
    elif isinstance(labels, (tuple, list)):
        items = labels
    else:
        raise SchemaError(where, "labels must be a tuple of (name, values) pairs or a mapping")
    pairs: list[tuple[str, tuple[str, ...]]] = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise SchemaError(where, "labels must be a tuple of (name, values) pairs")
        if len(pairs) == MAX_FAMILY_LABELS:
            raise SchemaError(where, f"more than {MAX_FAMILY_LABELS} labels")
        name, values = item
        pairs.append(_label(where, name, values))
    return tuple(pairs)


def _checked_families(families: Iterable[Family]) -> tuple[Family, ...]:
    """A schema's families: at least one, all :class:`Family`, unique names and keys."""
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
    return fams


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

    @property
    def end(self) -> int:
        """The slot after the series' last bucket (its buckets are ``first`` to ``end - 1``)."""
        return self.first + len(self.bounds) + 1


@dataclass(frozen=True)
class Schema:
    """An ordered set of families and the flat slot layout derived from it. Immutable."""

    families: tuple[Family, ...]
    _offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    _slots: dict[tuple[str, str | tuple[str, ...] | None], int] = field(
        init=False, repr=False, compare=False
    )
    _histograms: dict[tuple[str, str | tuple[str, ...] | None], HistogramSeries] = field(
        init=False, repr=False, compare=False
    )
    _by_key: dict[str, Family] = field(init=False, repr=False, compare=False)
    _size: int = field(init=False, repr=False, compare=False)
    _float_size: int = field(init=False, repr=False, compare=False)
    # Derived data computed once per schema; see derived().
    _cache: dict[str, Any] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __init__(self, families: Iterable[Family]) -> None:
        fams = _checked_families(families)
        offsets: dict[str, int] = {}
        slots: dict[tuple[str, str | tuple[str, ...] | None], int] = {}
        histograms: dict[tuple[str, str | tuple[str, ...] | None], HistogramSeries] = {}
        i = 0
        f = 0
        for fam in fams:
            offsets[fam.key] = i
            if fam.kind == "histogram":
                for values in fam.series_values:
                    series = HistogramSeries(i, f, fam.buckets, fam.key)
                    histograms[(fam.key, fam.series_key(values))] = series
                    i += len(fam.buckets) + 1
                    f += 1
            elif not fam.label_pairs:
                slots[(fam.key, None)] = i
                i += 1
            elif fam.label is not None:
                for value in fam.values:
                    slots[(fam.key, value)] = i
                    i += 1
            else:  # several labels: a tuple of values in declared label order
                for values in fam.series_values:
                    slots[(fam.key, values)] = i
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

    def slot(self, key: str, value: LabelValues = None) -> int:
        """The slot index of one series; :class:`SchemaError` for anything outside the schema.

        ``value``: ``None`` for a family without a label, the value for a family with one, the
        tuple of values in declared label order for a family with several; a mapping of label
        name to value names the series of any labelled family.
        """
        try:
            return self._slots[(key, value)]  # type: ignore[index]  # a Mapping: below
        except (KeyError, TypeError):
            pass
        fam = self.family(key)
        if fam.kind == "histogram":
            raise SchemaError(key, "a histogram family is recorded with observe()") from None
        if not fam.label_pairs:
            raise SchemaError(key, "family has no label") from None
        if isinstance(value, Mapping):
            values = fam.label_values(value)
            return self.slot(key, fam.series_key(values))
        if fam.label is not None:
            raise SchemaError(f"{key}.{value}", "unknown label value") from None
        if not isinstance(value, tuple) or len(value) != len(fam.label_pairs):
            names = ", ".join(fam.label_names)
            raise SchemaError(
                key, f"expected a tuple of {len(fam.label_pairs)} label values ({names})"
            )
        for (name, declared), v in zip(fam.label_pairs, value, strict=True):
            if v not in declared:
                raise SchemaError(f"{key}.{name}", f"unknown label value {str(v)[:60]!r}")
        raise SchemaError(key, "unknown label values")  # unreachable: every value was declared

    def histogram(self, key: str, value: LabelValues = None) -> HistogramSeries:
        """Where one histogram series lives, its labels named as :meth:`slot` names them;
        :class:`SchemaError` for anything else."""
        try:
            return self._histograms[(key, value)]  # type: ignore[index]  # a Mapping: below
        except (KeyError, TypeError):
            pass
        fam = self.family(key)
        if fam.kind != "histogram":
            raise SchemaError(key, f"a {fam.kind}, not a histogram")
        if not fam.label_pairs:
            raise SchemaError(key, "family has no label")
        if isinstance(value, Mapping):
            values = fam.label_values(value)
            return self.histogram(key, fam.series_key(values))
        if fam.label is not None:
            raise SchemaError(f"{key}.{str(value)[:60]}", "unknown label value")
        names = ", ".join(fam.label_names)
        raise SchemaError(
            key,
            f"expected a tuple of declared values of its {len(fam.label_pairs)} labels ({names})",
        )

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
                out[fam.key] = (
                    _nested_counts(fam.label_pairs, series, 0) if fam.label_pairs else (series[0])
                )
            elif not fam.label_pairs:
                out[fam.key] = values[i]
                i += 1
            elif fam.label is not None:
                out[fam.key] = dict(zip(fam.values, values[i : i + fam.width], strict=True))
                i += fam.width
            else:
                out[fam.key] = _nested_counts(fam.label_pairs, values, i)
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
            if type(slots) is tuple:  # a labelled histogram: its nested table of series
                _parse_labelled_histograms(key, value, slots[0], counts, sums)
                continue
            _parse_labelled(key, value, slots, counts)
        return counts, sums

    def _value_slots(self) -> dict[str, Any]:
        """Per family key: its slot (no label) or a dict of label value to slot. Cached."""
        return self.derived("value_slots", _value_slots)


def _nested_counts(
    labels: tuple[tuple[str, tuple[str, ...]], ...], counts: Sequence[Any], start: int
) -> dict[str, Any]:
    """A several-label family's counts from ``start`` as nested mappings, one level per label
    (the dictionary layout); the last label's values map to the counts (or to whatever
    ``counts`` holds per series: a histogram's series mappings)."""
    (_, values), rest = labels[0], labels[1:]
    if not rest:
        return dict(zip(values, counts[start : start + len(values)], strict=True))
    step = 1
    for _, vals in rest:
        step *= len(vals)
    return {v: _nested_counts(rest, counts, start + j * step) for j, v in enumerate(values)}


def _value_slots(schema: Schema) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for fam in schema.families:
        if fam.kind == "histogram":
            if not fam.label_pairs:
                table[fam.key] = schema.histogram(fam.key)
                continue
            series = [schema.histogram(fam.key, fam.series_key(v)) for v in fam.series_values]
            # In a 1-tuple, so that the parser tells it from a counter's table of slots.
            table[fam.key] = (_nested_counts(fam.label_pairs, series, 0),)
        elif not fam.label_pairs:
            table[fam.key] = schema.slot(fam.key)
        elif fam.label is not None:
            table[fam.key] = {v: schema.slot(fam.key, v) for v in fam.values}
        else:
            # Nested like the layout: label value to the next level, the last level to slots.
            table[fam.key] = _nested_counts(
                fam.label_pairs,
                list(range(schema.offset(fam.key), schema.offset(fam.key) + fam.width)),
                0,
            )
    return table


def _parse_labelled(key: str, value: object, slots: dict[str, Any], counts: list[int]) -> None:
    """Validate one labelled family's mapping into ``counts`` (see :meth:`Schema.parse_counts`).

    ``slots`` maps each label value to its slot or, for a family with several labels, to the
    table of the next label (one level of the document per label, no deeper and no shallower).
    """
    if not isinstance(value, Mapping):
        raise SchemaError(key, f"expected a mapping of label values, got {_tname(value)}")
    for label_value, n in value.items():
        idx = slots.get(label_value) if type(label_value) is str else None
        if idx is None:
            if not isinstance(label_value, str):
                raise SchemaError(f"{key}.{label_value!r}", "label values must be strings")
            idx = slots.get(str.__str__(label_value))
            if idx is None:
                raise SchemaError(f"{key}.{label_value}"[:200], "unknown label value")
        if type(idx) is not int:  # another label follows
            _parse_labelled(f"{key}.{label_value}", n, idx, counts)
        elif type(n) is int and 0 <= n <= MAX_COUNT:
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
    key: str, value: object, table: dict[str, Any], counts: list[int], sums: list[float]
) -> None:
    """A labelled histogram's mapping (one level per label, a series mapping at the bottom)."""
    if not isinstance(value, Mapping):
        raise SchemaError(key, f"expected a mapping of label values, got {_tname(value)}")
    for label_value, one in value.items():
        if not isinstance(label_value, str):
            raise SchemaError(f"{key}.{label_value!r}", "label values must be strings")
        found = table.get(str.__str__(label_value))
        where = f"{key}.{label_value}"[:200]
        if found is None:
            raise SchemaError(where, "unknown label value")
        if type(found) is HistogramSeries:
            _parse_histogram(where, one, found, counts, sums)
        else:  # another label follows
            _parse_labelled_histograms(where, one, found, counts, sums)


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
