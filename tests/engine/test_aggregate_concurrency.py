"""The aggregate against a model of many processes, and real processes, signals and concurrent
aggregators."""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gatemetrics import (
    Identity,
    Shard,
    _faults,
    new_identity,
)
from gatemetrics._format import (
    v1_names,
    v2_names,
)
from gatemetrics.aggregate import COMPACT_STEPS
from gatemetrics.shards import CREATE_STEPS, SAVE_STEPS
from tests.engine.aggregate_helpers import (
    agg,
    assert_bounded,
    shard_names,
    shop_store,
)
from tests.engine.schema import (
    SHOP_SCHEMA,
    TILLS_SCHEMA,
    WHYS,
    record_order,
)
from tests.processes import Reaper, read_line
from tests.shard_tools import (
    LEGACY_V1_SAVE_STEPS,
    LegacyV1Shard,
    in_forked_child,
)

# -- the model: a RuleBasedStateMachine over real files -----------------------------------------


why_lists = st.lists(st.sampled_from(WHYS), max_size=3)


class _Proc:
    """One modelled process incarnation: a store, its shard (v2, or v1 of the previous
    release), and what it last saved."""

    def __init__(self, directory: Path, pid: int, fmt: int) -> None:
        def identity() -> Identity:
            ns = time.time_ns()
            return Identity(f"00000000-{pid}-{ns:x}-{secrets.token_hex(8)}", pid, "model", 0.0)

        self.pid = pid
        self.fmt = fmt
        self.store = shop_store()
        self.shard = Shard(self.store, directory, identity_factory=identity)
        self.old = LegacyV1Shard(
            self.store, directory, durability="none", identity_factory=identity
        )
        self.saved = [0] * SHOP_SCHEMA.size
        self.has_file = False  # whether its current incarnation's shard exists

    @property
    def save_steps(self) -> tuple[str, ...]:
        return SAVE_STEPS if self.fmt == 2 else LEGACY_V1_SAVE_STEPS

    def counts(self) -> list[int]:
        return list(self.store.snapshot().counts)

    def save(self) -> None:
        if self.fmt == 2:
            assert self.shard.save()
        else:
            self.old.save()

    def close(self) -> None:
        if self.fmt == 2:
            assert self.shard.close(save=True)
        else:
            self.old.close(save=True)

    def die(self) -> None:
        """SIGKILL in-process: the kernel drops the lock, nothing else happens."""
        if self.fmt == 1:
            self.old.die()
            return
        fd, self.shard._fd = self.shard._fd, None
        self.shard._identity = None
        if fd is not None:
            os.close(fd)


