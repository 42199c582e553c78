"""The gunicorn worker class of the release-gate service: uvicorn on asyncio's event loop.

``uvicorn_worker.UvicornWorker`` picks uvloop when it is installed (``loop="auto"``). Under
uvloop a worker that exits closes its listening socket's descriptor twice: uvloop closes the
number it was handed, then gunicorn closes its socket object, which still holds that number
(gunicorn logs "Error while closing socket [Errno 9] Bad file descriptor"). If another thread
reused the number in between, as the audit log's thread does for the log file of a check still
in flight during a graceful shutdown, the second close closes *that* file: the check fails with
``EBADF`` (denied), or its line goes to whatever reuses the number next and the log silently
lacks an answered decision. Seen in the end-to-end test with ``--max-requests`` recycling
(about one run in ten). asyncio closes through the socket object, so the second close is a
no-op. The HTTP parser stays ``auto`` (httptools when installed: a parser, it owns no
descriptor).

At start, in the worker (after the fork), before it serves (see ``service/backend/app/limits.py``):

* the soft descriptor limit is raised to the hard one, and the connection bound
  (``RELEASE_GATE_MAX_CONNECTIONS``) and the accept batch (gunicorn's ``backlog``) are clamped
  so that ``RELEASE_GATE_FD_RESERVE`` descriptors stay free for the audit log, the shard and
  ``/metrics``; one log line says what was set;
* uvicorn's protocol is replaced by its guarded subclass: the bound, and a deadline for
  request headers (``RELEASE_GATE_HEADER_TIMEOUT``);
* gunicorn's error-log handlers get a :class:`RateLimitFilter` (every logger routed to them:
  uvicorn's, ours, and asyncio's, which is routed there too), so a flood of bad clients gives
  a bounded number of lines.

A limit that cannot be read from the environment stops the worker at start, with the variable
named in the log.
"""

from __future__ import annotations

import logging
import resource
from typing import Any, ClassVar

# Untyped, and absent where only the test extra is installed (the typing session).
from uvicorn.protocols.http.auto import (  # type: ignore[import-not-found,unused-ignore]
    AutoHTTPProtocol,  # what http="auto" picks: httptools when installed, else h11
)
from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped,import-not-found,unused-ignore]

from backend.app.limits import (
    GuardStats,
    RateLimitFilter,
    ServiceLimits,
    guarded_protocol,
    plan_descriptors,
    raise_nofile_limit,
)

__all__ = ["ReleaseGateWorker"]


class ReleaseGateWorker(UvicornWorker):  # type: ignore[misc,unused-ignore]
    """uvicorn_worker's worker with ``loop="asyncio"``, bounded connections, a header deadline,
    a raised descriptor limit and rate-limited error logs."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**UvicornWorker.CONFIG_KWARGS, "loop": "asyncio"}

    guard_stats: GuardStats

    def init_process(self) -> None:
        # In the worker, after the fork: the limit raised here is this process's own.
        log = self.log.error_log
        rate_limit = RateLimitFilter()
        for handler in log.handlers:
            handler.addFilter(rate_limit)
        asyncio_log = logging.getLogger("asyncio")  # accept errors (EMFILE) would go to stderr
        asyncio_log.handlers = list(log.handlers)
        asyncio_log.propagate = False

        limits = ServiceLimits.from_env()
        before, nofile, hard = raise_nofile_limit()
        plan = plan_descriptors(limits, nofile, self.config.backlog)
        self.guard_stats = GuardStats()
        self.config.http = guarded_protocol(
            AutoHTTPProtocol, plan.max_connections, limits.header_timeout, self.guard_stats
        )
        self.config.backlog = plan.accept_batch
        log.log(
            logging.WARNING if plan.clamped else logging.INFO,
            "release gate worker: descriptor limit %d (was %d, hard %s), %d reserved;"
            " at most %d connections (asked %d), accept batch and backlog %d,"
            " request headers within %g s%s",
            nofile,
            before,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            limits.fd_reserve,
            plan.max_connections,
            limits.max_connections,
            plan.accept_batch,
            limits.header_timeout,
            "; lowered to fit the descriptor limit" if plan.clamped else "",
        )
        super().init_process()
