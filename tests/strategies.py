"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

from hypothesis import strategies as st

from backend.app.testing.release_gate import ReleaseOverride
from backend.app.testing.release_policy import (
    REASON_VERDICTS,
    BlockReasonCode,
    ReleasePolicyResult,
    ReleaseVerdict,
)

valid_reason_members = st.sampled_from(list(BlockReasonCode))
valid_reason_strings = st.sampled_from([r.value for r in BlockReasonCode])

# Strings a hostile or sloppy caller might pass as a reason: near misses of real codes, label
# syntax injection, control characters, arbitrary unicode.
hostile_reason_strings = st.one_of(
    st.sampled_from(
        [
            "tier_fail",
            "TIER_FAIL ",
            " TIER_FAIL",
            "TIER-FAIL",
            "",
            'TIER_FAIL"} 1\nrelease_gate_reason_total{reason="X',
            "NO_OVERRIDE",
            "ALLOW",
            "DENY",
            "\\",
            "\n",
            "BlockReasonCode.TIER_FAIL",
        ]
    ),
    st.text(max_size=40),
)
non_string_reasons = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.binary(max_size=10),
    st.lists(st.integers(), max_size=3),  # unhashable
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),  # unhashable
    st.just(b"TIER_FAIL"),
)
any_reason = st.one_of(
    valid_reason_members, valid_reason_strings, hostile_reason_strings, non_string_reasons
)
valid_reason = st.one_of(valid_reason_members, valid_reason_strings)

# One operation on a GateMetricStore: ("decision", allowed, reasons) or a counter name.
decision_op = st.tuples(st.just("decision"), st.booleans(), st.lists(any_reason, max_size=6))
simple_op = st.sampled_from(["breach", "audit_failure", "metric_failure"]).map(lambda k: (k,))
store_op = st.one_of(decision_op, decision_op, simple_op)
store_ops = st.lists(store_op, max_size=60)

# -- release gate inputs ----------------------------------------------------------------------

# The gate's clock in the properties: a realistic epoch-milliseconds instant.
GATE_NOW_MS = 1_700_000_000_000
gate_scopes = st.sampled_from(["", "prod", "staging"])


@st.composite
def policy_results(draw: st.DrawFn) -> ReleasePolicyResult:
    """A valid policy result: any reasons, any verdict at least as severe as they require."""
    reasons = draw(st.sets(valid_reason_members, max_size=4))
    floor = max((REASON_VERDICTS[r] for r in reasons), default=ReleaseVerdict.RELEASE_OK)
    verdict = draw(st.sampled_from([v for v in ReleaseVerdict if v >= floor]))
    return ReleasePolicyResult(verdict, reasons)


@st.composite
def overrides(draw: st.DrawFn, now_ms: int = GATE_NOW_MS) -> ReleaseOverride:
    """Overrides around ``now_ms``: valid, expired, not yet valid, at the boundaries."""
    ttl = draw(st.integers(min_value=1, max_value=120))
    offset = draw(
        st.one_of(
            st.integers(min_value=-200_000, max_value=5_000),
            st.sampled_from([0, 1, -ttl * 1000, -ttl * 1000 + 1]),  # the boundaries
        )
    )
    return ReleaseOverride(
        ttl_seconds=ttl,
        created_at_ms=now_ms + offset,
        scope=draw(gate_scopes),
        reason="hotfix for an incident",
        created_by="oncall@example.com",
    )


# One gate check: (policy result, override or None, release scope, now_ms).
gate_checks = st.tuples(
    policy_results(), st.none() | overrides(), gate_scopes, st.just(GATE_NOW_MS)
)
