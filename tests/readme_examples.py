"""Run one of the README's engine examples as written: its two Python blocks as a package, a
worker process that imports the second, then the ``gatemetrics aggregate`` command it shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.processes import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class ExampleRun:
    directory: Path  # the shard directory the worker wrote and the aggregator compacted
    stdout: str  # what the command printed


def readme_blocks(heading: str) -> tuple[list[str], list[str]]:
    """The Python and the console code blocks of the README's section ``heading`` (up to the
    next heading), in order."""
    section = README.read_text(encoding="utf-8").split(f"{heading}\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    return (
        re.findall(r"```python\n(.*?)\n```", section, flags=re.DOTALL),
        re.findall(r"```console\n(.*?)\n```", section, flags=re.DOTALL),
    )


def run_readme_example(heading: str, package: str, tmp_path: Path) -> ExampleRun:
    """Run the example under ``heading`` (up to the next heading) with its modules as
    ``package``: the first Python block is ``<package>/metrics.py``, the second
    ``<package>/web.py``, imported by one worker process that records and exits (its last
    save); then the console block's command, with ``"$GATEMETRICS_DIR"`` set. Fails the test
    when the worker or the command fails, or the command's output does not begin with the
    lines the README shows."""
    [metrics, web], [console] = readme_blocks(heading)
    command, *shown = console.splitlines()
    where = tmp_path / "app" / package
    where.mkdir(parents=True)
    (where / "__init__.py").write_text("")
    (where / "metrics.py").write_text(metrics)
    (where / "web.py").write_text(web)
    directory = tmp_path / "shards"
    directory.mkdir(mode=0o700)
    env = {**os.environ, "GATEMETRICS_DIR": str(directory), "PYTHONPATH": str(tmp_path / "app")}
    worker = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {package}.web"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    assert command.startswith("$ gatemetrics aggregate ")
    args = [a.replace('"$GATEMETRICS_DIR"', str(directory)) for a in command.split()[3:]]
    cli = run_cli("aggregate", *args, env=env)
    assert cli.returncode == 0, cli.stderr
    # The README shows the output's first lines, then "...": they must be what it prints.
    assert shown[-1] == "..."
    assert cli.stdout.splitlines()[: len(shown) - 1] == shown[:-1]
    return ExampleRun(directory, cli.stdout)
