"""Helpers of the aggregator's tests: reading a shop directory back, the test process's own live
owners, and the slots of a v2 shard.

The aggregator's tests count the engine's own small schema (:mod:`tests.engine.schema`), never
the release gate's.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gatemetrics import CounterStore, Schema, aggregate_dir, bind, shard_for
from gatemetrics._format import Layout, parse_name
from gatemetrics.aggregate import Aggregate
from tests.engine.schema import SHOP_AGGREGATE_SERIES, SHOP_NAMESPACE, SHOP_SCHEMA, record_order
from tests.exposition_parser import parse
from tests.shard_tools import LegacyV1Shard, legacy_bind

#: Where a bound shop store counts its failed saves (as the gate counts its metric write failures).
FAILURES = "errors"


def agg(
    directory: Path, *, compact: bool = False, schema: Schema = SHOP_SCHEMA, **kwargs: Any
) -> Aggregate:
    return aggregate_dir(directory, schema, namespace=SHOP_NAMESPACE, compact=compact, **kwargs)


def orders(directory: Path) -> dict[str, int]:
    """The merged ``orders`` of ``directory``: ``{"paid": n, "refused": n}``."""
    return agg(directory).snapshot().family("orders")


def assert_bounded(
    result: Aggregate, series: dict[str, set[tuple[str, str] | None]] = SHOP_AGGREGATE_SERIES
) -> None:
    """Invariant 1: only declared series, each family once, in the documented order."""
    families = parse(result.render_prometheus())
    assert list(families) == list(series)
    for name, fam in families.items():
        assert set(fam.samples) == series[name]


def shop_store() -> CounterStore:
    return CounterStore(SHOP_SCHEMA)


def live_stores() -> Iterator[Callable[[Path, int], CounterStore]]:
    """A fixture's body: stores of this process bound to a directory (format v2), closed at
    teardown."""
    bindings = []

    def make(directory: Path, paid: int) -> CounterStore:
        store = shop_store()
        bindings.append(bind(store, directory, failure_key=FAILURES))
        for _ in range(paid):
            record_order(store, True)
        return store

    yield make
    for binding in bindings:
        binding.close()


def live_v1_owners() -> Iterator[Callable[[Path, int], LegacyV1Shard]]:
    """A fixture's body: previous-release owners living in this process (v1, write-through)."""
    shards: list[LegacyV1Shard] = []

    def make(directory: Path, paid: int) -> LegacyV1Shard:
        store = shop_store()
        shard = legacy_bind(store, directory, durability="none")
        shards.append(shard)
        for _ in range(paid):
            record_order(store, True)
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


def live_v2_name(store: CounterStore, directory: Path) -> str:
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
