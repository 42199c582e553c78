"""Tests of backend.app.testing.audit: the in-memory log and the durable JSON-lines log."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson
import pytest
from filelock import FileLock

from backend.app.testing.audit import InMemoryAuditLog, JsonlAuditLog
from gatemetrics.errors import LockTimeoutError
from tests.conftest import run_python


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
log = JsonlAuditLog(path, lock_timeout=60)
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


def test_processes_writing_at_once_lose_and_interleave_no_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    count, pad, writers = 120, 5000, 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"w{i}", str(count), str(pad)],
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
    log = JsonlAuditLog(path, lock_timeout=0.5)
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
