"""gunicorn server hooks: final save in ``worker_exit``, compaction in ``child_exit``.

In ``gunicorn.conf.py``::

    from gatemetrics import gunicorn as gatemetrics_hooks
    from myapp.metrics import SCHEMA  # your application's gatemetrics.Schema

    gatemetrics_hooks.configure(schema=SCHEMA, namespace="myapp")
    worker_exit = gatemetrics_hooks.worker_exit   # in the worker: save and close its shards
    child_exit = gatemetrics_hooks.child_exit     # in the master: compact the dead worker away

``worker_exit`` runs in a worker that is shutting down (``--max-requests`` recycling, graceful
stop): it saves the last counts of every bound store (see :func:`gatemetrics.bind`) and
releases their lifetime locks. ``child_exit`` runs in the master after a worker has gone,
whatever killed it, and folds dead shards into the archive so the directory keeps about one
shard per live worker. It never waits long for the directory lock (a cron aggregation may hold
it; the next exit or the cron compacts instead), never starts a thread (the master forks) and
never raises. The directory is the one given to :func:`configure`, else ``$GATEMETRICS_DIR``.

Works with and without ``--preload``: a store bound in the master before the fork is reset in
each worker, which becomes a new incarnation with a shard of its own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from gatemetrics.aggregate import aggregate_dir
from gatemetrics.schema import Schema
from gatemetrics.shards import close_all_bindings

__all__ = ["child_exit", "configure", "worker_exit"]

_log = logging.getLogger("gatemetrics.gunicorn")


@dataclass(frozen=True)
class _Config:
    schema: Schema
    namespace: str
    directory: str | None
    lock_timeout: float


_config: _Config | None = None


def configure(
    *,
    schema: Schema,
    namespace: str,
    directory: str | os.PathLike[str] | None = None,
    lock_timeout: float = 0.5,
) -> None:
    """Enable compaction in ``child_exit`` for ``schema`` (call it in ``gunicorn.conf.py``)."""
    global _config  # noqa: PLW0603 - gunicorn hooks are module-level functions by design
    if not isinstance(schema, Schema):
        raise TypeError(f"schema must be a gatemetrics Schema, not {type(schema).__name__}")
    _config = _Config(
        schema, namespace, None if directory is None else os.fspath(directory), lock_timeout
    )


def _server_log(server: Any) -> Any:
    log = getattr(server, "log", None)
    return log if log is not None and hasattr(log, "warning") else _log


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (in the worker): save and close every bound store of this process."""
    failed = close_all_bindings()
    if failed:
        _server_log(server).warning(
            "gatemetrics: %d final shard save(s) failed in worker %s", failed, os.getpid()
        )


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (in the master): compact the shard directory; never raises."""
    config = _config
    if config is None:
        return
    directory = config.directory or os.environ.get("GATEMETRICS_DIR")
    if not directory:
        return
    try:
        aggregate_dir(
            directory,
            config.schema,
            namespace=config.namespace,
            compact=True,
            lock_timeout=config.lock_timeout,
        )
    except FileNotFoundError:
        return  # no worker has saved yet
    except TimeoutError:
        return  # another aggregation holds the directory: it compacts, or the next exit does
    except Exception as exc:  # noqa: BLE001 - a hook must never take the master down
        _server_log(server).warning("gatemetrics: compaction of %s failed: %s", directory, exc)
