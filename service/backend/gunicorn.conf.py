"""gunicorn configuration for the release-gate backend (``backend.app.main:app``).

    gunicorn -c service/backend/gunicorn.conf.py backend.app.main:app

Command-line flags override what is set here (``--bind``, ``--workers``, ``--preload``,
``--max-requests`` ...). What this file fixes, and why:

* uvicorn workers from the ``uvicorn-worker`` package (``uvicorn.workers`` is deprecated and
  warns). The app is ASGI: one event loop per worker; audit writes and shard saves run in
  worker threads.
* the gatemetrics hooks: ``worker_exit`` (in the worker) saves its shard one last time and
  releases it; ``child_exit`` (in the master) folds dead workers' shards into the archive, so
  the directory keeps about one shard per live worker however often workers recycle or crash.
  The hook waits at most 0.5 s for the directory lock: when the cron aggregator holds it, the
  cron compacts instead.
* ``GATEMETRICS_DIR`` and ``RELEASE_GATE_AUDIT_LOG`` are resolved once here, in the master, to
  absolute paths (defaults: see ``backend/app/settings.py``) and written back to the environment,
  so the master's compaction and every worker use exactly the same paths.
* no control socket (gunicorn 27 otherwise creates ``~/.gunicorn``, a surprise in a service's
  home directory and a failure where the home is read-only).
* loopback by default: the app has no authentication of its own.
* the ``backend`` and ``gatemetrics`` loggers (the gate's audit and metric failures, shard save
  failures, quarantined files, worker start-up) write to gunicorn's error log, in its format, in
  the master and in every worker; otherwise only their warnings would reach stderr, unformatted.

Works with and without ``--preload``: the app module creates nothing at import, each worker
builds its own store and audit log in the ASGI lifespan startup, after the fork.

Hostile clients (``backend/app/limits.py``, applied by the worker class): each worker raises its
soft descriptor limit to the hard one, keeps ``RELEASE_GATE_FD_RESERVE`` (256) descriptors for
the audit log, the shard and ``/metrics``, and serves at most ``RELEASE_GATE_MAX_CONNECTIONS``
(256) connections: beyond that, the connection waiting longest for its request headers is
dropped, or when every one is busy with a request the newcomer is answered 503. Request headers
must be complete within ``RELEASE_GATE_HEADER_TIMEOUT`` (5 s) of connecting or of the previous
response, a check's body within ``RELEASE_GATE_BODY_TIMEOUT`` (5 s, answer 408), and an idle
keep-alive connection is closed after ``keepalive`` (5 s). ``backlog`` is lowered to fit the
descriptor limit (it is also asyncio's accept batch). Error-log lines are rate-limited per kind
(10 per 10 s).

Timeouts: a worker's heartbeat comes from its event loop, which never blocks on file I/O, so
gunicorn's ``timeout`` (30 s) only fires for a truly stuck worker. ``graceful_timeout`` bounds a
recycle or stop: in-flight checks finish (their audit entry and count are written), then the
worker saves its shard and exits; a worker still busy after it is SIGKILLed by the master, which
loses no counted decision (write-through) but breaks the connections it still held.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from backend.app.settings import Settings
from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA
from gatemetrics import gunicorn as gatemetrics_hooks

_settings = Settings.from_env()
os.environ["GATEMETRICS_DIR"] = _settings.metrics_dir
os.environ["RELEASE_GATE_AUDIT_LOG"] = _settings.audit_log

bind = ["127.0.0.1:8000"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "backend.app.worker.ReleaseGateWorker"  # asyncio, not uvloop (see there)
control_socket_disable = True
timeout = 30
graceful_timeout = 30
keepalive = 5

gatemetrics_hooks.configure(
    schema=GATE_SCHEMA, namespace=GATE_NAMESPACE, directory=_settings.metrics_dir
)
worker_exit = gatemetrics_hooks.worker_exit
child_exit = gatemetrics_hooks.child_exit


_OUR_LOGGERS = ("backend", "gatemetrics")


def _log_through(error_log: logging.Logger) -> None:
    """Send our loggers' records to gunicorn's error log handlers (as uvicorn-worker does for
    uvicorn's loggers)."""
    for name in _OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = list(error_log.handlers)
        logger.setLevel(error_log.level)
        logger.propagate = False


def post_worker_init(worker: Any) -> None:
    """In each worker, before it serves: our log lines go where gunicorn's go."""
    _log_through(worker.log.error_log)


def when_ready(server: Any) -> None:
    """In the master: route our log lines (compaction in child_exit), and say once where the
    counts and the audit trail go."""
    _log_through(server.log.error_log)
    server.log.info(
        "release gate: shards in %s, audit log %s", _settings.metrics_dir, _settings.audit_log
    )
    for name in _settings.defaulted:
        server.log.warning("release gate: %s is not set; using the default path above", name)
