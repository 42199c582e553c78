"""Helpers shared by the shard tests (saving, binding, fork, crash points): the shop's
recorders, reading a shard directory back, stopped processes, injected races.

The recorders are importable in the tests' child processes too (``from tests.engine.shard_helpers
import pay, refuse, shop_store``), so a child counts exactly as the test process does.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gatemetrics import (
    Aggregate,
    CounterStore,
    aggregate_dir,
)
from gatemetrics._format import Layout, ShardRecord, decode_v2, parse_name
from tests.engine.schema import SHOP_NAMESPACE, SHOP_SCHEMA
from tests.processes import wait_until

__all__ = [
    "CLEAN",
    "FAILURES",
    "SHARD_NAME",
    "WHYS",
    "agg",
    "files",
    "header_length",
    "interfere_after_create",
    "owned",
    "pay",
    "poll_while_running",
    "process_state",
    "raise_at",
    "read_shard",
    "refuse",
    "shop_counts",
    "shop_store",
    "totals",
    "wait_stopped",
]

SHARD_NAME = re.compile(r"v2-[0-9a-f]{8}-\d+-[0-9a-f]+-[0-9a-f]{16}\.shard\Z")
# A directory whose every shard was absorbed (compaction also records the schema it holds).
CLEAN = ["aggregate.lock", "archive.json", "schema.json"]

#: The shop's unlabelled family, given as ``failure_key``: where failed saves are counted.
FAILURES = "errors"
#: Every reason a refusal can have: ``refuse(store, *WHYS)`` adds four series in one step.
WHYS: tuple[str, ...] = SHOP_SCHEMA.families[1].values
_REFUSED = SHOP_SCHEMA.slot("orders", "refused")


# -- the shop's recorders --------------------------------------------------------------------


def shop_store(*, clock: Callable[[], float] = time.time) -> CounterStore:
    return CounterStore(SHOP_SCHEMA, clock=clock)


def pay(store: CounterStore) -> None:
    """Count one paid order (one public write: a bound store saves once)."""
    store.increment("orders", "paid")


def refuse(store: CounterStore, *whys: str) -> None:
    """Count one refused order and each distinct reason given, in one atomic step: readers see
    all of its increments or none, and a bound store saves once for it."""
    slots = [_REFUSED, *(SHOP_SCHEMA.slot("refusals", why) for why in dict.fromkeys(whys))]
    store.increment_slots(slots)


def shop_counts(paid: int, *, refusal: bool) -> tuple[int, ...]:
    """The counts of ``paid`` paid orders, then optionally one refusal for every reason."""
    store = shop_store()
    for _ in range(paid):
        pay(store)
    if refusal:
        refuse(store, *WHYS)
    return store.snapshot().counts


# -- reading a directory back ----------------------------------------------------------------


def agg(directory: Path, *, compact: bool = False) -> Aggregate:
    return aggregate_dir(directory, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, compact=compact)


def totals(directory: Path) -> dict[str, int]:
    """The merged ``orders`` of ``directory``: ``{"paid": n, "refused": n}``."""
    return agg(directory).snapshot().family("orders")


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
    return decode_v2(path.read_bytes(), SHOP_SCHEMA, parsed[0])


def header_length(data: bytes) -> int:
    length: int = Layout.PREFIX.unpack_from(data)[3]
    return length


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
