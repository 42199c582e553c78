"""A prometheus_client collector for a shard directory (the ``prometheus`` extra).

An app that already serves prometheus_client metrics registers the directory's merged families
beside its own and keeps prometheus_client's handlers (``make_wsgi_app``, ``make_asgi_app``,
``start_http_server``) and their content negotiation (text 0.0.4 or OpenMetrics)::

    from prometheus_client import REGISTRY, make_wsgi_app
    from gatemetrics.prometheus_client import ShardDirectoryCollector

    REGISTRY.register(ShardDirectoryCollector("/var/lib/gatemetrics", SCHEMA, namespace="shop"))
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app()})  # Flask

Every :meth:`~ShardDirectoryCollector.collect` reads the directory with
:func:`gatemetrics.read_dir` (shared locks: concurrent scrapes never queue behind each other;
nothing is compacted or written) and yields each family by kind: counters as
``CounterMetricFamily`` (prometheus_client names the family without ``_total`` and the sample
with it, as this engine's text format does), gauges, and histograms (buckets, sum, count).

When the directory cannot be read (a compaction holds the lock past ``lock_timeout``; the
directory is missing or unreadable; its archive does not fit the schema) the collector yields
none of the directory's families and ``<namespace>_shard_directory_up 0`` instead of ``1``, and
logs the problem once until it changes: the app's own metrics are still served (one failing
directory must not take down a whole ``/metrics``, which ``up == 0`` would report as the app
being down), and Prometheus marks the directory's series stale for that scrape, a gap and not a
counter reset. Alert on ``<namespace>_shard_directory_up == 0``. Give ``raise_errors=True`` to
raise instead: prometheus_client's handlers then answer 500 for the whole scrape. Either way
a scrape never hangs: it waits at most ``lock_timeout`` seconds.

Names are declared up front (:meth:`~ShardDirectoryCollector.describe`, from the schema alone,
no I/O), so ``CollectorRegistry.register`` raises ``ValueError`` ("Duplicated timeseries") when
a family clashes with one of the app's own metrics, at registration and not at the first scrape.

prometheus_client's ``make_asgi_app`` calls ``collect`` on the event loop: the read then runs
there too, for up to ``lock_timeout``. An async app that must not block its loop serves
:func:`gatemetrics.http.metrics_asgi_app` instead, or keeps ``lock_timeout`` short.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as exc:  # pragma: no cover - exercised in a process without the extra
    raise ImportError(
        "gatemetrics.prometheus_client needs prometheus_client: install the 'prometheus' extra "
        "(python3 -m pip install 'gatemetrics[prometheus]')"
    ) from exc

from gatemetrics._checks import check_seconds
from gatemetrics.aggregate import pipeline_schema, read_dir
from gatemetrics.errors import LockTimeoutError, SchemaError
from gatemetrics.exposition import FamilySamples, Sample, _canonical_le, samples
from gatemetrics.schema import Schema

__all__ = ["ShardDirectoryCollector", "to_metric"]

_log = logging.getLogger(__name__)


class ShardDirectoryCollector:
    """Yields the merged families of ``directory`` (see the module documentation).

    ``lock_timeout`` bounds how long one scrape waits for a compaction: keep it well under the
    scraper's timeout. Raises ``ValueError``/``TypeError`` now for a bad argument, and
    ``ValueError`` when the schema already has a family named like the ``_up`` gauge.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        schema: Schema,
        *,
        namespace: str,
        lock_timeout: float = 1.0,
        raise_errors: bool = False,
    ) -> None:
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a gatemetrics Schema, not {type(schema).__name__}")
        self._full = pipeline_schema(schema, namespace)  # raises for a bad namespace
        self.directory = os.fspath(directory)
        self.schema = schema
        self.namespace = namespace
        self.lock_timeout = check_seconds("lock_timeout", lock_timeout, allow_zero=True)
        self.raise_errors = bool(raise_errors)
        self.up_name = f"{namespace}_shard_directory_up"
        if any(fam.name == self.up_name for fam in self._full.families):
            raise ValueError(f"the schema already has a family named {self.up_name}")
        self._problem: str | None = None  # the last problem logged, so each is logged once
        self._problem_lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        """Every family this collector can yield, without samples (no I/O)."""
        for fam in self._full.families:
            yield to_metric(FamilySamples(fam.name, fam.documentation, fam.kind, ()))
        yield self._up(None)

    def collect(self) -> Iterator[Metric]:
        """The directory's families and the ``_up`` gauge; see the module documentation."""
        try:
            result = read_dir(
                self.directory,
                self.schema,
                namespace=self.namespace,
                lock_timeout=self.lock_timeout,
            )
        except (LockTimeoutError, OSError, SchemaError) as exc:
            if self.raise_errors:
                raise
            self._log_once(f"cannot read {self.directory}: {exc}")
            yield self._up(0)
            return
        self._log_once(None)
        for fam in samples(result.pipeline_snapshot()):
            yield to_metric(fam)
        yield self._up(1)

    def _up(self, value: int | None) -> GaugeMetricFamily:
        up = GaugeMetricFamily(
            self.up_name,
            "1 when the last scrape read the shard directory, 0 when it could not "
            "(its families are then missing from that scrape).",
        )
        if value is not None:
            up.add_metric([], value)
        return up

    def _log_once(self, problem: str | None) -> None:
        with self._problem_lock:
            if problem == self._problem:
                return
            self._problem = problem
        if problem is None:
            _log.warning("gatemetrics collector: %s is readable again", self.directory)
        else:
            _log.warning("gatemetrics collector: %s", problem)


