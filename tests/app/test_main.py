"""The backend ASGI app (service/backend/app/main.py), driven in-process through its ASGI interface.

Real parts: the real gate, a real shard directory and JSON-lines audit log on disk, the real
aggregator behind GET /metrics, real file locks. Only the HTTP server is absent (tests/e2e/ runs
the app under a real gunicorn).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from filelock import FileLock

from backend.app.main import MAX_BODY_BYTES, ReleaseGateApp, Settings, create_app
from backend.app.testing.gate_metrics import GateMetricStore
from backend.app.testing.release_gate import ReleaseGate
from gatemetrics._format import parse_name
from gatemetrics.aggregate import LOCK_NAME
from gatemetrics.shards import Durability
from tests.app.clock import GATE_APP_CLOCK_MS
from tests.exposition_parser import parse
from tests.processes import Reaper, read_line, run_python
from tests.shard_tools import GATE_FAMILIES, PIPELINE_FAMILIES, is_locked

pytestmark = pytest.mark.anyio

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


# -- settings ------------------------------------------------------------------------------------


def test_settings_come_from_the_environment_as_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"GATEMETRICS_DIR": "shards", "RELEASE_GATE_AUDIT_LOG": "a.log"})
    assert settings == Settings(str(tmp_path / "shards"), str(tmp_path / "a.log"), ())


def test_settings_default_to_the_xdg_state_directory() -> None:
    env = {"XDG_STATE_HOME": "/srv/state", "HOME": "/home/gate", "GATEMETRICS_DIR": ""}
    settings = Settings.from_env(env)
    assert settings.metrics_dir == "/srv/state/gatemetrics/shards"
    assert settings.audit_log == "/srv/state/gatemetrics/release-gate-audit.jsonl"
    assert settings.defaulted == ("GATEMETRICS_DIR", "RELEASE_GATE_AUDIT_LOG")
    # A relative XDG_STATE_HOME is ignored, as the XDG spec says: ~/.local/state instead.
    fallback = Settings.from_env({"XDG_STATE_HOME": "state", "HOME": "/home/gate"})
    assert fallback.metrics_dir == "/home/gate/.local/state/gatemetrics/shards"


def test_settings_refuse_to_guess_without_a_home(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.path.expanduser returns "~" unchanged when the user has no home directory at all;
    # simulated here because the test user always has one.
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    with pytest.raises(ValueError, match="set GATEMETRICS_DIR and RELEASE_GATE_AUDIT_LOG"):
        Settings.from_env({"GATEMETRICS_DIR": "/srv/shards"})
    # Nothing to guess when both are set.
    assert (
        Settings.from_env({"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"}).defaulted == ()
    )


def test_settings_default_to_write_through_with_process_crash_durability(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = Settings.from_env({"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"})
    assert (settings.persistence, settings.save_interval, settings.durability) == (
        "write-through",
        5.0,
        Durability.PROCESS_CRASH,
    )
    assert Settings("/a", "/b").durability is Durability.PROCESS_CRASH
    # Empty values count as unset, like the path variables.
    empty = {"GATEMETRICS_PERSISTENCE": "", "GATEMETRICS_DURABILITY": ""}
    with caplog.at_level(logging.WARNING):
        assert Settings.from_env(
            {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"} | empty
        ) == (settings)
    assert caplog.records == []  # nothing deprecated was used


def test_settings_bound_scrapes_and_bodies_by_default_and_from_the_environment() -> None:
    paths = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"}
    settings = Settings.from_env(paths)
    assert (settings.metrics_lock_timeout, settings.metrics_concurrency) == (1.0, 2)
    assert settings.body_timeout == 5.0
    settings = Settings.from_env(
        paths
        | {
            "RELEASE_GATE_METRICS_LOCK_TIMEOUT": "0.25",
            "RELEASE_GATE_METRICS_CONCURRENCY": "3",
            "RELEASE_GATE_BODY_TIMEOUT": "2",
        }
    )
    assert (settings.metrics_lock_timeout, settings.metrics_concurrency) == (0.25, 3)
    assert settings.body_timeout == 2.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELEASE_GATE_METRICS_LOCK_TIMEOUT", "61"),
        ("RELEASE_GATE_METRICS_LOCK_TIMEOUT", "0"),
        ("RELEASE_GATE_BODY_TIMEOUT", "nan"),
        ("RELEASE_GATE_METRICS_CONCURRENCY", "0"),
        ("RELEASE_GATE_METRICS_CONCURRENCY", "65"),
        ("RELEASE_GATE_METRICS_CONCURRENCY", "two"),
    ],
)
def test_settings_refuse_unusable_service_limits_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b", name: value})


def test_settings_read_persistence_interval_and_durability(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = Settings.from_env(
            {
                "GATEMETRICS_DIR": "/a",
                "RELEASE_GATE_AUDIT_LOG": "/b",
                "GATEMETRICS_PERSISTENCE": "periodic",
                "GATEMETRICS_SAVE_INTERVAL": "2.5",
                "GATEMETRICS_DURABILITY": "power-loss",
            }
        )
    assert (settings.persistence, settings.save_interval, settings.durability) == (
        "periodic",
        2.5,
        Durability.POWER_LOSS,
    )
    assert caplog.records == []


@pytest.mark.parametrize(
    ("legacy", "new"),
    [
        ("none", Durability.PROCESS_CRASH),
        ("file", Durability.POWER_LOSS),
        ("full", Durability.POWER_LOSS),
    ],
)
def test_settings_accept_the_previous_durability_names_with_one_warning_line(
    legacy: str, new: Durability, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"}
    # Logged (operators read logs), not a DeprecationWarning: pytest turns warnings into errors
    # here, so this also checks that none is raised.
    with caplog.at_level(logging.WARNING):
        settings = Settings.from_env(env | {"GATEMETRICS_DURABILITY": legacy})
    assert settings.durability is new
    assert settings == Settings.from_env(env | {"GATEMETRICS_DURABILITY": new.value})
    record = caplog.records[0]  # the first from_env call's; the second used the new name
    assert (record.name, record.levelno) == ("backend.app.main", logging.WARNING)
    message = record.getMessage()
    assert "\n" not in message
    assert "GATEMETRICS_DURABILITY" in message
    assert f"{legacy!r}" in message
    assert "deprecated" in message
    assert f"it now means {new.value!r}" in message
    assert len(caplog.records) == 1


@pytest.mark.parametrize("value", ["FULL", "fsync", "power_loss", "Process-Crash", "sync"])
def test_settings_refuse_an_unknown_durability_listing_the_choices(value: str) -> None:
    env = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b", "GATEMETRICS_DURABILITY": value}
    with pytest.raises(ValueError, match="GATEMETRICS_DURABILITY") as info:
        Settings.from_env(env)
    assert "process-crash" in str(info.value)
    assert "power-loss" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEMETRICS_PERSISTENCE", "write_through"),
        ("GATEMETRICS_PERSISTENCE", "off"),
        ("GATEMETRICS_DURABILITY", "FULL"),
        ("GATEMETRICS_DURABILITY", "fsync"),
        ("GATEMETRICS_SAVE_INTERVAL", "soon"),
        ("GATEMETRICS_SAVE_INTERVAL", "0"),
        ("GATEMETRICS_SAVE_INTERVAL", "-1"),
        ("GATEMETRICS_SAVE_INTERVAL", "nan"),
        ("GATEMETRICS_SAVE_INTERVAL", "inf"),
        ("GATEMETRICS_SAVE_INTERVAL", "86401"),
    ],
)
def test_settings_refuse_bad_persistence_values_naming_the_variable(name: str, value: str) -> None:
    env = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b", name: value}
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)


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


async def test_default_paths_are_created_private_to_the_user(tmp_path: Path) -> None:
    app = create_app(Settings.from_env({"XDG_STATE_HOME": str(tmp_path / "state")}))
    assert await lifespan(app, "startup", "shutdown") == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]
    root = tmp_path / "state" / "gatemetrics"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert (root / "shards").is_dir()
    assert (root / "release-gate-audit.jsonl").is_file()


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
    "content_type",
    [
        "application/json",
        "Application/JSON; charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/vnd.release-gate+json",
    ],
)
async def test_check_accepts_json_media_types(gate_app: ReleaseGateApp, content_type: str) -> None:
    body = b'{"verdict": "release_ok", "reasons": []}'
    reply = await Client(gate_app).request(
        "POST", CHECK, body, headers=[("Content-Type", content_type)]
    )
    assert reply.status == 200


async def test_a_body_of_exactly_the_limit_is_accepted(gate_app: ReleaseGateApp) -> None:
    body = b'{"verdict": "release_ok", "reasons": []}'
    body += b" " * (MAX_BODY_BYTES - len(body))
    reply = await Client(gate_app).request("POST", CHECK, body)
    assert reply.status == 200


# -- refused requests: a clear JSON error, no counter changed, no audit entry -------------------

OK = {"verdict": "release_ok", "reasons": []}


def _int_body(literal: int | str, field: str = "now_ms") -> bytes:
    """A check body with ``literal`` written as is (Python's ints become exact JSON integers,
    beyond what orjson.dumps accepts) in ``field``: ``now_ms`` or an override field."""
    if field == "now_ms":
        return b'{"verdict":"release_ok","reasons":[],"now_ms":' + str(literal).encode() + b"}"
    doc = orjson.dumps(OK | {"override": override(**{field: 0})})
    return doc.replace(f'"{field}":0'.encode(), f'"{field}":{literal}'.encode())


REFUSED: list[tuple[str, bytes, int, str, str | None]] = [
    # (id, body, status, error code, field)
    ("empty body", b"", 400, "malformed_json", None),
    ("truncated JSON", b'{"verdict": "release_ok", "reasons": [', 400, "malformed_json", None),
    ("not UTF-8", b'{"verdict": "release_ok\xff", "reasons": []}', 400, "malformed_json", None),
    (
        "lone surrogate",
        b'{"verdict":"release_ok","reasons":[],"release_scope":"\\ud800"}',
        400,
        "malformed_json",
        None,
    ),
    # A number beyond what a double holds is refused by the parser itself.
    (
        "integer beyond a double",
        b'{"verdict":"release_ok","reasons":[],"now_ms":1' + b"0" * 400 + b"}",
        400,
        "malformed_json",
        None,
    ),
    ("array", b"[]", 400, "invalid_request", None),
    ("null", b"null", 400, "invalid_request", None),
    ("missing verdict", b'{"reasons": []}', 400, "invalid_request", "verdict"),
    ("missing reasons", b'{"verdict": "release_ok"}', 400, "invalid_request", "reasons"),
    ("misspelt field", orjson.dumps(OK | {"overide": None}), 400, "invalid_request", "overide"),
    (
        "verdict not a string",
        orjson.dumps({"verdict": 1, "reasons": []}),
        400,
        "invalid_request",
        "verdict",
    ),
    (
        "verdict null",
        orjson.dumps({"verdict": None, "reasons": []}),
        400,
        "invalid_request",
        "verdict",
    ),
    (
        "reasons a string",
        orjson.dumps({"verdict": "release_hold", "reasons": "TIER_FAIL"}),
        400,
        "invalid_request",
        "reasons",
    ),
    (
        "reason not a string",
        orjson.dumps({"verdict": "release_hold", "reasons": [["TIER_FAIL"]]}),
        400,
        "invalid_request",
        "reasons[0]",
    ),
    (
        "unknown verdict",
        orjson.dumps({"verdict": "release_maybe", "reasons": []}),
        422,
        "unknown_verdict",
        "verdict",
    ),
    (
        "verdict in the wrong case",
        orjson.dumps({"verdict": "RELEASE_OK", "reasons": []}),
        422,
        "unknown_verdict",
        "verdict",
    ),
    (
        "unknown reason",
        orjson.dumps({"verdict": "release_hold", "reasons": ["TIER_FAIL", "NOPE"]}),
        422,
        "unknown_reason",
        "reasons[1]",
    ),
    (
        "release_ok with reasons",
        orjson.dumps({"verdict": "release_ok", "reasons": ["TIER_FAIL"]}),
        422,
        "inconsistent_result",
        "reasons",
    ),
    (
        "hold with an absolute reason",
        orjson.dumps({"verdict": "release_hold", "reasons": ["GUARD_VIOLATION"]}),
        422,
        "inconsistent_result",
        "reasons",
    ),
    ("override a list", orjson.dumps(OK | {"override": []}), 400, "invalid_request", "override"),
    (
        "override field null",
        orjson.dumps(OK | {"override": override() | {"created_by": None}}),
        400,
        "invalid_request",
        "override.created_by",
    ),
    (
        "override field absent",
        orjson.dumps(OK | {"override": {k: v for k, v in override().items() if k != "scope"}}),
        400,
        "invalid_request",
        "override.scope",
    ),
    (
        "override unknown field",
        orjson.dumps(OK | {"override": override(ttl=1)}),
        400,
        "invalid_request",
        "override.ttl",
    ),
    (
        "ttl a string",
        orjson.dumps(OK | {"override": override(ttl_seconds="3600")}),
        400,
        "invalid_request",
        "override.ttl_seconds",
    ),
    (
        "ttl a boolean",
        orjson.dumps(OK | {"override": override(ttl_seconds=True)}),
        400,
        "invalid_request",
        "override.ttl_seconds",
    ),
    (
        "ttl a float",
        orjson.dumps(OK | {"override": override(ttl_seconds=1.5)}),
        400,
        "invalid_request",
        "override.ttl_seconds",
    ),
    (
        "ttl zero",
        orjson.dumps(OK | {"override": override(ttl_seconds=0)}),
        422,
        "invalid_value",
        "override",
    ),
    (
        "blank override reason",
        orjson.dumps(OK | {"override": override(reason="  ")}),
        422,
        "invalid_value",
        "override",
    ),
    (
        "control character in created_by",
        orjson.dumps(OK | {"override": override(created_by="a\x1bb")}),
        422,
        "invalid_value",
        "override",
    ),
    (
        "release_scope a number",
        orjson.dumps(OK | {"release_scope": 7}),
        400,
        "invalid_request",
        "release_scope",
    ),
    (
        "release_scope with a newline",
        orjson.dumps(OK | {"release_scope": "a\nb"}),
        422,
        "invalid_value",
        None,
    ),
    ("now_ms a string", orjson.dumps(OK | {"now_ms": "1"}), 400, "invalid_request", "now_ms"),
    ("now_ms a boolean", orjson.dumps(OK | {"now_ms": True}), 400, "invalid_request", "now_ms"),
    ("now_ms a float", orjson.dumps(OK | {"now_ms": 1.5}), 400, "invalid_request", "now_ms"),
    ("now_ms negative", orjson.dumps(OK | {"now_ms": -1}), 422, "invalid_value", None),
    ("now_ms beyond int64", orjson.dumps(OK | {"now_ms": 2**63}), 422, "invalid_value", None),
    # The edges of 64 bits: orjson keeps -2**63..2**64-1 as ints (the gate refuses what is out
    # of its range) and turns the rest into floats; a client sees one answer either side.
    *(
        (f"now_ms {name}", _int_body(literal), 422, "invalid_value", field)
        for name, literal, field in [
            ("2**64-1", 2**64 - 1, None),
            ("2**64", 2**64, "now_ms"),
            ("-2**63", -(2**63), None),
            ("-2**63-1", -(2**63) - 1, "now_ms"),
            ("huge", 10**25, "now_ms"),
            ("huge negative", -(10**25), "now_ms"),
        ]
    ),
    (
        "ttl_seconds 2**64",
        _int_body(2**64, field="ttl_seconds"),
        422,
        "invalid_value",
        "override.ttl_seconds",
    ),
    (
        "created_at_ms -2**63-1",
        _int_body(-(2**63) - 1, field="created_at_ms"),
        422,
        "invalid_value",
        "override.created_at_ms",
    ),
    ("now_ms 1e5, a float", _int_body("1e5"), 400, "invalid_request", "now_ms"),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED],
)
async def test_bad_input_gets_a_clear_error_and_changes_nothing(
    gate_app: ReleaseGateApp, body: bytes, status: int, code: str, field: str | None
) -> None:
    await gate_app.startup()
    reply = await Client(gate_app).request("POST", CHECK, body)
    assert reply.status == status
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert error["error"] == code
    assert error["message"]
    assert error.get("field") == field
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_integer_fields_take_the_largest_signed_64_bit_value(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    reply = await Client(gate_app).request("POST", CHECK, _int_body(2**63 - 1))
    assert reply.status == 200, reply.body
    assert reply.json()["allowed"] is True


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        pytest.param([], 415, "unsupported_media_type", id="no content type"),
        pytest.param([("content-type", "text/plain")], 415, "unsupported_media_type", id="text"),
        pytest.param(
            [("content-type", "application/x-www-form-urlencoded")],
            415,
            "unsupported_media_type",
            id="form (curl -d without -H)",
        ),
        pytest.param(
            [("content-type", "application/json; charset=latin-1")],
            415,
            "unsupported_media_type",
            id="not UTF-8",
        ),
        pytest.param(
            [("content-type", "application/json"), ("content-type", "application/json")],
            400,
            "invalid_request",
            id="content type twice",
        ),
        pytest.param(
            [("content-type", "application/json"), ("content-length", "12x")],
            400,
            "invalid_request",
            id="content length not a number",
        ),
        pytest.param(
            [("content-type", "application/json"), ("content-length", "-1")],
            400,
            "invalid_request",
            id="negative content length",
        ),
    ],
)
async def test_bad_headers_are_refused_before_the_body_is_read(
    gate_app: ReleaseGateApp, headers: list[tuple[str, str]], status: int, code: str
) -> None:
    await gate_app.startup()
    body = orjson.dumps(OK)
    reply = await Client(gate_app).request("POST", CHECK, body, headers=headers)
    assert (reply.status, reply.json()["error"]) == (status, code)
    assert reply.receives == 0
    # The unread body must not be taken for the next request on this connection.
    assert reply.headers["connection"] == "close"
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_a_declared_length_over_the_limit_is_refused_unread(gate_app: ReleaseGateApp) -> None:
    await gate_app.startup()
    headers = [("content-type", "application/json"), ("content-length", str(MAX_BODY_BYTES + 1))]
    reply = await Client(gate_app).request(
        "POST", CHECK, b"x" * (MAX_BODY_BYTES + 1), headers=headers
    )
    assert reply.status == 413
    assert reply.json()["error"] == "body_too_large"
    assert reply.receives == 0  # refused before a single byte was read
    assert reply.headers["connection"] == "close"
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_a_chunked_body_over_the_limit_is_refused_without_reading_on(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    chunk = b" " * (16 * 1024)
    chunks = [b'{"verdict": "release_ok", "reasons": []}', *[chunk] * 20]  # about 320 KiB
    reply = await Client(gate_app).request(
        "POST", CHECK, headers=[("content-type", "application/json")], chunks=chunks
    )
    assert reply.status == 413
    # Reading stops with the chunk that crosses the limit.
    sizes = [sum(map(len, chunks[: i + 1])) for i in range(len(chunks))]
    crossing = next(i for i, size in enumerate(sizes) if size > MAX_BODY_BYTES)
    assert reply.receives == crossing + 1 < len(chunks)
    assert reply.headers["connection"] == "close"
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


async def test_an_under_declared_body_is_counted_as_it_arrives(gate_app: ReleaseGateApp) -> None:
    # A server normally enforces Content-Length framing; the app does not rely on it.
    await gate_app.startup()
    headers = [("content-type", "application/json"), ("content-length", "10")]
    reply = await Client(gate_app).request(
        "POST", CHECK, headers=headers, chunks=[b" " * MAX_BODY_BYTES, b"{}"]
    )
    assert reply.status == 413
    assert reply.receives == 2


async def test_a_client_that_vanishes_mid_body_gets_nothing_and_counts_nothing(
    gate_app: ReleaseGateApp,
) -> None:
    await gate_app.startup()
    client = Client(gate_app)
    reply = await client.request(
        "POST",
        CHECK,
        headers=[("content-type", "application/json")],
        chunks=[b'{"verdict": "release_ok",', b' "reasons": []}'],
        disconnect_after=1,
    )
    assert client.sent == []
    assert reply.receives == 2
    assert counts(gate_app) == NOTHING
    assert audit_lines(gate_app) == []


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


def test_a_worker_forked_after_startup_counts_in_a_shard_of_its_own(tmp_path: Path) -> None:
    # The app started and used before a fork, as a server might do by mistake: the child keeps
    # the state, but the engine has made its store a new incarnation that never counts the
    # parent's decisions again. In a fresh interpreter, so the fork happens without threads.
    result = run_python(
        "import os, anyio\n"
        "from backend.app.main import Settings, create_app\n"
        "from tests.app.test_main import Client, OK\n"
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


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param({"verdict": "x" * 60_000, "reasons": []}, id="verdict"),
        pytest.param({"verdict": "release_hold", "reasons": ["R" * 60_000]}, id="reason"),
        pytest.param(OK | {"y" * 60_000: 1}, id="field name"),
        pytest.param(OK | {"release_scope": "\x00" * 10_000}, id="gate's own message"),
    ],
)
async def test_error_messages_never_echo_a_huge_request(
    gate_app: ReleaseGateApp, doc: dict[str, Any]
) -> None:
    reply = await Client(gate_app).check(doc)
    assert reply.status in (400, 422)
    assert len(reply.body) < 1000
    assert reply.json()["message"]


async def test_a_body_that_never_arrives_times_out_with_408(tmp_path: Path) -> None:
    settings = Settings(str(tmp_path / "shards"), str(tmp_path / "audit.jsonl"), body_timeout=0.1)
    app = create_app(settings)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:  # a client that sent its headers, then stalled
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHECK,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
    }
    with anyio.fail_after(10):
        await app(scope, receive, send)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert orjson.loads(sent[1]["body"])["error"] == "request_timeout"
    assert not app.started  # nothing was decided, counted or audited


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
