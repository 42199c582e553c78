"""Tests of the trust boundary: attacks by a user who may write the shard directory."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from gatemetrics import (
    new_identity,
)
from gatemetrics._format import (
    v1_names,
    v2_names,
)
from gatemetrics.aggregate import QUARANTINE_DIR
from tests.engine.aggregate_helpers import (
    agg,
    incarnation_of,
    live_v1_owners,
    orders,
)
from tests.engine.schema import (
    dead_shop_shard,
)
from tests.exposition_parser import parse
from tests.processes import Attacker, read_line
from tests.shard_tools import (
    LegacyV1Shard,
)


@pytest.fixture
def live_v1() -> Iterator[Callable[[Path, int], LegacyV1Shard]]:
    """Previous-release owners living in this test process (format v1, write-through)."""
    yield from live_v1_owners()


# -- attacks by a user who may write the directory ---------------------------------------------
# The aggregator typically runs from a root cron over a directory the workers' user can write.
# Whatever that user plants there may hide or inflate counts, but never makes the aggregator
# write elsewhere, delete or drop a live worker's counts, or stop later runs. The attacker is a
# real unprivileged user (nobody) when the suite runs as root; see tests.processes.Attacker.

# What an attacker can plant under a name, and the names the engine creates.
PLANT_KINDS = ("symlink", "symlink-to-file", "loop", "fifo", "directory", "socket", "hardlink")


def _engine_names() -> dict[str, str]:
    inc = new_identity().incarnation
    return {
        "aggregate.lock": "aggregate.lock",
        "archive.json": "archive.json",
        "archive.json.tmp": "archive.json.tmp",
        "quarantine": QUARANTINE_DIR,
        "v2 shard": v2_names(inc)[0],
        "v2 creating": v2_names(inc)[1],
        "v1 shard": v1_names(inc)[0],
        "v1 lock": v1_names(inc)[1],
        "v1 tmp": v1_names(inc)[2],
    }


def _cli(*args: str) -> int:
    from gatemetrics.cli import main

    return main(list(args))


def _plant(attacker: Attacker, name: str, kind: str, live_shard: str) -> None:
    if kind == "symlink":  # to a file that does not exist: following it would create it
        attacker.plant(name, "symlink", attacker.outside / f"made-through-{name}")
    elif kind == "symlink-to-file":  # to a file that exists: following it would change it
        attacker.plant(name, "symlink", attacker.outside / "precious")
    elif kind == "hardlink":  # a second name of a live worker's shard
        attacker.plant(name, "hardlink", attacker.shards / live_shard)
    else:
        attacker.plant(name, kind)


@pytest.mark.parametrize("which", list(_engine_names()))
def test_a_planted_entry_under_any_name_the_engine_creates_costs_only_itself(
    attacker: Attacker, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every kind of planted entry under each engine name, one after the other, against a root
    cron's compacting CLI run with a live worker: exit 0, nothing outside changes, the live
    counts and every dead shard stay exact (only a replaced archive loses its own totals: the
    attacker could as well delete it), and compaction keeps absorbing."""
    caplog.set_level(logging.CRITICAL, logger="gatemetrics")
    (attacker.outside / "precious").write_bytes(b"keep me\n")
    textfile = attacker.outside / "shop.prom"
    worker, live_shard = attacker.worker(3)
    assert _cli("aggregate", "--dir", str(attacker.shards), "--textfile", str(textfile)) == 0
    name = _engine_names()[which]
    absorbed = 0  # dead shards compacted into the archive so far
    for kind in PLANT_KINDS:
        _plant(attacker, name, kind, live_shard)
        dead_shop_shard(attacker.shards, paid=1)
        before = attacker.outside_state()
        for _ in range(2):  # the planting run, then the next one
            code = _cli("aggregate", "--dir", str(attacker.shards), "--textfile", str(textfile))
            assert code == 0, (which, kind)
            state = {k: v for k, v in attacker.outside_state().items() if k != textfile.name}
            assert state == {k: v for k, v in before.items() if k != textfile.name}, (which, kind)
        absorbed += 1
        result = agg(attacker.shards)
        paid = result.snapshot().get("orders", "paid")
        if which == "archive.json":
            # The planted "archive" replaced the real one: its totals are gone (hidden counts),
            # the live worker's and the new dead shard's are not.
            absorbed = 1
        assert paid == 3 + absorbed, (which, kind, result.shards)
        assert (attacker.shards / live_shard).is_file(), (which, kind)
        states = {s.name: (s.state, s.action) for s in result.shards}
        assert states[live_shard] == ("live", "counted"), (which, kind)
        dead = [s for s in result.shards if s.state == "dead" and s.action == "counted"]
        assert dead == [], (which, kind)  # every dead shard was absorbed: compaction works
        assert (attacker.shards / "aggregate.lock").is_file()
        assert not (attacker.shards / "aggregate.lock").is_symlink()
        # Clean up what compaction leaves to the planter (a live hard link stays until the
        # worker exits; a loop's other end is not always an engine name); never the engine's
        # own files (a regular file with one link, the real quarantine/).
        for leftover in (name, f"{name}.other"):
            path = attacker.shards / leftover
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                continue
            if stat.S_ISDIR(st.st_mode):
                if leftover != QUARANTINE_DIR:
                    shutil.rmtree(path)
            else:
                path.unlink()
    assert read_textfile_paid(textfile) == 3 + absorbed
    assert worker.stdin is not None
    worker.stdin.write("close\n")
    worker.stdin.flush()
    assert read_line(worker) == "closed"
    assert _cli("aggregate", "--dir", str(attacker.shards)) == 0
    assert orders(attacker.shards) == {"paid": 3 + absorbed, "refused": 0}


