"""The release gate over HTTP: a raw ASGI app for gunicorn with uvicorn workers.

Serve it with ``gunicorn -c service/backend/gunicorn.conf.py backend.app.main:app`` (see that
file and the README). Routes:

=============================  =========  ==========================================================
path                           methods    answer
=============================  =========  ==========================================================
``/release-gate/check``        POST       the :class:`GateDecision` as JSON (``allowed``,
                                          ``verdict``, ``reasons``, ``override_applied``,
                                          ``audit_detail``)
``/metrics``                   GET, HEAD  the merged exposition of the shard directory: the five
                                          gate families and the two pipeline families, text 0.0.4
``/healthz``                   GET, HEAD  ``{"status": "ok", "pid": <worker pid>}``
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
the gate sees it, and the gate itself validates before it audits or counts.

Per-worker state (hazard: never at import time). gunicorn's ``--preload`` imports this module in
the master before it forks, so importing it creates nothing: each worker builds its own state in
the ASGI lifespan startup (or on its first request, for a server without lifespan): a
:class:`GateMetricStore` bound write-through to ``$GATEMETRICS_DIR`` (every decision is in the
worker's shard before its response is sent, so a SIGKILL loses no answered decision) and a
:class:`JsonlAuditLog` at ``$RELEASE_GATE_AUDIT_LOG``. Lifespan shutdown saves and closes the
shard. Startup fails, and the worker with it, when either path is unusable: a gate that can
neither count nor audit must not serve.

Defaults when the variables are unset or empty: ``$XDG_STATE_HOME/gatemetrics/shards`` and
``$XDG_STATE_HOME/gatemetrics/release-gate-audit.jsonl`` (``$XDG_STATE_HOME`` defaults to
``~/.local/state``): per user, kept across reboots (unlike ``/tmp``), and never shared with
another user. Production sets both explicitly.

Hazard: the app has no authentication. Anyone who can reach it can make gate decisions that are
audited and counted. Keep it on loopback or behind an authenticating proxy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import anyio.to_thread
import orjson

from backend.app.testing.audit import JsonlAuditLog
from backend.app.testing.gate_metrics import GateMetricExporter, GateMetricStore
from backend.app.testing.release_gate import ReleaseGate, ReleaseOverride
from backend.app.testing.release_policy import BlockReasonCode, ReleasePolicyResult, ReleaseVerdict
from gatemetrics.errors import LockTimeoutError
from gatemetrics.exposition import CONTENT_TYPE
from gatemetrics.shards import Durability, Mode

if TYPE_CHECKING:
    from gatemetrics.shards import Binding

__all__ = ["MAX_BODY_BYTES", "ReleaseGateApp", "Settings", "app", "create_app"]

_log = logging.getLogger("backend.app.main")

#: The largest check body accepted, in bytes (design.md section 4).
MAX_BODY_BYTES = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = b"application/json"
_CHECK_FIELDS = frozenset({"verdict", "reasons", "override", "release_scope", "now_ms"})
_OVERRIDE_FIELDS = ("ttl_seconds", "created_at_ms", "scope", "reason", "created_by")
_OVERRIDE_TYPES: dict[str, type] = {
    "ttl_seconds": int,
    "created_at_ms": int,
    "scope": str,
    "reason": str,
    "created_by": str,
}
_VERDICTS = frozenset(v.value for v in ReleaseVerdict)
_REASONS = frozenset(r.value for r in BlockReasonCode)
_ROUTES: dict[str, tuple[str, ...]] = {
    "/release-gate/check": ("POST",),
    "/metrics": ("GET", "HEAD"),
    "/healthz": ("GET", "HEAD"),
}


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """Where a worker keeps its shard and its audit log; absolute paths.

    ``defaulted`` names the environment variables that were unset, so their default was used.
    ``metrics_lock_timeout`` bounds how long ``GET /metrics`` waits for the directory lock (a
    compaction or a cron aggregation holds it) before answering 503; ``metrics_concurrency`` is
    the size of the scrape pool (threads of their own, never the ones the checks' audit writes
    use): a scrape that finds every slot busy answers 503 at once instead of queueing, so a
    stopped aggregator plus a burst of scrapes holds at most that many threads for at most the
    lock timeout each. ``body_timeout`` bounds how long a check's body may take to arrive before
    the answer is 408 (and the connection is closed).

    ``persistence``, ``save_interval`` and ``durability`` choose how the worker's store saves
    its shard (:meth:`GateMetricStore.bind_to_dir`). The default, write-through with
    ``process-crash`` durability, makes every answered decision survive a SIGKILL of its worker
    at the cost of one in-place ``pwrite`` per check (a few microseconds; benchmarks/RESULTS.md
    figure 5 measures what it costs in throughput). ``power-loss`` adds an ``fdatasync`` per
    check, so counts also survive a kernel crash or power loss. ``periodic`` saves every
    ``save_interval`` seconds instead: a worker that is SIGKILLed loses up to one interval of
    counts (the audit log still holds every decision).
    """

    metrics_dir: str
    audit_log: str
    defaulted: tuple[str, ...] = ()
    metrics_lock_timeout: float = 1.0
    metrics_concurrency: int = 2
    body_timeout: float = 5.0
    persistence: Mode = "write-through"
    save_interval: float = 5.0
    durability: Durability = Durability.PROCESS_CRASH

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``GATEMETRICS_DIR`` and ``RELEASE_GATE_AUDIT_LOG``; an empty value is unset.

        Relative paths are made absolute against the current directory, so the gunicorn master
        and its workers agree. Raises ``ValueError`` when a default is needed but no home
        directory is known.
        """
        env = os.environ if environ is None else environ
        metrics_dir = env.get("GATEMETRICS_DIR", "")
        audit_log = env.get("RELEASE_GATE_AUDIT_LOG", "")
        defaulted: list[str] = []
        if not metrics_dir or not audit_log:
            root = os.path.join(_state_home(env), "gatemetrics")
            if not metrics_dir:
                metrics_dir = os.path.join(root, "shards")
                defaulted.append("GATEMETRICS_DIR")
            if not audit_log:
                audit_log = os.path.join(root, "release-gate-audit.jsonl")
                defaulted.append("RELEASE_GATE_AUDIT_LOG")
        return cls(
            os.path.abspath(metrics_dir),
            os.path.abspath(audit_log),
            tuple(defaulted),
            persistence=_env_choice(
                env, "GATEMETRICS_PERSISTENCE", _PERSISTENCE_MODES, "write-through"
            ),
            save_interval=_env_seconds(env, "GATEMETRICS_SAVE_INTERVAL", default=5.0),
            durability=_env_durability(env),
            metrics_lock_timeout=_env_seconds(
                env, "RELEASE_GATE_METRICS_LOCK_TIMEOUT", default=1.0, maximum=60.0
            ),
            metrics_concurrency=_env_count(env, "RELEASE_GATE_METRICS_CONCURRENCY", default=2),
            body_timeout=_env_seconds(env, "RELEASE_GATE_BODY_TIMEOUT", default=5.0, maximum=60.0),
        )