class ShardDirectoryMachine(RuleBasedStateMachine):
    """Processes of both releases record, save, fork, die and get their pids reused; creators
    and aggregators crash; hostile files and leftovers appear.

    After every step the read-only aggregate equals the model (the sum of what every
    incarnation last saved), never decreases, and carries only the declared series.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gm-model-"))
        self.live: list[_Proc] = []
        self.dead_total = [0] * SHOP_SCHEMA.size
        self.dead_pids: list[int] = []
        self.next_pid = 100_000
        self.quarantined = 0
        self.last = [0] * SHOP_SCHEMA.size
        self.forks = 0

    def teardown(self) -> None:
        _faults.HOOK = None
        for proc in self.live:
            proc.die()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pick(self, i: int) -> _Proc:
        return self.live[i % len(self.live)]

    def _bury(self, proc: _Proc) -> None:
        self.live.remove(proc)
        self.dead_pids.append(proc.pid)
        self.dead_total = [a + b for a, b in zip(self.dead_total, proc.saved, strict=True)]

    @precondition(lambda self: len(self.live) < 4)
    @rule(reuse=st.booleans(), old_release=st.booleans())
    def start(self, reuse: bool, old_release: bool) -> None:
        if reuse and self.dead_pids:
            pid = self.dead_pids[-1]  # pid reuse: same pid, a new incarnation
        else:
            self.next_pid += 1
            pid = self.next_pid
        self.live.append(_Proc(self.dir, pid, 1 if old_release else 2))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9), calls=st.lists(st.tuples(st.booleans(), why_lists), max_size=4))
    def record(self, i: int, calls: list[tuple[bool, list[str]]]) -> None:
        proc = self._pick(i)
        for paid, whys in calls:
            record_order(proc.store, paid, whys, error=len(whys) == 3)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def save(self, i: int) -> None:
        proc = self._pick(i)
        proc.save()
        proc.saved = proc.counts()
        proc.has_file = True

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9), s=st.integers(0, 4))
    def crash_while_saving(self, i: int, s: int) -> None:
        proc = self._pick(i)
        step = proc.save_steps[s % len(proc.save_steps)]
        _faults.HOOK = _crash_at(step, 0)
        try:
            with pytest.raises(_faults.SimulatedCrash):
                proc.save()
        finally:
            _faults.HOOK = None
        if step in ("save.written", "save.replaced", "save.done"):
            proc.saved = proc.counts()
        proc.die()
        self._bury(proc)

    @precondition(lambda self: any(p.fmt == 2 and not p.has_file for p in self.live))
    @rule(i=st.integers(0, 9), step=st.sampled_from(CREATE_STEPS))
    def crash_while_creating(self, i: int, step: str) -> None:
        """A v2 owner dies while creating its shard (before its first save is written)."""
        fresh = [p for p in self.live if p.fmt == 2 and not p.has_file]
        proc = fresh[i % len(fresh)]
        _faults.HOOK = _crash_at(step, 0)
        try:
            with pytest.raises(_faults.SimulatedCrash):
                proc.save()
        finally:
            _faults.HOOK = None
        proc.die()
        self._bury(proc)  # it saved nothing: its shard, if renamed into place, holds zeros

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def exit_gracefully(self, i: int) -> None:
        proc = self._pick(i)
        proc.close()
        proc.saved = proc.counts()
        self._bury(proc)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def sigkill(self, i: int) -> None:
        proc = self._pick(i)
        proc.die()
        self._bury(proc)

    @precondition(lambda self: self.forks < 2 and any(p.fmt == 2 for p in self.live))
    @rule(i=st.integers(0, 9), paid=st.integers(0, 3), refused=st.integers(0, 3))
    def fork(self, i: int, paid: int, refused: int) -> None:
        """A real fork: the child counts from zero as a new incarnation; the parent keeps its."""
        self.forks += 1
        procs = [p for p in self.live if p.fmt == 2]
        proc = procs[i % len(procs)]
        before = proc.counts()

        def child() -> bool:
            zero = not any(proc.counts())
            for _ in range(paid):
                record_order(proc.store, True)
            for _ in range(refused):
                record_order(proc.store, False, ["fraud"])
            return proc.shard.save() and zero

        assert in_forked_child(child)
        assert proc.counts() == before
        forked = shop_store()
        for _ in range(paid):
            record_order(forked, True)
        for _ in range(refused):
            record_order(forked, False, ["fraud"])
        counts = forked.snapshot().counts
        self.dead_total = [a + b for a, b in zip(self.dead_total, counts, strict=True)]

    @rule()
    def compact(self) -> None:
        agg(self.dir, compact=True)

    @rule(step=st.sampled_from(COMPACT_STEPS), skip=st.integers(0, 2))
    def crash_while_compacting(self, step: str, skip: int) -> None:
        _faults.HOOK = _crash_at(step, skip)
        try:
            agg(self.dir, compact=True)  # the step may not come up: then it just completes
        except _faults.SimulatedCrash:
            pass
        finally:
            _faults.HOOK = None

    @rule(
        kind=st.sampled_from(
            ["garbage", "name", "injection", "directory", "v2-garbage", "v2-name", "v2-directory"]
        )
    )
    def hostile_file(self, kind: str) -> None:
        inc = new_identity().incarnation
        path = self.dir / v1_names(inc)[0]
        v2_path = self.dir / v2_names(inc)[0]
        if kind == "garbage":
            path.write_bytes(b"\x00\xff{")
        elif kind == "name":
            (self.dir / f"shard-{secrets.token_hex(4)}.json").write_text("{}")
        elif kind == "injection":
            doc = {"counts": {"orders": {'paid"} 9\nx{y="': 1}}}
            path.write_bytes(orjson.dumps(doc))
        elif kind == "directory":
            path.mkdir()
        elif kind == "v2-garbage":
            v2_path.write_bytes(b"GMSHARD\0" + b"\xff" * 12000)
        elif kind == "v2-name":
            (self.dir / f"v2-{secrets.token_hex(4)}.shard").write_text("{}")
        else:
            v2_path.mkdir()
        self.quarantined += 1

    @rule(kind=st.sampled_from(["v1-tmp", "v1-lock", "v2-creating"]))
    def leftover_of_a_dead_writer(self, kind: str) -> None:
        """Files a killed writer leaves: never counted, never quarantined, removed in time."""
        inc = new_identity().incarnation
        if kind == "v1-tmp":
            (self.dir / v1_names(inc)[2]).write_bytes(b'{"half": ')
        elif kind == "v1-lock":
            (self.dir / v1_names(inc)[1]).write_bytes(b"")
        else:
            (self.dir / v2_names(inc)[1]).write_bytes(b"GMSHARD\0")

    @invariant()
    def aggregate_equals_the_model(self) -> None:
        result = agg(self.dir)
        expected = list(self.dead_total)
        for proc in self.live:
            expected = [a + b for a, b in zip(expected, proc.saved, strict=True)]
        assert list(result.counts) == expected
        assert all(n >= o for n, o in zip(result.counts, self.last, strict=True))
        self.last = list(result.counts)
        assert result.quarantined_total == self.quarantined
        assert result.live == sum(1 for p in self.live if p.has_file)
        assert_bounded(result)


def _crash_at(step: str, skip: int) -> Callable[[str], None]:
    remaining = [skip]

    def hook(name: str) -> None:
        if name == step:
            if remaining[0] == 0:
                raise _faults.SimulatedCrash(name)
            remaining[0] -= 1

    return hook


TestAggregateEqualsTheModelAfterEveryStep = ShardDirectoryMachine.TestCase


# -- real processes, real signals, concurrent aggregators ------------------------------------------

# A worker of the shop counting one refused order at its till per step (one save per order).
_WRITER = """
from gatemetrics import CounterStore, bind
from tests.engine.schema import TILLS_SCHEMA, record_order
from tests.shard_tools import legacy_bind
directory, fmt, till, count, kill_step, kill_skip = sys.argv[1:7]
if kill_step:
    _faults.install_kill_at(kill_step, skip=int(kill_skip))
