"""Helpers shared by the shard, aggregator and CLI tests: the series the gate may export,
dead shards, lock probes, and running a check in a forked child."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_policy import BlockReasonCode
from gatemetrics import shard_for

REASONS = [r.value for r in BlockReasonCode]
GATE_FAMILIES = [
    "release_gate_decision_total",
    "release_gate_reason_total",
    "release_gate_contract_breach_total",
    "release_gate_audit_write_failures_total",
    "release_gate_metric_write_failures_total",
]
PIPELINE_FAMILIES = ["release_gate_quarantined_shards_total", "release_gate_shards"]
# Every series an exposition may ever carry (design.md section 4, invariant 1).
GATE_SERIES: dict[str, set[tuple[str, str] | None]] = {
    "release_gate_decision_total": {("decision", "ALLOW"), ("decision", "DENY")},
    "release_gate_reason_total": {("reason", r) for r in REASONS},
    "release_gate_contract_breach_total": {("kind", "NO_OVERRIDE")},
    "release_gate_audit_write_failures_total": {None},
    "release_gate_metric_write_failures_total": {None},
}
AGGREGATE_SERIES: dict[str, set[tuple[str, str] | None]] = {
    **GATE_SERIES,
    "release_gate_quarantined_shards_total": {None},
    "release_gate_shards": {("state", "live"), ("state", "dead")},
}


def dead_shard(directory: Path, allows: int = 1, denies: int = 0) -> str:
    """Save a store whose owner then goes (lock released); returns the shard's file name."""
    store = GateMetricStore()
    for _ in range(allows):
        store.record_decision(True)
    for _ in range(denies):
        store.record_decision(False, ["OPS_GATE_FAIL"])
    shard = shard_for(store, directory)
    assert shard.save()
    path = shard.path
    assert path is not None
    shard.close(save=False)
    return os.path.basename(path)


def is_locked(path: str | Path) -> bool:
    """Whether some open file description holds an flock on ``path`` (the aggregator's probe)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def in_forked_child(check: Callable[[], bool]) -> bool:
    """Run ``check`` in a real ``os.fork()`` child; True if it returned True there.

    The child always leaves through ``os._exit`` (never through pytest's machinery).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = False
        try:
            ok = check()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
