"""Fixtures of the service's tests: the backend ASGI app over a fresh directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.app.clock import GATE_APP_CLOCK_MS

if TYPE_CHECKING:
    from backend.app.main import ReleaseGateApp


@pytest.fixture
def gate_app(tmp_path: Path) -> Iterator[ReleaseGateApp]:
    """The backend app over a fresh shard directory (``tmp_path/shards``) and audit log
    (``tmp_path/audit.jsonl``), its server clock fixed at ``GATE_APP_CLOCK_MS``. Not started:
    a test drives the lifespan, or its first request starts the app. Teardown shuts down what
    is left (final save, shard lock released)."""
    import anyio

    from backend.app.main import Settings, create_app

    settings = Settings(str(tmp_path / "shards"), str(tmp_path / "audit.jsonl"))
    app = create_app(settings, clock_ms=lambda: GATE_APP_CLOCK_MS)
    yield app
    anyio.run(app.shutdown)