store = CounterStore(TILLS_SCHEMA)
if fmt == "1":  # a worker of the previous release
    legacy_bind(store, directory, durability="none")
else:
    bind(store, directory, failure_key="errors")
for i in range(int(count)):
    record_order(store, False, till=till)
    print(i + 1, flush=True)
"""

_AGGREGATOR = """
import orjson
from gatemetrics.aggregate import aggregate_dir
from tests.engine.schema import TILLS_SCHEMA
directory, stop, compact = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
while True:
    done = os.path.exists(stop)
    r = aggregate_dir(directory, TILLS_SCHEMA, namespace="shop", compact=compact)
    formats = sorted({s.format for s in r.shards if s.action == "counted"})
    print(orjson.dumps([r.counts, formats]).decode(), flush=True)
    if done:
        break
"""


def _sigkill_mid_run(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGKILL a writer after 40 to 99 of its lines; ``(lines it printed, stdout, stderr)``."""
    lines = [read_line(proc) for _ in range(40 + secrets.randbelow(60))]
    os.kill(proc.pid, signal.SIGKILL)
    # Drain what it printed before the kill, its lines already buffered here included
    # (communicate() would read past them).
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout=60)
    return len(lines) + len(out.split()), out, err


def _assert_never_decreasing(aggregator: subprocess.Popen[str]) -> set[int]:
    """Every total an aggregator process printed never went down; the formats it counted."""
    out, err = aggregator.communicate(timeout=60)
    assert aggregator.returncode == 0, err
    runs = [orjson.loads(line) for line in out.splitlines()]
    assert len(runs) >= 2
    for (before, _), (after, _) in itertools.pairwise(runs):
        assert all(a >= b for a, b in zip(after, before, strict=True))
    return {f for _counts, formats in runs for f in formats}


