"""A real gunicorn serving the release-gate app, for end-to-end tests.

gunicorn gets a listening socket the test bound itself (``--bind fd://N``): the port is known
before the server starts and no other process can take it in between. Every process is tracked
by pid: the master we started, and its workers as found in ``/proc`` (with their start times, so
a recycled pid is never mistaken for ours). :meth:`GunicornServer.stop` ends them by pid, also
when the test failed.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.monitoring_tools import wait_until

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "service" / "backend" / "gunicorn.conf.py"


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` fields after the command name (field 3 on), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children_of(pid: int) -> dict[int, int]:
    """``{child pid: start time in clock ticks}`` of the living children of ``pid``."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[0] is the state, [1] the parent pid, [19] the start time (stat fields 3, 4, 22).
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry)] = int(fields[19])
    return found


def same_process(pid: int, start_time: int) -> bool:
    """Whether ``pid`` still names the process that started at ``start_time`` (and lives)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == start_time


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 30.0,
) -> Response:
    """One HTTP request on a fresh loopback connection; raises OSError/HTTPException."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


@dataclass
class GunicornServer:
    """A gunicorn master we started, with the workers we have seen it fork."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    seen_workers: dict[int, int] = field(default_factory=dict)

    def workers(self) -> dict[int, int]:
        """The living workers now (``{pid: start time}``); remembered for :meth:`stop`."""
        current = children_of(self.proc.pid)
        self.seen_workers.update(current)
        return current

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, workers: int, timeout: float = 60.0) -> None:
        """Until ``workers`` workers run and /healthz answers; fail early if the master died."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}):\n{self.log_text()}")
            if len(self.workers()) < workers:
                return False
            try:
                return request(self.port, "GET", "/healthz", timeout=5).status == 200
            except (OSError, http.client.HTTPException):
                return False

        wait_until(ready, timeout=timeout, what=f"gunicorn with {workers} workers")

    def stop(self, timeout: float = 45.0) -> int | None:
        """Graceful stop (SIGTERM to the master), then SIGKILL by pid for anything left.

        Returns the master's exit status (None if it had to be killed).
        """
        self.workers()
        status: int | None = self.proc.poll()
        if status is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                status = None
        for pid, start in self.seen_workers.items():
            if same_process(pid, start):  # orphaned worker of a killed master
                os.kill(pid, signal.SIGKILL)
        return status


def start_gunicorn(
    args: Sequence[str], env: Mapping[str, str], log: Path, *, cwd: Path = ROOT
) -> GunicornServer:
    """Start ``gunicorn -c service/backend/gunicorn.conf.py ARGS backend.app.main:app`` on a free
    loopback port.

    Deprecation warnings are errors in the server (a deprecated worker class such as
    ``uvicorn.workers`` would fail). Not every warning: gunicorn 27's ``fd://`` binding leaks
    the probe socket it opens to find the address family (a ResourceWarning at start-up).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2048)
        port = listener.getsockname()[1]
        fd = listener.fileno()
        command = [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-m",
            "gunicorn",
            "-c",
            str(CONFIG),
            "--bind",
            f"fd://{fd}",
            *args,
            "backend.app.main:app",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(fd,),
            )
    finally:
        listener.close()  # gunicorn holds its own copy
    return GunicornServer(proc, port, log)
