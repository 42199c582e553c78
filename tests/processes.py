"""Real child processes for multiprocess tests: start Python code, read its lines, reap it.

Children run ``sys.executable`` with the repository root as working directory, so they import
``gatemetrics``, ``backend`` and ``tests`` exactly as the test process does. Every child is
registered with a :class:`Reaper` (the ``reaper`` fixture), which SIGKILLs by pid whatever is
still running when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Set by .ci/run: a test that needs a real tool fails instead of skipping without it.
REQUIRE_TOOLS = os.environ.get("GATEMETRICS_REQUIRE_TOOLS") == "1"


def require_tool(name: str) -> str:
    """The path of tool ``name``; skip without it, or fail when CI requires real tools."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH"
        if REQUIRE_TOOLS:
            pytest.fail(f"{message} (GATEMETRICS_REQUIRE_TOOLS=1 forbids skipping)")
        pytest.skip(message)
    return path


# What every child script starts with: quiet, strict, and able to kill itself at a named step.
PRELUDE = """\
import os, sys, signal, time
from gatemetrics import _faults
"""


_DROP_TO = """\
import errno, fcntl, json, logging, resource, select, socket, stat, struct, subprocess
import encodings.ascii, encodings.idna, encodings.latin_1, encodings.utf_8
import orjson
import gatemetrics, gatemetrics.aggregate, gatemetrics.cli, gatemetrics.shards
import tests.engine.schema
if os.geteuid() != {uid}:
    os.setgroups([])
    os.setgid({uid})
    os.setuid({uid})
"""


