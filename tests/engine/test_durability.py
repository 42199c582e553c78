"""Durability: the two names of shard format v2, and the previous release's three, deprecated."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from gatemetrics import Durability, shard_for
from tests.engine.shard_helpers import pay, shop_store, totals

LEGACY = [
    ("none", Durability.PROCESS_CRASH),
    ("file", Durability.POWER_LOSS),
    ("full", Durability.POWER_LOSS),
]


def test_the_names_of_format_v2() -> None:
    assert [d.value for d in Durability] == ["process-crash", "power-loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Durability("process-crash") is Durability.PROCESS_CRASH
        assert Durability("power-loss") is Durability.POWER_LOSS
        assert Durability(Durability.POWER_LOSS) is Durability.POWER_LOSS
        assert Durability.from_setting("power-loss") == (Durability.POWER_LOSS, None)


@pytest.mark.parametrize(("legacy", "new"), LEGACY)
def test_a_legacy_name_maps_to_its_new_member_with_a_deprecation_warning(
    legacy: str, new: Durability
) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{legacy!r}.*it now means {new.value!r}") as w:
        assert Durability(legacy) is new
    assert len(w) == 1


def test_the_deprecation_warning_names_the_caller() -> None:
    with pytest.warns(DeprecationWarning, match="'full' is deprecated") as w:
        Durability("full")
    assert w[0].filename == __file__  # not the enum machinery


def test_full_is_power_loss_and_none_is_process_crash() -> None:
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert Durability("full") is Durability.POWER_LOSS
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert Durability("none") is Durability.PROCESS_CRASH


@pytest.mark.parametrize(("legacy", "new"), LEGACY)
def test_from_setting_returns_the_message_instead_of_warning(legacy: str, new: Durability) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        member, message = Durability.from_setting(legacy)
    assert member is new
    assert message is not None
    assert "\n" not in message
    assert f"{legacy!r}" in message
    assert f"it now means {new.value!r}" in message


@pytest.mark.parametrize(
    "value", ["FULL", "None", "fsync", "", "process_crash", "Power-Loss", " full", None, 1]
)
def test_an_unknown_value_is_refused(value: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused outright, with no deprecation warning first
        with pytest.raises(ValueError, match="is not a valid Durability"):
            Durability(value)
        if isinstance(value, str):
            with pytest.raises(ValueError, match="is not a valid Durability"):
                Durability.from_setting(value)


def test_a_shard_given_a_legacy_name_warns_once_and_uses_the_new_member(tmp_path: Path) -> None:
    store = shop_store()
    pay(store)
    with pytest.warns(DeprecationWarning, match="'file'"):
        shard = shard_for(store, tmp_path, durability="file")
    assert shard.durability is Durability.POWER_LOSS
    try:
        assert shard.save()
    finally:
        shard.close()
    assert totals(tmp_path) == {"paid": 1, "refused": 0}


def test_the_default_durability_is_process_crash(tmp_path: Path) -> None:
    store = shop_store()
    shard = shard_for(store, tmp_path)
    assert shard.durability is Durability.PROCESS_CRASH
    shard.close(save=False)