def test_writers_of_both_releases_killed_mid_save_and_concurrent_aggregators_stay_exact(
    tmp_path: Path, reaper: Reaper
) -> None:
    """An upgrade in progress: v1 and v2 workers, SIGKILLed at save and create steps or at a
    random moment, while three aggregator processes (two compacting) run over the directory."""
    shards = tmp_path / "shards"
    shards.mkdir()
    stop = tmp_path / "stop"
    per_writer = 300
    # (format, till, SIGKILL itself at this step after passing it this many times, expected):
    # exact by construction.
    self_killed = [
        ("2", "till0", "save.locked", 120, 120),  # during save 121, before its pwrite
        ("2", "till1", "save.written", 80, 81),  # during save 81, after its pwrite
        ("2", "till2", "create.written", 0, 0),  # a .creating never renamed
        ("2", "till3", "create.renamed", 0, 0),  # a shard of zeros
        ("1", "till4", "save.tmp_written", 120, 120),  # during save 121, before rename
        ("1", "till5", "save.replaced", 80, 81),  # during save 81, after its rename
    ]
    completing = [("2", "till6"), ("1", "till7")]
    victims = [("2", "till8"), ("1", "till9")]  # SIGKILLed by us, mid-run
    writers: dict[str, subprocess.Popen[str]] = {}
    for fmt, till, step, skip, _expected in self_killed:
        writers[till] = reaper.python(
            _WRITER, str(shards), fmt, till, str(per_writer), step, str(skip)
        )
    for fmt, till in completing:
        writers[till] = reaper.python(_WRITER, str(shards), fmt, till, str(per_writer), "", "0")
    for fmt, till in victims:  # they would write for ever: only our SIGKILL ends them
        writers[till] = reaper.python(_WRITER, str(shards), fmt, till, str(10**9), "", "0")
    aggregators = [
        reaper.python(_AGGREGATOR, str(shards), str(stop), compact) for compact in ("1", "0", "1")
    ]
    acked: dict[str, int] = {}
    outputs: dict[str, tuple[str, str]] = {}
    for _fmt, till in victims:
        count, out, err = _sigkill_mid_run(writers[till])
        acked[till], outputs[till] = count, (out, err)
    outputs.update(
        (till, proc.communicate(timeout=60))
        for till, proc in writers.items()
        if till not in outputs
    )
    stop.touch()
    for _fmt, till, _step, _skip, _expected in self_killed:
        assert writers[till].returncode == -signal.SIGKILL, outputs[till][1]
    for _fmt, till in completing:
        assert writers[till].returncode == 0, outputs[till][1]
    for _fmt, till in victims:
        assert writers[till].returncode == -signal.SIGKILL, outputs[till][1]

    seen_formats: set[int] = set()
    for proc in aggregators:
        seen_formats |= _assert_never_decreasing(proc)
    assert seen_formats == {1, 2}  # the aggregators really read both releases' shards

    final = agg(shards, compact=True, schema=TILLS_SCHEMA).snapshot()
    tills = final.family("tills")
    for _fmt, till, _step, _skip, expected in self_killed:
        assert tills[till] == expected, till
    for _fmt, till in completing:
        assert tills[till] == per_writer
    for _fmt, till in victims:  # a line is printed only after its save returned
        assert acked[till] <= tills[till] <= acked[till] + 1, (till, outputs[till][1])
    assert final.get("orders", "refused") == sum(tills.values())
    assert shard_names(shards) == []  # every writer is dead and compacted away, leftovers too
