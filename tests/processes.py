"""Real child processes for multiprocess tests: start Python code, read its lines, reap it.

Children run ``sys.executable`` with the repository root as working directory, so they import
``gatemetrics``, ``backend`` and ``tests`` exactly as the test process does. Every child is
registered with a :class:`Reaper` (the ``reaper`` fixture), which SIGKILLs by pid whatever is
still running when the test ends, pass or fail.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What every child script starts with: quiet, strict, and able to kill itself at a named step.
PRELUDE = """\
import os, sys, signal, time
from gatemetrics import _faults
"""


class Reaper:
    """Tracks child processes; :meth:`kill_all` ends the ones still running, by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def python(
        self,
        code: str,
        *args: str,
        env: dict[str, str] | None = None,
        user: int | None = None,
        stdin: bool = False,
    ) -> subprocess.Popen[str]:
        """Start ``python -c PRELUDE+code args...`` with line-buffered text pipes."""
        script = PRELUDE + textwrap.dedent(code)
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-c", script, *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            user=user,
        )
        self.procs.append(proc)
        return proc

    def track(self, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def run_python(reaper: Reaper, code: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run a child to completion; ``(returncode, stdout, stderr)``."""
    proc = reaper.python(code, *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next line of the child's stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"child {proc.pid} printed nothing within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise EOFError(f"child {proc.pid} exited ({proc.poll()}): {err[-2000:]}")
    return line.rstrip("\n")


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until it is true; fail after ``timeout`` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)
