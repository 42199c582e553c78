"""Release policy vocabulary: the reasons a release can be held or blocked."""

from __future__ import annotations

from enum import StrEnum, unique

__all__ = ["BlockReasonCode"]


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
