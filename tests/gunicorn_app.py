"""A WSGI app for the real-gunicorn tests: one release-gate decision per request.

The store is created and bound write-through at import: in the master with ``--preload``
(each forked worker then starts over as a new incarnation), in every worker without it.
``GET /allow`` and ``GET /deny`` count a decision; ``GET /pid`` answers the worker's pid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from backend.app.testing.gate_metrics import GateMetricStore

STORE = GateMetricStore()
STORE.bind_to_dir(os.environ["GATEMETRICS_DIR"])


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/pid":
        body = str(os.getpid()).encode()
    else:
        STORE.record_decision(path == "/allow", ["TIER_FAIL", "NO_DRIFT_DATA"])
        body = b"counted"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
