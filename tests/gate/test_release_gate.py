"""Tests of backend.app.testing.release_gate: the decision table, fail-closed audit,
fail-open metrics, acheck (non-blocking, cancellation) and the properties P1, P2, P3, P5."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.app.testing import release_gate
from backend.app.testing.audit import InMemoryAuditLog, JsonlAuditLog
from backend.app.testing.fields import FieldTypeError, FieldValueError
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_gate import GateDecision, ReleaseGate, ReleaseOverride
from backend.app.testing.release_policy import (
    ABSOLUTE_BLOCK_REASONS,
    BlockReasonCode,
    ReleasePolicyResult,
    ReleaseVerdict,
)
from tests.processes import run_python
from tests.strategies import GATE_NOW_MS, gate_checks

R = BlockReasonCode
OK = ReleaseVerdict.RELEASE_OK
HOLD = ReleaseVerdict.RELEASE_HOLD
BLOCK = ReleaseVerdict.RELEASE_BLOCK
NOW = GATE_NOW_MS

OK_RESULT = ReleasePolicyResult(OK, [])
HOLD_RESULT = ReleasePolicyResult(HOLD, [R.TIER_FAIL, R.DRIFT_ALERT])
MANUAL_HOLD = ReleasePolicyResult(HOLD, [])
GUARD_BLOCK = ReleasePolicyResult(BLOCK, [R.GUARD_VIOLATION, R.TIER_FAIL])
OPS_BLOCK = ReleasePolicyResult(BLOCK, [R.OPS_GATE_FAIL])
BOTH_ABSOLUTE = ReleasePolicyResult(BLOCK, [R.OPS_GATE_FAIL, R.GUARD_VIOLATION])
PLAIN_BLOCK = ReleasePolicyResult(BLOCK, [R.NO_TIER_DATA, R.FLAKY_TESTS])
MANUAL_BLOCK = ReleasePolicyResult(BLOCK, [])

ENTRY_KEYS = {
    "ts_ms",
    "logged_at",
    "decision",
    "allowed",
    "verdict",
    "reasons",
    "override_applied",
    "override",
    "release_scope",
    "audit_detail",
    "pid",
    "host",
}


def override(**changes: Any) -> ReleaseOverride:
    """A one-minute override for "prod" created a second before NOW."""
    fields: dict[str, Any] = {
        "ttl_seconds": 60,
        "created_at_ms": NOW - 1000,
        "scope": "prod",
        "reason": "hotfix for INC-1234",
        "created_by": "alice@example.com",
    }
    return ReleaseOverride(**{**fields, **changes})


def zero_counts(store: GateMetricStore) -> bool:
    data = store.to_dict()
    return (
        all(
            v == 0
            for fam in ("decision_counts", "reason_counts", "breach_counts")
            for v in data[fam].values()
        )
        and data["audit_write_failures"] == 0
        and data["metric_write_failures"] == 0
    )


class RecordingSink:
    """A metric store that is not a GateMetricStore: records each call's arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, tuple[BlockReasonCode, ...], bool, bool]] = []

    def record_outcome(
        self,
        allowed: bool,
        reasons: tuple[BlockReasonCode, ...],
        *,
        breach: bool,
        audit_write_failure: bool,
    ) -> None:
        self.calls.append((allowed, reasons, breach, audit_write_failure))


