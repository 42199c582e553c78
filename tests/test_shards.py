"""Tests of gatemetrics.shards: incarnations, lifetime locks, atomic saves, binding, fork."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA, GateMetricStore
from gatemetrics import (
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
from gatemetrics.shards import SAVE_STEPS, parse_shard_name
from tests.processes import Reaper, read_line, run_python, wait_until
from tests.shard_tools import in_forked_child, is_locked

SHARD_NAME = re.compile(r"shard-[0-9a-f]{8}-\d+-[0-9a-f]+-[0-9a-f]{16}\.json\Z")


def totals(directory: Path) -> dict[str, int]:
    return (
        aggregate_dir(directory, GATE_SCHEMA, namespace=GATE_NAMESPACE)
        .snapshot()
        .family("decision_counts")
    )


def files(directory: Path, suffix: str) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.endswith(suffix))


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


# -- saving ----------------------------------------------------------------------------------


def test_save_writes_a_shard_with_its_identity_and_cumulative_counts(tmp_path: Path) -> None:
    store = GateMetricStore(clock=lambda: 1234.5)
    store.record_decision(False, ["TIER_FAIL"])
    assert store.save_to_dir(tmp_path)
    (name,) = files(tmp_path, ".json")
    assert SHARD_NAME.match(name)
    doc = orjson.loads((tmp_path / name).read_bytes())
    inc = parse_shard_name(name)
    assert inc is not None
    assert doc["incarnation"] == inc[0]
    assert doc["format"] == "gatemetrics-shard"
    assert doc["version"] == 1
    assert doc["pid"] == os.getpid()
    assert doc["generation"] == 1
    assert doc["counts"] == store.to_dict()
    assert doc["counts"]["store_start_timestamp"] == 1234.5
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert files(tmp_path, ".lock") == [name.replace(".json", ".lock")]
    assert files(tmp_path, ".tmp") == []
    store.record_decision(True)
    assert store.save_to_dir(tmp_path)
    doc = orjson.loads((tmp_path / name).read_bytes())
    assert doc["generation"] == store.store_generation == 2
    assert doc["counts"]["decision_counts"] == {"ALLOW": 1, "DENY": 1}
    shard_for(store, tmp_path).close(save=False)


@pytest.mark.parametrize("durability", list(Durability))
def test_every_durability_writes_the_same_shard(tmp_path: Path, durability: Durability) -> None:
    store = GateMetricStore()
    store.record_decision(True)
    assert store.save_to_dir(tmp_path, durability=durability)
    assert shard_for(store, tmp_path).durability is durability
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}
    shard_for(store, tmp_path).close(save=False)


def test_the_lifetime_lock_is_held_before_the_shard_appears(tmp_path: Path) -> None:
    store = GateMetricStore()
    shard = shard_for(store, tmp_path)
    ident = shard.open()
    lock = tmp_path / f"shard-{ident.incarnation}.lock"
    assert is_locked(lock)
    assert files(tmp_path, ".json") == []
    assert shard.save()
    assert is_locked(lock)
    shard.close()
    assert not is_locked(lock)
    assert shard.identity is None


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
    (lock,) = files(tmp_path, ".lock")
    assert is_locked(tmp_path / lock)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not is_locked(tmp_path / lock)
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 0}


def test_a_failed_save_returns_false_counts_it_and_rolls_back(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = GateMetricStore()
    store.record_decision(True)
    fault(raise_at("save.tmp_written", OSError(errno.ENOSPC, "No space left on device")))
    assert store.save_to_dir(tmp_path) is False
    assert store.metric_write_failures() == 1
    assert store.store_generation == 0
    assert files(tmp_path, ".tmp") == []  # an error (not a crash) cleans its temp file
    assert files(tmp_path, ".json") == []
    fault(lambda step: None)
    assert store.save_to_dir(tmp_path)
    assert store.store_generation == 1
    doc = orjson.loads((tmp_path / files(tmp_path, ".json")[0]).read_bytes())
    assert doc["counts"]["metric_write_failures"] == 1  # the failure itself is persisted
    shard_for(store, tmp_path).close(save=False)


@pytest.mark.parametrize("kind", ["file-in-the-way", "under-a-file", "nul-byte"])
def test_save_never_raises_for_an_unusable_directory(tmp_path: Path, kind: str) -> None:
    (tmp_path / "f").write_text("x")
    target = {
        "file-in-the-way": str(tmp_path / "f"),
        "under-a-file": str(tmp_path / "f" / "shards"),
        "nul-byte": str(tmp_path / "bad\0name"),
    }[kind]
    store = GateMetricStore()
    store.record_decision(True)
    assert store.save_to_dir(target) is False
    assert store.metric_write_failures() == 1
    assert store.decision_counts()["ALLOW"] == 1  # counts stay in memory


def test_a_symlink_planted_at_the_temp_path_is_not_followed(tmp_path: Path) -> None:
    store = GateMetricStore()
    shard = shard_for(store, tmp_path)
    ident = shard.open()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f"shard-{ident.incarnation}.tmp").symlink_to(victim)
    store.record_decision(True)
    assert shard.save() is False
    assert victim.read_text() == "precious"
    shard.close(save=False)


def test_a_store_whose_counts_went_down_is_not_saved(tmp_path: Path) -> None:
    store = GateMetricStore()
    for _ in range(3):
        store.record_decision(True)
    assert store.save_to_dir(tmp_path)
    before = (tmp_path / files(tmp_path, ".json")[0]).read_bytes()
    store.restore(GateMetricStore().to_dict())  # all zero: less than what was saved
    assert store.save_to_dir(tmp_path) is False
    assert (tmp_path / files(tmp_path, ".json")[0]).read_bytes() == before
    assert totals(tmp_path) == {"ALLOW": 3, "DENY": 0}
    shard_for(store, tmp_path).close(save=False)


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
    aggregate_dir(tmp_path, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=True)
    assert totals(tmp_path) == {"ALLOW": 1, "DENY": 1}
    assert len(files(tmp_path, ".json")) == 2  # archive.json and the live shard
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
    assert len(files(real, ".json")) == 1
    shard.close(save=False)


def test_a_busy_lock_at_start_means_a_fresh_incarnation(tmp_path: Path) -> None:
    first, second = new_identity(), new_identity()
    given = iter([first, second])
    lock = tmp_path / f"shard-{first.incarnation}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # an aggregator probing this very lock file
    try:
        shard = Shard(GateMetricStore(), tmp_path, identity_factory=lambda: next(given))
        assert shard.open() == second
    finally:
        os.close(fd)
    shard.close(save=False)


def test_an_orphan_lock_removed_before_our_flock_is_never_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up race: we opened our new lock file, then a compaction took its flock and
    removed it as an orphan (no shard yet), then our flock succeeded on the unlinked inode.
    filelock must refuse that inode and we must move on to a fresh incarnation; otherwise our
    shard would look dead to every aggregator and be absorbed while we keep writing it.

    The interleaving cannot be forced from outside filelock, so the unlink (a real one) is
    injected just before filelock's flock call.
    """
    import filelock._native._unix as unix

    first, second = new_identity(), new_identity()
    given = iter([first, second])
    first_lock = tmp_path / f"shard-{first.incarnation}.lock"
    real_lock = unix.lock_fd_nonblocking
    calls: list[int] = []

    def unlinked_first(fd: int) -> bool:
        if not calls:
            os.unlink(first_lock)  # what _unlink_free_lock does while holding the flock
        calls.append(fd)
        return real_lock(fd)

    monkeypatch.setattr(unix, "lock_fd_nonblocking", unlinked_first)
    shard = Shard(GateMetricStore(), tmp_path, identity_factory=lambda: next(given))
    assert shard.open() == second
    assert not first_lock.exists()
    assert is_locked(tmp_path / f"shard-{second.incarnation}.lock")
    monkeypatch.undo()
    shard.close(save=False)


