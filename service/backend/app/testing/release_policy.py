"""Release policy: verdicts, the reasons a release is held or blocked, and the pure policy.

:class:`ReleasePolicy` turns release signals into a :class:`ReleasePolicyResult`; the release
gate (:mod:`backend.app.testing.release_gate`) turns a result into an allow/deny decision.

Every reason carries a minimum verdict (:data:`REASON_VERDICTS`): missing tier or flake data, a
failed ops gate and any guard violation block; failing tiers, flaky tests, a drift alert, a
breaking canary and missing drift or canary data hold. A result's verdict is never below the
minimum of its reasons, so no hand-built result can dress a block up as an overridable hold.

Every refused argument raises a :class:`~backend.app.testing.fields.FieldError` (a
``TypeError`` or ``ValueError``) naming the field and the rule it broke.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum, unique
from types import MappingProxyType
from typing import Any

from backend.app.testing.fields import (
    INCONSISTENT_RESULT,
    UNKNOWN_REASON,
    UNKNOWN_VERDICT,
    FieldTypeError,
    FieldValueError,
    shown,
)

__all__ = [
    "ABSOLUTE_BLOCK_REASONS",
    "REASON_VERDICTS",
    "BlockReasonCode",
    "ReleasePolicy",
    "ReleasePolicyResult",
    "ReleaseVerdict",
]


@unique
class ReleaseVerdict(StrEnum):
    """The policy's verdict, ordered by severity: OK < HOLD < BLOCK.

    Comparisons use severity, not the alphabetical order of the values. A plain string that is
    a verdict value compares as that verdict; any other string raises :class:`TypeError`
    rather than silently comparing alphabetically.
    """

    RELEASE_OK = "release_ok"
    RELEASE_HOLD = "release_hold"
    RELEASE_BLOCK = "release_block"

    @property
    def severity(self) -> int:
        """0 for OK, 1 for HOLD, 2 for BLOCK."""
        return _SEVERITY[str.__str__(self)]

    def __lt__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.severity < rank

    def __le__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.severity <= rank

    def __gt__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.severity > rank

    def __ge__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.severity >= rank


_SEVERITY = {"release_ok": 0, "release_hold": 1, "release_block": 2}


def _rank_of(other: object) -> int | None:
    if not isinstance(other, str):
        return None
    rank = _SEVERITY.get(str.__str__(other))
    if rank is None:
        # str's own comparison would answer alphabetically, and wrongly: refuse instead.
        raise TypeError(f"cannot order a ReleaseVerdict against {other!r}")
    return rank


@unique
class BlockReasonCode(StrEnum):
    """Why a release is held or blocked. Each value equals its name (it is a metric label)."""

    TIER_FAIL = "TIER_FAIL"
    FLAKY_TESTS = "FLAKY_TESTS"
    DRIFT_ALERT = "DRIFT_ALERT"
    CANARY_BREAKING = "CANARY_BREAKING"
    GUARD_VIOLATION = "GUARD_VIOLATION"
    OPS_GATE_FAIL = "OPS_GATE_FAIL"
    NO_TIER_DATA = "NO_TIER_DATA"
    NO_FLAKE_DATA = "NO_FLAKE_DATA"
    NO_DRIFT_DATA = "NO_DRIFT_DATA"
    NO_CANARY_DATA = "NO_CANARY_DATA"


#: Reasons no override can lift: attempting one is a contract breach.
ABSOLUTE_BLOCK_REASONS: frozenset[BlockReasonCode] = frozenset(
    {BlockReasonCode.GUARD_VIOLATION, BlockReasonCode.OPS_GATE_FAIL}
)

_HOLD = ReleaseVerdict.RELEASE_HOLD
_BLOCK = ReleaseVerdict.RELEASE_BLOCK

#: The minimum verdict each reason implies.
REASON_VERDICTS: Mapping[BlockReasonCode, ReleaseVerdict] = MappingProxyType(
    {
        BlockReasonCode.TIER_FAIL: _HOLD,
        BlockReasonCode.FLAKY_TESTS: _HOLD,
        BlockReasonCode.DRIFT_ALERT: _HOLD,
        BlockReasonCode.CANARY_BREAKING: _HOLD,
        BlockReasonCode.GUARD_VIOLATION: _BLOCK,
        BlockReasonCode.OPS_GATE_FAIL: _BLOCK,
        BlockReasonCode.NO_TIER_DATA: _BLOCK,
        BlockReasonCode.NO_FLAKE_DATA: _BLOCK,
        BlockReasonCode.NO_DRIFT_DATA: _HOLD,
        BlockReasonCode.NO_CANARY_DATA: _HOLD,
    }
)

_REASON_ORDER = {code: i for i, code in enumerate(BlockReasonCode)}


def _coerce_verdict(value: object) -> ReleaseVerdict:
    if isinstance(value, ReleaseVerdict):
        return value
    if not isinstance(value, str):
        raise FieldTypeError(
            "verdict", f"verdict must be a ReleaseVerdict or its value, not {type(value).__name__}"
        )
    try:
        return ReleaseVerdict(value)
    except ValueError:
        valid = ", ".join(v.value for v in ReleaseVerdict)
        raise FieldValueError(
            "verdict",
            f"unknown verdict {shown(value)}; expected one of {valid}",
            code=UNKNOWN_VERDICT,
        ) from None


def _coerce_reasons(reasons: object) -> tuple[BlockReasonCode, ...]:
    """``reasons`` as distinct :class:`BlockReasonCode` members in declaration order.

    Accepts any iterable (but not a lone string or a mapping) of members or their values. Raises
    :class:`FieldTypeError` for a non-iterable, a string, or a non-string item (field
    ``reasons[i]``, ``i`` counting the items as iterated), and :class:`FieldValueError` (code
    ``unknown_reason``) naming an unknown reason.
    """
    # A mapping iterates its keys: surely a mistake (a JSON object where a list was meant).
    if isinstance(reasons, str | bytes | Mapping) or not isinstance(reasons, Iterable):
        raise FieldTypeError(
            "reasons",
            f"reasons must be an iterable of BlockReasonCode, not {type(reasons).__name__}",
        )
    found: set[BlockReasonCode] = set()
    for i, item in enumerate(reasons):
        if isinstance(item, BlockReasonCode):
            found.add(item)
            continue
        if not isinstance(item, str):
            raise FieldTypeError(
                f"reasons[{i}]", f"a reason must be a BlockReasonCode, not {type(item).__name__}"
            )
        try:
            found.add(BlockReasonCode(item))
        except ValueError:
            raise FieldValueError(
                f"reasons[{i}]", f"unknown block reason {shown(item)}", code=UNKNOWN_REASON
            ) from None
    return tuple(sorted(found, key=_REASON_ORDER.__getitem__))


def _minimum_verdict(reasons: Iterable[BlockReasonCode]) -> ReleaseVerdict:
    """The lowest verdict compatible with ``reasons`` (OK when there is none)."""
    return max((REASON_VERDICTS[r] for r in reasons), default=ReleaseVerdict.RELEASE_OK)


def _empty_details() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, init=False, slots=True)
class ReleasePolicyResult:
    """What the policy concluded: a verdict, its reasons, what to do, and supporting details.

    Immutable and validated at construction:

    - ``verdict``: a :class:`ReleaseVerdict` or its value.
    - ``reasons``: members of :class:`BlockReasonCode` or their values, stored as distinct
      members in declaration order (so equal facts give equal results).
    - The verdict must be at least the minimum of its reasons (:data:`REASON_VERDICTS`): a
      RELEASE_OK carrying reasons, or a hold carrying a blocking reason, is a contradiction and
      raises :class:`~backend.app.testing.fields.FieldValueError` (field ``reasons``, code
      ``inconsistent_result``). HOLD or BLOCK without reasons is allowed (a manual hold).
    - ``required_actions``: strings, stored as a tuple.
    - ``details``: a mapping with string keys, copied into a read-only mapping (values are not
      deep-copied: keep them immutable).
    """

    verdict: ReleaseVerdict
    reasons: tuple[BlockReasonCode, ...]
    required_actions: tuple[str, ...]
    details: Mapping[str, Any] = field(hash=False)

    def __init__(
        self,
        verdict: ReleaseVerdict | str,
        reasons: Iterable[BlockReasonCode | str],
        required_actions: Iterable[str] = (),
        details: Mapping[str, Any] | None = None,
    ) -> None:
        checked_verdict = _coerce_verdict(verdict)
        checked_reasons = _coerce_reasons(reasons)
        floor = _minimum_verdict(checked_reasons)
        if checked_verdict < floor:
            if checked_verdict is ReleaseVerdict.RELEASE_OK:
                problem = "a RELEASE_OK result cannot carry block reasons"
            else:
                problem = f"verdict {checked_verdict.value} is below {floor.value}"
            names = ",".join(r.value for r in checked_reasons)
            raise FieldValueError(
                "reasons", f"{problem} (reasons: {names})", code=INCONSISTENT_RESULT
            )
        if isinstance(required_actions, str | bytes) or not isinstance(required_actions, Iterable):
            raise FieldTypeError(
                "required_actions",
                "required_actions must be an iterable of str, "
                f"not {type(required_actions).__name__}",
            )
        actions = tuple(required_actions)
        for i, action in enumerate(actions):
            if not isinstance(action, str):
                raise FieldTypeError(
                    f"required_actions[{i}]",
                    f"a required action must be a str, not {type(action).__name__}",
                )
        if details is None:
            frozen_details = _empty_details()
        elif isinstance(details, Mapping):
            copied = dict(details)
            for key in copied:
                if not isinstance(key, str):
                    raise FieldTypeError(
                        "details", f"details keys must be str, not {type(key).__name__}"
                    )
            frozen_details = MappingProxyType(copied)
        else:
            raise FieldTypeError(
                "details", f"details must be a mapping, not {type(details).__name__}"
            )
        object.__setattr__(self, "verdict", checked_verdict)
        object.__setattr__(self, "reasons", checked_reasons)
        object.__setattr__(self, "required_actions", actions)
        object.__setattr__(self, "details", frozen_details)

    def __reduce__(self) -> tuple[type[ReleasePolicyResult], tuple[Any, ...]]:
        # A mappingproxy does not pickle; rebuild through the validating constructor.
        return (
            type(self),
            (self.verdict, self.reasons, self.required_actions, dict(self.details)),
        )


def _check_bool(name: str, value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise FieldTypeError(name, f"{name} must be a bool or None, not {type(value).__name__}")


def _check_count(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldTypeError(name, f"{name} must be an int or None, not {type(value).__name__}")
    if value < 0:
        raise FieldValueError(name, f"{name} must be >= 0, got {value}")
    return value


def _check_names(name: str, values: object) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Collection):
        raise FieldTypeError(
            name, f"{name} must be a collection of names, not {type(values).__name__}"
        )
    names: set[str] = set()
    for item in values:
        if not isinstance(item, str):
            raise FieldTypeError(name, f"{name} must hold str names, not {type(item).__name__}")
        if not item:
            raise FieldValueError(name, f"{name} must not hold an empty name")
        names.add(item)
    return tuple(sorted(names))


def _check_tiers(value: object) -> dict[str, bool] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FieldTypeError(
            "tier_results",
            f"tier_results must be a mapping of tier -> bool, not {type(value).__name__}",
        )
    tiers: dict[str, bool] = {}
    for tier, passed in value.items():
        if not isinstance(tier, str):
            raise FieldTypeError(
                "tier_results", f"tier_results keys must be str, not {type(tier).__name__}"
            )
        if not tier:
            raise FieldValueError("tier_results", "tier_results must not hold an empty tier name")
        if not isinstance(passed, bool):
            raise FieldTypeError(
                f"tier_results[{tier!r}]",
                f"tier_results[{tier!r}] must be a bool, not {type(passed).__name__}",
            )
        tiers[tier] = passed
    return tiers


@dataclass(frozen=True, slots=True)
class ReleasePolicy:
    """The release policy: a pure function from release signals to a :class:`ReleasePolicyResult`.

    Missing data fails closed. Every signal defaults to ``None``, meaning "not reported":
    missing tier or flake data blocks, missing drift or canary data holds, and an ops gate that
    did not explicitly pass counts as failed.
    """

    def evaluate(
        self,
        *,
        tier_results: Mapping[str, bool] | None = None,
        flaky_tests: Collection[str] | None = None,
        drift_alert: bool | None = None,
        canary_breaking: int | None = None,
        guard_violations: int | None = None,
        ops_gate_passed: bool | None = None,
    ) -> ReleasePolicyResult:
        """Evaluate the signals of one release candidate.

        - ``tier_results``: tier name -> passed. ``None`` or an empty mapping: NO_TIER_DATA
          (block); any failed tier: TIER_FAIL (hold).
        - ``flaky_tests``: names of tests found flaky. ``None``: NO_FLAKE_DATA (block); any
          name: FLAKY_TESTS (hold).
        - ``drift_alert``: ``None``: NO_DRIFT_DATA (hold); ``True``: DRIFT_ALERT (hold).
        - ``canary_breaking`` / ``guard_violations``: counts reported by the canary. Either one
          ``None``: NO_CANARY_DATA (hold); breaking > 0: CANARY_BREAKING (hold); violations > 0:
          GUARD_VIOLATION (absolute block).
        - ``ops_gate_passed``: anything but ``True``: OPS_GATE_FAIL (absolute block).

        The verdict is the maximum over the reasons, so adding a bad signal never lowers it,
        and the reasons of all bad signals are merged. Wrong types raise
        :class:`~backend.app.testing.fields.FieldTypeError`, negative counts and empty names
        :class:`~backend.app.testing.fields.FieldValueError`, naming the argument.
        """
        tiers = _check_tiers(tier_results)
        flaky = _check_names("flaky_tests", flaky_tests)
        drift = _check_bool("drift_alert", drift_alert)
        breaking = _check_count("canary_breaking", canary_breaking)
        violations = _check_count("guard_violations", guard_violations)
        ops = _check_bool("ops_gate_passed", ops_gate_passed)

        failing = tuple(sorted(t for t, passed in tiers.items() if not passed)) if tiers else ()
        findings = (
            (not tiers, BlockReasonCode.NO_TIER_DATA, "run the test tiers and report results"),
            (
                bool(failing),
                BlockReasonCode.TIER_FAIL,
                f"fix the failing tiers: {', '.join(failing)}",
            ),
            (flaky is None, BlockReasonCode.NO_FLAKE_DATA, "report the flaky-test analysis"),
            (
                bool(flaky),
                BlockReasonCode.FLAKY_TESTS,
                f"fix or quarantine the flaky tests: {', '.join(flaky or ())}",
            ),
            (drift is None, BlockReasonCode.NO_DRIFT_DATA, "report the drift check"),
            (drift is True, BlockReasonCode.DRIFT_ALERT, "investigate the drift alert"),
            (
                breaking is None or violations is None,
                BlockReasonCode.NO_CANARY_DATA,
                "report the canary results (breaking checks and guard violations)",
            ),
            (
                bool(breaking),
                BlockReasonCode.CANARY_BREAKING,
                f"investigate the {breaking} breaking canary check(s)",
            ),
            (
                bool(violations),
                BlockReasonCode.GUARD_VIOLATION,
                f"resolve the {violations} guard violation(s); no override can lift this",
            ),
            (
                ops is not True,
                BlockReasonCode.OPS_GATE_FAIL,
                "pass the ops gate; no override can lift this",
            ),
        )
        reasons = [reason for hit, reason, _ in findings if hit]
        actions = [action for hit, _, action in findings if hit]
        details: dict[str, Any] = {
            "failing_tiers": failing if tiers else None,
            "flaky_tests": flaky,
            "canary_breaking": breaking,
            "guard_violations": violations,
        }
        details = {key: value for key, value in details.items() if value is not None}
        details["ops_gate_passed"] = ops
        return ReleasePolicyResult(_minimum_verdict(reasons), reasons, actions, details)