class RaisingSink:
    """A metric store whose every call fails (a broken disk behind a write-through store)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def record_outcome(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise self.exc


class RaisingAuditLog:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def record(self, entry: Any) -> None:
        raise self.exc


# -- the decision table ----------------------------------------------------------------------

# (result, override, release_scope, now_ms) -> (allowed, override_applied, breach, audit_detail)
TABLE: dict[str, tuple[tuple[Any, ...], tuple[bool, bool, bool, str]]] = {
    "ok": ((OK_RESULT, None, "prod", NOW), (True, False, False, "RELEASE_OK")),
    "ok, override ignored": (
        (OK_RESULT, override(), "prod", NOW),
        (True, False, False, "RELEASE_OK OVERRIDE_IGNORED"),
    ),
    "ok, even with an expired override": (
        (OK_RESULT, override(created_at_ms=0), "prod", NOW),
        (True, False, False, "RELEASE_OK OVERRIDE_IGNORED"),
    ),
    "hold without override": (
        (HOLD_RESULT, None, "prod", NOW),
        (False, False, False, "HOLD_NO_OVERRIDE"),
    ),
    "hold, valid override": (
        (HOLD_RESULT, override(), "prod", NOW),
        (True, True, False, "OVERRIDE_APPLIED"),
    ),
    "manual hold, valid override": (
        (MANUAL_HOLD, override(), "prod", NOW),
        (True, True, False, "OVERRIDE_APPLIED"),
    ),
    "hold, expired override": (
        (HOLD_RESULT, override(created_at_ms=NOW - 60_000), "prod", NOW),
        (False, False, False, "OVERRIDE_EXPIRED"),
    ),
    "hold, override from the future": (
        (HOLD_RESULT, override(created_at_ms=NOW + 1), "prod", NOW),
        (False, False, False, "OVERRIDE_NOT_YET_VALID"),
    ),
    "hold, scope mismatch": (
        (HOLD_RESULT, override(scope="staging"), "prod", NOW),
        (False, False, False, "SCOPE_MISMATCH"),
    ),
    "hold, scope compared exactly": (
        (HOLD_RESULT, override(scope="Prod"), "prod", NOW),
        (False, False, False, "SCOPE_MISMATCH"),
    ),
    "hold, expired and scope mismatch": (
        (HOLD_RESULT, override(created_at_ms=0, scope="staging"), "prod", NOW),
        (False, False, False, "OVERRIDE_EXPIRED SCOPE_MISMATCH"),
    ),
    "hold, empty release scope accepts any override scope": (
        (HOLD_RESULT, override(scope="staging"), "", NOW),
        (True, True, False, "OVERRIDE_APPLIED UNSCOPED_CHECK"),
    ),
    "hold, empty override scope on a scoped check": (
        (HOLD_RESULT, override(scope=""), "prod", NOW),
        (False, False, False, "SCOPE_MISMATCH"),
    ),
    "hold, both scopes empty": (
        (HOLD_RESULT, override(scope=""), "", NOW),
        (True, True, False, "OVERRIDE_APPLIED UNSCOPED_CHECK"),
    ),
    "block without override": ((GUARD_BLOCK, None, "prod", NOW), (False, False, False, "BLOCKED")),
    "block, override on a guard violation": (
        (GUARD_BLOCK, override(), "prod", NOW),
        (False, False, True, "CONTRACT_BREACH_NO_OVERRIDE absolute=GUARD_VIOLATION"),
    ),
    "block, override on a failed ops gate": (
        (OPS_BLOCK, override(), "prod", NOW),
        (False, False, True, "CONTRACT_BREACH_NO_OVERRIDE absolute=OPS_GATE_FAIL"),
    ),
    "block, override on both absolute reasons": (
        (BOTH_ABSOLUTE, override(), "prod", NOW),
        (False, False, True, "CONTRACT_BREACH_NO_OVERRIDE absolute=GUARD_VIOLATION,OPS_GATE_FAIL"),
    ),
    "block, an expired or mis-scoped override attempt is still a breach": (
        (GUARD_BLOCK, override(created_at_ms=0, scope="x"), "prod", NOW),
        (False, False, True, "CONTRACT_BREACH_NO_OVERRIDE absolute=GUARD_VIOLATION"),
    ),
    "block, override on a non-absolute block": (
        (PLAIN_BLOCK, override(), "prod", NOW),
        (False, False, False, "BLOCK_NOT_OVERRIDABLE"),
    ),
    "manual block, override": (
        (MANUAL_BLOCK, override(), "prod", NOW),
        (False, False, False, "BLOCK_NOT_OVERRIDABLE"),
    ),
}


@pytest.mark.parametrize(("args", "expected"), TABLE.values(), ids=TABLE.keys())
def test_decision_table(args: tuple[Any, ...], expected: tuple[bool, bool, bool, str]) -> None:
    allowed, applied, breach, detail = expected
    result = args[0]
    log, store = InMemoryAuditLog(), GateMetricStore()
    decision = ReleaseGate(log, store).check(*args)
    assert decision == GateDecision(allowed, result.verdict, result.reasons, applied, detail)
    assert decision.decision == ("ALLOW" if allowed else "DENY")
    # Exactly one audit entry, saying what was returned.
    [entry] = log.entries
    assert entry["decision"] == decision.decision
    assert entry["allowed"] is allowed
    assert entry["override_applied"] is applied
    assert entry["audit_detail"] == detail
    # Exactly one emission: the decision returned, its reasons for a DENY, a breach if any.
    assert store.decision_counts() == {"ALLOW": int(allowed), "DENY": int(not allowed)}
    assert store.breach_counts() == {"NO_OVERRIDE": int(breach)}
    counted = {r for r, n in store.reason_counts().items() if n}
    assert counted == (set() if allowed else {r.value for r in result.reasons})
    assert store.audit_write_failures() == 0


@pytest.mark.parametrize(
    ("now_ms", "detail"),
    [
        (NOW - 1, "OVERRIDE_NOT_YET_VALID"),  # created one ms in the future
        (NOW, "OVERRIDE_APPLIED"),  # created this very ms
        (NOW + 60_000 - 1, "OVERRIDE_APPLIED"),  # last valid ms
        (NOW + 60_000, "OVERRIDE_EXPIRED"),  # created_at_ms + ttl_seconds*1000: expired
        (NOW + 60_001, "OVERRIDE_EXPIRED"),
    ],
)
def test_override_validity_is_half_open_from_creation_to_expiry(now_ms: int, detail: str) -> None:
    ov = override(created_at_ms=NOW, ttl_seconds=60)
    assert ov.expires_at_ms == NOW + 60_000
    decision = ReleaseGate().check(HOLD_RESULT, ov, "prod", now_ms)
    assert decision.audit_detail == detail
    assert decision.allowed is (detail == "OVERRIDE_APPLIED")


def test_default_now_ms_is_the_epoch_so_no_real_override_is_valid_yet() -> None:
    decision = ReleaseGate().check(HOLD_RESULT, override(), "prod")
    assert decision.audit_detail == "OVERRIDE_NOT_YET_VALID"


def test_the_audit_entry_has_every_documented_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    gate = ReleaseGate(JsonlAuditLog(path))
    ov = override()
    before = time.time()
    gate.check(HOLD_RESULT, ov, "prod", NOW)
    gate.check(OK_RESULT, release_scope="", now_ms=5)
    after = time.time()
    first, second = (orjson.loads(line) for line in path.read_bytes().splitlines())
    assert set(first) == ENTRY_KEYS
    assert before <= first["logged_at"] <= after
    assert isinstance(first["logged_at"], float)
    assert first == {
        "ts_ms": NOW,
        "logged_at": first["logged_at"],
        "decision": "ALLOW",
        "allowed": True,
        "verdict": "release_hold",
        "reasons": ["TIER_FAIL", "DRIFT_ALERT"],
        "override_applied": True,
        "override": {
            "ttl_seconds": 60,
            "created_at_ms": NOW - 1000,
            "scope": "prod",
            "reason": "hotfix for INC-1234",
            "created_by": "alice@example.com",
        },
        "release_scope": "prod",
        "audit_detail": "OVERRIDE_APPLIED",
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    assert second["override"] is None
    assert second["ts_ms"] == 5
    assert second["reasons"] == []


def test_metrics_are_emitted_once_after_the_audit_write() -> None:
    log = InMemoryAuditLog()
    seen_entries: list[int] = []

    class OrderCheckingSink(RecordingSink):
        def record_outcome(self, *args: Any, **kwargs: Any) -> None:
            seen_entries.append(len(log.entries))
            super().record_outcome(*args, **kwargs)

    sink = OrderCheckingSink()
    gate = ReleaseGate(log, sink)
    gate.check(GUARD_BLOCK, override(), "prod", NOW)
    gate.check(HOLD_RESULT, override(), "prod", NOW)
    assert seen_entries == [1, 2]
    assert sink.calls == [
        (False, (R.TIER_FAIL, R.GUARD_VIOLATION), True, False),
        (True, (R.TIER_FAIL, R.DRIFT_ALERT), False, False),
    ]


# -- fail-closed audit -----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), TABLE.values(), ids=TABLE.keys())
def test_an_audit_write_failure_denies_every_kind_of_decision(
    args: tuple[Any, ...], expected: tuple[bool, bool, bool, str]
) -> None:
    allowed, _, breach, detail = expected
    log, store = InMemoryAuditLog(), GateMetricStore()
    log.failing = True
    decision = ReleaseGate(log, store).check(*args)
    assert decision.allowed is False
    assert decision.override_applied is False
    assert decision.verdict is args[0].verdict
    assert decision.reasons == args[0].reasons
    intended = "ALLOW" if allowed else "DENY"
    original = detail.replace("OVERRIDE_APPLIED", "OVERRIDE_VALID")
    assert (
        decision.audit_detail
        == f"AUDIT_WRITE_FAILED audit_error=EIO intended={intended} {original}"
    )
    assert "OVERRIDE_APPLIED" not in decision.audit_detail  # grep finds only real overrides
    assert store.audit_write_failures() == 1
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 1}  # the decision returned
    assert store.breach_counts() == {"NO_OVERRIDE": int(breach)}


class BadNameError(Exception):
    pass


BadNameError.__name__ = "Bad-Name Error"


class HostileError(Exception):
    errno = "not-an-int"

    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")

    def __repr__(self) -> str:
        raise RuntimeError("repr() of this exception fails")


@pytest.mark.parametrize(
    ("exc", "token"),
    [
        (OSError(28, "No space left on device"), "ENOSPC"),
        (PermissionError(13, "denied"), "EACCES"),
        (TimeoutError(), "TimeoutError"),
        (RuntimeError("boom"), "RuntimeError"),
        (MemoryError(), "MemoryError"),
        (BadNameError(), "Bad_Name_Error"),
        (HostileError(), "HostileError"),
    ],
)
def test_any_exception_from_the_audit_log_fails_closed_with_a_grep_safe_token(
    exc: Exception, token: str
) -> None:
    store = GateMetricStore()
    decision = ReleaseGate(RaisingAuditLog(exc), store).check(OK_RESULT, now_ms=NOW)
    assert decision.allowed is False
    assert (
        decision.audit_detail == f"AUDIT_WRITE_FAILED audit_error={token} intended=ALLOW RELEASE_OK"
    )
    assert store.audit_write_failures() == 1


def test_a_removed_audit_directory_denies_and_counts(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    store = GateMetricStore()
    gate = ReleaseGate(JsonlAuditLog(directory / "audit.jsonl"), store)
    assert gate.check(OK_RESULT, now_ms=NOW).allowed
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    decision = gate.check(OK_RESULT, now_ms=NOW)
    assert decision.allowed is False
    assert decision.audit_detail.startswith("AUDIT_WRITE_FAILED audit_error=ENOENT ")
    assert store.audit_write_failures() == 1
    assert store.decision_counts() == {"ALLOW": 1, "DENY": 1}


def test_a_full_disk_denies_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")  # every write fails with ENOSPC
    store = GateMetricStore()
    # follow_symlinks: the link to /dev/full is this test's own, not a planted one.
    audit = JsonlAuditLog(path, follow_symlinks=True)
    decision = ReleaseGate(audit, store).check(HOLD_RESULT, override(), "prod", NOW)
    assert decision.allowed is False
    assert decision.audit_detail == (
        "AUDIT_WRITE_FAILED audit_error=ENOSPC intended=ALLOW OVERRIDE_VALID"
    )
    assert store.audit_write_failures() == 1
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 1}


GATE_ON_READ_ONLY_LOG = r"""
import sys, orjson
from backend.app.testing.audit import JsonlAuditLog
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_gate import ReleaseGate
from backend.app.testing.release_policy import ReleasePolicyResult
store = GateMetricStore()
gate = ReleaseGate(JsonlAuditLog(sys.argv[1]), store)
decision = gate.check(ReleasePolicyResult("release_ok", []), now_ms=1)
print(orjson.dumps({"decision": decision.to_dict(), "counts": store.to_dict()}).decode())
"""


def test_a_read_only_audit_log_denies_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    path.chmod(0o444)
    done = run_python(GATE_ON_READ_ONLY_LOG, str(path), honour_file_modes=True)
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    assert out["decision"] == {
        "allowed": False,
        "verdict": "release_ok",
        "reasons": [],
        "override_applied": False,
        "audit_detail": "AUDIT_WRITE_FAILED audit_error=EACCES intended=ALLOW RELEASE_OK",
    }
    assert out["counts"]["audit_write_failures"] == 1
    assert out["counts"]["decision_counts"] == {"ALLOW": 0, "DENY": 1}
    assert "audit write failed; decision denied" in done.stderr  # logged, not raised
    assert path.read_bytes() == b""


def test_audit_failures_are_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    log = InMemoryAuditLog()
    log.failing = True
    gate = ReleaseGate(log, failure_log_interval=3600)
    with caplog.at_level(logging.ERROR, logger="backend.app.testing.release_gate"):
        for _ in range(50):
            assert not gate.check(OK_RESULT, now_ms=NOW).allowed
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.ERROR
    assert "decision denied" in caplog.records[0].getMessage()


# -- fail-open metrics -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [OSError(28, "No space left"), RuntimeError("store broken"), MemoryError(), HostileError()],
)
def test_a_failing_store_changes_nothing_in_the_decision_or_the_audit(exc: Exception) -> None:
    reference_log, failing_log = InMemoryAuditLog(), InMemoryAuditLog()
    reference = ReleaseGate(reference_log, GateMetricStore())
    sink = RaisingSink(exc)
    failing = ReleaseGate(failing_log, sink)
    for args, _ in TABLE.values():
        assert failing.check(*args) == reference.check(*args)
    assert sink.calls == len(TABLE)
    strip = [{k: v for k, v in e.items() if k != "logged_at"} for e in reference_log.entries]
    assert [{k: v for k, v in e.items() if k != "logged_at"} for e in failing_log.entries] == strip


def test_metric_failures_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet = ReleaseGate(metric_store=RaisingSink(RuntimeError("x")), failure_log_interval=3600)
    chatty = ReleaseGate(metric_store=RaisingSink(RuntimeError("y")), failure_log_interval=0)
    with caplog.at_level(logging.WARNING, logger="backend.app.testing.release_gate"):
        for _ in range(20):
            quiet.check(OK_RESULT, now_ms=NOW)
        assert len(caplog.records) == 1
        for _ in range(3):
            chatty.check(OK_RESULT, now_ms=NOW)
    assert len(caplog.records) == 4
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "metric emission failed" in caplog.records[0].getMessage()


def test_a_report_after_the_interval_says_how_many_were_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = ReleaseGate(metric_store=RaisingSink(RuntimeError("x")), failure_log_interval=0.05)
    with caplog.at_level(logging.WARNING, logger="backend.app.testing.release_gate"):
        gate.check(OK_RESULT, now_ms=NOW)
        start = time.monotonic()
        held_back = 0
        while len(caplog.records) < 2:  # poll until the interval has passed
            assert time.monotonic() - start < 10
            gate.check(OK_RESULT, now_ms=NOW)
            held_back += 1
    assert f"({held_back - 1} more since the last report)" in caplog.records[1].getMessage()


def test_a_store_that_is_not_a_gate_metric_store_receives_one_call_per_check() -> None:
    sink = RecordingSink()
    log = InMemoryAuditLog()
    gate = ReleaseGate(log, sink)
    gate.check(PLAIN_BLOCK, None, "prod", NOW)
    log.failing = True
    gate.check(OK_RESULT, None, "prod", NOW)
    assert sink.calls == [
        (False, (R.FLAKY_TESTS, R.NO_TIER_DATA), False, False),
        (False, (), False, True),
    ]


# -- inputs ----------------------------------------------------------------------------------

BAD_CHECK_ARGS: dict[str, tuple[dict[str, Any], type[Exception]]] = {
    "result None": ({"policy_result": None}, TypeError),
    "result as a verdict string": ({"policy_result": "release_ok"}, TypeError),
    "result as a dict": ({"policy_result": {"verdict": "release_ok", "reasons": []}}, TypeError),
    "override as a dict": ({"override": {"ttl_seconds": 60}}, TypeError),
    "override as a string": ({"override": "alice"}, TypeError),
    "scope None": ({"release_scope": None}, TypeError),
    "scope bytes": ({"release_scope": b"prod"}, TypeError),
    "scope with a newline": ({"release_scope": "prod\n"}, ValueError),
    "scope with a lone surrogate": ({"release_scope": "prod\ud800"}, ValueError),
    "now float": ({"now_ms": 1.5}, TypeError),
    "now string": ({"now_ms": "1"}, TypeError),
    "now bool": ({"now_ms": True}, TypeError),
    "now None": ({"now_ms": None}, TypeError),
    "now negative": ({"now_ms": -1}, ValueError),
    "now beyond 64 bits": ({"now_ms": 2**63}, ValueError),
}


def good_args(**changes: Any) -> dict[str, Any]:
    base = {"policy_result": HOLD_RESULT, "override": override(), "release_scope": "prod"}
    return {**base, "now_ms": NOW, **changes}


@pytest.mark.parametrize(("changes", "error"), BAD_CHECK_ARGS.values(), ids=BAD_CHECK_ARGS.keys())
def test_wrong_input_raises_before_anything_is_audited_or_counted(
    changes: dict[str, Any], error: type[Exception]
) -> None:
    log, store = InMemoryAuditLog(), GateMetricStore()
    gate = ReleaseGate(log, store)
    with pytest.raises(error):
        gate.check(**good_args(**changes))
    assert log.entries == []
    assert zero_counts(store)


@pytest.mark.anyio
@pytest.mark.parametrize(("changes", "error"), BAD_CHECK_ARGS.values(), ids=BAD_CHECK_ARGS.keys())
async def test_acheck_rejects_wrong_input_the_same_way(
    changes: dict[str, Any], error: type[Exception]
) -> None:
    log, store = InMemoryAuditLog(), GateMetricStore()
    with pytest.raises(error):
        await ReleaseGate(log, store).acheck(**good_args(**changes))
    assert log.entries == []
    assert zero_counts(store)


def test_a_str_subclass_cannot_fake_a_scope_match() -> None:
    class AlwaysEqual(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            return True

        def __ne__(self, other: object) -> bool:
            return False

    decision = ReleaseGate().check(HOLD_RESULT, override(scope="staging"), AlwaysEqual("prod"), NOW)
    assert decision.audit_detail == "SCOPE_MISMATCH"
    ov = override(scope=AlwaysEqual("staging"))
    assert type(ov.scope) is str
    assert ReleaseGate().check(HOLD_RESULT, ov, "prod", NOW).audit_detail == "SCOPE_MISMATCH"


def test_gate_construction_checks_its_collaborators() -> None:
    with pytest.raises(TypeError, match="record"):
        ReleaseGate(audit_log=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the class InMemoryAuditLog"):
        ReleaseGate(audit_log=InMemoryAuditLog)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="record_outcome"):
        ReleaseGate(metric_store=GateMetricStore)  # type: ignore[arg-type] # the class
    with pytest.raises(TypeError, match="record_outcome"):
        ReleaseGate(metric_store=InMemoryAuditLog())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="failure_log_interval"):
        ReleaseGate(failure_log_interval=-1)
    with pytest.raises(TypeError, match="failure_log_interval"):
        ReleaseGate(failure_log_interval="60")  # type: ignore[arg-type]


def test_a_default_gate_audits_in_memory_and_counts_in_its_own_store() -> None:
    gate = ReleaseGate()
    gate.check(OK_RESULT, now_ms=NOW)
    assert isinstance(gate.audit_log, InMemoryAuditLog)
    assert len(gate.audit_log.entries) == 1
    assert isinstance(gate.metric_store, GateMetricStore)
    assert gate.metric_store.decision_counts() == {"ALLOW": 1, "DENY": 0}


# -- ReleaseOverride and GateDecision --------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"ttl_seconds": 0}, ValueError, "ttl_seconds"),
        ({"ttl_seconds": -60}, ValueError, "ttl_seconds"),
        ({"ttl_seconds": 1.5}, TypeError, "ttl_seconds"),
        ({"ttl_seconds": "60"}, TypeError, "ttl_seconds"),
        ({"ttl_seconds": True}, TypeError, "ttl_seconds"),
        ({"created_at_ms": -1}, ValueError, "created_at_ms"),
        ({"created_at_ms": 1.0}, TypeError, "created_at_ms"),
        ({"created_at_ms": None}, TypeError, "created_at_ms"),
        ({"created_at_ms": 2**63}, ValueError, "created_at_ms"),
        ({"created_at_ms": 2**63 - 1000}, ValueError, "64 bits"),
        ({"scope": None}, TypeError, "scope"),
        ({"scope": "prod\x00"}, ValueError, "control"),
        ({"reason": ""}, ValueError, "reason"),
        ({"reason": "  \n\t "}, ValueError, "reason"),
        ({"reason": "bad\x1b[31m"}, ValueError, "control"),
        ({"reason": 42}, TypeError, "reason"),
        ({"created_by": ""}, ValueError, "created_by"),
        ({"created_by": "   "}, ValueError, "created_by"),
        ({"created_by": "alice\n"}, ValueError, "control"),
        ({"created_by": "\udcff"}, ValueError, "surrogate"),
        ({"created_by": None}, TypeError, "created_by"),
    ],
)
def test_override_rejects_malformed_fields(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        override(**changes)


def test_override_is_frozen_and_keeps_multiline_reasons() -> None:
    ov = override(reason="line one\nline two\tindented")
    assert ov.reason == "line one\nline two\tindented"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ov.ttl_seconds = 1  # type: ignore[misc]
    assert ov.to_record()["created_by"] == "alice@example.com"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"allowed": 1}, TypeError),
        ({"allowed": "true"}, TypeError),
        ({"override_applied": None}, TypeError),
        ({"verdict": 3}, TypeError),
        ({"verdict": "release_ko"}, ValueError),
        ({"reasons": "TIER_FAIL"}, TypeError),
        ({"reasons": ["NOPE"]}, ValueError),
        ({"audit_detail": None}, TypeError),
        ({"allowed": False, "override_applied": True}, ValueError),
        ({"verdict": OK, "reasons": [], "override_applied": True}, ValueError),
        ({"verdict": BLOCK, "override_applied": False}, ValueError),
        ({"override_applied": False}, ValueError),  # an allowed HOLD needs an override
    ],
)
def test_gate_decision_rejects_malformed_or_impossible_fields(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    fields: dict[str, Any] = {
        "allowed": True,
        "verdict": HOLD,
        "reasons": [R.TIER_FAIL],
        "override_applied": True,
        "audit_detail": "OVERRIDE_APPLIED",
    }
    with pytest.raises(error):
        GateDecision(**{**fields, **kwargs})


def test_gate_decision_coerces_reasons_and_renders_as_json() -> None:
    decision = GateDecision(False, "release_hold", ["DRIFT_ALERT", "TIER_FAIL"], False, "X")  # type: ignore[arg-type]
    assert decision.verdict is HOLD
    assert decision.reasons == (R.TIER_FAIL, R.DRIFT_ALERT)
    assert decision.to_dict() == {
        "allowed": False,
        "verdict": "release_hold",
        "reasons": ["TIER_FAIL", "DRIFT_ALERT"],
        "override_applied": False,
        "audit_detail": "X",
    }


# -- properties ------------------------------------------------------------------------------

check_runs = st.lists(st.tuples(gate_checks, st.booleans()), min_size=1, max_size=25)


def is_breach_path(result: ReleasePolicyResult, ov: ReleaseOverride | None) -> bool:
    return (
        result.verdict is BLOCK
        and ov is not None
        and bool(ABSOLUTE_BLOCK_REASONS & set(result.reasons))
    )


@given(runs=check_runs)
def test_p1_decision_counter_equals_the_checks_split_by_allowed(
    runs: list[tuple[tuple[Any, ...], bool]],
) -> None:
    """P1 (gate level): the decision counter equals the number of check calls, split by the
    allowed field of the decisions returned; every check whose audit write succeeded left
    exactly one entry."""
    log, store = InMemoryAuditLog(), GateMetricStore()
    gate = ReleaseGate(log, store)
    decisions = []
    for args, audit_fails in runs:
        log.failing = audit_fails
        decisions.append(gate.check(*args))
    allowed = sum(d.allowed for d in decisions)
    assert store.decision_counts() == {"ALLOW": allowed, "DENY": len(runs) - allowed}
    assert len(log.entries) == sum(not fails for _, fails in runs)


@given(runs=check_runs)
def test_p2_breach_counter_rises_only_on_the_absolute_block_override_path(
    runs: list[tuple[tuple[Any, ...], bool]],
) -> None:
    """P2: the contract-breach counter rises by one exactly when an override is attempted on
    a RELEASE_BLOCK that carries an absolute reason (whatever the audit outcome), and never
    otherwise; those decisions are denied and say CONTRACT_BREACH_NO_OVERRIDE."""
    log, store = InMemoryAuditLog(), GateMetricStore()
    gate = ReleaseGate(log, store)
    for args, audit_fails in runs:
        log.failing = audit_fails
        before = store.breach_counts()["NO_OVERRIDE"]
        decision = gate.check(*args)
        expected = is_breach_path(args[0], args[1])
        assert store.breach_counts()["NO_OVERRIDE"] - before == int(expected)
        assert ("CONTRACT_BREACH_NO_OVERRIDE" in decision.audit_detail) is expected
        if expected:
            assert not decision.allowed


@given(runs=check_runs)
def test_p3_audit_failure_counter_rises_exactly_when_the_audit_write_fails(
    runs: list[tuple[tuple[Any, ...], bool]],
) -> None:
    """P3: the audit-write-failure counter rises by one exactly on the checks whose audit
    write failed; those checks are denied (fail-closed) and say AUDIT_WRITE_FAILED."""
    log, store = InMemoryAuditLog(), GateMetricStore()
    gate = ReleaseGate(log, store)
    for args, audit_fails in runs:
        log.failing = audit_fails
        before = store.audit_write_failures()
        decision = gate.check(*args)
        assert store.audit_write_failures() - before == int(audit_fails)
        assert decision.audit_detail.startswith("AUDIT_WRITE_FAILED") is audit_fails
        if audit_fails:
            assert not decision.allowed
            assert not decision.override_applied


store_failures = st.sampled_from(
    [
        OSError(28, "No space left"),
        RuntimeError("x"),
        ValueError("y"),
        MemoryError(),
        HostileError(),
    ]
)


@given(runs=check_runs, failure=store_failures)
def test_p5_a_store_raising_on_every_call_changes_no_decision_field(
    runs: list[tuple[tuple[Any, ...], bool]], failure: Exception
) -> None:
    """P5: with a metric store that raises on every call, every GateDecision field (allowed,
    verdict, reasons, override_applied, audit_detail) is identical to the one a gate with a
    working store returns for the same check and the same audit outcome."""
    working_log, failing_log = InMemoryAuditLog(), InMemoryAuditLog()
    working = ReleaseGate(working_log, GateMetricStore())
    sink = RaisingSink(failure)
    failing = ReleaseGate(failing_log, sink)
    for args, audit_fails in runs:
        working_log.failing = failing_log.failing = audit_fails
        expected = working.check(*args)
        got = failing.check(*args)
        assert dataclasses.astuple(got) == dataclasses.astuple(expected)
    assert sink.calls == len(runs)


@given(runs=st.lists(gate_checks, min_size=1, max_size=10))
def test_acheck_returns_what_check_returns(runs: list[tuple[Any, ...]]) -> None:
    """acheck and check share one decision table and one audit and emission path."""
    sync_store, async_store = GateMetricStore(), GateMetricStore()
    sync_gate = ReleaseGate(InMemoryAuditLog(), sync_store)
    async_gate = ReleaseGate(InMemoryAuditLog(), async_store)

    async def run_all() -> list[GateDecision]:
        return [await async_gate.acheck(*args) for args in runs]

    assert anyio.run(run_all) == [sync_gate.check(*args) for args in runs]
    assert async_store.to_dict()["decision_counts"] == sync_store.to_dict()["decision_counts"]
    assert async_store.breach_counts() == sync_store.breach_counts()


# -- acheck: off the loop --------------------------------------------------------------------


class Ticker:
    """A task on the event loop counts ticks; worker threads wait for a number of new ticks.

    A slow writer that waits for N ticks can only finish if the loop keeps running while it
    waits: run on the loop, it would block the very ticks it waits for and time out.
    """

    def __init__(self) -> None:
        self.ticks = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, threading.Event]] = []

    def tick(self) -> None:
        with self._lock:
            self.ticks += 1
            for target, event in self._waiters:
                if self.ticks >= target:
                    event.set()

    def wait_for_ticks(self, n: int, timeout: float = 5.0) -> int:
        """Block (a worker thread) until ``n`` more ticks; return how many happened."""
        event = threading.Event()
        with self._lock:
            start = self.ticks
            self._waiters.append((start + n, event))
        event.wait(timeout)
        with self._lock:
            return self.ticks - start

    async def run_anyio(self) -> None:
        while True:
            await anyio.sleep(0.01)
            self.tick()

    async def run_asyncio(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.tick()


class SlowAuditLog:
    """Each write takes ``ticks`` loop ticks (about 10 ms each)."""

    def __init__(self, ticker: Ticker, ticks: int = 20) -> None:
        self.ticker, self.wait = ticker, ticks
        self.started = threading.Event()
        self.entries: list[Any] = []
        self.ticks_during: list[int] = []
        self.threads: list[int] = []

    def record(self, entry: Any) -> None:
        self.threads.append(threading.get_ident())
        self.started.set()
        self.ticks_during.append(self.ticker.wait_for_ticks(self.wait))
        self.entries.append(entry)


class SlowStore(RecordingSink):
    """A metric store (write-through, say) whose every call takes ``ticks`` loop ticks."""

    def __init__(self, ticker: Ticker, ticks: int = 20) -> None:
        super().__init__()
        self.ticker, self.wait = ticker, ticks
        self.started = threading.Event()
        self.ticks_during: list[int] = []
        self.threads: list[int] = []

    def record_outcome(self, *args: Any, **kwargs: Any) -> None:
        self.threads.append(threading.get_ident())
        self.started.set()
        self.ticks_during.append(self.ticker.wait_for_ticks(self.wait))
        super().record_outcome(*args, **kwargs)


async def assert_acheck_keeps_the_loop_running(ticker: Ticker) -> None:
    log, store = SlowAuditLog(ticker), SlowStore(ticker)
    gate = ReleaseGate(log, store)
    decision = await gate.acheck(HOLD_RESULT, override(), "prod", NOW)
    assert decision.allowed
    assert decision.override_applied
    # The ticker ticked all through both writes (about 200 ms each) ...
    assert log.ticks_during[0] >= 20
    assert store.ticks_during[0] >= 20
    # ... because they ran on worker threads, not on the loop's thread.
    loop_thread = threading.get_ident()
    assert loop_thread not in log.threads
    assert loop_thread not in store.threads
    assert store.calls == [(True, (R.TIER_FAIL, R.DRIFT_ALERT), False, False)]


@pytest.mark.asyncio
async def test_acheck_does_not_block_the_loop_under_pytest_asyncio() -> None:
    ticker = Ticker()
    task = asyncio.create_task(ticker.run_asyncio())
    try:
        await assert_acheck_keeps_the_loop_running(ticker)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


@pytest.mark.anyio
async def test_acheck_does_not_block_the_loop_under_the_anyio_plugin() -> None:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run_anyio)
        await assert_acheck_keeps_the_loop_running(ticker)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_acheck_fails_closed_and_open_like_check(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")
    store = GateMetricStore()
    audit = JsonlAuditLog(path, follow_symlinks=True)  # the test's own link to /dev/full
    decision = await ReleaseGate(audit, store).acheck(OK_RESULT, now_ms=NOW)
    assert (
        decision.audit_detail == "AUDIT_WRITE_FAILED audit_error=ENOSPC intended=ALLOW RELEASE_OK"
    )
    assert store.audit_write_failures() == 1
    failing = ReleaseGate(InMemoryAuditLog(), RaisingSink(OSError(5, "EIO")))
    assert await failing.acheck(HOLD_RESULT, override(), "prod", NOW) == ReleaseGate().check(
        HOLD_RESULT, override(), "prod", NOW
    )


# -- acheck: cancellation --------------------------------------------------------------------


async def wait_in_thread(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 10.0)


def call_recording(
    gate: ReleaseGate, on_cancel: Callable[[], object], results: list[GateDecision]
) -> Callable[[], Any]:
    """A task body: acheck; on cancellation, record ``on_cancel()`` as it is at that moment."""
    observed: list[object] = []

    async def body() -> None:
        try:
            results.append(await gate.acheck(OK_RESULT, now_ms=NOW))
        except anyio.get_cancelled_exc_class():
            observed.append(on_cancel())
            raise

    body.observed = observed  # type: ignore[attr-defined]
    return body


@pytest.mark.anyio
async def test_cancelled_by_anyio_before_the_audit_write_nothing_happens() -> None:
    log, store = InMemoryAuditLog(), GateMetricStore()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await ReleaseGate(log, store).acheck(OK_RESULT, now_ms=NOW)
    assert scope.cancelled_caught
    assert log.entries == []
    assert zero_counts(store)


@pytest.mark.anyio
async def test_cancelled_by_anyio_during_the_audit_write_the_write_ends_nothing_counted() -> None:
    ticker = Ticker()
    log, store = SlowAuditLog(ticker, ticks=5), GateMetricStore()
    results: list[GateDecision] = []
    body = call_recording(ReleaseGate(log, store), lambda: len(log.entries), results)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run_anyio)
        async with anyio.create_task_group() as calls:
            calls.start_soon(body)
            await wait_in_thread(log.started)
            calls.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    assert body.observed == [1]  # type: ignore[attr-defined] # the write had ended
    assert results == []  # no decision returned ...
    assert zero_counts(store)  # ... and none counted


@pytest.mark.asyncio
async def test_cancelled_natively_during_the_audit_write_the_write_ends_nothing_counted() -> None:
    ticker = Ticker()
    ticking = asyncio.create_task(ticker.run_asyncio())
    log, store = SlowAuditLog(ticker, ticks=5), GateMetricStore()
    results: list[GateDecision] = []
    body = call_recording(ReleaseGate(log, store), lambda: len(log.entries), results)
    try:
        task = asyncio.create_task(body())
        await wait_in_thread(log.started)
        task.cancel()  # task.cancel() does not wait for worker threads by itself
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        ticking.cancel()
        with suppress(asyncio.CancelledError):
            await ticking
    # acheck waited for the write before raising: no work outlives the call.
    assert body.observed == [1]  # type: ignore[attr-defined]
    assert results == []
    assert zero_counts(store)


@pytest.mark.anyio
async def test_cancelled_by_anyio_during_emission_the_decision_is_returned_and_counted() -> None:
    ticker = Ticker()
    log, store = InMemoryAuditLog(), SlowStore(ticker, ticks=5)
    results: list[GateDecision] = []
    body = call_recording(ReleaseGate(log, store), lambda: len(store.calls), results)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run_anyio)
        async with anyio.create_task_group() as calls:
            calls.start_soon(body)
            await wait_in_thread(store.started)
            calls.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    # Counted and returned: the cancellation reaches the caller at its next checkpoint.
    assert [d.allowed for d in results] == [True]
    assert store.calls == [(True, (), False, False)]
    assert len(log.entries) == 1


@pytest.mark.asyncio
async def test_cancelled_natively_during_emission_the_count_ends_before_the_raise() -> None:
    ticker = Ticker()
    ticking = asyncio.create_task(ticker.run_asyncio())
    log, store = InMemoryAuditLog(), SlowStore(ticker, ticks=5)
    results: list[GateDecision] = []
    body = call_recording(ReleaseGate(log, store), lambda: len(store.calls), results)
    try:
        task = asyncio.create_task(body())
        await wait_in_thread(store.started)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        ticking.cancel()
        with suppress(asyncio.CancelledError):
            await ticking
    # The documented window: counted (the emission had started) but not returned.
    assert body.observed == [1]  # type: ignore[attr-defined]
    assert results == []
    assert len(log.entries) == 1


# -- acheck: one thread hop, and the window between the write and the emission --------------


class ThreadRecordingLog(InMemoryAuditLog):
    """Records the thread each write ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def record(self, entry: Any) -> None:
        self.threads.append(threading.get_ident())
        super().record(entry)


