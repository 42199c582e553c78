"""Tests of the live shards one process keeps open between its aggregation runs."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import gatemetrics.aggregate as aggregate_module
from gatemetrics import (
    CounterStore,
    shard_for,
)
from gatemetrics._format import (
    REREADS,
    STABLE_READS,
    BadFile,
    decode_v2,
    decode_v2_slots,
)
from gatemetrics.aggregate import Aggregate
from tests.engine.aggregate_helpers import (
    agg,
    incarnation_of,
    live_v2_name,
    orders,
    shard_names,
    shop_store,
    tear,
    v2_slots,
)
from tests.engine.schema import (
    SHOP_SCHEMA,
    dead_shop_shard,
    record_order,
)
from tests.shard_tools import (
    in_forked_child,
    is_locked,
)

# -- live shards kept open between runs of one process --------------------------------------------


def open_fds_under(directory: Path) -> list[str]:
    """The files under ``directory`` this process has descriptors for (``/proc/self/fd``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith(f"{directory}/"):
            found.append(os.path.basename(target).removesuffix(" (deleted)"))
    return sorted(found)


def test_a_live_shard_kept_open_shows_every_later_save_and_holds_no_lock(
    tmp_path: Path, live: Callable[[Path, int], CounterStore]
) -> None:
    store = live(tmp_path, 1)
    name = live_v2_name(store, tmp_path)
    assert orders(tmp_path)["paid"] == 1
    assert open_fds_under(tmp_path).count(name) == 2  # the owner's and the one kept
    for expected in range(2, 6):
        record_order(store, True)
        assert orders(tmp_path)["paid"] == expected  # read through the kept descriptor
    assert open_fds_under(tmp_path).count(name) == 2  # still one kept, not one per run
    shard = shard_for(store, tmp_path)
    shard.close(save=False)
    # The kept descriptor held no lock: the owner's release makes the shard dead at once, and
    # the next run absorbs it through that descriptor like any dead shard.
    result = agg(tmp_path, compact=True)
    assert (result.live, result.dead) == (0, 1)
    assert result.snapshot().family("orders") == {"paid": 5, "refused": 0}
    assert shard_names(tmp_path) == []
    assert open_fds_under(tmp_path) == []  # nothing of the directory is left open


def test_a_kept_shard_whose_file_was_removed_is_closed_and_not_counted(
    tmp_path: Path, live: Callable[[Path, int], CounterStore]
) -> None:
    keep = live(tmp_path, 2)
    gone = live(tmp_path, 3)
    gone_name = live_v2_name(gone, tmp_path)
    assert orders(tmp_path)["paid"] == 5
    os.unlink(tmp_path / gone_name)  # a stray rm while its owner lives
    assert orders(tmp_path)["paid"] == 2  # only what is listed counts
    # Only the owner's own descriptor of the removed file is left: ours closed with the run.
    assert open_fds_under(tmp_path).count(gone_name) == 1
    assert open_fds_under(tmp_path).count(live_v2_name(keep, tmp_path)) == 2


def test_a_kept_shard_changed_under_it_is_read_whole_again(
    tmp_path: Path, live: Callable[[Path, int], CounterStore]
) -> None:
    store = live(tmp_path, 2)
    path = tmp_path / live_v2_name(store, tmp_path)
    assert orders(tmp_path)["paid"] == 2
    good = path.read_bytes()
    with open(path, "r+b") as f:  # cut in place (same inode, the kept descriptor sees it)
        f.truncate(len(good) - 100)
    result = agg(tmp_path)
    (report,) = result.shards
    assert (report.state, report.action) == ("live", "skipped")
    assert report.problem is not None
    assert "wrong size" in report.problem
    with open(path, "r+b") as f:
        f.write(good)
    assert orders(tmp_path)["paid"] == 2  # readable again: counted again


def test_no_more_than_the_limit_of_descriptors_are_kept(
    tmp_path: Path,
    live: Callable[[Path, int], CounterStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregate_module._KeptShards, "LIMIT", 2)
    names = [live_v2_name(live(tmp_path, 1), tmp_path) for _ in range(5)]
    for _ in range(3):
        assert orders(tmp_path)["paid"] == 5
        fds = open_fds_under(tmp_path)
        assert sum(fds.count(n) for n in names) == 5 + 2  # the owners' five, two kept


def test_a_forked_child_closes_the_descriptors_kept_by_its_parent(
    tmp_path: Path, live: Callable[[Path, int], CounterStore]
) -> None:
    names = [live_v2_name(live(tmp_path, 1), tmp_path) for _ in range(3)]
    assert orders(tmp_path)["paid"] == 3

    def child_sees_only_the_owners_copies() -> bool:
        # The owners' descriptors are the bindings' (closed by their own at-fork hook), so
        # nothing of the directory may be left open in the child.
        return not any(n in open_fds_under(tmp_path) for n in names)

    assert in_forked_child(child_sees_only_the_owners_copies)
    assert orders(tmp_path)["paid"] == 3  # the parent's kept descriptors still work


def test_a_fork_during_an_aggregation_leaves_no_dead_shard_locked_by_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = tmp_path / dead_shop_shard(tmp_path, paid=2)
    reading = threading.Event()
    forked = threading.Event()
    real = decode_v2_slots

    def slow_decode(*args: Any, **kwargs: Any) -> Any:
        reading.set()  # the run holds the dead shard's flock now
        assert forked.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(aggregate_module, "decode_v2_slots", slow_decode)
    results: list[Aggregate] = []
    thread = threading.Thread(target=lambda: results.append(agg(tmp_path)))
    thread.start()
    try:
        assert reading.wait(10)
        read_end, write_end = os.pipe()
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child waits for the parent, then leaves
            os.close(write_end)
            os.write(ready_write, b"x")  # past fork(), so past the at-fork hooks
            os.read(read_end, 1)
            os._exit(0)
        os.close(read_end)
        os.close(ready_write)
        # Until the child's hooks ran it holds copies of everything (that moment is inherent
        # to fork): wait for it, then the copies must be gone.
        assert os.read(ready_read, 1) == b"x"
        os.close(ready_read)
    finally:
        forked.set()
        thread.join(10)
    try:
        assert results
        assert results[0].dead == 1
        # The run is over in the parent; the child, still alive, must not keep its lock.
        assert not is_locked(dead)
        assert agg(tmp_path, compact=True).snapshot().get("orders", "paid") == 2
        assert shard_names(tmp_path) == []
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("torn_reads", [0, 6, 6 + 19, 6 + 20])
def test_a_live_shard_caught_mid_write_in_both_slots_is_read_again_not_skipped(
    tmp_path: Path, torn_reads: int
) -> None:
    # A live owner saving in a tight loop can tear one slot while the other is re-read; the
    # reader reads both slots again rather than skip the shard (which would make the aggregate
    # go down). The torn reads are scripted here: a real race hits this too rarely to test.
    store = shop_store()
    shard = shard_for(store, tmp_path)
    for _ in range(3):
        record_order(store, True)
        assert shard.save()
    assert shard.path is not None
    good = Path(shard.path).read_bytes()
    torn = good
    for offset, _seq in v2_slots(good):
        torn = tear(torn, offset)
    inc = incarnation_of(os.path.basename(shard.path))
    calls: list[int] = []

    def reread(offset: int, size: int) -> bytes:
        calls.append(offset)
        source = torn if len(calls) <= torn_reads else good
        return source[offset : offset + size]

    with pytest.raises(BadFile, match="both slots"):
        decode_v2(torn, SHOP_SCHEMA, inc)  # a dead shard is not re-read
    if torn_reads >= 6 + STABLE_READS:
        with pytest.raises(BadFile, match="both slots"):
            decode_v2(torn, SHOP_SCHEMA, inc, reread=reread)
        assert len(calls) == 2 * REREADS + STABLE_READS  # bounded
    else:
        record = decode_v2(torn, SHOP_SCHEMA, inc, reread=reread)
        assert record.counts == decode_v2(good, SHOP_SCHEMA, inc).counts
        assert record.seq == 3
    shard.close(save=False)
