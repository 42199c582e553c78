"""anyio helpers: save a store, or read a directory for a scrape, from async code without
touching the event loop's thread.

Every file operation (creating the directory, taking the shard's lifetime lock, writing, fsync)
runs in a worker thread through ``anyio.to_thread.run_sync``; the event loop only awaits. Works
on asyncio and trio alike.

``periodic_saver`` is the async counterpart of a periodic :func:`gatemetrics.bind`::

    async with periodic_saver(store, "/var/lib/gatemetrics", interval=5):
        await serve()          # saves every 5 s when something changed, once more on exit

The final save runs shielded from cancellation, so a cancelled service still saves its counts.
:func:`aread_dir` is :func:`gatemetrics.read_dir` (the shared-lock scrape read) in a thread.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio

from gatemetrics._checks import check_seconds, check_writable
from gatemetrics.aggregate import Aggregate, read_dir
from gatemetrics.persistence import PersistedStore
from gatemetrics.schema import Schema
from gatemetrics.shards import Durability, Shard, save_to_dir, shard_for

__all__ = ["aread_dir", "asave", "periodic_saver"]


async def aread_dir(
    directory: str | os.PathLike[str],
    schema: Schema,
    *,
    namespace: str,
    lock_timeout: float = 10.0,
    limiter: anyio.CapacityLimiter | None = None,
) -> Aggregate:
    """:func:`gatemetrics.read_dir` in a worker thread (from ``limiter``, default anyio's).

    Waiting for the lock happens in that thread too: the event loop only awaits. Give scrapes
    a limiter of their own when the app's other work uses threads, so scrapes stalled on a
    held lock cannot take every default token. Raises what :func:`~gatemetrics.read_dir` raises.
    """
    timeout = check_seconds("lock_timeout", lock_timeout, allow_zero=True)  # raised here
    return await anyio.to_thread.run_sync(
        partial(read_dir, directory, schema, namespace=namespace, lock_timeout=timeout),
        limiter=limiter,
    )


async def asave(
    store: PersistedStore,
    directory: str | os.PathLike[str],
    *,
    durability: Durability | str = Durability.PROCESS_CRASH,
    failure_key: str | None = None,
) -> bool:
    """:func:`gatemetrics.save_to_dir` in a worker thread; False on failure, never raises."""
    check_writable(store)  # here, so the error is raised where the call was made
    return await anyio.to_thread.run_sync(
        partial(save_to_dir, store, directory, durability=durability, failure_key=failure_key)
    )


def _open_shard(
    store: PersistedStore,
    directory: str | os.PathLike[str],
    durability: Durability | str,
    failure_key: str | None,
) -> Shard:
    shard = shard_for(store, directory, durability=durability, failure_key=failure_key)
    shard.open()
    return shard


def _save_if_unsaved(shard: Shard) -> bool:
    return shard.save() if shard.unsaved() else True


@asynccontextmanager
async def periodic_saver(
    store: PersistedStore,
    directory: str | os.PathLike[str],
    *,
    interval: float = 5.0,
    durability: Durability | str = Durability.PROCESS_CRASH,
    failure_key: str | None = None,
) -> AsyncIterator[Shard]:
    """Save ``store`` every ``interval`` seconds while the block runs, and once more on exit.

    Entering takes the shard's lifetime lock (in a thread) and raises ``ShardWriteError`` if
    the directory is unusable. Saves happen only when counts changed. Exiting, even by
    cancellation, stops the loop, saves once more and releases the lifetime lock; a save that
    fails is counted in ``failure_key`` and never raises.
    """
    seconds = check_seconds("interval", interval)
    check_writable(store)
    shard = await anyio.to_thread.run_sync(
        partial(_open_shard, store, directory, durability, failure_key)
    )

    async def loop() -> None:
        while True:
            await anyio.sleep(seconds)
            # Not abandoned on cancellation: a save in flight finishes before the final one.
            await anyio.to_thread.run_sync(_save_if_unsaved, shard)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            try:
                yield shard
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The loop never raises, so a group holds what the body raised: give the caller the
        # exception it raised, not a wrapper around it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shard.close)
