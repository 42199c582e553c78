"""What keeps one release-gate worker serving under hostile local clients.

uvicorn alone (0.55, httptools or h11) lets any client that can connect degrade the gate:

* ``limit_concurrency`` answers 503 only once a request's headers are complete; a connection that
  sends nothing, or half its headers, is accepted, kept and never counted against anything, so
  idle connections use up the worker's descriptors (1,024 by default) and the checks' audit
  writes fail with ``EMFILE`` (the gate then denies: fail-closed, but a denial of service).
* ``timeout_keep_alive`` is armed only after a response, and disarmed by the first byte of the
  next request: a fresh connection, or one that trickles a byte now and then, has no timeout.

So the worker (``service/backend/app/worker.py``) adds, with the smallest mechanism that covers both
HTTP parsers, a subclass of uvicorn's protocol class (:func:`guarded_protocol`):

* **a header deadline**: a connection's request headers must be complete within
  ``header_timeout`` seconds of the connection opening, or of its previous response (a
  keep-alive connection; uvicorn's own keep-alive timeout closes an idle one even sooner). The
  timer is never pushed back by more bytes, so trickling does not help. Once the headers are
  in, the app's own body timeout (``RELEASE_GATE_BODY_TIMEOUT``, answer 408) takes over.
* **a connection bound** (``max_connections`` per worker): when a new connection would exceed
  it, the connection that has waited longest for its client (idle, half-sent headers, an idle
  keep-alive, or a check whose body has not all arrived: nothing is decided yet) is dropped to
  make room; only when every connection is busy with a request
  is the new one answered a canned 503 (``too_many_connections``) and closed. Dropping the
  oldest waiter rather than refusing the newcomer is what keeps genuine checks, which send
  their headers within a millisecond of connecting, served during a flood of idle connections.

and at worker start (:func:`raise_nofile_limit`, :func:`plan_descriptors`) raises the soft
descriptor limit to the hard one and keeps ``fd_reserve`` descriptors out of the connections'
reach: the bound and the accept batch are clamped so that connections, plus the sockets
accepted but not yet dropped, never take more than the limit minus the reserve.

:class:`RateLimitFilter` bounds the log: a flood of bad clients (invalid requests, dropped
connections, accept errors) gives at most ``burst`` lines per kind per ``interval`` seconds;
the next line of a kind after a quiet interval carries the count of the lines suppressed.

Hazards, plainly:

* A client that completes its headers and then never reads its response holds its connection
  until the response fits in the socket buffers (ours are small, far below those buffers) or
  gunicorn's ``timeout`` ends a worker that stopped answering; busy connections are never
  dropped.
* An attacker who opens connections faster than ``max_connections`` per header round trip of a
  genuine client (hundreds per millisecond) can still have that client's connection dropped
  before its headers arrive: the client sees a reset, nothing was decided, retrying is safe.
* The accept batch is also the listen backlog: asyncio calls ``listen(batch)`` again on the
  socket it is given, and gunicorn's workers share that socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from backend.app.settings import _env_count, _env_seconds

__all__ = [
    "DescriptorPlan",
    "GuardStats",
    "RateLimitFilter",
    "ServiceLimits",
    "guarded_protocol",
    "plan_descriptors",
    "raise_nofile_limit",
]

_log = logging.getLogger("backend.app.limits")

#: What a connection refused at the bound is answered (before anything was read).
_REFUSAL_BODY = (
    b'{"error":"too_many_connections","message":"this worker is serving its maximum number of'
    b' connections; retry later"}'
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"\r\n" + _REFUSAL_BODY
)


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """The per-worker limits; :meth:`from_env` reads them from the environment.

    ``max_connections`` (``RELEASE_GATE_MAX_CONNECTIONS``, default 256): open connections per
    worker. ``header_timeout`` (``RELEASE_GATE_HEADER_TIMEOUT``, default 5 s): see the module.
    ``fd_reserve`` (``RELEASE_GATE_FD_RESERVE``, default 256): descriptors kept for the audit
    log, the shard directory, ``/metrics`` renders and the rest of the process.
    """

    max_connections: int = 256
    header_timeout: float = 5.0
    fd_reserve: int = 256

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceLimits:
        """Raises ``ValueError`` naming the variable for a value that is not usable."""
        env = os.environ if environ is None else environ
        return cls(
            max_connections=_env_count(
                env, "RELEASE_GATE_MAX_CONNECTIONS", default=256, maximum=1_000_000
            ),
            header_timeout=_env_seconds(
                env, "RELEASE_GATE_HEADER_TIMEOUT", default=5.0, maximum=300.0
            ),
            fd_reserve=_env_count(
                env, "RELEASE_GATE_FD_RESERVE", default=256, minimum=16, maximum=1_000_000
            ),
        )


# -- descriptors -------------------------------------------------------------------------------


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; ``(before, after, hard)``.

    An unlimited hard limit is not a number the kernel accepts for the soft one (Linux caps it
    at ``fs.nr_open``): then 1,048,576 is tried, and failing that, nothing changes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        # The platform may refuse: keep the soft limit then, the descriptor plan accounts for it.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    after, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, after, hard


@dataclass(frozen=True, slots=True)
class DescriptorPlan:
    """How a worker's descriptors are shared: see :func:`plan_descriptors`."""

    nofile: int
    max_connections: int
    accept_batch: int
    clamped: bool  # the configured bound or backlog did not fit and was lowered