class ThreadRecordingStore(RecordingSink):
    """Records the thread each emission ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def record_outcome(self, *args: Any, **kwargs: Any) -> None:
        self.threads.append(threading.get_ident())
        super().record_outcome(*args, **kwargs)


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[Callable[..., Any]]:
    """The functions passed to ``anyio.to_thread.run_sync``, in order."""
    calls: list[Callable[..., Any]] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return calls


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("log_factory", "expected"),
    [
        (ThreadRecordingLog, (True, (R.TIER_FAIL, R.DRIFT_ALERT), False, False)),
        # A failed write is emitted from the same thread too (fail-closed DENY, counted).
        (
            lambda: RaisingAuditLog(OSError(errno.EIO, "EIO")),
            (False, (R.TIER_FAIL, R.DRIFT_ALERT), False, True),
        ),
    ],
    ids=["written", "write failed"],
)
async def test_acheck_writes_and_emits_in_one_thread_hop_off_the_loop(
    thread_hops: list[Callable[..., Any]], log_factory: Callable[[], Any], expected: Any
) -> None:
    log, store = log_factory(), ThreadRecordingStore()
    gate = ReleaseGate(log, store)
    for _ in range(3):
        await gate.acheck(HOLD_RESULT, override(), "prod", NOW)
    assert len(thread_hops) == 3  # one per acheck, not one for the write and one for the count
    assert store.calls == [expected] * 3
    loop_thread = threading.get_ident()
    assert loop_thread not in store.threads
    if isinstance(log, ThreadRecordingLog):
        # Each check's count ran on the thread that had just written its entry.
        assert log.threads == store.threads
        assert len(log.entries) == 3


@pytest.mark.anyio
async def test_the_default_store_counts_in_the_thread_that_wrote_the_entry(
    thread_hops: list[Callable[..., Any]],
) -> None:
    # The thread identity alone proves little (anyio reuses an idle worker for a second hop):
    # the hop count is what shows the count did not take a hop of its own.
    seen: list[tuple[str, int]] = []

    class Log(InMemoryAuditLog):
        def record(self, entry: Any) -> None:
            seen.append(("write", threading.get_ident()))
            super().record(entry)

    class Store(GateMetricStore):
        def record_outcome(self, *args: Any, **kwargs: Any) -> None:
            seen.append(("count", threading.get_ident()))
            super().record_outcome(*args, **kwargs)

    store = Store()
    decision = await ReleaseGate(Log(), store).acheck(OK_RESULT, now_ms=NOW)
    assert decision.allowed
    assert len(thread_hops) == 1
    [(first, writer), (second, counter)] = seen
    assert (first, second) == ("write", "count")
    assert writer == counter != threading.get_ident()
    assert store.decision_counts() == {"ALLOW": 1, "DENY": 0}


@pytest.fixture
def cancel_requested(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once acheck, cancelled, has told its worker thread so (the thread may not have
    looked yet)."""
    event = threading.Event()
    cancel = release_gate._CheckCall.cancel

    def spy(call: Any) -> int:
        state = cancel(call)
        event.set()
        return state

    monkeypatch.setattr(release_gate._CheckCall, "cancel", spy)
    return event


