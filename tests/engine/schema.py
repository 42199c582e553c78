"""The engine's own small schema, for the engine's tests (the gate's tests use the gate's).

A shop, not a release gate: two labelled counters (one wide enough to hold a rolling upgrade's
extra value), an unlabelled counter and nothing the engine could mistake for the gate's. The
family names share the prefix ``shop``, which is the namespace the command line derives.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from gatemetrics import CounterStore, Family, Schema, shard_for

__all__ = [
    "BASKET_BUCKETS",
    "CHECKOUT_BUCKETS",
    "CODES",
    "HISTOGRAM_SCHEMA",
    "OTHER_SCHEMA",
    "OUTCOMES",
    "REQUESTS_AGGREGATE_SERIES",
    "REQUESTS_SCHEMA",
    "ROUTES",
    "SHOP_AGGREGATE_SERIES",
    "SHOP_FAMILIES",
    "SHOP_NAMESPACE",
    "SHOP_PIPELINE_FAMILIES",
    "SHOP_SCHEMA",
    "SHOP_SERIES",
    "TILLS",
    "TILLS_AGGREGATE_SERIES",
    "TILLS_SCHEMA",
    "WHYS",
    "WIDER_REQUESTS_SCHEMA",
    "WIDER_SHOP_SCHEMA",
    "dead_shard",
    "dead_shop_shard",
    "dead_shop_v1_shard",
    "record_order",
    "request_mix",
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
#: Every reason a refusal can have.
WHYS: tuple[str, ...] = ("no_stock", "no_money", "fraud")
# Every series an exposition of shop shards may ever carry, written out rather than derived from
# the schema under test (design.md section 4, invariant 1).
SHOP_SERIES: dict[str, set[tuple[str, str] | None]] = {
    "shop_orders_total": {("outcome", "paid"), ("outcome", "refused")},
    "shop_refusals_total": {("why", w) for w in WHYS},
    "shop_errors_total": {None},
}
SHOP_AGGREGATE_SERIES: dict[str, set[tuple[str, str] | None]] = {
    **SHOP_SERIES,
    "shop_quarantined_shards_total": {None},
    "shop_shards": {("state", "live"), ("state", "dead")},
}

#: Ten tills, so that each of many concurrent writers counts under a label value of its own.
TILLS = tuple(f"till{i}" for i in range(10))
#: The shop with one more family, by till: a superset of SHOP_SCHEMA (its shards map into it).
TILLS_SCHEMA = SHOP_SCHEMA.extend(
    [Family("shop_till_orders_total", "Orders, by till.", key="tills", label="till", values=TILLS)]
)
TILLS_AGGREGATE_SERIES: dict[str, set[tuple[str, str] | None]] = {
    **SHOP_SERIES,
    "shop_till_orders_total": {("till", t) for t in TILLS},
    "shop_quarantined_shards_total": {None},
    "shop_shards": {("state", "live"), ("state", "dead")},
}


def record_order(
    store: CounterStore,
    paid: bool,
    whys: Iterable[str] = (),
    *,
    error: bool = False,
    till: str | None = None,
) -> None:
    """Count one order in one atomic step: paid, or refused with each distinct reason once;
    optionally an error and (for a store of :data:`TILLS_SCHEMA`) its till.

    Readers see all of its increments or none, and a bound store saves once for it.
    """
    schema = store.schema
    slots = [schema.slot("orders", "paid" if paid else "refused")]
    if not paid:
        slots += [schema.slot("refusals", why) for why in dict.fromkeys(whys)]
    if error:
        slots.append(schema.slot("errors"))
    if till is not None:
        slots.append(schema.slot("tills", till))
    store.increment_slots(slots)


#: The shop with histograms: checkout time (no label) and basket size by outcome, between two
#: counters, so that integer slots, bucket slots and float cells interleave.
CHECKOUT_BUCKETS = (0.01, 0.1, 1.0)
BASKET_BUCKETS = (1.0, 5.0, 10.0, 50.0)
HISTOGRAM_SCHEMA = Schema(
    [
        SHOP_SCHEMA.families[0],
        Family(
            "shop_checkout_seconds",
            "Time a checkout takes.",
            key="checkout",
            kind="histogram",
            buckets=CHECKOUT_BUCKETS,
        ),
        Family(
            "shop_basket_items",
            "Items per basket, by outcome.",
            key="basket",
            label="outcome",
            values=OUTCOMES,
            kind="histogram",
            buckets=BASKET_BUCKETS,
        ),
        SHOP_SCHEMA.families[2],
    ]
)
#: The shop's web front: requests by route and status class, a family with two labels (6 x 3
#: series), added to the shop's families (so shop shards written before it fit it).
ROUTES = ("basket", "checkout", "refund", "search", "account", "login")
CODES = ("2xx", "4xx", "5xx")
REQUESTS_SCHEMA = SHOP_SCHEMA.extend(
    [
        Family(
            "shop_requests_total",
            "Requests, by route and status class.",
            key="requests",
            labels=(("route", ROUTES), ("code", CODES)),
        )
    ]
)
#: REQUESTS_SCHEMA with one more route and one more code: its shards fit this one.
WIDER_REQUESTS_SCHEMA = SHOP_SCHEMA.extend(
    [
        Family(
            "shop_requests_total",
            "Requests, by route and status class.",
            key="requests",
            labels=(("route", (*ROUTES, "wishlist")), ("code", (*CODES, "1xx"))),
        )
    ]
)
# Written out, not derived from the schema under test: the 18 (route, code) series.
REQUESTS_AGGREGATE_SERIES: dict[str, set[tuple[tuple[str, str], ...]]] = {
    "shop_orders_total": {(("outcome", "paid"),), (("outcome", "refused"),)},
    "shop_refusals_total": {(("why", w),) for w in WHYS},
    "shop_errors_total": {()},
    "shop_requests_total": {(("route", r), ("code", c)) for r in ROUTES for c in CODES},
    "shop_quarantined_shards_total": {()},
    "shop_shards": {(("state", "live"),), (("state", "dead"),)},
}


def request_mix(seed: int, n: int) -> list[tuple[str, str]]:
    """``n`` deterministic ``(route, code)`` pairs for worker ``seed``: a walk over the 18
    series in steps of 7 (coprime to 18, so any 18 in a row cover all of them), the same in the
    test process and its children."""
    width = len(ROUTES) * len(CODES)
    pairs = []
    for i in range(n):
        k = (seed + 7 * i) % width
        pairs.append((ROUTES[k // len(CODES)], CODES[k % len(CODES)]))
    return pairs


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
    return dead_shard(store, directory)


def dead_shard(store: CounterStore, directory: Path) -> str:
    """Save ``store`` into its shard in ``directory`` and let the owner go (the lifetime lock
    released, as when a worker exits): the shard is dead. Returns its file name."""
    shard = shard_for(store, directory)
    assert shard.save()
    path = shard.path
    assert path is not None
    shard.close(save=False)
    return os.path.basename(path)


def dead_shop_v1_shard(
    directory: Path, paid: int = 1, refused: int = 0, *, durability: str = "none"
) -> str:
    """Like :func:`dead_shop_shard`, written by the previous release; returns the ``.json``
    name."""
    from tests.shard_tools import LegacyV1Shard

    store = CounterStore(SHOP_SCHEMA)
    if paid:
        store.increment("orders", "paid", paid)
    if refused:
        store.increment("orders", "refused", refused)
        store.increment("refusals", "no_stock", refused)
    shard = LegacyV1Shard(store, directory, durability=durability)
    shard.save()
    name: str = shard.names()[0]
    shard.close(save=False)
    return name
