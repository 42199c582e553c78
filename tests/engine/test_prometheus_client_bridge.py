"""gatemetrics.prometheus_client: the collector in a real prometheus_client registry, beside an
app's own metrics, over shards written by real worker processes; served by prometheus_client's
own handlers and read back by its own text and OpenMetrics parsers."""

from __future__ import annotations

import http.client
import logging
import threading
import wsgiref.simple_server
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from gatemetrics import Family, FamilySamples, LockTimeoutError, Sample, Schema, read_dir
from gatemetrics.prometheus_client import ShardDirectoryCollector, to_metric
from tests.engine.schema import OTHER_SCHEMA, SHOP_NAMESPACE, SHOP_SCHEMA, dead_shop_shard
from tests.engine.test_openmetrics import LATENCY
from tests.engine.test_read_dir import hold, release
from tests.processes import WORKER, Reaper, read_line, run_python

OURS = ["shop_orders", "shop_refusals", "shop_errors", "shop_quarantined_shards", "shop_shards"]
UP = "shop_shard_directory_up"


def families(parsed: Iterator[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in parsed}


def ours(parsed: dict[str, Metric]) -> list[str]:
    """The families that are not the app's own (the text format adds its ``_created`` ones)."""
    own = [n for n in parsed if n.startswith("app_")]
    assert {"app_requests", "app_latency_seconds"} <= set(own), own
    return [n for n in parsed if n not in own]


def value(fam: Metric, sample: str, **labels: str) -> float:
    (found,) = [s.value for s in fam.samples if s.name == sample and s.labels == labels]
    return float(found)


@pytest.fixture
def workers(tmp_path: Path, reaper: Reaper) -> Iterator[Path]:
    """Two live workers (3 and 4 paid orders, write-through) and a dead one's shard (2 paid)."""
    directory = tmp_path / "shards"
    directory.mkdir()
    procs = [reaper.python(WORKER, str(directory), str(n), stdin=True) for n in (3, 4)]
    for proc in procs:
        assert read_line(proc).startswith("v2-")
    dead_shop_shard(directory, paid=2)
    yield directory
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("close\n")
        proc.stdin.flush()
        assert read_line(proc) == "closed"


def app_registry(directory: Path, **kwargs: object) -> CollectorRegistry:
    """A registry holding an app's own metrics and the shard directory's families."""
    registry = CollectorRegistry()
    requests = Counter("app_requests", "Requests served.", ["path"], registry=registry)
    requests.labels("/").inc(9)
    Histogram("app_latency_seconds", "Latency.", registry=registry).observe(0.2)
    registry.register(
        ShardDirectoryCollector(directory, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, **kwargs)  # type: ignore[arg-type]
    )
    return registry


def test_both_parsers_read_the_apps_metrics_and_the_directorys(workers: Path) -> None:
    registry = app_registry(workers)
    expected = read_dir(workers, SHOP_SCHEMA, namespace=SHOP_NAMESPACE)
    assert expected.snapshot().family("orders")["paid"] == 9
    for parsed in (
        families(parse_text(generate_latest(registry).decode())),
        families(parse_openmetrics(generate_openmetrics(registry).decode())),
    ):
        assert ours(parsed) == [*OURS, UP]
        orders = parsed["shop_orders"]
        assert orders.type == "counter"
        assert value(orders, "shop_orders_total", outcome="paid") == 9
        assert value(orders, "shop_orders_total", outcome="refused") == 0
        assert value(parsed["shop_shards"], "shop_shards", state="live") == 2
        assert value(parsed["shop_shards"], "shop_shards", state="dead") == 1
        assert value(parsed[UP], UP) == 1
        assert value(parsed["app_requests"], "app_requests_total", path="/") == 9
        assert parsed["shop_orders"].documentation == "Orders, by outcome."


def test_prometheus_clients_handlers_negotiate_the_format(workers: Path) -> None:
    registry = app_registry(workers)
    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, make_wsgi_app(registry), handler_class=_Quiet
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        text_type, text = fetch(server.server_port, "text/plain")
        om_type, om = fetch(server.server_port, "application/openmetrics-text; version=1.0.0")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert text_type.startswith("text/plain; version=0.0.4")
    assert om_type.startswith("application/openmetrics-text; version=1.0.0")
    assert (
        value(families(parse_text(text))["shop_orders"], "shop_orders_total", outcome="paid") == 9
    )
    om_orders = families(parse_openmetrics(om))["shop_orders"]
    assert value(om_orders, "shop_orders_total", outcome="paid") == 9


def test_start_http_server_serves_the_directory(workers: Path) -> None:
    registry = app_registry(workers)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        _, text = fetch(server.server_port, "*/*")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert value(families(parse_text(text))["shop_shards"], "shop_shards", state="live") == 2


class _Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def fetch(port: int, accept: str) -> tuple[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept})
        reply = conn.getresponse()
        body = reply.read().decode()
        assert reply.status == 200, body
        return reply.getheader("content-type") or "", body
    finally:
        conn.close()