@pytest.mark.parametrize("how", ["lock-removed", "directory-recreated"])
def test_a_worker_whose_lock_file_vanished_never_counts_twice(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "shards"
    store = GateMetricStore()
    binding = store.bind_to_dir(directory)
    for _ in range(3):
        store.record_decision(True)
    first = binding.shard.identity
    assert first is not None
    if how == "lock-removed":
        (directory / f"shard-{first.incarnation}.lock").unlink()
        expected = 5  # the orphaned shard is absorbed as dead; the new one adds only 2
    else:
        shutil.rmtree(directory)
        directory.mkdir()
        expected = 2  # the old shard went with the directory
    # Whatever an aggregator does now, the worker must not write its 3 again.
    aggregate_dir(directory, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=True)
    store.record_decision(True)
    store.record_decision(True)
    assert binding.shard.identity not in (None, first)
    assert totals(directory) == {"ALLOW": expected, "DENY": 0}
    aggregate_dir(directory, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=True)
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
    assert len(files(tmp_path, ".json")) == 1
    shard_for(store, tmp_path).close(save=False)


def test_identities_are_unique_and_validated() -> None:
    a, b = new_identity(), new_identity()
    assert a.incarnation != b.incarnation
    assert a.pid == b.pid == os.getpid()
    with pytest.raises(ValueError, match="malformed"):
        Identity("../../etc/passwd", 1, "h", 0.0)


def test_the_pid_guard_resets_a_copy_that_missed_the_fork_hook(tmp_path: Path) -> None:
    # A fork that bypasses os.register_at_fork (a C extension calling fork()) leaves the child
    # with the parent's pid in the store and shard. Simulate that state: the guard must start
    # over at zero as a new incarnation instead of saving the parent's counts again.
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
        doc = orjson.loads((tmp_path / files(tmp_path, ".json")[0]).read_bytes())
        assert doc["counts"] == store.to_dict()
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
        if step == "save.tmp_written" and first[0]:
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
    binding = store.bind_to_dir(tmp_path, durability="none")
    returned = [0]
    lock = threading.Lock()
    problems: list[str] = []

    def worker() -> None:
        for _ in range(25):
            store.record_decision(False, ["TIER_FAIL"])
            with lock:
                returned[0] += 1
                done = returned[0]
            # Every call that returned before this read is on disk (the shard only grows).
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
    fault(raise_at("save.tmp_written", OSError(errno.EIO, "I/O error")))
    for _ in range(5):
        store.record_decision(True)  # never raises
    assert store.metric_write_failures() == 5
    assert store.decision_counts()["ALLOW"] == 5
    fault(lambda step: None)
    assert binding.close()
    assert (
        aggregate_dir(tmp_path, GATE_SCHEMA, namespace=GATE_NAMESPACE)
        .snapshot()
        .get("metric_write_failures")
        == 5
    )


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
    snap = aggregate_dir(tmp_path, GATE_SCHEMA, namespace=GATE_NAMESPACE).snapshot()
    assert snap.family("decision_counts") == {"ALLOW": 46, "DENY": 91}
    assert snap.get("reason_counts", "NO_TIER_DATA") == 91
    assert snap.get("breach_counts", "NO_OVERRIDE") == 14


def test_periodic_binding_saves_in_the_background_and_on_close(tmp_path: Path) -> None:
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path, mode="periodic", interval=0.02)
    assert binding.mode == "periodic"
    store.record_decision(True)
    wait_until(lambda: files(tmp_path, ".json") and totals(tmp_path)["ALLOW"] == 1)
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
    code, _, err = run_python(
        reaper,
        """
        from backend.app.testing.gate_metrics import GateMetricStore
        store = GateMetricStore()
        store.bind_to_dir(sys.argv[1], mode="periodic", interval=3600)
        for _ in range(7):
            store.record_decision(True)
        """,
        str(tmp_path),
    )
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


