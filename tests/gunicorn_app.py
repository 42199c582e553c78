"""A WSGI app for the real-gunicorn tests: one order of the engine tests' shop per request.

The store (:data:`tests.engine.schema.SHOP_SCHEMA`) is created and bound write-through at import:
in the master with ``--preload`` (each forked worker then starts over as a new incarnation), in
every worker without it. ``GET /pay`` and ``GET /refuse`` count an order; ``GET /pid`` answers the
worker's pid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from gatemetrics import CounterStore, bind
from tests.engine.schema import SHOP_SCHEMA, record_order

STORE = CounterStore(SHOP_SCHEMA)
bind(STORE, os.environ["GATEMETRICS_DIR"], failure_key="errors")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/pid":
        body = str(os.getpid()).encode()
    else:
        record_order(STORE, path == "/pay", ["no_stock", "fraud"])
        body = b"counted"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
