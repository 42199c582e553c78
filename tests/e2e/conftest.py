"""Fixtures of the end-to-end tests: real gunicorn servers, stopped by pid at teardown."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.e2e.servers import GunicornServer, start_gunicorn
from tests.processes import require_tool

StartGunicorn = Callable[[Sequence[str], Mapping[str, str]], GunicornServer]


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[StartGunicorn]:
    """``start(args, env)`` runs gunicorn with our config; every server started this way is
    stopped at teardown (SIGTERM, then SIGKILL by pid for the master and the workers seen)."""
    pytest.importorskip("uvicorn_worker", reason="needs the server extra of ./service")
    servers: list[GunicornServer] = []

    def start(args: Sequence[str], env: Mapping[str, str]) -> GunicornServer:
        log = tmp_path / f"gunicorn-{len(servers)}.log"
        server = start_gunicorn(args, {**os.environ, **env}, log)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def prometheus() -> str:
    """Path of the Prometheus server (Debian package ``prometheus``)."""
    return require_tool("prometheus")
