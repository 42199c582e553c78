"""Tests of backend.app.testing.release_policy."""

from __future__ import annotations

from backend.app.testing.release_policy import BlockReasonCode


def test_block_reason_values_equal_their_names() -> None:
    assert len(BlockReasonCode) == 10
    for code in BlockReasonCode:
        assert code.value == code.name
        assert code == code.name  # usable wherever the string label is expected
