"""The release-gate service's settings: where a worker keeps its shard and its audit log, and
the service's limits, read from the environment.

A module of its own so that ``gunicorn.conf.py`` reads the settings in the master without
importing the app. Variables (an empty value is unset):

===================================== ==========================================================
variable                              meaning (default)
===================================== ==========================================================
``GATEMETRICS_DIR``                   the shard directory (``$XDG_STATE_HOME/gatemetrics/shards``)
``RELEASE_GATE_AUDIT_LOG``            the JSON-lines audit log
                                      (``$XDG_STATE_HOME/gatemetrics/release-gate-audit.jsonl``)
``GATEMETRICS_PERSISTENCE``           ``write-through`` (default) or ``periodic``
``GATEMETRICS_SAVE_INTERVAL``         seconds between periodic saves (5)
``GATEMETRICS_DURABILITY``            ``process-crash`` (default) or ``power-loss``
``RELEASE_GATE_METRICS_LOCK_TIMEOUT`` seconds ``/metrics`` waits for the directory lock (1, <= 60)
``RELEASE_GATE_METRICS_CONCURRENCY``  scrapes served at once (2, at most 64)
``RELEASE_GATE_BODY_TIMEOUT``         seconds a check's body may take to arrive (5, at most 60)
===================================== ==========================================================

``$XDG_STATE_HOME`` defaults to ``~/.local/state``: per user, kept across reboots (unlike
``/tmp``), and never shared with another user. Production sets both paths explicitly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gatemetrics import Durability, Mode

__all__ = ["Settings"]

# The name the service logged settings warnings under before this module was split out of
# backend.app.main; kept so that operators' log filters still match.
_log = logging.getLogger("backend.app.main")


@dataclass(frozen=True, slots=True)
class Settings:
    """Where a worker keeps its shard and its audit log; absolute paths.

    ``defaulted`` names the environment variables that were unset, so their default was used.
    ``metrics_lock_timeout`` bounds how long ``GET /metrics`` waits for the directory lock (a
    compaction or a cron aggregation holds it) before answering 503; ``metrics_concurrency`` is
    the size of the scrape pool (threads of their own, never the ones the checks' audit writes
    use): a scrape that finds every slot busy answers 503 at once instead of queueing, so a
    stopped aggregator plus a burst of scrapes holds at most that many threads for at most the
    lock timeout each. ``body_timeout`` bounds how long a check's body may take to arrive before
    the answer is 408 (and the connection is closed).

    ``persistence``, ``save_interval`` and ``durability`` choose how the worker's store saves
    its shard (:meth:`GateMetricStore.bind_to_dir`). The default, write-through with
    ``process-crash`` durability, makes every answered decision survive a SIGKILL of its worker
    at the cost of one in-place ``pwrite`` per check (benchmarks/RESULTS.md: figure 2 measures
    a save, figure 5 what it costs in throughput). ``power-loss`` adds an ``fdatasync`` per
    check, so counts also survive a kernel crash or power loss. ``periodic`` saves every
    ``save_interval`` seconds instead: a worker that is SIGKILLed loses up to one interval of
    counts (the audit log still holds every decision).
    """

    metrics_dir: str
    audit_log: str
    defaulted: tuple[str, ...] = ()
    metrics_lock_timeout: float = 1.0
    metrics_concurrency: int = 2
    body_timeout: float = 5.0
    persistence: Mode = "write-through"
    save_interval: float = 5.0
    durability: Durability = Durability.PROCESS_CRASH

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``GATEMETRICS_DIR`` and ``RELEASE_GATE_AUDIT_LOG``; an empty value is unset.

        Relative paths are made absolute against the current directory, so the gunicorn master
        and its workers agree. Raises ``ValueError`` when a default is needed but no home
        directory is known.
        """
        env = os.environ if environ is None else environ
        metrics_dir = env.get("GATEMETRICS_DIR", "")
        audit_log = env.get("RELEASE_GATE_AUDIT_LOG", "")
        defaulted: list[str] = []
        if not metrics_dir or not audit_log:
            root = os.path.join(_state_home(env), "gatemetrics")
            if not metrics_dir:
                metrics_dir = os.path.join(root, "shards")
                defaulted.append("GATEMETRICS_DIR")
            if not audit_log:
                audit_log = os.path.join(root, "release-gate-audit.jsonl")
                defaulted.append("RELEASE_GATE_AUDIT_LOG")
        return cls(
            os.path.abspath(metrics_dir),
            os.path.abspath(audit_log),
            tuple(defaulted),
            persistence=_env_choice(
                env, "GATEMETRICS_PERSISTENCE", _PERSISTENCE_MODES, "write-through"
            ),
            save_interval=_env_seconds(env, "GATEMETRICS_SAVE_INTERVAL", default=5.0),
            durability=_env_durability(env),
            metrics_lock_timeout=_env_seconds(
                env, "RELEASE_GATE_METRICS_LOCK_TIMEOUT", default=1.0, maximum=60.0
            ),
            metrics_concurrency=_env_count(env, "RELEASE_GATE_METRICS_CONCURRENCY", default=2),
            body_timeout=_env_seconds(env, "RELEASE_GATE_BODY_TIMEOUT", default=5.0, maximum=60.0),
        )


_PERSISTENCE_MODES: tuple[Mode, ...] = ("write-through", "periodic")


def _env_choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> Any:
    """The value of ``name`` if it is one of ``choices``; ``default`` when unset or empty."""
    value = env.get(name, "")
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value[:40]!r}")
    return value


def _env_durability(env: Mapping[str, str]) -> Durability:
    """``GATEMETRICS_DURABILITY``: process-crash (default) or power-loss; the previous
    release's none/file/full still work, with one warning line naming the new value."""
    value = env.get("GATEMETRICS_DURABILITY", "")
    if not value:
        return Durability.PROCESS_CRASH
    try:
        durability, deprecation = Durability.from_setting(value)
    except ValueError:
        choices = ", ".join(Durability)
        raise ValueError(
            f"GATEMETRICS_DURABILITY must be one of {choices}; got {value[:40]!r}"
        ) from None
    if deprecation is not None:
        _log.warning("GATEMETRICS_DURABILITY: %s", deprecation)
    return durability


def _env_seconds(
    env: Mapping[str, str], name: str, *, default: float, maximum: float = 86_400.0
) -> float:
    """A positive, finite number of seconds (at most ``maximum``) from ``name``, or ``default``.

    The one parser of the service's durations from the environment (``limits`` uses it too).
    """
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds; got {value[:40]!r}") from None
    if not 0 < seconds <= maximum:  # also rejects nan and inf
        raise ValueError(
            f"{name} must be more than 0 and at most {maximum:g} seconds; got {value[:40]!r}"
        )
    return seconds


def _env_count(
    env: Mapping[str, str], name: str, *, default: int, minimum: int = 1, maximum: int = 64
) -> int:
    """A whole number from ``minimum`` to ``maximum`` from ``name``, or ``default``.

    The one parser of the service's counts from the environment (``limits`` uses it too).
    """
    value = env.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or not minimum <= int(value) <= maximum:
        raise ValueError(
            f"{name} must be a whole number from {minimum} to {maximum}; got {value[:40]!r}"
        )
    return int(value)


def _state_home(env: Mapping[str, str]) -> str:
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec ignores relative values
        return xdg
    home = env.get("HOME", "") or os.path.expanduser("~")
    if not os.path.isabs(home):
        raise ValueError(
            "no home directory to put the default shard directory and audit log in: "
            "set GATEMETRICS_DIR and RELEASE_GATE_AUDIT_LOG"
        )
    return os.path.join(home, ".local", "state")
