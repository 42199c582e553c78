"""The check body's schema (service/backend/app/request.py) and the domain rules behind it: every
refused body gets its status, error code and field, and changes nothing."""

from __future__ import annotations

import orjson
import pytest

from backend.app.main import ReleaseGateApp
from tests.app.asgi_client import (
    CHECK,
    NOTHING,
    OK,
    Client,
    audit_lines,
    counts,
    override,
)

pytestmark = pytest.mark.anyio


def _int_body(literal: int | str, field: str = "now_ms") -> bytes:
    """A check body with ``literal`` written as is (Python's ints become exact JSON integers,
    beyond what orjson.dumps accepts) in ``field``: ``now_ms`` or an override field."""
    if field == "now_ms":
        return b'{"verdict":"release_ok","reasons":[],"now_ms":' + str(literal).encode() + b"}"
    doc = orjson.dumps(OK | {"override": override(**{field: 0})})
    return doc.replace(f'"{field}":0'.encode(), f'"{field}":{literal}'.encode())


REFUSED: list[tuple[str, bytes, int, str, str | None]] = [
    # (id, body, status, error code, field)
    ("empty body", b"", 400, "malformed_json", None),
    ("truncated JSON", b'{"verdict": "release_ok", "reasons": [', 400, "malformed_json", None),
    ("not UTF-8", b'{"verdict": "release_ok\xff", "reasons": []}', 400, "malformed_json", None),
    (
        "lone surrogate",
        b'{"verdict":"release_ok","reasons":[],"release_scope":"\\ud800"}',
        400,
        "malformed_json",
        None,
    ),
    # A number beyond what a double holds is refused by the parser itself.
    (
        "integer beyond a double",
        b'{"verdict":"release_ok","reasons":[],"now_ms":1' + b"0" * 400 + b"}",
        400,
        "malformed_json",
        None,
    ),
    ("array", b"[]", 400, "invalid_request", None),
    ("null", b"null", 400, "invalid_request", None),
    ("missing verdict", b'{"reasons": []}', 400, "invalid_request", "verdict"),
    ("missing reasons", b'{"verdict": "release_ok"}', 400, "invalid_request", "reasons"),
    ("misspelt field", orjson.dumps(OK | {"overide": None}), 400, "invalid_request", "overide"),
    (
        "verdict not a string",
        orjson.dumps({"verdict": 1, "reasons": []}),
        400,
        "invalid_request",
        "verdict",
    ),
    (
        "verdict null",
        orjson.dumps({"verdict": None, "reasons": []}),
        400,
        "invalid_request",
        "verdict",
    ),
    (
        "reasons a string",
        orjson.dumps({"verdict": "release_hold", "reasons": "TIER_FAIL"}),
        400,
        "invalid_request",
        "reasons",
    ),
    (
        "reason not a string",
        orjson.dumps({"verdict": "release_hold", "reasons": [["TIER_FAIL"]]}),
        400,
        "invalid_request",
        "reasons[0]",
    ),
    (
        "unknown verdict",
        orjson.dumps({"verdict": "release_maybe", "reasons": []}),
        422,
        "unknown_verdict",
        "verdict",
    ),
    (
        "verdict in the wrong case",
        orjson.dumps({"verdict": "RELEASE_OK", "reasons": []}),
        422,
        "unknown_verdict",
        "verdict",
    ),
    (
        "unknown reason",
        orjson.dumps({"verdict": "release_hold", "reasons": ["TIER_FAIL", "NOPE"]}),
        422,
        "unknown_reason",
        "reasons[1]",
    ),
    (
        "release_ok with reasons",
        orjson.dumps({"verdict": "release_ok", "reasons": ["TIER_FAIL"]}),
        422,
        "inconsistent_result",
        "reasons",
    ),
    (
        "hold with an absolute reason",
        orjson.dumps({"verdict": "release_hold", "reasons": ["GUARD_VIOLATION"]}),
        422,
        "inconsistent_result",
        "reasons",
    ),
    ("override a list", orjson.dumps(OK | {"override": []}), 400, "invalid_request", "override"),
    (
        "override field null",
        orjson.dumps(OK | {"override": override() | {"created_by": None}}),
        400,
        "invalid_request",
        "override.created_by",
    ),
    (
        "override field absent",
        orjson.dumps(OK | {"override": {k: v for k, v in override().items() if k != "scope"}}),
        400,
        "invalid_request",
        "override.scope",
    ),
    (
        "override unknown field",
        orjson.dumps(OK | {"override": override(ttl=1)}),
        400,
        "invalid_request",
        "override.ttl",
    ),
    (
        "ttl a string",
        orjson.dumps(OK | {"override": override(ttl_seconds="3600")}),
        400,
        "invalid_request",
        "override.ttl_seconds",
    ),
    (
        "ttl a boolean",
        orjson.dumps(OK | {"override": override(ttl_seconds=True)}),
        400,
        "invalid_request",
        "override.ttl_seconds",
    ),
    (
        "ttl a float",
        orjson.dumps(OK | {"override": override(ttl_seconds=1.5)}),
        400,
        "invalid_request",
        "override.ttl_seconds",
    ),
    (
        "ttl zero",
        orjson.dumps(OK | {"override": override(ttl_seconds=0)}),
        422,
        "invalid_value",
        "override",
    ),
    (
        "blank override reason",
        orjson.dumps(OK | {"override": override(reason="  ")}),
        422,
        "invalid_value",
        "override",
    ),
    (
        "control character in created_by",
        orjson.dumps(OK | {"override": override(created_by="a\x1bb")}),
        422,
        "invalid_value",
        "override",
    ),
    (
        "release_scope a number",
        orjson.dumps(OK | {"release_scope": 7}),
        400,
        "invalid_request",
        "release_scope",
    ),
    (
        "release_scope with a newline",
        orjson.dumps(OK | {"release_scope": "a\nb"}),
        422,
        "invalid_value",
        None,
    ),
    ("now_ms a string", orjson.dumps(OK | {"now_ms": "1"}), 400, "invalid_request", "now_ms"),
    ("now_ms a boolean", orjson.dumps(OK | {"now_ms": True}), 400, "invalid_request", "now_ms"),
    ("now_ms a float", orjson.dumps(OK | {"now_ms": 1.5}), 400, "invalid_request", "now_ms"),
    ("now_ms negative", orjson.dumps(OK | {"now_ms": -1}), 422, "invalid_value", None),
    ("now_ms beyond int64", orjson.dumps(OK | {"now_ms": 2**63}), 422, "invalid_value", None),
    # The edges of 64 bits: orjson keeps -2**63..2**64-1 as ints (the gate refuses what is out
    # of its range) and turns the rest into floats; a client sees one answer either side.
    *(
        (f"now_ms {name}", _int_body(literal), 422, "invalid_value", field)
        for name, literal, field in [
            ("2**64-1", 2**64 - 1, None),
            ("2**64", 2**64, "now_ms"),
            ("-2**63", -(2**63), None),
            ("-2**63-1", -(2**63) - 1, "now_ms"),
            ("huge", 10**25, "now_ms"),
            ("huge negative", -(10**25), "now_ms"),
        ]
    ),
    (
        "ttl_seconds 2**64",
        _int_body(2**64, field="ttl_seconds"),
        422,
        "invalid_value",
        "override.ttl_seconds",
    ),
    (
        "created_at_ms -2**63-1",
        _int_body(-(2**63) - 1, field="created_at_ms"),
        422,
        "invalid_value",
        "override.created_at_ms",
    ),
    ("now_ms 1e5, a float", _int_body("1e5"), 400, "invalid_request", "now_ms"),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED],
)
async def test_bad_input_gets_a_clear_error_and_changes_nothing(
    gate_app: ReleaseGateApp, body: bytes, status: int, code: str, field: str | None
) -> None:
    await gate_app.startup()
    reply = await Client(gate_app).request("POST", CHECK, body)
    assert reply.status == status
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert error["error"] == code
    assert error["message"]
    assert error.get("field") == field
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_integer_fields_take_the_largest_signed_64_bit_value(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    reply = await Client(gate_app).request("POST", CHECK, _int_body(2**63 - 1))
    assert reply.status == 200, reply.body
    assert reply.json()["allowed"] is True