_PERSISTENCE_MODES: tuple[Mode, ...] = ("write-through", "periodic")


def _env_choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> Any:
    """The value of ``name`` if it is one of ``choices``; ``default`` when unset or empty."""
    value = env.get(name, "")
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value[:40]!r}")
    return value


def _env_durability(env: Mapping[str, str]) -> Durability:
    """``GATEMETRICS_DURABILITY``: process-crash (default) or power-loss; the previous
    release's none/file/full still work, with one warning line naming the new value."""
    value = env.get("GATEMETRICS_DURABILITY", "")
    if not value:
        return Durability.PROCESS_CRASH
    try:
        durability, deprecation = Durability.from_setting(value)
    except ValueError:
        choices = ", ".join(Durability)
        raise ValueError(
            f"GATEMETRICS_DURABILITY must be one of {choices}; got {value[:40]!r}"
        ) from None
    if deprecation is not None:
        _log.warning("GATEMETRICS_DURABILITY: %s", deprecation)
    return durability


def _env_seconds(
    env: Mapping[str, str], name: str, *, default: float, maximum: float = 86_400.0
) -> float:
    """A positive, finite number of seconds (at most ``maximum``) from ``name``, or ``default``."""
    value = env.get(name, "")
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds; got {value[:40]!r}") from None
    if not 0 < seconds <= maximum:  # also rejects nan and inf
        raise ValueError(
            f"{name} must be more than 0 and at most {maximum:g} seconds; got {value[:40]!r}"
        )
    return seconds


