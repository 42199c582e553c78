"""The expositions and both bridges over REAL shards: worker processes record a two-label counter,
a two-label histogram and an unlabelled one (one worker exits, one is SIGKILLed), and every way
of reading the directory (``render_prometheus``, ``render_openmetrics``, the prometheus_client
collector through both of its ``generate_latest``, the WSGI helper under wsgiref, promtool) gives
exactly what the workers recorded, each bucket under one and the same ``le`` everywhere."""

from __future__ import annotations

import http.client
import json
import math
import random
import subprocess
import threading
import wsgiref.simple_server
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from gatemetrics import (
    le_labels,
    metrics_wsgi_app,
    read_dir,
    render_json,
    render_openmetrics,
    render_prometheus,
)
from gatemetrics.exposition import samples
from gatemetrics.prometheus_client import ShardDirectoryCollector
from tests.engine.bridge_schema import (
    CODES,
    LATENCY_BOUNDS,
    METHODS,
    NAMESPACE,
    REGIONS,
    ROUTES,
    SCHEMA,
    UPLOAD_BOUNDS,
)
from tests.processes import Reaper, read_line

# Dyadic latencies and whole-number sizes: every partial sum is exact, so a worker's running sum,
# the aggregate's fsum of the shards' sums and the fsum of all observations are the same float.
# 1.0 and 1024.0 sit exactly on a bound (counted in that bucket, as prometheus_client does).
LATENCIES = (0.001953125, 0.0625, 0.5, 1.0, 0.75, 4.0)
SIZES = (512.0, 1024.0, 999_999.0, 1_000_001.0, 2.5e6, 3e6)

WORKER = """
import json
from gatemetrics import CounterStore, bind
from tests.engine.bridge_schema import SCHEMA
store = CounterStore(SCHEMA)
bind(store, sys.argv[1], failure_key="write_failures")  # write-through: SIGKILL loses nothing
requests = store.family("requests")
checkout = store.family("checkout")
for i, op in enumerate(json.loads(sys.argv[2])):
    # Handles and the keyword calls alternate: both paths must land in the same cells.
    if op[0] == "request":
        if i % 2:
            requests.labels(op[1], op[2]).inc()
        else:
            store.increment("requests", route=op[1], code=op[2])
    elif op[0] == "checkout":
        if i % 2:
            checkout.labels(method=op[1], region=op[2]).observe(op[3])
        else:
            store.observe("checkout", op[3], method=op[1], region=op[2])
    else:
        store.observe("upload", op[1])
print("recorded", flush=True)
sys.stdin.readline()  # EOF: exit (final save at exit); or the test SIGKILLs it here
"""


class Recorded:
    """What the workers recorded, as a plain model."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.checkout: dict[tuple[str, str], list[float]] = {
            (m, r): [] for m in METHODS for r in REGIONS
        }
        self.upload: list[float] = []

    def plan(self, rng: random.Random, n: int) -> list[list[Any]]:
        ops: list[list[Any]] = []
        for _ in range(n):
            kind = rng.choice(("request", "checkout", "upload"))
            if kind == "request":
                route, code = rng.choice(ROUTES), rng.choice(CODES)
                self.requests[route, code] += 1
                ops.append([kind, route, code])
            elif kind == "checkout":
                method, region, value = (
                    rng.choice(METHODS),
                    rng.choice(REGIONS),
                    rng.choice(LATENCIES),
                )
                self.checkout[method, region].append(value)
                ops.append([kind, method, region, value])
            else:
                size = rng.choice(SIZES)
                self.upload.append(size)
                ops.append([kind, size])
        return ops


Key = tuple[str, tuple[tuple[str, Any], ...]]


def key(name: str, labels: Iterable[tuple[str, str]]) -> Key:
    """A sample's identity whatever the label order and the ``le`` spelling (``1`` or ``1.0``)."""
    return name, tuple(sorted((k, float(v) if k == "le" else v) for k, v in labels))


