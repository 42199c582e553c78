"""Saving a store as its shard: one fixed-size v2 file per incarnation, the lifetime lock on
the data file itself, in-place saves, failures counted and never raised."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import gatemetrics.shards as shards_module
from gatemetrics import (
    Aggregate,
    Binding,
    CounterStore,
    Durability,
    Identity,
    Schema,
    Shard,
    _faults,
    aggregate_dir,
    bind,
    new_identity,
    save_to_dir,
    shard_for,
)
from gatemetrics._format import SlotImage, decode_v2, layout_for, v2_names
from gatemetrics.shards import CREATE_STEPS
from tests.engine.schema import HISTOGRAM_SCHEMA, SHOP_SCHEMA
from tests.engine.shard_helpers import (
    FAILURES,
    SHARD_NAME,
    WHYS,
    agg,
    files,
    header_length,
    interfere_after_create,
    owned,
    pay,
    raise_at,
    read_shard,
    refuse,
    shop_store,
    totals,
)
from tests.processes import Reaper, read_line, run_python
from tests.shard_tools import is_locked

# -- saving ----------------------------------------------------------------------------------


def test_save_writes_one_fixed_size_v2_shard_with_its_identity_and_cumulative_counts(
    tmp_path: Path,
) -> None:
    store = shop_store(clock=lambda: 1234.5)
    refuse(store, "no_stock")
    umask = os.umask(0o077)
    try:
        assert save_to_dir(store, tmp_path)
    finally:
        os.umask(umask)
    (name,) = files(tmp_path, ".shard")
    assert SHARD_NAME.match(name)
    assert owned(tmp_path) == [(name, "v2")]  # no lock file, no temp file left
    shard = shard_for(store, tmp_path)
    ident = shard.identity
    assert ident is not None
    assert name == v2_names(ident.incarnation)[0]
    assert shard.path == str(tmp_path / name)
    record = read_shard(tmp_path / name)
    assert (record.format, record.incarnation) == (2, ident.incarnation)
    assert (record.pid, record.host) == (os.getpid(), ident.host)
    assert (record.seq, record.generation, record.torn_slots) == (1, 1, 0)
    assert record.counts == store.snapshot().counts
    assert record.start == 1234.5
    data = (tmp_path / name).read_bytes()
    first = (tmp_path / name).stat()
    assert first.st_size == layout_for(SHOP_SCHEMA).file_size(header_length(data))
    assert stat.S_IMODE(first.st_mode) == 0o644  # whatever the umask: other users aggregate
    pay(store)
    assert save_to_dir(store, tmp_path)
    record = read_shard(tmp_path / name)
    assert (record.seq, record.generation) == (2, 2)
    assert store.generation == 2
    assert record.counts == store.snapshot().counts
    second = (tmp_path / name).stat()
    # Written in place: the same inode at the same size, never renamed over or grown.
    assert (second.st_ino, second.st_size) == (first.st_ino, first.st_size)
    assert totals(tmp_path) == {"paid": 1, "refused": 1}
    shard.close(save=False)


def test_each_save_writes_the_other_slot_in_place_and_the_aggregate_never_goes_down(
    tmp_path: Path,
) -> None:
    store = shop_store(clock=lambda: 77.0)
    shard = Shard(store, tmp_path, clock=lambda: 1000.0)
    calls: list[Callable[[], None]] = [
        lambda: pay(store),
        lambda: refuse(store, *WHYS),
        lambda: store.increment("errors"),
        lambda: store.increment("refusals", "no_money", 3),
    ]
    layout = layout_for(SHOP_SCHEMA)
    previous = tuple(SHOP_SCHEMA.zeros())
    previous_slot = layout.pack(0, 0, 0.0, 77.0, previous)  # both slots of a new file
    inode = None
    for seq, call in enumerate(calls * 3, 1):
        call()
        assert shard.save()
        path = shard.path
        assert path is not None
        record = read_shard(path)
        assert (record.seq, record.generation) == (seq, seq)
        assert all(c >= p for c, p in zip(record.counts, previous, strict=True))
        assert record.counts != previous
        assert agg(tmp_path).counts == record.counts == store.snapshot().counts
        # This save is in slot seq & 1, exactly; the other slot still holds the previous save
        # whole (what a reader falls back to while the next save writes over it).
        data = Path(path).read_bytes()
        header = header_length(data)
        slot = layout.pack(seq, seq, 1000.0, 77.0, record.counts)
        at = layout.slot_offset(header, seq)
        other = layout.slot_offset(header, seq - 1)
        assert at != other
        assert data[at : at + len(slot)] == slot
        assert data[other : other + len(previous_slot)] == previous_slot
        ino = os.stat(path).st_ino
        assert inode in (None, ino)
        inode, previous, previous_slot = ino, record.counts, slot
    shard.close(save=False)


@pytest.mark.parametrize("durability", list(Durability))
def test_only_power_loss_durability_syncs_and_then_once_per_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: Durability
) -> None:
    syncs: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        syncs.append("fsync")
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        syncs.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store = shop_store()
    shard = shard_for(store, tmp_path, durability=durability)
    assert shard.durability is durability
    shard.open()
    created, syncs[:] = list(syncs), []
    for _ in range(3):
        pay(store)
        assert shard.save()
    saved = list(syncs)
    monkeypatch.undo()
    if durability is Durability.POWER_LOSS:
        assert created  # the new file and its directory entry
        assert len(saved) == 3  # one data sync per save
    else:
        assert (created, saved) == ([], [])  # nothing on the request path waits for the disk
    assert totals(tmp_path) == {"paid": 3, "refused": 0}
    shard.close(save=False)


def test_the_lifetime_lock_is_on_the_data_file_from_before_it_has_its_name(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = shop_store()
    shard = shard_for(store, tmp_path)
    seen: dict[str, tuple[list[str], bool]] = {}
    during: list[Aggregate] = []

    def hook(step: str) -> None:
        if step not in CREATE_STEPS:
            return
        names = owned(tmp_path)
        seen[step] = ([k for _, k in names], all(is_locked(tmp_path / n) for n, _ in names))
        if step == "create.written":
            during.append(agg(tmp_path, compact=True))  # must leave a live creator's file be

    fault(hook)
    ident = shard.open()
    _faults.HOOK = None
    assert seen == {
        "create.locked": (["v2-creating"], True),
        "create.written": (["v2-creating"], True),
        "create.renamed": (["v2"], True),
        "create.done": (["v2"], True),
    }
    (result,) = during
    assert result.compaction is not None
    assert result.compaction.removed_temp_files == 0
    assert (result.live, result.dead, result.quarantined_total) == (0, 0, 0)
    path = tmp_path / v2_names(ident.incarnation)[0]
    assert owned(tmp_path) == [(path.name, "v2")]
    assert is_locked(path)
    pay(store)
    assert shard.save()
    assert is_locked(path)
    assert shard.close()
    assert not is_locked(path)
    assert shard.identity is None
    assert owned(tmp_path) == [(path.name, "v2")]  # the dead shard waits for compaction
    assert totals(tmp_path) == {"paid": 1, "refused": 0}


def test_the_lifetime_lock_is_freed_when_the_owner_is_sigkilled(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(
        """
        from gatemetrics import save_to_dir
        from tests.engine.shard_helpers import pay, shop_store
        store = shop_store()
        pay(store)
        assert save_to_dir(store, sys.argv[1])
        print("saved", flush=True)
        sys.stdin.read()
        """,
        str(tmp_path),
        stdin=True,
    )
    assert read_line(proc) == "saved"
    (name,) = files(tmp_path, ".shard")
    assert is_locked(tmp_path / name)
    assert agg(tmp_path).live == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not is_locked(tmp_path / name)
    result = agg(tmp_path)
    assert (result.live, result.dead) == (0, 1)
    assert result.snapshot().family("orders") == {"paid": 1, "refused": 0}


@pytest.mark.parametrize("step", ["save.locked", "save.written"])
def test_a_failed_save_returns_false_counts_it_and_rolls_back(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None], step: str
) -> None:
    # Simulated: a real EIO from fdatasync (after the slot was written) needs a failing device;
    # a real write failure is tested in a child below (RLIMIT_FSIZE).
    store = shop_store()
    pay(store)
    fault(raise_at(step, OSError(errno.EIO, "Input/output error")))
    assert save_to_dir(store, tmp_path, failure_key=FAILURES) is False
    assert store.get(FAILURES) == 1
    assert store.generation == 0
    assert files(tmp_path, ".creating") == []
    # Written but not reported durable: a reader may see it; the store still has it, and the
    # next save rewrites that very slot with at least as much.
    assert totals(tmp_path) == {"paid": int(step == "save.written"), "refused": 0}
    _faults.HOOK = None
    assert save_to_dir(store, tmp_path, failure_key=FAILURES)
    assert store.generation == 1
    (name,) = files(tmp_path, ".shard")
    record = read_shard(tmp_path / name)
    assert (record.seq, record.generation) == (1, 1)
    assert record.counts == store.snapshot().counts
    assert agg(tmp_path).snapshot().get(FAILURES) == 1  # persisted too
    shard_for(store, tmp_path).close(save=False)


FAILING_WRITER = """
import json, logging, resource
import gatemetrics.shards as shards
from gatemetrics import bind
from tests.engine.shard_helpers import FAILURES, pay, refuse, shop_store

