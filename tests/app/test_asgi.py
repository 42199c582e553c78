"""The ASGI plumbing (service/backend/app/asgi.py) as the check route uses it: the JSON content
type, the bounded body and its deadline, error bodies that never echo a huge request. Each
refusal happens before anything is decided: no counter changed, no audit entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from backend.app.main import MAX_BODY_BYTES, ReleaseGateApp, Settings, create_app
from tests.app.asgi_client import (
    CHECK,
    NOTHING,
    OK,
    Client,
    audit_lines,
    counts,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON; charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/vnd.release-gate+json",
    ],
)
async def test_check_accepts_json_media_types(gate_app: ReleaseGateApp, content_type: str) -> None:
    body = b'{"verdict": "release_ok", "reasons": []}'
    reply = await Client(gate_app).request(
        "POST", CHECK, body, headers=[("Content-Type", content_type)]
    )
    assert reply.status == 200


async def test_a_body_of_exactly_the_limit_is_accepted(gate_app: ReleaseGateApp) -> None:
    body = b'{"verdict": "release_ok", "reasons": []}'
    body += b" " * (MAX_BODY_BYTES - len(body))
    reply = await Client(gate_app).request("POST", CHECK, body)
    assert reply.status == 200


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        pytest.param([], 415, "unsupported_media_type", id="no content type"),
        pytest.param([("content-type", "text/plain")], 415, "unsupported_media_type", id="text"),
        pytest.param(
            [("content-type", "application/x-www-form-urlencoded")],
            415,
            "unsupported_media_type",
            id="form (curl -d without -H)",
        ),
        pytest.param(
            [("content-type", "application/json; charset=latin-1")],
            415,
            "unsupported_media_type",
            id="not UTF-8",
        ),
        pytest.param(
            [("content-type", "application/json"), ("content-type", "application/json")],
            400,
            "invalid_request",
            id="content type twice",
        ),
        pytest.param(
            [("content-type", "application/json"), ("content-length", "12x")],
            400,
            "invalid_request",
            id="content length not a number",
        ),
        pytest.param(
            [("content-type", "application/json"), ("content-length", "-1")],
            400,
            "invalid_request",
            id="negative content length",
        ),
    ],
)
async def test_bad_headers_are_refused_before_the_body_is_read(
    gate_app: ReleaseGateApp, headers: list[tuple[str, str]], status: int, code: str
) -> None:
    await gate_app.startup()
    body = orjson.dumps(OK)
    reply = await Client(gate_app).request("POST", CHECK, body, headers=headers)
    assert (reply.status, reply.json()["error"]) == (status, code)
    assert reply.receives == 0
    # The unread body must not be taken for the next request on this connection.
    assert reply.headers["connection"] == "close"
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_a_declared_length_over_the_limit_is_refused_unread(gate_app: ReleaseGateApp) -> None:
    await gate_app.startup()
    headers = [("content-type", "application/json"), ("content-length", str(MAX_BODY_BYTES + 1))]
    reply = await Client(gate_app).request(
        "POST", CHECK, b"x" * (MAX_BODY_BYTES + 1), headers=headers
    )
    assert reply.status == 413
    assert reply.json()["error"] == "body_too_large"
    assert reply.receives == 0  # refused before a single byte was read
    assert reply.headers["connection"] == "close"
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_a_chunked_body_over_the_limit_is_refused_without_reading_on(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    chunk = b" " * (16 * 1024)
    chunks = [b'{"verdict": "release_ok", "reasons": []}', *[chunk] * 20]  # about 320 KiB
    reply = await Client(gate_app).request(
        "POST", CHECK, headers=[("content-type", "application/json")], chunks=chunks
    )
    assert reply.status == 413
    # Reading stops with the chunk that crosses the limit.
    sizes = [sum(map(len, chunks[: i + 1])) for i in range(len(chunks))]
    crossing = next(i for i, size in enumerate(sizes) if size > MAX_BODY_BYTES)
    assert reply.receives == crossing + 1 < len(chunks)
    assert reply.headers["connection"] == "close"
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_an_under_declared_body_is_counted_as_it_arrives(gate_app: ReleaseGateApp) -> None:
    # A server normally enforces Content-Length framing; the app does not rely on it.
    await gate_app.startup()
    headers = [("content-type", "application/json"), ("content-length", "10")]
    reply = await Client(gate_app).request(
        "POST", CHECK, headers=headers, chunks=[b" " * MAX_BODY_BYTES, b"{}"]
    )
    assert reply.status == 413
    assert reply.receives == 2


async def test_a_client_that_vanishes_mid_body_gets_nothing_and_counts_nothing(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    client = Client(gate_app)
    reply = await client.request(
        "POST",
        CHECK,
        headers=[("content-type", "application/json")],
        chunks=[b'{"verdict": "release_ok",', b' "reasons": []}'],
        disconnect_after=1,
    )
    assert client.sent == []
    assert reply.receives == 2
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_a_body_that_never_arrives_times_out_with_408(tmp_path: Path) -> None:
    settings = Settings(str(tmp_path / "shards"), str(tmp_path / "audit.jsonl"), body_timeout=0.1)
    app = create_app(settings)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:  # a client that sent its headers, then stalled
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHECK,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
    }
    with anyio.fail_after(10):
        await app(scope, receive, send)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert orjson.loads(sent[1]["body"])["error"] == "request_timeout"
    assert not app.started  # nothing was decided, counted or audited


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param({"verdict": "x" * 60_000, "reasons": []}, id="verdict"),
        pytest.param({"verdict": "release_hold", "reasons": ["R" * 60_000]}, id="reason"),
        pytest.param(OK | {"y" * 60_000: 1}, id="field name"),
        pytest.param(OK | {"release_scope": "\x00" * 10_000}, id="gate's own message"),
    ],
)
async def test_error_messages_never_echo_a_huge_request(
    gate_app: ReleaseGateApp, doc: dict[str, Any]
) -> None:
    reply = await Client(gate_app).check(doc)
    assert reply.status in (400, 422)
    assert len(reply.body) < 1000
    assert reply.json()["message"]
