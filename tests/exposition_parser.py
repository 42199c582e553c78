"""A strict little parser of the Prometheus text format, for asserting on what we render.

It accepts only what our exposition is documented to produce (HELP, TYPE, samples with labels in
the family's declared order, integer values; for a histogram, per series its cumulative
``_bucket`` samples with ``le`` last and ending in ``+Inf``, then ``_sum`` (a float as ``repr``
writes it) and ``_count`` equal to the ``+Inf`` bucket) and raises ``ValueError`` on anything
else, so a test that parses our output also checks its shape. ``samples`` keys a sample by its
one label pair (``None`` without a label), as the single-label tests read it; ``series`` keys
every sample, with any number of labels, by its tuple of ``(name, value)`` pairs;
``histograms`` keys a histogram series like ``samples`` (or by its tuple of pairs when it has
several labels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r'(?:[^"\\\n]|\\[\\"n])*'
_PAIRS = re.compile(rf'(?P<label>{_LABEL})="(?P<value>{_VALUE})"')
_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    rf'(?:\{{(?P<labels>{_LABEL}="{_VALUE}"(?:,{_LABEL}="{_VALUE}")*)\}})?'
    r" (?P<count>-?\d+)\Z"
)
_HELP = re.compile(r"# HELP (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<text>.*)\Z")
_TYPE = re.compile(r"# TYPE (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<kind>counter|gauge|histogram)\Z")
_HISTOGRAM_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)_(?P<suffix>bucket|sum|count)"
    rf'(?:\{{(?P<labels>{_LABEL}="{_VALUE}"(?:,{_LABEL}="{_VALUE}")*)\}})?'
    r" (?P<number>\S+)\Z"
)
_LE = re.compile(r"\+Inf|-?[0-9][0-9.e+-]*\Z")


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


@dataclass
class ParsedHistogram:
    """One histogram series: its cumulative buckets by ``le`` (in order), sum and count."""

    buckets: dict[str, int] = field(default_factory=dict)
    sum: float | None = None
    count: int | None = None


@dataclass
class ParsedFamily:
    name: str
    help: str = ""
    kind: str = ""
    samples: dict[tuple[str, str] | None, int] = field(default_factory=dict)
    series: dict[tuple[tuple[str, str], ...], int] = field(default_factory=dict)
    histograms: dict[Any, ParsedHistogram] = field(default_factory=dict)


def parse(text: str) -> dict[str, ParsedFamily]:
    """Families by name, in order of appearance. Raises ValueError on any deviation."""
    if not text.endswith("\n"):
        raise ValueError("exposition must end with a line feed")
    families: dict[str, ParsedFamily] = {}
    current: ParsedFamily | None = None
    for lineno, line in enumerate(text[:-1].split("\n"), 1):
        if m := _HELP.match(line):
            if m["name"] in families:
                raise ValueError(f"line {lineno}: family {m['name']} repeated")
            current = families[m["name"]] = ParsedFamily(m["name"], help=unescape(m["text"]))
        elif m := _TYPE.match(line):
            if current is None or current.name != m["name"] or current.kind:
                raise ValueError(f"line {lineno}: TYPE out of place")
            current.kind = m["kind"]
        elif current is not None and current.kind == "histogram":
            _histogram_line(current, line, lineno)
        elif m := _SAMPLE.match(line):
            if current is None or current.name != m["name"] or not current.kind:
                raise ValueError(f"line {lineno}: sample outside its family")
            _sample(current, m, lineno)
        else:
            raise ValueError(f"line {lineno}: not understood: {line!r}")
    _check_complete(families)
    return families


def _sample(family: ParsedFamily, m: re.Match[str], lineno: int) -> None:
    pairs = tuple((p["label"], unescape(p["value"])) for p in _PAIRS.finditer(m["labels"] or ""))
    if len({name for name, _ in pairs}) != len(pairs):
        raise ValueError(f"line {lineno}: a label repeated")
    if pairs in family.series:
        raise ValueError(f"line {lineno}: duplicate series")
    family.series[pairs] = int(m["count"])
    if len(pairs) <= 1:
        family.samples[pairs[0] if pairs else None] = int(m["count"])


def _check_complete(families: dict[str, ParsedFamily]) -> None:
    for family in families.values():
        for series in family.histograms.values():
            if series.count is None:
                raise ValueError(f"{family.name}: a histogram series without _count")


def _histogram_labels(text: str, lineno: int) -> tuple[Any, str | None]:
    """A histogram sample's series key (see :class:`ParsedFamily`) and its ``le``, if any."""
    pairs = tuple((p["label"], unescape(p["value"])) for p in _PAIRS.finditer(text))
    le = None
    if pairs and pairs[-1][0] == "le":  # le comes last, after the series' own labels
        le = pairs[-1][1]
        pairs = pairs[:-1]
        if not _LE.match(le):
            raise ValueError(f"line {lineno}: a bad le {le!r}")
    if any(name == "le" for name, _ in pairs) or len({n for n, _ in pairs}) != len(pairs):
        raise ValueError(f"line {lineno}: le out of place or a label repeated")
    key: Any = (pairs[0] if len(pairs) == 1 else pairs) if pairs else None
    return key, le


def _histogram_line(family: ParsedFamily, line: str, lineno: int) -> None:
    m = _HISTOGRAM_SAMPLE.match(line)
    if m is None or m["name"] != family.name:
        raise ValueError(f"line {lineno}: not understood: {line!r}")
    key, le = _histogram_labels(m["labels"] or "", lineno)
    suffix, number = m["suffix"], m["number"]
    series = family.histograms.get(key)
    if suffix == "bucket":
        if le is None:
            raise ValueError(f"line {lineno}: a bucket without le")
        if series is None:
            series = family.histograms[key] = ParsedHistogram()
        if series.sum is not None or le in series.buckets or "+Inf" in series.buckets:
            raise ValueError(f"line {lineno}: bucket out of place")
        count = int(number)
        if series.buckets and count < list(series.buckets.values())[-1]:
            raise ValueError(f"line {lineno}: cumulative buckets go down")
        series.buckets[le] = count
        return
    if le is not None or series is None or "+Inf" not in series.buckets:
        raise ValueError(f"line {lineno}: _{suffix} out of place")
    if suffix == "sum":
        if series.sum is not None or number != repr(float(number)):
            raise ValueError(f"line {lineno}: sum repeated or not a float's repr")
        series.sum = float(number)
        return
    if series.sum is None or series.count is not None or int(number) != series.buckets["+Inf"]:
        raise ValueError(f"line {lineno}: _count out of place or not the +Inf bucket")
    series.count = int(number)
