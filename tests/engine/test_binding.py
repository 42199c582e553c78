"""Binding a store to a directory: write-through saves once per public write, periodic saves
from a thread, exit saves, bad options refused."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gatemetrics import (
    CounterStore,
    Durability,
    GatemetricsError,
    Shard,
    ShardWriteError,
    _faults,
    aggregate_dir,
    bind,
)
from tests.engine.schema import HISTOGRAM_SCHEMA, REQUESTS_SCHEMA
from tests.engine.shard_helpers import (
    FAILURES,
    WHYS,
    agg,
    files,
    pay,
    raise_at,
    read_shard,
    refuse,
    shop_store,
    totals,
)
from tests.processes import Reaper, read_line, run_python, wait_until

# -- binding ---------------------------------------------------------------------------------


def test_write_through_saves_once_per_public_write(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path)
    calls: list[Callable[[], None]] = [
        lambda: pay(store),
        lambda: refuse(store, "no_stock", "no_money"),
        lambda: refuse(store, *WHYS),
        lambda: store.increment("refusals", "fraud", 3),
        lambda: store.increment("errors"),
        lambda: store.increment_slots([store.schema.slot("errors")]),
        lambda: store.increment("orders", "paid"),
        lambda: store.increment_slots([0]),
    ]
    for i, call in enumerate(calls, 1):
        call()
        assert store.generation == i  # exactly one save per call
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
    store: CounterStore,
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
    threads = [threading.Thread(target=pay, args=(store,))]
    threads[0].start()
    assert entered.wait(timeout=30)
    threads += [threading.Thread(target=pay, args=(store,)) for _ in range(waiters)]
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
    # Group commit is the power-loss path: the default durability writes each call's save
    # under the store's lock (see test_write_through_fast_path_*).
    store = shop_store()
    binding = bind(store, tmp_path, durability=Durability.POWER_LOSS)
    _queued_behind_a_blocked_save(store, binding.shard, fault, waiters=5, then=lambda: None)
    # The blocked save, then one save for all five waiters (each counted before it began).
    assert store.generation == 2
    assert totals(tmp_path) == {"paid": 6, "refused": 0}
    binding.close()


def test_write_through_callers_save_themselves_when_the_save_they_waited_for_fails(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = shop_store()
    binding = bind(store, tmp_path, failure_key=FAILURES, durability=Durability.POWER_LOSS)

    def fail() -> None:
        raise OSError(errno.EIO, "I/O error")

    _queued_behind_a_blocked_save(store, binding.shard, fault, waiters=5, then=fail)
    assert store.get(FAILURES) == 1
    assert store.generation == 1  # the failed save rolled back; one save served the rest
    assert totals(tmp_path) == {"paid": 6, "refused": 0}
    binding.close()


def test_write_through_is_durable_when_each_concurrent_call_returns(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path, durability=Durability.PROCESS_CRASH)
    returned = [0]
    lock = threading.Lock()
    problems: list[str] = []

    def worker() -> None:
        for _ in range(25):
            refuse(store, "no_stock")
            with lock:
                returned[0] += 1
                done = returned[0]
            # Every call that returned before this read is in the file (the shard only grows).
            on_disk = totals(tmp_path)["refused"]
            if on_disk < done:
                problems.append(f"{done} calls returned, {on_disk} on disk")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert problems == []
    assert totals(tmp_path) == {"paid": 0, "refused": 200}
    assert store.generation <= 200
    binding.close()


def test_write_through_failures_are_counted_without_recursion(
    tmp_path: Path, fault: Callable[[Callable[[str], None]], None]
) -> None:
    store = shop_store()
    binding = bind(store, tmp_path, failure_key=FAILURES)
    fault(raise_at("save.locked", OSError(errno.EIO, "I/O error")))
    for _ in range(5):
        pay(store)  # never raises
    assert store.get(FAILURES) == 5
    assert store.get("orders", "paid") == 5
    assert totals(tmp_path) == {"paid": 0, "refused": 0}
    _faults.HOOK = None
    assert binding.close()
    snap = agg(tmp_path).snapshot()
    assert snap.get(FAILURES) == 5
    assert snap.family("orders") == {"paid": 5, "refused": 0}


def test_write_through_is_exact_when_sigkilled_right_after_the_call_returned(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(
        """
        from gatemetrics import bind
        from tests.engine.schema import SHOP_SCHEMA as S
        from tests.engine.shard_helpers import shop_store
        store = shop_store()
        bind(store, sys.argv[1])
        paid = [S.slot("orders", "paid")]
        refused = [S.slot("orders", "refused"), S.slot("refusals", "no_stock")]
        for i in range(137):
            # One public write per order, with an error counted alongside for some.
            error = [S.slot("errors")] if i % 10 == 0 else []
            store.increment_slots((paid if i % 3 == 0 else refused) + error)
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
    assert snap.family("orders") == {"paid": 46, "refused": 91}
    assert snap.get("refusals", "no_stock") == 91
    assert snap.get("errors") == 14


