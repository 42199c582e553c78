"""Fork and pid reuse: a forked child starts at zero as a new incarnation and never releases
the parent's lifetime lock."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gatemetrics import CounterStore, bind
from gatemetrics._format import v2_names
from tests.engine.shard_helpers import (
    CLEAN,
    agg,
    files,
    owned,
    pay,
    read_shard,
    refuse,
    shop_store,
    totals,
)
from tests.processes import Reaper, read_line, run_python
from tests.shard_tools import in_forked_child, is_locked

# -- fork and pid reuse ----------------------------------------------------------------------


def test_a_forked_child_starts_at_zero_as_a_new_incarnation(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path)
    for _ in range(3):
        pay(store)
    parent = binding.shard.identity

    def child() -> bool:
        zero = store.snapshot().family("orders") == {"paid": 0, "refused": 0}
        refuse(store)
        refuse(store)
        return zero and binding.shard.identity not in (None, parent)

    assert in_forked_child(child)
    assert binding.shard.identity == parent
    assert parent is not None
    assert is_locked(tmp_path / v2_names(parent.incarnation)[0])  # still ours
    assert totals(tmp_path) == {"paid": 3, "refused": 2}
    assert len(files(tmp_path, ".shard")) == 2
    binding.close()


def test_a_forked_child_never_releases_the_parents_lifetime_lock(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path)
    for _ in range(3):
        pay(store)
    parent = binding.shard.path
    assert parent is not None

    def close_in_child() -> bool:
        refuse(store)
        mine = binding.shard.path
        closed = binding.close()  # saves, then unlocks the child's own shard only
        assert mine is not None
        return closed and mine != parent and is_locked(parent) and not is_locked(mine)

    def killed_in_child() -> bool:
        refuse(store)
        os.kill(os.getpid(), signal.SIGKILL)
        return True  # pragma: no cover - never reached

    assert in_forked_child(close_in_child)
    assert is_locked(parent)
    assert not in_forked_child(killed_in_child)  # its exit status is the SIGKILL
    assert is_locked(parent)
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("orders") == {"paid": 3, "refused": 2}
    assert (result.live, result.dead) == (1, 2)
    assert owned(tmp_path) == [(os.path.basename(parent), "v2")]  # only the children absorbed
    pay(store)  # the parent goes on saving in place
    assert read_shard(parent).counts == store.snapshot().counts
    assert totals(tmp_path) == {"paid": 4, "refused": 2}
    binding.close()


HOOKLESS_FORK = """
import ctypes
from gatemetrics import bind
from tests.engine.shard_helpers import pay, refuse, shop_store
from tests.shard_tools import is_locked

store = shop_store()
binding = bind(store, sys.argv[1])
for _ in range(3):
    pay(store)
parent = binding.shard.path
pid = ctypes.CDLL(None, use_errno=True).fork()  # libc's fork: no os.register_at_fork hooks
if pid == 0:
    ok = False
    try:
        assert binding.save()  # the pid guard: a new incarnation, counts reset
        zero = store.snapshot().family("orders") == {"paid": 0, "refused": 0}
        refuse(store)
        refuse(store)
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
    assert result.snapshot().family("orders") == {"paid": 3, "refused": 2}
    assert (result.live, result.dead) == (1, 1)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert totals(tmp_path) == {"paid": 3, "refused": 2}


def test_preload_style_fork_after_counts_never_double_counts(
    tmp_path: Path, reaper: Reaper
) -> None:
    """Like gunicorn --preload: the app (and its bound store) exists before the workers fork."""
    done = run_python(
        """
        from gatemetrics import bind
        from tests.engine.shard_helpers import pay, refuse, shop_store
        store = shop_store()
        bind(store, sys.argv[1], mode="periodic", interval=3600)
        for _ in range(5):
            pay(store)
        children = []
        for n in range(3):
            pid = os.fork()
            if pid == 0:
                # A worker: starts at zero, recycles gracefully (atexit saves it).
                for _ in range(n + 1):
                    refuse(store, "no_money")
                sys.exit(0)
            children.append(pid)
        for pid in children:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        pay(store)
        print(store.snapshot().family("orders"), flush=True)
        """,
        str(tmp_path),
    )
    code, out, err = done.returncode, done.stdout, done.stderr
    assert code == 0, err
    assert out.strip() == "{'paid': 6, 'refused': 0}"
    assert totals(tmp_path) == {"paid": 6, "refused": 6}
    assert len(files(tmp_path, ".shard")) == 4


def _mp_worker(directory: str, n: int) -> None:
    # The store inherited from the parent (module global below) must be empty here.
    assert _INHERITED is not None
    assert _INHERITED.snapshot().family("orders") == {"paid": 0, "refused": 0}
    for _ in range(n):
        refuse(_INHERITED, "fraud")


_INHERITED: CounterStore | None = None


def test_multiprocessing_fork_children_are_new_incarnations(tmp_path: Path) -> None:
    global _INHERITED  # noqa: PLW0603 - inherited by the forked children on purpose
    store = _INHERITED = shop_store()
    binding = bind(store, tmp_path)
    pay(store)
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
    assert totals(tmp_path) == {"paid": 1, "refused": 6}
    assert store.snapshot().family("orders") == {"paid": 1, "refused": 0}
    assert len(files(tmp_path, ".shard")) == 4
    binding.close()


