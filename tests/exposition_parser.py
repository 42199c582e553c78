"""A strict little parser of the Prometheus text format, for asserting on what we render.

It accepts only what our exposition is documented to produce (HELP, TYPE, samples with labels in
the family's declared order, integer values) and raises ``ValueError`` on anything else, so a
test that parses our output also checks its shape. ``samples`` keys a sample by its one label
pair (``None`` without a label), as the single-label tests read it; ``series`` keys every sample,
with any number of labels, by its tuple of ``(name, value)`` pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r'(?:[^"\\\n]|\\[\\"n])*'
_PAIRS = re.compile(rf'(?P<label>{_LABEL})="(?P<value>{_VALUE})"')
_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    rf'(?:\{{(?P<labels>{_LABEL}="{_VALUE}"(?:,{_LABEL}="{_VALUE}")*)\}})?'
    r" (?P<count>-?\d+)\Z"
)
_HELP = re.compile(r"# HELP (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<text>.*)\Z")
_TYPE = re.compile(r"# TYPE (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<kind>counter|gauge)\Z")


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


@dataclass
class ParsedFamily:
    name: str
    help: str = ""
    kind: str = ""
    samples: dict[tuple[str, str] | None, int] = field(default_factory=dict)
    series: dict[tuple[tuple[str, str], ...], int] = field(default_factory=dict)


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
        elif m := _SAMPLE.match(line):
            if current is None or current.name != m["name"] or not current.kind:
                raise ValueError(f"line {lineno}: sample outside its family")
            pairs = tuple(
                (p["label"], unescape(p["value"])) for p in _PAIRS.finditer(m["labels"] or "")
            )
            if len({name for name, _ in pairs}) != len(pairs):
                raise ValueError(f"line {lineno}: a label repeated")
            if pairs in current.series:
                raise ValueError(f"line {lineno}: duplicate series")
            current.series[pairs] = int(m["count"])
            if len(pairs) <= 1:
                current.samples[pairs[0] if pairs else None] = int(m["count"])
        else:
            raise ValueError(f"line {lineno}: not understood: {line!r}")
    return families
