"""The backend app's routes and per-worker state (service/backend/app/main.py), driven in-process
through its ASGI interface.

Real parts: the real gate, a real shard directory and JSON-lines audit log on disk, the real
aggregator behind GET /metrics, real file locks. Only the HTTP server is absent (tests/e2e/ runs
the app under a real gunicorn). The layers under the routes have their own modules:
test_settings.py, test_asgi.py (headers, body limits, deadlines), test_request.py (the check
body and its error table), test_openapi.py (the published document, and a fuzzer against it).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from filelock import FileLock
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)

from backend.app.main import ReleaseGateApp, Settings, create_app
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_gate import ReleaseGate
from gatemetrics import OPENMETRICS_CONTENT_TYPE, Durability
from gatemetrics._format import parse_name
from gatemetrics.aggregate import LOCK_NAME
from tests.app.asgi_client import (
    CHECK,
    NOTHING,
    NOW,
    OK,
    Client,
    Reply,
    audit_lines,
    counts,
    dir_names,
    lifespan,
    override,
)
from tests.exposition_parser import parse
from tests.gate.gate_shards import GATE_FAMILIES, PIPELINE_FAMILIES
from tests.processes import Reaper, read_line, run_python
from tests.shard_tools import is_locked

pytestmark = pytest.mark.anyio


# -- state: created in the worker, never at import ---------------------------------------------


def test_importing_the_app_creates_no_state_and_no_files(tmp_path: Path) -> None:
    # gunicorn --preload imports the module in the master before it forks.
    shards, audit = tmp_path / "shards", tmp_path / "logs" / "audit.jsonl"
    result = run_python(
        "import os, sys\n"
        f"os.environ['GATEMETRICS_DIR'] = {str(shards)!r}\n"
        f"os.environ['RELEASE_GATE_AUDIT_LOG'] = {str(audit)!r}\n"
        "from backend.app.main import app\n"
        "from gatemetrics._process import PROCESS\n"
        "assert not app.started\n"
        "assert not PROCESS.bindings, list(PROCESS.bindings)\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
    assert list(tmp_path.iterdir()) == []


async def test_lifespan_startup_binds_a_shard_and_shutdown_releases_it(
    gate_app: ReleaseGateApp, tmp_path: Path
) -> None:
    assert await lifespan(gate_app, "startup") == [{"type": "lifespan.startup.complete"}]
    assert gate_app.started
    # The shard is created at startup and its owner holds an flock on it for life; the audit
    # log exists (probed), empty.
    metrics_dir = Path(gate_app.settings.metrics_dir)
    owned = [(n, p[1]) for n in dir_names(metrics_dir) if (p := parse_name(n)) is not None]
    assert len(owned) == 1
    ((shard_name, kind),) = owned
    assert kind == "v2"
    assert is_locked(metrics_dir / shard_name)
    assert os.path.basename(gate_app.settings.audit_log) in dir_names(tmp_path)
    assert audit_lines(gate_app) == []
    assert (await Client(gate_app).check({"verdict": "release_ok", "reasons": []})).status == 200
    live = GateMetricStore.load_from_dir(gate_app.settings.metrics_dir).aggregate
    assert (live.live, live.dead) == (1, 0)

    assert await lifespan(gate_app, "shutdown") == [{"type": "lifespan.shutdown.complete"}]
    assert not gate_app.started
    dead = GateMetricStore.load_from_dir(gate_app.settings.metrics_dir).aggregate
    assert (dead.live, dead.dead) == (0, 1)  # saved and released: the aggregator may absorb it
    assert not is_locked(metrics_dir / shard_name)
    assert counts(gate_app)["decisions"] == {"ALLOW": 1, "DENY": 0}


async def test_lifespan_startup_fails_when_the_audit_log_directory_is_missing(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "unmounted" / "audit.jsonl"
    app = create_app(Settings(str(tmp_path / "shards"), str(missing)))
    (message,) = await lifespan(app, "startup")
    assert message["type"] == "lifespan.startup.failed"
    assert "audit log unusable" in message["message"]
    assert str(missing) in message["message"]
    assert not app.started
    assert not missing.parent.exists()  # an explicit path's directory is never created


async def test_lifespan_startup_fails_when_the_shard_directory_is_unusable(
    tmp_path: Path,
) -> None:
    not_a_dir = tmp_path / "shards"
    not_a_dir.write_text("a file where the shard directory should be")
    app = create_app(Settings(str(not_a_dir), str(tmp_path / "audit.jsonl")))
    (message,) = await lifespan(app, "startup")
    assert message["type"] == "lifespan.startup.failed"
    assert str(not_a_dir) in message["message"]
    assert not app.started


async def test_without_lifespan_the_first_request_starts_the_app(gate_app: ReleaseGateApp) -> None:
    assert not gate_app.started
    reply = await Client(gate_app).check({"verdict": "release_ok", "reasons": []})
    assert reply.status == 200
    assert gate_app.started
    assert counts(gate_app)["decisions"] == {"ALLOW": 1, "DENY": 0}


async def test_concurrent_first_requests_start_the_app_once(gate_app: ReleaseGateApp) -> None:
    replies: list[Reply] = []

    async def one() -> None:
        replies.append(await Client(gate_app).check({"verdict": "release_ok", "reasons": []}))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    assert [r.status for r in replies] == [200] * 20
    # One store, one shard: twenty decisions in it.
    view = GateMetricStore.load_from_dir(gate_app.settings.metrics_dir)
    assert view.aggregate.live == 1
    assert view.decision_counts() == {"ALLOW": 20, "DENY": 0}
    assert len(audit_lines(gate_app)) == 20


async def test_a_request_that_cannot_start_the_app_gets_503(tmp_path: Path) -> None:
    app = create_app(Settings(str(tmp_path / "shards"), str(tmp_path / "no" / "audit.jsonl")))
    reply = await Client(app).check({"verdict": "release_ok", "reasons": []})
    assert reply.status == 503
    assert reply.json()["error"] == "not_ready"
    health = await Client(app).request("GET", "/healthz")
    assert health.status == 503


async def test_periodic_persistence_saves_off_the_request_path(tmp_path: Path) -> None:
    settings = Settings(
        str(tmp_path / "shards"),
        str(tmp_path / "audit.jsonl"),
        persistence="periodic",
        save_interval=0.05,
        durability=Durability.PROCESS_CRASH,
    )
    app = create_app(settings)
    assert await lifespan(app, "startup") == [{"type": "lifespan.startup.complete"}]
    try:
        assert (await Client(app).check({"verdict": "release_ok", "reasons": []})).status == 200

        # The periodic thread saves within an interval or so: poll (off the loop, since it reads
        # files) with a deadline, never sleep a fixed time.
        def saved() -> bool:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if counts(app)["decisions"]["ALLOW"] == 1:
                    return True
                time.sleep(0.01)
            return False

        assert await anyio.to_thread.run_sync(saved)
    finally:
        assert await lifespan(app, "shutdown") == [{"type": "lifespan.shutdown.complete"}]
    assert counts(app)["decisions"] == {"ALLOW": 1, "DENY": 0}


# -- POST /release-gate/check ------------------------------------------------------------------


async def test_check_allows_a_release_ok_and_counts_and_audits_it(
    gate_app: ReleaseGateApp,
) -> None:
    reply = await Client(gate_app).check({"verdict": "release_ok", "reasons": []})
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "allowed": True,
        "verdict": "release_ok",
        "reasons": [],
        "override_applied": False,
        "audit_detail": "RELEASE_OK",
    }
    assert counts(gate_app) == NOTHING | {"decisions": {"ALLOW": 1, "DENY": 0}}
    (entry,) = audit_lines(gate_app)
    assert entry["decision"] == "ALLOW"
    assert entry["pid"] == os.getpid()


async def test_check_applies_a_valid_override_on_a_hold(gate_app: ReleaseGateApp) -> None:
    reply = await Client(gate_app).check(
        {
            "verdict": "release_hold",
            "reasons": ["TIER_FAIL"],
            "override": override(),
            "release_scope": "payments/prod",
        }
    )
    assert reply.status == 200
    assert reply.json() == {
        "allowed": True,
        "verdict": "release_hold",
        "reasons": ["TIER_FAIL"],
        "override_applied": True,
        "audit_detail": "OVERRIDE_APPLIED",
    }
    (entry,) = audit_lines(gate_app)
    assert entry["override"] == override()
    assert entry["release_scope"] == "payments/prod"


async def test_check_denies_with_reasons_and_counts_each_reason(gate_app: ReleaseGateApp) -> None:
    reply = await Client(gate_app).check(
        {"verdict": "release_block", "reasons": ["NO_TIER_DATA", "DRIFT_ALERT", "NO_TIER_DATA"]}
    )
    assert reply.status == 200
    assert reply.json()["reasons"] == ["DRIFT_ALERT", "NO_TIER_DATA"]  # distinct, in order
    assert counts(gate_app) == NOTHING | {
        "decisions": {"ALLOW": 0, "DENY": 1},
        "reasons": {"DRIFT_ALERT": 1, "NO_TIER_DATA": 1},
    }


async def test_check_counts_a_breach_attempt_and_audits_it(gate_app: ReleaseGateApp) -> None:
    reply = await Client(gate_app).check(
        {"verdict": "release_block", "reasons": ["GUARD_VIOLATION"], "override": override()}
    )
    assert reply.status == 200
    assert reply.json()["allowed"] is False
    assert reply.json()["audit_detail"] == "CONTRACT_BREACH_NO_OVERRIDE absolute=GUARD_VIOLATION"
    assert counts(gate_app)["breaches"] == 1
    (entry,) = audit_lines(gate_app)
    assert "CONTRACT_BREACH_NO_OVERRIDE" in entry["audit_detail"]


async def test_check_without_now_ms_uses_the_server_clock(gate_app: ReleaseGateApp) -> None:
    client = Client(gate_app)
    hold = {"verdict": "release_hold", "reasons": ["TIER_FAIL"], "release_scope": "payments/prod"}
    # Valid from NOW on: applied at the server's clock...
    fresh = await client.check(hold | {"override": override(created_at_ms=NOW)})
    assert fresh.json()["override_applied"] is True
    # ... but an explicit now_ms is taken literally (null means "the server's clock").
    early = await client.check(hold | {"override": override(created_at_ms=NOW), "now_ms": NOW - 1})
    assert early.json()["audit_detail"] == "OVERRIDE_NOT_YET_VALID"
    null = await client.check(hold | {"override": override(created_at_ms=NOW), "now_ms": None})
    assert null.json()["override_applied"] is True
    assert [e["ts_ms"] for e in audit_lines(gate_app)] == [NOW, NOW - 1, NOW]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", CHECK, "POST"),
        ("PUT", CHECK, "POST"),
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
    ],
)
async def test_a_wrong_method_gets_405_with_an_allow_header(
    gate_app: ReleaseGateApp, method: str, path: str, allow: str
) -> None:
    reply = await Client(gate_app).request(method, path, orjson.dumps(OK))
    assert reply.status == 405
    assert reply.headers["allow"] == allow
    assert reply.json()["error"] == "method_not_allowed"
    assert not gate_app.started  # nothing was even set up
    assert audit_lines(gate_app) == []


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/", "/release-gate/check/", "/HEALTHZ"])
async def test_an_unknown_path_gets_404(gate_app: ReleaseGateApp, path: str) -> None:
    reply = await Client(gate_app).request("GET", path)
    assert reply.status == 404
    assert reply.json() == {"error": "not_found", "message": f"no such path: {path}"}


async def test_an_unexpected_failure_is_a_json_500_and_logged(
    gate_app: ReleaseGateApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug cannot be produced on demand through the real gate (after validation it never
    # raises): replace acheck with one that does.
    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ReleaseGate, "acheck", broken)
    reply = await Client(gate_app).check(OK)
    assert reply.status == 500
    assert reply.json()["error"] == "internal_error"
    assert "a bug" not in reply.body.decode()  # no internals leak to the client
    assert "a bug" in caplog.text


async def test_websocket_connections_are_refused(gate_app: ReleaseGateApp) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(message)

    with pytest.raises(RuntimeError, match="websocket"):
        await gate_app({"type": "websocket", "path": "/"}, receive, send)


# -- GET /metrics and /healthz -----------------------------------------------------------------


async def test_metrics_merge_the_whole_shard_directory(gate_app: ReleaseGateApp) -> None:
    client = Client(gate_app)
    await client.check(OK)
    # Another worker's shard in the same directory (a real second process would do the same).
    other = GateMetricStore()
    other.record_outcome(False, ["TIER_FAIL"], breach=True)
    assert other.save_to_dir(gate_app.settings.metrics_dir)

    reply = await client.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = parse(reply.body.decode())
    assert list(families) == GATE_FAMILIES + PIPELINE_FAMILIES
    assert families["release_gate_decision_total"].samples == {
        ("decision", "ALLOW"): 1,
        ("decision", "DENY"): 1,
    }
    assert families["release_gate_reason_total"].samples[("reason", "TIER_FAIL")] == 1
    assert families["release_gate_contract_breach_total"].samples == {("kind", "NO_OVERRIDE"): 1}
    assert families["release_gate_shards"].samples == {("state", "live"): 2, ("state", "dead"): 0}
    # HEAD: the same headers, no body.
    head = await client.request("HEAD", "/metrics")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(reply.body))


async def test_metrics_answer_503_while_the_directory_lock_stays_busy(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    settings = Settings(str(shards), str(tmp_path / "audit.jsonl"), metrics_lock_timeout=0.2)
    lock = FileLock(str(shards / LOCK_NAME), fallback_to_soft=False)
    with lock:  # a long compaction or a stuck cron aggregator
        reply = await Client(create_app(settings)).request("GET", "/metrics")
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.json()["error"] == "metrics_unavailable"


async def test_metrics_answer_503_for_a_missing_directory(tmp_path: Path) -> None:
    settings = Settings(str(tmp_path / "nowhere"), str(tmp_path / "audit.jsonl"))
    reply = await Client(create_app(settings)).request("GET", "/metrics")
    assert reply.status == 503
    assert "nowhere" in reply.json()["message"]


async def test_metrics_answer_openmetrics_when_accept_prefers_it(gate_app: ReleaseGateApp) -> None:
    client = Client(gate_app)
    await client.check(OK)
    text = await client.request("GET", "/metrics")
    prometheus_asks = (
        "application/openmetrics-text;version=1.0.0;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.1"
    )
    reply = await client.request("GET", "/metrics", headers=[("accept", prometheus_asks)])
    assert reply.status == 200
    assert reply.headers["content-type"] == OPENMETRICS_CONTENT_TYPE
    assert reply.body.endswith(b"# EOF\n")
    families = {m.name: m for m in parse_openmetrics(reply.body.decode())}
    # The same families as the text exposition, named without _total as OpenMetrics says.
    assert list(families) == [n.removesuffix("_total") for n in parse(text.body.decode())]
    allowed = [
        s for s in families["release_gate_decision"].samples if s.labels["decision"] == "ALLOW"
    ]
    assert [s.value for s in allowed] == [1]
    head = await client.request("HEAD", "/metrics", headers=[("accept", prometheus_asks)])
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-type"] == OPENMETRICS_CONTENT_TYPE
    assert head.headers["content-length"] == str(len(reply.body))


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("accept", "*/*")],
        [("accept", "text/plain;q=0.9,application/openmetrics-text;q=0.1")],
        [("accept", "application/openmetrics-text;q=abc")],
        [("accept", ";;;=,,q=1,/")],
        [("accept", "application/openmetrics-text;version=9.9.9")],
        [("accept", "text/html," * 5000)],
        # Repeated: joined as HTTP says (the first header prefers text, the second says nothing).
        [("accept", "text/plain"), ("accept", "image/png")],
    ],
)
async def test_metrics_answer_the_text_format_for_any_other_accept(
    gate_app: ReleaseGateApp, headers: list[tuple[str, str]]
) -> None:
    client = Client(gate_app)
    await client.check(OK)  # the worker starts, and its shard is in the directory
    reply = await client.request("GET", "/metrics", headers=headers)
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert list(parse(reply.body.decode())) == GATE_FAMILIES + PIPELINE_FAMILIES


async def test_a_scrape_in_progress_never_makes_another_wait(
    tmp_path: Path, reaper: Reaper
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    # Another worker's scrape holds the directory's locks shared, as every scrape now does;
    # a lock timeout of zero makes one attempt, so waiting at all would answer 503.
    other = reaper.python(
        """
        import fcntl
        fds = [os.open(sys.argv[1], os.O_RDONLY),
               os.open(os.path.join(sys.argv[1], "aggregate.lock"), os.O_RDWR | os.O_CREAT)]
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_SH)
        print("reading", flush=True)
        time.sleep(600)
        """,
        str(shards),
    )
    assert read_line(other) == "reading"
    settings = Settings(str(shards), str(tmp_path / "audit.jsonl"), metrics_lock_timeout=0)
    client = Client(create_app(settings))
    for _ in range(3):
        reply = await client.request("GET", "/metrics")
        assert reply.status == 200, reply.body


async def test_healthz_reports_this_worker(gate_app: ReleaseGateApp) -> None:
    reply = await Client(gate_app).request("GET", "/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok", "pid": os.getpid()}


# -- the event loop is never blocked -------------------------------------------------------------


async def ticks_while(lock_path: Path, request: Any) -> tuple[Reply, int]:
    """Hold ``lock_path``'s file lock; a ticker on the loop releases it after 20 ticks.

    If the request blocked the loop while it waits for the lock, the ticker could not run,
    the lock would never be released and the request would fail (or time out).
    """
    lock = FileLock(str(lock_path), thread_local=False, fallback_to_soft=False)
    lock.acquire()
    ticks = 0
    result: list[Reply] = []

    async def ticker() -> None:
        nonlocal ticks
        while not result:
            await anyio.sleep(0.005)
            ticks += 1
            if ticks == 20:
                lock.release()

    async def run() -> None:
        result.append(await request())

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(run)
    finally:
        if lock.is_locked:
            lock.release()
    return result[0], ticks


def hold_directory_lock(reaper: Reaper, directory: Path) -> None:
    """A real child holds ``fcntl.flock`` on the directory's aggregate.lock (a stopped
    aggregator): every aggregator waits for it until the child dies (the reaper kills it)."""
    directory.mkdir(parents=True, exist_ok=True)
    child = reaper.python(
        """
        import fcntl
        fd = os.open(os.path.join(sys.argv[1], "aggregate.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
        """,
        str(directory),
    )
    assert read_line(child) == "locked"


async def test_checks_never_queue_behind_scrapes_of_a_stalled_directory(
    tmp_path: Path, reaper: Reaper
) -> None:
    # 60 scrapes: more than the default thread limiter's 40 tokens, which the checks' audit
    # writes use. Were scrapes to wait for the lock there, every check would wait too.
    stall = 2.0
    settings = Settings(
        str(tmp_path / "shards"),
        str(tmp_path / "audit.jsonl"),
        metrics_lock_timeout=stall,
        metrics_concurrency=2,
    )
    app = create_app(settings, clock_ms=lambda: NOW)
    await app.startup()
    try:
        hold_directory_lock(reaper, tmp_path / "shards")
        client = Client(app)
        scrapes: list[tuple[Reply, float]] = []
        checks: list[float] = []

        async def scrape() -> None:
            start = time.monotonic()
            reply = await client.request("GET", "/metrics")
            scrapes.append((reply, time.monotonic() - start))

        async def check() -> None:
            start = time.monotonic()
            reply = await client.check(OK)
            checks.append(time.monotonic() - start)
            assert reply.status == 200
            assert reply.json()["allowed"] is True

        async with anyio.create_task_group() as tg:
            for _ in range(60):
                tg.start_soon(scrape)
            await anyio.sleep(0.05)  # the scrapes are in
            for _ in range(10):
                await check()
    finally:
        await app.shutdown()
    assert len(checks) == 10
    assert max(checks) < stall / 4, checks
    assert [reply.status for reply, _ in scrapes] == [503] * 60
    assert all(reply.headers["retry-after"] == "1" for reply, _ in scrapes)
    waited = [
        seconds for reply, seconds in scrapes if "cannot aggregate" in reply.json()["message"]
    ]
    refused = [seconds for reply, seconds in scrapes if "scrape slot" in reply.json()["message"]]
    assert len(waited) == 2  # the pool's two slots waited for the lock, once each
    assert min(waited) >= stall * 0.9
    assert len(refused) == 58  # the rest were answered at once
    assert max(refused) < stall / 4
    assert len(audit_lines(app)) == 10


async def test_metrics_wait_for_the_directory_lock_off_the_event_loop(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    lock = Path(gate_app.settings.metrics_dir) / LOCK_NAME
    reply, ticks = await ticks_while(lock, lambda: Client(gate_app).request("GET", "/metrics"))
    assert reply.status == 200
    assert ticks >= 20


async def test_a_check_waits_for_the_audit_lock_off_the_event_loop(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    lock = Path(gate_app.settings.audit_log + ".lock")  # JsonlAuditLog's lock file
    reply, ticks = await ticks_while(lock, lambda: Client(gate_app).check(OK))
    assert reply.status == 200
    assert reply.json()["allowed"] is True  # the audit write succeeded once the lock was free
    assert ticks >= 20


# -- a worker started before a fork, and a start that fails ----------------------------------


def test_a_worker_forked_after_startup_counts_in_a_shard_of_its_own(tmp_path: Path) -> None:
    # The app started and used before a fork, as a server might do by mistake: the child keeps
    # the state, but the engine has made its store a new incarnation that never counts the
    # parent's decisions again. In a fresh interpreter, so the fork happens without threads.
    result = run_python(
        "import os, anyio\n"
        "from backend.app.main import Settings, create_app\n"
        "from tests.app.asgi_client import Client, OK\n"
        f"app = create_app(Settings({str(tmp_path / 'shards')!r}, {str(tmp_path / 'a.jsonl')!r}))\n"
        "assert anyio.run(Client(app).check, OK).status == 200\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if anyio.run(Client(app).check, OK).status == 200 else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0, status\n"
        "anyio.run(app.shutdown)\n"
    )
    assert result.returncode == 0, result.stderr
    view = GateMetricStore.load_from_dir(tmp_path / "shards")
    assert view.decision_counts() == {"ALLOW": 2, "DENY": 0}
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    assert len({orjson.loads(line)["pid"] for line in lines}) == 2


def test_errno_of_an_unusable_audit_log_is_kept(tmp_path: Path) -> None:
    # The startup error names the path and keeps the errno, for the operator's log line.
    directory = tmp_path / "dir-not-file"
    directory.mkdir()
    app = create_app(Settings(str(tmp_path / "shards"), str(directory)))
    with pytest.raises(OSError, match="audit log unusable") as info:
        anyio.run(app.startup)
    assert info.value.errno == errno.EISDIR
    assert info.value.filename == str(directory)


def test_a_symlinked_audit_log_stops_the_worker_and_is_left_alone(tmp_path: Path) -> None:
    # The start-up probe opens the log as every record does: never through a link, so a link
    # planted at the path (or configured by mistake) fails the start instead of writing
    # through it, and the file it points at is untouched.
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(b"keep\n")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    app = create_app(Settings(str(tmp_path / "shards"), str(link)))
    with pytest.raises(OSError, match="audit log unusable") as info:
        anyio.run(app.startup)
    assert info.value.errno == errno.ELOOP
    assert target.read_bytes() == b"keep\n"
    assert link.is_symlink()


async def test_metrics_without_any_usable_location_answer_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GATEMETRICS_DIR and no home directory to default to (simulated, as above).
    for name in ("GATEMETRICS_DIR", "RELEASE_GATE_AUDIT_LOG", "XDG_STATE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    reply = await Client(create_app()).request("GET", "/metrics")
    assert reply.status == 503
    assert "set GATEMETRICS_DIR" in reply.json()["message"]