lines = []


class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())


logging.getLogger("gatemetrics.shards").addHandler(Keep())
shards._LOG_EVERY_S = interval = float(sys.argv[2])
store = shop_store()
binding = bind(store, sys.argv[1], failure_key=FAILURES)
pay(store)
# A real write failure without a special file system: the kernel refuses any write past
# RLIMIT_FSIZE (EFBIG), and both slots lie past the shard's first 4 KiB page.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # otherwise that write kills the process
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
refuse(store, "no_stock")  # never raises
failed = 1
logged_by = time.monotonic()
while time.monotonic() < logged_by + interval:  # many more failures within one interval
    refuse(store, "no_stock")
    failed += 1
refuse(store, "no_stock")  # the first failure of the next interval
failed += 1
report = {"failed": failed, "failures": store.get(FAILURES),
          "generation": store.generation, "lines": lines}
print(json.dumps(report), flush=True)
sys.stdin.readline()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
pay(store)
print(store.get(FAILURES), flush=True)
sys.stdin.read()
"""


def test_saves_that_really_fail_never_raise_are_all_counted_and_logged_once_per_interval(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(FAILING_WRITER, str(tmp_path), "0.2", stdin=True)
    report = json.loads(read_line(proc))
    failed = report["failed"]
    assert failed > 2
    assert report["failures"] == failed  # every failure counted
    assert report["generation"] == 1  # each failed save rolled its generation back
    lines = report["lines"]
    assert len(lines) == 2, lines  # one line per interval, however many failures
    assert all(os.strerror(errno.EFBIG) in line for line in lines)
    snap = agg(tmp_path).snapshot()
    assert snap.family("orders") == {"paid": 1, "refused": 0}  # the last good save
    assert snap.get(FAILURES) == 0
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert int(read_line(proc)) == failed
    snap = agg(tmp_path).snapshot()
    assert snap.family("orders") == {"paid": 2, "refused": failed}
    assert snap.get("refusals", "no_stock") == failed
    assert snap.get(FAILURES) == failed  # the failures themselves persisted
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


READ_ONLY_DIRECTORIES = """
import json, logging, os, sys
from gatemetrics import bind, save_to_dir
from tests.engine.shard_helpers import FAILURES, pay, refuse, shop_store

