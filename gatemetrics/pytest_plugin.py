"""pytest plugin (entry point ``pytest11``): isolated shard directories and stores per test.

Installed with gatemetrics and active in every pytest run of the environment; importing it costs
nothing (gatemetrics is imported only when a fixture is used). Fixtures, all synchronous and so
usable from sync tests, pytest-asyncio tests and anyio tests alike:

``gatemetrics_dir``
    a fresh, empty shard directory (``tmp_path / "gatemetrics"``), never shared between tests.
``gatemetrics_schema``
    the :class:`gatemetrics.Schema` of your stores. Override it in your ``conftest.py``.
``gatemetrics_store_factory``
    a zero-argument callable making a new store; defaults to ``CounterStore(schema)``. Override
    it to return your own store class (a subclass of ``CounterStore`` with your recorders).
``gatemetrics_store``
    a new store bound write-through to ``gatemetrics_dir``: every record is on disk when the
    call returns. At teardown the binding is closed (final save, lifetime lock released), so
    no file descriptor or lock outlives the test.
``gatemetrics_aggregate``
    ``aggregate(compact=False) -> gatemetrics.Aggregate`` of ``gatemetrics_dir``, with the
    pipeline families under ``gatemetrics_namespace`` (default ``"gatemetrics"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gatemetrics.aggregate import Aggregate
    from gatemetrics.schema import Schema
    from gatemetrics.store import CounterStore

__all__ = [
    "gatemetrics_aggregate",
    "gatemetrics_dir",
    "gatemetrics_namespace",
    "gatemetrics_schema",
    "gatemetrics_store",
    "gatemetrics_store_factory",
]


@pytest.fixture
def gatemetrics_dir(tmp_path: Path) -> Path:
    """A fresh shard directory for this test only."""
    path = tmp_path / "gatemetrics"
    path.mkdir()
    return path


@pytest.fixture
def gatemetrics_schema() -> Schema:
    """The schema of the stores under test: override this fixture in your conftest.py."""
    raise pytest.UsageError(
        "the gatemetrics_schema fixture must be overridden in your conftest.py to return "
        "your gatemetrics.Schema (or override gatemetrics_store_factory)"
    )


@pytest.fixture
def gatemetrics_namespace() -> str:
    """Prefix of the pipeline families in ``gatemetrics_aggregate`` results."""
    return "gatemetrics"


@pytest.fixture
def gatemetrics_store_factory(request: pytest.FixtureRequest) -> Callable[[], CounterStore]:
    """Makes a new store; override to build your own store class."""
    from gatemetrics.store import CounterStore  # noqa: PLC0415 - keep plugin import free

    schema = request.getfixturevalue("gatemetrics_schema")
    return lambda: CounterStore(schema)


@pytest.fixture
def gatemetrics_store(
    gatemetrics_store_factory: Callable[[], CounterStore], gatemetrics_dir: Path
) -> Iterator[CounterStore]:
    """A new store, bound write-through to ``gatemetrics_dir``; closed at teardown."""
    from gatemetrics.shards import bind  # noqa: PLC0415 - keep plugin import free

    store = gatemetrics_store_factory()
    binding = bind(store, gatemetrics_dir)
    try:
        yield store
    finally:
        binding.close()


@pytest.fixture
def gatemetrics_aggregate(
    gatemetrics_dir: Path,
    gatemetrics_store_factory: Callable[[], CounterStore],
    gatemetrics_namespace: str,
) -> Callable[..., Aggregate]:
    """``aggregate(compact=False)``: the merged counts of ``gatemetrics_dir`` right now."""
    from gatemetrics.aggregate import aggregate_dir  # noqa: PLC0415 - keep plugin import free

    schema = gatemetrics_store_factory().schema

    def run(*, compact: bool = False) -> Aggregate:
        return aggregate_dir(
            gatemetrics_dir, schema, namespace=gatemetrics_namespace, compact=compact
        )

    return run
