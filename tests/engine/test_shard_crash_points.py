"""Crash points: a writer SIGKILLed or stopped at every step of creating a shard and of a
save leaves an exact directory and never counts twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from gatemetrics import (
    Aggregate,
    Durability,
)
from gatemetrics.shards import CREATE_STEPS, SAVE_STEPS
from tests.engine.schema import SHOP_SCHEMA, dead_shop_shard
from tests.engine.shard_helpers import (
    CLEAN,
    agg,
    owned,
    poll_while_running,
    read_shard,
    shop_counts,
    totals,
    wait_stopped,
)
from tests.processes import Reaper, read_line
from tests.shard_tools import is_locked

# -- crash points: a real SIGKILL at every step of creating a shard and of a save ---------------

KILLED_WRITER = """
from gatemetrics import bind, save_to_dir
from tests.engine.shard_helpers import WHYS, pay, refuse, shop_store
directory, step, durability = sys.argv[1:4]
store = shop_store()
binding = bind(store, directory, durability=durability)
for _ in range(3):
    pay(store)
if step.startswith("create."):
    binding.close()  # a dead incarnation holding the 3; the next save creates a new one
    refuse(store, *WHYS)
    _faults.install_kill_at(step)
    save_to_dir(store, directory, durability=durability)
else:
    _faults.install_kill_at(step)
    refuse(store, *WHYS)  # killed in its save
print("not killed", flush=True)
"""


@pytest.mark.parametrize("durability", list(Durability))
@pytest.mark.parametrize("step", [*CREATE_STEPS, *SAVE_STEPS])
def test_a_writer_killed_at_any_step_leaves_an_exact_directory_that_compacts_clean(
    tmp_path: Path, reaper: Reaper, step: str, durability: Durability
) -> None:
    proc = reaper.python(KILLED_WRITER, str(tmp_path), step, durability.value)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, out + err
    # One refusal's increments (the order and its three reasons) are all there or none.
    completed = step in ("save.written", "save.done")
    expected = shop_counts(3, refusal=completed)
    leftovers = {
        "create.locked": ["v2", "v2-creating"],
        "create.written": ["v2", "v2-creating"],
        "create.renamed": ["v2", "v2"],
        "create.done": ["v2", "v2"],
    }.get(step, ["v2"])
    assert sorted(kind for _, kind in owned(tmp_path)) == leftovers
    result = agg(tmp_path)
    assert result.counts == expected
    assert result.quarantined_total == 0
    assert all(r.action == "counted" for r in result.shards)  # nothing torn, nothing skipped
    assert result.live == 0
    result = agg(tmp_path, compact=True)
    assert result.counts == expected
    assert result.compaction is not None
    assert result.compaction.removed_temp_files == leftovers.count("v2-creating")
    assert result.compaction.removed_shards == leftovers.count("v2")
    assert sorted(os.listdir(tmp_path)) == CLEAN
    assert agg(tmp_path).counts == expected


# -- absorbed means gone: a writer stopped (SIGSTOP) at any step of a save ----------------------

STOPPABLE_WRITER = """
import json
import gatemetrics.shards as shards
from gatemetrics import bind
from tests.engine.shard_helpers import pay, shop_store

directory, step, after, check = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
until_switched = check < 0  # keep the real VANISHED_CHECK_S and record until it noticed
if not until_switched:
    shards.VANISHED_CHECK_S = check
store = shop_store()
binding = bind(store, directory)
for _ in range(3):
    pay(store)
first = binding.shard.identity.incarnation
print(binding.shard.path, flush=True)
calls = 3
if step == "idle":
    os.kill(os.getpid(), signal.SIGSTOP)  # between two saves
else:
    armed = [True]

    def stop_at(name):
        if name == step and armed[0]:
            armed[0] = False
            os.kill(os.getpid(), signal.SIGSTOP)  # inside a save, between two of its steps

    _faults.HOOK = stop_at
    pay(store)
    calls += 1
