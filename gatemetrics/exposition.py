"""Deterministic rendering of counts: Prometheus text exposition (format 0.0.4), OpenMetrics
1.0.0 and JSON.

Order is fixed and documented: families in schema order, each as ``# HELP``, ``# TYPE`` and
then one sample per label value in the order the family declares them; a family with several
labels has one sample per series of their cross product (``name{a="x",b="y"} n``, labels in
declared order, the last label varying fastest: :attr:`Family.series_labels`); a family without
a label has a single unlabelled sample. Counts are rendered as integers. The same counts give
byte-identical output in any process, whatever order the counts were gathered in.

A histogram family renders, per series (label value), as prometheus_client does: its
cumulative ``<name>_bucket`` samples with the series' labels and then ``le`` (each bound as
prometheus_client writes it, :func:`le_labels`: ``repr`` up to six integer digits, ``0.005``,
``1.0``, an exponent past them, ``2.5e+06``, then ``+Inf``), then ``<name>_sum`` (``repr`` of
the float: ``0.0``, ``0.25``, ``1e-05``) and ``<name>_count`` (equal to the ``+Inf`` bucket).
JSON (:func:`render_json`) uses the dictionary layout, where a histogram series is
``{"buckets": {"0.001": n, ..., "+Inf": n}, "count": n, "sum": x}`` (see
:mod:`gatemetrics.schema`; the bucket keys are ``repr``, as the files hold them); its keys are
sorted as every JSON key is, so a reader takes the buckets by their ``le`` (as numbers), not
by their order in the text.

OpenMetrics (:func:`render_openmetrics`, over :func:`samples`, generic by kind) differs from the
text format where the spec says so: a counter's ``# HELP``/``# TYPE`` name the family without
``_total`` while its sample keeps it; HELP escapes ``"`` as well; a histogram's ``le`` is written
in canonical form (``1.0``, ``+Inf``); the exposition ends with ``# EOF``. No ``# UNIT`` line: a
family declares no unit, and a UNIT line the family name does not end with is invalid, so any
unit would be a guess. No ``_created`` sample either: an aggregate's start is the earliest
process start of a whole directory, not each series' creation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson

from gatemetrics.schema import Family, Schema
from gatemetrics.store import Snapshot

__all__ = [
    "CONTENT_TYPE",
    "OPENMETRICS_CONTENT_TYPE",
    "FamilySamples",
    "Sample",
    "escape_help",
    "escape_label_value",
    "le_labels",
    "openmetrics_text",
    "render_json",
    "render_openmetrics",
    "render_prometheus",
    "samples",
]

#: The HTTP ``Content-Type`` of :func:`render_prometheus` output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The HTTP ``Content-Type`` of :func:`render_openmetrics` output.
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def escape_help(text: str) -> str:
    r"""Escape HELP text per the text format: ``\`` and line feed."""
    return text.replace("\\", r"\\").replace("\n", r"\n")


def escape_label_value(value: str) -> str:
    r"""Escape a label value per the text format: ``\``, ``"`` and line feed."""
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def le_labels(fam: Family) -> tuple[str, ...]:
    """A histogram's ``le`` label values in every exposition: each bound as prometheus_client
    writes it (``floatToGoString``: ``0.005``, ``1.0``, ``2.5e+06``), then ``+Inf``.

    Not :attr:`Family.bucket_labels` (``repr``, the JSON layout's keys, kept for the files
    already written): the two differ from a million up (``2500000.0``), and a label value is
    part of a series' identity, so the textfile, ``/metrics`` and the prometheus_client
    collector must write the same one or a fleet query sees two series per bucket.
    """
    return (*(_om_float(b) for b in fam.buckets), "+Inf") if fam.kind == "histogram" else ()


def _templates(schema: Schema) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Per family, its two header lines; per sample, ``name{label="value"} ``. Cached."""
    return schema.derived("prometheus", _build_templates)


def _build_templates(schema: Schema) -> tuple[tuple[str, ...], tuple[str, ...]]:
    headers: list[str] = []
    prefixes: list[str] = []
    for fam in schema.families:
        help_line = f"# HELP {fam.name} {escape_help(fam.documentation)}\n"
        headers.append(f"{help_line}# TYPE {fam.name} {fam.kind}\n")
        if fam.kind != "histogram":
            prefixes.extend(f"{fam.name}{_label_text(pairs)} " for pairs in fam.series_labels)
            continue
        for pairs in fam.series_labels:
            prefixes.extend(
                f"{fam.name}_bucket{_label_text((*pairs, ('le', le)))} " for le in le_labels(fam)
            )
            prefixes.append(f"{fam.name}_sum{_label_text(pairs)} ")
            prefixes.append(f"{fam.name}_count{_label_text(pairs)} ")
    return tuple(headers), tuple(prefixes)


def _label_text(pairs: tuple[tuple[str, str], ...]) -> str:
    """``{a="x",b="y"}`` (values escaped), or nothing for a series without labels."""
    if not pairs:
        return ""
    inner = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)
    return f"{{{inner}}}"


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample of a family: the metric name's suffix (``""``, or ``"_bucket"``, ``"_sum"``,
    ``"_count"`` for a histogram), its label pairs in order, and its value."""

    suffix: str
    labels: tuple[tuple[str, str], ...]
    value: int | float


@dataclass(frozen=True, slots=True)
class FamilySamples:
    """One family of a snapshot, as a renderer or a bridge to another library sees it."""

    name: str
    documentation: str
    kind: str
    samples: tuple[Sample, ...]


