"""The release gate's metrics: its schema on the gatemetrics engine, a store and an exporter.

Families (every label value is exported from the start at 0, so ``increase()`` sees the first
event):

=========================================== ========== =========================================
family                                      label      values
=========================================== ========== =========================================
``release_gate_decision_total``             decision   ALLOW, DENY
``release_gate_reason_total``               reason     the 10 :class:`BlockReasonCode` values
``release_gate_contract_breach_total``      kind       NO_OVERRIDE
``release_gate_audit_write_failures_total`` (none)
``release_gate_metric_write_failures_total`` (none)
``release_gate_check_duration_seconds``     (none)     histogram, buckets ``CHECK_DURATION_BUCKETS``
=========================================== ========== =========================================

``release_gate_check_duration_seconds`` is the time one gate check spends, audit write (file
lock, write, fsync) included, measured with ``time.perf_counter`` by the gate and observed in
the same atomic step as the check's counts (see :meth:`GateMetricStore.record_outcome`). Its
buckets, 1 ms to 2.5 s, are chosen for an fsync-bound path: a healthy local disk answers in the
low milliseconds, a struggling one in hundreds.

The schema is built from three fixed label sets: ``_DECISION_LABELS``, ``_REASON_LABELS`` (the
:class:`BlockReasonCode` values) and ``_BREACH_KINDS``. Nothing else can add a label value.

Recording: every recorder resolves its slots from constants of the schema and adds them through
the engine store's one write (:meth:`gatemetrics.CounterStore._add`: one lock, one change
notification), so one gate check is one atomic step and, bound write-through, one save.

Persistence (see :mod:`gatemetrics.shards` and :mod:`gatemetrics.aggregate`): a process saves its
store as its own shard in a directory (:meth:`GateMetricStore.save_to_dir`), or binds it there
once (:meth:`GateMetricStore.bind_to_dir`) so it saves itself; a failed save is counted in
``release_gate_metric_write_failures_total`` and never raises. :meth:`GateMetricStore.load_from_dir`
merges a directory into a :class:`GateMetricView` (read-only by construction: it wraps the
engine's :class:`~gatemetrics.Aggregate` and has no write or save method), whose Prometheus
exposition also carries the pipeline families ``release_gate_quarantined_shards_total`` and
``release_gate_shards{state}``. It is fail-open: a missing, unreadable or corrupt directory gives
an empty view whose :attr:`GateMetricView.problem` says why (logged once per directory and
problem), never an exception; ``strict=True`` raises instead (the engine's
:func:`gatemetrics.aggregate_dir` and the CLI are always loud). Whole files are replaced through
``_atomic_write``, the engine's :func:`gatemetrics.write_file_atomically` itself.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from backend.app.testing.release_policy import BlockReasonCode
from gatemetrics import (
    Aggregate,
    Binding,
    CounterStore,
    Durability,
    Family,
    GatemetricsError,
    Mode,
    Schema,
    Snapshot,
    bind,
    check_seconds,
    read_dir,
    render_json,
    render_openmetrics,
    render_prometheus,
    save_to_dir,
    write_file_atomically,
)

__all__ = [
    "CHECK_DURATION_BUCKETS",
    "GATE_NAMESPACE",
    "GATE_SCHEMA",
    "GateMetricExporter",
    "GateMetricStore",
    "GateMetricView",
]

#: Prefix of the aggregator's pipeline families for the gate (``release_gate_shards`` ...).
GATE_NAMESPACE = "release_gate"
#: The family that counts failed saves of a gate store.
_FAILURE_KEY = "metric_write_failures"

#: The fixed label sets the schema is built from (the plan's names).
_DECISION_LABELS = ("ALLOW", "DENY")
_REASON_LABELS = tuple(r.value for r in BlockReasonCode)
_BREACH_KINDS = ("NO_OVERRIDE",)
#: Upper bounds (seconds) of ``release_gate_check_duration_seconds`` (``+Inf`` is implicit). The
#: dashboard's latency panel and the slow-audit alert are written for exactly these.
CHECK_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: The temp-file-and-rename helper persistence uses wherever a whole file is replaced (the
#: archive, the textfile): the engine's own, not a copy.
_atomic_write = write_file_atomically

_log = logging.getLogger("backend.app.testing.gate_metrics")

GATE_SCHEMA = Schema(
    (
        Family(
            "release_gate_decision_total",
            "Release gate decisions, by the decision returned to the caller.",
            key="decision_counts",
            label="decision",
            values=_DECISION_LABELS,
        ),
        Family(
            "release_gate_reason_total",
            "Reasons attached to DENY decisions; each distinct reason counts once per decision.",
            key="reason_counts",
            label="reason",
            values=_REASON_LABELS,
        ),
        Family(
            "release_gate_contract_breach_total",
            "Overrides attempted on a block with an absolute reason (hard-rejected).",
            key="breach_counts",
            label="kind",
            values=_BREACH_KINDS,
        ),
        Family(
            "release_gate_audit_write_failures_total",
            "Gate decisions whose audit entry could not be written (the decision was denied).",
            key="audit_write_failures",
        ),
        Family(
            "release_gate_metric_write_failures_total",
            "Failed attempts to persist this process's gate metrics (counts stay in memory).",
            key="metric_write_failures",
        ),
        # Last, so that every other family keeps its slots: shards and archives written before
        # the histogram existed still read (the family counts as empty there).
        Family(
            "release_gate_check_duration_seconds",
            "Time a release-gate check spends, audit write included.",
            key="check_duration",
            kind="histogram",
            buckets=CHECK_DURATION_BUCKETS,
        ),
    )
)

_ALLOW = GATE_SCHEMA.slot("decision_counts", "ALLOW")
_DENY = GATE_SCHEMA.slot("decision_counts", "DENY")
_BREACH = GATE_SCHEMA.slot("breach_counts", "NO_OVERRIDE")
_AUDIT_FAILURE = GATE_SCHEMA.slot("audit_write_failures")
_METRIC_FAILURE = GATE_SCHEMA.slot("metric_write_failures")
_DURATION = GATE_SCHEMA.histogram("check_duration")
_DURATION_FIRST = _DURATION.first
_DURATION_SUM = _DURATION.sum_cell
# Keyed by the plain string value: a StrEnum member hashes and compares equal to its value, so
# one lookup serves both BlockReasonCode members and strings.
_REASON_SLOTS: dict[str, int] = {
    r.value: GATE_SCHEMA.slot("reason_counts", r.value) for r in BlockReasonCode
}
# The hot path looks members up by identity: hashing a StrEnum member runs Enum.__hash__ in
# Python, several times the cost of an int key (benchmarks/PROFILE.md, "Costs behind design
# choices"). Members live as long as the
# interpreter, so no other object can share their id.
_MEMBER_SLOTS: dict[int, int] = {id(r): _REASON_SLOTS[r.value] for r in BlockReasonCode}
_MEMBER_GET = _MEMBER_SLOTS.get
# The constant slot tuples of the recorders that always add the same series.
_ALLOW_ONLY = (_ALLOW,)
_BREACH_ONLY = (_BREACH,)
_AUDIT_FAILURE_ONLY = (_AUDIT_FAILURE,)
_METRIC_FAILURE_ONLY = (_METRIC_FAILURE,)


class GateMetricStore(CounterStore):
    """In-memory release-gate counters for one process; thread-safe.

    Recording never raises for odd reasons: anything that is not a :class:`BlockReasonCode`
    member or one of their string values is skipped, so the label set stays bounded whatever a
    caller passes.
    """

    __slots__ = ()

    #: Tells :class:`~backend.app.testing.release_gate.ReleaseGate` that :meth:`record_outcome`
    #: takes the check's ``duration`` (a sink without it is called as before).
    records_check_duration: ClassVar[bool] = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(GATE_SCHEMA, clock=clock)

    # -- recording ---------------------------------------------------------------------------

    def record_outcome(  # noqa: PLR0912 - the hot path, inlined on purpose (PROFILE.md)
        self,
        allowed: bool,
        reasons: Iterable[BlockReasonCode | str] | str | None = (),
        *,
        breach: bool = False,
        audit_write_failure: bool = False,
        duration: float | None = None,
    ) -> None:
        """Count everything one gate check emits in one atomic step.

        The decision (and, for a DENY, each distinct valid reason once), plus optionally a
        contract breach, an audit write failure and the check's ``duration`` in seconds (one
        observation of ``release_gate_check_duration_seconds``). Readers never see half of one
        check's counts, and a store that persists on every change persists once per check.
        ``allowed`` must be a real ``bool`` (a truthy string such as ``"false"`` would otherwise
        count the wrong way); ``reasons`` is ignored for an ALLOW. A ``duration`` that is not a
        finite, non-negative number is skipped (the rest is counted): recording never raises
        for odd values.
        """
        slots: tuple[int, ...] | list[int]
        if allowed is True:
            slots = _ALLOW_ONLY
        elif allowed is False:
            # The gate passes a list of members: resolved inline, by identity (see
            # _MEMBER_SLOTS); anything else takes the general path.
            cls = reasons.__class__
            if cls is list or cls is tuple:
                slots = [_DENY]
                for r in reasons:  # type: ignore[union-attr]
                    s = _MEMBER_GET(id(r))
                    if s is None:
                        s = _slot_of(r)
                        if s is None:
                            continue
                    if s not in slots:
                        slots.append(s)
            else:
                slots = [_DENY, *_reason_slots(reasons)]
        else:
            raise TypeError(f"allowed must be a bool, not {type(allowed).__name__}")
        if breach or audit_write_failure:
            slots = [*slots]
            if breach:
                slots.append(_BREACH)
            if audit_write_failure:
                slots.append(_AUDIT_FAILURE)
        if duration is None:
            self._add(slots)
        elif type(duration) is float and 0.0 <= duration < math.inf:  # what the gate passes
            bucket = _DURATION_FIRST + bisect_left(CHECK_DURATION_BUCKETS, duration)
            self._add((*slots, bucket), sum_cell=_DURATION_SUM, value=duration)
        else:
            self._add_timed(slots, duration)

    def _add_timed(self, slots: tuple[int, ...] | list[int], duration: object) -> None:
        """:meth:`_add` of ``slots`` and one observation of the check's duration, in one step
        (a ``duration`` that is not a finite, non-negative number is skipped)."""
        seconds = _seconds(duration)
        if seconds is None:
            self._add(slots)
            return
        bucket = _DURATION_FIRST + bisect_left(CHECK_DURATION_BUCKETS, seconds)
        self._add([*slots, bucket], sum_cell=_DURATION_SUM, value=seconds)

    def record_decision(
        self, allowed: bool, reasons: Iterable[BlockReasonCode | str] | str | None = ()
    ) -> None:
        """Count one decision: :meth:`record_outcome` without the breach and audit flags."""
        self.record_outcome(allowed, reasons)

    def record_breach(self) -> None:
        """Count one contract breach (an override attempted on an absolute block)."""
        self._add(_BREACH_ONLY)

    def record_audit_write_failure(self) -> None:
        """Count one audit entry that could not be written."""
        self._add(_AUDIT_FAILURE_ONLY)

    def record_metric_write_failure(self) -> None:
        """Count one failed attempt to persist these metrics."""
        self._add(_METRIC_FAILURE_ONLY)

    # -- reading -----------------------------------------------------------------------------

    def decision_counts(self) -> dict[str, int]:
        """``{"ALLOW": n, "DENY": n}``."""
        return self.snapshot().family("decision_counts")

    def reason_counts(self) -> dict[str, int]:
        """Count per :class:`BlockReasonCode` value, every reason present."""
        return self.snapshot().family("reason_counts")

    def breach_counts(self) -> dict[str, int]:
        """``{"NO_OVERRIDE": n}``."""
        return self.snapshot().family("breach_counts")

    def audit_write_failures(self) -> int:
        return self.get("audit_write_failures")

    def metric_write_failures(self) -> int:
        return self.get("metric_write_failures")

    def check_durations(self) -> tuple[tuple[int, ...], float]:
        """``release_gate_check_duration_seconds``: its cumulative bucket counts (one per bound
        of :data:`CHECK_DURATION_BUCKETS`, then ``+Inf``, the count of checks) and its sum."""
        return self.snapshot().histogram("check_duration")

    @property
    def store_generation(self) -> int:
        """How many times this store has been persisted (0 until the first save)."""
        return self.generation

    @property
    def store_start_timestamp(self) -> float:
        """When this store began counting, in seconds since the epoch."""
        return self.start_timestamp

    # -- persistence -------------------------------------------------------------------------

    def save_to_dir(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability | str = Durability.PROCESS_CRASH,
    ) -> bool:
        """Write this process's cumulative counts as its own shard in ``path``.

        Creates the directory and takes the shard's lifetime lock on first use. Never raises:
        on failure it counts a metric write failure, rolls ``store_generation`` back and
        returns False (the counts stay in memory for the next save). ``durability`` applies
        from the first save to ``path`` on.
        """
        return save_to_dir(self, path, durability=durability, failure_key=_FAILURE_KEY)

    def bind_to_dir(
        self,
        path: str | os.PathLike[str],
        *,
        mode: Mode = "write-through",
        interval: float = 5.0,
        durability: Durability | str = Durability.PROCESS_CRASH,
    ) -> Binding:
        """Make this store save itself into ``path``; see :func:`gatemetrics.bind`.

        ``"write-through"`` (the default) saves after every record call, before it returns, so
        a decision that was counted survives a SIGKILL; ``"periodic"`` saves every ``interval``
        seconds from a thread. Both save at exit. Raises ``ShardWriteError`` if ``path`` is
        unusable, so a misconfigured service fails at start-up rather than silently.
        """
        return bind(
            self,
            path,
            mode=mode,
            interval=interval,
            durability=durability,
            failure_key=_FAILURE_KEY,
        )

    @staticmethod
    def load_from_dir(
        path: str | os.PathLike[str], *, lock_timeout: float = 10.0, strict: bool = False
    ) -> GateMetricView:
        """The merged view of a shard directory (archive plus every shard); never raises.

        Does not compact. Fail-open: for a missing, unreadable or corrupt directory, or one
        whose lock an aggregation holds past ``lock_timeout`` seconds, the view is empty and
        its :attr:`~GateMetricView.problem` says why (logged once per directory and problem).
        With ``strict=True`` those raise instead, as :func:`gatemetrics.aggregate_dir` does:
        ``OSError`` and ``LockTimeoutError`` (what ``/metrics`` answers 503 for). A
        ``lock_timeout`` that is not a duration raises ``ValueError`` either way.
        """
        timeout = check_seconds("lock_timeout", lock_timeout, allow_zero=True)
        try:
            # read_dir: shared locks, so views (scrapes) never wait for each other; only a
            # compaction holding the lock past the timeout makes one fail.
            result = read_dir(path, GATE_SCHEMA, namespace=GATE_NAMESPACE, lock_timeout=timeout)
        except (OSError, GatemetricsError) as exc:
            if strict:
                raise
            problem = f"cannot aggregate {os.fspath(path)}: {exc}"
            _log_problem_once(os.fspath(path), problem)
            return GateMetricView.empty(problem)
        return GateMetricView(result)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateMetricStore:
        """A store holding ``data`` (the :meth:`to_dict` layout).

        Raises :class:`gatemetrics.SchemaError` (a ``ValueError``) naming the field for a wrong
        type, a negative or non-integer count, or an unknown family or label value.
        """
        store = cls()
        store.restore(data)
        return store


class GateMetricView:
    """A read-only merged view of a shard directory; see :meth:`GateMetricStore.load_from_dir`.

    It wraps the engine's :class:`~gatemetrics.Aggregate` and offers the store's readers; it has
    no write, restore or save method, so it can never be saved back as a shard (it holds every
    shard's counts: saved, they would count twice). The engine's ``save_to_dir``, ``bind`` and
    ``periodic_saver`` refuse it (``read_only``). It is immutable, so it survives a fork as it is.
    Its Prometheus exposition adds the pipeline families.
    """

    __slots__ = ("_aggregate", "_problem", "_snapshot")

    #: Tells the engine's persistence this can never be saved as a shard.
    read_only: ClassVar[bool] = True

    def __init__(self, result: Aggregate) -> None:
        if result.schema is not GATE_SCHEMA:
            raise TypeError("a GateMetricView needs an aggregate over GATE_SCHEMA")
        self._aggregate: Aggregate | None = result
        self._snapshot = result.snapshot()
        self._problem: str | None = None

    @classmethod
    def empty(cls, problem: str) -> GateMetricView:
        """A view with every count at zero, saying why there is nothing to show."""
        view = cls.__new__(cls)
        view._aggregate = None
        view._snapshot = Snapshot(
            GATE_SCHEMA, tuple(GATE_SCHEMA.zeros()), sums=tuple(GATE_SCHEMA.float_zeros())
        )
        view._problem = problem
        return view

    @property
    def aggregate(self) -> Aggregate | None:
        """The aggregation this view was made from (shard states, archive, quarantine); None
        for an empty view made because the directory could not be aggregated."""
        return self._aggregate

    @property
    def problem(self) -> str | None:
        """Why the view is empty (the directory could not be aggregated), or None."""
        return self._problem

    @property
    def schema(self) -> Schema:
        return GATE_SCHEMA

    def snapshot(self) -> Snapshot:
        """The merged counts (immutable: the same object every call)."""
        return self._snapshot

    def to_dict(self) -> dict[str, Any]:
        """The store's dictionary layout of the merged counts."""
        return self._snapshot.to_dict()

    def get(self, key: str, value: str | None = None) -> int:
        """The merged count of one series."""
        return self._snapshot.get(key, value)

    def decision_counts(self) -> dict[str, int]:
        """``{"ALLOW": n, "DENY": n}``."""
        return self._snapshot.family("decision_counts")

    def reason_counts(self) -> dict[str, int]:
        """Count per :class:`BlockReasonCode` value, every reason present."""
        return self._snapshot.family("reason_counts")

    def breach_counts(self) -> dict[str, int]:
        """``{"NO_OVERRIDE": n}``."""
        return self._snapshot.family("breach_counts")

    def audit_write_failures(self) -> int:
        return self._snapshot.get("audit_write_failures")

    def metric_write_failures(self) -> int:
        return self._snapshot.get("metric_write_failures")

    def check_durations(self) -> tuple[tuple[int, ...], float]:
        """The merged ``release_gate_check_duration_seconds`` (see the store's)."""
        return self._snapshot.histogram("check_duration")

    @property
    def store_generation(self) -> int:
        """Always 0: a merged view is never persisted."""
        return self._snapshot.generation

    @property
    def store_start_timestamp(self) -> float:
        """When the oldest merged store began counting (0.0 for an empty view)."""
        return self._snapshot.start_timestamp


# The last problem logged per directory (bounded), so a scrape loop over a broken directory
# logs it once, and again only when the problem changes.
_LOGGED_PROBLEMS: dict[str, str] = {}
_LOGGED_LOCK = threading.Lock()


def _log_problem_once(path: str, problem: str) -> None:
    with _LOGGED_LOCK:
        if _LOGGED_PROBLEMS.get(path) == problem:
            return
        if len(_LOGGED_PROBLEMS) >= 64:
            _LOGGED_PROBLEMS.clear()
        _LOGGED_PROBLEMS[path] = problem
    _log.warning("gate metrics: an empty view of %s: %s", path, problem)


def _seconds(duration: object) -> float | None:
    """``duration`` as a finite, non-negative float, or None to skip it (never raises)."""
    if type(duration) is float:
        seconds = duration
    elif type(duration) is int:
        seconds = float(duration) if 0 <= duration < 2**53 else math.nan
    else:
        return None
    # A chained comparison is False for NaN: this skips NaN, infinities and negatives.
    return seconds if 0.0 <= seconds < math.inf else None


def _slot_of(reason: object) -> int | None:
    """The slot of one reason that is not a BlockReasonCode member, or None to skip it."""
    if type(reason) is str:
        return _REASON_SLOTS.get(reason)
    if not isinstance(reason, str):
        return None  # bytes, numbers, None, containers: never a reason
    try:
        # A str subclass (another StrEnum, say) counts by its string value.
        return _REASON_SLOTS.get(str.__str__(reason))
    except Exception:  # noqa: BLE001 - a hostile subclass is skipped, never raised
        return None


def _reason_slots(reasons: object) -> list[int]:
    """The distinct slots of the valid reasons in any input; everything else is skipped."""
    if reasons is None:
        return []
    if isinstance(reasons, str):
        # A lone reason, not a sequence of one-character strings.
        s = _MEMBER_SLOTS.get(id(reasons))
        if s is None:
            s = _slot_of(reasons)
        return [] if s is None else [s]
    slots: list[int] = []
    try:
        for r in reasons:  # type: ignore[attr-defined]
            s = _MEMBER_SLOTS.get(id(r))
            if s is None:
                s = _slot_of(r)
            if s is not None and s not in slots:
                slots.append(s)
    except Exception:  # noqa: BLE001, S110 - not iterable or fails mid-way: keep what was read
        pass
    return slots


class GateMetricExporter:
    """Renders a :class:`GateMetricStore` (or a merged view of a shard directory)."""

    @staticmethod
    def export_prometheus(store: CounterStore | GateMetricView) -> str:
        """Prometheus text exposition 0.0.4, deterministic, every series present.

        For a :class:`GateMetricView` the two pipeline families follow the gate's five (an
        empty view, which aggregated nothing, has the gate's five only).
        """
        if isinstance(store, GateMetricView) and store.aggregate is not None:
            return store.aggregate.render_prometheus()
        return render_prometheus(store.snapshot())

    @staticmethod
    def export_openmetrics(store: CounterStore | GateMetricView) -> str:
        """The same families as :meth:`export_prometheus`, in OpenMetrics 1.0.0."""
        if isinstance(store, GateMetricView) and store.aggregate is not None:
            return store.aggregate.render_openmetrics()
        return render_openmetrics(store.snapshot())

    @staticmethod
    def export_json(store: CounterStore | GateMetricView) -> str:
        """The :meth:`GateMetricStore.to_dict` layout as JSON with sorted keys."""
        return render_json(store.snapshot())
