"""Tests of gatemetrics.shards (shard format v2): incarnations, the lifetime lock held on the data
file itself, in-place saves, crash points, stopped writers, binding, fork and pid reuse."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gatemetrics.shards as shards_module
from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA, GateMetricStore
from gatemetrics import (
    Aggregate,
    CounterStore,
    Durability,
    GatemetricsError,
    Identity,
    Shard,
    ShardWriteError,
    _faults,
    aggregate_dir,
    bind,
    new_identity,
    save_to_dir,
    shard_for,
)
from gatemetrics._format import Layout, ShardRecord, decode_v2, layout_for, parse_name, v2_names
from gatemetrics.shards import CREATE_STEPS, SAVE_STEPS
from tests.processes import Reaper, read_line, run_python, wait_until
from tests.shard_tools import dead_shard, in_forked_child, is_locked

SHARD_NAME = re.compile(r"v2-[0-9a-f]{8}-\d+-[0-9a-f]+-[0-9a-f]{16}\.shard\Z")
# A directory whose every shard was absorbed (compaction also records the schema it holds).
CLEAN = ["aggregate.lock", "archive.json", "schema.json"]


def agg(directory: Path, *, compact: bool = False) -> Aggregate:
    return aggregate_dir(directory, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=compact)


def totals(directory: Path) -> dict[str, int]:
    return agg(directory).snapshot().family("decision_counts")


def files(directory: Path, suffix: str) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.endswith(suffix))


def owned(directory: Path) -> list[tuple[str, str]]:
    """Every shard-family file of ``directory`` with its kind (a v1 lock file would show too)."""
    return [(n, p[1]) for n in sorted(os.listdir(directory)) if (p := parse_name(n)) is not None]


def read_shard(path: str | Path) -> ShardRecord:
    """Decode a v2 shard file as the aggregator would."""
    path = Path(path)
    parsed = parse_name(path.name)
    assert parsed is not None
    assert parsed[1] == "v2"
    return decode_v2(path.read_bytes(), GATE_SCHEMA, parsed[0])


def header_length(data: bytes) -> int:
    length: int = Layout.PREFIX.unpack_from(data)[3]
    return length


def gate_counts(allows: int, *, outcome: bool) -> tuple[int, ...]:
    """The counts of ``allows`` ALLOW decisions, then optionally one DENY check outcome."""
    store = GateMetricStore()
    for _ in range(allows):
        store.record_decision(True)
    if outcome:
        store.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True)
    return store.snapshot().counts


def process_state(pid: int) -> str:
    """The state letter of ``/proc/<pid>/stat`` ("T" for a stopped process)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(proc: subprocess.Popen[str]) -> None:
    def stopped() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"child exited ({proc.returncode}) instead of stopping: {err}")
        return process_state(proc.pid) == "T"

    wait_until(stopped, timeout=30)


def poll_while_running(
    proc: subprocess.Popen[str], directory: Path, timeout: float = 30.0
) -> list[dict[str, int]]:
    """Aggregate ``directory`` over and over while ``proc`` runs, and once after it exited."""
    seen: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"child {proc.pid} still running after {timeout} s")
        seen.append(totals(directory))
        time.sleep(0.002)
    seen.append(totals(directory))
    return seen


@pytest.fixture
def fault() -> Iterator[Callable[[Callable[[str], None]], None]]:
    """Install a crash-point hook for one test; always removed afterwards."""

    def install(hook: Callable[[str], None]) -> None:
        _faults.HOOK = hook

    try:
        yield install
    finally:
        _faults.HOOK = None


def raise_at(step: str, exc: BaseException) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            raise exc

    return hook


def interfere_after_create(
    monkeypatch: pytest.MonkeyPatch, name: str, action: Callable[[str], None]
) -> None:
    """Run ``action(path)`` right after the owner creates file ``name``, before its ``flock``.

    The races of a brand-new shard with an aggregator cannot be forced from outside the
    process, so the aggregator's real system calls are injected at that instant.
    """
    real_open = os.open

    def spying_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if flags & os.O_CREAT and os.path.basename(os.fspath(path)) == name:
            action(os.fspath(path))
        return fd

    monkeypatch.setattr(os, "open", spying_open)


# -- saving ----------------------------------------------------------------------------------


def test_save_writes_one_fixed_size_v2_shard_with_its_identity_and_cumulative_counts(
    tmp_path: Path,
) -> None:
    store = GateMetricStore(clock=lambda: 1234.5)
    store.record_decision(False, ["TIER_FAIL"])
    umask = os.umask(0o077)
    try:
        assert store.save_to_dir(tmp_path)
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
    assert first.st_size == layout_for(GATE_SCHEMA).file_size(header_length(data))
    assert stat.S_IMODE(first.st_mode) == 0o644  # whatever the umask: other users aggregate
    store.record_decision(True)
    assert store.save_to_dir(tmp_path)
    record = read_shard(tmp_path / name)
    assert (record.seq, record.generation) == (2, 2)
    assert store.store_generation == 2
    assert record.counts == store.snapshot().counts
    second = (tmp_path / name).stat()
    # Written in place: the same inode at the same size, never renamed over or grown.
    assert (second.st_ino, second.st_size) == (first.st_ino, first.st_size)
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 1}
    shard.close(save=False)


