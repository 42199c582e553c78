"""Tests of gatemetrics.aio: saving from async code, never on the event loop's thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

import gatemetrics.aio
from gatemetrics import (
    CounterStore,
    Schema,
    ShardWriteError,
    _faults,
    asave,
    periodic_saver,
    shard_for,
)
from tests.engine.schema import SHOP_NAMESPACE, SHOP_SCHEMA
from tests.engine.shard_helpers import FAILURES, agg, pay, refuse, shop_store


# The plugin's fixtures make shop stores in this module (the root conftest makes gate stores).
@pytest.fixture
def gatemetrics_schema() -> Schema:
    return SHOP_SCHEMA


@pytest.fixture
def gatemetrics_store_factory() -> Callable[[], CounterStore]:
    return shop_store


@pytest.fixture
def gatemetrics_namespace() -> str:
    return SHOP_NAMESPACE


async def paid(directory: Path) -> int:
    def read() -> int:
        return agg(directory).snapshot().get("orders", "paid")

    return await anyio.to_thread.run_sync(read)


@pytest.fixture
def io_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """Ids of the threads that did shard file I/O during the test."""
    seen: set[int] = set()
    real_open = gatemetrics.aio._open_shard

    def record_open(*args: object) -> object:
        seen.add(threading.get_ident())
        return real_open(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gatemetrics.aio, "_open_shard", record_open)
    _faults.HOOK = lambda step: seen.add(threading.get_ident())
    try:
        yield seen
    finally:
        _faults.HOOK = None


@pytest.mark.anyio
async def test_asave_saves_in_a_worker_thread(tmp_path: Path, io_threads: set[int]) -> None:
    store = shop_store()
    pay(store)
    assert await asave(store, tmp_path)
    assert await paid(tmp_path) == 1
    assert io_threads
    assert threading.get_ident() not in io_threads
    shard_for(store, tmp_path).close(save=False)


@pytest.mark.anyio
async def test_asave_refuses_a_read_only_view(tmp_path: Path) -> None:
    view = agg(tmp_path)  # the engine's merged view of the directory
    with pytest.raises(TypeError, match="read-only"):
        await asave(view, tmp_path)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_asave_returns_false_and_counts_a_failure_for_a_bad_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "f").write_text("")
    store = shop_store()
    assert not await asave(store, tmp_path / "f", failure_key=FAILURES)
    assert store.get(FAILURES) == 1


@pytest.mark.anyio
async def test_periodic_saver_saves_while_running_and_once_more_on_exit(
    tmp_path: Path, io_threads: set[int]
) -> None:
    store = shop_store()
    async with periodic_saver(store, tmp_path, interval=0.01) as shard:
        assert shard.identity is not None  # the lifetime lock is held from the start
        pay(store)
        with anyio.fail_after(10):
            while await paid(tmp_path) < 1:  # noqa: ASYNC110 - polling files: no event
                await anyio.sleep(0.005)
        for _ in range(4):
            pay(store)
    assert shard.identity is None  # closed: the lock is released, the shard is dead
    assert await paid(tmp_path) == 5
    assert threading.get_ident() not in io_threads


@pytest.mark.anyio
async def test_the_final_save_survives_cancellation(tmp_path: Path) -> None:
    store = shop_store()
    with anyio.move_on_after(0.05) as scope:
        async with periodic_saver(store, tmp_path, interval=3600):
            for _ in range(3):
                pay(store)
            await anyio.sleep(60)
    assert scope.cancelled_caught
    assert await paid(tmp_path) == 3


@pytest.mark.anyio
async def test_the_final_save_runs_when_the_body_raises(tmp_path: Path) -> None:
    store = shop_store()

    async def failing_service() -> None:
        async with periodic_saver(store, tmp_path, interval=3600):
            pay(store)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as err:
        await failing_service()
    assert type(err.value) is RuntimeError  # not wrapped in an ExceptionGroup
    assert await paid(tmp_path) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), "5"])
async def test_periodic_saver_rejects_bad_intervals(tmp_path: Path, interval: object) -> None:
    with pytest.raises(ValueError, match="interval"):
        async with periodic_saver(shop_store(), tmp_path, interval=interval):  # type: ignore[arg-type]
            pass


@pytest.mark.anyio
async def test_periodic_saver_refuses_views_and_unusable_directories(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="read-only"):
        async with periodic_saver(agg(tmp_path), tmp_path):  # type: ignore[arg-type]
            pass
    (tmp_path / "f").write_text("")
    with pytest.raises(ShardWriteError):
        async with periodic_saver(shop_store(), tmp_path / "f" / "x"):
            pass


@pytest.mark.asyncio
async def test_works_under_pytest_asyncio_with_the_plugin_fixtures(
    gatemetrics_dir: Path,
    gatemetrics_store_factory: Callable[[], CounterStore],
) -> None:
    store = gatemetrics_store_factory()
    refuse(store, "no_money")
    async with periodic_saver(store, gatemetrics_dir, interval=3600):
        pass
    assert os.listdir(gatemetrics_dir)
    view = await anyio.to_thread.run_sync(agg, gatemetrics_dir)
    assert view.snapshot().family("refusals")["no_money"] == 1
