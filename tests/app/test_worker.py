"""Tests of backend.app.worker: the gunicorn worker class runs uvicorn on asyncio's loop, and
keeps the gate serving under hostile clients (real gunicorn, real sockets, a real child holding
the shard directory's lock)."""

from __future__ import annotations

import ast
import contextlib
import http.client
import os
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.processes import Reaper, read_line, wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_the_worker_class_pins_asyncio_and_keeps_the_rest_of_uvicorns_defaults() -> None:
    pytest.importorskip("uvicorn_worker", reason="needs the server extra of ./service")
    from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]

    from backend.app.worker import ReleaseGateWorker

    assert issubclass(ReleaseGateWorker, UvicornWorker)
    assert ReleaseGateWorker.CONFIG_KWARGS == {**UvicornWorker.CONFIG_KWARGS, "loop": "asyncio"}


def test_gunicorn_conf_uses_the_release_gate_worker() -> None:
    config = ROOT / "service" / "backend" / "gunicorn.conf.py"
    tree = ast.parse(config.read_text(encoding="utf-8"))
    assigned = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    value = assigned["worker_class"]
    assert isinstance(value, ast.Constant)
    assert value.value == "backend.app.worker.ReleaseGateWorker"


def test_the_server_extra_does_not_bring_uvloop() -> None:
    import tomllib

    service = ROOT / "service" / "pyproject.toml"
    config = tomllib.loads(service.read_text(encoding="utf-8"))
    server = config["project"]["optional-dependencies"]["server"]
    assert not any("uvloop" in d or "[standard]" in d for d in server)


# -- a real gunicorn with the release-gate worker under hostile clients ------------------------

OK_CHECK = orjson.dumps({"verdict": "release_ok", "reasons": [], "release_scope": "flood/test"})
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
PARTIAL_HEADERS = b"POST /release-gate/check HTTP/1.1\r\nHost: x\r\nContent-Type: applic"
PARTIAL_BODY = (
    b"POST /release-gate/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"verdict":'
)


@dataclass
class Service:
    port: int
    log: Path
    audit: Path
    shards: Path

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def check(self) -> float:
        """One genuine check on a new connection; asserts it is allowed; its seconds."""
        start = time.perf_counter()
        status, body = self.request("POST", "/release-gate/check", OK_CHECK)
        elapsed = time.perf_counter() - start
        assert status == 200, body
        decision = orjson.loads(body)
        assert decision["allowed"] is True, decision
        return elapsed

    def worker_pid(self) -> int:
        status, body = self.request("GET", "/healthz")
        assert status == 200
        return int(orjson.loads(body)["pid"])

    def audit_lines(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        return [orjson.loads(line) for line in self.audit.read_bytes().splitlines()]

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


def start_service(
    tmp_path: Path, reaper: Reaper, *, nofile: tuple[int, int], env: dict[str, str] | None = None
) -> Service:
    """gunicorn with service/backend/gunicorn.conf.py, one worker, on a free loopback port (port 0:
    the port is read from gunicorn's log), its descriptor limits set to ``nofile``."""
    pytest.importorskip("uvicorn_worker", reason="needs the server extra of ./service")
    shards, audit, log = tmp_path / "shards", tmp_path / "audit.jsonl", tmp_path / "gunicorn.log"
    launcher = (
        "import os, resource, sys;"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, {nofile!r});"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    args = [
        *(sys.executable, "-c", launcher, "-m", "gunicorn"),
        *("-c", str(ROOT / "service" / "backend" / "gunicorn.conf.py")),
        *("--bind", "127.0.0.1:0", "--workers", "1", "--graceful-timeout", "5"),
        "backend.app.main:app",
    ]
    full_env = {
        **os.environ,
        "GATEMETRICS_DIR": str(shards),
        "RELEASE_GATE_AUDIT_LOG": str(audit),
        "RELEASE_GATE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "RELEASE_GATE_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "PYTHONPATH": str(ROOT / "service"),
        **(env or {}),
    }
    with log.open("w") as out:
        master = reaper.track(
            subprocess.Popen(
                args, cwd=ROOT, env=full_env, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            ),
            graceful=True,  # the master stops its worker; SIGKILLed, it would orphan it
        )
    found: list[int] = []

    def listening() -> bool:
        assert master.poll() is None, log.read_text()[-3000:]
        match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            found.append(int(match.group(1)))
        return bool(found)

    wait_until(listening, timeout=30, interval=0.05)
    service = Service(found[0], log, audit, shards)

    def ready() -> bool:
        try:
            return service.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    wait_until(ready, timeout=30, interval=0.05)
    return service


