"""ASGI plumbing of the service: headers, the JSON content type, a bounded body read with its
deadline, and responses. Nothing here knows the gate; :mod:`backend.app.main` routes with it.

A request refused here raises :class:`HTTPError`, which the app answers as a JSON error
``{"error": <code>, "message": <text>, "field": <where, if any>}``. The codes raised here:
``invalid_request`` (400: a repeated header, a bad ``Content-Length``), ``body_too_large``
(413), ``request_timeout`` (408), ``unsupported_media_type`` (415).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, NoReturn

import anyio
import orjson

__all__ = [
    "JSON",
    "Disconnected",
    "HTTPError",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "header",
    "invalid_request",
    "read_body",
    "require_json",
    "respond",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The media type of every JSON answer.
JSON = b"application/json"

#: Error messages may quote the request: never echo more than this many characters of them.
_MESSAGE_LIMIT = 500


class HTTPError(Exception):
    """A request refused with a JSON error body (``status``, ``code``, ``message``, ``field``,
    extra response ``headers``)."""

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
        """The JSON error document, its message cut at 500 characters."""
        message = self.message
        if len(message) > _MESSAGE_LIMIT:
            message = message[: _MESSAGE_LIMIT - 3] + "..."
        doc: dict[str, object] = {"error": self.code, "message": message}
        if self.field is not None:
            doc["field"] = self.field
        return orjson.dumps(doc)


class Disconnected(Exception):
    """The client went away before its request body arrived: nothing to answer."""


def invalid_request(message: str, field: str | None = None) -> NoReturn:
    """Refuse the request with 400 ``invalid_request``."""
    raise HTTPError(400, "invalid_request", message, field=field)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case); 400 when it is sent more than once."""
    found: bytes | None = None
    for key, value in scope["headers"]:
        if key == name:
            if found is not None:
                invalid_request(f"the {name.decode()} header is repeated")
            found = value
    return found


def require_json(scope: Scope) -> None:
    """415 unless the ``Content-Type`` is ``application/json`` (or ``application/*+json``),
    with no charset or UTF-8."""
    raw = header(scope, b"content-type")
    media, _, params = (raw or b"").partition(b";")
    media = media.strip().lower()
    ok = media == JSON or (media.startswith(b"application/") and media.endswith(b"+json"))
    for param in params.split(b";"):
        key, _, value = param.partition(b"=")
        if key.strip().lower() == b"charset" and value.strip().strip(b'"').lower() != b"utf-8":
            ok = False
    if not ok:
        shown = "none" if raw is None else raw.decode("latin-1")
        raise HTTPError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json (UTF-8), not {shown}",
        )


def _too_large(what: str, limit: int) -> HTTPError:
    return HTTPError(413, "body_too_large", f"the body {what} the {limit}-byte limit")


async def read_body(scope: Scope, receive: Receive, *, limit: int, within: float) -> bytes:
    """The request body, never more than ``limit`` bytes of it, within ``within`` seconds.

    A declared ``Content-Length`` over the limit is refused (413) before anything is read; a
    chunked (or under-declared) body is counted as it arrives and refused as soon as it passes
    the limit, without reading further. A body still incomplete after ``within`` seconds is
    refused with 408 (an answer, not a cancellation): a stalled client must not hold a worker's
    task forever. Raises
    :class:`Disconnected` when the client goes away first.
    """
    declared = header(scope, b"content-length")
    if declared is not None:
        text = declared.strip()
        if not text.isdigit():
            invalid_request(f"Content-Length must be a non-negative integer, not {declared!r}")
        if int(text) > limit:
            raise _too_large("declared by Content-Length exceeds", limit)
    chunks: list[bytes] = []
    with anyio.move_on_after(within) as waited:
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large("exceeds", limit)
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
    if waited.cancelled_caught:
        raise HTTPError(408, "request_timeout", f"the body did not arrive within {within:g} s")
    return b"".join(chunks)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    """Send a whole response: its length, ``Cache-Control: no-store``, no body for HEAD."""
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
