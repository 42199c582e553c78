"""The gate's package is curated as the engine's is: sorted ``__all__`` lists, and typed."""

from __future__ import annotations

import importlib
from importlib.resources import files

import pytest


def isort_order(names: list[str]) -> list[str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions, each sorted."""
    return sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))


@pytest.mark.parametrize(
    "module",
    [
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
    assert files("backend").joinpath("py.typed").is_file()
