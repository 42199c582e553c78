"""Tests of gatemetrics._flock: the one non-blocking flock attempt, and the short-held lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatemetrics import LockTimeoutError, flock_until, try_flock
from gatemetrics._flock import exclusive_flock
from tests.shard_tools import is_locked

# A real process that takes the lock, says so, and holds it until it reads a line (or dies).
HOLDER = """
import sys
from gatemetrics._flock import exclusive_flock
from tests.shard_tools import is_locked
with exclusive_flock(sys.argv[1], timeout=5):
    print("held", flush=True)
    sys.stdin.readline()
"""


def start_holder(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def test_holds_the_lock_only_inside_the_block(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with exclusive_flock(str(path), timeout=1):
        assert is_locked(path)
    assert not is_locked(path)
    assert path.exists()  # lock files are never deleted


def test_two_calls_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    with (
        exclusive_flock(path, timeout=1),
        pytest.raises(LockTimeoutError),
        exclusive_flock(path, timeout=0),
    ):
        pass


def test_times_out_while_another_process_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    proc = start_holder(path)
    try:
        with pytest.raises(LockTimeoutError) as err, exclusive_flock(str(path), timeout=0.05):
            pass
        assert err.value.path == str(path)
        assert err.value.timeout == 0.05
    finally:
        stop(proc)


def test_waits_for_a_holder_that_releases(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    proc = start_holder(path)
    try:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        with exclusive_flock(str(path), timeout=30):
            assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)


def test_the_lock_is_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    proc = start_holder(path)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        with exclusive_flock(str(path), timeout=30):
            assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop(proc)


def test_a_forked_child_does_not_share_a_held_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    with exclusive_flock(path, timeout=1):
        pid = os.fork()
        if pid == 0:  # the child: the parent's lock must exclude it
            try:
                with exclusive_flock(path, timeout=0):
                    os._exit(1)
            except LockTimeoutError:
                os._exit(0)
            os._exit(2)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_never_creates_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "x.lock"
    with pytest.raises(FileNotFoundError), exclusive_flock(str(missing), timeout=1):
        pass
    assert not missing.parent.exists()


# -- the one non-blocking attempt: gatemetrics.try_flock / gatemetrics.flock_until -------------


def test_try_flock_is_true_when_taken_and_false_while_another_process_holds_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.lock"
    proc = start_holder(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert try_flock(fd) is False  # contention is an answer, not an error
        stop(proc)
        assert try_flock(fd) is True
        assert try_flock(fd) is True  # held through this description already: still ours
    finally:
        os.close(fd)
        stop(proc)


def test_try_flock_raises_for_an_error_that_is_not_contention(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        try_flock(fd)  # EBADF: the lock cannot work, so it must not read as "busy"


def test_flock_until_makes_one_attempt_even_past_its_deadline_and_names_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.lock"
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    try:
        flock_until(fd, time.monotonic() - 1, path="free", timeout=0)  # a free lock: taken
    finally:
        os.close(fd)
    proc = start_holder(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(LockTimeoutError) as err:
            flock_until(fd, time.monotonic() + 0.05, path="shown", timeout=7.5)
        assert (err.value.path, err.value.timeout) == ("shown", 7.5)
    finally:
        os.close(fd)
        stop(proc)
