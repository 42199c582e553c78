"""Directories as each design leaves them after many worker lifetimes, and live owners.

* :func:`our_lifetimes`: one dead shard per lifetime, made by the real shard code
  (:class:`gatemetrics.Shard`, in whatever format the engine writes): a fresh incarnation (with
  the pid a new worker would have), its lifetime lock taken, a save, the lock released, exactly
  as a worker that recorded a few decisions and exited leaves it. Nothing here knows the shard
  files' names or format.
* :func:`prometheus_lifetimes`: the ``counter_<pid>.db`` file each worker leaves behind in
  prometheus_client's multiprocess mode. One real worker process writes the gate's five counter
  families with prometheus_client (every label value initialised, a few increments); every
  simulated lifetime gets a copy of that file under its own pid, written sparsely like the
  original mmap file (only the used bytes, then extended to the file's size).
* :class:`LiveOwners`: a separate process holding ``k`` stores bound to the directory
  (``GateMetricStore.bind_to_dir``, write-through, the engine's default durability), so their
  shards are live to the aggregator exactly as running workers' are.

Run as a module it is that owner process: ``python -m benchmarks._populate DIR K`` binds ``K``
stores (each saves its shard), prints ``ready``, and holds them until its standard input closes.
"""

from __future__ import annotations

import inspect
import os
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

# A real worker under prometheus_client: the gate's families as its documentation would write
# them, every label value initialised (so a rate() sees the first event, as ours do).
_PROMETHEUS_WORKER = """
from prometheus_client import Counter
from backend.app.testing.gate_metrics import GATE_SCHEMA
counters = {}
for fam in GATE_SCHEMA.families:
    labels = [fam.label] if fam.label else []
    c = Counter(fam.name, fam.documentation, labels)
    for value in fam.values:
        c.labels(value)
    counters[fam.key] = c
counters["decision_counts"].labels("ALLOW").inc(2)
counters["decision_counts"].labels("DENY").inc()
counters["reason_counts"].labels("TIER_FAIL").inc()
counters["reason_counts"].labels("NO_DRIFT_DATA").inc()
"""
#: What each simulated prometheus_client worker counted: ALLOW 2, DENY 1.
PROMETHEUS_WORKER_DECISIONS = 3


def _identity_factory(pid: int) -> Callable[[], object]:
    from gatemetrics import Identity, new_identity

    def make() -> Identity:
        # The real incarnation of this process, with the pid the simulated worker would have.
        # The aggregator tells live from dead by the lock, never by the pid: should the
        # incarnation's layout ever change, the real one is used as it is.
        real = new_identity()
        parts = real.incarnation.split("-")
        if len(parts) != 4 or not parts[1].isdigit():
            return real
        tag, _, ns, rand = parts
        try:
            return Identity(f"{tag}-{pid}-{ns}-{rand}", pid, real.host, real.started_at)
        except ValueError:
            return real

    return make


def our_lifetimes(directory: Path, n: int, *, first_pid: int = 100_000) -> int:
    """``n`` dead worker lifetimes in ``directory``; returns the decisions they counted."""
    from backend.app.testing.gate_metrics import GateMetricStore
    from benchmarks._engine import PROCESS_CRASH, durability
    from gatemetrics import Shard

    directory.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"durability": durability(PROCESS_CRASH)}  # the files are alike
    fake_pids = "identity_factory" in inspect.signature(Shard).parameters
    decisions = 0
    for i in range(n):
        store = GateMetricStore()
        store.record_outcome(i % 3 != 0, ["TIER_FAIL", "NO_DRIFT_DATA"], breach=i % 50 == 0)
        store.record_outcome(True)
        decisions += 2
        if fake_pids:
            options["identity_factory"] = _identity_factory(first_pid + i)
        shard = Shard(store, directory, **options)
        if not shard.save():
            raise RuntimeError(f"saving a lifetime's shard in {directory} failed")
        shard.close(save=False)
    return decisions


def link_all(src: Path, *destinations: Path) -> int:
    """Hard-link every regular file of ``src`` into each destination; returns the count.

    Copies a directory of dead shards (and whatever else the engine left with them) without
    knowing their names: a link shares the file, and compaction in one copy removes only that
    copy's names.
    """
    for d in destinations:
        d.mkdir(parents=True, exist_ok=True)
    linked = 0
    with os.scandir(src) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                for d in destinations:
                    os.link(entry.path, d / entry.name)
                linked += 1
    return linked


def prometheus_template(workdir: Path) -> bytes:
    """The ``counter_<pid>.db`` file one real prometheus_client worker leaves behind."""
    mp_dir = workdir / "prometheus-template"
    mp_dir.mkdir(parents=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    subprocess.run([sys.executable, "-c", _PROMETHEUS_WORKER], env=env, check=True)
    files = list(mp_dir.glob("counter_*.db"))
    if len(files) != 1:
        raise RuntimeError(f"expected one counter file from the worker, found {files}")
    return files[0].read_bytes()


def prometheus_lifetimes(directory: Path, template: bytes, pids: range) -> None:
    """One ``counter_<pid>.db`` per pid, each a sparse copy of ``template``."""
    used = int.from_bytes(template[:4], "little")
    directory.mkdir(parents=True, exist_ok=True)
    for pid in pids:
        path = directory / f"counter_{pid}.db"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, template[:used])
            os.ftruncate(fd, len(template))
        finally:
            os.close(fd)


def disk_usage(directory: Path) -> dict[str, int]:
    """Regular files directly in ``directory``: count, apparent bytes, allocated bytes."""
    files = size = allocated = 0
    with os.scandir(directory) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                files += 1
                size += st.st_size
                allocated += st.st_blocks * 512
    return {"files": files, "bytes": size, "allocated_bytes": allocated}


class LiveOwners:
    """A separate process owning ``k`` live shards in ``directory`` (context manager)."""

    def __init__(self, directory: Path, k: int, *, timeout: float = 60.0) -> None:
        self.directory = directory
        self.k = k
        self.timeout = timeout
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LiveOwners:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._populate", str(self.directory), str(self.k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._proc = proc
        assert proc.stdout is not None
        # The child prints one line once its locks are held; never wait for it unboundedly.
        readable, _, _ = select.select([proc.stdout], [], [], self.timeout)
        line = proc.stdout.readline() if readable else "(timed out)"
        if line.strip() != "ready":
            self._stop()
            raise RuntimeError(f"live-owner process failed to start: {line!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # the child exits when its stdin closes
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _hold(directory: str, k: int) -> None:
    from backend.app.testing.gate_metrics import GateMetricStore

    bindings = []
    for i in range(k):
        store = GateMetricStore()
        # Bound write-through with the engine's defaults: the record call saves the shard.
        binding = store.bind_to_dir(directory)
        bindings.append((store, binding))
        store.record_outcome(i % 2 == 0, ["GUARD_VIOLATION"])
        if store.metric_write_failures() or not binding.save():
            raise SystemExit(f"cannot save live shard {i} in {directory}")
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    for _, binding in bindings:
        binding.close(save=False)


if __name__ == "__main__":
    _hold(sys.argv[1], int(sys.argv[2]))