def histogram_model(
    name: str, labels: tuple[tuple[str, str], ...], bounds: tuple[float, ...], obs: list[float]
) -> dict[Key, float]:
    """A histogram series from its observations alone: cumulative buckets by ``v <= bound``,
    ``_count`` the ``+Inf`` bucket, ``_sum`` the observations' ``math.fsum``."""
    out: dict[Key, float] = {}
    for bound in (*bounds, math.inf):
        out[key(f"{name}_bucket", (*labels, ("le", repr(bound))))] = sum(v <= bound for v in obs)
    out[key(f"{name}_count", labels)] = len(obs)
    out[key(f"{name}_sum", labels)] = math.fsum(obs)
    return out


def expected(rec: Recorded, workers: int) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for route in ROUTES:
        for code in CODES:
            labels = (("route", route), ("code", code))
            out[key("bridge_requests_total", labels)] = rec.requests[route, code]
    for (method, region), obs in rec.checkout.items():
        labels = (("method", method), ("region", region))
        out.update(histogram_model("bridge_checkout_seconds", labels, LATENCY_BOUNDS, obs))
    out.update(histogram_model("bridge_upload_bytes", (), UPLOAD_BOUNDS, rec.upload))
    out[key("bridge_write_failures_total", ())] = 0
    out[key("bridge_quarantined_shards_total", ())] = 0
    out[key("bridge_shards", [("state", "live")])] = 0
    out[key("bridge_shards", [("state", "dead")])] = workers  # read_dir never compacts
    return out


def parsed(families: Iterable[Any], *, skip: str = "") -> dict[Key, float]:
    return {
        key(s.name, s.labels.items()): s.value
        for fam in families
        if fam.name != skip
        for s in fam.samples
    }


class Directory:
    def __init__(self, path: Path, rec: Recorded, workers: int) -> None:
        self.path = path
        self.rec = rec
        self.expected = expected(rec, workers)

    def snapshot(self) -> Any:
        return read_dir(self.path, SCHEMA, namespace=NAMESPACE).pipeline_snapshot()


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Directory:
    """Three real workers: two exit, the third is SIGKILLed after its last record call."""
    path = tmp_path_factory.mktemp("bridges") / "shards"
    path.mkdir()
    rng = random.Random(1313)
    rec = Recorded()
    reaper = Reaper()
    try:
        procs = [
            reaper.python(WORKER, str(path), json.dumps(rec.plan(rng, 120)), stdin=True)
            for _ in range(3)
        ]
        for proc in procs:
            assert read_line(proc) == "recorded"
        for proc in procs[:2]:
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0
        procs[2].kill()
        procs[2].wait(timeout=30)
    finally:
        reaper.kill_all()
    # The plan really covers what the tests claim: both labels of the histogram, bound hits.
    assert all(rec.checkout.values())
    assert rec.upload
    assert len(rec.requests) == 6
    return Directory(path, rec, workers=3)


def test_the_engines_samples_are_what_the_workers_recorded(directory: Directory) -> None:
    got = {
        key(f.name + s.suffix if f.kind == "histogram" else f.name, s.labels): s.value
        for f in samples(directory.snapshot())
        for s in f.samples
    }
    assert got == directory.expected


def test_openmetrics_of_real_shards_parses_back_cumulative_with_exact_sums(
    directory: Directory,
) -> None:
    families = list(parse_openmetrics(render_openmetrics(directory.snapshot())))
    types = {fam.name: fam.type for fam in families}
    assert types["bridge_checkout_seconds"] == types["bridge_upload_bytes"] == "histogram"
    assert types["bridge_requests"] == "counter"
    assert parsed(families) == directory.expected
    for fam in families:
        if fam.type != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], list[Any]] = {}
        for s in fam.samples:
            plain = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(plain, []).append(s)
        for plain, these in series.items():
            buckets = [s.value for s in these if s.name.endswith("_bucket")]
            [count] = [s.value for s in these if s.name.endswith("_count")]
            [total] = [s.value for s in these if s.name.endswith("_sum")]
            assert buckets == sorted(buckets), plain  # cumulative
            assert [s.labels["le"] for s in these if s.name.endswith("_bucket")][-1] == "+Inf"
            assert count == buckets[-1]
            if fam.name == "bridge_upload_bytes":
                assert total == math.fsum(directory.rec.upload)
            else:
                labels = dict(plain)
                assert total == math.fsum(
                    directory.rec.checkout[labels["method"], labels["region"]]
                )


