"""Tests of compaction: dead shards folded into the archive, and a real SIGKILL at every step."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from gatemetrics import (
    CounterStore,
    ShardWriteError,
    _faults,
    bind,
    new_identity,
    shard_for,
)
from gatemetrics._format import (
    v1_names,
    v2_names,
)
from gatemetrics.aggregate import COMPACT_STEPS
from tests.engine.aggregate_helpers import (
    FAILURES,
    agg,
    assert_bounded,
    incarnation_of,
    live_v2_name,
    orders,
    shard_names,
    shop_store,
)
from tests.engine.schema import (
    dead_shop_shard,
    dead_shop_v1_shard,
    record_order,
)
from tests.processes import Reaper, run_python
from tests.shard_tools import (
    LegacyV1Shard,
)

# -- compaction ------------------------------------------------------------------------------


def test_compaction_folds_dead_shards_of_both_formats_and_keeps_live_ones_and_their_files(
    tmp_path: Path,
    live: Callable[[Path, int], CounterStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
) -> None:
    for n in range(1, 4):
        dead_shop_shard(tmp_path, paid=n)
    for n in (4, 5):
        dead_shop_v1_shard(tmp_path, paid=n)
    live_v2 = live_v2_name(live(tmp_path, 10), tmp_path)
    old_owner = live_v1(tmp_path, 20)
    v1_json, v1_lock, v1_tmp = old_owner.names()
    # A live v1 writer mid-save (its temp file) and a dead v1 writer's orphan temp file.
    (tmp_path / v1_tmp).write_text("half written")
    (tmp_path / v1_names(new_identity().incarnation)[2]).write_text("orphan")
    # A v1 lock file whose owner died before its first save.
    (tmp_path / v1_names(new_identity().incarnation)[1]).write_text("")
    # A v2 creator that died before its rename, and one creating right now (its flock held).
    (tmp_path / v2_names(new_identity().incarnation)[1]).write_bytes(b"\0" * 100)
    creating = v2_names(new_identity().incarnation)[1]
    creator = os.open(tmp_path / creating, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(creator, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = agg(tmp_path, compact=True)
        assert result.snapshot().family("orders") == {"paid": 45, "refused": 0}
        assert (result.live, result.dead) == (2, 5)
        assert result.compaction is not None
        assert result.compaction.absorbed == 5
        assert result.compaction.removed_shards == 5
        assert result.compaction.removed_temp_files == 2  # the dead v1 .tmp, the dead .creating
        assert result.compaction.removed_lock_files == 3  # two dead v1 shards' and the orphan
        assert shard_names(tmp_path) == sorted([live_v2, v1_json, v1_lock, v1_tmp, creating])
    finally:
        os.close(creator)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert archive["absorbed"] == []  # pruned: their files are gone
    assert archive["absorbed_total"] == 5
    assert archive["counts"]["orders"] == {"paid": 15, "refused": 0}
    mtime = (tmp_path / "archive.json").stat().st_mtime_ns
    again = agg(tmp_path, compact=True)
    assert again.counts == result.counts
    assert again.compaction is not None
    assert again.compaction.absorbed == 0
    assert again.compaction.removed_temp_files == 1  # the creator is gone now: an orphan
    assert (tmp_path / "archive.json").stat().st_mtime_ns == mtime  # nothing to rewrite


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_shard_the_archive_already_absorbed_is_never_counted_again(
    tmp_path: Path, fmt: int
) -> None:
    """The crash window between writing the archive and deleting the shard."""
    name = (dead_shop_v1_shard if fmt == 1 else dead_shop_shard)(tmp_path, paid=5)
    kept = (tmp_path / name).read_bytes()
    agg(tmp_path, compact=True)
    assert shard_names(tmp_path) == []
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    archive["absorbed"] = [incarnation_of(name)]  # as written in step 1, before the deletions
    (tmp_path / "archive.json").write_bytes(orjson.dumps(archive))
    (tmp_path / name).write_bytes(kept)
    result = agg(tmp_path)
    assert result.snapshot().family("orders") == {"paid": 5, "refused": 0}
    assert [(s.action, s.format) for s in result.shards] == [("absorbed", fmt)]
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("orders") == {"paid": 5, "refused": 0}
    assert shard_names(tmp_path) == []
    assert orjson.loads((tmp_path / "archive.json").read_bytes())["absorbed"] == []


def _list_as_absorbed(directory: Path, incarnation: str) -> None:
    agg(directory, compact=True)  # an archive to edit
    archive = orjson.loads((directory / "archive.json").read_bytes())
    archive["absorbed"] = [incarnation]
    (directory / "archive.json").write_bytes(orjson.dumps(archive))


def test_liveness_beats_the_archive_for_a_v2_shard(
    tmp_path: Path, live: Callable[[Path, int], CounterStore]
) -> None:
    """Absorbing needs the shard's own flock: an owner holding it was never absorbed."""
    dead_shop_shard(tmp_path, paid=1)
    store = live(tmp_path, 3)
    name = live_v2_name(store, tmp_path)
    _list_as_absorbed(tmp_path, incarnation_of(name))
    for compact in (False, True, True):
        result = agg(tmp_path, compact=compact)
        assert result.snapshot().family("orders") == {"paid": 4, "refused": 0}
        (report,) = result.shards
        assert (report.name, report.state, report.action) == (name, "live", "counted")
        assert (tmp_path / name).exists()  # never deleted while its owner lives
    record_order(store, True)
    assert orders(tmp_path) == {"paid": 5, "refused": 0}


