"""Tests of the 64-bit rule: totals saturate at 2**63-1, and the shard that passes it goes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatemetrics import (
    MAX_COUNT,
    CounterStore,
    shard_for,
)
from gatemetrics.aggregate import QUARANTINE_DIR
from tests.engine.aggregate_helpers import (
    agg,
    assert_bounded,
    orders,
    shard_names,
    shop_store,
)
from tests.engine.schema import (
    dead_shop_shard,
)


def _archive_with(directory: Path, **changes: Any) -> None:
    dead_shop_shard(directory)
    agg(directory, compact=True)
    archive = orjson.loads((directory / "archive.json").read_bytes())
    for key, value in changes.items():
        if key == "paid":
            archive["counts"]["orders"]["paid"] = value
        else:
            archive[key] = value
    (directory / "archive.json").write_bytes(orjson.dumps(archive))


@pytest.mark.parametrize("near", [MAX_COUNT, MAX_COUNT - 1, MAX_COUNT - 4])
def test_an_archive_near_the_64_bit_limit_saturates_and_never_blames_a_shard(
    tmp_path: Path, live: Callable[[Path, int], CounterStore], near: int
) -> None:
    _archive_with(tmp_path, paid=near, absorbed_total=MAX_COUNT, quarantined_total=MAX_COUNT)
    dead = dead_shop_shard(tmp_path, paid=5)
    live(tmp_path, 2)
    for compact in (False, True, True, False):
        result = agg(tmp_path, compact=compact)  # never SchemaError: it reads what it wrote
        assert result.snapshot().get("orders", "paid") == MAX_COUNT
        assert result.archive.saturated
        assert all(s.action in ("counted", "absorbed") for s in result.shards), result.shards
        assert result.quarantined_total == MAX_COUNT
        assert_bounded(result)
    assert not (tmp_path / dead).exists()  # absorbed into the saturated total, not quarantined
    assert not (tmp_path / QUARANTINE_DIR).exists()


def test_an_absurd_shard_is_the_one_left_out_whatever_the_read_order(tmp_path: Path) -> None:
    """Shards whose counts together pass the limit: the largest goes, not the ones after it."""
    huge = _dead_shard_with(tmp_path, MAX_COUNT - 1)
    small = [dead_shop_shard(tmp_path, paid=1) for _ in range(3)]
    result = agg(tmp_path, compact=True)
    actions = {s.name: s.action for s in result.shards}
    assert actions[huge] == "quarantined"
    assert all(actions[name] == "counted" for name in small)
    assert orders(tmp_path) == {"paid": 3, "refused": 0}


def _dead_shard_with(directory: Path, paid: int) -> str:
    """A dead v2 shop shard with ``paid`` paid orders, written by the real writer."""
    store = shop_store()
    store.increment("orders", "paid", paid)
    shard = shard_for(store, directory)
    assert shard.save()
    assert shard.path is not None
    name = os.path.basename(shard.path)
    shard.close(save=False)
    return name


@given(
    archived=st.lists(st.integers(0, MAX_COUNT), min_size=2, max_size=2),
    dead=st.lists(st.integers(0, MAX_COUNT), min_size=2, max_size=2),
)
@settings(max_examples=25)
def test_whatever_compaction_writes_at_the_64_bit_limits_it_reads_back(
    archived: list[int], dead: list[int]
) -> None:
    """An archive and a dead shard anywhere up to 2**63-1: compaction never fails, the next
    runs read its archive back, and each total is the exact sum or, past the limit, 2**63-1."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        _archive_with(directory)
        archive = orjson.loads((directory / "archive.json").read_bytes())
        archive["counts"]["orders"] = {"paid": archived[0], "refused": archived[1]}
        (directory / "archive.json").write_bytes(orjson.dumps(archive))
        store = shop_store()
        store.increment("orders", "paid", dead[0])
        store.increment("orders", "refused", dead[1])
        shard = shard_for(store, directory)
        assert shard.save()
        shard.close(save=False)
        expected = {
            "paid": min(archived[0] + dead[0], MAX_COUNT),
            "refused": min(archived[1] + dead[1], MAX_COUNT),
        }
        for compact in (True, True, False):
            result = agg(directory, compact=compact)
            assert result.snapshot().family("orders") == expected
            assert all(s.action in ("counted", "absorbed") for s in result.shards)
        assert shard_names(directory) == []  # absorbed, never quarantined
