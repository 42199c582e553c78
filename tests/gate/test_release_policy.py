"""Tests of backend.app.testing.release_policy."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.app.testing.fields import FieldError, FieldTypeError, FieldValueError
from backend.app.testing.release_policy import (
    ABSOLUTE_BLOCK_REASONS,
    REASON_VERDICTS,
    BlockReasonCode,
    ReleasePolicy,
    ReleasePolicyResult,
    ReleaseVerdict,
)

OK = ReleaseVerdict.RELEASE_OK
HOLD = ReleaseVerdict.RELEASE_HOLD
BLOCK = ReleaseVerdict.RELEASE_BLOCK
R = BlockReasonCode

# Every signal reported and good: the policy's clean bill of health.
GOOD: dict[str, Any] = {
    "tier_results": {"unit": True, "integration": True},
    "flaky_tests": (),
    "drift_alert": False,
    "canary_breaking": 0,
    "guard_violations": 0,
    "ops_gate_passed": True,
}


def evaluate(**changes: Any) -> ReleasePolicyResult:
    return ReleasePolicy().evaluate(**{**GOOD, **changes})


# -- vocabulary ------------------------------------------------------------------------------


def test_block_reason_values_equal_their_names() -> None:
    assert len(BlockReasonCode) == 10
    for code in BlockReasonCode:
        assert code.value == code.name
        assert code == code.name  # usable wherever the string label is expected


def test_verdict_values_are_the_fixed_strings() -> None:
    assert [v.value for v in ReleaseVerdict] == ["release_ok", "release_hold", "release_block"]


def test_verdicts_order_by_severity_not_alphabetically() -> None:
    # Alphabetically "release_block" < "release_hold" < "release_ok": the opposite order.
    assert OK < HOLD < BLOCK
    assert BLOCK > HOLD > OK
    assert OK <= OK  # noqa: PLR0124 - reflexive comparisons on purpose
    assert BLOCK >= BLOCK  # noqa: PLR0124
    assert sorted([BLOCK, OK, HOLD]) == [OK, HOLD, BLOCK]
    assert max(OK, BLOCK, HOLD) is BLOCK
    assert [v.severity for v in ReleaseVerdict] == [0, 1, 2]


def test_verdicts_compare_with_their_values_in_either_order() -> None:
    assert HOLD > "release_ok"
    # The string on the left: the reflected comparison must not fall back to str order.
    assert "release_ok" < HOLD  # noqa: SIM300
    assert "release_block" > HOLD  # noqa: SIM300
    assert BLOCK >= "release_block"


@pytest.mark.parametrize("other", ["release_ko", "", "RELEASE_OK", "zzz"])
def test_ordering_a_verdict_against_another_string_is_refused(other: str) -> None:
    with pytest.raises(TypeError, match="cannot order"):
        _ = OK < other  # noqa: SIM300
    with pytest.raises(TypeError, match="cannot order"):
        _ = other > OK


def test_ordering_a_verdict_against_a_non_string_is_refused() -> None:
    with pytest.raises(TypeError):
        _ = OK < 1  # type: ignore[operator]


def test_absolute_block_reasons_are_guard_violation_and_ops_gate_fail() -> None:
    assert frozenset({R.GUARD_VIOLATION, R.OPS_GATE_FAIL}) == ABSOLUTE_BLOCK_REASONS
    assert isinstance(ABSOLUTE_BLOCK_REASONS, frozenset)


def test_reason_verdicts_follow_the_policy_rules() -> None:
    blocking = {r for r, v in REASON_VERDICTS.items() if v is BLOCK}
    holding = {r for r, v in REASON_VERDICTS.items() if v is HOLD}
    assert blocking == {R.NO_TIER_DATA, R.NO_FLAKE_DATA, R.GUARD_VIOLATION, R.OPS_GATE_FAIL}
    assert holding == set(BlockReasonCode) - blocking
    assert blocking >= ABSOLUTE_BLOCK_REASONS
    with pytest.raises(TypeError):
        REASON_VERDICTS[R.TIER_FAIL] = OK  # type: ignore[index]


# -- ReleasePolicyResult ---------------------------------------------------------------------


def test_policy_result_accepts_keywords_and_values_and_has_defaults() -> None:
    result = ReleasePolicyResult(verdict="release_hold", reasons=["DRIFT_ALERT"])
    assert result.verdict is HOLD
    assert result.reasons == (R.DRIFT_ALERT,)
    assert all(type(r) is BlockReasonCode for r in result.reasons)
    assert result.required_actions == ()
    assert dict(result.details) == {}


def test_policy_result_reasons_are_distinct_and_in_declaration_order() -> None:
    result = ReleasePolicyResult(HOLD, ["DRIFT_ALERT", R.TIER_FAIL, R.DRIFT_ALERT, "TIER_FAIL"])
    assert result.reasons == (R.TIER_FAIL, R.DRIFT_ALERT)
    assert result == ReleasePolicyResult(HOLD, [R.DRIFT_ALERT, R.TIER_FAIL])


def test_policy_result_is_immutable_and_copies_its_inputs() -> None:
    details: dict[str, Any] = {"failing_tiers": ("e2e",)}
    actions = ["fix e2e"]
    result = ReleasePolicyResult(HOLD, [R.TIER_FAIL], actions, details)
    details["injected"] = True
    actions.append("injected")
    assert dict(result.details) == {"failing_tiers": ("e2e",)}
    assert result.required_actions == ("fix e2e",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.verdict = OK  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.details["x"] = 1  # type: ignore[index]


def test_policy_result_is_hashable_comparable_and_picklable() -> None:
    a = ReleasePolicyResult(BLOCK, [R.OPS_GATE_FAIL], ["pass the ops gate"], {"k": 1})
    b = ReleasePolicyResult(BLOCK, ["OPS_GATE_FAIL"], ("pass the ops gate",), {"k": 1})
    assert a == b
    assert hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a  # noqa: S301 - our own bytes


@pytest.mark.parametrize("verdict", [HOLD, BLOCK])
def test_hold_or_block_without_reasons_is_a_manual_decision_and_allowed(
    verdict: ReleaseVerdict,
) -> None:
    assert ReleasePolicyResult(verdict, []).reasons == ()


def test_a_verdict_above_what_the_reasons_need_is_allowed() -> None:
    assert ReleasePolicyResult(BLOCK, [R.TIER_FAIL]).verdict is BLOCK


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"verdict": 1, "reasons": []}, TypeError, "verdict must be"),
        ({"verdict": None, "reasons": []}, TypeError, "verdict must be"),
        ({"verdict": "RELEASE_OK", "reasons": []}, ValueError, "unknown verdict"),
        ({"verdict": "release_ok", "reasons": "TIER_FAIL"}, TypeError, "reasons must be"),
        ({"verdict": "release_ok", "reasons": None}, TypeError, "reasons must be"),
        ({"verdict": "release_hold", "reasons": ["tier_fail"]}, ValueError, "unknown block"),
        ({"verdict": "release_hold", "reasons": [3]}, TypeError, "a reason must be"),
        ({"verdict": "release_hold", "reasons": [b"TIER_FAIL"]}, TypeError, "a reason must be"),
        ({"verdict": OK, "reasons": [R.TIER_FAIL]}, ValueError, "RELEASE_OK .* cannot carry"),
        # A hold carrying a blocking reason would let an override lift a block.
        ({"verdict": HOLD, "reasons": [R.GUARD_VIOLATION]}, ValueError, "below release_block"),
        ({"verdict": HOLD, "reasons": [R.NO_TIER_DATA]}, ValueError, "below release_block"),
        ({"verdict": OK, "reasons": [], "required_actions": "do x"}, TypeError, "required_"),
        ({"verdict": OK, "reasons": [], "required_actions": [1]}, TypeError, "required action"),
        ({"verdict": OK, "reasons": [], "details": [("k", 1)]}, TypeError, "details must be"),
        ({"verdict": OK, "reasons": [], "details": {1: "x"}}, TypeError, "details keys"),
    ],
)
def test_policy_result_rejects_malformed_input(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ReleasePolicyResult(**kwargs)


# -- ReleasePolicy.evaluate ------------------------------------------------------------------


def test_all_good_signals_give_release_ok() -> None:
    result = evaluate()
    assert result.verdict is OK
    assert result.reasons == ()
    assert result.required_actions == ()
    assert dict(result.details) == {
        "failing_tiers": (),
        "flaky_tests": (),
        "canary_breaking": 0,
        "guard_violations": 0,
        "ops_gate_passed": True,
    }


@pytest.mark.parametrize(
    ("changes", "verdict", "reasons"),
    [
        ({"tier_results": {"unit": True, "e2e": False}}, HOLD, {R.TIER_FAIL}),
        ({"flaky_tests": ["test_a"]}, HOLD, {R.FLAKY_TESTS}),
        ({"drift_alert": True}, HOLD, {R.DRIFT_ALERT}),
        ({"canary_breaking": 2}, HOLD, {R.CANARY_BREAKING}),
        ({"guard_violations": 1}, BLOCK, {R.GUARD_VIOLATION}),
        ({"ops_gate_passed": False}, BLOCK, {R.OPS_GATE_FAIL}),
        # Missing data fails closed.
        ({"tier_results": None}, BLOCK, {R.NO_TIER_DATA}),
        ({"tier_results": {}}, BLOCK, {R.NO_TIER_DATA}),
        ({"flaky_tests": None}, BLOCK, {R.NO_FLAKE_DATA}),
        ({"drift_alert": None}, HOLD, {R.NO_DRIFT_DATA}),
        ({"canary_breaking": None}, HOLD, {R.NO_CANARY_DATA}),
        ({"guard_violations": None}, HOLD, {R.NO_CANARY_DATA}),
        ({"ops_gate_passed": None}, BLOCK, {R.OPS_GATE_FAIL}),
        # Known violations count even when the rest of the canary data is missing.
        (
            {"canary_breaking": None, "guard_violations": 3},
            BLOCK,
            {R.NO_CANARY_DATA, R.GUARD_VIOLATION},
        ),
        # Reasons of several bad signals are merged; the verdict is the worst.
        (
            {"drift_alert": True, "canary_breaking": 1, "ops_gate_passed": False},
            BLOCK,
            {R.DRIFT_ALERT, R.CANARY_BREAKING, R.OPS_GATE_FAIL},
        ),
    ],
)
def test_each_signal_maps_to_its_reason_and_verdict(
    changes: dict[str, Any], verdict: ReleaseVerdict, reasons: set[BlockReasonCode]
) -> None:
    result = evaluate(**changes)
    assert result.verdict is verdict
    assert set(result.reasons) == reasons
    assert len(result.required_actions) == len(result.reasons)


def test_no_signals_at_all_block() -> None:
    result = ReleasePolicy().evaluate()
    assert result.verdict is BLOCK
    assert set(result.reasons) == {
        R.NO_TIER_DATA,
        R.NO_FLAKE_DATA,
        R.NO_DRIFT_DATA,
        R.NO_CANARY_DATA,
        R.OPS_GATE_FAIL,
    }


def test_details_name_what_failed_and_actions_say_what_to_do() -> None:
    result = evaluate(
        tier_results={"unit": False, "e2e": False, "perf": True},
        flaky_tests={"test_b", "test_a"},
        guard_violations=2,
    )
    assert result.details["failing_tiers"] == ("e2e", "unit")
    assert result.details["flaky_tests"] == ("test_a", "test_b")
    assert result.details["guard_violations"] == 2
    assert "fix the failing tiers: e2e, unit" in result.required_actions
    assert any("no override can lift this" in a for a in result.required_actions)


def test_evaluate_is_pure() -> None:
    tiers = {"unit": False}
    flaky = ["test_x"]
    first = evaluate(tier_results=tiers, flaky_tests=flaky)
    assert evaluate(tier_results=tiers, flaky_tests=flaky) == first
    assert tiers == {"unit": False}
    assert flaky == ["test_x"]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"tier_results": [("unit", True)]}, TypeError),
        ({"tier_results": {"unit": "yes"}}, TypeError),
        ({"tier_results": {"unit": 1}}, TypeError),
        ({"tier_results": {1: True}}, TypeError),
        ({"tier_results": {"": True}}, ValueError),
        ({"flaky_tests": "test_a"}, TypeError),
        ({"flaky_tests": 3}, TypeError),
        ({"flaky_tests": [None]}, TypeError),
        ({"flaky_tests": [""]}, ValueError),
        ({"drift_alert": "false"}, TypeError),
        ({"drift_alert": 0}, TypeError),
        ({"canary_breaking": -1}, ValueError),
        ({"canary_breaking": 1.0}, TypeError),
        ({"canary_breaking": True}, TypeError),
        ({"guard_violations": "2"}, TypeError),
        ({"ops_gate_passed": "true"}, TypeError),
    ],
)
def test_evaluate_rejects_malformed_signals(
    changes: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        evaluate(**changes)


# -- monotonicity ----------------------------------------------------------------------------

TIERS = ["unit", "integration", "e2e", "perf"]
signals = st.fixed_dictionaries(
    {
        "tier_results": st.none() | st.dictionaries(st.sampled_from(TIERS), st.booleans()),
        "flaky_tests": st.none() | st.frozensets(st.sampled_from(["t1", "t2", "t3"])),
        "drift_alert": st.none() | st.booleans(),
        "canary_breaking": st.none() | st.integers(0, 3),
        "guard_violations": st.none() | st.integers(0, 3),
        "ops_gate_passed": st.none() | st.booleans(),
    }
)


# One way to add a bad signal to a reported signal: (applies to sig?, make it worse).
WORSENINGS: dict[str, tuple[Any, Any]] = {
    "tier_results": (
        bool,
        lambda d, v: {**v, d.draw(st.sampled_from(TIERS)): False},
    ),
    "flaky_tests": (
        lambda v: v is not None,
        lambda d, v: v | {d.draw(st.sampled_from(["t1", "t4"]))},
    ),
    "drift_alert": (lambda v: v is False, lambda d, v: True),
    "canary_breaking": (lambda v: v is not None, lambda d, v: v + d.draw(st.integers(1, 3))),
    "guard_violations": (lambda v: v is not None, lambda d, v: v + d.draw(st.integers(1, 3))),
    "ops_gate_passed": (lambda v: v is True, lambda d, v: d.draw(st.sampled_from([False, None]))),
}


def worsen(data: st.DataObject, sig: dict[str, Any]) -> dict[str, Any]:
    """``sig`` with one more bad signal, on a signal that was reported."""
    options = [name for name, (applies, _) in WORSENINGS.items() if applies(sig[name])]
    if not options:
        return sig
    name = data.draw(st.sampled_from(options))
    return {**sig, name: WORSENINGS[name][1](data, sig[name])}


@given(sig=signals, data=st.data())
def test_adding_a_bad_signal_never_lowers_the_verdict_and_keeps_every_reason(
    sig: dict[str, Any], data: st.DataObject
) -> None:
    """Monotone policy: one more bad signal (a failed tier, a flaky test, a drift alert, a
    breaking canary, a guard violation, a failed ops gate) never lowers the verdict, and the
    reasons of the worse signals contain the earlier reasons (reasons are merged)."""
    policy = ReleasePolicy()
    before = policy.evaluate(**sig)
    worse = sig
    for _ in range(data.draw(st.integers(1, 4))):
        worse = worsen(data, worse)
    after = policy.evaluate(**worse)
    assert after.verdict >= before.verdict
    assert set(before.reasons) <= set(after.reasons)


@given(sig=signals)
def test_the_verdict_is_the_most_severe_verdict_of_the_reasons(sig: dict[str, Any]) -> None:
    """The verdict is exactly what the reasons require: no stricter, no looser."""
    result = ReleasePolicy().evaluate(**sig)
    assert result.verdict is max((REASON_VERDICTS[r] for r in result.reasons), default=OK)


HOLD_WITH = {"verdict": "release_hold"}
OK_WITH = {"verdict": "release_ok", "reasons": []}


@pytest.mark.parametrize(
    ("kwargs", "kind", "field", "code"),
    [
        ({"verdict": 1, "reasons": []}, FieldTypeError, "verdict", "wrong_type"),
        ({"verdict": "maybe", "reasons": []}, FieldValueError, "verdict", "unknown_verdict"),
        (HOLD_WITH | {"reasons": {"TIER_FAIL": 1}}, FieldTypeError, "reasons", "wrong_type"),
        (HOLD_WITH | {"reasons": ["TIER_FAIL", 3]}, FieldTypeError, "reasons[1]", "wrong_type"),
        (
            HOLD_WITH | {"reasons": ["TIER_FAIL", "NOPE"]},
            FieldValueError,
            "reasons[1]",
            "unknown_reason",
        ),
        (
            {"verdict": "release_ok", "reasons": ["TIER_FAIL"]},
            FieldValueError,
            "reasons",
            "inconsistent_result",
        ),
        (
            OK_WITH | {"required_actions": [1]},
            FieldTypeError,
            "required_actions[0]",
            "wrong_type",
        ),
        (OK_WITH | {"details": {1: 2}}, FieldTypeError, "details", "wrong_type"),
    ],
)
def test_a_refused_result_names_its_field_and_rule(
    kwargs: dict[str, Any], kind: type[FieldError], field: str, code: str
) -> None:
    # One structured error, so callers (the HTTP app) report it without re-checking the rules;
    # still a TypeError or ValueError for everyone else.
    with pytest.raises(kind) as info:
        ReleasePolicyResult(**kwargs)
    assert isinstance(info.value, TypeError if kind is FieldTypeError else ValueError)
    assert (info.value.field, info.value.code) == (field, code)
    assert str(info.value) == info.value.message
    copy = pickle.loads(pickle.dumps(info.value))  # noqa: S301 - our own bytes
    assert (type(copy), copy.field, copy.code, str(copy)) == (kind, field, code, str(info.value))


def test_policy_signals_of_the_wrong_kind_name_the_argument() -> None:
    with pytest.raises(FieldTypeError) as info:
        ReleasePolicy().evaluate(drift_alert="false")  # type: ignore[arg-type]
    assert info.value.field == "drift_alert"
    with pytest.raises(FieldValueError) as value:
        ReleasePolicy().evaluate(canary_breaking=-1)
    assert value.value.field == "canary_breaking"
