"""Tests of backend.app.testing.audit: the in-memory log and the durable JSON-lines log."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson
import pytest
from filelock import FileLock

from backend.app.testing.audit import InMemoryAuditLog, JsonlAuditLog
from backend.app.testing.release_gate import ReleaseGate
from backend.app.testing.release_policy import ReleasePolicyResult, ReleaseVerdict
from gatemetrics.errors import LockTimeoutError
from tests.processes import Reaper, read_line, run_python, wait_until
from tests.shard_tools import in_forked_child


def entry(**fields: Any) -> Any:
    """An audit-entry-shaped dict (the logs only need it to be JSON)."""
    base: dict[str, Any] = {"ts_ms": 1, "decision": "ALLOW", "audit_detail": "RELEASE_OK"}
    return {**base, **fields}


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` (one we started) if it still runs, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with suppress(OSError):  # closing stdin flushes into a possibly dead pipe
                pipe.close()


def read_lines(path: Path) -> list[bytes]:
    """The file's lines; the file must end with a newline (no torn tail)."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), data[-80:]
    return data[:-1].split(b"\n")


# -- InMemoryAuditLog ------------------------------------------------------------------------


def test_in_memory_log_keeps_what_a_jsonl_reader_would_see() -> None:
    log = InMemoryAuditLog()
    original = entry(reasons=("TIER_FAIL",), override=None)
    log.record(original)
    original["decision"] = "DENY"  # later changes by the caller do not reach the log
    assert log.entries == [entry(reasons=["TIER_FAIL"], override=None)]


def test_in_memory_log_entries_is_a_snapshot() -> None:
    log = InMemoryAuditLog()
    log.record(entry())
    snapshot = log.entries
    snapshot.clear()
    log.record(entry(ts_ms=2))
    assert [e["ts_ms"] for e in log.entries] == [1, 2]


def test_in_memory_log_set_to_fail_raises_eio_and_keeps_nothing() -> None:
    log = InMemoryAuditLog()
    log.failing = True
    with pytest.raises(OSError, match="set to fail") as info:
        log.record(entry())
    assert info.value.errno == errno.EIO
    assert log.entries == []
    log.failing = False
    log.record(entry())
    assert len(log.entries) == 1


@pytest.mark.parametrize("bad", ["\ud800", 2**64, object(), {1, 2}])
def test_logs_refuse_what_json_cannot_hold(bad: object, tmp_path: Path) -> None:
    memory = InMemoryAuditLog()
    with pytest.raises(TypeError):
        memory.record(entry(release_scope=bad))
    assert memory.entries == []
    durable = JsonlAuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(TypeError):
        durable.record(entry(release_scope=bad))
    assert not (tmp_path / "audit.jsonl").exists()  # refused before the file was touched


def test_in_memory_log_is_thread_safe() -> None:
    log = InMemoryAuditLog()
    barrier = threading.Barrier(8)

    def work(writer: int) -> None:
        barrier.wait()
        for seq in range(300):
            log.record(entry(writer=writer, seq=seq))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sorted((e["writer"], e["seq"]) for e in log.entries)
    assert got == [(w, s) for w in range(8) for s in range(300)]


# -- JsonlAuditLog: construction -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((b"/tmp/audit.jsonl",), {}, TypeError),
        ((None,), {}, TypeError),
        (("",), {}, ValueError),
        (("/tmp/dir/",), {}, ValueError),
        (("/tmp/a\0b",), {}, ValueError),
        (("/tmp/a.jsonl",), {"lock_timeout": 0}, ValueError),
        (("/tmp/a.jsonl",), {"lock_timeout": -1}, ValueError),
        (("/tmp/a.jsonl",), {"lock_timeout": float("inf")}, ValueError),
        (("/tmp/a.jsonl",), {"lock_timeout": float("nan")}, ValueError),
        (("/tmp/a.jsonl",), {"lock_timeout": "5"}, TypeError),
        (("/tmp/a.jsonl",), {"lock_timeout": True}, TypeError),
        (("/tmp/a.jsonl",), {"group_commit": 1}, TypeError),
        (("/tmp/a.jsonl",), {"group_commit": "yes"}, TypeError),
    ],
)
def test_jsonl_log_rejects_bad_configuration(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        JsonlAuditLog(*args, **kwargs)


def test_jsonl_log_does_no_io_until_the_first_record(tmp_path: Path) -> None:
    log = JsonlAuditLog(tmp_path / "audit.jsonl")
    assert log.path == str(tmp_path / "audit.jsonl")
    assert repr(log) == f"JsonlAuditLog({str(tmp_path / 'audit.jsonl')!r})"
    assert list(tmp_path.iterdir()) == []


# -- JsonlAuditLog: appending ----------------------------------------------------------------


def test_jsonl_log_appends_one_parseable_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path)
    written = [entry(ts_ms=i, reason="multi\nline\r\ttext \u2028 and \x00") for i in range(5)]
    for e in written:
        log.record(e)
    assert [orjson.loads(line) for line in read_lines(path)] == written
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 & ~umask  # not world-readable
    assert (tmp_path / "audit.jsonl.lock").exists()


def test_jsonl_log_appends_to_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlAuditLog(path).record(entry(ts_ms=1))
    JsonlAuditLog(path).record(entry(ts_ms=2))
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(path)] == [1, 2]


def test_after_a_torn_last_line_the_next_entry_starts_on_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path)
    log.record(entry(ts_ms=1))
    with path.open("ab") as f:
        f.write(b'{"ts_ms": 2, "decision": "AL')  # a writer killed mid-line
    log.record(entry(ts_ms=3))
    log.record(entry(ts_ms=4))
    lines = read_lines(path)
    assert lines[1] == b'{"ts_ms": 2, "decision": "AL'
    assert [orjson.loads(line)["ts_ms"] for i, line in enumerate(lines) if i != 1] == [1, 3, 4]


