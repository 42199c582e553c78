"""Deterministic rendering of counts: Prometheus text exposition (format 0.0.4) and JSON.

Order is fixed and documented: families in schema order, each as ``# HELP``, ``# TYPE`` and
then one sample per label value in the order the family declares them; a family with several
labels has one sample per series of their cross product (``name{a="x",b="y"} n``, labels in
declared order, the last label varying fastest: :attr:`Family.series_labels`); a family without
a label has a single unlabelled sample. Counts are rendered as integers. The same counts give
byte-identical output in any process, whatever order the counts were gathered in.

A histogram family renders, per series (label value), as prometheus_client does: its
cumulative ``<name>_bucket`` samples with the series' labels and then ``le`` (``repr`` of each
bound, then ``+Inf``), then ``<name>_sum`` (``repr`` of the float: ``0.0``, ``0.25``,
``1e-05``) and ``<name>_count`` (equal to the ``+Inf`` bucket). JSON (:func:`render_json`)
uses the dictionary layout, where a histogram series is
``{"buckets": {"0.001": n, ..., "+Inf": n}, "count": n, "sum": x}`` (see
:mod:`gatemetrics.schema`); its keys are sorted as every JSON key is, so a reader takes the
buckets by their ``le`` (as numbers), not by their order in the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from gatemetrics.schema import Schema
from gatemetrics.store import Snapshot

__all__ = [
    "CONTENT_TYPE",
    "FamilySamples",
    "Sample",
    "escape_help",
    "escape_label_value",
    "render_json",
    "render_prometheus",
    "samples",
]

#: The HTTP ``Content-Type`` of :func:`render_prometheus` output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_help(text: str) -> str:
    r"""Escape HELP text per the text format: ``\`` and line feed."""
    return text.replace("\\", r"\\").replace("\n", r"\n")


def escape_label_value(value: str) -> str:
    r"""Escape a label value per the text format: ``\``, ``"`` and line feed."""
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


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
                f"{fam.name}_bucket{_label_text((*pairs, ('le', le)))} " for le in fam.bucket_labels
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
        for pairs in fam.series_labels:
            if fam.kind != "histogram":
                out.append(Sample("", pairs, counts[i]))
                i += 1
                continue
            running = 0
            for le in fam.bucket_labels:
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
