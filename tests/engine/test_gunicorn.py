"""Tests of gatemetrics.gunicorn: the hooks alone, and a real gunicorn with recycling and kills."""

from __future__ import annotations

import http.client
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from filelock import FileLock

from gatemetrics import CounterStore, bind, save_to_dir, shard_for
from gatemetrics import gunicorn as hooks
from tests.engine.aggregate_helpers import FAILURES, agg, orders
from tests.engine.schema import SHOP_NAMESPACE, SHOP_SCHEMA, record_order
from tests.processes import ROOT, Reaper, require_tool, wait_until


class FakeServer:
    """What gunicorn passes as ``server``: only its logger is used."""

    def __init__(self) -> None:
        self.log = logging.getLogger("test.gunicorn.server")


@pytest.fixture(autouse=True)
def unconfigured() -> Any:
    hooks._config = None
    yield
    hooks._config = None


def test_worker_exit_saves_and_closes_every_binding(tmp_path: Path) -> None:
    store = CounterStore(SHOP_SCHEMA)
    binding = bind(store, tmp_path, mode="periodic", interval=3600, failure_key=FAILURES)
    record_order(store, True)
    hooks.worker_exit(FakeServer(), None)
    assert binding.closed
    view = agg(tmp_path)
    assert view.snapshot().family("orders") == {"paid": 1, "refused": 0}
    assert (view.live, view.dead) == (0, 1)


def test_worker_exit_logs_failed_final_saves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A save checks that its shard is still at its path at most every VANISHED_CHECK_S, but the
    # final one always does: it finds the directory replaced, and no directory to save into.
    store = CounterStore(SHOP_SCHEMA)
    binding = bind(store, tmp_path / "shards", mode="periodic", interval=3600, failure_key=FAILURES)
    record_order(store, True)
    shutil.rmtree(tmp_path / "shards")
    (tmp_path / "shards").write_text("now a file")  # the final save cannot succeed
    with caplog.at_level(logging.WARNING):
        hooks.worker_exit(FakeServer(), None)
    assert binding.closed
    assert "1 final shard save(s) failed" in caplog.text
    assert store.snapshot().family("orders") == {"paid": 1, "refused": 0}  # in memory, not lost


def test_child_exit_does_nothing_until_configured(tmp_path: Path) -> None:
    dead = CounterStore(SHOP_SCHEMA)
    record_order(dead, True)
    assert save_to_dir(dead, tmp_path, failure_key=FAILURES)
    shard_for(dead, tmp_path).close(save=False)
    os.environ["GATEMETRICS_DIR"] = str(tmp_path)
    try:
        hooks.child_exit(FakeServer(), None)
        assert "archive.json" not in os.listdir(tmp_path)
        hooks.configure(schema=SHOP_SCHEMA, namespace=SHOP_NAMESPACE)
        hooks.child_exit(FakeServer(), None)
    finally:
        del os.environ["GATEMETRICS_DIR"]
    assert "archive.json" in os.listdir(tmp_path)
    assert orders(tmp_path)["paid"] == 1


def test_child_exit_never_waits_long_nor_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hooks.configure(schema=SHOP_SCHEMA, namespace=SHOP_NAMESPACE, directory=tmp_path / "none")
    hooks.child_exit(FakeServer(), None)  # no directory yet: no worker saved
    hooks.configure(
        schema=SHOP_SCHEMA, namespace=SHOP_NAMESPACE, directory=tmp_path, lock_timeout=0.01
    )
    with FileLock(str(tmp_path / "aggregate.lock"), thread_local=False):
        hooks.child_exit(FakeServer(), None)  # a cron holds the lock: skip
    # An archive written with another schema stops compaction: logged, never raised.
    dead = CounterStore(SHOP_SCHEMA)
    record_order(dead, True)
    assert save_to_dir(dead, tmp_path, failure_key=FAILURES)
    shard_for(dead, tmp_path).close(save=False)
    hooks.child_exit(FakeServer(), None)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    archive["counts"]["jobs_counts"] = {"a": 1}
    (tmp_path / "archive.json").write_bytes(orjson.dumps(archive))
    with caplog.at_level(logging.WARNING):
        hooks.child_exit(FakeServer(), None)
    assert f"gatemetrics: compaction of {tmp_path} failed" in caplog.text
    assert "another schema" in caplog.text


def test_configure_needs_a_schema() -> None:
    with pytest.raises(TypeError, match="Schema"):
        hooks.configure(schema="SHOP_SCHEMA", namespace="x")  # type: ignore[arg-type]


# -- a real gunicorn ---------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def get(sock: str, path: str) -> tuple[int, str]:
    conn = UnixHTTPConnection(sock)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


CONF = """
from gatemetrics import gunicorn as gatemetrics_hooks
from tests.engine.schema import SHOP_NAMESPACE, SHOP_SCHEMA

gatemetrics_hooks.configure(schema=SHOP_SCHEMA, namespace=SHOP_NAMESPACE)
worker_exit = gatemetrics_hooks.worker_exit
child_exit = gatemetrics_hooks.child_exit
"""


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_real_gunicorn_counts_exactly_through_recycling_and_sigkill(
    tmp_path: Path, reaper: Reaper, preload: bool
) -> None:
    if importlib.util.find_spec("gunicorn") is None:
        require_tool("gunicorn")  # skips on a laptop without the server extra; fails in CI
    shards = tmp_path / "shards"
    sock = str(tmp_path / "g.sock")
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(textwrap.dedent(CONF))
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        str(conf),
        "--bind",
        f"unix:{sock}",
        "--workers",
        "2",
        "--max-requests",
        "12",
        "--no-control-socket",
        "--graceful-timeout",
        "10",
        *(["--preload"] if preload else []),
        "tests.gunicorn_app:app",
    ]
    env = {**os.environ, "GATEMETRICS_DIR": str(shards), "PYTHONPATH": str(ROOT)}
    master = reaper.track(
        subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    )

    def up() -> bool:
        try:
            return get(sock, "/pid")[0] == 200
        except OSError:
            return False

    wait_until(up, timeout=30, interval=0.05)
    counted = {"paid": 0, "refused": 0}
    for i in range(90):
        if i == 45:
            status, pid = get(sock, "/pid")
            assert status == 200
            os.kill(int(pid), signal.SIGKILL)  # a worker dies between requests
        outcome = "paid" if i % 3 else "refused"
        try:
            status, _ = get(sock, "/pay" if outcome == "paid" else "/refuse")
        except OSError:
            continue  # reached the killed worker: not counted by the client either
        if status == 200:
            counted[outcome] += 1
    assert sum(counted.values()) >= 80
    master.send_signal(signal.SIGTERM)
    _, err = master.communicate(timeout=60)
    assert master.returncode == 0, err[-3000:]

    result = agg(shards)
    assert result.snapshot().family("orders") == counted
    assert result.snapshot().get("refusals", "no_stock") == counted["refused"]
    assert result.live == 0
    # child_exit compacted recycled workers away in the master while gunicorn ran.
    assert result.archive.absorbed_total >= 4
