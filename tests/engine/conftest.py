"""Fixtures of the engine's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from gatemetrics import _faults


@pytest.fixture
def fault() -> Iterator[Callable[[Callable[[str], None]], None]]:
    """Install a crash-point hook for one test; always removed afterwards."""

    def install(hook: Callable[[str], None]) -> None:
        _faults.HOOK = hook

    try:
        yield install
    finally:
        _faults.HOOK = None
