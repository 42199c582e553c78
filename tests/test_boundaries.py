"""The seams between the layers: the engine knows nothing of the gate, and the service uses only
the engine's public API (``gatemetrics.__all__``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import gatemetrics

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "gatemetrics"
SERVICE = ROOT / "service" / "backend"


def sources(top: Path) -> list[Path]:
    found = sorted(top.rglob("*.py"))
    assert found, top
    return found


@pytest.mark.parametrize("path", sources(ENGINE), ids=lambda p: p.name)
def test_the_engine_never_mentions_the_service(path: Path) -> None:
    # Code, docstrings and comments alike: an example in the engine's docs that names the gate
    # is how the gate's schema crept in as the CLI's default.
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\bbackend\b", text), f"{path} mentions backend"


def engine_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) for every import of gatemetrics in ``path``."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name, None) for a in node.names if a.name.startswith("gatemetrics")
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gatemetrics"):
            found += [(node.lineno, node.module or "", a.name) for a in node.names]
    return found


#: Public modules of the engine that are not names of ``gatemetrics`` itself: the gunicorn
#: hooks are assigned in a gunicorn config (``worker_exit = gatemetrics_hooks.worker_exit``).
PUBLIC_MODULES = {"gunicorn"}


def attribute_uses(path: Path) -> list[tuple[int, str]]:
    """``gatemetrics.<name>`` attribute accesses in ``path``'s code (not its strings)."""
    return [
        (node.lineno, node.attr)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "gatemetrics"
    ]


@pytest.mark.parametrize("path", sources(SERVICE), ids=lambda p: str(p.relative_to(SERVICE)))
def test_the_service_imports_only_the_engines_public_names(path: Path) -> None:
    public = set(gatemetrics.__all__) | PUBLIC_MODULES
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}{'.' + name if name else ''}"
        for line, module, name in engine_imports(path)
        if not (module == "gatemetrics" and (name is None or name in public))
        and not (module == "gatemetrics.gunicorn" and name is None)
    ]
    bad += [
        f"{path.relative_to(ROOT)}:{line}: gatemetrics.{name}"
        for line, name in attribute_uses(path)
        if name not in public
    ]
    assert bad == []


def test_the_boundary_checks_can_fail(tmp_path: Path) -> None:
    # The checks above parse real files; a private import must be caught by both of them.
    leaky = tmp_path / "leaky.py"
    leaky.write_text(
        "import gatemetrics\nfrom gatemetrics._flock import flock_fd\n"
        "from gatemetrics import Shard, _faults\nx = gatemetrics.shards.Mode\n",
        encoding="utf-8",
    )
    modules = [(m, n) for _, m, n in engine_imports(leaky)]
    assert ("gatemetrics._flock", "flock_fd") in modules
    assert ("gatemetrics", "_faults") in modules
    assert ("gatemetrics", "_faults") not in [
        (m, n) for m, n in modules if n in gatemetrics.__all__
    ]
    assert (4, "shards") in attribute_uses(leaky)