def test_each_save_writes_the_other_slot_in_place_and_the_aggregate_never_goes_down(
    tmp_path: Path,
) -> None:
    store = GateMetricStore(clock=lambda: 77.0)
    shard = Shard(store, tmp_path, clock=lambda: 1000.0)
    calls: list[Callable[[], None]] = [
        lambda: store.record_decision(True),
        lambda: store.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True),
        store.record_audit_write_failure,
        lambda: store.increment("reason_counts", "NO_CANARY_DATA", 3),
    ]
    layout = layout_for(GATE_SCHEMA)
    previous = tuple(GATE_SCHEMA.zeros())
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
    store = GateMetricStore()
    shard = shard_for(store, tmp_path, durability=durability)
    assert shard.durability is durability
    shard.open()
    created, syncs[:] = list(syncs), []
    for _ in range(3):
        store.record_decision(True)
        assert shard.save()
    saved = list(syncs)
    monkeypatch.undo()
    if durability is Durability.POWER_LOSS:
        assert created  # the new file and its directory entry
        assert len(saved) == 3  # one data sync per save
    else:
        assert (created, saved) == ([], [])  # nothing on the request path waits for the disk
    assert totals(tmp_path) == {"ALLOW": 3, "DENY": 0}
    shard.close(save=False)


def test_the_lifetime_lock_is_on_the_data_file_from_before_it_has_its_name(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = GateMetricStore()
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
    store.record_decision(True)
    assert shard.save()
    assert is_locked(path)
    assert shard.close()
    assert not is_locked(path)
    assert shard.identity is None
    assert owned(tmp_path) == [(path.name, "v2")]  # the dead shard waits for compaction
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}


