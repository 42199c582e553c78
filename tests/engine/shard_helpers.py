"""Helpers shared by the shard tests (saving, binding, fork, crash points): reading a shard
directory back, stopped processes, injected races."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA, GateMetricStore
from gatemetrics import (
    Aggregate,
    aggregate_dir,
)
from gatemetrics._format import Layout, ShardRecord, decode_v2, parse_name
from tests.processes import wait_until

__all__ = [
    "CLEAN",
    "SHARD_NAME",
    "agg",
    "files",
    "gate_counts",
    "header_length",
    "interfere_after_create",
    "owned",
    "poll_while_running",
    "process_state",
    "raise_at",
    "read_shard",
    "totals",
    "wait_stopped",
]

SHARD_NAME = re.compile(r"v2-[0-9a-f]{8}-\d+-[0-9a-f]+-[0-9a-f]{16}\.shard\Z")
# A directory whose every shard was absorbed (compaction also records the schema it holds).
CLEAN = ["aggregate.lock", "archive.json", "schema.json"]


def agg(directory: Path, *, compact: bool = False) -> Aggregate:
    return aggregate_dir(directory, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=compact)


def totals(directory: Path) -> dict[str, int]:
    return agg(directory).snapshot().family("decision_counts")


def files(directory: Path, suffix: str) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.endswith(suffix))


def owned(directory: Path) -> list[tuple[str, str]]:
    """Every shard-family file of ``directory`` with its kind (a v1 lock file would show too)."""
    return [(n, p[1]) for n in sorted(os.listdir(directory)) if (p := parse_name(n)) is not None]


def read_shard(path: str | Path) -> ShardRecord:
    """Decode a v2 shard file as the aggregator would."""
    path = Path(path)
    parsed = parse_name(path.name)
    assert parsed is not None
    assert parsed[1] == "v2"
    return decode_v2(path.read_bytes(), GATE_SCHEMA, parsed[0])


def header_length(data: bytes) -> int:
    length: int = Layout.PREFIX.unpack_from(data)[3]
    return length


def gate_counts(allows: int, *, outcome: bool) -> tuple[int, ...]:
    """The counts of ``allows`` ALLOW decisions, then optionally one DENY check outcome."""
    store = GateMetricStore()
    for _ in range(allows):
        store.record_decision(True)
    if outcome:
        store.record_outcome(False, ["TIER_FAIL", "DRIFT_ALERT"], breach=True)
    return store.snapshot().counts


def process_state(pid: int) -> str:
    """The state letter of ``/proc/<pid>/stat`` ("T" for a stopped process)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(proc: subprocess.Popen[str]) -> None:
    def stopped() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"child exited ({proc.returncode}) instead of stopping: {err}")
        return process_state(proc.pid) == "T"

    wait_until(stopped, timeout=30)


def poll_while_running(
    proc: subprocess.Popen[str], directory: Path, timeout: float = 30.0
) -> list[dict[str, int]]:
    """Aggregate ``directory`` over and over while ``proc`` runs, and once after it exited."""
    seen: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"child {proc.pid} still running after {timeout} s")
        seen.append(totals(directory))
        time.sleep(0.002)
    seen.append(totals(directory))
    return seen


def raise_at(step: str, exc: BaseException) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            raise exc

    return hook


def interfere_after_create(
    monkeypatch: pytest.MonkeyPatch, name: str, action: Callable[[str], None]
) -> None:
    """Run ``action(path)`` right after the owner creates file ``name``, before its ``flock``.

    The races of a brand-new shard with an aggregator cannot be forced from outside the
    process, so the aggregator's real system calls are injected at that instant.
    """
    real_open = os.open

    def spying_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if flags & os.O_CREAT and os.path.basename(os.fspath(path)) == name:
            action(os.fspath(path))
        return fd

    monkeypatch.setattr(os, "open", spying_open)