def test_a_log_that_is_a_torn_line_only_is_repaired_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"{")
    JsonlAuditLog(path).record(entry())
    assert path.read_bytes().split(b"\n")[1:] == [orjson.dumps(entry()), b""]


def test_jsonl_log_is_safe_for_threads(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path)
    barrier = threading.Barrier(6)

    def work(writer: int) -> None:
        barrier.wait()
        for seq in range(60):
            log.record(entry(writer=writer, seq=seq, pad="t" * 3000))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sorted((e["writer"], e["seq"]) for e in map(orjson.loads, read_lines(path)))
    assert got == [(w, s) for w in range(6) for s in range(60)]


# Each writer process records one entry (taking the lock), waits for the go signal, forks
# (the child inherits the log object, lock included), and both halves append COUNT entries of
# PAD bytes each: bigger than PIPE_BUF, so the kernel alone would not keep them whole.
WRITER = r"""
import os, sys
from backend.app.testing.audit import JsonlAuditLog
path, name, count, pad = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
log = JsonlAuditLog(path, lock_timeout=60, group_commit=sys.argv[5] == "group")
def entry(writer, seq):
    return {"writer": writer, "seq": seq, "pid": os.getpid(), "pad": "x" * (pad + seq % 7)}
log.record(entry(name + "/pre-fork", 0))
print("ready", flush=True)
sys.stdin.readline()
child = os.fork()
who = name + ("/child" if child == 0 else "/parent")
try:
    for seq in range(count):
        log.record(entry(who, seq))
except BaseException:
    if child == 0:
        os._exit(1)
    raise
if child == 0:
    os._exit(0)
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("mode", ["group", "alone"])
def test_processes_writing_at_once_lose_and_interleave_no_line(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "audit.jsonl"
    count, pad, writers = 120, 5000, 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"w{i}", str(count), str(pad), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(writers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline() == "ready\n"
        for p in procs:  # all start appending at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        for p in procs:
            assert p.wait(timeout=90) == 0
    finally:
        for p in procs:
            stop(p)
    entries = [orjson.loads(line) for line in read_lines(path)]
    assert len(entries) == writers * (1 + 2 * count)
    seen: dict[str, list[int]] = {}
    for e in entries:
        assert e["pad"] == "x" * (pad + e["seq"] % 7)
        seen.setdefault(e["writer"], []).append(e["seq"])
    for i in range(writers):
        assert seen.pop(f"w{i}/pre-fork") == [0]
        assert seen.pop(f"w{i}/parent") == list(range(count))  # each writer's order is kept
        assert seen.pop(f"w{i}/child") == list(range(count))
    assert seen == {}
    assert len({e["pid"] for e in entries}) == 2 * writers


# -- JsonlAuditLog: failures -----------------------------------------------------------------


def test_a_removed_directory_fails_the_write_and_is_not_recreated(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    log = JsonlAuditLog(directory / "audit.jsonl")
    log.record(entry())
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    with pytest.raises(FileNotFoundError):
        log.record(entry())
    assert not directory.exists()  # neither the log nor its lock recreated it


def test_a_full_disk_fails_the_write_with_enospc_and_releases_the_lock(tmp_path: Path) -> None:
    # /dev/full is a real device whose every write fails with ENOSPC.
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")
    log = JsonlAuditLog(path, lock_timeout=0.5, follow_symlinks=True)  # a link we chose
    with pytest.raises(OSError, match="No space left") as info:
        log.record(entry())
    assert info.value.errno == errno.ENOSPC
    path.unlink()  # space again: the next record must get the lock at once
    log.record(entry())
    assert [orjson.loads(line) for line in read_lines(path)] == [entry()]


def test_a_directory_in_place_of_the_log_fails_the_write(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").mkdir()
    with pytest.raises(IsADirectoryError):
        JsonlAuditLog(tmp_path / "audit.jsonl").record(entry())


READ_ONLY = r"""
import errno, sys
from backend.app.testing.audit import JsonlAuditLog
try:
    JsonlAuditLog(sys.argv[1]).record({"ts_ms": 1})
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("written")
"""


def test_a_read_only_log_file_fails_the_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlAuditLog(path).record(entry())
    before = path.read_bytes()
    path.chmod(0o444)
    done = run_python(READ_ONLY, str(path), honour_file_modes=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "EACCES\n"
    assert path.read_bytes() == before


PARTIAL = r"""
import errno, os, resource, signal, sys
from backend.app.testing.audit import JsonlAuditLog
path = sys.argv[1]
# Room for 100 more bytes: the kernel writes part of the line, then refuses with EFBIG, as a
# disk filling up mid-write would with ENOSPC.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 100, hard))
try:
    JsonlAuditLog(path).record({"pad": "y" * 1000})
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("written")
"""


def test_a_partly_written_line_is_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlAuditLog(path).record(entry())
    before = path.read_bytes()
    done = run_python(PARTIAL, str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "EFBIG\n"
    assert path.read_bytes() == before  # no half line, no entry for a decision then denied
    JsonlAuditLog(path).record(entry(ts_ms=2))
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(path)] == [1, 2]


HOLDER = r"""
import sys
from filelock import FileLock
lock = FileLock(sys.argv[1], fallback_to_soft=False)
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
"""


def test_a_lock_held_by_another_process_times_out_then_frees(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, f"{path}.lock"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"
        log = JsonlAuditLog(path, lock_timeout=0.2)
        with pytest.raises(LockTimeoutError) as info:
            log.record(entry())
        assert isinstance(info.value, TimeoutError)
        assert info.value.path == f"{path}.lock"
        assert path.read_bytes() == b""
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    finally:
        stop(holder)
    log.record(entry())
    assert len(read_lines(path)) == 1


def test_threads_queued_behind_a_stuck_lock_time_out_too(tmp_path: Path) -> None:
    # Another FileLock object in this process excludes the log like another process would.
    path = tmp_path / "audit.jsonl"
    holder = FileLock(f"{path}.lock", fallback_to_soft=False)
    log = JsonlAuditLog(path, lock_timeout=0.2)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            log.record(entry())
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    with holder:
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(errors) == 3
    assert all(isinstance(e, LockTimeoutError) for e in errors)
    assert path.read_bytes() == b""


def test_the_log_is_locked_through_its_own_descriptor_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=0.2)
    log.record(entry(ts_ms=1))
    os.unlink(f"{path}.lock")  # lost to a cleanup: exclusion still rests on the log itself
    holder = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another writer, on the log's own flock
        with pytest.raises(LockTimeoutError) as info:
            log.record(entry(ts_ms=2))
        assert info.value.path == str(path)
    finally:
        os.close(holder)
    log.record(entry(ts_ms=3))
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(path)] == [1, 3]
    assert (tmp_path / "audit.jsonl.lock").exists()  # recreated: earlier versions still use it


# -- JsonlAuditLog: group commit -------------------------------------------------------------
#
# Some tests below wrap os.fsync (and os.write) with monkeypatch. The wrappers still call the
# real function unless a test says otherwise; they exist to count calls, to hold a sync open
# until other callers have queued behind it, or to make one fail: a real fsync cannot be made
# to block or fail on demand on this machine's file systems.


def queued(log: JsonlAuditLog) -> int:
    """How many callers wait for the next batch of ``log`` in this process (private state)."""
    return len(log._state.pending)


def start_record(
    log: JsonlAuditLog, e: Any, outcomes: dict[int, BaseException | None], key: int
) -> threading.Thread:
    """Record ``e`` on a new thread; ``outcomes[key]`` becomes None or the exception raised."""

    def run() -> None:
        try:
            log.record(e)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            outcomes[key] = exc
        else:
            outcomes[key] = None

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def first_sync_waits_for(
    log: JsonlAuditLog, followers: int, then: Callable[[int, int], None] | None = None
) -> tuple[Callable[[int], None], threading.Event, list[int]]:
    """An os.fsync wrapper whose first call waits until ``followers`` callers queued behind it.

    Later calls run ``then(call_number, fd)`` if given (which may block or raise), else the
    real fsync. Returns the wrapper, an event set when the first call starts, and the list of
    fds synced so far.
    """
    real_fsync = os.fsync
    entered = threading.Event()
    calls: list[int] = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            entered.set()
            wait_until(lambda: queued(log) == followers, timeout=30, interval=0.001)
        elif then is not None:
            then(len(calls), fd)
            return
        real_fsync(fd)

    return fsync, entered, calls


def line_offsets(path: Path) -> dict[int, dict[str, Any]]:
    """Every line of the log by the byte offset where it starts."""
    data = path.read_bytes()
    offsets: dict[int, dict[str, Any]] = {}
    position = 0
    for line in data.splitlines(keepends=True):
        offsets[position] = orjson.loads(line)
        position += len(line)
    return offsets


def test_callers_queued_behind_a_sync_share_one_write_and_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=30)
    followers = 6
    fsync, in_first_sync, syncs = first_sync_waits_for(log, followers)
    real_write = os.write
    writes: list[bytes] = []

    def write(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    outcomes: dict[int, BaseException | None] = {}
    threads = [start_record(log, entry(writer=0), outcomes, 0)]
    assert in_first_sync.wait(30)
    threads += [start_record(log, entry(writer=w), outcomes, w) for w in range(1, followers + 1)]
    for t in threads:
        t.join(timeout=60)
    assert outcomes == dict.fromkeys(range(followers + 1))  # every record returned
    assert len(syncs) == 2  # the first caller's, then one for the six queued behind it
    assert len(writes) == 2
    assert writes[0] == orjson.dumps(entry(writer=0)) + b"\n"
    assert writes[1].count(b"\n") == followers  # their lines in one write
    got = sorted(orjson.loads(line)["writer"] for line in read_lines(path))
    assert got == list(range(followers + 1))


@pytest.mark.parametrize("group_commit", [True, False])
def test_many_threads_share_fsyncs_and_every_line_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_commit: bool
) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=60, group_commit=group_commit)
    real_fsync = os.fsync
    syncs: list[int] = []

    def counting_fsync(fd: int) -> None:
        syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    writers, count = 8, 40
    barrier = threading.Barrier(writers)
    returned: list[int] = []

    def work(writer: int) -> None:
        barrier.wait()
        for seq in range(count):
            log.record(entry(writer=writer, seq=seq, pad="g" * 500))
        returned.append(writer)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sorted(returned) == list(range(writers))
    got = sorted((e["writer"], e["seq"]) for e in map(orjson.loads, read_lines(path)))
    assert got == [(w, s) for w in range(writers) for s in range(count)]
    if group_commit:
        assert len(syncs) <= writers * count // 2, len(syncs)  # shared: far fewer than records
    else:
        assert len(syncs) == writers * count  # one per record


THREADED_WRITER = r"""
import os, sys, threading
from backend.app.testing.audit import JsonlAuditLog
path, name, threads, count, pad = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
log = JsonlAuditLog(path, lock_timeout=60)
print("ready", flush=True)
sys.stdin.readline()
failed = []
def work(thread):
    try:
        for seq in range(count):
            log.record({"writer": f"{name}/{thread}", "seq": seq, "pad": "z" * (pad + seq % 5)})
    except BaseException as exc:
        failed.append(repr(exc))
workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(failed or "done", flush=True)
sys.exit(1 if failed else 0)
"""


def test_processes_with_many_threads_group_commit_every_line(
    tmp_path: Path, reaper: Reaper
) -> None:
    path = tmp_path / "audit.jsonl"
    procs, threads, count, pad = 3, 4, 60, 5000  # lines bigger than PIPE_BUF
    children = [
        reaper.python(
            THREADED_WRITER, str(path), f"p{i}", str(threads), str(count), str(pad), stdin=True
        )
        for i in range(procs)
    ]
    for child in children:
        assert read_line(child) == "ready"
    for child in children:  # all start appending at once
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        assert read_line(child, timeout=90) == "done"
        assert child.wait(timeout=30) == 0
    entries = [orjson.loads(line) for line in read_lines(path)]
    assert len(entries) == procs * threads * count
    seen: dict[str, list[int]] = {}
    for e in entries:
        assert e["pad"] == "z" * (pad + e["seq"] % 5)
        seen.setdefault(e["writer"], []).append(e["seq"])
    expected = {f"p{p}/{t}" for p in range(procs) for t in range(threads)}
    assert set(seen) == expected
    assert all(seqs == list(range(count)) for seqs in seen.values())  # each thread's order kept


ENDLESS_WRITER = r"""
import threading
from backend.app.testing.audit import JsonlAuditLog
log = JsonlAuditLog(sys.argv[1], lock_timeout=60)
log.record({"writer": "first", "pad": ""})
print("writing", flush=True)
def work(thread):
    seq = 0
    while True:
        log.record({"writer": thread, "seq": seq, "pad": "k" * 300_000})
        seq += 1
workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(3)]
for w in workers:
    w.start()
for w in workers:
    w.join()
"""


def test_a_writer_killed_mid_run_leaves_at_most_one_torn_line(
    tmp_path: Path, reaper: Reaper
) -> None:
    path = tmp_path / "audit.jsonl"
    writer = reaper.python(ENDLESS_WRITER, str(path))
    assert read_line(writer) == "writing"
    wait_until(lambda: path.stat().st_size > 8_000_000, timeout=60)
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    *complete, tail = path.read_bytes().split(b"\n")
    assert len(complete) > 1
    assert all(orjson.loads(line) for line in complete)  # every finished line parses
    JsonlAuditLog(path).record(entry(ts_ms=99))
    # At most one torn line, the one the kill cut (if it cut one), and the next append on a
    # fresh line of its own.
    torn = [tail] if tail else []
    assert read_lines(path) == [*complete, *torn, orjson.dumps(entry(ts_ms=99))]


PARTIAL_BATCH = r"""
import errno, json, os, resource, signal, sys, threading, time
from backend.app.testing.audit import JsonlAuditLog
path, queued = sys.argv[1], int(sys.argv[2])
log = JsonlAuditLog(path, lock_timeout=30)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death past RLIMIT_FSIZE
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
real_fsync = os.fsync
in_first_sync = threading.Event()
syncs = []
def fsync(fd):
    # Wrapped to hold the first caller's sync until the others queued behind it, then to leave
    # room for 100 bytes only: the queued batch is written in part, then refused with EFBIG,
    # as a disk filling up mid-write would with ENOSPC.
    syncs.append(fd)
    if len(syncs) == 1:
        in_first_sync.set()
        deadline = time.monotonic() + 30
        while len(log._state.pending) < queued:
            if time.monotonic() > deadline:
                raise TimeoutError("the batch never formed")
            time.sleep(0.001)
        real_fsync(fd)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.fstat(fd).st_size + 100, hard))
        return
    real_fsync(fd)
os.fsync = fsync
outcomes = {}
def record(writer):
    try:
        log.record({"writer": writer, "pad": "y" * 1000})
    except OSError as exc:
        outcomes[writer] = errno.errorcode[exc.errno]
    else:
        outcomes[writer] = "written"