def test_the_lifetime_lock_is_freed_when_the_owner_is_sigkilled(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(
        """
        from backend.app.testing.gate_metrics import GateMetricStore
        store = GateMetricStore()
        store.record_decision(True)
        assert store.save_to_dir(sys.argv[1])
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
    assert result.snapshot().family("decision_counts") == {"ALLOW": 1, "DENY": 0}


@pytest.mark.parametrize("step", ["save.locked", "save.written"])
def test_a_failed_save_returns_false_counts_it_and_rolls_back(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None], step: str
) -> None:
    # Simulated: a real EIO from fdatasync (after the slot was written) needs a failing device;
    # a real write failure is tested in a child below (RLIMIT_FSIZE).
    store = GateMetricStore()
    store.record_decision(True)
    fault(raise_at(step, OSError(errno.EIO, "Input/output error")))
    assert store.save_to_dir(tmp_path) is False
    assert store.metric_write_failures() == 1
    assert store.store_generation == 0
    assert files(tmp_path, ".creating") == []
    # Written but not reported durable: a reader may see it; the store still has it, and the
    # next save rewrites that very slot with at least as much.
    assert totals(tmp_path) == {"ALLOW": int(step == "save.written"), "DENY": 0}
    _faults.HOOK = None
    assert store.save_to_dir(tmp_path)
    assert store.store_generation == 1
    (name,) = files(tmp_path, ".shard")
    record = read_shard(tmp_path / name)
    assert (record.seq, record.generation) == (1, 1)
    assert record.counts == store.snapshot().counts
    assert agg(tmp_path).snapshot().get("metric_write_failures") == 1  # persisted too
    shard_for(store, tmp_path).close(save=False)


FAILING_WRITER = """
import json, logging, resource
import gatemetrics.shards as shards
from backend.app.testing.gate_metrics import GateMetricStore

lines = []


class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())


logging.getLogger("gatemetrics.shards").addHandler(Keep())
shards._LOG_EVERY_S = interval = float(sys.argv[2])
store = GateMetricStore()
binding = store.bind_to_dir(sys.argv[1])
store.record_decision(True)
# A real write failure without a special file system: the kernel refuses any write past
# RLIMIT_FSIZE (EFBIG), and both slots lie past the shard's first 4 KiB page.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # otherwise that write kills the process
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
store.record_decision(False, ["TIER_FAIL"])  # never raises
failed = 1
logged_by = time.monotonic()
while time.monotonic() < logged_by + interval:  # many more failures within one interval
    store.record_decision(False, ["TIER_FAIL"])
    failed += 1
store.record_decision(False, ["TIER_FAIL"])  # the first failure of the next interval
failed += 1
report = {"failed": failed, "failures": store.metric_write_failures(),
          "generation": store.store_generation, "lines": lines}
print(json.dumps(report), flush=True)
sys.stdin.readline()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
store.record_decision(True)
print(store.metric_write_failures(), flush=True)
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
    assert snap.family("decision_counts") == {"ALLOW": 1, "DENY": 0}  # the last good save
    assert snap.get("metric_write_failures") == 0
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert int(read_line(proc)) == failed
    snap = agg(tmp_path).snapshot()
    assert snap.family("decision_counts") == {"ALLOW": 2, "DENY": failed}
    assert snap.get("reason_counts", "TIER_FAIL") == failed
    assert snap.get("metric_write_failures") == failed  # the failures themselves persisted
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


READ_ONLY_DIRECTORIES = """
import json, logging, os, sys
from backend.app.testing.gate_metrics import GateMetricStore

lines = []


class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())


logging.getLogger("gatemetrics.shards").addHandler(Keep())
existing, fresh = sys.argv[1], sys.argv[2]
store = GateMetricStore()
binding = store.bind_to_dir(existing)
store.record_decision(True)
os.chmod(existing, 0o555)
store.record_decision(True)
store.record_decision(True)
other = GateMetricStore()
other.record_decision(False, ["TIER_FAIL"])
results = [other.save_to_dir(fresh) for _ in range(3)]
report = {"kept_failures": store.metric_write_failures(), "results": results,
          "failures": other.metric_write_failures(), "lines": lines,
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
    assert totals(existing) == {"ALLOW": 3, "DENY": 0}
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
    store = GateMetricStore()
    store.record_decision(True)
    for attempt in range(1, 4):
        assert store.save_to_dir(target) is False
        assert store.metric_write_failures() == attempt  # every failure counted
    assert store.decision_counts()["ALLOW"] == 1  # counts stay in memory


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
    store = GateMetricStore()
    store.record_decision(True)
    with caplog.at_level(logging.WARNING, logger="gatemetrics.shards"):
        for _ in range(3):
            assert store.save_to_dir(target) is False
    assert store.metric_write_failures() == 3
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
    store = GateMetricStore()
    shard = Shard(store, tmp_path, identity_factory=lambda: next(given))
    store.record_decision(True)
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
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}
    shard.close(save=False)


def test_a_store_whose_counts_went_down_is_not_saved(tmp_path: Path) -> None:
    store = GateMetricStore()
    for _ in range(3):
        store.record_decision(True)
    assert store.save_to_dir(tmp_path)
    (name,) = files(tmp_path, ".shard")
    before = (tmp_path / name).read_bytes()
    store.restore(GateMetricStore().to_dict())  # all zero: less than what was saved
    assert store.save_to_dir(tmp_path) is False
    assert (tmp_path / name).read_bytes() == before
    assert totals(tmp_path) == {"ALLOW": 3, "DENY": 0}
    shard_for(store, tmp_path).close(save=False)


def test_a_slot_torn_by_a_cut_short_write_falls_back_to_the_previous_save_whole(
    tmp_path: Path,
) -> None:
    store = GateMetricStore()
    shard = shard_for(store, tmp_path)
    store.record_decision(True)
    assert shard.save()
    store.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True)
    assert shard.save()
    assert shard.path is not None
    path = Path(shard.path)
    before = read_shard(path)
    assert before.seq == 2
    # What a write cut short would leave: the first half of save 3's slot over save 1's.
    store.record_outcome(False, ["GUARD_VIOLATION"], breach=True)
    layout = layout_for(GATE_SCHEMA)
    data = path.read_bytes()
    slot = layout.pack(3, before.generation + 1, time.time(), before.start, store.snapshot().counts)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, slot[: len(slot) // 2], layout.slot_offset(header_length(data), 3))
    finally:
        os.close(fd)
    torn = read_shard(path)
    assert (torn.seq, torn.counts, torn.torn_slots) == (2, before.counts, 1)
    assert agg(tmp_path).counts == before.counts  # one check's counts: all of them or none
    assert shard.save()  # the next save writes that slot whole
    after = read_shard(path)
    assert (after.seq, after.counts, after.torn_slots) == (3, store.snapshot().counts, 0)
    shard.close(save=False)


BUSY_WRITER = """
from backend.app.testing.gate_metrics import GateMetricStore
store = GateMetricStore()
store.bind_to_dir(sys.argv[1])
print("bound", flush=True)
for _ in range(int(sys.argv[2])):
    store.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True)
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
                snap.get("decision_counts", "DENY"),
                snap.get("reason_counts", "TIER_FAIL"),
                snap.get("reason_counts", "DRIFT_ALERT"),
                snap.get("breach_counts", "NO_OVERRIDE"),
            )
        )
    assert proc.wait(timeout=30) == 0
    # Each call's four increments: all of them or none, in every read of the live shard.
    assert [s for s in seen if len(set(s)) != 1] == []
    denies = [s[0] for s in seen]
    assert denies == sorted(denies)
    assert len(set(denies)) > 2  # the reads really overlapped the saves
    assert totals(tmp_path) == {"ALLOW": 0, "DENY": 20000}


