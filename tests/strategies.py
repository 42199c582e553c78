"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

from hypothesis import strategies as st

from backend.app.testing.release_policy import BlockReasonCode

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