threads = [threading.Thread(target=record, args=(0,))]
threads[0].start()
in_first_sync.wait(30)
threads += [threading.Thread(target=record, args=(w,)) for w in range(1, queued + 1)]
for t in threads[1:]:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"outcomes": outcomes, "syncs": len(syncs)}, sort_keys=True))
"""


def test_a_partly_written_batch_rolls_back_only_itself_and_fails_every_caller(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlAuditLog(path).record(entry())  # another process's line, before the batch
    before = path.read_bytes()
    done = run_python(PARTIAL_BATCH, str(path), "4")
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)
    # The first caller's line went alone and was synced; the four queued behind it shared a
    # batch that the file size limit cut part-way: each of them got the error.
    assert result == {
        "outcomes": {"0": "written", "1": "EFBIG", "2": "EFBIG", "3": "EFBIG", "4": "EFBIG"},
        "syncs": 1,
    }
    first = orjson.dumps({"writer": 0, "pad": "y" * 1000}) + b"\n"
    assert path.read_bytes() == before + first  # truncated to where the batch started
    JsonlAuditLog(path).record(entry(ts_ms=2))
    assert [orjson.loads(line).get("writer") for line in read_lines(path)] == [None, 0, None]


def test_a_failed_fsync_fails_every_caller_of_the_batch_and_marks_its_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=30)
    log.record(entry(writer="before"))
    followers = 4
    real_fsync = os.fsync

    def second_sync_fails(call: int, fd: int) -> None:
        if call == 2:  # the batch of the four queued callers
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)  # the marker's own sync

    fsync, in_first_sync, _ = first_sync_waits_for(log, followers, then=second_sync_fails)
    monkeypatch.setattr(os, "fsync", fsync)
    outcomes: dict[int, BaseException | None] = {}
    threads = [start_record(log, entry(writer=0), outcomes, 0)]
    assert in_first_sync.wait(30)
    threads += [start_record(log, entry(writer=w), outcomes, w) for w in range(1, followers + 1)]
    for t in threads:
        t.join(timeout=60)
    assert outcomes[0] is None
    failures = [outcomes[w] for w in range(1, followers + 1)]
    assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in failures), failures
    assert len({id(e) for e in failures}) == followers  # each thread raised its own exception

    # The rule: the lines stay (others may have appended after them), followed by a marker
    # that lists where each of them starts.
    by_offset = line_offsets(path)
    *_, (_, marker) = by_offset.items()
    assert set(marker) == {"event", "audit_error", "entries", "offsets", "pid", "host", "logged_at"}
    assert marker["event"] == "AUDIT_SYNC_FAILED"
    assert marker["audit_error"] == "EIO"  # the token the gate reports for these decisions
    assert marker["entries"] == followers
    assert marker["pid"] == os.getpid()
    assert "decision" not in marker  # readers selecting on decision skip it
    unconfirmed = {by_offset[offset]["writer"] for offset in marker["offsets"]}
    assert unconfirmed == set(range(1, followers + 1))
    *confirmed, _ = (e for at, e in by_offset.items() if at not in marker["offsets"])
    assert [e["writer"] for e in confirmed] == ["before", 0]
    log.record(entry(writer="after"))  # the log goes on
    assert list(line_offsets(path).values())[-1]["writer"] == "after"


def test_without_group_commit_a_failed_fsync_still_takes_its_line_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One record at a time holds the lock across its fsync, so nobody appended after its line.
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, group_commit=False)
    log.record(entry(ts_ms=1))
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:  # a real fsync cannot be made to fail here
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output") as info:
        log.record(entry(ts_ms=2))
    assert info.value.errno == errno.EIO
    assert path.read_bytes() == before  # no line, no marker


def test_followers_that_give_up_after_their_line_was_written_are_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=1.0)
    followers = 4
    outcomes: dict[int, BaseException | None] = {}
    real_fsync = os.fsync

    def slow_second_sync(call: int, fd: int) -> None:
        if call == 2:
            # A disk that takes longer than lock_timeout to sync the batch: the leader of the
            # batch waits (a sync cannot be bounded), its three followers give up meanwhile.
            wait_until(
                lambda: sum(e is not None for e in outcomes.values()) == followers - 1,
                timeout=30,
                interval=0.005,
            )
        real_fsync(fd)

    fsync, in_first_sync, _ = first_sync_waits_for(log, followers, then=slow_second_sync)
    monkeypatch.setattr(os, "fsync", fsync)
    threads = [start_record(log, entry(writer=0), outcomes, 0)]
    assert in_first_sync.wait(30)
    threads += [start_record(log, entry(writer=w), outcomes, w) for w in range(1, followers + 1)]
    for t in threads:
        t.join(timeout=60)
    gave_up = {w for w, e in outcomes.items() if e is not None}
    assert all(isinstance(outcomes[w], LockTimeoutError) for w in gave_up)
    assert len(gave_up) == followers - 1
    assert outcomes[0] is None  # the first caller, and the leader of the batch, returned
    *entries, marker = line_offsets(path).items()
    assert len(entries) == 1 + followers  # every line of the batch was written
    _, fields = marker
    assert fields["event"] == "AUDIT_SYNC_FAILED"
    assert fields["audit_error"] == "LockTimeoutError"
    assert fields["entries"] == followers - 1
    by_offset = dict(entries)
    assert {by_offset[offset]["writer"] for offset in fields["offsets"]} == gave_up


def test_a_caller_still_queued_at_its_deadline_leaves_no_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=0.3)
    real_fsync = os.fsync
    in_sync = threading.Event()
    outcomes: dict[int, BaseException | None] = {}

    def sync_until_the_follower_gave_up(fd: int) -> None:
        if not in_sync.is_set():
            in_sync.set()
            wait_until(lambda: 1 in outcomes, timeout=30, interval=0.005)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", sync_until_the_follower_gave_up)
    first = start_record(log, entry(writer=0), outcomes, 0)
    assert in_sync.wait(30)
    follower = start_record(log, entry(writer=1), outcomes, 1)
    follower.join(timeout=30)
    first.join(timeout=30)
    assert isinstance(outcomes[1], LockTimeoutError)
    assert outcomes[0] is None
    assert [orjson.loads(line) for line in read_lines(path)] == [entry(writer=0)]  # no marker
    log.record(entry(writer=2))  # the queue is not left stuck
    assert len(read_lines(path)) == 2


class Interrupted(Exception):
    """Raised by a signal handler in the main thread, as KeyboardInterrupt would be."""


def test_a_caller_interrupted_while_queued_leaves_the_queue_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the interrupted caller left in the queue, it would be handed the turn to lead the
    # next batch and, being gone, stall every later record of the process.
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=5)
    real_fsync = os.fsync
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    interrupted = threading.Event()

    def fsync(fd: int) -> None:  # holds the first caller's sync while the main thread queues
        if not interrupted.is_set():
            wait_until(lambda: queued(log) == 1, timeout=30, interval=0.001)
            assert main is not None
            signal.pthread_kill(main, signal.SIGUSR1)
            wait_until(interrupted.is_set, timeout=30, interval=0.001)
        real_fsync(fd)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    monkeypatch.setattr(os, "fsync", fsync)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    outcomes: dict[int, BaseException | None] = {}
    try:
        first = start_record(log, entry(writer=0), outcomes, 0)
        with pytest.raises(Interrupted):
            log.record(entry(writer=1))
        interrupted.set()
        first.join(timeout=30)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert outcomes == {0: None}
    log.record(entry(writer=2))  # at once: nobody stale holds the turn
    assert [orjson.loads(line)["writer"] for line in read_lines(path)] == [0, 2]


def test_a_forked_child_records_with_fresh_state(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=5)
    log.record(entry(ts_ms=1))

    def child() -> bool:
        log.record(entry(ts_ms=2))
        return True

    assert in_forked_child(child)
    log.record(entry(ts_ms=3))
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(path)] == [1, 2, 3]


def test_state_left_by_a_fork_the_hook_did_not_see_is_replaced(tmp_path: Path) -> None:
    # A fork outside Python's os.fork (no at-fork hook ran): the child finds its parent's state,
    # here a batch "in progress" whose leader does not exist in this process.
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=0.5)
    inherited = log._state
    inherited.busy = True
    inherited.pid = -1
    log.record(entry())  # would queue behind the absent leader and time out
    assert log._state is not inherited
    assert [orjson.loads(line) for line in read_lines(path)] == [entry()]


FORK_DURING_BATCH = r"""
import os, sys, threading
from backend.app.testing.audit import JsonlAuditLog
log = JsonlAuditLog(sys.argv[1], lock_timeout=5)
real_fsync = os.fsync
syncing, release = threading.Event(), threading.Event()
def fsync(fd):
    # Wrapped to hold the parent's batch in its sync while the main thread forks.
    if not syncing.is_set():
        syncing.set()
        release.wait(30)
    real_fsync(fd)