def registry(directory: Directory) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(ShardDirectoryCollector(directory.path, SCHEMA, namespace=NAMESPACE))
    return reg


UP = f"{NAMESPACE}_shard_directory_up"


def test_the_collector_gives_the_engines_samples_in_both_formats(directory: Directory) -> None:
    reg = registry(directory)
    text = generate_latest(reg).decode()
    openmetrics = generate_openmetrics(reg).decode()
    assert parsed(parse_text(text), skip=UP) == directory.expected
    assert parsed(parse_openmetrics(openmetrics), skip=UP) == directory.expected
    up = [s.value for f in parse_text(text) if f.name == UP for s in f.samples]
    assert up == [1.0]


def spelled(families: Iterable[Any], *, skip: str = "") -> dict[tuple[str, frozenset[Any]], float]:
    """Samples by their exact label strings: the series identity a Prometheus 2 server keeps."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in families
        if fam.name != skip
        for s in fam.samples
    }


def test_the_textfile_and_the_collector_write_every_bucket_bound_the_same(
    directory: Directory,
) -> None:
    # From a million up, repr (2500000.0) and prometheus_client (2.5e+06) spell a bound
    # differently: scraping the textfile and the collector would give each bucket two series.
    reg = registry(directory)
    text = render_prometheus(directory.snapshot())
    assert 'bridge_upload_bytes_bucket{le="2.5e+06"} ' in text
    upload = SCHEMA.family("upload")
    assert le_labels(upload) == ("1024.0", "1e+06", "2.5e+06", "+Inf")
    # The files and JSON keep their repr keys: archives written before still read.
    assert upload.bucket_labels == ("1024.0", "1000000.0", "2500000.0", "+Inf")
    assert set(json.loads(render_json(directory.snapshot()))["upload"]["buckets"]) == set(
        upload.bucket_labels
    )
    assert spelled(parse_text(text)) == spelled(parse_text(generate_latest(reg).decode()), skip=UP)
    om = render_openmetrics(directory.snapshot())
    assert spelled(parse_openmetrics(om)) == spelled(
        parse_openmetrics(generate_openmetrics(reg).decode()), skip=UP
    )


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request on stderr says nothing a test checks


def test_the_wsgi_helper_under_wsgiref_serves_the_same_bytes(directory: Directory) -> None:
    app = metrics_wsgi_app(directory.path, SCHEMA, namespace=NAMESPACE)
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        bodies = {}
        for accept in ("text/plain;version=0.0.4", "application/openmetrics-text;version=1.0.0"):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
            try:
                conn.request("GET", "/metrics", headers={"Accept": accept})
                resp = conn.getresponse()
                assert resp.status == 200
                bodies[accept.split(";")[0]] = resp.read().decode()
            finally:
                conn.close()
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    snapshot = directory.snapshot()
    assert bodies["text/plain"] == render_prometheus(snapshot)
    assert bodies["application/openmetrics-text"] == render_openmetrics(snapshot)
    assert parsed(parse_text(bodies["text/plain"])) == directory.expected
    assert parsed(parse_openmetrics(bodies["application/openmetrics-text"])) == directory.expected


def test_promtool_accepts_the_text_of_the_engine_and_of_the_collector(
    directory: Directory, promtool: str
) -> None:
    for text in (
        render_prometheus(directory.snapshot()),
        generate_latest(registry(directory)).decode(),
    ):
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout + check.stderr == ""
