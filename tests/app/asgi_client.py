"""Drive the backend ASGI app in-process, as a server would: requests, the lifespan protocol,
and what a request left behind (the counts in the shard directory, the audit log's lines).

Shared by the tests of tests/app/ (a module of its own: no test module imports a conftest).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from backend.app.main import ReleaseGateApp
from backend.app.testing.gate_metrics import GateMetricStore
from tests.app.clock import GATE_APP_CLOCK_MS

__all__ = [
    "CHECK",
    "NOTHING",
    "NOW",
    "OK",
    "Client",
    "Reply",
    "audit_lines",
    "counts",
    "dir_names",
    "lifespan",
    "override",
]


CHECK = "/release-gate/check"


NOW = GATE_APP_CLOCK_MS


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    receives: int  # how many times the app called receive()

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Client:
    """Sends one request through the app's ASGI interface, as a server would."""

    app: ReleaseGateApp
    sent: list[dict[str, Any]] = field(default_factory=list)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: Iterable[tuple[str, str]] | None = None,
        chunks: Sequence[bytes] | None = None,
        disconnect_after: int | None = None,
    ) -> Reply:
        """``chunks`` sends the body in pieces (as for ``Transfer-Encoding: chunked``);
        ``disconnect_after`` makes the client vanish after that many chunks."""
        pieces = list(chunks) if chunks is not None else [body]
        if headers is None:
            headers = [("content-type", "application/json")]
            if chunks is None:
                headers.append(("content-length", str(len(body))))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        receives = 0

        async def receive() -> dict[str, Any]:
            nonlocal receives
            receives += 1
            index = receives - 1
            if disconnect_after is not None and index >= disconnect_after:
                return {"type": "http.disconnect"}
            if index < len(pieces):
                more = index < len(pieces) - 1
                return {"type": "http.request", "body": pieces[index], "more_body": more}
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        self.sent = sent
        if not sent:
            return Reply(0, {}, b"", receives)
        start, *bodies = sent
        assert start["type"] == "http.response.start"
        assert [b["type"] for b in bodies] == ["http.response.body"]
        out_headers = {k.decode(): v.decode() for k, v in start["headers"]}
        assert len(out_headers) == len(start["headers"]), "a header was sent twice"
        return Reply(start["status"], out_headers, bodies[0]["body"], receives)

    async def check(self, doc: dict[str, Any]) -> Reply:
        return await self.request("POST", CHECK, orjson.dumps(doc))


async def lifespan(app: ReleaseGateApp, *events: str) -> list[dict[str, Any]]:
    """Drive the ASGI lifespan protocol through ``events``; the messages the app sent back.

    After the last event the app waits for the next one, as under a server: it is cancelled
    once it has answered every event (or has returned).
    """
    inbox = [{"type": f"lifespan.{e}"} for e in events]
    sent: list[dict[str, Any]] = []
    answered = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not inbox:
            await anyio.sleep_forever()
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) == len(events):
            answered.set()

    async def run() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
        answered.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await answered.wait()
        tg.cancel_scope.cancel()
    return sent


def counts(app: ReleaseGateApp) -> dict[str, Any]:
    """Everything counted in the app's shard directory (the merged view)."""
    view = GateMetricStore.load_from_dir(app.settings.metrics_dir)
    return {
        "decisions": view.decision_counts(),
        "reasons": {k: v for k, v in view.reason_counts().items() if v},
        "breaches": view.breach_counts()["NO_OVERRIDE"],
        "audit_failures": view.audit_write_failures(),
        "metric_failures": view.metric_write_failures(),
    }


def dir_names(directory: str | Path) -> list[str]:
    return sorted(os.listdir(directory))


def audit_lines(app: ReleaseGateApp) -> list[dict[str, Any]]:
    path = Path(app.settings.audit_log)
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


NOTHING = {
    "decisions": {"ALLOW": 0, "DENY": 0},
    "reasons": {},
    "breaches": 0,
    "audit_failures": 0,
    "metric_failures": 0,
}


def override(**changes: Any) -> dict[str, Any]:
    return {
        "ttl_seconds": 3600,
        "created_at_ms": NOW - 60_000,
        "scope": "payments/prod",
        "reason": "tier failure tracked in INC-1",
        "created_by": "alice@example.com",
    } | changes


OK = {"verdict": "release_ok", "reasons": []}
