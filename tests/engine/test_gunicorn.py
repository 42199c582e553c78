"""Tests of gatemetrics.gunicorn: the hooks alone, and a real gunicorn with recycling and kills."""

from __future__ import annotations

import http.client
import importlib.util
import logging
import math
import os
import random
import re
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
from prometheus_client.parser import text_string_to_metric_families as parse_text

from gatemetrics import CounterStore, bind, save_to_dir, shard_for
from gatemetrics import gunicorn as hooks
from tests.engine.aggregate_helpers import FAILURES, agg, orders
from tests.engine.schema import SHOP_NAMESPACE, SHOP_SCHEMA, record_order
from tests.processes import ROOT, Reaper, require_tool, run_cli, wait_until
from tests.readme_examples import readme_blocks


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


# -- the README's end-to-end example, run as written under a real gunicorn --------------------


def readme_end_to_end() -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """The section's files (by the path its first comment names) and its console commands,
    each with the lines shown after it."""
    blocks, [console] = readme_blocks("### End to end: gunicorn workers, the aggregator, a scrape")
    files = {}
    for block in blocks:
        first = block.splitlines()[0]
        assert first.startswith("# "), first
        files[first[2:].split(":")[0]] = block
    commands: list[tuple[str, list[str]]] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            commands[-1][1].append(line)
    return files, commands


def grep_e(command: str) -> tuple[str, re.Pattern[str] | None]:
    """``cmd | grep -E 'pattern'`` as ``cmd`` and the pattern (ERE ``\\{`` reads the same)."""
    if " | " not in command:
        return command, None
    command, grep = command.split(" | ")
    [pattern] = re.fullmatch(r"grep -E '(.*)'", grep).groups()  # type: ignore[union-attr]
    return command, re.compile(pattern)


def kept(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    return [line for line in text.splitlines() if pattern is None or pattern.search(line)]


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (gunicorn's workers), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def scrape(sock: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(sock, "/metrics")
    assert status == 200, body
    return exposition_values(body)


def exposition_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in parse_text(text)
        for s in fam.samples
    }


@pytest.mark.slow
def test_the_readmes_end_to_end_example_counts_exactly_under_gunicorn_through_a_sigkill(
    tmp_path: Path, reaper: Reaper
) -> None:
    if importlib.util.find_spec("gunicorn") is None:
        require_tool("gunicorn")  # skips on a laptop without the server extra; fails in CI
    files, commands = readme_end_to_end()
    assert sorted(files) == ["gunicorn.conf.py", "mystore/app.py", "mystore/metrics.py"]
    site = tmp_path / "site"
    (site / "mystore").mkdir(parents=True)
    (site / "mystore" / "__init__.py").write_text("")
    for name, code in files.items():
        (site / name).write_text(code + "\n")
    shards = tmp_path / "shards"
    sock = str(tmp_path / "g.sock")
    env = {**os.environ, "GATEMETRICS_DIR": str(shards), "PYTHONPATH": str(site)}
    [export, serve, requests, metrics, aggregate] = commands

    assert export[0].startswith("export GATEMETRICS_DIR=")
    # gunicorn as written, on a socket of this test instead of port 8000, in the foreground.
    args = serve[0].split()
    assert args[0] == "gunicorn"
    assert args[-1] == "&"
    gunicorn_args = [*args[1:-1], "--bind", f"unix:{sock}", "--no-control-socket"]
    master = reaper.track(
        subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *gunicorn_args],
            cwd=site,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ),
        graceful=True,
    )

    def up() -> bool:
        try:
            return get(sock, "/nowhere")[0] == 404
        except OSError:
            return False

    wait_until(up, timeout=30, interval=0.05)
    # The README's requests, with what curl prints.
    bodies = []
    for curl in requests[0].split("; "):
        [url] = re.fullmatch(r"curl -s '?localhost:8000(\S*?)'?", curl).groups()  # type: ignore[union-attr]
        bodies.extend(get(sock, url)[1].splitlines())
    assert bodies == requests[1]
    # The README's scrape, as shown, from whichever worker answers.
    command, pattern = grep_e(metrics[0])
    [url] = re.fullmatch(r"curl -s localhost:8000(\S+)", command).groups()  # type: ignore[union-attr]
    assert kept(get(sock, url)[1], pattern) == metrics[1]
    # The README's aggregation while gunicorn runs (as a cron does), as shown.
    command, pattern = grep_e(aggregate[0])
    cli_args = [a.replace('"$GATEMETRICS_DIR"', str(shards)) for a in command.split()]
    assert cli_args[:2] == ["gatemetrics", "aggregate"]

    def run_aggregate() -> str:
        cli = run_cli(*cli_args[1:], cwd=site, env=env)
        assert cli.returncode == 0, cli.stderr
        return cli.stdout

    assert kept(run_aggregate(), pattern) == aggregate[1]

    # More traffic, and a worker SIGKILLed half-way (between requests: none is in flight).
    counted = {(route, code): 0 for route in ("cart", "pay") for code in ("2xx", "4xx", "5xx")}
    counted["cart", "2xx"] = counted["pay", "2xx"] = counted["pay", "4xx"] = 1  # the README's three
    rng = random.Random(13)
    wait_until(lambda: len(children_of(master.pid)) == 2, timeout=30)
    answers = {  # path: (status, the series it counts in, if any)
        "/cart": (200, ("cart", "2xx")),
        "/pay": (200, ("pay", "2xx")),
        "/pay?declined": (402, ("pay", "4xx")),
        "/nowhere": (404, None),
    }

    def send(n: int) -> None:
        for _ in range(n):
            path = rng.choice(sorted(answers))
            status, series = answers[path]
            assert get(sock, path)[0] == status, path
            if series is not None:
                counted[series] += 1

    def replaced(killed: int) -> bool:
        kids = children_of(master.pid)
        return killed not in kids and len(kids) == 2

    send(40)
    killed = rng.choice(children_of(master.pid))
    os.kill(killed, signal.SIGKILL)
    # The master reaps it (child_exit folds its shard) and starts another worker.
    wait_until(lambda: replaced(killed), timeout=30)
    send(40)
    per_route = {
        r: sum(n for (route, _), n in counted.items() if route == r) for r in ("cart", "pay")
    }

    def check(values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
        """Exact counts against the client's; cumulative buckets; the sums, by route."""
        for (route, code), n in counted.items():
            key = ("mystore_requests_total", (("code", code), ("route", route)))
            assert values[key] == n, (route, code)
        sums = {}
        for route, n in per_route.items():
            assert values["mystore_request_seconds_count", (("route", route),)] == n
            buckets = [
                values["mystore_request_seconds_bucket", (("le", le), ("route", route))]
                for le in ("0.01", "0.1", "1.0", "+Inf")
            ]
            assert buckets == sorted(buckets)
            assert buckets[-1] == n
            sums[route] = values["mystore_request_seconds_sum", (("route", route),)]
            assert sums[route] > 0
        assert values["mystore_metric_write_failures_total", ()] == 0
        return sums

    scraped = check(scrape(sock))
    master.send_signal(signal.SIGTERM)
    _, err = master.communicate(timeout=60)
    assert master.returncode == 0, err[-3000:]
    final = exposition_values(run_aggregate())
    aggregated = check(final)
    # A compaction rounds a folded sum once: equal to the last bit, never more.
    for route, total in scraped.items():
        assert math.isclose(aggregated[route], total, rel_tol=1e-15, abs_tol=0), route
    assert final["mystore_shards", (("state", "live"),)] == 0