def test_saving_after_close_starts_a_new_incarnation_with_only_new_counts(tmp_path: Path) -> None:
    store = GateMetricStore()
    store.record_decision(True)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    first = shard.identity
    assert shard.close(save=True)
    store.record_decision(False, ["DRIFT_ALERT"])
    assert shard.save()
    assert shard.identity is not None
    assert first is not None
    assert shard.identity.incarnation != first.incarnation
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 1}
    agg(tmp_path, compact=True)
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 1}
    assert files(tmp_path, ".json") == ["archive.json", "schema.json"]
    assert owned(tmp_path) == [(v2_names(shard.identity.incarnation)[0], "v2")]  # the live one
    shard.close()
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 1}


def test_one_shard_per_store_and_directory_whatever_the_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    store = GateMetricStore()
    shard = shard_for(store, real)
    assert shard_for(store, tmp_path / "link") is shard
    assert shard_for(store, "real") is shard
    assert shard_for(GateMetricStore(), real) is not shard
    store.record_decision(True)
    assert save_to_dir(store, "link")
    assert save_to_dir(store, real)
    assert len(files(real, ".shard")) == 1
    assert totals(real) == {"ALLOW": 1, "DENY": 0}
    shard.close(save=False)


def test_a_file_already_at_the_creating_name_means_a_fresh_incarnation(tmp_path: Path) -> None:
    first, second = new_identity(), new_identity()
    given = iter([first, second])
    stray = tmp_path / v2_names(first.incarnation)[1]
    stray.write_bytes(b"someone else's")  # an id collision or a planted file
    shard = Shard(GateMetricStore(), tmp_path, identity_factory=lambda: next(given))
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
    shard = Shard(GateMetricStore(), tmp_path, identity_factory=lambda: next(given))
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
    store = GateMetricStore()
    shard = Shard(store, tmp_path, identity_factory=lambda: next(given))
    try:
        assert shard.open() == second
    finally:
        monkeypatch.undo()
    assert len(removed) == 1
    assert owned(tmp_path) == [(v2_names(second.incarnation)[0], "v2")]
    assert is_locked(tmp_path / v2_names(second.incarnation)[0])
    store.record_decision(True)
    assert shard.save()
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}
    shard.close(save=False)


@pytest.mark.parametrize("compact_first", [True, False])
@pytest.mark.parametrize("how", ["shard-removed", "directory-recreated", "replaced-by-a-copy"])
def test_an_owner_whose_shard_vanished_goes_on_as_a_new_incarnation_never_counting_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, compact_first: bool
) -> None:
    monkeypatch.setattr(shards_module, "VANISHED_CHECK_S", 0.0)  # check at every save
    directory = tmp_path / "shards"
    store = GateMetricStore()
    binding = store.bind_to_dir(directory)
    for _ in range(3):
        store.record_decision(True)
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
    store.record_decision(True)
    store.record_decision(True)
    assert binding.shard.identity not in (None, first)
    assert totals(directory) == {"ALLOW": expected, "DENY": 0}
    agg(directory, compact=True)
    assert totals(directory) == {"ALLOW": expected, "DENY": 0}
    binding.close()
    assert totals(directory) == {"ALLOW": expected, "DENY": 0}


def test_read_only_views_can_never_be_saved(tmp_path: Path) -> None:
    store = GateMetricStore()
    store.record_decision(True)
    assert store.save_to_dir(tmp_path)
    view = GateMetricStore.load_from_dir(tmp_path)
    with pytest.raises(TypeError, match="read-only"):
        save_to_dir(view, tmp_path)
    with pytest.raises(TypeError, match="read-only"):
        shard_for(view, tmp_path)
    with pytest.raises(TypeError, match="read-only"):
        Shard(view, tmp_path)
    with pytest.raises(TypeError, match="read-only"):
        bind(view, tmp_path)
    assert len(files(tmp_path, ".shard")) == 1
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}
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
    store = GateMetricStore()
    store.record_decision(True)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    parent = shard.identity
    store._pid = shard._pid = -1  # what a hook-less fork would leave behind
    assert shard.save()
    assert store.decision_counts() == {"ALLOW": 0, "DENY": 0}
    assert shard.identity != parent
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}
    shard.close(save=False)


# -- binding ---------------------------------------------------------------------------------