def test_a_name_clash_with_the_apps_own_metrics_is_refused_at_registration(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    Counter("shop_orders", "The app's own, same name.", registry=registry)
    collector = ShardDirectoryCollector(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE)
    with pytest.raises(ValueError, match=r"Duplicated timeseries.*shop_orders"):
        registry.register(collector)
    # The other order: the collector first, then the app's metric.
    second = CollectorRegistry()
    second.register(ShardDirectoryCollector(tmp_path, SHOP_SCHEMA, namespace=SHOP_NAMESPACE))
    with pytest.raises(ValueError, match=r"Duplicated timeseries.*shop_shards"):
        Counter("shop_shards", "Clashes with the pipeline gauge.", registry=second)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("shop_shard_directory_up", "Clashes with the up gauge.", registry=second)


def test_describe_needs_no_directory(tmp_path: Path) -> None:
    collector = ShardDirectoryCollector(tmp_path / "none", SHOP_SCHEMA, namespace=SHOP_NAMESPACE)
    described = list(collector.describe())
    assert [m.name for m in described] == [*OURS, UP]
    assert all(m.samples == [] for m in described)


def test_a_held_lock_drops_the_directorys_families_but_keeps_the_apps(
    workers: Path, reaper: Reaper, caplog: pytest.LogCaptureFixture
) -> None:
    registry = app_registry(workers, lock_timeout=0.05)
    compaction = hold(reaper, "exclusive", workers)
    with caplog.at_level(logging.WARNING, "gatemetrics.prometheus_client"):
        for _ in range(3):
            parsed = families(parse_text(generate_latest(registry).decode()))
            assert ours(parsed) == [UP]
            assert value(parsed[UP], UP) == 0
    release(compaction)
    problems = [r.getMessage() for r in caplog.records]
    assert len(problems) == 1  # once, not once per scrape
    assert "lock not acquired within 0.05 s" in problems[0]
    with caplog.at_level(logging.WARNING, "gatemetrics.prometheus_client"):
        parsed = families(parse_text(generate_latest(registry).decode()))
    assert ours(parsed) == [*OURS, UP]
    assert value(parsed[UP], UP) == 1
    assert caplog.records[-1].getMessage().endswith("is readable again")


def test_a_missing_directory_or_the_wrong_schema_reads_as_down(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(ShardDirectoryCollector(tmp_path / "gone", SHOP_SCHEMA, namespace="shop"))
    assert value(families(parse_text(generate_latest(registry).decode()))[UP], UP) == 0
    dead_shop_shard(tmp_path, paid=1)
    other = CollectorRegistry()
    other.register(ShardDirectoryCollector(tmp_path, OTHER_SCHEMA, namespace="mill"))
    parsed = families(parse_text(generate_latest(other).decode()))
    assert list(parsed) == ["mill_shard_directory_up"]
    assert value(parsed["mill_shard_directory_up"], "mill_shard_directory_up") == 0


def test_raise_errors_fails_the_whole_scrape(workers: Path, reaper: Reaper) -> None:
    registry = app_registry(workers, lock_timeout=0.05, raise_errors=True)
    compaction = hold(reaper, "exclusive", workers)
    try:
        with pytest.raises(LockTimeoutError):
            generate_latest(registry)
    finally:
        release(compaction)
    assert b"shop_orders_total" in generate_latest(registry)


def test_a_histogram_family_becomes_buckets_sum_and_count() -> None:
    class Hand:
        def collect(self) -> Iterator[Metric]:
            yield to_metric(LATENCY)

    registry = CollectorRegistry()
    registry.register(Hand())
    for parsed in (
        families(parse_text(generate_latest(registry).decode())),
        families(parse_openmetrics(generate_openmetrics(registry).decode())),
    ):
        hist = parsed["shop_latency_seconds"]
        assert hist.type == "histogram"
        buckets = [
            (s.labels["le"], s.value)
            for s in hist.samples
            if s.name.endswith("_bucket") and s.labels["till"] == "a"
        ]
        assert buckets == [("0.05", 1), ("1.0", 3), ("1e+06", 4), ("+Inf", 5)]
        assert value(hist, "shop_latency_seconds_sum", till="a") == 12.5
        assert value(hist, "shop_latency_seconds_count", till="a") == 5
        assert value(hist, "shop_latency_seconds_count", till='b"q') == 0


@pytest.mark.parametrize(
    ("family", "problem"),
    [
        (FamilySamples("x_total", "", "summary", ()), "no prometheus_client type"),
        (FamilySamples("x", "", "counter", ()), "must end in _total"),
        (FamilySamples("g", "", "gauge", (Sample("_sum", (), 1),)), "no '_sum' sample"),
        (
            FamilySamples(
                "g", "", "gauge", (Sample("", (("a", "1"),), 1), Sample("", (("b", "1"),), 1))
            ),
            "label names",
        ),
        (FamilySamples("h", "", "histogram", (Sample("_sum", (), 1),)), "needs buckets"),
        (
            FamilySamples(
                "h",
                "",
                "histogram",
                (
                    Sample("_bucket", (("le", "+Inf"),), 2),
                    Sample("_sum", (), 1.0),
                    Sample("_count", (), 3),
                ),
            ),
            "_count is not the \\+Inf bucket",
        ),
        (
            FamilySamples(
                "h",
                "",
                "histogram",
                (
                    Sample("_bucket", (("le", "1"),), 2),
                    Sample("_sum", (), 1.0),
                    Sample("_count", (), 2),
                ),
            ),
            "_count is not the \\+Inf bucket",
        ),
        (FamilySamples("h", "", "histogram", (Sample("_total", (), 1),)), "no '_total' sample"),
    ],
)
def test_families_prometheus_client_cannot_carry_are_refused(
    family: FamilySamples, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        to_metric(family)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"namespace": "9x"}, ValueError),
        ({"namespace": "s", "lock_timeout": float("nan")}, ValueError),
        ({"namespace": "s", "lock_timeout": "1"}, ValueError),
    ],
)
def test_bad_arguments_are_refused_when_the_collector_is_made(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        ShardDirectoryCollector(tmp_path, SHOP_SCHEMA, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Schema"):
        ShardDirectoryCollector(tmp_path, "shop", namespace="s")  # type: ignore[arg-type]


def test_a_schema_family_named_like_the_up_gauge_is_refused(tmp_path: Path) -> None:
    clash = Schema([Family("shop_shard_directory_up", "Mine.", key="up", kind="gauge")])
    with pytest.raises(ValueError, match="already has a family named shop_shard_directory_up"):
        ShardDirectoryCollector(tmp_path, clash, namespace="shop")


def test_importing_without_prometheus_client_names_the_extra() -> None:
    result = run_python(
        """
        sys.modules["prometheus_client"] = None  # as if it were not installed
        sys.modules["prometheus_client.core"] = None
        try:
            import gatemetrics.prometheus_client
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "install the 'prometheus' extra" in result.stdout
    assert "gatemetrics[prometheus]" in result.stdout