class PausingGate(ReleaseGate):
    """Pauses its worker thread after the audit write has ended, before the emission starts,
    until ``resume`` is set: the window where the cancellation and the emission race."""

    def __init__(self, resume: threading.Event, *args: Any) -> None:
        super().__init__(*args)
        self.written = threading.Event()
        self.resume = resume

    def _write_audit(self, plan: Any) -> str | None:
        error = super()._write_audit(plan)
        self.written.set()
        assert self.resume.wait(10.0)
        return error


class WaitingStore(RecordingSink):
    """An emission that, once started, waits for ``resume`` before it counts."""

    def __init__(self, resume: threading.Event) -> None:
        super().__init__()
        self.started = threading.Event()
        self.resume = resume

    def record_outcome(self, *args: Any, **kwargs: Any) -> None:
        self.started.set()
        assert self.resume.wait(10.0)
        super().record_outcome(*args, **kwargs)


async def cancel_by_anyio_once(started: threading.Event, body: Callable[[], Any]) -> None:
    async with anyio.create_task_group() as calls:
        calls.start_soon(body)
        await wait_in_thread(started)
        calls.cancel_scope.cancel()


async def cancel_natively_once(started: threading.Event, body: Callable[[], Any]) -> None:
    task = asyncio.create_task(body())
    await wait_in_thread(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


CANCELLERS = pytest.mark.parametrize(
    "cancel_once", [cancel_by_anyio_once, cancel_natively_once], ids=["anyio", "native"]
)


@pytest.mark.anyio
@CANCELLERS
async def test_a_cancellation_between_the_write_and_the_emission_wins_nothing_counted(
    cancel_requested: threading.Event, cancel_once: Callable[..., Any]
) -> None:
    log, store = InMemoryAuditLog(), GateMetricStore()
    # The worker thread resumes only once acheck has asked it to stop: the cancellation is
    # requested strictly after the write's end and before the emission's start.
    gate = PausingGate(cancel_requested, log, store)
    results: list[GateDecision] = []
    body = call_recording(gate, lambda: len(log.entries), results)
    await cancel_once(gate.written, body)
    assert body.observed == [1]  # type: ignore[attr-defined] # acheck waited for the thread
    assert results == []
    assert zero_counts(store)
    assert len(log.entries) == 1  # the entry records what the gate decided


@pytest.mark.anyio
@CANCELLERS
async def test_an_emission_that_started_first_wins_over_the_cancellation(
    cancel_requested: threading.Event, cancel_once: Callable[..., Any]
) -> None:
    log, store = InMemoryAuditLog(), WaitingStore(cancel_requested)
    results: list[GateDecision] = []
    body = call_recording(ReleaseGate(log, store), lambda: len(store.calls), results)
    await cancel_once(store.started, body)
    # Counted either way; returned only under an anyio cancel scope (see acheck's docstring).
    assert store.calls == [(True, (), False, False)]
    if cancel_once is cancel_by_anyio_once:
        assert [d.allowed for d in results] == [True]
        assert body.observed == []  # type: ignore[attr-defined]
    else:
        assert results == []
        assert body.observed == [1]  # type: ignore[attr-defined] # counted before the raise
    assert len(log.entries) == 1


@pytest.mark.anyio
async def test_an_anyio_cancellation_during_emission_is_delivered_at_the_next_checkpoint(
    cancel_requested: threading.Event,
) -> None:
    store = WaitingStore(cancel_requested)
    gate = ReleaseGate(InMemoryAuditLog(), store)
    task = asyncio.current_task()
    assert task is not None
    before = task.cancelling()
    reached: list[str] = []

    async def canceller(scope: anyio.CancelScope) -> None:
        await wait_in_thread(store.started)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(canceller, scope)
            decision = await gate.acheck(OK_RESULT, now_ms=NOW)
            reached.append("returned")
            await anyio.lowlevel.checkpoint()
            reached.append("after the checkpoint")  # pragma: no cover - must not run
    assert decision.allowed
    assert reached == ["returned"]
    assert scope.cancelled_caught
    assert store.calls == [(True, (), False, False)]
    # The swallowed delivery left no cancellation request behind on the task.
    assert task.cancelling() == before


@pytest.mark.anyio
async def test_cancelled_while_waiting_for_a_worker_thread_nothing_happens() -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    limiter.total_tokens = 1
    busy = threading.Event()
    log, store = InMemoryAuditLog(), GateMetricStore()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_in_thread, busy)  # holds the only token
            with anyio.CancelScope() as scope:
                tg.start_soon(lambda: ReleaseGate(log, store).acheck(OK_RESULT, now_ms=NOW))
                await anyio.wait_all_tasks_blocked()
                assert limiter.statistics().tasks_waiting == 1
                tg.cancel_scope.cancel()
            busy.set()
    finally:
        limiter.total_tokens = tokens
    assert not scope.cancelled_caught
    assert log.entries == []
    assert zero_counts(store)