def test_write_through_saves_once_per_public_write(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    calls: list[Callable[[], None]] = [
        lambda: store.record_decision(True),
        lambda: store.record_decision(False, ["TIER_FAIL", "DRIFT_ALERT"]),
        lambda: store.record_outcome(False, ["GUARD_VIOLATION"], breach=True),
        store.record_breach,
        store.record_audit_write_failure,
        store.record_metric_write_failure,
        lambda: store.increment("decision_counts", "ALLOW"),
        lambda: store.increment_slots([0]),
    ]
    for i, call in enumerate(calls, 1):
        call()
        assert store.store_generation == i  # exactly one save per call
        (name,) = files(tmp_path, ".shard")
        record = read_shard(tmp_path / name)
        assert (record.seq, record.generation) == (i, i)
        assert record.counts == store.snapshot().counts
    binding.close()


class _CountingLock:
    """A lock that counts how often it was taken (to know when threads reached a point)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> None:
        self._lock.acquire()
        self.taken += 1

    def __exit__(self, *_: object) -> None:
        self._lock.release()


def _queued_behind_a_blocked_save(
    store: GateMetricStore,
    shard: Shard,
    fault: Callable[[Callable[[str], None]], None],
    *,
    waiters: int,
    then: Callable[[], None],
) -> None:
    """One write-through call whose save stops inside the save lock, and ``waiters`` more calls
    queued behind it (each has counted and drawn its wait ticket); then the blocked save goes
    on (running ``then`` first) and every call finishes."""
    entered, release = threading.Event(), threading.Event()
    first = [True]

    def hook(step: str) -> None:
        if step == "save.written" and first[0]:
            first[0] = False
            entered.set()
            assert release.wait(timeout=30)
            then()

    counting = _CountingLock()
    shard._ticket_lock = counting  # type: ignore[assignment]
    fault(hook)
    threads = [threading.Thread(target=store.record_decision, args=(True,))]
    threads[0].start()
    assert entered.wait(timeout=30)
    threads += [
        threading.Thread(target=store.record_decision, args=(True,)) for _ in range(waiters)
    ]
    for t in threads[1:]:
        t.start()
    # The blocked save took the ticket lock twice (its wait ticket, its save ticket); each
    # waiter once, after counting: then every waiter is queued on the save lock.
    wait_until(lambda: counting.taken == 2 + waiters)
    release.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()


def test_write_through_calls_queued_behind_a_save_share_the_next_save(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    _queued_behind_a_blocked_save(store, binding.shard, fault, waiters=5, then=lambda: None)
    # The blocked save, then one save for all five waiters (each counted before it began).
    assert store.store_generation == 2
    assert totals(tmp_path) == {"ALLOW": 6, "DENY": 0}
    binding.close()


def test_write_through_callers_save_themselves_when_the_save_they_waited_for_fails(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)

    def fail() -> None:
        raise OSError(errno.EIO, "I/O error")

    _queued_behind_a_blocked_save(store, binding.shard, fault, waiters=5, then=fail)
    assert store.metric_write_failures() == 1
    assert store.store_generation == 1  # the failed save rolled back; one save served the rest
    assert totals(tmp_path) == {"ALLOW": 6, "DENY": 0}
    binding.close()


def test_write_through_is_durable_when_each_concurrent_call_returns(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path, durability=Durability.PROCESS_CRASH)
    returned = [0]
    lock = threading.Lock()
    problems: list[str] = []

    def worker() -> None:
        for _ in range(25):
            store.record_decision(False, ["TIER_FAIL"])
            with lock:
                returned[0] += 1
                done = returned[0]
            # Every call that returned before this read is in the file (the shard only grows).
            on_disk = totals(tmp_path)["DENY"]
            if on_disk < done:
                problems.append(f"{done} calls returned, {on_disk} on disk")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert problems == []
    assert totals(tmp_path) == {"ALLOW": 0, "DENY": 200}
    assert store.store_generation <= 200
    binding.close()


def test_write_through_failures_are_counted_without_recursion(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    fault(raise_at("save.locked", OSError(errno.EIO, "I/O error")))
    for _ in range(5):
        store.record_decision(True)  # never raises
    assert store.metric_write_failures() == 5
    assert store.decision_counts()["ALLOW"] == 5
    assert totals(tmp_path) == {"ALLOW": 0, "DENY": 0}
    _faults.HOOK = None
    assert binding.close()
    snap = agg(tmp_path).snapshot()
    assert snap.get("metric_write_failures") == 5
    assert snap.family("decision_counts") == {"ALLOW": 5, "DENY": 0}


def test_write_through_is_exact_when_sigkilled_right_after_the_call_returned(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(
        """
        from backend.app.testing.gate_metrics import GateMetricStore
        store = GateMetricStore()
        store.bind_to_dir(sys.argv[1])
        for i in range(137):
            store.record_outcome(i % 3 == 0, ["NO_TIER_DATA"], breach=i % 10 == 0)
        print("returned", flush=True)
        sys.stdin.read()
        """,
        str(tmp_path),
        stdin=True,
    )
    assert read_line(proc) == "returned"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    snap = agg(tmp_path).snapshot()
    assert snap.family("decision_counts") == {"ALLOW": 46, "DENY": 91}
    assert snap.get("reason_counts", "NO_TIER_DATA") == 91
    assert snap.get("breach_counts", "NO_OVERRIDE") == 14


def test_periodic_binding_saves_in_the_background_and_on_close(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path, mode="periodic", interval=0.02)
    assert binding.mode == "periodic"
    assert len(files(tmp_path, ".shard")) == 1  # created (and locked) at bind time
    store.record_decision(True)
    wait_until(lambda: totals(tmp_path)["ALLOW"] == 1)
    generation = store.store_generation
    store.record_decision(True)
    wait_until(lambda: totals(tmp_path)["ALLOW"] == 2)
    assert store.store_generation == generation + 1  # no saves while nothing changed
    store.record_decision(False)
    assert binding.close()
    assert totals(tmp_path) == {"ALLOW": 2, "DENY": 1}
    assert binding.close()  # idempotent
    assert not any(t.name == "gatemetrics-periodic-save" for t in threading.enumerate())


def test_atexit_saves_a_periodic_binding(tmp_path: Path, reaper: Reaper) -> None:
    done = run_python(
        """
        from backend.app.testing.gate_metrics import GateMetricStore
        store = GateMetricStore()
        store.bind_to_dir(sys.argv[1], mode="periodic", interval=3600)
        for _ in range(7):
            store.record_decision(True)
        """,
        str(tmp_path),
    )
    code, _, err = done.returncode, done.stdout, done.stderr
    assert code == 0, err
    assert totals(tmp_path) == {"ALLOW": 7, "DENY": 0}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"mode": "sometimes"}, ValueError),
        ({"mode": "periodic", "interval": 0}, ValueError),
        ({"mode": "periodic", "interval": -1.0}, ValueError),
    ],
)
def test_bind_rejects_bad_options(tmp_path: Path, kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        bind(GateMetricStore(), tmp_path, **kwargs)  # type: ignore[arg-type]


def test_a_store_can_be_bound_once(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = bind(store, tmp_path)
    with pytest.raises(GatemetricsError, match="already bound"):
        bind(store, tmp_path / "other")
    binding.close()
    bind(store, tmp_path).close()


def test_binding_an_unusable_directory_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ShardWriteError):
        GateMetricStore().bind_to_dir(tmp_path / "f" / "shards")


# -- fork and pid reuse ----------------------------------------------------------------------


def test_a_forked_child_starts_at_zero_as_a_new_incarnation(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    for _ in range(3):
        store.record_decision(True)
    parent = binding.shard.identity

    def child() -> bool:
        zero = store.decision_counts() == {"ALLOW": 0, "DENY": 0}
        store.record_decision(False)
        store.record_decision(False)
        return zero and binding.shard.identity not in (None, parent)

    assert in_forked_child(child)
    assert binding.shard.identity == parent
    assert parent is not None
    assert is_locked(tmp_path / v2_names(parent.incarnation)[0])  # still ours
    assert totals(tmp_path) == {"ALLOW": 3, "DENY": 2}
    assert len(files(tmp_path, ".shard")) == 2
    binding.close()


def test_a_forked_child_never_releases_the_parents_lifetime_lock(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    for _ in range(3):
        store.record_decision(True)
    parent = binding.shard.path
    assert parent is not None

    def close_in_child() -> bool:
        store.record_decision(False)
        mine = binding.shard.path
        closed = binding.close()  # saves, then unlocks the child's own shard only
        assert mine is not None
        return closed and mine != parent and is_locked(parent) and not is_locked(mine)

    def killed_in_child() -> bool:
        store.record_decision(False)
        os.kill(os.getpid(), signal.SIGKILL)
        return True  # pragma: no cover - never reached

    assert in_forked_child(close_in_child)
    assert is_locked(parent)
    assert not in_forked_child(killed_in_child)  # its exit status is the SIGKILL
    assert is_locked(parent)
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 3, "DENY": 2}
    assert (result.live, result.dead) == (1, 2)
    assert owned(tmp_path) == [(os.path.basename(parent), "v2")]  # only the children absorbed
    store.record_decision(True)  # the parent goes on saving in place
    assert read_shard(parent).counts == store.snapshot().counts
    assert totals(tmp_path) == {"ALLOW": 4, "DENY": 2}
    binding.close()


HOOKLESS_FORK = """
import ctypes
from backend.app.testing.gate_metrics import GateMetricStore
from tests.shard_tools import is_locked

store = GateMetricStore()
binding = store.bind_to_dir(sys.argv[1])
for _ in range(3):
    store.record_decision(True)
parent = binding.shard.path
pid = ctypes.CDLL(None, use_errno=True).fork()  # libc's fork: no os.register_at_fork hooks
if pid == 0:
    ok = False
    try:
        assert binding.save()  # the pid guard: a new incarnation, counts reset
        zero = store.decision_counts() == {"ALLOW": 0, "DENY": 0}
        store.record_decision(False)
        store.record_decision(False)
        mine = binding.shard.path
        ok = zero and mine != parent and is_locked(parent)
    finally:
        os._exit(0 if ok else 1)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(status, is_locked(parent), flush=True)
sys.stdin.read()
"""


def test_the_pid_guard_catches_a_real_fork_that_bypassed_the_fork_hooks(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(HOOKLESS_FORK, str(tmp_path), stdin=True)
    assert read_line(proc) == "0 True"  # the child passed; the parent still holds its lock
    result = agg(tmp_path)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 3, "DENY": 2}
    assert (result.live, result.dead) == (1, 1)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert totals(tmp_path) == {"ALLOW": 3, "DENY": 2}


def test_preload_style_fork_after_counts_never_double_counts(
    tmp_path: Path, reaper: Reaper
) -> None:
    """Like gunicorn --preload: the app (and its bound store) exists before the workers fork."""
    done = run_python(
        """
        from backend.app.testing.gate_metrics import GateMetricStore
        store = GateMetricStore()
        store.bind_to_dir(sys.argv[1], mode="periodic", interval=3600)
        for _ in range(5):
            store.record_decision(True)
        children = []
        for n in range(3):
            pid = os.fork()
            if pid == 0:
                # A worker: starts at zero, recycles gracefully (atexit saves it).
                for _ in range(n + 1):
                    store.record_decision(False, ["FLAKY_TESTS"])
                sys.exit(0)
            children.append(pid)
        for pid in children:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        store.record_decision(True)
        print(store.decision_counts(), flush=True)
        """,
        str(tmp_path),
    )
    code, out, err = done.returncode, done.stdout, done.stderr
    assert code == 0, err
    assert out.strip() == "{'ALLOW': 6, 'DENY': 0}"
    assert totals(tmp_path) == {"ALLOW": 6, "DENY": 6}
    assert len(files(tmp_path, ".shard")) == 4


def _mp_worker(directory: str, n: int) -> None:
    # The store inherited from the parent (module global below) must be empty here.
    assert _INHERITED is not None
    assert _INHERITED.decision_counts() == {"ALLOW": 0, "DENY": 0}
    for _ in range(n):
        _INHERITED.record_decision(False, ["CANARY_BREAKING"])


_INHERITED: GateMetricStore | None = None


def test_multiprocessing_fork_children_are_new_incarnations(tmp_path: Path) -> None:
    global _INHERITED  # noqa: PLW0603 - inherited by the forked children on purpose
    store = _INHERITED = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    store.record_decision(True)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_mp_worker, args=(str(tmp_path), n)) for n in (1, 2, 3)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.exitcode is None and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
        _INHERITED = None
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 6}
    assert store.decision_counts() == {"ALLOW": 1, "DENY": 0}
    assert len(files(tmp_path, ".shard")) == 4
    binding.close()


def test_periodic_threads_stop_before_a_fork_and_restart_on_both_sides(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path, mode="periodic", interval=0.02)
    before = binding._thread
    assert before is not None
    assert before.is_alive()

    def child() -> bool:
        threads = [t for t in threading.enumerate() if t.name == "gatemetrics-periodic-save"]
        restarted = len(threads) == 1 and threads[0] is not before and threads[0].is_alive()
        store.record_decision(True)
        return restarted and binding.close()

    assert in_forked_child(child)
    assert not before.is_alive()  # joined before the fork
    after = binding._thread
    assert after is not None
    assert after is not before
    assert after.is_alive()
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}  # the child's count, saved by the child
    binding.close()


OWNER = """
from backend.app.testing.gate_metrics import GateMetricStore
store = GateMetricStore()
binding = store.bind_to_dir(sys.argv[1])
for _ in range(int(sys.argv[2])):
    store.record_decision(sys.argv[3] == "allow", ["NO_DRIFT_DATA"])
print(binding.shard.identity.incarnation, flush=True)
sys.stdin.read()
"""


def start_with_pid(
    pid: int, start: Callable[[], subprocess.Popen[str]], attempts: int = 50
) -> subprocess.Popen[str] | None:
    """Start a process that gets exactly ``pid`` (free again), or None when the kernel won't.

    The next pid of this namespace is set through ``/proc/sys/kernel/ns_last_pid`` (root only);
    another process forking in between takes it, so this retries.
    """
    for _ in range(attempts):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w", encoding="ascii") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        proc = start()
        if proc.pid == pid:
            return proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return None


def test_a_new_process_with_a_dead_owners_pid_is_a_new_incarnation(
    tmp_path: Path, reaper: Reaper
) -> None:
    first = reaper.python(OWNER, str(tmp_path), "3", "allow", stdin=True)
    first_inc = read_line(first)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    second = start_with_pid(
        first.pid, lambda: reaper.python(OWNER, str(tmp_path), "2", "deny", stdin=True)
    )
    if second is None:
        pytest.skip("cannot make the kernel reuse a pid here (needs root for ns_last_pid)")
    second_inc = read_line(second)
    assert second_inc != first_inc
    records = [read_shard(tmp_path / v2_names(i)[0]) for i in (first_inc, second_inc)]
    assert [r.pid for r in records] == [first.pid, first.pid]  # the same pid, reused
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 3, "DENY": 2}
    assert (result.live, result.dead) == (1, 1)
    assert [r.incarnation for r in result.shards if r.state == "dead"] == [first_inc]
    assert owned(tmp_path) == [(v2_names(second_inc)[0], "v2")]  # only the dead one absorbed
    assert is_locked(tmp_path / v2_names(second_inc)[0])
    assert second.stdin is not None
    second.stdin.close()
    assert second.wait(timeout=30) == 0
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 3, "DENY": 2}
    assert sorted(os.listdir(tmp_path)) == CLEAN


# -- crash points: a real SIGKILL at every step of creating a shard and of a save ---------------

KILLED_WRITER = """
from backend.app.testing.gate_metrics import GateMetricStore
directory, step, durability = sys.argv[1:4]
store = GateMetricStore()
binding = store.bind_to_dir(directory, durability=durability)
for _ in range(3):
    store.record_decision(True)
if step.startswith("create."):
    binding.close()  # a dead incarnation holding the 3; the next save creates a new one
    store.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True)
    _faults.install_kill_at(step)
    store.save_to_dir(directory, durability=durability)
