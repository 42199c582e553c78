"""``/metrics`` for an app without prometheus_client: an ASGI and a WSGI application.

::

    from gatemetrics.http import metrics_asgi_app, metrics_wsgi_app

    metrics = metrics_asgi_app("/var/lib/gatemetrics", SCHEMA, namespace="shop")  # mount it
    metrics = metrics_wsgi_app("/var/lib/gatemetrics", SCHEMA, namespace="shop")

Each request reads the directory with :func:`gatemetrics.read_dir` (shared locks: scrapes never
queue behind each other, nothing is compacted or written) and answers:

* ``200`` with the exposition: OpenMetrics 1.0.0 when the ``Accept`` header prefers it (see
  :func:`negotiate`), else the text format 0.0.4. ``HEAD`` gets the same headers, no body.
* ``405`` with ``Allow: GET, HEAD`` for any other method.
* ``503`` with ``Retry-After`` when the lock stays held past ``lock_timeout`` (a compaction) or
  the directory cannot be read (missing, permissions): the scrape fails visibly (``up == 0``)
  rather than showing an empty exposition that looks like no traffic.
* ``500`` for a directory whose archive does not fit the schema (the wrong schema was given:
  :class:`~gatemetrics.SchemaError`), with the message; it is logged.

The application serves every path it is given: mount it where ``/metrics`` should be. The ASGI
one reads in a worker thread (from a limiter of its own, ``concurrency`` tokens, so scrapes
stalled on a held lock never take the threads the rest of the app uses); it answers
``lifespan`` events so that it can also be served on its own (``uvicorn module:metrics``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Literal

import anyio

from gatemetrics._checks import check_seconds
from gatemetrics.aggregate import Aggregate, pipeline_schema, read_dir
from gatemetrics.errors import LockTimeoutError, SchemaError
from gatemetrics.exposition import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE
from gatemetrics.schema import Schema

__all__ = ["ExpositionFormat", "metrics_asgi_app", "metrics_wsgi_app", "negotiate"]

_log = logging.getLogger(__name__)

ExpositionFormat = Literal["text", "openmetrics"]

#: An Accept header longer than this is not parsed (the text format is answered): no client
#: needs more, and parsing stays bounded whatever a hostile client sends.
_MAX_ACCEPT_BYTES = 4096
#: Media ranges past this many are ignored, for the same reason.
_MAX_MEDIA_RANGES = 32
_QVALUE = re.compile(r"(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)\Z")  # RFC 9110's qvalue
_OM_VERSIONS = frozenset({"1.0.0", "0.0.1"})  # 0.0.1: the draft Prometheus still offers
_ALLOW = "GET, HEAD"
_RETRY_AFTER = "1"


def negotiate(accept: str | None) -> tuple[ExpositionFormat, str]:
    """The format to answer an ``Accept`` header with, and its ``Content-Type``.

    OpenMetrics only when the header prefers it: its best-matching media range
    (``application/openmetrics-text`` with no version or version ``1.0.0``/``0.0.1``, then
    ``application/*``, then ``*/*``) has a higher q-value than the text format's, or the same
    q-value through a more specific range (Prometheus asks ``application/openmetrics-text;
    version=1.0.0;q=0.5,...,text/plain;version=0.0.4;q=0.3,*/*;q=0.2``). Anything else, no
    header, ``*/*``, and a header that is malformed, too long or that accepts neither, gets the
    text format 0.0.4, which every scraper reads (HTTP lets a server ignore ``Accept`` rather
    than answer 406, and a scrape is better served than refused). Never raises.
    """
    if not accept or len(accept) > _MAX_ACCEPT_BYTES:
        return "text", CONTENT_TYPE
    best_om = best_text = (0.0, -1)  # (q, specificity) of the best-matching range
    for part in accept.split(",")[:_MAX_MEDIA_RANGES]:
        parsed = _media_range(part)
        if parsed is None:
            continue
        mtype, subtype, params = parsed
        q = _qvalue(params.get("q", "1"))
        if q is None:
            continue  # a malformed q-value: the range says nothing we can trust
        om = _specificity(mtype, subtype, "application", "openmetrics-text")
        if om == 2 and params.get("version", "1.0.0") not in _OM_VERSIONS:
            om = -1  # a version we do not write
        if om >= 0 and om > best_om[1]:
            best_om = (q, om)
        txt = _specificity(mtype, subtype, "text", "plain")
        if txt >= 0 and txt > best_text[1]:
            best_text = (q, txt)
    if best_om[0] > 0 and best_om > best_text:
        return "openmetrics", OPENMETRICS_CONTENT_TYPE
    return "text", CONTENT_TYPE


def _media_range(part: str) -> tuple[str, str, dict[str, str]] | None:
    """``type``, ``subtype`` (lower case) and the parameters of one media range, or ``None``."""
    pieces = part.split(";")
    kind = pieces[0].strip().lower()
    mtype, slash, subtype = kind.partition("/")
    if not slash or not mtype or not subtype or any(c.isspace() for c in kind):
        return None
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        key, eq, value = piece.partition("=")
        if not eq:
            return None
        params.setdefault(key.strip().lower(), value.strip().strip('"'))
    return mtype, subtype, params


def _qvalue(text: str) -> float | None:
    return float(text) if _QVALUE.match(text) else None


def _specificity(mtype: str, subtype: str, want_type: str, want_subtype: str) -> int:
    """2 for an exact match, 1 for ``type/*``, 0 for ``*/*``, -1 for no match."""
    if mtype == want_type and subtype == want_subtype:
        return 2
    if mtype == want_type and subtype == "*":
        return 1
    return 0 if (mtype, subtype) == ("*", "*") else -1


def _render_for(result: Aggregate, form: ExpositionFormat) -> bytes:
    """``result``'s exposition in ``form``, UTF-8."""
    text = result.render_openmetrics() if form == "openmetrics" else result.render_prometheus()
    return text.encode()


class _Reader:
    """The configuration both applications share, checked once when the app is made."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        schema: Schema,
        namespace: str,
        lock_timeout: float,
    ) -> None:
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a gatemetrics Schema, not {type(schema).__name__}")
        pipeline_schema(schema, namespace)  # a bad namespace fails here, not on every scrape
        self.directory = os.fspath(directory)
        self.schema = schema
        self.namespace = namespace
        self.lock_timeout = check_seconds("lock_timeout", lock_timeout, allow_zero=True)

    def answer(self, method: str, accept: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body for one request (reads the directory: blocking)."""
        if method not in ("GET", "HEAD"):
            return _plain(405, f"{method} is not allowed; use GET or HEAD\n", [("Allow", _ALLOW)])
        form, ctype = negotiate(accept)
        try:
            result = read_dir(
                self.directory,
                self.schema,
                namespace=self.namespace,
                lock_timeout=self.lock_timeout,
            )
        except (LockTimeoutError, OSError) as exc:
            # LockTimeoutError is an OSError too (TimeoutError); both are "try again later".
            return _plain(
                503, f"cannot read {self.directory}: {exc}\n", [("Retry-After", _RETRY_AFTER)]
            )
        except SchemaError as exc:
            _log.error("gatemetrics /metrics: %s: %s", self.directory, exc)
            return _plain(500, f"{self.directory}: {exc}\n", [])
        body = _render_for(result, form)
        return 200, [("Content-Type", ctype), ("Content-Length", str(len(body)))], body


def _plain(
    status: int, message: str, headers: list[tuple[str, str]]
) -> tuple[int, list[tuple[str, str]], bytes]:
    body = message.encode()
    return (
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
        body,
    )


_REASONS = {200: "OK", 405: "Method Not Allowed", 500: "Internal Server Error"}
_REASONS[503] = "Service Unavailable"

_WSGIEnviron = dict[str, Any]
_StartResponse = Callable[..., Any]
_WSGIApp = Callable[[_WSGIEnviron, _StartResponse], Iterable[bytes]]


def metrics_wsgi_app(
    directory: str | os.PathLike[str],
    schema: Schema,
    *,
    namespace: str,
    lock_timeout: float = 1.0,
) -> _WSGIApp:
    """A WSGI application that serves ``directory``'s exposition (see the module doc).

    ``lock_timeout`` bounds how long one scrape waits for a compaction (keep it under the
    scraper's own timeout). Raises ``ValueError``/``TypeError`` now for a bad argument.
    """
    reader = _Reader(directory, schema, namespace, lock_timeout)

    def app(environ: _WSGIEnviron, start_response: _StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        status, headers, body = reader.answer(method, environ.get("HTTP_ACCEPT"))
        start_response(f"{status} {_REASONS[status]}", headers)
        return [b""] if method == "HEAD" else [body]

    return app


_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


def metrics_asgi_app(
    directory: str | os.PathLike[str],
    schema: Schema,
    *,
    namespace: str,
    lock_timeout: float = 1.0,
    concurrency: int = 4,
) -> _ASGIApp:
    """An ASGI application that serves ``directory``'s exposition (see the module doc).

    Reading runs in a worker thread from a limiter of ``concurrency`` tokens of its own.
    Raises ``ValueError``/``TypeError`` now for a bad argument.
    """
    reader = _Reader(directory, schema, namespace, lock_timeout)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive int, not {concurrency!r}")
    # Created on first use: an anyio limiter belongs to the event loop that runs the app.
    limiters: list[anyio.CapacityLimiter] = []

    async def app(scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"gatemetrics /metrics serves HTTP only, not {scope['type']!r}")
        method = str(scope.get("method", "GET")).upper()
        accept = _header(scope, b"accept")
        if not limiters:
            limiters.append(anyio.CapacityLimiter(concurrency))
        status, headers, body = await anyio.to_thread.run_sync(
            reader.answer, method, accept, limiter=limiters[0]
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


def _header(scope: _Scope, name: bytes) -> str | None:
    """The header ``name`` (lower case), several joined by commas as HTTP allows; latin-1."""
    values = [v for k, v in scope.get("headers", ()) if bytes(k).lower() == name]
    return b",".join(bytes(v) for v in values).decode("latin-1") if values else None


async def _lifespan(receive: _Receive, send: _Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
