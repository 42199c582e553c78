"""Fixtures of the engine's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gatemetrics import CounterStore, _faults
from tests.engine.aggregate_helpers import live_stores, live_v1_owners
from tests.shard_tools import LegacyV1Shard


@pytest.fixture
def fault() -> Iterator[Callable[[Callable[[str], None]], None]]:
    """Install a crash-point hook for one test; always removed afterwards."""

    def install(hook: Callable[[str], None]) -> None:
        _faults.HOOK = hook

    try:
        yield install
    finally:
        _faults.HOOK = None


@pytest.fixture
def live() -> Iterator[Callable[[Path, int], CounterStore]]:
    """Stores of this live test process bound to a directory (format v2); closed at teardown."""
    yield from live_stores()


@pytest.fixture
def live_v1() -> Iterator[Callable[[Path, int], LegacyV1Shard]]:
    """Previous-release owners living in this test process (format v1, write-through)."""
    yield from live_v1_owners()