lines = []


class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())


logging.getLogger("gatemetrics.shards").addHandler(Keep())
existing, fresh = sys.argv[1], sys.argv[2]
store = shop_store()
binding = bind(store, existing, failure_key=FAILURES)
pay(store)
os.chmod(existing, 0o555)
pay(store)
pay(store)
other = shop_store()
refuse(other, "no_stock")
results = [save_to_dir(other, fresh, failure_key=FAILURES) for _ in range(3)]
report = {"kept_failures": store.get(FAILURES), "results": results,
          "failures": other.get(FAILURES), "lines": lines,
          "listing": sorted(os.listdir(fresh))}
print(json.dumps(report), flush=True)
binding.close()
"""


def test_a_read_only_directory_fails_new_shards_quietly_but_not_an_existing_one(
    tmp_path: Path,
) -> None:
    existing, fresh = tmp_path / "existing", tmp_path / "fresh"
    existing.mkdir()
    fresh.mkdir()
    fresh.chmod(0o555)
    done = run_python(READ_ONLY_DIRECTORIES, str(existing), str(fresh), honour_file_modes=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # An existing shard keeps saving: a save writes through the open descriptor, never through
    # the directory.
    assert report["kept_failures"] == 0
    assert totals(existing) == {"paid": 3, "refused": 0}
    # A new one cannot be created: every save returns False, is counted, and is logged once.
    assert report["results"] == [False, False, False]
    assert report["failures"] == 3
    assert len(report["lines"]) == 1
    assert report["listing"] == []


def unusable_directory(tmp_path: Path, kind: str) -> str:
    (tmp_path / "f").write_text("x")
    return {
        "file-in-the-way": str(tmp_path / "f"),
        "under-a-file": str(tmp_path / "f" / "shards"),
        "nul-byte": str(tmp_path / "bad\0name"),
    }[kind]


@pytest.mark.parametrize("kind", ["file-in-the-way", "under-a-file", "nul-byte"])
def test_save_never_raises_for_an_unusable_directory(tmp_path: Path, kind: str) -> None:
    target = unusable_directory(tmp_path, kind)
    store = shop_store()
    pay(store)
    for attempt in range(1, 4):
        assert save_to_dir(store, target, failure_key=FAILURES) is False
        assert store.get(FAILURES) == attempt  # every failure counted
    assert store.get("orders", "paid") == 1  # counts stay in memory


@pytest.mark.parametrize(
    "kind",
    [
        "file-in-the-way",
        "under-a-file",
        "nul-byte",
    ],
)
def test_repeated_failures_for_an_unusable_directory_are_logged_once(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = unusable_directory(tmp_path, kind)
    store = shop_store()
    pay(store)
    with caplog.at_level(logging.WARNING, logger="gatemetrics.shards"):
        for _ in range(3):
            assert save_to_dir(store, target, failure_key=FAILURES) is False
    assert store.get(FAILURES) == 3
    lines = [r for r in caplog.records if r.name == "gatemetrics.shards"]
    assert len(lines) == 1, [r.getMessage() for r in lines]


@pytest.mark.parametrize("where", ["creating", "shard"])
def test_a_symlink_planted_at_a_shard_name_is_never_followed(tmp_path: Path, where: str) -> None:
    first, second = new_identity(), new_identity()
    given = iter([first, second])
    victim = tmp_path / "victim"
    victim.write_text("precious")
    shard_name, creating_name = v2_names(first.incarnation)
    planted = tmp_path / (creating_name if where == "creating" else shard_name)
    planted.symlink_to(victim)
    store = shop_store()
    shard = Shard(store, tmp_path, identity_factory=lambda: next(given))
    pay(store)
    assert shard.save()
    ident = shard.identity
    assert ident is not None
    if where == "creating":
        assert ident == second  # never opened through the link: a fresh incarnation instead
        assert planted.is_symlink()
    else:
        assert ident == first  # the rename replaced the link itself, not its target
        assert not planted.is_symlink()
    assert victim.read_text() == "precious"
    assert totals(tmp_path) == {"paid": 1, "refused": 0}
    shard.close(save=False)


def test_a_store_whose_counts_went_down_is_not_saved(tmp_path: Path) -> None:
    store = shop_store()
    for _ in range(3):
        pay(store)
    assert save_to_dir(store, tmp_path)
    (name,) = files(tmp_path, ".shard")
    before = (tmp_path / name).read_bytes()
    store.restore(shop_store().to_dict())  # all zero: less than what was saved
    assert save_to_dir(store, tmp_path) is False
    assert (tmp_path / name).read_bytes() == before
    assert totals(tmp_path) == {"paid": 3, "refused": 0}
    shard_for(store, tmp_path).close(save=False)


def test_a_slot_torn_by_a_cut_short_write_falls_back_to_the_previous_save_whole(
    tmp_path: Path,
) -> None:
    store = shop_store()
    shard = shard_for(store, tmp_path)
    pay(store)
    assert shard.save()
    refuse(store, *WHYS)
    assert shard.save()
    assert shard.path is not None
    path = Path(shard.path)
    before = read_shard(path)
    assert before.seq == 2
    # What a write cut short would leave: the first half of save 3's slot over save 1's.
    refuse(store, "fraud")
    layout = layout_for(SHOP_SCHEMA)
    data = path.read_bytes()
    slot = layout.pack(3, before.generation + 1, time.time(), before.start, store.snapshot().counts)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, slot[: len(slot) // 2], layout.slot_offset(header_length(data), 3))
    finally:
        os.close(fd)
    torn = read_shard(path)
    assert (torn.seq, torn.counts, torn.torn_slots) == (2, before.counts, 1)
    assert agg(tmp_path).counts == before.counts  # one save's counts: all of them or none
    assert shard.save()  # the next save writes that slot whole
    after = read_shard(path)
    assert (after.seq, after.counts, after.torn_slots) == (3, store.snapshot().counts, 0)
    shard.close(save=False)


BUSY_WRITER = """
from gatemetrics import bind
from tests.engine.shard_helpers import WHYS, refuse, shop_store
store = shop_store()
bind(store, sys.argv[1])
print("bound", flush=True)
for _ in range(int(sys.argv[2])):
    refuse(store, *WHYS)