def plan_descriptors(limits: ServiceLimits, nofile: int, backlog: int) -> DescriptorPlan:
    """Clamp the connection bound and the accept batch to what ``nofile`` leaves after the
    reserve.

    asyncio accepts up to ``backlog`` sockets per wake-up and a dropped socket is closed three
    loop iterations after its accept, while the listening socket may be read again each
    iteration: at worst ``max_connections + 3 * batch`` sockets are open at once. Both are
    clamped so that this stays within ``nofile - fd_reserve`` (half the room for connections).
    """
    budget = max(2, nofile - limits.fd_reserve)
    max_connections = max(1, min(limits.max_connections, budget // 2))
    accept_batch = max(1, min(backlog, (budget - max_connections) // 4))
    clamped = max_connections < limits.max_connections or accept_batch < backlog
    return DescriptorPlan(nofile, max_connections, accept_batch, clamped)


# -- connections ---------------------------------------------------------------------------------


@dataclass(slots=True)
class GuardStats:
    """What the guard did in this worker, for logs and tests."""

    dropped_waiting: int = 0  # made room for a newcomer
    timed_out: int = 0  # headers not complete within header_timeout
    refused: int = 0  # answered 503: every connection was busy


def guarded_protocol(
    base: type[asyncio.Protocol],
    max_connections: int,
    header_timeout: float,
    stats: GuardStats | None = None,
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's ``base`` protocol (httptools or h11) with the header deadline
    and the connection bound of this module. ``stats`` is updated in place.

    It relies on what both uvicorn protocols have: ``connections`` (the server's set of open
    protocols), ``transport``, ``loop``, ``cycle`` (the current request, ``None`` before the
    first; ``response_complete`` once answered), and the ``connection_made``,
    ``data_received``, ``on_response_complete`` and ``connection_lost`` methods.
    """
    counts = GuardStats() if stats is None else stats

    class GuardedProtocol(base):  # type: ignore[valid-type,misc]
        # Loop time since when this connection waits for its client (request headers, or the
        # rest of a body); None once a whole request is in: the app is deciding, and a
        # decision being made is never dropped.
        _waiting_since: float | None = None
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._wait_for_headers()
            if len(self.connections) <= max_connections:
                return
            oldest = _oldest_waiting(self.connections, self)
            if oldest is not None:
                counts.dropped_waiting += 1
                _log.warning(
                    "release gate worker %d: at its limit of %d connections; dropped the one"
                    " waiting longest for request headers",
                    os.getpid(),
                    max_connections,
                )
                oldest._drop()
            else:
                counts.refused += 1
                _log.warning(
                    "release gate worker %d: all %d connections busy; refused a new one (503)",
                    os.getpid(),
                    max_connections,
                )
                self._stop_waiting()
                transport.write(_REFUSAL)
                transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._sync()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._sync()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _sync(self) -> None:
            cycle = self.cycle
            if self.transport.is_closing():
                self._stop_waiting()
            elif cycle is not None and not cycle.response_complete:
                # Headers are in: the app's body timeout takes over from the header deadline.
                # Until the body is in too, the app waits for the client and decides nothing,
                # so the connection may still be dropped to make room (the app then sees a
                # disconnect and answers nothing).
                self._cancel_deadline()
                if not cycle.more_body:
                    self._waiting_since = None
            elif self._waiting_since is None:
                self._wait_for_headers()  # answered; the next request's deadline starts now

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self._waiting_since = self.loop.time()
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _stop_waiting(self) -> None:
            self._waiting_since = None
            self._cancel_deadline()

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                counts.timed_out += 1
                # INFO: browsers' speculative connections end this way too.
                _log.info(
                    "release gate worker %d: closed a connection whose request headers were"
                    " not complete within %g s",
                    os.getpid(),
                    header_timeout,
                )
                self._drop()

        def _drop(self) -> None:
            self._stop_waiting()
            # abort, not close: a client that does not read must not keep the descriptor
            # open behind an unflushed write buffer.
            self.transport.abort()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def _oldest_waiting(connections: Any, newcomer: Any) -> Any:
    """The connection waiting longest for request headers, other than ``newcomer``; O(n) for
    n at most the bound, only when the bound is reached."""
    oldest: Any = None
    for conn in connections:
        since = getattr(conn, "_waiting_since", None)
        if conn is newcomer or since is None or conn.transport.is_closing():
            continue
        if oldest is None or since < oldest._waiting_since:
            oldest = conn
    return oldest


# -- logs -----------------------------------------------------------------------------------------


class RateLimitFilter(logging.Filter):
    """At most ``burst`` records per kind per ``interval`` seconds; put it on handlers.

    A kind is the logger's name, the level and the unformatted message, so distinct problems
    are never hidden behind one another. The first record of a kind let through after some
    were suppressed says how many. At most ``max_kinds`` kinds are tracked (messages built with
    f-strings would otherwise make every line a kind of its own): the rest share one per logger
    and level. Not thread-safe beyond the GIL's atomicity of dict operations: counts may be off
    by one under concurrent logging, which is harmless here.
    """

    def __init__(
        self,
        burst: int = 10,
        interval: float = 10.0,
        *,
        max_kinds: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.max_kinds = max_kinds
        self._clock = clock
        # kind -> [window start, lines let through in the window, suppressed since last shown]
        self._kinds: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        if key not in self._kinds and len(self._kinds) >= self.max_kinds:
            key = (record.name, record.levelno, "*")
        now = self._clock()
        state = self._kinds.get(key)
        if state is None:
            state = self._kinds[key] = [now, 0, 0]
        elif now - state[0] >= self.interval:
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if state[2]:
            record.msg = (
                f"{record.getMessage()} ({int(state[2])} more line(s) like this suppressed"
                f" since the last one; at most {self.burst} per {self.interval:g} s)"
            )
            record.args = None
            state[2] = 0
        elif state[1] == self.burst:
            record.msg = (
                f"{record.getMessage()} (this is line {self.burst} of this kind in"
                f" {self.interval:g} s; suppressing more)"
            )
            record.args = None
        return True
