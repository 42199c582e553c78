"""gatemetrics.http: Accept negotiation, and the WSGI and ASGI ``/metrics`` applications served
by real servers (wsgiref on a loopback port in this process; uvicorn in a child process) over a
real shard directory, with real locks held by real processes."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import wsgiref.simple_server
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from gatemetrics import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE, metrics_asgi_app, metrics_wsgi_app
from gatemetrics.http import negotiate
from tests.engine.schema import OTHER_SCHEMA, SHOP_NAMESPACE, SHOP_SCHEMA, dead_shop_shard
from tests.engine.test_read_dir import hold, release
from tests.exposition_parser import parse
from tests.processes import Reaper, read_line, wait_until

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


@pytest.mark.parametrize(
    ("accept", "form"),
    [
        (None, "text"),
        ("", "text"),
        ("*/*", "text"),
        ("text/plain", "text"),
        ("application/openmetrics-text", "openmetrics"),
        ("Application/OpenMetrics-Text; Version=1.0.0", "openmetrics"),
        (PROMETHEUS_ACCEPT, "openmetrics"),
        ("text/plain;version=0.0.4;q=0.3,*/*;q=0.2", "text"),
        ("text/plain;q=0.9,application/openmetrics-text;q=0.8", "text"),
        ("text/plain;q=0.5,application/openmetrics-text;q=0.8", "openmetrics"),
        ("application/openmetrics-text, text/plain", "text"),  # no preference: the default
        ("application/openmetrics-text;q=0", "text"),  # "not acceptable"
        ("application/openmetrics-text;version=2.0.0", "text"),  # a version we do not write
        ("application/*;q=0.9,text/plain;q=0.1", "openmetrics"),
        ("*/*;q=0.1,application/openmetrics-text;q=0.2", "openmetrics"),
        # Hostile or malformed: never an error, the text format.
        ("application/openmetrics-text;q=abc", "text"),
        ("application/openmetrics-text;q=1.5", "text"),
        ("application/openmetrics-text;q=-1", "text"),
        ("application/openmetrics-text;q=nan", "text"),
        ("application/openmetrics-text;q", "text"),
        ("application/openmetrics text", "text"),
        ("/openmetrics-text", "text"),
        (";;;,,,;=;=", "text"),
        ("\x00\r\n application/openmetrics-text", "text"),
        ("application/openmetrics-text" + ";x=y" * 2000, "text"),  # longer than we parse
        ("text/html," * 40 + "application/openmetrics-text", "text"),  # past 32 ranges
        ("text/html," * 10 + "application/openmetrics-text", "openmetrics"),
    ],
)
def test_accept_negotiation(accept: str | None, form: str) -> None:
    got, ctype = negotiate(accept)
    assert got == form
    assert ctype == (OPENMETRICS_CONTENT_TYPE if form == "openmetrics" else CONTENT_TYPE)


# -- WSGI, under wsgiref ---------------------------------------------------------------------


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request on stderr says nothing a test checks


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    path = tmp_path / "shards"
    path.mkdir()
    dead_shop_shard(path, paid=2, refused=1)
    return path


@pytest.fixture
def wsgi_port(shards: Path) -> Iterator[int]:
    app = metrics_wsgi_app(shards, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=0.1)
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def get(
    port: int, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, "/metrics", headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def check_server(port: int, shards: Path, reaper: Reaper) -> None:
    """What both servers must answer (the WSGI and the ASGI application alike)."""
    status, headers, body = get(port)
    assert (status, headers["content-type"]) == (200, CONTENT_TYPE)
    assert parse(body.decode())["shop_orders_total"].samples[("outcome", "paid")] == 2

    status, headers, om = get(port, headers={"Accept": PROMETHEUS_ACCEPT})
    assert (status, headers["content-type"]) == (200, OPENMETRICS_CONTENT_TYPE)
    families = {m.name: m for m in text_string_to_metric_families(om.decode())}
    assert families["shop_orders"].samples[0].value == 2

    status, headers, empty = get(port, "HEAD", {"Accept": "application/openmetrics-text"})
    assert (status, empty) == (200, b"")
    assert headers["content-length"] == str(len(om))

    for method in ("POST", "DELETE", "PUT"):
        status, headers, _ = get(port, method)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"

    status, headers, body = get(
        port, headers={"Accept": "application/openmetrics-text;q=9,;;q=q,=,"}
    )
    assert status == 200  # a malformed Accept gets the text format, never an error
    assert headers["content-type"] == CONTENT_TYPE
    assert parse(body.decode())

    # A compaction holds the lock past lock_timeout: 503 with Retry-After, not a hang.
    compaction = hold(reaper, "exclusive", shards)
    status, headers, body = get(port)
    release(compaction)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert b"lock not acquired" in body
    # A scrape in progress elsewhere (shared) never makes another wait.
    scrape = hold(reaper, "shared", shards, shards / "aggregate.lock")
    assert get(port)[0] == 200
    release(scrape)


def test_the_wsgi_app_under_a_real_server(wsgi_port: int, shards: Path, reaper: Reaper) -> None:
    check_server(wsgi_port, shards, reaper)


def test_the_wsgi_app_answers_503_for_a_missing_directory_and_500_for_the_wrong_schema(
    tmp_path: Path,
) -> None:
    def call(app: Any) -> tuple[str, dict[str, str], bytes]:
        seen: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            seen.update(status=status, headers=dict(headers))

        body = b"".join(app({"REQUEST_METHOD": "GET"}, start_response))
        return seen["status"], seen["headers"], body

    status, headers, body = call(metrics_wsgi_app(tmp_path / "gone", SHOP_SCHEMA, namespace="s"))
    assert status == "503 Service Unavailable"
    assert headers["Retry-After"] == "1"
    assert str(tmp_path / "gone").encode() in body
    dead_shop_shard(tmp_path, paid=1)
    agg_other = metrics_wsgi_app(tmp_path, OTHER_SCHEMA, namespace="mill")
    status, _, body = call(agg_other)
    assert status == "500 Internal Server Error"
    assert b"schema" in body


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"namespace": "9x"}, ValueError),
        ({"namespace": "s", "lock_timeout": -1}, ValueError),
        ({"namespace": "s", "lock_timeout": float("inf")}, ValueError),
        ({"namespace": "s", "concurrency": 0}, ValueError),
        ({"namespace": "s", "concurrency": True}, ValueError),
    ],
)
def test_bad_arguments_are_refused_when_the_app_is_made(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        metrics_asgi_app(tmp_path, SHOP_SCHEMA, **kwargs)
    if "concurrency" not in kwargs:
        with pytest.raises(error):
            metrics_wsgi_app(tmp_path, SHOP_SCHEMA, **kwargs)
    with pytest.raises(TypeError, match="Schema"):
        metrics_wsgi_app(tmp_path, {"orders": 1}, namespace="s")  # type: ignore[arg-type]


# -- ASGI, under uvicorn -----------------------------------------------------------------------

UVICORN = """
import socket
import uvicorn
from gatemetrics.http import metrics_asgi_app
from tests.engine.schema import SHOP_SCHEMA
app = metrics_asgi_app(sys.argv[1], SHOP_SCHEMA, namespace="shop", lock_timeout=0.1)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config(app, log_level="warning", lifespan="on", ws="none", access_log=False)
uvicorn.Server(config).run(sockets=[sock])
"""


def test_the_asgi_app_under_uvicorn(shards: Path, reaper: Reaper) -> None:
    server = reaper.python(UVICORN, str(shards))
    port = int(read_line(server))

    def accepting() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(accepting, timeout=30)
    check_server(port, shards, reaper)
    server.terminate()
    # uvicorn re-raises SIGTERM once it has shut down (the lifespan shutdown answered).
    assert server.wait(timeout=30) == -15
    assert server.stderr is not None
    assert "Traceback" not in server.stderr.read()


@pytest.mark.anyio
async def test_the_asgi_app_waits_for_the_lock_off_the_event_loop(
    shards: Path, reaper: Reaper
) -> None:
    app = metrics_asgi_app(shards, SHOP_SCHEMA, namespace=SHOP_NAMESPACE, lock_timeout=30)
    compaction: subprocess.Popen[str] = hold(reaper, "exclusive", shards)
    sent: list[dict[str, Any]] = []
    ticks = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    async def ticker() -> None:
        nonlocal ticks
        while not sent:
            await anyio.sleep(0.005)
            ticks += 1
            if ticks == 20:  # only if the loop is free while the app waits
                await anyio.to_thread.run_sync(release, compaction)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(app, scope, receive, send)
    assert sent[0]["status"] == 200
    assert ticks >= 20
    assert b'shop_orders_total{outcome="paid"} 2' in sent[1]["body"]


@pytest.mark.anyio
async def test_the_asgi_app_refuses_websockets(shards: Path) -> None:
    app = metrics_asgi_app(shards, SHOP_SCHEMA, namespace=SHOP_NAMESPACE)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        raise AssertionError(message)

    with pytest.raises(ValueError, match="HTTP only"):
        await app({"type": "websocket", "path": "/"}, receive, send)
