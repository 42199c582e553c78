"""The check request's schema: a JSON body turned into the gate's domain objects.

This module checks what only JSON can get wrong: that the body parses, that it is an object,
that no field is unknown and every required one is there, that the override is an object, and
that an integer field does not hold a number of a magnitude the parser had to make a float of. Every
other rule (types, verdict and reason values, their consistency, ranges, text) is the domain's:
the constructors raise a :class:`~backend.app.testing.fields.FieldError`, mapped here to the
HTTP error of its code (:data:`STATUS_OF_CODE`). The override's fields are the
:class:`ReleaseOverride` dataclass fields, read from its definition.

Where an answer's ``field`` points: a wrong type at the field itself (``override.ttl_seconds``,
``reasons[0]``); a bad value of the policy result at its field (``verdict``, ``reasons[1]``,
``reasons``); a bad value inside the override at ``override`` (the constructor refuses the
override as a whole: its expiry bound spans two fields); a bad value of ``release_scope`` or
``now_ms`` at no field. This is how the service has always answered; clients match on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn, get_type_hints

import orjson

from backend.app.asgi import HTTPError, invalid_request
from backend.app.testing.fields import (
    INCONSISTENT_RESULT,
    INVALID_VALUE,
    UNKNOWN_REASON,
    UNKNOWN_VERDICT,
    WRONG_TYPE,
    FieldError,
    shown,
)
from backend.app.testing.release_gate import (
    MAX_INT64,
    ReleaseOverride,
    check_now_ms,
    check_release_scope,
)
from backend.app.testing.release_policy import ReleasePolicyResult

__all__ = [
    "CHECK_FIELDS",
    "OVERRIDE_FIELDS",
    "STATUS_OF_CODE",
    "CheckRequest",
    "http_error",
    "parse_check",
]

#: The HTTP status and error code of each domain :class:`FieldError` code.
STATUS_OF_CODE: Mapping[str, tuple[int, str]] = {
    WRONG_TYPE: (400, "invalid_request"),
    UNKNOWN_VERDICT: (422, UNKNOWN_VERDICT),
    UNKNOWN_REASON: (422, UNKNOWN_REASON),
    INCONSISTENT_RESULT: (422, INCONSISTENT_RESULT),
    INVALID_VALUE: (422, INVALID_VALUE),
}

#: The fields of a check body; ``verdict`` and ``reasons`` are required.
CHECK_FIELDS: tuple[str, ...] = ("verdict", "reasons", "override", "release_scope", "now_ms")
_REQUIRED = ("verdict", "reasons")

#: The override object's fields: exactly the :class:`ReleaseOverride` fields, all required.
OVERRIDE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ReleaseOverride))
_OVERRIDE_INTS = frozenset(
    name for name, kind in get_type_hints(ReleaseOverride).items() if kind is int
)

_JSON_TYPES: dict[type, str] = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """A check body, validated: the arguments of :meth:`ReleaseGate.acheck` (``now_ms`` None
    means the server's clock)."""

    result: ReleasePolicyResult
    override: ReleaseOverride | None
    release_scope: str
    now_ms: int | None


def _type_name(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def http_error(exc: FieldError, *, field: str | None = None, within: str = "") -> HTTPError:
    """The HTTP error of a domain refusal: a wrong type is reported at its field (inside the
    object ``within``, if any), a bad value at ``field``."""
    status, code = STATUS_OF_CODE[exc.code]
    if exc.code == WRONG_TYPE:
        field = f"{within}.{exc.field}" if within else exc.field
    message = f"{within}: {exc.message}" if within else exc.message
    return HTTPError(status, code, message, field=field)


def _refuse(exc: FieldError, *, field: str | None, within: str = "") -> NoReturn:
    raise http_error(exc, field=field, within=within) from None


def _no_huge_float(value: object, field: str) -> None:
    # orjson reads an integer literal beyond 64 bits (below -2**63 or above 2**64-1) as a float.
    # Every double of that magnitude is a whole number, so whatever the client wrote, it meant
    # an integer out of range: the same 422 as 2**63 (which orjson keeps as an int and the
    # domain refuses), so the parser's boundary stays invisible to clients. A smaller float
    # (1.5, 1e5) is a wrong type, which the domain reports.
    if isinstance(value, float) and abs(value) > MAX_INT64:
        raise HTTPError(
            422,
            "invalid_value",
            f"{field} must be in [-2**63, 2**63-1], got a number of magnitude {abs(value):.3g}",
            field=field,
        )


def _unknown(names: set[str], prefix: str) -> None:
    if names:
        unknown = sorted(names)
        listed = ", ".join(shown(name) for name in unknown[:5])
        what = "override field(s)" if prefix else "field(s)"
        invalid_request(f"unknown {what}: {listed}", prefix + unknown[0][:64])


def parse_check(body: bytes) -> CheckRequest:
    """Validate a check body; raise :class:`HTTPError` (400/422) for anything wrong."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        invalid_request(f"the body must be a JSON object, not {_type_name(doc)}")
    _unknown(set(doc) - set(CHECK_FIELDS), "")
    for name in _REQUIRED:
        if name not in doc:
            invalid_request(f"{name} is required", name)
    try:
        result = ReleasePolicyResult(doc["verdict"], doc["reasons"])
    except FieldError as exc:
        _refuse(exc, field=exc.field)
    override = _parse_override(doc.get("override"))
    try:
        scope = check_release_scope(doc.get("release_scope", ""))
        raw_now = doc.get("now_ms")
        _no_huge_float(raw_now, "now_ms")
        now_ms = None if raw_now is None else check_now_ms(raw_now)
    except FieldError as exc:
        _refuse(exc, field=None)
    return CheckRequest(result, override, scope, now_ms)


def _parse_override(raw: object) -> ReleaseOverride | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        invalid_request(f"override must be a JSON object, not {_type_name(raw)}", "override")
    _unknown(set(raw) - set(OVERRIDE_FIELDS), "override.")
    for name in OVERRIDE_FIELDS:
        if name not in raw:
            invalid_request(f"override.{name} is required", f"override.{name}")
        if name in _OVERRIDE_INTS:
            _no_huge_float(raw[name], f"override.{name}")
    try:
        return ReleaseOverride(**raw)
    except FieldError as exc:
        _refuse(exc, field="override", within="override")