switched = None
deadline = time.monotonic() + 30
while after > 0:
    pay(store)
    calls += 1
    ident = binding.shard.identity
    if switched is None and ident is not None and ident.incarnation != first:
        switched = calls - 1  # calls made before the one whose save began a new incarnation
    if until_switched and switched is None and time.monotonic() < deadline:
        time.sleep(0.005)  # pace the records until the owner's next "still there?" check
        continue
    after -= 1
print(json.dumps({"calls": calls, "switched": switched}), flush=True)
binding.close()
"""


def stop_then_resume(
    reaper: Reaper,
    directory: Path,
    step: str,
    *,
    after: int,
    check: float,
    while_stopped: Callable[[Path], None],
) -> tuple[int, dict[str, int | None], list[dict[str, int]]]:
    """Run STOPPABLE_WRITER until it stops at ``step``; run ``while_stopped(shard path)``;
    resume it and aggregate over and over until it exits.

    Returns what its shard held while it was stopped, its report and the aggregates seen.
    """
    proc = reaper.python(STOPPABLE_WRITER, str(directory), step, str(after), str(check))
    path = Path(read_line(proc))
    wait_stopped(proc)
    assert is_locked(path)  # a stopped owner still holds its lifetime lock
    held = read_shard(path).counts[SHOP_SCHEMA.slot("orders", "paid")]
    while_stopped(path)
    os.kill(proc.pid, signal.SIGCONT)
    seen = poll_while_running(proc, directory)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    report: dict[str, int | None] = json.loads(out.splitlines()[-1])
    return held, report, seen


@pytest.mark.parametrize("variant", ["kept", "shard-removed", "directory-recreated"])
@pytest.mark.parametrize("step", [*SAVE_STEPS, "idle"])
def test_a_writer_stopped_at_any_step_never_brings_back_counts_that_are_gone(
    tmp_path: Path, reaper: Reaper, step: str, variant: str
) -> None:
    """Absorbed means gone. The writer is stopped inside a save (or between saves) while its
    shard is removed (as compaction removes an absorbed one) or its directory recreated, and
    a compaction runs; resumed, it must never make those counts reappear."""
    directory = tmp_path / "shards"
    dead_shop_shard(directory, paid=0, refused=2)  # so that compaction has work while stopped
    refused = 0 if variant == "directory-recreated" else 2
    compacted: list[Aggregate] = []

    def while_stopped(path: Path) -> None:
        if variant == "shard-removed":
            path.unlink()
        elif variant == "directory-recreated":
            shutil.rmtree(directory)
            directory.mkdir()
        compacted.append(agg(directory, compact=True))

    held, report, seen = stop_then_resume(
        reaper, directory, step, after=20, check=0.0, while_stopped=while_stopped
    )
    begun = 3 if step == "idle" else 4  # record calls begun before it was resumed
    assert held == (4 if step in ("save.written", "save.done") else 3)
    gone = 0 if variant == "kept" else held
    (during,) = compacted
    assert during.snapshot().family("orders") == {"paid": held - gone, "refused": refused}
    assert during.live == int(variant == "kept")  # a stopped owner's shard is never absorbed
    calls = report["calls"]
    assert calls == begun + 20
    paid = [s["paid"] for s in seen]
    assert all(a <= calls - gone for a in paid), paid  # never above the calls made
    assert paid == sorted(paid)  # and never going down
    assert all(s["refused"] == refused for s in seen)
    if variant == "kept":
        assert report["switched"] is None
        expected = calls
    else:
        # With a check at every save, the first save after resuming notices and begins a new
        # incarnation holding only what came after the last save into the removed file; a
        # save that was stopped went into that file and is lost with it (module doc).
        assert report["switched"] == begun
        expected = calls - begun
    final = agg(directory, compact=True)
    assert final.snapshot().family("orders") == {"paid": expected, "refused": refused}
    assert sorted(os.listdir(directory)) == CLEAN
    assert totals(directory) == {"paid": expected, "refused": refused}


STOPPABLE_CREATOR = """
import json
import gatemetrics.shards as shards
from gatemetrics import save_to_dir
from tests.engine.shard_helpers import pay, shop_store