os.fsync = fsync
leader = threading.Thread(target=log.record, args=({"who": "parent"},))
leader.start()
syncing.wait(30)
pid = os.fork()
if pid == 0:
    # The parent's leader does not exist here: queueing behind it would time out.
    try:
        log.record({"who": "child"})
    except BaseException as exc:
        print("child failed:", repr(exc), flush=True)
        os._exit(1)
    os._exit(0)
_, status = os.waitpid(pid, 0)
release.set()
leader.join()
print(os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_its_parent_leads_a_batch_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    done = run_python(FORK_DURING_BATCH, str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n", done.stdout
    assert sorted(orjson.loads(line)["who"] for line in read_lines(path)) == ["child", "parent"]


FORK_WHILE_LOCKED = r"""
import threading
from backend.app.testing.audit import JsonlAuditLog
log = JsonlAuditLog(sys.argv[1], lock_timeout=60)
real_write = os.write
writing, never = threading.Event(), threading.Event()
def write(fd, data):
    # Wrapped to stop the parent's append inside the lock, where the main thread forks.
    writing.set()
    never.wait()
    return real_write(fd, data)
os.write = write
threading.Thread(target=log.record, args=({"who": "parent"},), daemon=True).start()
writing.wait(30)
child = os.fork()
if child == 0:
    open(sys.argv[2], "x").close()  # past the fork and its at-fork hooks
    sys.stdin.readline()  # lives until the test closes its stdin
    os._exit(0)
print(f"forked {child}", flush=True)
sys.stdin.readline()
"""


def test_a_child_forked_during_an_append_does_not_keep_the_lock_of_a_killed_parent(
    tmp_path: Path, reaper: Reaper
) -> None:
    # Without closing its copies of the parent's locked descriptors, the child would hold the
    # lock for its whole life once the parent died holding it.
    path = tmp_path / "audit.jsonl"
    child_ready = tmp_path / "child-ready"
    parent = reaper.python(FORK_WHILE_LOCKED, str(path), str(child_ready), stdin=True)
    forked, child = read_line(parent).split()
    assert forked == "forked"
    child_pid = int(child)
    try:
        wait_until(child_ready.exists, timeout=30)
        os.kill(parent.pid, signal.SIGKILL)  # dies holding the lock
        assert parent.wait(timeout=30) == -signal.SIGKILL
        JsonlAuditLog(path, lock_timeout=2).record(entry())  # the child does not hold it
        assert [orjson.loads(line) for line in read_lines(path)] == [entry()]
    finally:
        assert parent.stdin is not None
        parent.stdin.close()  # the child reads EOF and exits
        with suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)


# -- JsonlAuditLog: a directory another user may write ---------------------------------------
#
# The log's directory may be writable by a user other than the gate's. When the suite runs as
# root (CI does), that user is nobody (65534) in a child process, so that privileges matter: a
# root gate that followed a planted link would create a file where nobody cannot.

ATTACKER_UID = 65534 if os.geteuid() == 0 else None

PLANT_AT = r"""
import socket
directory, name, kind, target = sys.argv[1:5]
os.chdir(directory)
if kind == "symlink":
    os.symlink(target, name)
elif kind == "loop":
    os.symlink(name + ".other", name)
    os.symlink(name, name + ".other")
elif kind == "fifo":
    os.mkfifo(name)
elif kind == "directory":
    os.mkdir(name)
elif kind == "socket":
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(name)
    sock.close()
else:
    raise SystemExit(f"unknown kind {kind}")
print("planted", flush=True)
"""


class Attack:
    """``logs``: a directory the attacker may write; ``outside``: one only we may write."""

    def __init__(self, reaper: Reaper, base: Path) -> None:
        self.reaper = reaper
        self.logs = base / "logs"
        self.outside = base / "outside"
        self.logs.mkdir(mode=0o755)
        self.outside.mkdir(mode=0o755)
        if ATTACKER_UID is not None:
            os.chown(self.logs, ATTACKER_UID, ATTACKER_UID)

    def plant(self, name: str, kind: str, target: str | Path = "") -> None:
        proc = self.reaper.python(
            PLANT_AT, str(self.logs), name, kind, str(target), user=ATTACKER_UID
        )
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == "planted\n"


@pytest.fixture
def attack(reaper: Reaper) -> Iterator[Attack]:
    # Under /tmp, not tmp_path: pytest's base directory is 0700, so nobody could not reach it.
    base = Path(tempfile.mkdtemp(prefix="audit-attack-"))
    base.chmod(0o755)
    try:
        yield Attack(reaper, base)
    finally:
        reaper.kill_all()
        shutil.rmtree(base, ignore_errors=True)


def lstat_kind(path: Path) -> str:
    mode = path.lstat().st_mode
    for kind, test in (
        ("symlink", stat.S_ISLNK),
        ("fifo", stat.S_ISFIFO),
        ("directory", stat.S_ISDIR),
        ("socket", stat.S_ISSOCK),
    ):
        if test(mode):
            return kind
    return "other"


def check_once(log: JsonlAuditLog, now_ms: int) -> Any:
    return ReleaseGate(log).check(ReleasePolicyResult(ReleaseVerdict.RELEASE_OK, []), now_ms=now_ms)


@pytest.mark.parametrize("kind", ["symlink", "dangling", "fifo", "directory", "socket", "loop"])
def test_an_entry_planted_at_the_lock_path_is_never_followed_and_stops_no_decision(
    attack: Attack, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = attack.logs / "audit.jsonl"
    target = attack.outside / "created-through-the-link"
    lock = attack.logs / "audit.jsonl.lock"
    if kind == "symlink":
        (attack.outside / "a-file").write_bytes(b"keep\n")
        attack.plant(lock.name, "symlink", attack.outside / "a-file")
    else:
        attack.plant(lock.name, "symlink" if kind == "dangling" else kind, target)
    log = JsonlAuditLog(path, lock_timeout=5)
    with caplog.at_level(logging.WARNING, logger="backend.app.testing.audit"):
        decisions = [check_once(log, now_ms=n) for n in range(1, 4)]
    assert [d.allowed for d in decisions] == [True, True, True]
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(path)] == [1, 2, 3]
    assert not target.exists()
    if kind == "symlink":
        assert (attack.outside / "a-file").read_bytes() == b"keep\n"
    assert sorted(p.name for p in attack.outside.iterdir()) == (
        ["a-file"] if kind == "symlink" else []
    )
    expected = {"dangling": "symlink", "loop": "symlink"}.get(kind, kind)
    assert lstat_kind(lock) == expected  # left as it was: neither followed, removed nor replaced
    warnings = [r for r in caplog.records if r.name == "backend.app.testing.audit"]
    assert len(warnings) == 1  # rate-limited: three checks, one line
    assert str(lock) in warnings[0].getMessage()


def test_a_symlink_planted_at_the_log_path_is_refused_and_the_check_denied(
    attack: Attack,
) -> None:
    path = attack.logs / "audit.jsonl"
    target = attack.outside / "stolen.jsonl"
    attack.plant(path.name, "symlink", target)
    decision = check_once(JsonlAuditLog(path), now_ms=1)
    assert decision.allowed is False  # fail closed
    assert decision.audit_detail.startswith("AUDIT_WRITE_FAILED audit_error=ELOOP ")
    assert not target.exists()
    assert list(attack.outside.iterdir()) == []


def test_a_symlink_at_the_log_path_is_followed_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.jsonl"
    path = tmp_path / "audit.jsonl"
    path.symlink_to(target)
    with pytest.raises(OSError, match="follow_symlinks=True") as info:
        JsonlAuditLog(path).record(entry())
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError, match="symbolic link"):
        JsonlAuditLog(path).probe()
    log = JsonlAuditLog(path, follow_symlinks=True)
    assert log.follow_symlinks is True
    log.probe()
    log.record(entry(ts_ms=2))
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(target)] == [2]
    assert path.is_symlink()


