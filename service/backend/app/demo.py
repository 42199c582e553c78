"""``gatemetrics demo``: real worker processes, a SIGKILL, a recycle, and exact totals.

On a temporary shard directory, ``workers`` forked processes each bind a
:class:`GateMetricStore` write-through to the directory and make a seeded, realistic mix of
release-gate checks through :class:`ReleaseGate` (policy results, overrides valid, expired and
attempted on absolute blocks), auditing every decision to one durable JSON-lines audit log in
the same temporary directory. Mid-run one worker is SIGKILLed (right after a check returned) and
another is recycled (it exits gracefully and a fresh process takes over its remaining work, as with
gunicorn's ``--max-requests``). While they run, the parent aggregates the directory again and
again and checks that the totals never go down; after the kill and the recycle it compacts the
dead workers away. At the end it compacts once more and prints the exposition and a table of
the totals it expected (reported by the workers, check by check) against the totals it counted.
The audit log must hold exactly one entry per check that returned. The exit status is 0 only
when every series is exact and the audit log agrees.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Literal, TextIO

from backend.app.testing.audit import JsonlAuditLog
from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA, GateMetricStore
from backend.app.testing.release_gate import GateDecision, ReleaseGate, ReleaseOverride
from backend.app.testing.release_policy import (
    ABSOLUTE_BLOCK_REASONS,
    REASON_VERDICTS,
    BlockReasonCode,
    ReleasePolicyResult,
    ReleaseVerdict,
)
from gatemetrics import Aggregate, aggregate_dir, is_shard_file

__all__ = ["register", "run_demo"]

OverrideKind = Literal["none", "valid", "expired"]

_ABSOLUTE = tuple(sorted(ABSOLUTE_BLOCK_REASONS))
# Reasons a HOLD may carry (their minimum verdict is a hold); any reason may come with a BLOCK.
_HOLD_REASONS = tuple(r for r, v in REASON_VERDICTS.items() if v is ReleaseVerdict.RELEASE_HOLD)
_BLOCK_REASONS = tuple(r for r in BlockReasonCode if r not in ABSOLUTE_BLOCK_REASONS)
_SCOPE = "payments-api"
_NOW_MS = 1_700_000_000_000
_PROGRESS_EVERY = 50
_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Check:
    """One planned gate check: the policy's verdict and reasons, and any override offered."""

    verdict: ReleaseVerdict
    reasons: tuple[BlockReasonCode, ...]
    override: OverrideKind