directory, step = sys.argv[1], sys.argv[2]
shards.VANISHED_CHECK_S = 0.0
store = shop_store()
for _ in range(3):
    pay(store)
assert save_to_dir(store, directory)
shard = shards.shard_for(store, directory)
old = os.path.basename(shard.path)
shard.close(save=False)  # a dead incarnation holding the 3; the next save creates a new one
armed = [True]


def stop_at(name):
    if name == step and armed[0]:
        armed[0] = False
        os.kill(os.getpid(), signal.SIGSTOP)


_faults.HOOK = stop_at
print(old, flush=True)
results = []
for _ in range(5):
    pay(store)
    results.append(save_to_dir(store, directory))  # the first stops while creating a shard
print(json.dumps(results), flush=True)
shard.close()
"""


@pytest.mark.parametrize("variant", ["kept", "file-removed"])
@pytest.mark.parametrize("step", CREATE_STEPS)
def test_a_creator_stopped_at_any_step_is_never_absorbed_and_never_counts_twice(
    tmp_path: Path, reaper: Reaper, step: str, variant: str
) -> None:
    proc = reaper.python(STOPPABLE_CREATOR, str(tmp_path), step)
    old = read_line(proc)
    wait_stopped(proc)
    renamed = step in ("create.renamed", "create.done")
    (new,) = [(n, kind) for n, kind in owned(tmp_path) if n != old]
    assert new[1] == ("v2" if renamed else "v2-creating")
    assert is_locked(tmp_path / new[0])  # locked from its first step on
    if variant == "file-removed":
        (tmp_path / new[0]).unlink()
    result = agg(tmp_path, compact=True)
    assert result.compaction is not None
    assert result.compaction.removed_temp_files == 0  # never a live creator's file
    assert result.snapshot().family("orders") == {"paid": 3, "refused": 0}
    assert [n for n, _ in owned(tmp_path)] == ([new[0]] if variant == "kept" else [])
    os.kill(proc.pid, signal.SIGCONT)
    seen = poll_while_running(proc, tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == [True] * 5
    paid = [s["paid"] for s in seen]
    assert all(a <= 8 for a in paid), paid  # 8 record calls in all
    assert paid == sorted(paid)
    # A temp file removed under its creator makes it start over as a fresh incarnation (its
    # rename fails): nothing lost. A shard removed after its rename takes the save that
    # created it along (module doc: saves into a removed file are lost, never counted twice).
    expected = 7 if variant == "file-removed" and renamed else 8
    final = agg(tmp_path, compact=True)
    assert final.snapshot().family("orders") == {"paid": expected, "refused": 0}
    assert sorted(os.listdir(tmp_path)) == CLEAN


def test_saves_into_a_removed_shard_before_its_owner_notices_are_lost_never_counted_twice(
    tmp_path: Path, reaper: Reaper
) -> None:
    """With the real VANISHED_CHECK_S: saves keep going into the removed file until the owner's
    next check, then a new incarnation carries only what came after them."""

    def remove_and_compact(path: Path) -> None:
        path.unlink()
        agg(tmp_path, compact=True)

    held, report, seen = stop_then_resume(
        reaper, tmp_path, "save.written", after=3, check=-1, while_stopped=remove_and_compact
    )
    assert held == 4
    calls, switched = report["calls"], report["switched"]
    assert calls is not None
    assert switched is not None
    assert switched >= 4
    assert calls == switched + 3
    paid = [s["paid"] for s in seen]
    assert all(a <= calls - held for a in paid), paid
    assert paid == sorted(paid)
    assert totals(tmp_path) == {"paid": calls - switched, "refused": 0}
    assert agg(tmp_path, compact=True).snapshot().family("orders") == {"paid": 3, "refused": 0}
    assert sorted(os.listdir(tmp_path)) == CLEAN
