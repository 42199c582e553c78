"""Every interval and timeout the engine takes is checked by one function, the same way.

``gatemetrics.check_seconds`` is used by ``bind``/``Binding``, ``periodic_saver`` and, being
public, by applications for their own durations (a ``lock_timeout``, say): a real
``int``/``float`` (not ``bool``, not a string), finite, positive (or non-negative where zero means
one attempt), at most a thread's longest wait.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import anyio
import pytest

from gatemetrics import Binding, CounterStore, bind, check_seconds, periodic_saver
from tests.engine.schema import SHOP_SCHEMA

NOT_DURATIONS = [
    pytest.param(float("inf"), id="inf"),
    pytest.param(float("-inf"), id="-inf"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(-1.0, id="negative"),
    pytest.param(True, id="bool"),
    pytest.param("5", id="str"),
    pytest.param(None, id="None"),
    pytest.param(1e300, id="huge"),
    pytest.param(10**400, id="huge-int"),
]


@pytest.mark.parametrize("value", [*NOT_DURATIONS, pytest.param(0, id="zero")])
def test_check_seconds_refuses_what_is_not_a_positive_duration(value: object) -> None:
    with pytest.raises(ValueError, match="interval"):
        check_seconds("interval", value)


@pytest.mark.parametrize("value", NOT_DURATIONS)
def test_check_seconds_refuses_them_where_zero_is_allowed_too(value: object) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        check_seconds("lock_timeout", value, allow_zero=True)


def test_check_seconds_accepts_durations_as_floats() -> None:
    assert check_seconds("interval", 5) == 5.0
    assert type(check_seconds("interval", 5)) is float
    assert check_seconds("interval", 0.001) == 0.001
    assert check_seconds("lock_timeout", 0, allow_zero=True) == 0.0
    assert check_seconds("interval", threading.TIMEOUT_MAX) == threading.TIMEOUT_MAX
    assert math.isfinite(check_seconds("interval", 10**9))


@pytest.mark.parametrize("value", [*NOT_DURATIONS, pytest.param(0, id="zero")])
@pytest.mark.parametrize("mode", ["periodic", "write-through"])
def test_bind_refuses_an_interval_that_is_not_a_duration_before_touching_the_directory(
    tmp_path: Path, value: object, mode: str
) -> None:
    # A huge interval used to be accepted and kill the saver thread at once (OverflowError in
    # Event.wait); True used to mean one second.
    store = CounterStore(SHOP_SCHEMA)
    with pytest.raises(ValueError, match="interval"):
        bind(store, tmp_path / "shards", mode=mode, interval=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval"):
        Binding(store, tmp_path / "shards", mode=mode, interval=value)  # type: ignore[arg-type]
    assert not (tmp_path / "shards").exists()
    assert store.change_hook is None


@pytest.mark.parametrize("value", [*NOT_DURATIONS, pytest.param(0, id="zero")])
def test_periodic_saver_refuses_the_same_intervals(tmp_path: Path, value: object) -> None:
    async def main() -> None:
        async with periodic_saver(CounterStore(SHOP_SCHEMA), tmp_path, interval=value):  # type: ignore[arg-type]
            pytest.fail("entered with a bad interval")

    with pytest.raises(ValueError, match="interval"):
        anyio.run(main)
    assert list(tmp_path.iterdir()) == []


def test_a_periodic_binding_with_the_longest_interval_keeps_its_thread(tmp_path: Path) -> None:
    store = CounterStore(SHOP_SCHEMA)
    binding = bind(store, tmp_path, mode="periodic", interval=threading.TIMEOUT_MAX)
    try:
        assert any(t.name == "gatemetrics-periodic-save" for t in threading.enumerate())
        store.increment("errors")
    finally:
        assert binding.close()
    assert not binding.shard.unsaved()
