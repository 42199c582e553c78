"""Tests of backend.app.limits: the descriptor plan, the settings, the log rate limit (real
records through a real handler, an injected clock) and the descriptor limit (a real child)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from backend.app.limits import (
    RateLimitFilter,
    ServiceLimits,
    plan_descriptors,
)
from tests.processes import ROOT


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_rate_limit_keeps_a_burst_per_kind_and_counts_the_rest() -> None:
    now = [0.0]
    handler = Lines()
    handler.addFilter(RateLimitFilter(burst=3, interval=10.0, clock=lambda: now[0]))
    log = logging.getLogger("test.limits.rate")
    log.addHandler(handler)
    log.propagate = False
    try:
        for i in range(100):
            log.warning("bad client %d", i)
        log.warning("another kind")  # never hidden behind the first
        now[0] = 10.0
        log.warning("bad client %d", 100)
    finally:
        log.removeHandler(handler)
    assert handler.lines == [
        "bad client 0",
        "bad client 1",
        "bad client 2 (this is line 3 of this kind in 10 s; suppressing more)",
        "another kind",
        "bad client 100 (97 more line(s) like this suppressed since the last one;"
        " at most 3 per 10 s)",
    ]


def test_the_rate_limit_tracks_a_bounded_number_of_kinds() -> None:
    handler = Lines()
    limit = RateLimitFilter(burst=2, interval=10.0, max_kinds=4, clock=lambda: 0.0)
    handler.addFilter(limit)
    log = logging.getLogger("test.limits.kinds")
    log.addHandler(handler)
    log.propagate = False
    try:
        for i in range(1000):
            log.warning(f"an f-string message {i}")
    finally:
        log.removeHandler(handler)
    assert len(limit._kinds) == 5  # four kinds, and the shared one of this logger and level
    assert len(handler.lines) == 4 * 1 + 2  # each own kind once, the shared kind its burst


@pytest.mark.parametrize(
    ("nofile", "backlog", "expected"),
    [
        (1024, 2048, (256, 128, True)),  # the usual limit: backlog lowered
        (1_048_576, 2048, (256, 2048, False)),  # raised: nothing to lower
        (400, 2048, (72, 18, True)),  # tiny: connections lowered too
    ],
)
def test_the_descriptor_plan_keeps_the_reserve_out_of_the_connections_reach(
    nofile: int, backlog: int, expected: tuple[int, int, bool]
) -> None:
    limits = ServiceLimits()
    plan = plan_descriptors(limits, nofile, backlog)
    assert (plan.max_connections, plan.accept_batch, plan.clamped) == expected
    # Connections, plus three accept batches not yet dropped, fit beside the reserve.
    assert plan.max_connections + 3 * plan.accept_batch <= nofile - limits.fd_reserve


def test_limits_come_from_the_environment() -> None:
    assert ServiceLimits.from_env({}) == ServiceLimits(256, 5.0, 256)
    env = {
        "RELEASE_GATE_MAX_CONNECTIONS": "64",
        "RELEASE_GATE_HEADER_TIMEOUT": "2.5",
        "RELEASE_GATE_FD_RESERVE": "100",
    }
    assert ServiceLimits.from_env(env) == ServiceLimits(64, 2.5, 100)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELEASE_GATE_MAX_CONNECTIONS", "0"),
        ("RELEASE_GATE_MAX_CONNECTIONS", "-5"),
        ("RELEASE_GATE_HEADER_TIMEOUT", "inf"),
        ("RELEASE_GATE_HEADER_TIMEOUT", "soon"),
        ("RELEASE_GATE_FD_RESERVE", "8"),
    ],
)
def test_unusable_limits_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        ServiceLimits.from_env({name: value})


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one_in_a_real_process() -> None:
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))\n"
        "from backend.app.limits import raise_nofile_limit\n"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == "(256, 2048, 2048) (2048, 2048)"
