"""The published API (service/backend/app/openapi.json, served at GET /openapi.json) and the app
agree: every route, method, status, error code and body field in the document is what the code
does, and a property-based fuzzer (schemathesis, in-process over ASGI) finds every answer
documented, no 500, and no counter or audit entry changed by a refused request.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import hypothesis
import orjson
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import backend.app
from backend.app.main import ROUTES, ReleaseGateApp, Settings, create_app
from backend.app.request import CHECK_FIELDS, OVERRIDE_FIELDS, STATUS_OF_CODE
from backend.app.testing.release_gate import GateDecision, ReleaseOverride
from backend.app.testing.release_policy import BlockReasonCode, ReleaseVerdict
from gatemetrics import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE
from tests.app.asgi_client import CHECK, NOW, OK, Client, audit_lines, counts
from tests.app.test_request import REFUSED

SOURCE = Path(backend.app.__file__).parent
DOCUMENT: dict[str, Any] = orjson.loads((SOURCE / "openapi.json").read_bytes())
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with its local ``$ref`` followed."""
    while "$ref" in node:
        target: Any = DOCUMENT
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _error_codes(response: dict[str, Any]) -> set[str]:
    """The error codes a documented error response allows (its ``error`` enum)."""
    schema = _resolve(response)["content"]["application/json"]["schema"]
    (enum,) = [
        part["properties"]["error"]["enum"] for part in schema["allOf"] if "properties" in part
    ]
    return set(enum)