def test_a_fifo_or_a_hard_link_at_the_log_path_is_refused_without_hanging(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file") as info:
        JsonlAuditLog(fifo, lock_timeout=1).record(entry())
    assert info.value.errno == errno.EINVAL
    other = tmp_path / "someone-elses-file"
    other.write_bytes(b"precious\n")
    linked = tmp_path / "linked.jsonl"
    os.link(other, linked)
    with pytest.raises(OSError, match="2 hard links") as info:
        JsonlAuditLog(linked).record(entry())
    assert info.value.errno == errno.EMLINK
    assert other.read_bytes() == b"precious\n"


def open_inodes() -> set[int]:
    """Inodes this process holds open (through any thread)."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            inodes.add(os.stat(f"/proc/self/fd/{name}").st_ino)
    return inodes


LOG_HOLDER = r"""
import fcntl
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_log_replaced_between_open_and_lock_gets_the_line_in_the_new_file(
    tmp_path: Path, reaper: Reaper
) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, lock_timeout=30)
    log.record(entry(ts_ms=1))
    old_inode = path.stat().st_ino
    holder = reaper.python(LOG_HOLDER, str(path), stdin=True)
    assert read_line(holder) == "locked"
    outcome: dict[str, BaseException | None] = {}
    thread = threading.Thread(target=lambda: outcome.update(e=record_or_error(log, 2)))
    thread.start()
    try:
        # The record opened the old file and waits for its lock; meanwhile it is rotated.
        wait_until(lambda: old_inode in open_inodes(), timeout=30)
        os.rename(path, tmp_path / "audit.jsonl.1")
        path.write_bytes(b"")
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
    finally:
        thread.join(timeout=60)
    assert outcome == {"e": None}
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(tmp_path / "audit.jsonl.1")] == [1]
    assert [orjson.loads(line)["ts_ms"] for line in read_lines(path)] == [2]


def record_or_error(log: JsonlAuditLog, ts_ms: int) -> BaseException | None:
    try:
        log.record(entry(ts_ms=ts_ms))
    except BaseException as exc:  # noqa: BLE001 - returned for the assertion
        return exc
    return None