def _env_count(env: Mapping[str, str], name: str, *, default: int, maximum: int = 64) -> int:
    """A whole number from 1 to ``maximum`` from ``name``, or ``default``."""
    value = env.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise ValueError(f"{name} must be a whole number from 1 to {maximum}; got {value[:40]!r}")
    return int(value)


def _state_home(env: Mapping[str, str]) -> str:
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec ignores relative values
        return xdg
    home = env.get("HOME", "") or os.path.expanduser("~")
    if not os.path.isabs(home):
        raise ValueError(
            "no home directory to put the default shard directory and audit log in: "
            "set GATEMETRICS_DIR and RELEASE_GATE_AUDIT_LOG"
        )
    return os.path.join(home, ".local", "state")


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


# -- errors -------------------------------------------------------------------------------------


class _HTTPError(Exception):
    """A request refused with a JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = tuple(headers)

    def body(self) -> bytes:
        # Messages may quote the request (the gate's own errors do): never echo kilobytes.
        message = self.message if len(self.message) <= 500 else self.message[:497] + "..."
        doc: dict[str, object] = {"error": self.code, "message": message}
        if self.field is not None:
            doc["field"] = self.field
        return orjson.dumps(doc)


class _Disconnected(Exception):
    """The client went away before its request body arrived: nothing to answer."""


def _invalid(message: str, field: str | None = None) -> NoReturn:
    raise _HTTPError(400, "invalid_request", message, field=field)


_JSON_TYPES: dict[type, str] = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _shown(text: str, limit: int = 64) -> str:
    """``text`` quoted for an error message, cut short: a body may hold 64 KiB of it."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _type_name(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


#: Integer fields hold signed 64-bit values (the gate refuses the rest as out of range).
_INT64_BOUND = 2**63


def _expect(value: object, kind: type, field: str) -> None:
    # orjson reads an integer literal beyond 64 bits (below -2**63 or above 2**64-1) as a float.
    # Every double of that magnitude is a whole number, so whatever the client wrote, it meant
    # an integer out of range: the same 422 as 2**63 (which orjson keeps as an int and the gate
    # refuses), so the parser's boundary stays invisible to clients. A smaller float (1.5, 1e5)
    # is a wrong type: 400 below.
    if kind is int and isinstance(value, float) and abs(value) >= _INT64_BOUND:
        raise _HTTPError(
            422,
            "invalid_value",
            f"{field} must be in [-2**63, 2**63-1], got a number of magnitude {abs(value):.3g}",
            field=field,
        )
    # bool is an int subclass in Python but not in JSON: true is never a number here.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        _invalid(f"{field} must be a JSON {_JSON_TYPES[kind]}, not {_type_name(value)}", field)


# -- request parsing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CheckRequest:
    result: ReleasePolicyResult
    override: ReleaseOverride | None
    release_scope: str
    now_ms: int | None


