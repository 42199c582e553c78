"""Project hygiene: the README's two commands, CI running exactly the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, flags=re.DOTALL)


def test_quick_start_has_exactly_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert "gatemetrics demo" in commands[0]
    assert "nox" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert quick_start_commands()[1] in ci.splitlines()
    assert "set -euo pipefail" in ci
    assert "GATEMETRICS_REQUIRE_TOOLS=1" in ci
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111


def test_pytest_is_configured_strictly() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pytest_cfg = config["tool"]["pytest"]["ini_options"]
    assert pytest_cfg["filterwarnings"] == ["error"]
    assert "--strict-markers" in pytest_cfg["addopts"]
    assert pytest_cfg["timeout"] > 0
    assert pytest_cfg["asyncio_mode"] == "strict"
    assert pytest_cfg["asyncio_default_fixture_loop_scope"] == "function"


def test_runtime_dependencies_are_only_the_engines() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] for d in config["project"]["dependencies"]}
    assert names == {"anyio", "orjson"}
    # Each is imported by the shipped code, and nothing else is: filelock, once used for the
    # shards' locks, is now a test dependency only.
    sources = "\n".join(
        p.read_text(encoding="utf-8")
        for top in ("gatemetrics", "service/backend")
        for p in (ROOT / top).rglob("*.py")
    )
    imported = set(re.findall(r"^\s*(?:import|from) (\w+)", sources, flags=re.MULTILINE))
    assert names <= imported
    assert "filelock" not in imported
    assert any(
        d.startswith("filelock>=4") for d in config["project"]["optional-dependencies"]["test"]
    )
