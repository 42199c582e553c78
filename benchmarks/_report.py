"""The benchmark report: the machine described, ``results.json`` and ``RESULTS.md``.

A figure's result is a plain JSON-able dict::

    {
      "id": "hot_path", "number": 1, "title": "...",
      "method": "how it was measured (one paragraph of Markdown)",
      "table": {"header": ["case", ...], "rows": [["ALLOW", "0.41 µs", ...], ...]},
      "tables": [{"caption": "...", "header": [...], "rows": [...]}],  # instead of "table"
      "targets": [target(...), ...],                                  # optional
      "notes": ["..."],                                               # optional
      "data": {...},      # every number behind the table, in base units (ns, bytes, req/s)
      "date": "...", "seconds": 12.3,
    }

A target (:func:`target`) carries the measured value, the comparison and the threshold; whether
it is met is computed from them (:func:`target_met`), again when the report is rendered, so no
verdict is ever written by hand. A target with no threshold (``"met": None``) is shown as n/a.

``RESULTS.md`` is rendered from ``results.json`` alone, so re-running one figure
(``python -m benchmarks --only 5``) keeps the others and regenerates the whole report.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

PACKAGES = (
    "gatemetrics",
    "prometheus-client",
    "orjson",
    "filelock",
    "anyio",
    "gunicorn",
    "uvicorn",
    "uvicorn-worker",
)


Comparison = Literal[">=", "<=", "<", ">"]
_COMPARE = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
}


def target(
    text: str, *, measured: str, value: float | None, op: Comparison, threshold: float
) -> dict[str, Any]:
    """A target: met when ``value op threshold`` (never when nothing was measured)."""
    if op not in _COMPARE:
        raise ValueError(f"op must be one of {sorted(_COMPARE)}, not {op!r}")
    doc: dict[str, Any] = {
        "text": text,
        "measured": measured,
        "value": value,
        "op": op,
        "threshold": threshold,
    }
    doc["met"] = target_met(doc)
    return doc


def target_met(t: Mapping[str, Any]) -> bool | None:
    """Whether a target is met, from its value and threshold; its ``met`` if it has none."""
    if "op" not in t:
        met = t.get("met")
        return met if isinstance(met, bool) else None
    value = t.get("value")
    if value is None:
        return False
    return bool(_COMPARE[t["op"]](float(value), float(t["threshold"])))


def figure_tables(figure: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A figure's tables: its ``tables``, or its one ``table``."""
    if "tables" in figure:
        return list(figure["tables"])
    return [figure["table"]]


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def filesystem_of(path: str) -> str:
    """``ext4 (/dev/vda on /)``: the mount that holds ``path``, from /proc/mounts."""
    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                device, mount, fstype, *_ = line.split()
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) > len(best[1])):
                    best = (device, mount, fstype)
    except OSError:
        return "unknown"
    if best is None:
        return "unknown"
    return f"{best[2]} ({best[0]} on {best[1]})"


def _wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "not installed"
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" [")[0] if first else "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = "not installed"
    tmp = tempfile.gettempdir()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram": _ram(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "temp_dir": tmp,
        "temp_dir_filesystem": filesystem_of(tmp),
        "packages": packages,
        "wrk": _wrk_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- Markdown --------------------------------------------------------------------------------


def _cell(value: object) -> str:
    # A pipe would end the cell; a newline would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; every row must have the header's width."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, header {len(header)}")
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _met(value: object) -> str:
    if value is True:
        return "met"
    if value is False:
        return "**missed**"
    return "n/a"


def render_markdown(results: Mapping[str, Any]) -> str:
    """``RESULTS.md`` from a results document (``{"machine", "figures", "generated"}``)."""
    figures = sorted(results.get("figures", {}).values(), key=lambda f: f["number"])
    out = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks` (`python3 -m nox -s bench`); do not edit by hand. "
        "Every figure is measured side by side in one run (interleaved within one process "
        "where the measured thing is a call, in separate processes where it is a process); "
        "medians with [min-max] over the runs after a warm-up. Ratios are of medians, with "
        "the range of the per-round ratios in brackets.",
        "",
        f"Report generated: {results.get('generated', 'unknown')}.",
        "",
        "## Machine",
        "",
    ]
    m = results.get("machine", {})
    rows = [
        ["CPU", f"{m.get('cpu')} ({m.get('cores')} cores)"],
        ["RAM", m.get("ram")],
        ["kernel", m.get("kernel")],
        ["Python", m.get("python")],
        ["temp dir", f"{m.get('temp_dir')}: {m.get('temp_dir_filesystem')}"],
        ["load average at start", " ".join(str(x) for x in m.get("load_average_at_start", []))],
        ["wrk", m.get("wrk")],
    ]
    rows += [[name, ver] for name, ver in m.get("packages", {}).items()]
    out += [markdown_table(["", ""], rows), ""]
    out += [
        "The machine is shared with other developers' test runs: absolute times drift from "
        "run to run (the disk most of all); the ratios measured within one run are the "
        "figures to compare.",
        "",
        "## Targets",
        "",
    ]
    target_rows = [
        [f"{f['number']}. {f['title']}", t["text"], t["measured"], _met(target_met(t))]
        for f in figures
        for t in f.get("targets", [])
    ]
    out += [markdown_table(["figure", "target", "measured", ""], target_rows), ""]
    for f in figures:
        out += [f"## {f['number']}. {f['title']}", "", f["method"], ""]
        for table in figure_tables(f):
            if table.get("caption"):
                out += [f"**{table['caption']}**", ""]
            out += [markdown_table(table["header"], table["rows"]), ""]
        for note in f.get("notes", []):
            out += [f"- {note}"]
        if f.get("notes"):
            out += [""]
        out += [f"_Measured {f.get('date', 'unknown')}, in {f.get('seconds', 0):.0f} s._", ""]
    return "\n".join(out).rstrip() + "\n"