def test_a_live_v2_shard_listed_as_absorbed_is_counted_once_after_its_owner_exits(
    tmp_path: Path,
) -> None:
    dead_shop_shard(tmp_path, paid=1)
    store = shop_store()
    binding = bind(store, tmp_path, failure_key=FAILURES)
    for _ in range(3):
        record_order(store, True)
    name = live_v2_name(store, tmp_path)
    _list_as_absorbed(tmp_path, incarnation_of(name))
    assert agg(tmp_path, compact=True).snapshot().get("orders", "paid") == 4
    binding.close()
    result = agg(tmp_path, compact=True)  # invariant 3: never decreasing
    assert result.snapshot().family("orders") == {"paid": 4, "refused": 0}
    assert orders(tmp_path) == {"paid": 4, "refused": 0}


def test_a_thousand_dead_incarnations_of_both_formats_compact_to_one_archive(
    tmp_path: Path, live: Callable[[Path, int], CounterStore]
) -> None:
    for i in range(1000):
        store = shop_store()
        record_order(store, i % 2 == 0, ["no_money"])
        if i % 10 == 0:  # one in ten from the previous release
            old = LegacyV1Shard(store, tmp_path, durability="none")
            old.save()
            old.close(save=False)
            continue
        shard = shard_for(store, tmp_path)
        assert shard.save()
        shard.close(save=False)
    live(tmp_path, 1)
    live(tmp_path, 2)
    assert len(shard_names(tmp_path)) == 900 + 200 + 2
    result = agg(tmp_path, compact=True)
    assert (result.live, result.dead) == (2, 1000)
    assert result.files_read == 1002
    expected = {"paid": 503, "refused": 500}
    assert result.snapshot().family("orders") == expected
    assert len(shard_names(tmp_path)) == 2  # the two live v2 shards, nothing else
    assert sorted(set(os.listdir(tmp_path)) - set(shard_names(tmp_path))) == [
        "aggregate.lock",
        "archive.json",
        "schema.json",  # the schema the archive is laid out for (see recorded_schema)
    ]
    assert (tmp_path / "archive.json").stat().st_size < 2000  # the ids were pruned
    after = agg(tmp_path)
    assert after.files_read == 3  # the archive and one shard per live process
    assert after.snapshot().family("orders") == expected
    assert after.archive.absorbed_total == 1000


def test_compaction_never_removes_anything_when_the_archive_cannot_be_written(
    tmp_path: Path,
) -> None:
    dead_shop_shard(tmp_path, paid=2)
    dead_shop_v1_shard(tmp_path, paid=3)
    before = sorted(os.listdir(tmp_path))

    def disk_full(step: str) -> None:
        # A full disk cannot be made real here without mounting a file system (and root
        # ignores permissions): the write fails the way ENOSPC makes it fail.
        if step == "archive.tmp_written":
            raise OSError(errno.ENOSPC, "No space left on device")

    _faults.HOOK = disk_full
    try:
        with pytest.raises(ShardWriteError, match="cannot write the archive"):
            agg(tmp_path, compact=True)
    finally:
        _faults.HOOK = None
    # Nothing removed; schema.json, written before the archive, records the schema only.
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "aggregate.lock", "schema.json"])
    assert orders(tmp_path) == {"paid": 5, "refused": 0}


