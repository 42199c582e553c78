"""The release gate over HTTP: a raw ASGI app for gunicorn with uvicorn workers.

Serve it with ``gunicorn -c service/backend/gunicorn.conf.py backend.app.main:app`` (see that
file and the README). This module holds the routes and the per-worker state; the layers under it
are :mod:`backend.app.settings` (the environment), :mod:`backend.app.asgi` (headers, content
type, the bounded body and its deadline, responses) and :mod:`backend.app.request` (the check
body turned into domain objects, whose constructors check every rule and raise a
:class:`~backend.app.testing.fields.FieldError` that becomes the JSON error below). Routes:

=============================  =========  ==========================================================
path                           methods    answer
=============================  =========  ==========================================================
``/release-gate/check``        POST       the :class:`GateDecision` as JSON (``allowed``,
                                          ``verdict``, ``reasons``, ``override_applied``,
                                          ``audit_detail``)
``/metrics``                   GET, HEAD  the merged exposition of the shard directory: the six
                                          gate families and the two pipeline families, text 0.0.4,
                                          or OpenMetrics 1.0.0 when ``Accept`` prefers it
``/healthz``                   GET, HEAD  ``{"status": "ok", "pid": <worker pid>}``
``/openapi.json``              GET, HEAD  this API as an OpenAPI 3.1 document (``openapi.json``
                                          beside this module; a test keeps it and the code in step)
=============================  =========  ==========================================================

The check body is a JSON object ``{"verdict", "reasons", "override", "release_scope",
"now_ms"}``. ``verdict`` (a :class:`ReleaseVerdict` value) and ``reasons`` (a list of
:class:`BlockReasonCode` values) are required; ``override`` is ``null`` or an object with exactly
the :class:`ReleaseOverride` fields; ``release_scope`` defaults to ``""``; ``now_ms`` (int, or
``null``) defaults to the server's clock. Any other field is refused, so a misspelt ``overide``
cannot be silently ignored.

Errors are JSON objects ``{"error": <code>, "message": <text>, "field": <where, if any>}``:

====== ========================= ==================================================================
status code                      when
====== ========================= ==================================================================
400    ``malformed_json``        the body is not JSON (empty, truncated, not UTF-8, a number beyond
                                 what a double holds, about 1.8e308, which the parser refuses)
400    ``invalid_request``       not an object, a missing or unknown field, a wrong JSON type, a bad
                                 ``Content-Length``
404    ``not_found``             any other path
405    ``method_not_allowed``    another method; the ``Allow`` header lists the right ones
408    ``request_timeout``       the body did not arrive within ``Settings.body_timeout`` seconds (a
                                 stalled client must not hold a worker's task forever)
413    ``body_too_large``        more than 64 KiB, by ``Content-Length`` (refused before reading) or
                                 by counting a chunked body (reading stops at the limit)
415    ``unsupported_media_type`` a check whose ``Content-Type`` is not ``application/json`` (or
                                 ``+json``) in UTF-8
422    ``unknown_verdict``       a verdict that is not a :class:`ReleaseVerdict` value
422    ``unknown_reason``        a reason that is not a :class:`BlockReasonCode` value
422    ``inconsistent_result``   verdict and reasons contradict each other (RELEASE_OK with reasons,
                                 a hold with a blocking reason): :class:`ReleasePolicyResult`
                                 refuses them. 422, not 400: the JSON is well-formed and typed, the
                                 request is semantically impossible, like an unknown verdict.
422    ``invalid_value``         a well-typed value out of range: a non-positive ``ttl_seconds``,
                                 a negative ``now_ms``, control characters in a text field, an
                                 integer outside the signed 64-bit range (any JSON number of
                                 magnitude 2**63 or more in an integer field, however it is
                                 written: the parser turns integers beyond 64 bits into floats,
                                 and a client must not see where that boundary lies), ...
503    ``metrics_unavailable``   ``/metrics`` could not aggregate (directory lock busy past
                                 ``Settings.metrics_lock_timeout``, every slot of the scrape pool
                                 busy, directory missing or unreadable); ``Retry-After`` is set
503    ``too_many_connections``  every connection the worker may hold is busy with a request
                                 (``RELEASE_GATE_MAX_CONNECTIONS``): answered by its protocol
                                 (:mod:`backend.app.limits`) before anything is read, with
                                 ``Retry-After``
503    ``not_ready``             the worker's state cannot be built (only without lifespan
                                 support; with it, the worker does not start at all)
500    ``internal_error``        a bug: logged with its traceback
====== ========================= ==================================================================

A refused request changes no counter and writes no audit entry: everything is validated before
the gate sees it, and the gate itself validates before it audits or counts. The same codes and
statuses, per route, are in ``openapi.json``; tests/app/test_openapi.py fuzzes the app against
it (schemathesis).

Per-worker state (hazard: never at import time). gunicorn's ``--preload`` imports this module in
the master before it forks, so importing it creates nothing: each worker builds its own state in
the ASGI lifespan startup (or on its first request, for a server without lifespan): a
:class:`GateMetricStore` bound write-through to ``$GATEMETRICS_DIR`` (every decision is in the
worker's shard before its response is sent, so a SIGKILL loses no answered decision) and a
:class:`JsonlAuditLog` at ``$RELEASE_GATE_AUDIT_LOG``. Lifespan shutdown saves and closes the
shard. Startup fails, and the worker with it, when either path is unusable: a gate that can
neither count nor audit must not serve.

Defaults when the variables are unset or empty: see :mod:`backend.app.settings`.

Hazard: the app has no authentication. Anyone who can reach it can make gate decisions that are
audited and counted. Keep it on loopback or behind an authenticating proxy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import orjson

from backend.app.asgi import (
    JSON,
    Disconnected,
    HTTPError,
    Receive,
    Scope,
    Send,
    read_body,
    require_json,
    respond,
)
from backend.app.request import CheckRequest, http_error, parse_check
from backend.app.settings import Settings
from backend.app.testing.audit import JsonlAuditLog
from backend.app.testing.fields import FieldError
from backend.app.testing.gate_metrics import GateMetricExporter, GateMetricStore
from backend.app.testing.release_gate import ReleaseGate
from gatemetrics import ExpositionFormat, LockTimeoutError, negotiate

if TYPE_CHECKING:
    from gatemetrics import Binding

__all__ = ["MAX_BODY_BYTES", "ROUTES", "ReleaseGateApp", "Settings", "app", "create_app"]

_log = logging.getLogger("backend.app.main")

#: The largest check body accepted, in bytes (413 beyond it; the README and openapi.json say so).
MAX_BODY_BYTES = 64 * 1024

#: Every path the app serves and its methods (``openapi.json`` documents exactly these).
ROUTES: dict[str, tuple[str, ...]] = {
    "/release-gate/check": ("POST",),
    "/metrics": ("GET", "HEAD"),
    "/healthz": ("GET", "HEAD"),
    "/openapi.json": ("GET", "HEAD"),
}


# -- per-worker state --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Worker:
    binding: Binding
    gate: ReleaseGate  # holds the bound store (the binding only keeps a weak reference)


def _open_worker(settings: Settings) -> _Worker:
    """Build one worker's state; blocking file I/O, run in a thread. Raises if unusable."""
    audit_dir = os.path.dirname(settings.audit_log)
    if "RELEASE_GATE_AUDIT_LOG" in settings.defaulted:
        # Only our own default directory is created: an explicit path whose directory is
        # missing is a misconfiguration (an unmounted volume) that must surface.
        os.makedirs(audit_dir, mode=0o700, exist_ok=True)
    # Probe the audit log exactly as a record opens it (relative to its directory, never
    # through a symlink, never a FIFO or a multiply linked file), so a bad path fails the
    # worker's start instead of denying every decision (the gate fails closed on audit errors).
    audit_log = JsonlAuditLog(settings.audit_log)
    try:
        audit_log.probe()
    except OSError as exc:
        raise OSError(
            exc.errno, f"audit log unusable: {exc.strerror}", settings.audit_log
        ) from None
    store = GateMetricStore()
    # Last, since it takes the shard's lifetime lock: nothing after it can fail. Write-through
    # (the default): record_outcome returns only once the count is in this worker's shard.
    # Raises ShardWriteError for an unusable directory.
    binding = store.bind_to_dir(
        settings.metrics_dir,
        mode=settings.persistence,
        interval=settings.save_interval,
        durability=settings.durability,
    )
    return _Worker(binding, ReleaseGate(audit_log=audit_log, metric_store=store))