def _parse_check(body: bytes) -> _CheckRequest:
    """Validate a check body; raise :class:`_HTTPError` (400/422) for anything wrong."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _HTTPError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        _invalid(f"the body must be a JSON object, not {_type_name(doc)}")
    unknown = sorted(set(doc) - _CHECK_FIELDS)
    if unknown:
        names = ", ".join(_shown(name) for name in unknown[:5])
        _invalid(f"unknown field(s): {names}", unknown[0][:64])
    for name in ("verdict", "reasons"):
        if name not in doc:
            _invalid(f"{name} is required", name)

    verdict = doc["verdict"]
    _expect(verdict, str, "verdict")
    if verdict not in _VERDICTS:
        raise _HTTPError(
            422,
            "unknown_verdict",
            f"unknown verdict {_shown(verdict)}; expected one of {', '.join(sorted(_VERDICTS))}",
            field="verdict",
        )
    reasons = doc["reasons"]
    _expect(reasons, list, "reasons")
    for i, reason in enumerate(reasons):
        _expect(reason, str, f"reasons[{i}]")
        if reason not in _REASONS:
            raise _HTTPError(
                422,
                "unknown_reason",
                f"unknown block reason {_shown(reason)}",
                field=f"reasons[{i}]",
            )
    try:
        result = ReleasePolicyResult(verdict, reasons)
    except ValueError as exc:
        raise _HTTPError(422, "inconsistent_result", str(exc), field="reasons") from None

    override = _parse_override(doc.get("override"))
    scope = doc.get("release_scope", "")
    _expect(scope, str, "release_scope")
    now_ms = doc.get("now_ms")
    if now_ms is not None:
        _expect(now_ms, int, "now_ms")
    return _CheckRequest(result, override, scope, now_ms)


def _parse_override(raw: object) -> ReleaseOverride | None:
    if raw is None:
        return None
    _expect(raw, dict, "override")
    assert isinstance(raw, dict)  # for mypy: _expect raised otherwise
    unknown = sorted(set(raw) - set(_OVERRIDE_FIELDS))
    if unknown:
        names = ", ".join(_shown(name) for name in unknown[:5])
        _invalid(f"unknown override field(s): {names}", f"override.{unknown[0][:64]}")
    for name in _OVERRIDE_FIELDS:
        if name not in raw:
            _invalid(f"override.{name} is required", f"override.{name}")
        _expect(raw[name], _OVERRIDE_TYPES[name], f"override.{name}")
    try:
        return ReleaseOverride(**raw)
    except ValueError as exc:
        raise _HTTPError(422, "invalid_value", f"override: {exc}", field="override") from None


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case); 400 when it is sent more than once."""
    found: bytes | None = None
    for key, value in scope["headers"]:
        if key == name:
            if found is not None:
                _invalid(f"the {name.decode()} header is repeated")
            found = value
    return found


def _check_content_type(scope: Scope) -> None:
    raw = _header(scope, b"content-type")
    media, _, params = (raw or b"").partition(b";")
    media = media.strip().lower()
    ok = media == _JSON or (media.startswith(b"application/") and media.endswith(b"+json"))
    for param in params.split(b";"):
        key, _, value = param.partition(b"=")
        if key.strip().lower() == b"charset" and value.strip().strip(b'"').lower() != b"utf-8":
            ok = False
    if not ok:
        shown = "none" if raw is None else raw.decode("latin-1")
        raise _HTTPError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json (UTF-8), not {shown}",
        )