def _documented() -> set[tuple[str, str, int, str]]:
    """Every (path, METHOD, status, error code) the document allows; code "" for a success."""
    found = set()
    for path, item in DOCUMENT["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            for status, response in item[method]["responses"].items():
                codes = {""} if status.startswith("2") else _error_codes(response)
                found |= {(path, method.upper(), int(status), code) for code in codes}
    return found


def _raised_in_source() -> set[tuple[int, str]]:
    """Every (status, code) the service's source can answer: ``HTTPError(status, "code"`` in
    the app's modules, the 400 of ``invalid_request()``, the mapped domain codes, and the
    connection limit's canned 503."""
    pairs: set[tuple[int, str]] = set()
    for module in ("main.py", "asgi.py", "request.py"):
        text = (SOURCE / module).read_text()
        pairs |= {
            (int(status), code)
            for status, code in re.findall(r'HTTPError\(\s*(\d{3}),\s*"([a-z_]+)"', text)
        }
        if "invalid_request(" in text:
            pairs.add((400, "invalid_request"))
    pairs |= set(STATUS_OF_CODE.values())
    limits = (SOURCE / "limits.py").read_text()
    assert '"error":"too_many_connections"' in limits
    assert "HTTP/1.1 503 Service Unavailable" in limits
    pairs.add((503, "too_many_connections"))
    return pairs


def test_the_document_lists_exactly_the_routes_and_methods_served() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    documented = {
        path: {m.upper() for m in METHODS if m in item} for path, item in DOCUMENT["paths"].items()
    }
    assert documented == {path: set(methods) for path, methods in ROUTES.items()}


def test_every_status_and_error_code_of_the_code_is_documented_and_no_other() -> None:
    documented = _documented()
    every_error = set(DOCUMENT["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    responses = DOCUMENT["components"]["responses"]
    # 404 and 405 belong to no documented operation: they are the answers of the rest.
    anywhere = {(404, code) for code in _error_codes(responses["NotFound"])} | {
        (405, code) for code in _error_codes(responses["MethodNotAllowed"])
    }
    in_operations = {(status, code) for _, _, status, code in documented if code}
    assert in_operations | anywhere == _raised_in_source()
    assert every_error == {code for _, code in _raised_in_source()}
    # Every operation may fail with a bug (500) or a full worker (503 too_many_connections).
    for path, methods in ROUTES.items():
        for method in methods:
            assert (path, method, 500, "internal_error") in documented
            assert (path, method, 503, "too_many_connections") in documented
            assert (path, method, 200, "") in documented


@pytest.mark.parametrize(
    ("status", "code"), [pytest.param(case[2], case[3], id=case[0]) for case in REFUSED]
)
def test_every_refusal_of_the_error_table_is_documented_for_the_check(
    status: int, code: str
) -> None:
    assert (CHECK, "POST", status, code) in _documented()


def test_the_check_body_is_the_domain_definition() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    check = schemas["CheckRequest"]
    assert tuple(check["properties"]) == CHECK_FIELDS
    assert check["required"] == ["verdict", "reasons"]
    assert check["additionalProperties"] is False
    assert check["properties"]["verdict"]["enum"] == [v.value for v in ReleaseVerdict]
    assert check["properties"]["reasons"]["items"]["enum"] == [r.value for r in BlockReasonCode]
    over = schemas["Override"]
    assert tuple(over["properties"]) == OVERRIDE_FIELDS
    assert tuple(f.name for f in dataclasses.fields(ReleaseOverride)) == OVERRIDE_FIELDS
    assert over["required"] == list(OVERRIDE_FIELDS)
    assert over["additionalProperties"] is False
    decision = schemas["GateDecision"]
    fields = [f.name for f in dataclasses.fields(GateDecision)]
    assert list(decision["properties"]) == fields == decision["required"]
    metrics = DOCUMENT["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE]


@pytest.mark.anyio
async def test_the_document_is_served_as_kept_in_the_repository(gate_app: ReleaseGateApp) -> None:
    reply = await Client(gate_app).request("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.body == (SOURCE / "openapi.json").read_bytes()
    head = await Client(gate_app).request("HEAD", "/openapi.json")
    assert (head.status, head.body) == (200, b"")
    assert not gate_app.started  # serving the document needs no worker state
    assert audit_lines(gate_app) == []


# -- the fuzzer --------------------------------------------------------------------------------


class _Fuzzed:
    """The ASGI app the fuzzer calls: it forwards each request to the app of the current test
    module's directory (:func:`fuzzed_app`). schemathesis loads its schema at import, before
    any fixture exists, and runs every call on an event loop thread of its own, so the app it
    holds must be a stand-in. It declines the lifespan protocol (raising before it receives a
    message, as the ASGI spec says an app without lifespan support does): the app then builds
    its state on its first check, in the directory of the test, never at import."""

    def __init__(self) -> None:
        # Serves the document (which needs no state) until a test installs its app.
        self.app = create_app(Settings("/nonexistent/fuzz/shards", "/nonexistent/fuzz/a.jsonl"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan: the app starts on its first request")
        await self.app(scope, receive, send)


FUZZED = _Fuzzed()
schema = schemathesis.openapi.from_asgi("/openapi.json", FUZZED)
# Both modes: valid bodies (answered 200 or, when semantically impossible, 422) and bodies that
# break the schema (answered 400/422). Bounded, so the CI run takes seconds.
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=40
)


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseGateApp]:
    """One app for every example (a fresh directory per example would spend the budget on
    start-ups); each example compares the counts and the audit log before and after itself."""
    root = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        Settings(str(root / "shards"), str(root / "audit.jsonl")), clock_ms=lambda: NOW
    )
    stand_in, FUZZED.app = FUZZED.app, app
    yield app
    FUZZED.app = stand_in
    anyio.run(app.shutdown)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@schema.parametrize()
@hypothesis.settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_answer_is_documented_and_a_refusal_changes_nothing(
    case: Any, fuzzed_app: ReleaseGateApp
) -> None:
    before, audited = counts(fuzzed_app), len(audit_lines(fuzzed_app))
    response = case.call()
    case.validate_response(response, checks=CHECKS)
    after, now_audited = counts(fuzzed_app), len(audit_lines(fuzzed_app))
    if response.status_code != 200 or case.path != CHECK:
        assert (after, now_audited) == (before, audited), (response.status_code, case.body)
    else:
        # An answered check is audited once and counted once.
        assert now_audited == audited + 1
        decided = sum(after["decisions"].values()) - sum(before["decisions"].values())
        assert decided == 1


def test_the_fuzzer_reaches_both_answers_of_the_check(fuzzed_app: ReleaseGateApp) -> None:
    # Guards the fuzz test against vacuity: the app it fuzzes answers and refuses checks.
    client = Client(fuzzed_app)
    assert anyio.run(client.check, OK).status == 200
    assert anyio.run(client.check, {"verdict": "nope", "reasons": []}).status == 422