class Reaper:
    """Tracks child processes; :meth:`kill_all` ends the ones still running, by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.graceful: list[subprocess.Popen[str]] = []

    def python(
        self,
        code: str,
        *args: str,
        env: dict[str, str] | None = None,
        user: int | None = None,
        stdin: bool = False,
    ) -> subprocess.Popen[str]:
        """Start ``python -c PRELUDE+code args...`` with line-buffered text pipes.

        ``user``: the child runs ``code`` as that uid (and its gid), with no supplementary
        groups. It drops to it itself after importing the project and the modules children
        use: the interpreter may live where that user cannot read (``/root/.pyenv``).
        """
        script = PRELUDE + (_DROP_TO.format(uid=user) if user is not None else "")
        script += textwrap.dedent(code)
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-c", script, *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.procs.append(proc)
        return proc

    def track(
        self, proc: subprocess.Popen[str], *, graceful: bool = False
    ) -> subprocess.Popen[str]:
        """Kill ``proc`` at the end. ``graceful``: SIGTERM it first and give it up to 30 s,
        for a process that must end its own children (a gunicorn master: SIGKILLed, it
        would leave its workers running with no parent)."""
        self.procs.append(proc)
        if graceful:
            self.graceful.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.graceful:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.graceful:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


# Prepended to a child's code by run_python(honour_file_modes=True). Root ignores file modes
# through CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH, CAP_FOWNER); without them it is an ordinary
# owner, so a 0444 file is really read-only to it. Dropping capabilities needs no privilege and
# keeps the child's access to the project wherever CI cloned it (switching to "nobody" would not).
_DROP_FILE_OVERRIDES = """
import ctypes as _ct, os as _os
if _os.geteuid() == 0:
    class _Header(_ct.Structure):
        _fields_ = [("version", _ct.c_uint32), ("pid", _ct.c_int)]
    class _Data(_ct.Structure):
        _fields_ = [("effective", _ct.c_uint32), ("permitted", _ct.c_uint32),
                    ("inheritable", _ct.c_uint32)]
    _libc = _ct.CDLL(None, use_errno=True)
    _header, _data = _Header(0x20080522, 0), (_Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if _libc.capget(_ct.byref(_header), _data) != 0:
        raise OSError(_ct.get_errno(), "capget")
    _mask = ~((1 << 1) | (1 << 2) | (1 << 3)) & 0xFFFFFFFF
    for _field in ("effective", "permitted", "inheritable"):
        setattr(_data[0], _field, getattr(_data[0], _field) & _mask)
    if _libc.capset(_ct.byref(_header), _data) != 0:
        raise OSError(_ct.get_errno(), "capset")
"""


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    umask: int = -1,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gatemetrics args...`` to completion in this environment; its return code
    and text output. ``env`` is laid over this process's environment, less ``GATEMETRICS_DIR``
    (a directory the suite's caller may have set must never leak into a command under test).

    The one way tests run the command line as a user would.
    """
    base = {k: v for k, v in os.environ.items() if k != "GATEMETRICS_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "gatemetrics", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env={**base, **(env or {})},
        umask=umask,
    )


def run_python(
    code: str, *args: str, honour_file_modes: bool = False, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``PRELUDE + code args...`` to completion in a fresh interpreter of this environment
    (a real separate process, warnings as errors); its return code and text output.

    The one way tests run Python to completion; :meth:`Reaper.python` starts one to talk to.
    ``honour_file_modes=True`` makes file permission bits apply even when the suite runs as root
    (CI does), by dropping the capabilities that bypass them in the child only. A child still
    running at ``timeout`` is killed (``subprocess.TimeoutExpired``).
    """
    prefix = _DROP_FILE_OVERRIDES if honour_file_modes else ""
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", prefix + PRELUDE + textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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


#: The user an attacker runs as when the suite runs as root (CI does): ``nobody``.
ATTACKER_UID = 65534

# A live worker of the attacked directory: counts the engine tests' shop's paid orders
# write-through (tests.engine.schema), says its shard's name, then waits for a line on stdin
# ("close": exits cleanly; EOF or SIGKILL: dies).
WORKER = """
from gatemetrics import CounterStore, bind, shard_for
from tests.engine.schema import SHOP_SCHEMA
store = CounterStore(SHOP_SCHEMA)
binding = bind(store, sys.argv[1], failure_key="errors")
for _ in range(int(sys.argv[2])):
    store.increment("orders", "paid")
print(os.path.basename(shard_for(store, sys.argv[1]).path), flush=True)
if sys.stdin.readline().strip() == "close":
    binding.close()
    print("closed", flush=True)
"""

# What an attacker plants under ``name`` in directory ``argv[1]`` (relative names only, so a
# long directory path never hits the socket path limit).
PLANT = """
import socket
directory, name, kind, target = sys.argv[1:5]
os.chdir(directory)
if os.path.lexists(name):  # what the attacker replaces is moved aside (it may not be ours)
    os.rename(name, f"{name}.displaced-{time.time_ns()}")
if kind == "symlink":
    os.symlink(target, name)
elif kind == "loop":
    os.symlink(name + ".other", name)
    os.symlink(name, name + ".other")
elif kind == "fifo":
    os.mkfifo(name)
elif kind == "directory":
    os.mkdir(name)
elif kind == "socket":
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(name)
    sock.close()
elif kind == "hardlink":
    os.link(target, name)
else:
    raise SystemExit(f"unknown kind {kind}")
print("planted", flush=True)
"""


class Attacker:
    """A user with write access to a shard directory who is not the aggregator's user.

    When the suite runs as root (CI) the attacker is ``nobody`` in a child process and the
    directory belongs to it, so that privileges matter: a root aggregator that followed a
    planted link would write where ``nobody`` cannot. Elsewhere the attacker is the same user
    (the checks on what the aggregator writes still hold; only the privilege gap is missing).
    ``shards`` is the attacked directory, ``outside`` a directory beside it that only the
    aggregator's user may write (nothing must ever appear or change there).
    """

    def __init__(self, reaper: Reaper, base: Path) -> None:
        self.reaper = reaper
        self.uid = ATTACKER_UID if os.geteuid() == 0 else None
        self.shards = base / "shards"
        self.outside = base / "outside"
        self.shards.mkdir(mode=0o755)
        self.outside.mkdir(mode=0o755)
        if self.uid is not None:
            os.chown(self.shards, self.uid, self.uid)

    def run(self, code: str, *args: str, timeout: float = 30.0) -> str:
        """Run ``code`` as the attacker; its stdout (it must succeed)."""
        proc = self.reaper.python(code, *args, user=self.uid)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        return out

    def plant(self, name: str, kind: str, target: str | Path = "") -> None:
        """Plant a ``kind`` entry (symlink, loop, fifo, directory, socket, hardlink) at
        ``name`` in :attr:`shards`; ``target`` is the link's target or the hard link's file."""
        self.run(PLANT, str(self.shards), name, kind, str(target))

    def worker(self, paid: int) -> tuple[subprocess.Popen[str], str]:
        """A live worker (the attacker's user: workers own their shards) that counted ``paid``
        paid orders of the shop; ``(process, shard file name)``."""
        proc = self.reaper.python(WORKER, str(self.shards), str(paid), user=self.uid, stdin=True)
        return proc, read_line(proc)

    def outside_state(self) -> dict[str, bytes]:
        """Every file under :attr:`outside` with its bytes (to prove nothing changed)."""
        return {
            str(p.relative_to(self.outside)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(self.outside.rglob("*"))
        }
