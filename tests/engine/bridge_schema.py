"""The schema of the bridge tests over real histograms, importable by their worker processes: a
two-label counter, a histogram with two labels, and one without a label whose bounds pass a
million (where prometheus_client writes ``le`` with an exponent, ``2.5e+06``)."""

from __future__ import annotations

from gatemetrics import Family, Schema

NAMESPACE = "bridge"
ROUTES = ("create", "read")
CODES = ("2xx", "4xx", "5xx")
METHODS = ("card", "invoice")
REGIONS = ("eu", "us")
LATENCY_BOUNDS = (0.005, 0.1, 1.0)
UPLOAD_BOUNDS = (1024.0, 1e6, 2.5e6)

SCHEMA = Schema(
    [
        Family(
            "bridge_requests_total",
            "Requests, by route and status class.",
            key="requests",
            labels=(("route", ROUTES), ("code", CODES)),
        ),
        Family(
            "bridge_checkout_seconds",
            "Checkout latency, by payment method and region.",
            key="checkout",
            labels=(("method", METHODS), ("region", REGIONS)),
            kind="histogram",
            buckets=LATENCY_BOUNDS,
        ),
        Family(
            "bridge_upload_bytes",
            "Upload sizes.",
            key="upload",
            kind="histogram",
            buckets=UPLOAD_BOUNDS,
        ),
        Family("bridge_write_failures_total", "Failed metric saves.", key="write_failures"),
    ]
)
