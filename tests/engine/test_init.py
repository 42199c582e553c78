"""The public API is curated: a sorted __all__ that names exactly what exists."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

import gatemetrics


def isort_order(names: list[str]) -> list[str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions, each sorted."""
    return sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))


def test_all_is_sorted_and_resolves() -> None:
    assert list(gatemetrics.__all__) == isort_order(gatemetrics.__all__)
    for name in gatemetrics.__all__:
        assert hasattr(gatemetrics, name), name


def test_all_covers_every_public_name_of_submodules_all() -> None:
    # Whatever a submodule exports for users must be reachable from the package root, except
    # modules that are entry points of their own (CLI, gunicorn hooks, pytest plugin).
    entry_points = {"cli", "gunicorn", "pytest_plugin", "__main__"}
    # An optional extra's bridge: the root cannot import it without prometheus_client.
    entry_points.add("prometheus_client")
    exported = set(gatemetrics.__all__)
    for info in pkgutil.iter_modules(gatemetrics.__path__):
        if info.name.startswith("_") or info.name in entry_points:
            continue
        module = importlib.import_module(f"gatemetrics.{info.name}")
        for name in getattr(module, "__all__", ()):
            if name.isupper() and name not in exported:
                continue  # module-level constants stay in their module unless promoted
            assert name in exported, f"gatemetrics.{info.name}.{name} missing from __all__"


def public_modules() -> list[str]:
    """Every public module of the engine (found, not listed: a new one is covered at once)."""
    found = ["gatemetrics"]
    for info in pkgutil.iter_modules(gatemetrics.__path__):
        if not info.name.startswith("_"):
            found.append(f"gatemetrics.{info.name}")
    return sorted(found)


def defined_public_names(module: object) -> set[str]:
    """The public names a module defines at its top level (not the ones it imports)."""
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_the_public_modules_are_the_expected_ones() -> None:
    # A guard for the parametrization below: pkgutil must see the package's modules.
    assert {"gatemetrics.persistence", "gatemetrics.shards", "gatemetrics.store"} <= set(
        public_modules()
    )


@pytest.mark.parametrize("name", public_modules())
def test_all_lists_every_public_name_a_module_defines(name: str) -> None:
    module = importlib.import_module(name)
    unlisted = defined_public_names(module) - set(module.__all__)
    assert not unlisted, f"{name} defines public names missing from __all__: {sorted(unlisted)}"


@pytest.mark.parametrize("name", public_modules())
def test_every_name_in_all_is_defined(name: str) -> None:
    module = importlib.import_module(name)
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"


@pytest.mark.parametrize(
    "module",
    [
        "gatemetrics.persistence",
        "gatemetrics.schema",
        "gatemetrics.store",
        "gatemetrics.exposition",
        "gatemetrics.errors",
        "gatemetrics.shards",
        "gatemetrics.aggregate",
        "gatemetrics.aio",
        "gatemetrics.gunicorn",
        "gatemetrics.pytest_plugin",
        "gatemetrics.cli",
    ],
)
def test_module_all_is_sorted(module: str) -> None:
    names = list(importlib.import_module(module).__all__)
    assert names == isort_order(names)


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("gatemetrics").joinpath("py.typed").is_file()
