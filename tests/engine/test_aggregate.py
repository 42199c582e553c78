"""Tests of gatemetrics.aggregate: reading a directory and summing its shards and archive.

Shards are written the way each release writes them: format v2 by this release's
:class:`~gatemetrics.Shard`, format v1 by :class:`tests.shard_tools.LegacyV1Shard` (the previous
release's writer, byte for byte).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from gatemetrics import (
    CounterStore,
    LockTimeoutError,
    SchemaError,
    aggregate_dir,
)
from gatemetrics._format import (
    v1_names,
    v2_names,
)
from tests.engine.aggregate_helpers import (
    agg,
    assert_bounded,
    incarnation_of,
    live_v2_name,
    orders,
    shard_names,
)
from tests.engine.schema import (
    SHOP_SCHEMA,
    dead_shop_shard,
    dead_shop_v1_shard,
)
from tests.shard_tools import (
    LegacyV1Shard,
)


def test_the_shard_names_helper_sees_both_formats(tmp_path: Path) -> None:
    v2 = dead_shop_shard(tmp_path)
    v1 = dead_shop_v1_shard(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    assert v2 == v2_names(incarnation_of(v2))[0]
    assert shard_names(tmp_path) == sorted([v2, v1, v1_names(incarnation_of(v1))[1]])


# -- merging ---------------------------------------------------------------------------------


def test_an_empty_directory_aggregates_to_zero_with_every_series(tmp_path: Path) -> None:
    result = agg(tmp_path)
    assert result.counts == tuple(SHOP_SCHEMA.zeros())
    assert (result.live, result.dead, result.quarantined_total, result.files_read) == (0, 0, 0, 0)
    assert_bounded(result)
    assert not result.archive.exists


def test_unusable_directories_raise_os_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        agg(tmp_path / "missing")
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        agg(tmp_path / "f")


@pytest.mark.parametrize("namespace", ["", "bad-name", "9lives"])
def test_a_bad_namespace_is_a_schema_error(tmp_path: Path, namespace: str) -> None:
    with pytest.raises(SchemaError):
        aggregate_dir(tmp_path, SHOP_SCHEMA, namespace=namespace)


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_a_bad_lock_timeout_is_a_value_error(tmp_path: Path, timeout: float) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        agg(tmp_path, lock_timeout=timeout)


def test_a_held_directory_lock_times_out(tmp_path: Path) -> None:
    lock = FileLock(str(tmp_path / "aggregate.lock"), thread_local=False)
    with lock, pytest.raises(LockTimeoutError) as err:
        agg(tmp_path, lock_timeout=0.05)
    assert err.value.path == str(tmp_path / "aggregate.lock")
    assert err.value.timeout == 0.05
    assert isinstance(err.value, TimeoutError)
    assert orders(tmp_path) == {"paid": 0, "refused": 0}  # free again


def test_live_and_dead_shards_of_both_formats_and_the_archive_are_summed(
    tmp_path: Path,
    live: Callable[[Path, int], CounterStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
) -> None:
    dead_shop_shard(tmp_path, paid=2, refused=1)
    agg(tmp_path, compact=True)  # into the archive
    dead_v2 = dead_shop_shard(tmp_path, paid=3)
    dead_v1 = dead_shop_v1_shard(tmp_path, paid=5)
    live_v2 = live_v2_name(live(tmp_path, 4), tmp_path)
    old_owner = live_v1(tmp_path, 6)
    result = agg(tmp_path)
    assert result.snapshot().family("orders") == {"paid": 20, "refused": 1}
    assert result.snapshot().get("refusals", "no_stock") == 1
    assert (result.live, result.dead) == (2, 2)
    assert result.files_read == 5  # the archive and four shards
    assert result.archive.exists
    assert result.archive.absorbed_total == 1
    found = {s.name: (s.format, s.state, s.action) for s in result.shards}
    assert found == {
        dead_v2: (2, "dead", "counted"),
        dead_v1: (1, "dead", "counted"),
        live_v2: (2, "live", "counted"),
        old_owner.names()[0]: (1, "live", "counted"),
    }
    assert_bounded(result)


def test_equal_counts_give_byte_identical_output_whatever_the_split(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    dead_shop_shard(one, paid=6, refused=3)
    dead_shop_shard(two, 1, 0)
    dead_shop_v1_shard(two, 2, 2)
    dead_shop_shard(two, 3, 1)
    first, second = agg(one), agg(two)
    assert first.counts == second.counts
    text = first.render_prometheus().replace('dead"} 1', 'dead"} 3')
    assert text == second.render_prometheus()
    agg(one, compact=True)
    agg(two, compact=True)
    assert agg(one).render_prometheus() == agg(two).render_prometheus()
    assert agg(one).render_json() == agg(two).render_json()