@pytest.fixture
def many_descriptors() -> None:
    """The flooding test process opens about 1,500 sockets of its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard descriptor limit {hard} leaves no room for the flood")
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))


def open_flood(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """``count`` non-blocking connections; each sends ``first_bytes`` once connected (a
    half-sent request) or nothing (idle). Connecting never waits: beyond the server's accept
    queue the kernel retries the handshake by itself."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    if first_bytes:
        for sock in socks:
            # Not connected yet, or already dropped: still part of the flood.
            with contextlib.suppress(OSError):
                sock.send(first_bytes)
    return socks


@pytest.fixture
def flood() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def stall_aggregator(reaper: Reaper, shards: Path) -> subprocess.Popen[str]:
    """A real child holding ``fcntl.flock`` on the directory's aggregate.lock: every
    aggregator, and so every /metrics, waits for it until the child dies."""
    child = reaper.python(
        """
        import fcntl
        fd = os.open(os.path.join(sys.argv[1], "aggregate.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
        """,
        str(shards),
    )
    assert read_line(child) == "locked"
    return child


def unread(port: int, clients: list[socket.socket]) -> int:
    """Bytes the server has not read yet from ``clients``' connections to ``port`` (the
    receive queues of the server's ends, from /proc/net/tcp)."""
    ends = {f"0100007F:{sock.getsockname()[1]:04X}" for sock in clients}
    total, seen = 0, 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if local == f"0100007F:{port:04X}" and remote in ends:
            seen += 1
            total += int(queues.split(":")[1], 16)
    return total if seen == len(clients) else -1


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_checks_keep_their_decisions_and_latency_under_a_flood_a_stall_and_a_scrape_burst(
    tmp_path: Path, reaper: Reaper, many_descriptors: None, flood: list[socket.socket]
) -> None:
    # The usual 1,024 limit, not raisable: the worker must fit connections under it.
    service = start_service(tmp_path, reaper, nofile=(1024, 1024))
    pid = service.worker_pid()
    baseline = statistics.median(service.check() for _ in range(10))

    stall_aggregator(reaper, service.shards)
    peak = [descriptors(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(descriptors(pid))
            time.sleep(0.005)

    scrapes: list[tuple[int, float]] = []

    def scrape() -> None:
        start = time.perf_counter()
        try:
            status = service.request("GET", "/metrics")[0]
        except OSError:
            status = 0  # dropped to make room: allowed, a scrape is retried
        scrapes.append((status, time.perf_counter() - start))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # More connections than the worker has descriptors: idle, half-sent headers, and
        # half-sent bodies, then a burst of scrapes, then genuine checks during all of it.
        flood += open_flood(service.port, 900)
        flood += open_flood(service.port, 300, PARTIAL_HEADERS)
        flood += open_flood(service.port, 100, PARTIAL_BODY)
        scrapers = [threading.Thread(target=scrape) for _ in range(30)]
        for thread in scrapers:
            thread.start()
        latencies = [service.check() for _ in range(30)]
        for thread in scrapers:
            thread.join(timeout=30)
    finally:
        done.set()
        sampler.join()

    # Every check allowed (asserted in check()) and audited, none failed for EMFILE.
    lines = service.audit_lines()
    assert len(lines) == 40
    assert all(line["allowed"] is True for line in lines), lines
    # Latency: nowhere near the stall (the lock is held for the whole test; a scrape in the
    # checks' thread pool used to hold them for seconds) and near the baseline.
    assert max(latencies) < 2.0, latencies
    assert statistics.median(latencies) < max(0.25, 20 * baseline), (baseline, latencies)
    # Scrapes: quick 503s (lock busy, or every scrape slot busy), never a hang.
    assert len(scrapes) == 30
    assert {status for status, _ in scrapes} <= {503, 0}, scrapes
    assert max(seconds for _, seconds in scrapes) < 5.0, scrapes
    # Descriptors: connections stayed well under the limit, the reserve untouched.
    assert max(peak) < 1024 - 128, max(peak)
    assert "EMFILE" not in service.log.read_text()


def closed_by_server(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Poll ``sock`` until the server closes it; (seconds waited, what it sent before)."""
    start = time.monotonic()
    received = b""
    sock.setblocking(False)
    while time.monotonic() - start < timeout:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if not ready:
            continue
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return time.monotonic() - start, received
        received += data
    raise TimeoutError(f"the server kept the connection open for {timeout} s")


@pytest.mark.parametrize(
    ("first", "trickle"),
    [
        (b"", b""),
        (PARTIAL_HEADERS, b""),
        (b"GET /healthz HTTP/1.1\r\n", b"X-Slow: 1\r\n"),  # a header line now and then
    ],
    ids=["idle", "half-sent headers", "trickled headers"],
)
def test_a_connection_without_complete_headers_is_closed_within_the_header_timeout(
    tmp_path: Path, reaper: Reaper, first: bytes, trickle: bytes
) -> None:
    service = start_service(tmp_path, reaper, nofile=(1024, 1024))
    sock = socket.create_connection(("127.0.0.1", service.port))
    try:
        start = time.monotonic()
        sock.sendall(first)
        if trickle:  # more bytes never push the deadline back
            deadline = time.monotonic() + HEADER_TIMEOUT * 3
            with contextlib.suppress(OSError):
                while time.monotonic() < deadline:
                    sock.sendall(trickle)
                    if select.select([sock], [], [], HEADER_TIMEOUT / 5)[0]:
                        break
        waited, received = closed_by_server(sock, timeout=HEADER_TIMEOUT * 5)
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert received == b""
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 2.0, (elapsed, waited)


def test_a_keep_alive_connection_that_half_sends_its_next_request_is_closed(
    tmp_path: Path, reaper: Reaper
) -> None:
    service = start_service(tmp_path, reaper, nofile=(1024, 1024))
    sock = socket.create_connection(("127.0.0.1", service.port))
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b"}" not in reply:
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # uvicorn's keep-alive timer stops here
        _, received = closed_by_server(sock, timeout=HEADER_TIMEOUT * 5)
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert received == b""
    assert elapsed < HEADER_TIMEOUT + 2.0


def test_a_half_sent_body_gets_408_and_is_closed_within_the_body_timeout(
    tmp_path: Path, reaper: Reaper
) -> None:
    service = start_service(tmp_path, reaper, nofile=(1024, 1024))
    sock = socket.create_connection(("127.0.0.1", service.port))
    try:
        start = time.monotonic()
        sock.sendall(PARTIAL_BODY)
        _, received = closed_by_server(sock, timeout=BODY_TIMEOUT * 5)
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b"request_timeout" in received
    assert BODY_TIMEOUT * 0.9 <= elapsed < BODY_TIMEOUT + 2.0
    assert service.audit_lines() == []  # nothing was decided


def test_the_log_stays_bounded_under_a_flood_of_bad_clients(
    tmp_path: Path, reaper: Reaper, many_descriptors: None, flood: list[socket.socket]
) -> None:
    service = start_service(tmp_path, reaper, nofile=(1024, 1024))
    before = len(service.log_lines())
    # 1,500 garbage requests (uvicorn logs each one), 1,200 connections over the bound, and
    # their header timeouts: about 4,000 loggable events.
    for _ in range(3):
        garbage = open_flood(service.port, 500, b"NOT HTTP AT ALL\r\n\r\n")
        flood += open_flood(service.port, 400)
        wait_until(lambda: service.request("GET", "/healthz")[0] == 200, timeout=10)
        for sock in garbage:
            sock.close()
    wait_until(lambda: "not complete within" in service.log.read_text(), timeout=10)
    assert service.check() < 2.0  # still serving
    lines = service.log_lines()[before:]
    # At most 10 lines per kind per 10 s; the kinds: invalid request, dropped, timed out.
    assert len(lines) <= 40, "\n".join(lines)
    assert sum("suppressing more" in line for line in lines) >= 2, "\n".join(lines)
    assert any("Invalid HTTP request" in line for line in lines)


def test_the_worker_raises_its_descriptor_limit_and_says_so(tmp_path: Path, reaper: Reaper) -> None:
    service = start_service(tmp_path, reaper, nofile=(512, 4096))
    pid = service.worker_pid()
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"Max open files\s+4096\s+4096", limits), limits
    text = service.log.read_text()
    assert "descriptor limit 4096 (was 512, hard 4096), 256 reserved" in text
    assert "at most 256 connections (asked 256)" in text


def test_when_every_connection_is_busy_a_new_one_gets_a_cheap_503(
    tmp_path: Path, reaper: Reaper
) -> None:
    # Two connections per worker, both busy with a scrape that waits for a stalled directory:
    # a third cannot make room by dropping a waiting one, so it is refused.
    service = start_service(
        tmp_path,
        reaper,
        nofile=(1024, 1024),
        env={"RELEASE_GATE_MAX_CONNECTIONS": "2", "RELEASE_GATE_METRICS_LOCK_TIMEOUT": "3"},
    )
    stall_aggregator(reaper, service.shards)
    busy = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(2)]
    try:
        for sock in busy:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        # Both requests read by the worker (so in the app, waiting for the lock).
        wait_until(lambda: unread(service.port, busy) == 0, timeout=10)
        start = time.monotonic()
        third = socket.create_connection(("127.0.0.1", service.port))
        try:
            _, received = closed_by_server(third, timeout=5)
        finally:
            third.close()
        assert time.monotonic() - start < 1.0
        assert received.startswith(b"HTTP/1.1 503"), received
        assert b"too_many_connections" in received
        # The busy scrapes were not dropped: they get their own (503, lock busy) answers.
        for sock in busy:
            sock.settimeout(10)
            answer = b""
            while not answer.endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"metrics_unavailable" in answer
    finally:
        for sock in busy:
            sock.close()