def test_a_check_call_cancelled_before_its_thread_runs_it_does_nothing() -> None:
    # The thread pool may pick the call up after the await was cancelled: it must not start.
    log, store = InMemoryAuditLog(), GateMetricStore()
    gate = ReleaseGate(log, store)
    call = release_gate._CheckCall(gate, gate._plan(OK_RESULT, None, "", NOW))
    assert call.cancel() == release_gate._PENDING
    assert call.run() is None
    assert call.decision is None
    assert log.entries == []
    assert zero_counts(store)


# -- concurrency and the README --------------------------------------------------------------


def test_threads_sharing_one_gate_count_and_audit_exactly(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    store = GateMetricStore()
    gate = ReleaseGate(JsonlAuditLog(path), store)
    barrier = threading.Barrier(4)
    plan = [OK_RESULT, HOLD_RESULT, GUARD_BLOCK]

    def work() -> None:
        barrier.wait()
        for i in range(60):
            gate.check(plan[i % 3], override(), "prod", NOW)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert len(entries) == 240
    assert store.decision_counts() == {"ALLOW": 160, "DENY": 80}
    assert store.breach_counts() == {"NO_OVERRIDE": 80}
    assert sum(e["allowed"] for e in entries) == 160


def test_the_readme_wiring_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Wiring the release gate", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)\n```", section, flags=re.DOTALL)
    path = tmp_path / "audit.jsonl"
    monkeypatch.setenv("RELEASE_GATE_AUDIT_LOG", str(path))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [e["audit_detail"] for e in entries] == ["OVERRIDE_APPLIED", "OVERRIDE_APPLIED"]


