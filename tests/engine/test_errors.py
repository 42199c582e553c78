"""Tests of gatemetrics.errors: the hierarchy subclasses built-ins and carries its data."""

from __future__ import annotations

import pickle

import pytest

from gatemetrics import GatemetricsError, LockTimeoutError, SchemaError, ShardWriteError


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (SchemaError("a.b", "bad"), ValueError),
        (ShardWriteError("/x", "disk full"), OSError),
        (LockTimeoutError("/x.lock", 2.5), TimeoutError),
    ],
)
def test_errors_subclass_their_builtin_and_our_base(error: Exception, builtin: type) -> None:
    assert isinstance(error, builtin)
    assert isinstance(error, GatemetricsError)


def test_errors_carry_data_and_say_it() -> None:
    err = SchemaError("refusals.X", "unknown label value")
    assert (err.field, err.problem) == ("refusals.X", "unknown label value")
    assert str(err) == "refusals.X: unknown label value"
    assert str(SchemaError("", "whole document")) == "whole document"
    assert "2.5 s" in str(LockTimeoutError("/x.lock", 2.5))
    assert str(ShardWriteError("/d/s.json", "disk full")) == "/d/s.json: disk full"


@pytest.mark.parametrize(
    "error",
    [SchemaError("f", "p"), ShardWriteError("/p", "q"), LockTimeoutError("/l", 1.0)],
)
def test_errors_survive_pickling(error: Exception) -> None:
    clone = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object
    assert type(clone) is type(error)
    assert str(clone) == str(error)