def test_periodic_binding_saves_in_the_background_and_on_close(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path, mode="periodic", interval=0.02)
    assert binding.mode == "periodic"
    assert len(files(tmp_path, ".shard")) == 1  # created (and locked) at bind time
    pay(store)
    wait_until(lambda: totals(tmp_path)["paid"] == 1)
    generation = store.generation
    pay(store)
    wait_until(lambda: totals(tmp_path)["paid"] == 2)
    assert store.generation == generation + 1  # no saves while nothing changed
    refuse(store)
    assert binding.close()
    assert totals(tmp_path) == {"paid": 2, "refused": 1}
    assert binding.close()  # idempotent
    assert not any(t.name == "gatemetrics-periodic-save" for t in threading.enumerate())


def test_atexit_saves_a_periodic_binding(tmp_path: Path, reaper: Reaper) -> None:
    done = run_python(
        """
        from gatemetrics import bind
        from tests.engine.shard_helpers import pay, shop_store
        store = shop_store()
        bind(store, sys.argv[1], mode="periodic", interval=3600)
        for _ in range(7):
            pay(store)
        """,
        str(tmp_path),
    )
    code, _, err = done.returncode, done.stdout, done.stderr
    assert code == 0, err
    assert totals(tmp_path) == {"paid": 7, "refused": 0}


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
        bind(shop_store(), tmp_path, **kwargs)  # type: ignore[arg-type]


def test_a_store_can_be_bound_once(tmp_path: Path) -> None:
    store = shop_store()
    binding = bind(store, tmp_path)
    with pytest.raises(GatemetricsError, match="already bound"):
        bind(store, tmp_path / "other")
    binding.close()
    bind(store, tmp_path).close()


def test_binding_an_unusable_directory_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ShardWriteError):
        bind(shop_store(), tmp_path / "f" / "shards")


KILLED_THREADS = """
import json, threading
from gatemetrics import CounterStore, bind
from tests.engine.schema import HISTOGRAM_SCHEMA, REQUESTS_SCHEMA, request_mix
SCHEMA = HISTOGRAM_SCHEMA.extend([REQUESTS_SCHEMA.families[-1]])
store = CounterStore(SCHEMA)
bind(store, sys.argv[1])
assert store.family("requests").labels("basket", "2xx") is not None

def work(seed):
    requests = store.family("requests")
    basket = store.family("basket").labels("paid" if seed % 2 else "refused")
    for i, (route, code) in enumerate(request_mix(seed, 120)):
        requests.labels(route, code).inc()
        basket.observe(float(i % 60))  # exact in binary: the sums do not depend on the order
        store.observe("checkout", 0.5 if i % 3 else 2.0)

threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
snap = store.snapshot()
print(json.dumps([list(snap.counts), list(snap.sums)]), flush=True)
sys.stdin.read()
"""


def test_write_through_is_exact_for_histograms_and_two_labels_when_threads_are_sigkilled(
    tmp_path: Path, reaper: Reaper
) -> None:
    proc = reaper.python(KILLED_THREADS, str(tmp_path), stdin=True)
    counts, sums = json.loads(read_line(proc, timeout=60))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    schema = HISTOGRAM_SCHEMA.extend([REQUESTS_SCHEMA.families[-1]])
    snap = aggregate_dir(tmp_path, schema, namespace="shop").snapshot()
    assert list(snap.counts) == counts
    assert list(snap.sums) == sums
    assert sum(snap.series("requests").values()) == 4 * 120
    buckets, total = snap.histogram("checkout")
    assert buckets == (0, 0, 4 * 80, 4 * 120)  # cumulative
    assert total == 4 * (80 * 0.5 + 40 * 2.0)
