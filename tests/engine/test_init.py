"""The public API is curated: a sorted __all__ that names exactly what exists."""

from __future__ import annotations

import importlib
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
    exported = set(gatemetrics.__all__)
    for info in pkgutil.iter_modules(gatemetrics.__path__):
        if info.name.startswith("_") or info.name in entry_points:
            continue
        module = importlib.import_module(f"gatemetrics.{info.name}")
        for name in getattr(module, "__all__", ()):
            if name.isupper() and name not in exported:
                continue  # module-level constants stay in their module unless promoted
            assert name in exported, f"gatemetrics.{info.name}.{name} missing from __all__"


@pytest.mark.parametrize(
    "module",
    [
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
        "backend.app.testing.gate_metrics",
        "backend.app.testing.release_policy",
        "backend.app.testing.release_gate",
        "backend.app.testing.audit",
    ],
)
def test_module_all_is_sorted(module: str) -> None:
    names = list(importlib.import_module(module).__all__)
    assert names == isort_order(names)


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("gatemetrics").joinpath("py.typed").is_file()
    assert files("backend").joinpath("py.typed").is_file()