def _too_large(what: str) -> _HTTPError:
    return _HTTPError(413, "body_too_large", f"the body {what} the {MAX_BODY_BYTES}-byte limit")


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    """The request body, never more than :data:`MAX_BODY_BYTES` of it.

    A declared ``Content-Length`` over the limit is refused before anything is read; a chunked
    (or under-declared) body is counted as it arrives and refused as soon as it passes the
    limit, without reading further.
    """
    declared = _header(scope, b"content-length")
    if declared is not None:
        text = declared.strip()
        if not text.isdigit():
            _invalid(f"Content-Length must be a non-negative integer, not {declared!r}")
        if int(text) > MAX_BODY_BYTES:
            raise _too_large("declared by Content-Length exceeds")
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large("exceeds")
        chunks.append(chunk)
        more = bool(message.get("more_body", False))
    return b"".join(chunks)


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
            raise _HTTPError(503, "not_ready", f"the release gate cannot start: {exc}") from None
        assert self._worker is not None
        return self._worker

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        head = method == "HEAD"
        body_read = False
        try:
            allowed = _ROUTES.get(path)
            if allowed is None:
                raise _HTTPError(404, "not_found", f"no such path: {path}")
            if method not in allowed:
                raise _HTTPError(
                    405,
                    "method_not_allowed",
                    f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                    headers=[(b"allow", ", ".join(allowed).encode())],
                )
            if path == "/release-gate/check":
                _check_content_type(scope)
                with anyio.move_on_after(self.settings.body_timeout) as waited:
                    body = await _read_body(scope, receive)
                if waited.cancelled_caught:
                    raise _HTTPError(
                        408,
                        "request_timeout",
                        f"the body did not arrive within {self.settings.body_timeout:g} s",
                    )
                body_read = True
                status, payload, ctype = 200, await self._check(_parse_check(body)), _JSON
            elif path == "/metrics":
                status, payload, ctype = 200, await self._metrics(), CONTENT_TYPE.encode()
            else:
                await self._ready()
                status, payload, ctype = (
                    200,
                    orjson.dumps({"status": "ok", "pid": os.getpid()}),
                    _JSON,
                )
            await _respond(send, status, payload, ctype, head=head)
        except _HTTPError as exc:
            headers = list(exc.headers)
            if method not in ("GET", "HEAD") and not body_read:
                # The unread rest of the body would be parsed as the next request.
                headers.append((b"connection", b"close"))
            await _respond(send, exc.status, exc.body(), _JSON, headers, head=head)
        except _Disconnected:
            return
        except Exception:  # noqa: BLE001 - a bug still gets a JSON 500, and a traceback in the log
            _log.exception("release gate: %s %s failed", method, path)
            error = _HTTPError(500, "internal_error", "internal error (logged on the server)")
            await _respond(send, 500, error.body(), _JSON, [(b"connection", b"close")], head=head)

    async def _check(self, request: _CheckRequest) -> bytes:
        worker = await self._ready()
        now_ms = self._clock_ms() if request.now_ms is None else request.now_ms
        try:
            # acheck: the decision is pure; the audit write and the (write-through) count run
            # in one worker-thread hop, so the loop keeps serving while the audit log fsyncs.
            decision = await worker.gate.acheck(
                request.result, request.override, request.release_scope, now_ms
            )
        except TypeError as exc:  # the gate validates before it audits or counts
            _invalid(str(exc))
        except ValueError as exc:
            raise _HTTPError(422, "invalid_value", str(exc)) from None
        return orjson.dumps(decision.to_dict())

    async def _metrics(self) -> bytes:
        try:
            settings = self.settings
        except ValueError as exc:  # no usable default location
            raise _HTTPError(503, "metrics_unavailable", str(exc)) from None
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
            raise _HTTPError(
                503,
                "metrics_unavailable",
                f"all {slots.total_tokens:g} scrape slot(s) are busy; retry later",
                headers=[(b"retry-after", b"1")],
            ) from None
        try:
            return await _render(directory, timeout, threads)
        finally:
            slots.release()


async def _render(directory: str, lock_timeout: float, threads: anyio.CapacityLimiter) -> bytes:
    """The exposition of ``directory``; 503 when it cannot be aggregated."""

    def render() -> bytes:
        view = GateMetricStore.load_from_dir(directory, lock_timeout=lock_timeout)
        return GateMetricExporter.export_prometheus(view).encode()

    try:
        # Reading and summing every shard is file I/O under the directory lock: a thread,
        # from the scrape pool's own limiter. The default limiter is the checks': their
        # audit writes must never wait behind scrapes that wait for the directory lock.
        return await anyio.to_thread.run_sync(render, limiter=threads)
    except (LockTimeoutError, OSError) as exc:
        raise _HTTPError(
            503,
            "metrics_unavailable",
            f"cannot aggregate {directory}: {exc}",
            headers=[(b"retry-after", b"1")],
        ) from None


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


def create_app(
    settings: Settings | None = None, *, clock_ms: Callable[[], int] = _wall_clock_ms
) -> ReleaseGateApp:
    """A new app; see :class:`ReleaseGateApp`. Creates no state until a worker starts."""
    return ReleaseGateApp(settings, clock_ms=clock_ms)


#: What gunicorn serves: ``backend.app.main:app``.
app = create_app()