# -- the app ------------------------------------------------------------------------------------


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class ReleaseGateApp:
    """The ASGI application; one instance per process, its state built in each worker.

    ``settings``: where shards and the audit log go; default :meth:`Settings.from_env`, read
    when the worker starts (not at construction, so an import before the fork reads nothing).
    ``clock_ms``: the server clock for checks without ``now_ms`` (milliseconds since the epoch).

    State built before a fork (only if someone served requests in the parent) is kept by the
    child: the engine has already made its store a new, empty incarnation there, and the audit
    log takes a lock of its own per process.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self._settings = settings
        self._clock_ms = clock_ms
        self._worker: _Worker | None = None
        self._start_lock: anyio.Lock | None = None
        # The scrape pool, made on first use inside the event loop that serves: admission
        # slots (taken without waiting) and the threads' own limiter, both of that size.
        self._scrape_slots: anyio.CapacityLimiter | None = None
        self._scrape_threads: anyio.CapacityLimiter | None = None

    @property
    def settings(self) -> Settings:
        """The settings in use (read from the environment on first use)."""
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    @property
    def started(self) -> bool:
        """Whether this process's state exists (lifespan startup or a first request ran)."""
        return self._worker is not None

    async def startup(self) -> None:
        """Build this worker's store, shard binding and gate (idempotent, off the loop).

        Raises ``OSError`` (``ShardWriteError`` included) when the shard directory or the audit
        log cannot be used, ``ValueError`` when no default location can be found.
        """
        if self._worker is not None:
            return
        if self._start_lock is None:
            self._start_lock = anyio.Lock()
        async with self._start_lock:
            if self.started:  # another request built it while we waited
                return
            settings = self.settings
            self._worker = await anyio.to_thread.run_sync(_open_worker, settings)
            _log.info(
                "release gate worker %d ready: shards in %s, audit log %s%s",
                os.getpid(),
                settings.metrics_dir,
                settings.audit_log,
                f" (defaults for {', '.join(settings.defaulted)})" if settings.defaulted else "",
            )

    async def shutdown(self) -> None:
        """Save this worker's shard once more and release it (the aggregator may absorb it)."""
        worker, self._worker = self._worker, None
        if worker is not None and not await anyio.to_thread.run_sync(worker.binding.close):
            _log.warning("release gate worker %d: the final shard save failed", os.getpid())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:  # websocket: not served here; the ASGI spec says to raise
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    _log.error("release gate worker %d cannot start: %s", os.getpid(), exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:  # noqa: BLE001 - reported to the server
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _ready(self) -> _Worker:
        """This worker's state, built now if the server ran no lifespan; 503 if impossible."""
        try:
            await self.startup()
        except (OSError, ValueError) as exc:
            raise HTTPError(503, "not_ready", f"the release gate cannot start: {exc}") from None
        assert self._worker is not None
        return self._worker

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        head = method == "HEAD"
        body_read = False
        try:
            allowed = ROUTES.get(path)
            if allowed is None:
                raise HTTPError(404, "not_found", f"no such path: {path}")
            if method not in allowed:
                raise HTTPError(
                    405,
                    "method_not_allowed",
                    f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                    headers=[(b"allow", ", ".join(allowed).encode())],
                )
            if path == "/release-gate/check":
                require_json(scope)
                body = await read_body(
                    scope, receive, limit=MAX_BODY_BYTES, within=self.settings.body_timeout
                )
                body_read = True
                payload, ctype = await self._check(parse_check(body)), JSON
            elif path == "/metrics":
                # Accept is never refused: repeated, malformed or hostile, it gets text 0.0.4.
                accept = b",".join(v for k, v in scope["headers"] if k == b"accept")
                form, content_type = negotiate(accept.decode("latin-1"))
                payload, ctype = await self._metrics(form), content_type.encode()
            elif path == "/openapi.json":
                payload, ctype = _openapi_document(), JSON
            else:
                await self._ready()
                payload, ctype = orjson.dumps({"status": "ok", "pid": os.getpid()}), JSON
            await respond(send, 200, payload, ctype, head=head)
        except HTTPError as exc:
            headers = list(exc.headers)
            if method not in ("GET", "HEAD") and not body_read:
                # The unread rest of the body would be parsed as the next request.
                headers.append((b"connection", b"close"))
            await respond(send, exc.status, exc.body(), JSON, headers, head=head)
        except Disconnected:
            return
        except Exception:  # noqa: BLE001 - a bug still gets a JSON 500, and a traceback in the log
            _log.exception("release gate: %s %s failed", method, path)
            error = HTTPError(500, "internal_error", "internal error (logged on the server)")
            await respond(send, 500, error.body(), JSON, [(b"connection", b"close")], head=head)

    async def _check(self, request: CheckRequest) -> bytes:
        worker = await self._ready()
        now_ms = self._clock_ms() if request.now_ms is None else request.now_ms
        try:
            # acheck: the decision is pure; the audit write and the (write-through) count run
            # in one worker-thread hop, so the loop keeps serving while the audit log fsyncs.
            decision = await worker.gate.acheck(
                request.result, request.override, request.release_scope, now_ms
            )
        except FieldError as exc:  # the gate validates before it audits or counts
            raise http_error(exc) from None
        return orjson.dumps(decision.to_dict())

    async def _metrics(self, form: ExpositionFormat) -> bytes:
        try:
            settings = self.settings
        except ValueError as exc:  # no usable default location
            raise HTTPError(503, "metrics_unavailable", str(exc)) from None
        directory, timeout = settings.metrics_dir, settings.metrics_lock_timeout
        if self._scrape_slots is None or self._scrape_threads is None:
            self._scrape_slots = anyio.CapacityLimiter(settings.metrics_concurrency)
            self._scrape_threads = anyio.CapacityLimiter(settings.metrics_concurrency)
        slots, threads = self._scrape_slots, self._scrape_threads
        try:
            # Taken without waiting: a scrape that would wait for a slot answers at once.
            slots.acquire_nowait()
        except anyio.WouldBlock:
            # Every slot is taken (a stalled aggregator holds the lock and scrapes pile up):
            # answer now rather than queue, so a burst of scrapes holds no connection long.
            raise HTTPError(
                503,
                "metrics_unavailable",
                f"all {slots.total_tokens:g} scrape slot(s) are busy; retry later",
                headers=[(b"retry-after", b"1")],
            ) from None
        try:
            return await _render(directory, timeout, threads, form)
        finally:
            slots.release()


async def _render(
    directory: str, lock_timeout: float, threads: anyio.CapacityLimiter, form: ExpositionFormat
) -> bytes:
    """The exposition of ``directory`` in ``form``; 503 when it cannot be aggregated."""

    def render() -> bytes:
        # strict: a scrape must see 503, not an empty exposition that looks like no traffic.
        # load_from_dir reads under shared locks: concurrent scrapes never wait for each other.
        view = GateMetricStore.load_from_dir(directory, lock_timeout=lock_timeout, strict=True)
        if form == "openmetrics":
            return GateMetricExporter.export_openmetrics(view).encode()
        return GateMetricExporter.export_prometheus(view).encode()

    try:
        # Reading and summing every shard is file I/O under the directory lock: a thread,
        # from the scrape pool's own limiter. The default limiter is the checks': their
        # audit writes must never wait behind scrapes that wait for the directory lock.
        return await anyio.to_thread.run_sync(render, limiter=threads)
    except (LockTimeoutError, OSError) as exc:
        raise HTTPError(
            503,
            "metrics_unavailable",
            f"cannot aggregate {directory}: {exc}",
            headers=[(b"retry-after", b"1")],
        ) from None


_OPENAPI: list[bytes] = []


def _openapi_document() -> bytes:
    """``openapi.json`` beside this module, read once (on first use, not at import)."""
    if not _OPENAPI:
        _OPENAPI.append(resources.files(__package__).joinpath("openapi.json").read_bytes())
    return _OPENAPI[0]


def create_app(
    settings: Settings | None = None, *, clock_ms: Callable[[], int] = _wall_clock_ms
) -> ReleaseGateApp:
    """A new app; see :class:`ReleaseGateApp`. Creates no state until a worker starts."""
    return ReleaseGateApp(settings, clock_ms=clock_ms)


#: What gunicorn serves: ``backend.app.main:app``.
app = create_app()