@pytest.mark.parametrize(
    ("changes", "kind", "field"),
    [
        ({"ttl_seconds": "60"}, FieldTypeError, "ttl_seconds"),
        ({"ttl_seconds": True}, FieldTypeError, "ttl_seconds"),
        ({"ttl_seconds": 0}, FieldValueError, "ttl_seconds"),
        ({"created_at_ms": -1}, FieldValueError, "created_at_ms"),
        ({"created_at_ms": 2**63 - 1}, FieldValueError, "ttl_seconds"),  # the expiry overflows
        ({"created_by": None}, FieldTypeError, "created_by"),
        ({"reason": " "}, FieldValueError, "reason"),
        ({"scope": "a\nb"}, FieldValueError, "scope"),
        # Every type is checked before any value: the wrong type is the one reported.
        ({"ttl_seconds": 0, "created_by": None}, FieldTypeError, "created_by"),
    ],
)
def test_a_refused_override_names_its_field(
    changes: dict[str, Any], kind: type[Exception], field: str
) -> None:
    fields = {
        "ttl_seconds": 60,
        "created_at_ms": 0,
        "scope": "s",
        "reason": "r",
        "created_by": "c",
    }
    with pytest.raises(kind) as info:
        ReleaseOverride(**(fields | changes))
    assert getattr(info.value, "field", None) == field


@pytest.mark.parametrize(
    ("release_scope", "now_ms", "kind", "field"),
    [
        (7, 0, FieldTypeError, "release_scope"),
        ("a\x00", 0, FieldValueError, "release_scope"),
        ("", 1.5, FieldTypeError, "now_ms"),
        ("", -1, FieldValueError, "now_ms"),
        ("", 2**63, FieldValueError, "now_ms"),
    ],
)
def test_refused_check_arguments_are_named_before_anything_is_audited(
    release_scope: Any, now_ms: Any, kind: type[Exception], field: str
) -> None:
    gate = ReleaseGate()
    with pytest.raises(kind) as info:
        gate.check(OK_RESULT, None, release_scope, now_ms)
    assert getattr(info.value, "field", None) == field
    assert list(gate.audit_log.entries) == []  # type: ignore[attr-defined]
    assert gate.metric_store.decision_counts() == {"ALLOW": 0, "DENY": 0}  # type: ignore[attr-defined]
