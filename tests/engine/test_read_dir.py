"""gatemetrics.read_dir (and aread_dir): the scrape's read under shared locks.

Real processes hold real ``flock``s: a child holding the directory's locks shared is a scrape in
progress, one holding them exclusive is a compaction (or a previous-release aggregator holding
``aggregate.lock`` only). ``lock_timeout=0`` makes one attempt: a read that had to queue behind
another would fail at once, so a success proves it did not wait.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from gatemetrics import LockTimeoutError, _faults, aggregate_dir, aread_dir, read_dir
from gatemetrics.aggregate import LOCK_NAME
from tests.engine.aggregate_helpers import agg, orders, shard_names
from tests.engine.schema import SHOP_NAMESPACE, SHOP_SCHEMA, dead_shop_shard
from tests.processes import Reaper, read_line

# Holds flocks on the paths given (a directory is opened O_RDONLY, a file O_RDWR|O_CREAT) in
# the mode given, says "locked", and keeps them until a line arrives on stdin (or it dies).
HOLDER = """
import fcntl
mode = fcntl.LOCK_SH if sys.argv[1] == "shared" else fcntl.LOCK_EX
fds = []
for path in sys.argv[2:]:
    flags = os.O_RDONLY if os.path.isdir(path) else os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags, 0o644)
    fcntl.flock(fd, mode)
    fds.append(fd)