def read_textfile_paid(path: Path) -> int:
    families = parse(path.read_text())
    return families["shop_orders_total"].samples[("outcome", "paid")]


def test_a_symlink_named_aggregate_lock_never_creates_a_file_outside(attacker: Attacker) -> None:
    target = attacker.outside / "created-by-root"
    attacker.plant("aggregate.lock", "symlink", target)
    dead_shop_shard(attacker.shards, paid=2)
    for compact in (False, True, True):
        assert agg(attacker.shards, compact=compact).snapshot().get("orders", "paid") == 2
        assert not target.exists()
    lock = attacker.shards / "aggregate.lock"
    assert lock.is_file()
    assert not lock.is_symlink()  # quarantined; the next run made a real lock file
    assert any(n.startswith("aggregate.lock.") for n in os.listdir(lock.parent / QUARANTINE_DIR))


def test_a_hard_link_of_a_live_shard_named_aggregate_lock_never_stalls_the_pipeline(
    attacker: Attacker,
) -> None:
    """The owner's lifetime flock is on that inode: locking it would wait for the owner."""
    _, live_shard = attacker.worker(4)
    attacker.plant("aggregate.lock", "hardlink", attacker.shards / live_shard)
    for compact in (False, True, True):
        result = agg(attacker.shards, compact=compact, lock_timeout=1)
        assert result.snapshot().get("orders", "paid") == 4
    assert (attacker.shards / live_shard).is_file()


def test_a_symlink_named_archive_tmp_never_stops_compaction(attacker: Attacker) -> None:
    (attacker.outside / "precious").write_bytes(b"keep me\n")
    attacker.plant("archive.json.tmp", "symlink", attacker.outside / "precious")
    for round_ in range(1, 4):
        dead = dead_shop_shard(attacker.shards, paid=1)
        result = agg(attacker.shards, compact=True)
        assert result.compaction is not None
        assert result.compaction.absorbed == 1
        assert not (attacker.shards / dead).exists()  # absorbed: dead shards do not pile up
        assert orders(attacker.shards) == {"paid": round_, "refused": 0}
    assert (attacker.outside / "precious").read_bytes() == b"keep me\n"


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_archive_listing_a_live_incarnation_never_costs_its_counts(
    attacker: Attacker, fmt: int, live_v1: Callable[[Path, int], LegacyV1Shard]
) -> None:
    """A well-formed archive that lists a live owner as absorbed: the shard still counts, is
    never deleted, and once its owner is killed its counts are absorbed for real."""
    if fmt == 2:
        worker, name = attacker.worker(5)
    else:
        shard = live_v1(attacker.shards, 5)
        name = os.path.basename(shard.path)
    inc = incarnation_of(name)
    dead_shop_shard(attacker.shards, paid=1)
    agg(attacker.shards, compact=True)
    archive = orjson.loads((attacker.shards / "archive.json").read_bytes())
    archive["absorbed"] = [inc]
    forged = orjson.dumps(archive)
    attacker.run(
        "open(sys.argv[1] + '.new', 'wb').write(bytes.fromhex(sys.argv[2]))\n"
        "os.replace(sys.argv[1] + '.new', sys.argv[1])\n",
        str(attacker.shards / "archive.json"),
        forged.hex(),
    )
    for compact in (False, True, True):
        result = agg(attacker.shards, compact=compact)
        assert result.snapshot().get("orders", "paid") == 6
        assert (attacker.shards / name).exists()
        report = next(s for s in result.shards if s.name == name)
        assert (report.state, report.action) == ("live", "counted")
    if fmt == 2:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    else:
        shard.store.set_change_hook(None)
        shard.close(save=False)
    result = agg(attacker.shards, compact=True)
    assert result.snapshot().get("orders", "paid") == 6
    assert not (attacker.shards / name).exists()  # absorbed for real now
    assert orders(attacker.shards) == {"paid": 6, "refused": 0}