else:
    _faults.install_kill_at(step)
    store.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True)  # killed in its save
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
    # One check's increments (a decision, two reasons, a breach) are all there or none.
    completed = step in ("save.written", "save.done")
    expected = gate_counts(3, outcome=completed)
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
from backend.app.testing.gate_metrics import GateMetricStore

directory, step, after, check = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
until_switched = check < 0  # keep the real VANISHED_CHECK_S and record until it noticed
if not until_switched:
    shards.VANISHED_CHECK_S = check
store = GateMetricStore()
binding = store.bind_to_dir(directory)
for _ in range(3):
    store.record_decision(True)
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
    store.record_decision(True)
    calls += 1
switched = None
deadline = time.monotonic() + 30
while after > 0:
    store.record_decision(True)
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
    held = read_shard(path).counts[GATE_SCHEMA.slot("decision_counts", "ALLOW")]
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
    dead_shard(directory, allows=0, denies=2)  # so that compaction has work while it is stopped
    deny = 0 if variant == "directory-recreated" else 2
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
    assert during.snapshot().family("decision_counts") == {"ALLOW": held - gone, "DENY": deny}
    assert during.live == int(variant == "kept")  # a stopped owner's shard is never absorbed
    calls = report["calls"]
    assert calls == begun + 20
    allows = [s["ALLOW"] for s in seen]
    assert all(a <= calls - gone for a in allows), allows  # never above the calls made
    assert allows == sorted(allows)  # and never going down
    assert all(s["DENY"] == deny for s in seen)
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
    assert final.snapshot().family("decision_counts") == {"ALLOW": expected, "DENY": deny}
    assert sorted(os.listdir(directory)) == CLEAN
    assert totals(directory) == {"ALLOW": expected, "DENY": deny}