"""


def test_readers_see_each_record_call_whole_while_its_writer_saves_in_place(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(BUSY_WRITER, str(tmp_path), "20000")
    assert read_line(proc) == "bound"
    seen: list[tuple[int, int, int, int]] = []
    deadline = time.monotonic() + 60
    while proc.poll() is None:
        assert time.monotonic() < deadline
        snap = agg(tmp_path).snapshot()
        seen.append(
            (
                snap.get("orders", "refused"),
                snap.get("refusals", "no_stock"),
                snap.get("refusals", "no_money"),
                snap.get("refusals", "fraud"),
            )
        )
    assert proc.wait(timeout=30) == 0
    # Each call's four increments: all of them or none, in every read of the live shard.
    assert [s for s in seen if len(set(s)) != 1] == []
    refused = [s[0] for s in seen]
    assert refused == sorted(refused)
    assert len(set(refused)) > 2  # the reads really overlapped the saves
    assert totals(tmp_path) == {"paid": 0, "refused": 20000}


def test_saving_after_close_starts_a_new_incarnation_with_only_new_counts(tmp_path: Path) -> None:
    store = shop_store()
    pay(store)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    first = shard.identity
    assert shard.close(save=True)
    refuse(store, "fraud")
    assert shard.save()
    assert shard.identity is not None
    assert first is not None
    assert shard.identity.incarnation != first.incarnation
    assert totals(tmp_path) == {"paid": 1, "refused": 1}
    agg(tmp_path, compact=True)
    assert totals(tmp_path) == {"paid": 1, "refused": 1}
    assert files(tmp_path, ".json") == ["archive.json", "schema.json"]
    assert owned(tmp_path) == [(v2_names(shard.identity.incarnation)[0], "v2")]  # the live one
    shard.close()
    assert totals(tmp_path) == {"paid": 1, "refused": 1}


def test_one_shard_per_store_and_directory_whatever_the_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    store = shop_store()
    shard = shard_for(store, real)
    assert shard_for(store, tmp_path / "link") is shard
    assert shard_for(store, "real") is shard
    assert shard_for(shop_store(), real) is not shard
    pay(store)
    assert save_to_dir(store, "link")
    assert save_to_dir(store, real)
    assert len(files(real, ".shard")) == 1
    assert totals(real) == {"paid": 1, "refused": 0}
    shard.close(save=False)


def test_a_file_already_at_the_creating_name_means_a_fresh_incarnation(tmp_path: Path) -> None:
    first, second = new_identity(), new_identity()
    given = iter([first, second])
    stray = tmp_path / v2_names(first.incarnation)[1]
    stray.write_bytes(b"someone else's")  # an id collision or a planted file
    shard = Shard(shop_store(), tmp_path, identity_factory=lambda: next(given))
    assert shard.open() == second
    assert stray.read_bytes() == b"someone else's"
    assert is_locked(tmp_path / v2_names(second.incarnation)[0])
    shard.close(save=False)


def test_an_aggregator_probing_the_brand_new_file_means_a_fresh_incarnation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator opened and flocked our new ``.creating`` file before we did: the owner
    must not wait for it (it may be about to delete the file as an orphan)."""
    first, second = new_identity(), new_identity()
    given = iter([first, second])
    probes: list[int] = []

    def probe(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        probes.append(fd)

    interfere_after_create(monkeypatch, v2_names(first.incarnation)[1], probe)
    shard = Shard(shop_store(), tmp_path, identity_factory=lambda: next(given))
    try:
        assert shard.open() == second
    finally:
        monkeypatch.undo()
        for fd in probes:
            os.close(fd)
    assert len(probes) == 1
    assert owned(tmp_path) == [(v2_names(second.incarnation)[0], "v2")]  # the first one removed
    assert is_locked(tmp_path / v2_names(second.incarnation)[0])
    shard.close(save=False)


def test_a_brand_new_file_removed_before_our_flock_is_never_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up race: a compaction took the flock of our new ``.creating`` file before we
    did and removed it as a dead creator's orphan; our flock then succeeds on an unlinked inode.
    The owner must move on to a fresh incarnation, or it would write a file nobody can see."""
    first, second = new_identity(), new_identity()
    given = iter([first, second])
    removed: list[str] = []

    def remove_as_orphan(path: str) -> None:  # what compaction's _unlink_if_free does
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            removed.append(path)
        finally:
            os.close(fd)

    interfere_after_create(monkeypatch, v2_names(first.incarnation)[1], remove_as_orphan)
    store = shop_store()
    shard = Shard(store, tmp_path, identity_factory=lambda: next(given))
    try:
        assert shard.open() == second
    finally:
        monkeypatch.undo()
    assert len(removed) == 1
    assert owned(tmp_path) == [(v2_names(second.incarnation)[0], "v2")]
    assert is_locked(tmp_path / v2_names(second.incarnation)[0])
    pay(store)
    assert shard.save()
    assert totals(tmp_path) == {"paid": 1, "refused": 0}
    shard.close(save=False)


@pytest.mark.parametrize("compact_first", [True, False])
@pytest.mark.parametrize("how", ["shard-removed", "directory-recreated", "replaced-by-a-copy"])
def test_an_owner_whose_shard_vanished_goes_on_as_a_new_incarnation_never_counting_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, compact_first: bool
) -> None:
    monkeypatch.setattr(shards_module, "VANISHED_CHECK_S", 0.0)  # check at every save
    directory = tmp_path / "shards"
    store = shop_store()
    binding = bind(store, directory)
    for _ in range(3):
        pay(store)
    first = binding.shard.identity
    assert first is not None
    assert binding.shard.path is not None
    path = Path(binding.shard.path)
    if how == "shard-removed":
        path.unlink()
        expected = 2  # what was in the removed file is gone
    elif how == "directory-recreated":
        shutil.rmtree(directory)
        directory.mkdir()
        expected = 2  # the old shard went with the directory
    else:
        copy = directory / "copy"
        shutil.copyfile(path, copy)
        os.replace(copy, path)  # an unlocked file now: dead, so counted (or absorbed) once
        expected = 5
    # Whatever an aggregator does now, the owner must not write its 3 again. Without a
    # compaction first, a replaced file is still at the path when the owner next saves: only
    # its inode tells the owner that it is not its own any more.
    if compact_first:
        agg(directory, compact=True)
    pay(store)
    pay(store)
    assert binding.shard.identity not in (None, first)
    assert totals(directory) == {"paid": expected, "refused": 0}
    agg(directory, compact=True)
    assert totals(directory) == {"paid": expected, "refused": 0}
    binding.close()
    assert totals(directory) == {"paid": expected, "refused": 0}


@pytest.mark.parametrize("kind", ["aggregate", "snapshot"])
def test_read_only_views_can_never_be_saved(tmp_path: Path, kind: str) -> None:
    store = shop_store()
    pay(store)
    assert save_to_dir(store, tmp_path)
    # The engine's merged views of a directory: they hold every shard's counts.
    result = agg(tmp_path)
    view: Any = result if kind == "aggregate" else result.snapshot()
    with pytest.raises(TypeError, match="read-only"):
        save_to_dir(view, tmp_path)
    with pytest.raises(TypeError, match="read-only"):
        shard_for(view, tmp_path)
    with pytest.raises(TypeError, match="read-only"):
        Shard(view, tmp_path)
    with pytest.raises(TypeError, match="read-only"):
        bind(view, tmp_path)
    assert len(files(tmp_path, ".shard")) == 1
    assert totals(tmp_path) == {"paid": 1, "refused": 0}
    shard_for(store, tmp_path).close(save=False)


def test_identities_are_unique_and_validated() -> None:
    a, b = new_identity(), new_identity()
    assert a.incarnation != b.incarnation
    assert a.pid == b.pid == os.getpid()
    assert a.incarnation.split("-")[1] == str(os.getpid())
    with pytest.raises(ValueError, match="malformed"):
        Identity("../../etc/passwd", 1, "h", 0.0)


def test_the_pid_guard_resets_a_copy_that_missed_the_fork_hook(tmp_path: Path) -> None:
    # The state a hook-less fork leaves (simulated here; a real one is in a child below): the
    # guard must start over at zero as a new incarnation instead of saving the counts again.
    store = shop_store()
    pay(store)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    parent = shard.identity
    store._pid = shard._pid = -1  # what a hook-less fork would leave behind
    assert shard.save()
    assert store.snapshot().family("orders") == {"paid": 0, "refused": 0}
    assert shard.identity != parent
    assert totals(tmp_path) == {"paid": 1, "refused": 0}
    shard.close(save=False)


def test_counter_store_of_any_schema_saves_too(tmp_path: Path) -> None:
    from gatemetrics import Family, Schema

    schema = Schema([Family("jobs_total", "Jobs.", key="jobs", label="kind", values=("a", "b"))])
    store = CounterStore(schema)
    store.increment("jobs", "b", 4)
    assert save_to_dir(store, tmp_path)
    result = aggregate_dir(tmp_path, schema, namespace="jobs")
    assert result.snapshot().family("jobs") == {"a": 0, "b": 4}
    assert 'jobs_shards{state="live"} 1' in result.render_prometheus()
    shard_for(store, tmp_path).close(save=False)


# -- the write-through fast path: a slot image lent to the store -----------------------------


def _slot_bytes(path: str | Path, schema: Schema, seq: int) -> bytes:
    data = Path(path).read_bytes()
    layout = layout_for(schema)
    offset = layout.slot_offset(header_length(data), seq)
    return data[offset : offset + layout.slot_size]


def _lent(binding: Binding) -> SlotImage:
    image = binding.shard._image
    assert image is not None
    assert image.lent
    return image


def _three_paid(directory: Path, **options: Any) -> tuple[CounterStore, Binding, SlotImage]:
    """A shop store bound write-through (``options`` go to bind) with three payments saved
    through the fast path, and the image it counts in."""
    store = shop_store()
    binding = bind(store, directory, **options)
    for _ in range(3):
        pay(store)
    return store, binding, _lent(binding)


@pytest.mark.parametrize("schema", [SHOP_SCHEMA, HISTOGRAM_SCHEMA], ids=["counter", "histogram"])
def test_the_fast_paths_slot_is_the_bytes_pack_and_seal_write_for_its_fields(
    tmp_path: Path, schema: Schema
) -> None:
    store = CounterStore(schema)
    binding = bind(store, tmp_path)
    for i in range(5):
        store.increment("orders", "paid" if i % 2 else "refused", i + 1)
        if schema is HISTOGRAM_SCHEMA:
            store.observe("checkout", 0.05 * i)
            store.family("basket").labels("paid").observe(float(i * 7))
    image = _lent(binding)
    ident = binding.shard.identity
    path = binding.shard.path
    assert ident is not None
    assert path is not None
    record = decode_v2(Path(path).read_bytes(), schema, ident.incarnation)
    snap = store.snapshot()
    assert (record.counts, record.sums) == (snap.counts, snap.sums)
    assert record.generation == store.generation == image.generation
    assert record.seq >= 5
    assert record.start == store.start_timestamp == image.start
    fields = (record.seq, record.generation, record.saved_at, record.start)
    packed = layout_for(schema).pack(*fields, record.counts, sums=record.sums)
    slot = _slot_bytes(path, schema, record.seq)
    assert slot == packed
    # Shard._changed inlines SlotImage.seal: sealing the same fields gives the same bytes.
    assert bytes(image.seal(*fields)) == packed
    other = layout_for(schema).image()
    assert other is not None
    for i, v in enumerate(record.counts):
        other.counts[i] = v
    for i, f in enumerate(record.sums):
        other.sums[i] = f
    assert bytes(other.seal(*fields)) == packed
    assert layout_for(schema).unpack_slot(slot) == (record.seq, snap.counts, snap.sums)
    binding.close()


def test_a_restore_below_what_was_saved_is_refused_while_an_image_was_lent(
    tmp_path: Path,
) -> None:
    store, binding, image = _three_paid(tmp_path)
    (name,) = files(tmp_path, ".shard")
    before = (tmp_path / name).read_bytes()
    store.restore(shop_store().to_dict())  # all zero: less than what was saved
    assert not image.lent  # the store took its cells back
    assert binding.shard.save() is False  # the snapshot path's restore check refuses it
    assert binding.shard._image is None
    assert (tmp_path / name).read_bytes() == before
    assert totals(tmp_path) == {"paid": 3, "refused": 0}
    binding.shard.close(save=False)


def test_a_restore_above_what_was_saved_while_lent_saves_through_the_checks(
    tmp_path: Path,
) -> None:
    store, binding, _ = _three_paid(tmp_path)
    more = shop_store()
    for _ in range(5):
        pay(more)
    refuse(more)
    store.restore(more.to_dict())  # the same process's counts, carried on: kept
    pay(store)
    assert binding.shard._image is None  # the restore check runs on every save now
    assert totals(tmp_path) == {"paid": 6, "refused": 1}
    assert binding.close()
    assert totals(tmp_path) == {"paid": 6, "refused": 1}


@pytest.mark.parametrize("step", ["save.locked", "save.written"])
def test_a_failed_fast_path_save_is_counted_logged_and_the_next_one_writes_everything(
    tmp_path: Path,
    fault: Callable[[Callable[[str], None]], None],
    caplog: pytest.LogCaptureFixture,
    step: str,
) -> None:
    store = shop_store()
    binding = bind(store, tmp_path, failure_key=FAILURES)
    pay(store)
    pay(store)
    image = _lent(binding)
    fault(raise_at(step, OSError(errno.EIO, "Input/output error")))
    with caplog.at_level(logging.WARNING, logger="gatemetrics.shards"):
        for _ in range(3):
            refuse(store, "fraud")  # never raises
    assert binding.shard._image is image  # the failures were the fast path's
    assert store.get(FAILURES) == 3
    assert store.snapshot().family("orders") == {"paid": 2, "refused": 3}
    logged = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(logged) == 1  # once per interval
    assert "Input/output error" in logged[0].getMessage()
    if step == "save.locked":
        assert totals(tmp_path) == {"paid": 2, "refused": 0}  # nothing reached the file
    _faults.HOOK = None
    pay(store)
    snap = agg(tmp_path).snapshot()
    assert snap.family("orders") == {"paid": 3, "refused": 3}
    assert snap.get("refusals", "fraud") == 3
    assert snap.get(FAILURES) == 3
    assert binding.close()
    assert agg(tmp_path).snapshot().counts == store.snapshot().counts


def _three_saved_then_one_failed(
    directory: Path, fault: Callable[[Callable[[str], None]], None]
) -> tuple[CounterStore, Binding]:
    """A store bound write-through on the fast path: three payments saved, a fourth whose
    save failed (in memory only); the fault is removed again."""
    store, binding, _ = _three_paid(directory, failure_key=FAILURES)
    fault(raise_at("save.locked", OSError(errno.EIO, "Input/output error")))
    pay(store)
    _faults.HOOK = None
    return store, binding


def test_a_failed_fast_path_save_then_a_vanished_shard_keeps_the_next_incarnation_exact(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[Callable[[str], None]], None],
) -> None:
    directory = tmp_path / "shards"
    store, binding = _three_saved_then_one_failed(directory, fault)
    first = binding.shard.identity
    assert store.get(FAILURES) == 1  # the fourth payment is in memory only: the file keeps 3
    assert binding.shard.path is not None
    Path(binding.shard.path).unlink()  # what it held (3) is gone with it
    monkeypatch.setattr(shards_module, "VANISHED_CHECK_S", 0.0)  # check at the next save
    binding.shard._next_check = 0.0
    pay(store)
    assert binding.shard.identity not in (None, first)
    # The new incarnation's baseline is the last good slot (3 paid), read back from the
    # unlinked file: not the image's 4 paid and 1 failure that never reached it.
    snap = agg(directory).snapshot()
    assert snap.family("orders") == {"paid": 2, "refused": 0}
    assert snap.get(FAILURES) == 1
    assert binding.close()
    assert agg(directory, compact=True).snapshot().family("orders") == {"paid": 2, "refused": 0}


def test_a_last_good_slot_that_cannot_be_read_back_is_logged_not_raised(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[Callable[[str], None]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "shards"
    store, binding = _three_saved_then_one_failed(directory, fault)
    seq = binding.shard._seq
    path = binding.shard.path
    assert path is not None
    # The file fails too: its last good slot is garbage now, and then it goes.
    layout = layout_for(SHOP_SCHEMA)
    offset = layout.slot_offset(header_length(Path(path).read_bytes()), seq)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xa5" * layout.slot_size)
    Path(path).unlink()
    monkeypatch.setattr(shards_module, "VANISHED_CHECK_S", 0.0)
    binding.shard._next_check = 0.0
    with caplog.at_level(logging.WARNING, logger="gatemetrics.shards"):
        pay(store)  # never raises
    assert any("cannot be read back" in r.getMessage() for r in caplog.records)
    assert store.snapshot().family("orders") == {"paid": 5, "refused": 0}
    # The image's cells stood for the baseline (5 paid: this call's count had landed in it
    # before the check found the shard gone), so the new shard starts from nothing of them.
    assert totals(directory) == {"paid": 0, "refused": 0}
    pay(store)
    assert totals(directory) == {"paid": 1, "refused": 0}
    assert binding.close()


@pytest.mark.parametrize(
    "options",
    [{"mode": "periodic", "interval": 3600.0}, {"durability": "power-loss"}],
    ids=["periodic", "power-loss"],
)
def test_periodic_and_power_loss_bindings_never_lend_an_image_and_save_exactly(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    store = shop_store()
    binding = bind(store, tmp_path, **options)
    for _ in range(4):
        pay(store)
        refuse(store, "no_money")
    for _ in range(3):
        assert binding.shard.save()
    assert binding.shard._image is None
    assert totals(tmp_path) == {"paid": 4, "refused": 4}
    pay(store)
    assert binding.close()
    assert binding.shard._image is None
    assert totals(tmp_path) == {"paid": 5, "refused": 4}


HOSTILE_OWNER = """
from gatemetrics import bind
from tests.engine.shard_helpers import pay, shop_store
store = shop_store()
binding = bind(store, sys.argv[1])
pay(store)
assert binding.shard._image is not None and binding.shard._image.lent
print(binding.shard.path, flush=True)
for _ in range(2):
    sys.stdin.readline()  # the attacker did its part: record on through it
    for _ in range(3000):
        pay(store)
    print("recorded", flush=True)
assert binding.close()
print(store.get("orders", "paid"), flush=True)
"""


def test_an_owner_on_the_fast_path_survives_its_shard_overwritten_and_cut_short(
    tmp_path: Path, reaper: Reaper
) -> None:
    """A same-user attacker writing garbage over the live shard's slots, then truncating it:
    the owner pwrites (no mapping, so no SIGBUS) and never fails; its next writes make the
    garbage shard exact again, and a cut-short one is skipped while live (as
    test_aggregate_kept_shards expects of any live shard cut short), never a crash."""
    proc = reaper.python(HOSTILE_OWNER, str(tmp_path), stdin=True)
    path = Path(read_line(proc))
    assert proc.stdin is not None
    data = path.read_bytes()
    layout = layout_for(SHOP_SCHEMA)
    with open(path, "r+b") as f:
        for seq in (0, 1):
            f.seek(layout.slot_offset(header_length(data), seq))
            f.write(b"\xa5" * layout.slot_size)
    assert totals(tmp_path) == {"paid": 0, "refused": 0}  # both slots torn: nothing to count
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert read_line(proc) == "recorded"
    assert totals(tmp_path) == {"paid": 3001, "refused": 0}  # the owner's writes repaired it
    with open(path, "r+b") as f:
        f.truncate(header_length(data) // 2)  # cut in place, into the header
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seen = [agg(tmp_path) for _ in range(20)]  # while the owner records: never raises
    assert read_line(proc) == "recorded"
    assert read_line(proc) == "6001"
    assert proc.wait(timeout=30) == 0  # no SIGBUS, no failure
    for result in seen:
        for report in result.shards:
            if report.state == "live":
                assert report.action == "skipped"
                assert report.problem is not None
                assert "wrong size" in report.problem
    agg(tmp_path)  # dead and cut short: handled as any bad dead shard, never a crash