def samples(snapshot: Snapshot) -> Iterator[FamilySamples]:
    """Every family of ``snapshot`` with its samples, in exposition order (the one model the
    text renderers and bridges share; :func:`render_prometheus` is its fast equivalent)."""
    counts = snapshot.counts
    sums = snapshot.sums
    i = 0
    f = 0
    for fam in snapshot.schema.families:
        out: list[Sample] = []
        les = le_labels(fam)
        for pairs in fam.series_labels:
            if fam.kind != "histogram":
                out.append(Sample("", pairs, counts[i]))
                i += 1
                continue
            running = 0
            for le in les:
                running += counts[i]
                i += 1
                out.append(Sample("_bucket", (*pairs, ("le", le)), running))
            out.append(Sample("_sum", pairs, sums[f]))
            out.append(Sample("_count", pairs, running))
            f += 1
        yield FamilySamples(fam.name, fam.documentation, fam.kind, tuple(out))


def render_prometheus(snapshot: Snapshot) -> str:
    """The Prometheus text exposition of ``snapshot``, ending with a line feed."""
    headers, prefixes = _templates(snapshot.schema)
    counts = snapshot.counts
    sums = snapshot.sums
    parts: list[str] = []
    i = 0  # the slot
    p = 0  # the sample (a histogram has more samples than slots)
    f = 0  # the float cell
    for header, fam in zip(headers, snapshot.schema.families, strict=True):
        parts.append(header)
        if fam.kind != "histogram":
            for _ in range(fam.width):
                parts.append(f"{prefixes[p]}{counts[i]}\n")
                i += 1
                p += 1
            continue
        buckets = len(fam.buckets) + 1
        for _ in range(fam.series):
            running = 0
            for _ in range(buckets):
                running += counts[i]
                parts.append(f"{prefixes[p]}{running}\n")
                i += 1
                p += 1
            # repr: the shortest text that reads back as the same float, in every process.
            parts.append(f"{prefixes[p]}{sums[f]!r}\n")
            parts.append(f"{prefixes[p + 1]}{running}\n")
            p += 2
            f += 1
    return "".join(parts)


def render_json(snapshot: Snapshot) -> str:
    """The dictionary layout of ``snapshot`` as JSON with sorted keys (deterministic)."""
    return orjson.dumps(snapshot.to_dict(), option=orjson.OPT_SORT_KEYS).decode()


def render_openmetrics(snapshot: Snapshot) -> str:
    """The OpenMetrics 1.0.0 exposition of ``snapshot``, ending with ``# EOF`` and a line feed."""
    return openmetrics_text(samples(snapshot))


#: The sample suffixes each kind may carry (see :class:`Sample`).
_SUFFIXES = {
    "counter": frozenset({""}),
    "gauge": frozenset({""}),
    "histogram": frozenset({"_bucket", "_sum", "_count"}),
}


def openmetrics_text(families: Iterable[FamilySamples]) -> str:
    """The OpenMetrics 1.0.0 exposition of ``families``, in their order (deterministic).

    Raises ``ValueError`` naming the family for what the format cannot say: an unknown kind, a
    suffix the kind has no sample for, a counter not named ``..._total``, a bucket without a
    numeric ``le``.
    """
    parts: list[str] = []
    for fam in families:
        allowed = _SUFFIXES.get(fam.kind)
        if allowed is None:
            raise ValueError(f"{fam.name}: no OpenMetrics type for kind {fam.kind!r}")
        base = fam.name
        if fam.kind == "counter":
            if not base.endswith("_total"):
                raise ValueError(f"{fam.name}: a counter's name must end in _total")
            base = base[: -len("_total")]
        parts.append(f"# HELP {base} {_escape_om_help(fam.documentation)}\n")
        parts.append(f"# TYPE {base} {fam.kind}\n")
        for sample in fam.samples:
            if sample.suffix not in allowed:
                raise ValueError(f"{fam.name}: a {fam.kind} has no {sample.suffix!r} sample")
            labels = sample.labels
            if sample.suffix == "_bucket":
                labels = _canonical_le(fam.name, labels)
            name = fam.name if fam.kind == "counter" else f"{base}{sample.suffix}"
            parts.append(f"{name}{_label_text(labels)} {_om_value(sample.value)}\n")
    parts.append("# EOF\n")
    return "".join(parts)


def _escape_om_help(text: str) -> str:
    r"""HELP text per OpenMetrics: ``\``, line feed and ``"`` (the text format leaves ``"``)."""
    return escape_help(text).replace('"', r"\"")


def _canonical_le(family: str, labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``labels`` with ``le`` in OpenMetrics' canonical form (``1`` -> ``1.0``, ``+Inf``)."""
    out: list[tuple[str, str]] = []
    found = False
    for key, value in labels:
        if key == "le":
            try:
                bound = float(value)
            except ValueError:
                raise ValueError(f"{family}: bucket bound le={value!r} is not a number") from None
            if math.isnan(bound):
                raise ValueError(f"{family}: bucket bound le={value!r} is not a number")
            out.append((key, _om_float(bound)))
            found = True
        else:
            out.append((key, value))
    if not found:
        raise ValueError(f"{family}: a _bucket sample without an le label")
    return tuple(out)


def _om_value(value: int | float) -> str:
    if isinstance(value, bool):  # a bool is an int to Python, never a count
        raise ValueError(f"not a sample value: {value!r}")
    return str(value) if isinstance(value, int) else _om_float(value)


def _om_float(value: float) -> str:
    """A float as prometheus_client writes one (its ``floatToGoString``): ``+Inf``, ``-Inf``,
    ``NaN``, Python's shortest repr (``1.0``, ``0.005``), and an exponent past six integer
    digits (``1.5e+07``), so a bucket bound reads the same from both bridges."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text