print("locked", flush=True)
sys.stdin.readline()
"""


def hold(reaper: Reaper, mode: str, *paths: Path) -> subprocess.Popen[str]:
    child = reaper.python(HOLDER, mode, *map(str, paths), stdin=True)
    assert read_line(child) == "locked"
    return child


def release(child: subprocess.Popen[str]) -> None:
    """Let the holder go, and wait until it has (its locks are free then)."""
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == 0


def read(directory: Path, timeout: float = 0) -> int:
    """The paid orders ``read_dir`` finds, in one lock attempt by default."""
    result = read_dir(directory, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=timeout)
    return result.snapshot().family("orders")["paid"]


def test_a_read_never_waits_for_another_read_in_progress(tmp_path: Path, reaper: Reaper) -> None:
    dead_shop_shard(tmp_path, paid=3)
    # Another scrape holds both of the directory's locks shared, as read_dir does.
    scrape = hold(reaper, "shared", tmp_path, tmp_path / LOCK_NAME)
    assert read(tmp_path) == 3
    # An exclusive aggregation (a compaction) cannot start while the scrape reads.
    with pytest.raises(LockTimeoutError):
        aggregate_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=0)
    release(scrape)
    agg(tmp_path, compact=True, lock_timeout=0)
    assert shard_names(tmp_path) == []  # absorbed once the scrape was done
    assert read(tmp_path) == 3


@pytest.mark.parametrize("held", ["directory", "aggregate.lock", "both"])
def test_a_compaction_holding_the_lock_past_the_timeout_fails_a_read(
    tmp_path: Path, reaper: Reaper, held: str
) -> None:
    # "aggregate.lock" alone: a compactor of the previous release, which locks only that file.
    paths = {
        "directory": [tmp_path],
        "aggregate.lock": [tmp_path / LOCK_NAME],
        "both": [tmp_path, tmp_path / LOCK_NAME],
    }[held]
    compaction = hold(reaper, "exclusive", *paths)
    with pytest.raises(LockTimeoutError) as err:
        read(tmp_path, timeout=0.05)
    assert err.value.path == str(tmp_path / LOCK_NAME)
    assert err.value.timeout == 0.05
    release(compaction)
    assert read(tmp_path) == 0


def test_many_concurrent_reads_in_threads_never_time_out(tmp_path: Path) -> None:
    for paid in (1, 2, 3):
        dead_shop_shard(tmp_path, paid=paid)
    start = threading.Barrier(8)
    results: list[int | BaseException] = []

    def scrape() -> None:
        start.wait()
        for _ in range(25):
            try:
                results.append(read(tmp_path))  # one attempt: any queueing fails
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                results.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [6] * 200


def test_two_readers_both_see_a_dead_shard_as_dead(tmp_path: Path, reaper: Reaper) -> None:
    name = dead_shop_shard(tmp_path, paid=4)
    # A concurrent reader has probed that dead shard: it holds the shard's flock shared. An
    # exclusive probe would fail against it and take the shard for a live owner's.
    other = hold(reaper, "shared", tmp_path, tmp_path / LOCK_NAME, tmp_path / name)
    result = read_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=0)
    assert (result.live, result.dead) == (0, 1)
    assert [(r.name, r.state) for r in result.shards] == [(name, "dead")]
    release(other)


def test_a_shard_the_archive_absorbed_is_not_counted_again_while_another_reader_holds_it(
    tmp_path: Path, reaper: Reaper, fault: Callable[[Callable[[str], None]], None]
) -> None:
    # A crash between compaction's archive write and its deletions leaves an absorbed shard in
    # place; the archive lists it. A reader that took it for live (the other reader holds its
    # lock) would count it on top of the archive.
    name = dead_shop_shard(tmp_path, paid=5)

    def crash(step: str) -> None:
        if step == "archive.replaced":
            raise _faults.SimulatedCrash(step)

    fault(crash)
    with pytest.raises(_faults.SimulatedCrash):
        agg(tmp_path, compact=True)
    fault(lambda step: None)
    assert shard_names(tmp_path) == [name]  # still there, and listed as absorbed
    assert orders(tmp_path)["paid"] == 5
    other = hold(reaper, "shared", tmp_path, tmp_path / LOCK_NAME, tmp_path / name)
    assert read(tmp_path) == 5
    release(other)


def test_a_read_writes_nothing(tmp_path: Path) -> None:
    dead = dead_shop_shard(tmp_path, paid=2)
    (tmp_path / "v2-0000000000000000000000000000dead.shard").write_bytes(b"broken")
    agg(tmp_path)  # creates aggregate.lock, as every aggregation does
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.iterdir()}
    for _ in range(3):
        result = read_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE)
        assert result.compaction is None
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.iterdir()}
    assert after == before  # the dead shard is still there, the broken file not quarantined
    assert dead in after


def test_read_dir_refuses_what_aggregate_dir_refuses(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_dir(tmp_path / "missing", SHOP_SCHEMA, namespace=SHOP_NAMESPACE)
    with pytest.raises(ValueError, match="namespace"):
        read_dir(tmp_path, SHOP_SCHEMA, namespace="9bad")
    with pytest.raises(ValueError, match="lock_timeout"):
        read_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=-1)


@pytest.mark.anyio
async def test_aread_dir_waits_for_the_lock_off_the_event_loop(
    tmp_path: Path, reaper: Reaper
) -> None:
    dead_shop_shard(tmp_path, paid=7)
    compaction = hold(reaper, "exclusive", tmp_path)
    ticks = 0
    result: list[int] = []

    async def ticker() -> None:
        # Runs only if the event loop is free while aread_dir waits; it ends the compaction.
        nonlocal ticks
        while not result:
            await anyio.sleep(0.005)
            ticks += 1
            if ticks == 20:
                await anyio.to_thread.run_sync(release, compaction)

    async def scrape() -> None:
        got = await aread_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=30)
        result.append(got.snapshot().family("orders")["paid"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(scrape)
    assert result == [7]
    assert ticks >= 20


@pytest.mark.anyio
async def test_aread_dir_checks_its_timeout_before_any_thread(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        await aread_dir(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=float("nan"))


def test_the_lock_file_is_the_one_exclusive_aggregators_take(tmp_path: Path) -> None:
    read(tmp_path)
    assert os.path.isfile(tmp_path / LOCK_NAME)  # created empty, like any aggregation's
    assert (tmp_path / LOCK_NAME).stat().st_size == 0