# -- fork ------------------------------------------------------------------------------------


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
    assert is_locked(tmp_path / f"shard-{parent.incarnation}.lock")  # still ours
    assert totals(tmp_path) == {"ALLOW": 3, "DENY": 2}
    assert len(files(tmp_path, ".json")) == 2
    binding.close()


def test_preload_style_fork_after_counts_never_double_counts(
    tmp_path: Path, reaper: Reaper
) -> None:
    """Like gunicorn --preload: the app (and its bound store) exists before the workers fork."""
    code, out, err = run_python(
        reaper,
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
    assert code == 0, err
    assert out.strip() == "{'ALLOW': 6, 'DENY': 0}"
    assert totals(tmp_path) == {"ALLOW": 6, "DENY": 6}
    assert len(files(tmp_path, ".json")) == 4


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


# -- crash points: a real SIGKILL at every step of a save ---------------------------------------


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_a_save_killed_at_any_step_loses_nothing_saved_and_counts_nothing_twice(
    tmp_path: Path, reaper: Reaper, step: str
) -> None:
    proc = reaper.python(
        """
        from backend.app.testing.gate_metrics import GateMetricStore
        store = GateMetricStore()
        for _ in range(3):
            store.record_decision(True)
        assert store.save_to_dir(sys.argv[1])
        store.record_decision(False, ["TIER_FAIL"])
        store.record_decision(False, ["TIER_FAIL"])
        _faults.install_kill_at(sys.argv[2])
        store.save_to_dir(sys.argv[1])
        print("not killed", flush=True)
        """,
        str(tmp_path),
        step,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, out + err
    completed = step in ("save.replaced", "save.done")
    expected = {"ALLOW": 3, "DENY": 2 if completed else 0}
    assert totals(tmp_path) == expected
    orphan_tmp = step in ("save.tmp_written", "save.tmp_synced")
    assert len(files(tmp_path, ".tmp")) == int(orphan_tmp)
    result = aggregate_dir(tmp_path, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=True)
    assert result.snapshot().family("decision_counts") == expected
    assert result.compaction is not None
    assert result.compaction.removed_temp_files == int(orphan_tmp)
    assert sorted(os.listdir(tmp_path)) == ["aggregate.lock", "archive.json"]
    assert totals(tmp_path) == expected


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