# -- crash points: a real SIGKILL at every step of a compaction ---------------------------------

_CRASH_CASES = [(step, 0) for step in COMPACT_STEPS] + [
    ("compact.shard_deleted", 1),
    ("compact.lock_deleted", 2),
    ("compact.quarantined", 1),
]
# A directory of this release only has no v1 lock file to delete.
_V2_ONLY_CRASH_CASES = [c for c in _CRASH_CASES if c[0] != "compact.lock_deleted"]


@pytest.mark.parametrize(
    "case",
    [("v2", *case) for case in _V2_ONLY_CRASH_CASES] + [("mixed", *c) for c in _CRASH_CASES],
    ids=lambda case: "-".join(map(str, case)),
)
def test_a_compaction_killed_at_any_step_leaves_an_exact_directory(
    tmp_path: Path,
    reaper: Reaper,
    live: Callable[[Path, int], CounterStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
    case: tuple[str, str, int],
) -> None:
    layout, step, skip = case
    for n in (1, 2, 4):
        dead_shop_shard(tmp_path, paid=n, refused=1)
    (tmp_path / v2_names(new_identity().incarnation)[1]).write_bytes(b"a dead creator's")
    (tmp_path / v2_names(new_identity().incarnation)[0]).write_bytes(b"hostile")
    (tmp_path / "v2-hostile-1.shard").write_text("x")
    live_files = [live_v2_name(live(tmp_path, 8), tmp_path)]
    expected = {"paid": 15, "refused": 3}
    dead, hostile = 3, 2
    if layout == "mixed":
        for n in (16, 32):
            dead_shop_v1_shard(tmp_path, paid=n, refused=1)
        (tmp_path / v1_names(new_identity().incarnation)[2]).write_text("orphan")
        (tmp_path / v1_names(new_identity().incarnation)[1]).write_text("")
        (tmp_path / "shard-hostile-1.json").write_text("x")
        (tmp_path / "shard-hostile-2.json").write_text("y")
        live_files += live_v1(tmp_path, 64).names()[:2]
        expected = {"paid": 15 + 48 + 64, "refused": 5}
        dead, hostile = 5, 4
    assert orders(tmp_path) == expected

    done = run_python(
        """
        import gatemetrics.aggregate as a
        from tests.engine.schema import SHOP_SCHEMA
        _faults.install_kill_at(sys.argv[2], skip=int(sys.argv[3]))
        a.aggregate_dir(sys.argv[1], SHOP_SCHEMA, namespace="shop", compact=True)
        print("not killed", flush=True)
        """,
        str(tmp_path),
        step,
        str(skip),
    )
    code, out, err = done.returncode, done.stdout, done.stderr
    assert code == -signal.SIGKILL, out + err  # the step was reached and the kill was real

    result = agg(tmp_path)  # whatever the step: exact, no double count, nothing lost
    assert result.snapshot().family("orders") == expected
    assert result.quarantined_total == hostile
    assert_bounded(result)
    result = agg(tmp_path, compact=True)  # the next compaction finishes the job
    assert result.snapshot().family("orders") == expected
    assert result.quarantined_total == hostile
    assert shard_names(tmp_path) == sorted(live_files)  # the live shards (and a v1 lock)
    assert "archive.json.tmp" not in os.listdir(tmp_path)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert archive["absorbed"] == []
    assert archive["quarantining"] == []
    assert archive["absorbed_total"] == dead
    assert orders(tmp_path) == expected


# -- hostile environments --------------------------------------------------------------------


def test_a_crash_hook_that_raises_midway_is_a_crash_not_an_error(tmp_path: Path) -> None:
    dead_shop_shard(tmp_path, paid=3)
    dead_shop_v1_shard(tmp_path, paid=1)

    def hook(step: str) -> None:
        if step == "archive.replaced":
            raise _faults.SimulatedCrash(step)

    _faults.HOOK = hook
    try:
        with pytest.raises(_faults.SimulatedCrash):
            agg(tmp_path, compact=True)
    finally:
        _faults.HOOK = None
    assert orders(tmp_path) == {"paid": 4, "refused": 0}
    assert agg(tmp_path, compact=True).snapshot().family("orders") == {
        "paid": 4,
        "refused": 0,
    }
    assert shard_names(tmp_path) == []
