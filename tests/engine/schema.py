"""The engine's own small schema, for the engine's tests (the gate's tests use the gate's).

A shop, not a release gate: two labelled counters (one wide enough to hold a rolling upgrade's
extra value), an unlabelled counter and nothing the engine could mistake for the gate's. The
family names share the prefix ``shop``, which is the namespace the command line derives.
"""

from __future__ import annotations

import os
from pathlib import Path

from gatemetrics import CounterStore, Family, Schema, shard_for

__all__ = [
    "OTHER_SCHEMA",
    "OUTCOMES",
    "SHOP_FAMILIES",
    "SHOP_NAMESPACE",
    "SHOP_PIPELINE_FAMILIES",
    "SHOP_SCHEMA",
    "WIDER_SHOP_SCHEMA",
    "dead_shop_shard",
    "dead_shop_v1_shard",
]

OUTCOMES = ("paid", "refused")
SHOP_NAMESPACE = "shop"
SHOP_SCHEMA = Schema(
    [
        Family(
            "shop_orders_total",
            "Orders, by outcome.",
            key="orders",
            label="outcome",
            values=OUTCOMES,
        ),
        Family(
            "shop_refusals_total",
            "Refused orders, by why.",
            key="refusals",
            label="why",
            values=("no_stock", "no_money", "fraud"),
        ),
        Family("shop_errors_total", "Errors while counting.", key="errors"),
    ]
)
#: SHOP_SCHEMA with one more label value: shards of SHOP_SCHEMA fit it (a rolling upgrade).
WIDER_SHOP_SCHEMA = Schema(
    [
        Family(
            "shop_orders_total",
            "Orders, by outcome.",
            key="orders",
            label="outcome",
            values=(*OUTCOMES, "cancelled"),
        ),
        *SHOP_SCHEMA.families[1:],
    ]
)
SHOP_FAMILIES = [f.name for f in SHOP_SCHEMA.families]
SHOP_PIPELINE_FAMILIES = ["shop_quarantined_shards_total", "shop_shards"]


#: A schema that no shop shard fits (other families altogether).
OTHER_SCHEMA = Schema([Family("mill_grain_total", "Grain milled.", key="grain")])


def dead_shop_shard(directory: Path, paid: int = 1, refused: int = 0) -> str:
    """Save a shop store whose owner then goes (lock released); returns the file name."""
    store = CounterStore(SHOP_SCHEMA)
    if paid:
        store.increment("orders", "paid", paid)
    if refused:
        store.increment("orders", "refused", refused)
        store.increment("refusals", "no_stock", refused)
    shard = shard_for(store, directory)
    assert shard.save()
    path = shard.path
    assert path is not None
    shard.close(save=False)
    return os.path.basename(path)


def dead_shop_v1_shard(directory: Path, paid: int = 1) -> str:
    """Like :func:`dead_shop_shard`, written by the previous release; returns the ``.json``
    name."""
    from tests.shard_tools import LegacyV1Shard

    store = CounterStore(SHOP_SCHEMA)
    store.increment("orders", "paid", paid)
    shard = LegacyV1Shard(store, directory, durability="none")
    shard.save()
    name: str = shard.names()[0]
    shard.close(save=False)
    return name