def test_periodic_threads_stop_before_a_fork_and_restart_on_both_sides(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path, mode="periodic", interval=0.02)
    before = binding._thread
    assert before is not None
    assert before.is_alive()

    def child() -> bool:
        threads = [t for t in threading.enumerate() if t.name == "gatemetrics-periodic-save"]
        restarted = len(threads) == 1 and threads[0] is not before and threads[0].is_alive()
        pay(store)
        return restarted and binding.close()

    assert in_forked_child(child)
    assert not before.is_alive()  # joined before the fork
    after = binding._thread
    assert after is not None
    assert after is not before
    assert after.is_alive()
    assert totals(tmp_path) == {"paid": 1, "refused": 0}  # the child's count, saved by the child
    binding.close()


OWNER = """
from gatemetrics import bind
from tests.engine.shard_helpers import pay, refuse, shop_store
store = shop_store()
binding = bind(store, sys.argv[1])
for _ in range(int(sys.argv[2])):
    if sys.argv[3] == "pay":
        pay(store)
    else:
        refuse(store, "no_money")
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
    first = reaper.python(OWNER, str(tmp_path), "3", "pay", stdin=True)
    first_inc = read_line(first)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    second = start_with_pid(
        first.pid, lambda: reaper.python(OWNER, str(tmp_path), "2", "refuse", stdin=True)
    )
    if second is None:
        pytest.skip("cannot make the kernel reuse a pid here (needs root for ns_last_pid)")
    second_inc = read_line(second)
    assert second_inc != first_inc
    records = [read_shard(tmp_path / v2_names(i)[0]) for i in (first_inc, second_inc)]
    assert [r.pid for r in records] == [first.pid, first.pid]  # the same pid, reused
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("orders") == {"paid": 3, "refused": 2}
    assert (result.live, result.dead) == (1, 1)
    assert [r.incarnation for r in result.shards if r.state == "dead"] == [first_inc]
    assert owned(tmp_path) == [(v2_names(second_inc)[0], "v2")]  # only the dead one absorbed
    assert is_locked(tmp_path / v2_names(second_inc)[0])
    assert second.stdin is not None
    second.stdin.close()
    assert second.wait(timeout=30) == 0
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("orders") == {"paid": 3, "refused": 2}
    assert sorted(os.listdir(tmp_path)) == CLEAN


# -- forks while the write-through fast path lends its store a slot image --------------------


def test_an_os_fork_child_of_a_lent_image_records_into_its_own_shard_only(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path)
    for _ in range(3):
        pay(store)
    image = binding.shard._image
    assert image is not None
    assert image.lent
    parent = binding.shard.path
    assert parent is not None
    before = Path(parent).read_bytes()

    def child() -> bool:
        refuse(store)  # the fast path, right after the fork: no save() first
        refuse(store)
        mine = binding.shard.path
        return (
            mine not in (None, parent)
            and read_shard(str(mine)).counts == store.snapshot().counts
            and store.snapshot().family("orders") == {"paid": 0, "refused": 2}
        )

    assert in_forked_child(child)
    assert Path(parent).read_bytes() == before  # the parent's shard untouched
    assert image.lent  # still the parent's fast path
    assert totals(tmp_path) == {"paid": 3, "refused": 2}
    pay(store)
    assert read_shard(parent).counts == store.snapshot().counts
    assert totals(tmp_path) == {"paid": 4, "refused": 2}
    binding.close()


HOOKLESS_FORK_LENT = """
import ctypes
from pathlib import Path
from gatemetrics import bind
from tests.engine.shard_helpers import pay, read_shard, refuse, shop_store
from tests.shard_tools import is_locked

store = shop_store()
binding = bind(store, sys.argv[1])
for _ in range(3):
    pay(store)
assert binding.shard._image is not None and binding.shard._image.lent
parent = binding.shard.path
before = Path(parent).read_bytes()
pid = ctypes.CDLL(None, use_errno=True).fork()  # libc's fork: no os.register_at_fork hooks
if pid == 0:
    ok = False
    try:
        # The fast path's pid guard (fork_flag) sees the fork at the first write, before it
        # writes anything: the reset then clears that write with the parent's counts (as the
        # snapshot path's guard always did), and the child counts exactly from there.
        refuse(store)
        assert Path(parent).read_bytes() == before
        refuse(store)
        refuse(store)
        mine = binding.shard.path
        ok = (
            mine != parent
            and is_locked(parent)
            and Path(parent).read_bytes() == before
            and read_shard(mine).counts == store.snapshot().counts
            and store.snapshot().family("orders") == {"paid": 0, "refused": 2}
        )
    finally:
        os._exit(0 if ok else 1)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(status, Path(parent).read_bytes() == before, flush=True)
sys.stdin.read()
pay(store)
print(read_shard(parent).counts == store.snapshot().counts, flush=True)
"""


def test_a_libc_fork_child_of_a_lent_image_records_into_its_own_shard_only(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(HOOKLESS_FORK_LENT, str(tmp_path), stdin=True)
    assert read_line(proc) == "0 True"  # the child passed; the parent's file untouched
    result = agg(tmp_path)
    assert result.snapshot().family("orders") == {"paid": 3, "refused": 2}
    assert (result.live, result.dead) == (1, 1)
    assert proc.stdin is not None
    proc.stdin.close()
    assert read_line(proc) == "True"  # the parent goes on in its own shard
    assert proc.wait(timeout=30) == 0
    assert totals(tmp_path) == {"paid": 4, "refused": 2}
