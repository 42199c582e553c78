"""Developer and CI sessions. ``python3 -m nox`` runs the default set (what CI runs).

Sessions install the project into their own virtual environments, so a machine needs only
Python, pip and nox. Tool versions are pinned here so a lint or type failure means the code
changed, not the tool.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typing", "tests"]
nox.options.error_on_missing_interpreters = True

RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (pytest, hypothesis; real promtool when installed; real gunicorn)."""
    session.install("-e", ".[test,server]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over gatemetrics and backend."""
    session.install("-e", ".[test]", MYPY)
    session.run("mypy", "--strict", "gatemetrics", "backend")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks side by side with prometheus_client (not part of the test run)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.bench_hot_path")
    session.run("python", "-m", "benchmarks.bench_aggregate", *session.posargs)