def to_metric(fam: FamilySamples) -> Metric:
    """One family as the prometheus_client metric family of its kind.

    Raises ``ValueError`` naming the family for what prometheus_client cannot say the same way:
    an unknown kind, samples whose label names differ, a counter not named ``..._total``, a
    histogram series without buckets, ``_sum`` and ``_count``, or whose ``_count`` is not its
    ``+Inf`` bucket.
    """
    names = _label_names(fam)
    if fam.kind == "counter":
        if not fam.name.endswith("_total"):
            raise ValueError(f"{fam.name}: a counter's name must end in _total")
        counter = CounterMetricFamily(fam.name, fam.documentation, labels=names)
        for s in _plain_samples(fam):
            counter.add_metric([v for _, v in s.labels], s.value)
        return counter
    if fam.kind == "gauge":
        gauge = GaugeMetricFamily(fam.name, fam.documentation, labels=names)
        for s in _plain_samples(fam):
            gauge.add_metric([v for _, v in s.labels], s.value)
        return gauge
    if fam.kind == "histogram":
        return _histogram(fam, [n for n in names if n != "le"])
    raise ValueError(f"{fam.name}: no prometheus_client type for kind {fam.kind!r}")


def _label_names(fam: FamilySamples) -> list[str]:
    names: list[str] | None = None
    for s in fam.samples:
        these = [k for k, _ in s.labels if not (s.suffix == "_bucket" and k == "le")]
        if names is None:
            names = these
        elif these != names:
            raise ValueError(f"{fam.name}: samples with label names {names} and {these}")
    return names or []


def _plain_samples(fam: FamilySamples) -> Iterator[Sample]:
    for s in fam.samples:
        if s.suffix != "":
            raise ValueError(f"{fam.name}: a {fam.kind} has no {s.suffix!r} sample")
        yield s


class _Series:
    """One histogram series (one label set besides ``le``) being gathered."""

    def __init__(self) -> None:
        self.buckets: list[tuple[str, float]] = []
        self.sum: float | None = None
        self.count: float | None = None


def _histogram(fam: FamilySamples, names: list[str]) -> HistogramMetricFamily:
    series: dict[tuple[str, ...], _Series] = {}  # in the order the samples give
    for s in fam.samples:
        values = tuple(v for k, v in s.labels if not (s.suffix == "_bucket" and k == "le"))
        one = series.setdefault(values, _Series())
        if s.suffix == "_bucket":
            le = dict(_canonical_le(fam.name, s.labels))["le"]
            one.buckets.append((le, s.value))
        elif s.suffix == "_sum":
            one.sum = s.value
        elif s.suffix == "_count":
            one.count = s.value
        else:
            raise ValueError(f"{fam.name}: a histogram has no {s.suffix!r} sample")
    hist = HistogramMetricFamily(fam.name, fam.documentation, labels=names)
    for values, one in series.items():
        if not one.buckets or one.sum is None or one.count is None:
            raise ValueError(f"{fam.name}{list(values)}: needs buckets, _sum and _count")
        if one.buckets[-1][0] != "+Inf" or one.buckets[-1][1] != one.count:
            # prometheus_client derives _count from the +Inf bucket: they must agree.
            raise ValueError(f"{fam.name}{list(values)}: _count is not the +Inf bucket")
        hist.add_metric(list(values), one.buckets, one.sum)
    return hist
