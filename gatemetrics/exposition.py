"""Deterministic rendering of counts: Prometheus text exposition (format 0.0.4) and JSON.

Order is fixed and documented: families in schema order, each as ``# HELP``, ``# TYPE`` and
then one sample per label value in the order the family declares them; a family without a label
has a single unlabelled sample. Counts are rendered as integers. The same counts give
byte-identical output in any process, whatever order the counts were gathered in.
"""

from __future__ import annotations

import orjson

from gatemetrics.schema import Schema
from gatemetrics.store import Snapshot

__all__ = [
    "CONTENT_TYPE",
    "escape_help",
    "escape_label_value",
    "render_json",
    "render_prometheus",
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
    """Per family, its two header lines; per slot, ``name{label="value"} ``. Cached."""
    return schema.derived("prometheus", _build_templates)


def _build_templates(schema: Schema) -> tuple[tuple[str, ...], tuple[str, ...]]:
    headers: list[str] = []
    prefixes: list[str] = []
    for fam in schema.families:
        help_line = f"# HELP {fam.name} {escape_help(fam.documentation)}\n"
        headers.append(f"{help_line}# TYPE {fam.name} {fam.kind}\n")
        if fam.label is None:
            prefixes.append(f"{fam.name} ")
        else:
            prefixes.extend(
                f'{fam.name}{{{fam.label}="{escape_label_value(v)}"}} ' for v in fam.values
            )
    return tuple(headers), tuple(prefixes)


def render_prometheus(snapshot: Snapshot) -> str:
    """The Prometheus text exposition of ``snapshot``, ending with a line feed."""
    headers, prefixes = _templates(snapshot.schema)
    counts = snapshot.counts
    parts: list[str] = []
    i = 0
    for header, fam in zip(headers, snapshot.schema.families, strict=True):
        parts.append(header)
        for _ in range(fam.width):
            parts.append(f"{prefixes[i]}{counts[i]}\n")
            i += 1
    return "".join(parts)


def render_json(snapshot: Snapshot) -> str:
    """The dictionary layout of ``snapshot`` as JSON with sorted keys (deterministic)."""
    return orjson.dumps(snapshot.to_dict(), option=orjson.OPT_SORT_KEYS).decode()