STOPPABLE_CREATOR = """
import json
import gatemetrics.shards as shards
from backend.app.testing.gate_metrics import GateMetricStore

directory, step = sys.argv[1], sys.argv[2]
shards.VANISHED_CHECK_S = 0.0
store = GateMetricStore()
for _ in range(3):
    store.record_decision(True)
assert store.save_to_dir(directory)
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
    store.record_decision(True)
    results.append(store.save_to_dir(directory))  # the first stops while creating a shard
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
    assert result.snapshot().family("decision_counts") == {"ALLOW": 3, "DENY": 0}
    assert [n for n, _ in owned(tmp_path)] == ([new[0]] if variant == "kept" else [])
    os.kill(proc.pid, signal.SIGCONT)
    seen = poll_while_running(proc, tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == [True] * 5
    allows = [s["ALLOW"] for s in seen]
    assert all(a <= 8 for a in allows), allows  # 8 record calls in all
    assert allows == sorted(allows)
    # A temp file removed under its creator makes it start over as a fresh incarnation (its
    # rename fails): nothing lost. A shard removed after its rename takes the save that
    # created it along (module doc: saves into a removed file are lost, never counted twice).
    expected = 7 if variant == "file-removed" and renamed else 8
    final = agg(tmp_path, compact=True)
    assert final.snapshot().family("decision_counts") == {"ALLOW": expected, "DENY": 0}
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
    allows = [s["ALLOW"] for s in seen]
    assert all(a <= calls - held for a in allows), allows
    assert allows == sorted(allows)
    assert totals(tmp_path) == {"ALLOW": calls - switched, "DENY": 0}
    assert agg(tmp_path, compact=True).snapshot().family("decision_counts") == {
        "ALLOW": 3,
        "DENY": 0,
    }
    assert sorted(os.listdir(tmp_path)) == CLEAN


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
