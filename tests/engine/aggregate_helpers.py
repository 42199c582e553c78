"""Helpers of the aggregator's tests: reading a directory back, the test process's own live
owners, and the slots of a v2 shard."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA, GateMetricStore
from gatemetrics import (
    aggregate_dir,
    shard_for,
)
from gatemetrics._format import (
    Layout,
    parse_name,
)
from gatemetrics.aggregate import Aggregate
from tests.exposition_parser import parse
from tests.shard_tools import (
    AGGREGATE_SERIES,
    LegacyV1Shard,
    legacy_bind,
)


def agg(directory: Path, *, compact: bool = False, **kwargs: Any) -> Aggregate:
    return aggregate_dir(
        directory, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=compact, **kwargs
    )


def decisions(directory: Path) -> dict[str, int]:
    return agg(directory).snapshot().family("decision_counts")


def assert_bounded(result: Aggregate) -> None:
    """Invariant 1: only declared series, each family once, in the documented order."""
    families = parse(result.render_prometheus())
    assert list(families) == list(AGGREGATE_SERIES)
    for name, fam in families.items():
        assert set(fam.samples) == AGGREGATE_SERIES[name]


def live_stores() -> Iterator[Callable[[Path, int], GateMetricStore]]:
    """A fixture's body: stores of this process bound to a directory (format v2), closed at
    teardown."""
    bindings = []

    def make(directory: Path, allows: int) -> GateMetricStore:
        store = GateMetricStore()
        bindings.append(store.bind_to_dir(directory))
        for _ in range(allows):
            store.record_decision(True)
        return store

    yield make
    for binding in bindings:
        binding.close()


def live_v1_owners() -> Iterator[Callable[[Path, int], LegacyV1Shard]]:
    """A fixture's body: previous-release owners living in this process (v1, write-through)."""
    shards: list[LegacyV1Shard] = []

    def make(directory: Path, allows: int) -> LegacyV1Shard:
        store = GateMetricStore()
        shard = legacy_bind(store, directory, durability="none")
        shards.append(shard)
        for _ in range(allows):
            store.record_decision(True)
        return shard

    yield make
    for shard in shards:
        shard.store.set_change_hook(None)
        shard.close(save=False)


def shard_names(directory: Path) -> list[str]:
    """Every file of the shard family in ``directory``: v1 (``shard-``) and v2 (``v2-``)."""
    return sorted(p for p in os.listdir(directory) if p.startswith(("shard-", "v2-")))


def incarnation_of(name: str) -> str:
    parsed = parse_name(name)
    assert parsed is not None, name
    return parsed[0]


def live_v2_name(store: GateMetricStore, directory: Path) -> str:
    path = shard_for(store, directory).path
    assert path is not None
    return os.path.basename(path)


def v2_slots(data: bytes) -> list[tuple[int, int]]:
    """``(offset, seq)`` of both slots, in file order."""
    slot_offset, stride = Layout.PREFIX.unpack_from(data)[4:6]
    offsets = [slot_offset, slot_offset + stride]
    return [(o, struct.unpack_from("<Q", data, o)[0]) for o in offsets]


def tear(data: bytes, offset: int) -> bytes:
    """Flip one byte inside the slot at ``offset`` (its checksum then fails)."""
    at = offset + 40  # inside the counts
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
