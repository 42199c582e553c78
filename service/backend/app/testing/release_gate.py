"""The release gate: turns a policy result (and maybe an override) into an allow/deny decision.

Each check runs three steps, in this order:

1. **Decide** (pure): the decision table below.
2. **Audit** (fail-closed): exactly one entry is written to the audit log. If the write raises,
   the decision returned is a DENY, whatever was decided, and ``audit_detail`` says so.
3. **Emit** (fail-open): one ``record_outcome`` call on the metric store counts the decision
   actually returned, its reasons, a contract breach, an audit write failure and (for a store
   that takes it, :class:`GateMetricStore`) the check's duration, atomically. The duration is
   ``time.perf_counter`` from the start of the call (``check`` or ``acheck``) to the
   emission: deciding, the audit write with its lock and fsync, and for ``acheck`` the hop to
   the worker thread.
   Any exception from the store is swallowed (logged, rate-limited): no field of the decision
   ever depends on the metrics.

Decision table (``audit_detail`` starts with the token in the last column):

=========== ============================================== ======= ===============================
verdict     override                                       allowed first token
=========== ============================================== ======= ===============================
OK          none or any (ignored)                          yes     RELEASE_OK
HOLD        none                                           no      HOLD_NO_OVERRIDE
HOLD        created after ``now_ms``                       no      OVERRIDE_NOT_YET_VALID
HOLD        ``now_ms >= created_at_ms + ttl_seconds*1000`` no      OVERRIDE_EXPIRED
HOLD        scope differs from a non-empty release_scope   no      SCOPE_MISMATCH
HOLD        valid in time and scope                        yes     OVERRIDE_APPLIED
BLOCK       none                                           no      BLOCKED
BLOCK       any, block has an absolute reason              no      CONTRACT_BREACH_NO_OVERRIDE
BLOCK       any, no absolute reason                        no      BLOCK_NOT_OVERRIDABLE
=========== ============================================== ======= ===============================

An override is valid for ``created_at_ms <= now_ms < created_at_ms + ttl_seconds * 1000``: at
the expiry instant it has expired, and one stamped in the future is not valid yet (a pre-dated
override must not buy itself extra time; issuers stamp it from the gate's clock). A HOLD
override that fails several checks lists every failing token (``OVERRIDE_EXPIRED
SCOPE_MISMATCH``). An override applied with an empty ``release_scope`` adds ``UNSCOPED_CHECK``:
such a check accepts an override of any scope, so callers guarding production should always
pass a scope. A contract breach adds ``absolute=<reasons>``.

When the audit write fails, the detail becomes ``AUDIT_WRITE_FAILED audit_error=<errno name or
exception class> intended=<ALLOW|DENY>`` followed by the tokens of the decision the gate would
have returned, with ``OVERRIDE_APPLIED`` renamed ``OVERRIDE_VALID`` (it was not applied). Tokens
never contain caller-supplied text, so the detail is safe to grep and to split on spaces.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, Protocol, get_type_hints

import anyio
import anyio.to_thread

from backend.app.testing.audit import AuditEntry, AuditLog, InMemoryAuditLog, OverrideRecord
from backend.app.testing.fields import FieldTypeError, FieldValueError
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_policy import (
    ABSOLUTE_BLOCK_REASONS,
    BlockReasonCode,
    ReleasePolicyResult,
    ReleaseVerdict,
    _coerce_reasons,
)

__all__ = [
    "MAX_INT64",
    "GateDecision",
    "GateMetricSink",
    "ReleaseGate",
    "ReleaseOverride",
    "check_now_ms",
    "check_release_scope",
]

_logger = logging.getLogger(__name__)

#: The largest integer any field takes. Audit entries are JSON; orjson refuses integers outside
#: 64 bits, and consumers (jq, Prometheus tooling, Go readers) expect them to fit.
MAX_INT64: Final = 2**63 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")


def _check_type(name: str, value: object, kind: type) -> None:
    # bool is an int subclass, but True is never a count or an instant.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise FieldTypeError(
            name, f"{name} must be {article} {kind.__name__}, not {type(value).__name__}"
        )


def _check_int(name: str, value: object, *, minimum: int) -> int:
    _check_type(name, value, int)
    assert isinstance(value, int)  # for mypy: _check_type raised otherwise
    if not minimum <= value <= MAX_INT64:
        raise FieldValueError(name, f"{name} must be in [{minimum}, 2**63-1], got {value}")
    return int(value)


def _check_text(name: str, value: object, *, required: bool, multiline: bool = False) -> str:
    _check_type(name, value, str)
    assert isinstance(value, str)  # for mypy: _check_type raised otherwise
    # A plain copy: a str subclass could override __eq__ and make any scope "match".
    text = str.__str__(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldValueError(name, f"{name} is not valid UTF-8 text (lone surrogate)") from None
    if required and not text.strip():
        raise FieldValueError(name, f"{name} must not be empty")
    if (_CONTROL_BUT_WHITESPACE if multiline else _CONTROL).search(text):
        raise FieldValueError(name, f"{name} must not contain control characters: {text!r}")
    return text


def check_release_scope(value: object) -> str:
    """``release_scope`` as :meth:`ReleaseGate.check` takes it: a str without control
    characters or lone surrogates (may be empty). Raises
    :class:`~backend.app.testing.fields.FieldError`."""
    return _check_text("release_scope", value, required=False)


def check_now_ms(value: object) -> int:
    """``now_ms`` as :meth:`ReleaseGate.check` takes it: an int in ``[0, 2**63-1]``. Raises
    :class:`~backend.app.testing.fields.FieldError`."""
    return _check_int("now_ms", value, minimum=0)


@dataclass(frozen=True, slots=True)
class ReleaseOverride:
    """A human decision to release despite a HOLD, valid for ``ttl_seconds`` from creation.

    Validated at construction: ``ttl_seconds`` a positive int, ``created_at_ms`` a
    non-negative int (milliseconds since the epoch, on the gate's clock), the expiry within 64
    bits; ``scope`` a str (may be empty: it then only matches an unscoped check); ``reason``
    and ``created_by`` non-blank. No field may hold control characters (``reason`` may hold
    tabs and newlines) or lone surrogates. Every field's type is checked before any value, so
    a wrong type is reported first. Wrong types raise
    :class:`~backend.app.testing.fields.FieldTypeError`, bad values
    :class:`~backend.app.testing.fields.FieldValueError`, naming the field (the expiry bound
    names ``ttl_seconds``). The fields, their names and types, are the whole definition: the
    HTTP request schema reads them from here (``dataclasses.fields``).
    """

    ttl_seconds: int
    created_at_ms: int
    scope: str
    reason: str
    created_by: str

    def __post_init__(self) -> None:
        for spec in fields(self):
            _check_type(spec.name, getattr(self, spec.name), _OVERRIDE_TYPES[spec.name])
        ttl = _check_int("ttl_seconds", self.ttl_seconds, minimum=1)
        created = _check_int("created_at_ms", self.created_at_ms, minimum=0)
        if created + ttl * 1000 > MAX_INT64:
            raise FieldValueError(
                "ttl_seconds", "created_at_ms + ttl_seconds*1000 must fit in 64 bits"
            )
        checked = {
            "ttl_seconds": ttl,
            "created_at_ms": created,
            "scope": _check_text("scope", self.scope, required=False),
            "reason": _check_text("reason", self.reason, required=True, multiline=True),
            "created_by": _check_text("created_by", self.created_by, required=True),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def expires_at_ms(self) -> int:
        """The first instant at which the override is no longer valid."""
        return self.created_at_ms + self.ttl_seconds * 1000

    def to_record(self) -> OverrideRecord:
        """The fields as written in an audit entry."""
        return {
            "ttl_seconds": self.ttl_seconds,
            "created_at_ms": self.created_at_ms,
            "scope": self.scope,
            "reason": self.reason,
            "created_by": self.created_by,
        }


#: Each override field's type, read from the annotations (a single definition).
_OVERRIDE_TYPES: Final[dict[str, type]] = get_type_hints(ReleaseOverride)


@dataclass(frozen=True, slots=True)
class GateDecision:
    """The gate's answer. ``reasons`` are the policy result's reasons, in declaration order.

    Validated at construction; besides types, the combinations the gate can never produce are
    refused: an override applied to anything but an allowed HOLD, an allowed BLOCK, an allowed
    HOLD without an override.
    """

    allowed: bool
    verdict: ReleaseVerdict
    reasons: tuple[BlockReasonCode, ...]
    override_applied: bool
    audit_detail: str

    def __post_init__(self) -> None:
        if not isinstance(self.allowed, bool):
            raise TypeError(f"allowed must be a bool, not {type(self.allowed).__name__}")
        if not isinstance(self.override_applied, bool):
            raise TypeError(
                f"override_applied must be a bool, not {type(self.override_applied).__name__}"
            )
        if not isinstance(self.verdict, str):
            raise TypeError(f"verdict must be a ReleaseVerdict, not {type(self.verdict).__name__}")
        verdict = ReleaseVerdict(self.verdict)
        object.__setattr__(self, "verdict", verdict)
        object.__setattr__(self, "reasons", _coerce_reasons(self.reasons))
        if not isinstance(self.audit_detail, str):
            raise TypeError(f"audit_detail must be a str, not {type(self.audit_detail).__name__}")
        if self.override_applied and not (self.allowed and verdict is ReleaseVerdict.RELEASE_HOLD):
            raise ValueError("an override can only be applied to an allowed RELEASE_HOLD")
        if self.allowed and verdict is ReleaseVerdict.RELEASE_BLOCK:
            raise ValueError("a RELEASE_BLOCK is never allowed")
        if self.allowed and verdict is ReleaseVerdict.RELEASE_HOLD and not self.override_applied:
            raise ValueError("a RELEASE_HOLD is only allowed with an override applied")

    @property
    def decision(self) -> Literal["ALLOW", "DENY"]:
        return "ALLOW" if self.allowed else "DENY"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``allowed``, ``verdict``, ``reasons``, ``override_applied``,
        ``audit_detail``."""
        return {
            "allowed": self.allowed,
            "verdict": self.verdict.value,
            "reasons": [r.value for r in self.reasons],
            "override_applied": self.override_applied,
            "audit_detail": self.audit_detail,
        }


class GateMetricSink(Protocol):
    """What the gate needs from a metric store (:class:`GateMetricStore` is one)."""

    def record_outcome(
        self,
        allowed: bool,
        reasons: tuple[BlockReasonCode, ...],
        *,
        breach: bool,
        audit_write_failure: bool,
    ) -> None:
        """Count one whole gate check atomically."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """A decided, not yet audited check."""

    result: ReleasePolicyResult
    override: ReleaseOverride | None
    release_scope: str
    now_ms: int
    allowed: bool
    override_applied: bool
    breach: bool
    tokens: tuple[str, ...]


class _RateLimitedLog:
    """Logs at most one record per ``interval`` seconds and counts the ones it held back.

    A failing disk fails every check; a log line per check would flood (or fill) the logs.
    """

    __slots__ = ("_interval", "_level", "_lock", "_next_at", "_suppressed")

    def __init__(self, level: int, interval: float) -> None:
        self._level = level
        self._interval = interval
        self._lock = threading.Lock()
        self._next_at: float | None = None
        self._suppressed = 0

    def report(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if self._next_at is not None and now < self._next_at:
                self._suppressed += 1
                return
            suppressed = self._suppressed
            self._suppressed = 0
            self._next_at = now + self._interval
        # Reporting must never break a check, whatever the handlers or the exception do.
        with suppress(Exception):
            _logger.log(
                self._level,
                "%s: %s (%d more since the last report)",
                message,
                type(exc).__name__,
                suppressed,
                exc_info=exc,
            )


def _describe(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__} (pass an instance)"
    return f"a {type(value).__name__}"


def _error_token(exc: BaseException) -> str:
    """A grep-safe name for an audit failure: the errno name, else the exception class."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return _TOKEN_UNSAFE.sub("_", type(exc).__name__) or "Exception"


# The states of a _CheckCall. The thread moves PENDING -> WRITING -> EMITTING; the awaiting
# side, when cancelled, moves PENDING or WRITING -> CANCELLED. Each transition is made under the
# call's lock, so at the end of the write exactly one side wins: the thread (it emits) or the
# cancellation (nothing is counted).
_PENDING: Final = 0
_WRITING: Final = 1
_EMITTING: Final = 2
_CANCELLED: Final = 3


class _CheckCall:
    """One :meth:`ReleaseGate.acheck`'s audit write and emission, on one worker thread.

    One thread hop instead of two (one for the write, one for the emission): the thread emits
    right after the write, unless the awaiting side was cancelled in the meantime. The awaiting
    side cannot rely on anyio to tell it: a native asyncio cancellation interrupts the await
    while the thread goes on, and an anyio cancellation only does when the thread call is
    abandonable (``abandon_on_cancel=True``, which :meth:`ReleaseGate.acheck` uses for that
    reason). So both sides go through :meth:`cancel` and :meth:`run`'s transitions, and a
    cancelled caller waits for a started call with :meth:`wait` before it raises.

    The lock is held for a state transition only, never across the write or the emission: the
    event loop, which takes it in :meth:`cancel`, never waits on I/O through it.
    """

    __slots__ = ("_done", "_gate", "_lock", "_plan", "_started", "_state", "decision")

    def __init__(self, gate: ReleaseGate, plan: _Plan, started: float | None = None) -> None:
        self._gate = gate
        self._plan = plan
        # time.perf_counter() when acheck began (now, for a call made without one).
        self._started = time.perf_counter() if started is None else started
        self._lock = threading.Lock()
        self._state = _PENDING
        self._done = threading.Event()
        # Set by the thread once the emission has returned: the decision, returned and counted.
        self.decision: GateDecision | None = None

    def run(self) -> GateDecision | None:
        """On the worker thread: write, then emit unless cancelled first; None if cancelled."""
        try:
            with self._lock:
                if self._state == _CANCELLED:
                    return None  # cancelled before it started: it never will
                self._state = _WRITING
            plan = self._plan
            audit_error = self._gate._write_audit(plan)
            decision = _settle(plan, audit_error)
            with self._lock:
                if self._state == _CANCELLED:
                    return None  # cancelled during the write: count nothing
                self._state = _EMITTING
            self._gate._emit(decision, plan.breach, audit_error is not None, self._started)
            self.decision = decision
            return decision
        finally:
            self._done.set()

    def cancel(self) -> int:
        """On the loop, when the await was cancelled: the state the call was in.

        ``_PENDING``: it will never start. ``_WRITING``: the write goes on, the emission will
        not happen. ``_EMITTING``: the emission had started (or ended) and goes on.
        """
        with self._lock:
            state = self._state
            if state != _EMITTING:
                self._state = _CANCELLED
            return state

    async def wait(self) -> None:
        """Wait off the loop until the started call has finished, whatever cancels us."""
        with anyio.CancelScope(shield=True):
            while not self._done.is_set():
                try:
                    await anyio.to_thread.run_sync(self._done.wait)
                except anyio.get_cancelled_exc_class():
                    continue  # another native cancellation: we re-raise the first one


def _cancelled_by_anyio() -> bool:
    """True if an anyio cancel scope around the current task has been cancelled.

    A native asyncio cancellation (``task.cancel()``, ``asyncio.timeout``) leaves no cancelled
    scope behind; an anyio one does, and it stays cancelled (level-triggered): it is delivered
    again at the task's next checkpoint, so the current delivery may be swallowed.
    """
    return anyio.current_effective_deadline() == -math.inf


class ReleaseGate:
    """Decides whether a release may go out; audits every decision and counts it.

    ``audit_log``: anything with ``record(entry)`` (:class:`~backend.app.testing.audit.AuditLog`);
    default a new :class:`InMemoryAuditLog` (unbounded, for tests and development: production
    passes a :class:`~backend.app.testing.audit.JsonlAuditLog`).
    ``metric_store``: anything with ``record_outcome`` (:class:`GateMetricSink`); default a new
    private :class:`GateMetricStore`. ``failure_log_interval``: at most one log record per this
    many seconds for audit failures, and separately for metric failures.

    Thread-safe; one gate can serve every request of a process. :meth:`check` blocks on the
    audit write (file lock, write, fsync) and on the store; async code uses :meth:`acheck`.
    """

    __slots__ = (
        "_audit_failures",
        "_audit_log",
        "_metric_failures",
        "_metric_store",
        "_timed",
    )

    def __init__(
        self,
        audit_log: AuditLog | None = None,
        metric_store: GateMetricSink | None = None,
        *,
        failure_log_interval: float = 60.0,
    ) -> None:
        if audit_log is None:
            audit_log = InMemoryAuditLog()
        elif isinstance(audit_log, type) or not callable(getattr(audit_log, "record", None)):
            raise TypeError(
                "audit_log must be an object with a record(entry) method, "
                f"not {_describe(audit_log)}"
            )
        if metric_store is None:
            metric_store = GateMetricStore()
        elif isinstance(metric_store, type) or not callable(
            getattr(metric_store, "record_outcome", None)
        ):
            raise TypeError(
                "metric_store must be an object with a record_outcome() method, "
                f"not {_describe(metric_store)}"
            )
        if isinstance(failure_log_interval, bool) or not isinstance(
            failure_log_interval, int | float
        ):
            raise TypeError("failure_log_interval must be a number of seconds")
        if not 0 <= failure_log_interval < float("inf"):
            raise ValueError("failure_log_interval must be >= 0 and finite")
        self._audit_log = audit_log
        # Only a sink that says so takes the duration: another GateMetricSink keeps its call.
        self._timed = getattr(type(metric_store), "records_check_duration", False) is True
        self._metric_store = metric_store
        self._audit_failures = _RateLimitedLog(logging.ERROR, float(failure_log_interval))
        self._metric_failures = _RateLimitedLog(logging.WARNING, float(failure_log_interval))

    @property
    def audit_log(self) -> AuditLog:
        return self._audit_log

    @property
    def metric_store(self) -> GateMetricSink:
        return self._metric_store

    def check(
        self,
        policy_result: ReleasePolicyResult,
        override: ReleaseOverride | None = None,
        release_scope: str = "",
        now_ms: int = 0,
    ) -> GateDecision:
        """Decide, audit (fail-closed), count (fail-open), and return the decision.

        ``now_ms`` is the gate's clock in milliseconds since the epoch; it is taken literally
        (the default 0 is the epoch, at which no real override is valid yet). Arguments of the
        wrong type raise :class:`~backend.app.testing.fields.FieldTypeError` (bad values
        :class:`~backend.app.testing.fields.FieldValueError`; both name the argument) before
        anything is audited or counted; after that, nothing the audit log or the store does
        makes this raise (exceptions that are not ``Exception``, such as
        ``KeyboardInterrupt``, still propagate).
        """
        started = time.perf_counter()
        plan = self._plan(policy_result, override, release_scope, now_ms)
        audit_error = self._write_audit(plan)
        decision = _settle(plan, audit_error)
        self._emit(decision, plan.breach, audit_error is not None, started)
        return decision

    async def acheck(
        self,
        policy_result: ReleasePolicyResult,
        override: ReleaseOverride | None = None,
        release_scope: str = "",
        now_ms: int = 0,
    ) -> GateDecision:
        """:meth:`check` for async code: the audit write and then the metric emission run on one
        worker thread (one anyio ``to_thread`` hop), never on the event loop; the decision
        itself is computed on the loop.

        Cancellation contract (the audit write and the emission cannot be interrupted once
        started, and ``acheck`` never leaves either running behind it):

        - Cancelled before the audit write starts: nothing is written or counted.
        - Cancelled while the audit write runs: ``acheck`` waits for the write to finish, counts
          nothing and raises the cancellation. The audit log may then hold an entry for a
          decision nobody received: an entry records what the gate decided; a caller that got
          no decision must treat the release as not allowed. A cancellation that arrives after
          the write ended but before the emission started is one of these: the worker thread
          checks for it, under a lock, before it emits.
        - Cancelled while the emission runs: with an anyio cancel scope (``move_on_after``,
          ``fail_after``, a task group's cancel), the decision is returned, counted, and the
          cancellation is delivered at the caller's next checkpoint. With a native asyncio
          cancellation (``task.cancel()``, ``asyncio.timeout``) ``acheck`` waits for the
          emission and raises: in that window only, a decision is counted that was not
          returned (asyncio offers no way to both honour the cancellation and return).
        """
        started = time.perf_counter()
        plan = self._plan(policy_result, override, release_scope, now_ms)
        call = _CheckCall(self, plan, started)
        try:
            # Abandonable, so that an anyio cancellation reaches us while the thread runs, as
            # a native one always does; _CheckCall keeps the thread from outliving acheck. (A
            # cancelled call gives its thread-limiter token back at once; its wait takes one.)
            decision = await anyio.to_thread.run_sync(call.run, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            state = call.cancel()
            if state != _PENDING:
                await call.wait()
            if state == _EMITTING and call.decision is not None and _cancelled_by_anyio():
                # Counted: return it; the cancel scope cancels us again at the next checkpoint.
                return call.decision
            raise
        # Only a cancellation (handled above) makes run() return None.
        assert decision is not None
        return decision

    # -- the three steps -----------------------------------------------------------------------

    @staticmethod
    def _plan(
        policy_result: object, override: object, release_scope: object, now_ms: object
    ) -> _Plan:
        if not isinstance(policy_result, ReleasePolicyResult):
            raise FieldTypeError(
                "policy_result",
                f"policy_result must be a ReleasePolicyResult, not {type(policy_result).__name__}",
            )
        if override is not None and not isinstance(override, ReleaseOverride):
            raise FieldTypeError(
                "override",
                f"override must be a ReleaseOverride or None, not {type(override).__name__}",
            )
        scope = check_release_scope(release_scope)
        now = check_now_ms(now_ms)
        allowed, applied, breach, tokens = _decide(policy_result, override, scope, now)
        return _Plan(policy_result, override, scope, now, allowed, applied, breach, tokens)

    def _write_audit(self, plan: _Plan) -> str | None:
        """Write the plan's entry; None on success, else a token naming the failure."""
        try:
            entry: AuditEntry = {
                "ts_ms": plan.now_ms,
                "logged_at": time.time(),
                "decision": "ALLOW" if plan.allowed else "DENY",
                "allowed": plan.allowed,
                "verdict": plan.result.verdict.value,
                "reasons": [r.value for r in plan.result.reasons],
                "override_applied": plan.override_applied,
                "override": None if plan.override is None else plan.override.to_record(),
                "release_scope": plan.release_scope,
                "audit_detail": " ".join(plan.tokens),
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
            self._audit_log.record(entry)
        except Exception as exc:  # noqa: BLE001 - any failure means "not written": fail closed
            self._audit_failures.report("release gate audit write failed; decision denied", exc)
            return _error_token(exc)
        return None

    def _emit(
        self, decision: GateDecision, breach: bool, audit_failed: bool, started: float
    ) -> None:
        try:
            if self._timed:
                # Measured here, right before the one atomic record: everything the check did.
                self._metric_store.record_outcome(  # type: ignore[call-arg]
                    decision.allowed,
                    decision.reasons,
                    breach=breach,
                    audit_write_failure=audit_failed,
                    duration=time.perf_counter() - started,
                )
                return
            self._metric_store.record_outcome(
                decision.allowed, decision.reasons, breach=breach, audit_write_failure=audit_failed
            )
        except Exception as exc:  # noqa: BLE001 - fail open: metrics never change a decision
            self._metric_failures.report("release gate metric emission failed (ignored)", exc)


def _decide(
    result: ReleasePolicyResult, override: ReleaseOverride | None, scope: str, now_ms: int
) -> tuple[bool, bool, bool, tuple[str, ...]]:
    """The decision table: (allowed, override_applied, breach, detail tokens)."""
    verdict = result.verdict
    if verdict is ReleaseVerdict.RELEASE_OK:
        return True, False, False, ("RELEASE_OK", "OVERRIDE_IGNORED")[: 2 if override else 1]
    if override is None:
        first = "BLOCKED" if verdict is ReleaseVerdict.RELEASE_BLOCK else "HOLD_NO_OVERRIDE"
        return False, False, False, (first,)
    if verdict is ReleaseVerdict.RELEASE_BLOCK:
        absolute = [r.value for r in result.reasons if r in ABSOLUTE_BLOCK_REASONS]
        if absolute:
            breach = ("CONTRACT_BREACH_NO_OVERRIDE", f"absolute={','.join(absolute)}")
            return False, False, True, breach
        return False, False, False, ("BLOCK_NOT_OVERRIDABLE",)
    problems = _override_problems(override, scope, now_ms)
    if problems:
        return False, False, False, problems
    return True, True, False, ("OVERRIDE_APPLIED", "UNSCOPED_CHECK")[: 1 if scope else 2]


def _override_problems(override: ReleaseOverride, scope: str, now_ms: int) -> tuple[str, ...]:
    """Why ``override`` cannot lift a HOLD now for ``scope``; empty when it can."""
    problems: list[str] = []
    if now_ms < override.created_at_ms:
        problems.append("OVERRIDE_NOT_YET_VALID")
    elif now_ms >= override.expires_at_ms:
        problems.append("OVERRIDE_EXPIRED")
    if scope and override.scope != scope:
        problems.append("SCOPE_MISMATCH")
    return tuple(problems)


def _settle(plan: _Plan, audit_error: str | None) -> GateDecision:
    """The decision returned: the plan's, or a fail-closed DENY if the audit write failed."""
    result = plan.result
    if audit_error is None:
        return GateDecision(
            plan.allowed,
            result.verdict,
            result.reasons,
            plan.override_applied,
            " ".join(plan.tokens),
        )
    tokens = (
        "AUDIT_WRITE_FAILED",
        f"audit_error={audit_error}",
        f"intended={'ALLOW' if plan.allowed else 'DENY'}",
        *("OVERRIDE_VALID" if t == "OVERRIDE_APPLIED" else t for t in plan.tokens),
    )
    return GateDecision(False, result.verdict, result.reasons, False, " ".join(tokens))