def _plan(decisions: int, seed: int) -> list[Check]:
    """A seeded, realistic mix: mostly OK; holds, some overridden; blocks; breach attempts."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible demo mix, not security
    ok, hold, block = ReleaseVerdict
    plan: list[Check] = []
    for _ in range(decisions):
        roll = rng.random()
        if roll < 0.55:
            plan.append(Check(ok, (), "none"))
        elif roll < 0.80:
            reasons = tuple(rng.sample(_HOLD_REASONS, rng.randint(1, 3)))
            override: OverrideKind = rng.choice(("none", "none", "valid", "valid", "expired"))
            plan.append(Check(hold, reasons, override))
        elif roll < 0.97:
            plan.append(Check(block, tuple(rng.sample(_BLOCK_REASONS, 2)), "none"))
        else:
            plan.append(Check(block, (rng.choice(_ABSOLUTE),), "valid"))
    return plan


def _override(kind: OverrideKind) -> ReleaseOverride | None:
    if kind == "none":
        return None
    created = _NOW_MS - 60_000 if kind == "valid" else _NOW_MS - 7_200_000
    return ReleaseOverride(3600, created, _SCOPE, "demo: approved by the release manager", "demo")


def _series(decision: GateDecision) -> list[str]:
    """The series one returned decision must have added to."""
    out = [f"decision {decision.decision}"]
    if not decision.allowed:
        out += [f"reason {r.value}" for r in dict.fromkeys(decision.reasons)]
    if "CONTRACT_BREACH_NO_OVERRIDE" in decision.audit_detail:
        out.append("contract breach")
    if decision.audit_detail.startswith("AUDIT_WRITE_FAILED"):
        out.append("audit write failure")
    return out


def _check(gate: ReleaseGate, check: Check) -> GateDecision:
    result = ReleasePolicyResult(check.verdict, check.reasons)
    return gate.check(result, _override(check.override), release_scope=_SCOPE, now_ms=_NOW_MS)


# -- worker processes ------------------------------------------------------------------------


def _worker(
    conn: Connection, shard_dir: str, audit_path: str, checks: list[Check], pause_at: int
) -> None:
    """A worker: its own store, bound write-through, behind a ReleaseGate with a durable audit
    log; it reports the series every returned decision must have added to."""
    store = GateMetricStore()
    binding = store.bind_to_dir(shard_dir)
    gate = ReleaseGate(audit_log=JsonlAuditLog(audit_path), metric_store=store)
    expected: Counter[str] = Counter()
    for i, check in enumerate(checks, 1):
        expected.update(_series(_check(gate, check)))
        if i == pause_at:
            # Everything up to here returned (and, write-through, is on disk). Wait here to be
            # SIGKILLed: the parent then knows exactly which checks the kill came after.
            conn.send(("paused", i, dict(expected)))
            conn.recv()
        elif i % _PROGRESS_EVERY == 0:
            conn.send(("progress", i, dict(expected)))
    conn.send(("done", len(checks), dict(expected)))
    binding.close()  # a graceful exit: final save, lifetime lock released


@dataclass
class _Slot:
    """One worker position; a recycled position gets a second process."""

    name: str
    checks: list[Check]
    role: Literal["steady", "killed", "recycled"]
    done: int = 0
    expected: Counter[str] = field(default_factory=Counter)
    proc: multiprocessing.process.BaseProcess | None = None
    conn: Connection | None = None
    generation: int = 0
    offset: int = 0  # checks made by this position's earlier processes


class _Demo:
    def __init__(
        self, plan: list[Check], workers: int, shard_dir: str, audit_path: str, out: TextIO
    ) -> None:
        self.shard_dir = shard_dir
        self.audit_path = audit_path
        self.out = out
        self.ctx = multiprocessing.get_context("fork")
        roles: list[Literal["steady", "killed", "recycled"]] = ["killed", "recycled"]
        roles += ["steady"] * (workers - 2)
        self.slots = [_Slot(f"w{i + 1}", plan[i::workers], role) for i, role in enumerate(roles)]
        self.last_totals: tuple[int, ...] = tuple(GATE_SCHEMA.zeros())
        self.aggregations = 0
        self.compactions = 0
        self.processes = 0
        self.planned = len(plan)
        self.shown = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start(self, slot: _Slot, checks: list[Check], pause_at: int, offset: int = 0) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=_worker,
            args=(child, self.shard_dir, self.audit_path, checks, pause_at),
            daemon=True,
        )
        proc.start()
        child.close()
        slot.proc, slot.conn = proc, parent
        slot.offset = offset
        slot.generation += 1
        self.processes += 1
        label = "replacement " if slot.generation > 1 else ""
        self.say(f"  start   {label}worker {slot.name} pid {proc.pid}: {len(checks)} checks")

    def check_monotonic(self, result: Aggregate) -> None:
        self.aggregations += 1
        if any(n < o for n, o in zip(result.counts, self.last_totals, strict=True)):
            raise AssertionError("an aggregate went down: exactness is broken")
        self.last_totals = result.counts

    def aggregate(self, *, compact: bool) -> Aggregate:
        result = aggregate_dir(
            self.shard_dir, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=compact
        )
        self.check_monotonic(result)
        if compact:
            self.compactions += 1
        return result

    def run(self) -> None:
        for slot in self.slots:
            half = len(slot.checks) // 2
            if slot.role == "killed":
                self.start(slot, slot.checks, pause_at=max(half, 1))
            elif slot.role == "recycled":
                self.start(slot, slot.checks[:half], pause_at=-1)
            else:
                self.start(slot, slot.checks, pause_at=-1)
        deadline = time.monotonic() + _TIMEOUT_S
        while any(s.conn is not None for s in self.slots):
            if time.monotonic() > deadline:
                raise TimeoutError("demo workers did not finish in time")
            conns = [s.conn for s in self.slots if s.conn is not None]
            for ready in wait(conns, timeout=0.2):
                slot = next(s for s in self.slots if s.conn is ready)
                self.handle(slot)
            self.aggregate(compact=False)

    def handle(self, slot: _Slot) -> None:
        assert slot.conn is not None
        assert slot.proc is not None
        try:
            kind, done, expected = slot.conn.recv()
        except EOFError:
            raise RuntimeError(f"worker {slot.name} died unexpectedly") from None
        slot.done = slot.offset + done
        if kind == "progress":
            self.progress()
            return
        slot.expected.update(expected)
        slot.conn.close()
        slot.conn = None
        pid = slot.proc.pid
        if kind == "paused":
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            slot.proc.join(10)
            self.say(
                f"  SIGKILL worker {slot.name} pid {pid} right after check {slot.done}"
                f" (exit status {slot.proc.exitcode}); its remaining checks are never made"
            )
            slot.checks = slot.checks[: slot.done]
            self.compact_mid_run()
            return
        slot.proc.join(10)
        if slot.role == "recycled" and slot.generation == 1:
            self.say(
                f"  recycle worker {slot.name} pid {pid}: exited gracefully after"
                f" {slot.done} checks"
            )
            self.start(slot, slot.checks[slot.done :], pause_at=-1, offset=slot.done)
            self.compact_mid_run()
            return
        self.say(f"  done    worker {slot.name} pid {pid}: {slot.done}/{len(slot.checks)} checks")

    def progress(self) -> None:
        """One combined line each time another tenth of the plan has returned."""
        done = sum(s.done for s in self.slots)
        step = max(self.planned // 10, 1)
        if done // step > self.shown // step:
            self.shown = done
            parts = "  ".join(f"{s.name} {s.done}/{len(s.checks)}" for s in self.slots)
            self.say(f"  progress {done:>5}/{self.planned} checks   {parts}")

    def compact_mid_run(self) -> None:
        result = self.aggregate(compact=True)
        absorbed = result.compaction.absorbed if result.compaction else 0
        self.say(
            f"  compact while workers run: {result.live} live, {result.dead} dead shard(s);"
            f" {absorbed} absorbed into the archive"
        )


@contextmanager
def _reaping(demo: _Demo) -> Iterator[None]:
    """Whatever happens (a closed stdout, an error), no worker outlives the demo."""
    try:
        yield
    finally:
        for slot in demo.slots:
            proc = slot.proc
            if proc is not None and proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)


def run_demo(*, decisions: int = 2000, workers: int = 4, seed: int = 7, out: TextIO) -> int:
    """Run the demonstration; returns 0 when the counted totals equal the expected ones."""
    if workers < 2:
        raise ValueError("the demo needs at least 2 workers (one killed, one recycled)")
    plan = _plan(decisions, seed)
    with tempfile.TemporaryDirectory(prefix="gatemetrics-demo-") as tmp:
        shard_dir = os.path.join(tmp, "shards")
        audit_path = os.path.join(tmp, "audit.jsonl")
        os.mkdir(shard_dir)
        demo = _Demo(plan, workers, shard_dir, audit_path, out)
        demo.say(
            f"demo: {decisions} release-gate checks by {workers} worker processes (seed {seed}),"
            f" shards in {shard_dir}, audit log {audit_path}"
        )
        with _reaping(demo):
            demo.run()
        final = demo.aggregate(compact=True)
        files = sorted(os.listdir(shard_dir))
        with open(audit_path, "rb") as f:
            audited = sum(1 for line in f if line.strip())
        out.write("\n")
        out.write(final.render_prometheus())
        return _summary(demo, final, files, audited, out)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gatemetrics demo``: the entry point ``demo`` of group ``gatemetrics.commands``
    (service/pyproject.toml), which the engine's command line loads when it builds its parser.

    The parser's ``handler`` default is what the command line runs: ``handler(args) -> int``.
    """
    demo = commands.add_parser(
        "demo",
        help="run a self-contained multiprocess demonstration and check the counts",
        description="Worker processes make realistic release-gate decisions into a "
        "temporary shard directory; one is SIGKILLed and one recycled mid-run. The "
        "aggregator then compacts the directory and prints the exposition and a summary of "
        "expected against counted totals. Exit 0 only when they are equal.",
    )
    demo.add_argument("--decisions", type=_positive_int, default=2000, help="decisions to make")
    demo.add_argument("--workers", type=_worker_count, default=4, help="worker processes (2-16)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    demo.set_defaults(handler=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    return run_demo(decisions=args.decisions, workers=args.workers, seed=args.seed, out=sys.stdout)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _worker_count(text: str) -> int:
    value = _positive_int(text)
    if not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be between 2 and 16: {value}")
    return value


def _shard_files(names: list[str]) -> int:
    """How many of ``names`` are shard files of either format (shards, v1 lock and temp files,
    v2 shards being created)."""
    return sum(1 for name in names if is_shard_file(name))


def _summary(demo: _Demo, final: Aggregate, files: list[str], audited: int, out: TextIO) -> int:
    expected: Counter[str] = Counter()
    for slot in demo.slots:
        expected.update(slot.expected)
    got = final.snapshot()
    rows = [(f"decision {d}", got.get("decision_counts", d)) for d in ("ALLOW", "DENY")]
    rows += [(f"reason {r.value}", got.get("reason_counts", r.value)) for r in BlockReasonCode]
    rows.append(("contract breach", got.get("breach_counts", "NO_OVERRIDE")))
    rows.append(("audit write failure", got.get("audit_write_failures")))
    print("\nsummary:", file=out)
    print(
        f"  {demo.processes} worker processes (1 SIGKILLed, 1 recycled),"
        f" {demo.aggregations} aggregations (never decreasing), {demo.compactions} compactions",
        file=out,
    )
    shards = _shard_files(files)
    print(f"  directory after compaction: {', '.join(files)} ({shards} shard files)", file=out)
    print(f"  {'series':<28} {'expected':>9} {'counted':>9}", file=out)
    ok = True
    for name, count in rows:
        want = expected[name]
        mark = "" if want == count else "  MISMATCH"
        ok = ok and want == count
        print(f"  {name:<28} {want:>9} {count:>9}{mark}", file=out)
    made = expected["decision ALLOW"] + expected["decision DENY"]
    # Every returned check is timed once, in the same atomic save as its decision.
    timed = got.histogram("check_duration")[0][-1]
    ok = ok and timed == made
    mark = "" if timed == made else "  MISMATCH"
    print(f"  {'checks timed (histogram)':<28} {made:>9} {timed:>9}{mark}", file=out)
    print(
        f"  checks planned {demo.planned}, returned {made}"
        f" (the SIGKILLed worker never made the other {demo.planned - made})",
        file=out,
    )
    audit_ok = audited == made
    print(
        f"  audit log entries: {audited} (one per returned check: {'yes' if audit_ok else 'NO'})",
        file=out,
    )
    ok = ok and audit_ok
    print("result: exact" if ok else "result: MISMATCH", file=out)
    return 0 if ok else 1