# Appends ``count`` records (two threads); prints the id of each one that returned, then "end".
# With "fail", the file size limit leaves room for part of every entry only: each record is a
# real partial write, then EFBIG, as a disk filling up mid-write would give ENOSPC.
LOCK_LOSING_WORKER = r"""
import errno, resource, threading
from backend.app.testing.audit import JsonlAuditLog
path, name, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = JsonlAuditLog(path, lock_timeout=60)
out = threading.Lock()
if mode == "fail":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
pad = 6000 if mode == "fail" else 300
def work(thread):
    for seq in range(count):
        rid = f"{name}-{thread}-{seq}"
        if mode == "fail":
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 3000, hard))
        try:
            log.record({"id": rid, "decision": "ALLOW", "pad": "p" * pad})
        except OSError as exc:
            with out:
                print("failed", errno.errorcode[exc.errno], flush=True)
        else:
            with out:
                print("ok", rid, flush=True)
threads = [threading.Thread(target=work, args=(t,)) for t in range(1 if mode == "fail" else 2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("end", flush=True)
"""

# Deletes and recreates <path>.lock as fast as it can until the stop file appears (a rotation
# glob or a stray rm); prints how many times it did.
LOCK_REMOVER = r"""
lock, stop = sys.argv[1], sys.argv[2]
removed = 0
while not os.path.exists(stop):
    try:
        os.unlink(lock)
        removed += 1
    except FileNotFoundError:
        pass
    os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
print(removed, flush=True)
"""


def collect(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[-1] == "end"
    return lines[:-1]


def test_appends_keep_excluding_each_other_while_the_lock_file_is_removed(
    tmp_path: Path, reaper: Reaper
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    stop_file = tmp_path / "stop"
    remover = reaper.python(LOCK_REMOVER, f"{path}.lock", str(stop_file))
    wait_until(lambda: Path(f"{path}.lock").exists())
    workers = [reaper.python(LOCK_LOSING_WORKER, str(path), f"w{i}", "150", "ok") for i in range(4)]
    failing = reaper.python(LOCK_LOSING_WORKER, str(path), "full", "60", "fail")
    returned = [line.split()[1] for w in workers for line in collect(w)]
    failures = collect(failing)
    stop_file.touch()
    out, err = remover.communicate(timeout=30)
    assert remover.returncode == 0, err
    assert int(out) > 10  # the lock file really went away again and again meanwhile
    assert len(returned) == 4 * 2 * 150
    assert failures == ["failed EFBIG"] * 60  # every partial write was denied to its caller
    written = [line for line in read_lines(path) if line.strip()]
    ids = [orjson.loads(line)["id"] for line in written]  # no line is corrupt
    assert sorted(ids) == sorted(returned)  # each returned record once, nothing else


# An earlier version (or a shell's >>) whose lock is not ours: it appends ``count`` complete,
# fsynced lines without taking the log's lock, each time the other process says "go".
IGNORES_THE_LOCK = r"""
count = int(sys.argv[2])
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
print("ready", flush=True)
while sys.stdin.readline() == "go\n":
    for i in range(count):
        os.write(fd, b'{"id":"other-%d","decision":"ALLOW"}\n' % time.time_ns())
    os.fsync(fd)
    print("done", flush=True)
"""

# A record that the file size limit cuts part-way. The other writer's lines land between the
# moment this append read the file's size and its write: os.pread is wrapped to let it (the
# append reads the last byte there, to repair a torn line); the partial write itself is real.
CUT_BY_THE_LIMIT = r"""
import errno, resource, subprocess
from backend.app.testing.audit import JsonlAuditLog
from backend.app.testing.release_gate import ReleaseGate
from backend.app.testing.release_policy import ReleasePolicyResult, ReleaseVerdict
path = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
real_pread = os.pread
def pread(fd, n, offset):
    print("at start", flush=True)
    assert sys.stdin.readline() == "appended\n"
    return real_pread(fd, n, offset)
os.pread = pread
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 3000, hard))
gate = ReleaseGate(JsonlAuditLog(path, lock_timeout=30))
decision = gate.check(ReleasePolicyResult(ReleaseVerdict.RELEASE_OK, []), release_scope="p" * 6000)
print(decision.allowed, decision.audit_detail.split()[1], flush=True)
"""


@pytest.mark.parametrize("group_commit", [True, False])
def test_a_partial_write_never_removes_lines_another_writer_appended_after_it_started(
    tmp_path: Path, reaper: Reaper, group_commit: bool
) -> None:
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path, group_commit=group_commit)
    log.record(entry(id="before"))
    other = reaper.python(IGNORES_THE_LOCK, str(path), "10", stdin=True)
    assert read_line(other) == "ready"
    cut = reaper.python(
        CUT_BY_THE_LIMIT.replace(
            "lock_timeout=30", f"lock_timeout=30, group_commit={group_commit}"
        ),
        str(path),
        stdin=True,
    )
    assert other.stdin is not None
    assert cut.stdin is not None
    assert read_line(cut) == "at start"
    other.stdin.write("go\n")
    other.stdin.flush()
    assert read_line(other) == "done"  # ten complete, fsynced lines after the cut one's start
    cut.stdin.write("appended\n")
    cut.stdin.flush()
    assert read_line(cut) == "False audit_error=EFBIG"  # the caller was denied
    log.record(entry(id="after"))
    lines = read_lines(path)
    entries = [orjson.loads(line) for line in lines if line.strip()]  # none is corrupt
    ids = [e["id"] for e in entries]
    assert ids[0] == "before"
    assert ids[-1] == "after"
    assert len([i for i in ids if i.startswith("other-")]) == 10  # every one of them survived
    assert len(ids) == 12  # and nothing of the denied check
    assert not any(b"ppp" in line for line in lines)
    jq = shutil.which("jq")
    if jq is not None:  # the runbook's reader copes with the blanked lines
        done = subprocess.run(
            [jq, "-c", 'select(.decision == "ALLOW") | .id', str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == 12


def test_the_audit_log_takes_its_flocks_through_the_engines_public_helper() -> None:
    # One non-blocking attempt and one classification of contention for the whole tree: the
    # audit log uses the engine's public helper, not a copy of its own.
    import backend.app.testing.audit as audit_module
    import gatemetrics

    assert audit_module.flock_until is gatemetrics.flock_until
