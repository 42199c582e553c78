"""Figure 5. Throughput of the real backend under gunicorn, 4 workers, six variants.

Each variant is its own gunicorn server (``service/backend/gunicorn.conf.py``, 4 uvicorn
workers, on a free loopback port, its own shard directory and durable audit log), all started
before the first measurement and kept running; ``wrk`` (one thread, a fixed number of keep-alive
connections) then loads one server at a time, the variants alternating round by round (ABBA
order), each round the same duration. Variants:

* metrics off: the app with its store left unbound (:mod:`benchmarks._apps`, ``off``);
* gatemetrics default: ``backend.app.main:app`` exactly as shipped (write-through with the
  default durability, ``process-crash``: one in-place save per check before the response);
* write-through with ``power-loss`` durability (an fdatasync per save);
* ``periodic`` mode (a save every 5 s from a thread);
* prometheus_client multiprocess: the same app, the same audit log and gunicorn configuration,
  its store's ``record_outcome`` making the same increments with ``labels(v).inc()`` into a fresh
  ``PROMETHEUS_MULTIPROC_DIR`` per server (:mod:`benchmarks._apps`, ``prometheus``);
* gatemetrics default with the audit log's group commit off (``JsonlAuditLog(...,
  group_commit=False)``: one lock, write and fsync per entry; :mod:`benchmarks._apps`).

Comparisons are medians of the per-round ratios (each round loads every variant once, a few
seconds apart), with their range. The request mix cycles through four checks: an ALLOW, a HOLD
with two reasons, a BLOCK, and a HOLD lifted by a valid override. Afterwards the figure checks
that every completed request was audited, that every counting server counted every completed
request (and at most the requests in flight when wrk stopped on top), and that the servers
without gatemetrics persistence wrote no shard.

Hazard, stated plainly: this machine has 2 cores; wrk, the 4 workers and their threads share
them, so the load generator takes CPU the server would otherwise use. Every variant suffers it
alike (same client, same concurrency, interleaved), which keeps the comparison fair; the
absolute requests per second are a floor, not what 2 dedicated cores would serve.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _engine
from benchmarks._harness import Context, Figure, paired_ratio
from benchmarks._report import target

TITLE = "Throughput of the backend under gunicorn (4 workers): gatemetrics, prometheus_client, off"
WORKERS = 4
CONNECTIONS = 16
TARGET_VS_OFF = 0.95  # default / off, median of the per-round ratios: at least this
TARGET_VS_PROMETHEUS = 1.0  # default / prometheus_client: at least this
TARGET_GROUP_COMMIT = 1.3  # default / the per-entry-fsync audit log: at least this
ROOT = Path(__file__).resolve().parent.parent

_BODIES = (
    '{"verdict": "release_ok", "reasons": []}',
    '{"verdict": "release_hold", "reasons": ["TIER_FAIL", "DRIFT_ALERT"]}',
    '{"verdict": "release_block", "reasons": ["GUARD_VIOLATION"]}',
    '{"verdict": "release_hold", "reasons": ["FLAKY_TESTS"], "release_scope": "svc", '
    '"now_ms": 2000, "override": {"ttl_seconds": 3600, "created_at_ms": 1000, "scope": "svc", '
    '"reason": "known flake", "created_by": "bench"}}',
)


def _lua_script() -> str:
    bodies = ",\n  ".join("[[" + body + "]]" for body in _BODIES)
    return (
        "local bodies = {\n  " + bodies + "\n}\n"
        'local headers = {["Content-Type"] = "application/json"}\n'
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        '  return wrk.format("POST", nil, headers, bodies[(i % #bodies) + 1])\n'
        "end\n"
    )


@dataclass
class _Server:
    name: str
    app: str
    variant: str | None  # GATEMETRICS_BENCH_VARIANT (benchmarks._apps), None: the shipped app
    root: Path
    settings: dict[str, str] = field(default_factory=dict)  # the app's own environment settings
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    completed: int = 0  # requests wrk saw answered, over every run (warm-up included)
    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_ms_per_request: list[float] = field(default_factory=list)

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def prometheus_dir(self) -> Path | None:
        """This server's own ``PROMETHEUS_MULTIPROC_DIR`` (prometheus variant only)."""
        return self.root / "prometheus-multiproc" if self.variant == "prometheus" else None

    @property
    def gatemetrics_persists(self) -> bool:
        return self.variant not in ("off", "prometheus")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(server: _Server) -> None:
    server.root.mkdir(parents=True)
    server.port = _free_port()
    env = {
        **os.environ,
        "GATEMETRICS_DIR": str(server.shards),
        "RELEASE_GATE_AUDIT_LOG": str(server.audit),
    }
    for name in ("GATEMETRICS_BENCH_PERSISTENCE", "GATEMETRICS_BENCH_VARIANT"):
        env.pop(name, None)
    # The runner's own multiprocess directory is not this server's: a fresh one or none.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if server.variant is not None:
        env["GATEMETRICS_BENCH_VARIANT"] = server.variant
    if server.prometheus_dir is not None:
        server.prometheus_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(server.prometheus_dir)
    for name in ("GATEMETRICS_PERSISTENCE", "GATEMETRICS_SAVE_INTERVAL", "GATEMETRICS_DURABILITY"):
        env.pop(name, None)
    env.update(server.settings)
    log = (server.root / "gunicorn.log").open("wb")
    server.proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(ROOT / "service" / "backend" / "gunicorn.conf.py"),
            "--workers",
            str(WORKERS),
            "--bind",
            f"127.0.0.1:{server.port}",
            "--log-level",
            "warning",
            server.app,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()


def _wait_ready(server: _Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pids: set[int] = set()
    while time.monotonic() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    pids.add(int(__import__("json").loads(resp.read())["pid"]))
        except OSError:
            pass
        if len(_workers(server)) == WORKERS and pids:
            return
        time.sleep(0.05)  # polling a server that is starting; bounded by the deadline
    log = (server.root / "gunicorn.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"gunicorn for {server.name!r} did not become ready:\n{log}")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def _workers(server: _Server) -> list[int]:
    assert server.proc is not None
    return _children(server.proc.pid)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _stop(server: _Server) -> None:
    proc, server.proc = server.proc, None
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # gunicorn: graceful stop of the master and its workers
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _latency_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m[1]) * _UNITS[m[2]]


@dataclass(frozen=True)
class _WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float


def _wrk(server: _Server, script: Path, seconds: int) -> _WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("figure 5 needs wrk on PATH (Debian: apt-get install wrk)")
    proc = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",  # wrk takes whole seconds only
            "--latency",
            "-s",
            str(script),
            f"{server.url}/release-gate/check",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    out = proc.stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or errors:
        raise RuntimeError(f"wrk against {server.name!r} saw errors:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = _latency_ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)[1])  # type: ignore[index]
    p99 = _latency_ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)[1])  # type: ignore[index]
    return _WrkResult(requests, rps, p50, p99)


def _measure(server: _Server, script: Path, seconds: int, *, record: bool) -> None:
    assert server.proc is not None
    pids = [server.proc.pid, *_workers(server)]
    cpu = _cpu_seconds(pids)
    result = _wrk(server, script, seconds)
    cpu = _cpu_seconds(pids) - cpu
    server.completed += result.requests
    if record:
        server.rps.append(result.rps)
        server.p50_ms.append(result.p50_ms)
        server.p99_ms.append(result.p99_ms)
        server.cpu_ms_per_request.append(cpu * 1e3 / max(result.requests, 1))


def _saves(server: _Server) -> int | None:
    """Saves the server's live shards made so far (each shard's generation counts its saves)."""
    from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA
    from gatemetrics import aggregate_dir

    if not server.gatemetrics_persists:
        return None
    if not server.shards.exists():
        return 0
    agg = aggregate_dir(server.shards, GATE_SCHEMA, namespace=GATE_NAMESPACE)
    return sum(r.generation or 0 for r in agg.shards if r.state == "live")


def _audited(server: _Server) -> int:
    """Decision lines in the server's audit log (marker lines of failed syncs carry none)."""
    with server.audit.open("rb") as f:
        return sum(1 for line in f if b'"decision"' in line)


def _prometheus_decisions(directory: Path) -> int:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "release_gate_decision_total":
                total += sample.value
    return int(total)


def _check_counts(servers: dict[str, _Server]) -> dict[str, Any]:
    from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA
    from gatemetrics import aggregate_dir

    found: dict[str, Any] = {}
    for key, server in servers.items():
        audited = _audited(server)
        if audited < server.completed:
            raise RuntimeError(
                f"{server.name}: {audited} audit lines < {server.completed} answered"
            )
        counted: int | None = None
        if not server.gatemetrics_persists:
            # Whatever the engine names its files: this directory must hold none.
            if server.shards.exists() and any(server.shards.iterdir()):
                found_files = sorted(p.name for p in server.shards.iterdir())[:3]
                raise RuntimeError(f"{server.name} wrote into its shard directory: {found_files}")
            if server.prometheus_dir is not None:
                counted = _prometheus_decisions(server.prometheus_dir)
        else:
            agg = aggregate_dir(server.shards, GATE_SCHEMA, namespace=GATE_NAMESPACE)
            counted = sum(agg.snapshot().family("decision_counts").values())
        # Periodic mode saved at the graceful stop; write-through before every answer.
        if counted is not None and (counted < server.completed or counted > audited):
            raise RuntimeError(
                f"{server.name}: counted {counted}, answered {server.completed}, audited {audited}"
            )
        found[key] = {"answered": server.completed, "audited": audited, "counted": counted}
    return found


def _servers(tmp: Path) -> dict[str, _Server]:
    defaults = _engine.backend_defaults()
    power_loss = _engine.durability(_engine.POWER_LOSS).value
    main = "backend.app.main:app"
    changed = "benchmarks._apps:app"
    default_name = (
        f"gatemetrics default ({defaults['persistence']}, {_engine.default_durability_name()})"
    )
    return {
        "off": _Server("metrics off (store not bound)", changed, "off", tmp / "off"),
        "default": _Server(default_name, main, None, tmp / "default"),
        "power-loss": _Server(
            f"gatemetrics write-through, {_engine.POWER_LOSS}",
            main,
            None,
            tmp / "power-loss",
            {"GATEMETRICS_PERSISTENCE": "write-through", "GATEMETRICS_DURABILITY": power_loss},
        ),
        "periodic": _Server(
            "gatemetrics periodic (5 s)",
            main,
            None,
            tmp / "periodic",
            {"GATEMETRICS_PERSISTENCE": "periodic", "GATEMETRICS_SAVE_INTERVAL": "5"},
        ),
        "prometheus": _Server(
            "prometheus_client multiprocess, same app", changed, "prometheus", tmp / "prometheus"
        ),
        "no-group-commit": _Server(
            "gatemetrics default, audit log without group commit (fsync per entry)",
            changed,
            "no-group-commit",
            tmp / "no-group-commit",
        ),
    }


def _change(ratio: float) -> str:
    """``3.1% fewer requests/s`` (or more) for a ratio of requests per second."""
    word = "fewer" if ratio < 1 else "more"
    return f"{abs(1 - ratio):.1%} {word} requests/s"


def _fmt_paired(r: dict[str, Any]) -> str:
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"


def compare(figs: dict[str, Figure]) -> dict[str, Any]:
    """The figure's comparisons, from requests per second per round of each variant."""
    return {
        "vs_off": {k: paired_ratio(fig, figs["off"]) for k, fig in figs.items() if k != "off"},
        "default_vs_prometheus_client": paired_ratio(figs["default"], figs["prometheus"]),
        "default_vs_no_group_commit": paired_ratio(figs["default"], figs["no-group-commit"]),
    }


def targets(comparisons: dict[str, Any]) -> list[dict[str, Any]]:
    """The figure's three targets, judged on the medians of the per-round ratios."""
    default_off = comparisons["vs_off"]["default"]
    vs_prometheus = comparisons["default_vs_prometheus_client"]
    group_commit = comparisons["default_vs_no_group_commit"]
    return [
        target(
            f"gatemetrics default within {1 - TARGET_VS_OFF:.0%} of metrics off (median "
            f"of per-round ratios >= {TARGET_VS_OFF:g})",
            measured=f"{_fmt_paired(default_off)} ({_change(default_off['median'])})",
            value=default_off["median"],
            op=">=",
            threshold=TARGET_VS_OFF,
        ),
        target(
            "gatemetrics default at least as fast as prometheus_client multiprocess, same "
            f"app (ratio >= {TARGET_VS_PROMETHEUS:g})",
            measured=_fmt_paired(vs_prometheus),
            value=vs_prometheus["median"],
            op=">=",
            threshold=TARGET_VS_PROMETHEUS,
        ),
        target(
            f"audit log group commit: >= {TARGET_GROUP_COMMIT:g}x the throughput with one "
            "fsync per entry (gatemetrics default both)",
            measured=_fmt_paired(group_commit),
            value=group_commit["median"],
            op=">=",
            threshold=TARGET_GROUP_COMMIT,
        ),
    ]


def run(ctx: Context) -> dict[str, Any]:
    seconds = 1 if ctx.quick else 3
    runs = 2 if ctx.quick else 12
    script = ctx.tmp / "checks.lua"
    script.write_text(_lua_script(), encoding="ascii")
    servers = _servers(ctx.tmp)
    try:
        for server in servers.values():
            _start(server)
        for server in servers.values():
            _wait_ready(server)
        for server in servers.values():  # warm-up: connections, imports, page cache, threads
            _measure(server, script, max(1, seconds // 2), record=False)
        order = list(servers.values())
        for round_no in range(runs):
            for server in order if round_no % 2 == 0 else reversed(order):
                _measure(server, script, seconds, record=True)
        saves = {key: _saves(server) for key, server in servers.items()}
    finally:
        for server in servers.values():
            _stop(server)
    counts = _check_counts(servers)

    figs = {key: Figure(s.name, tuple(s.rps)) for key, s in servers.items()}
    comparisons = compare(figs)
    vs_off = comparisons["vs_off"]
    vs_prometheus = comparisons["default_vs_prometheus_client"]
    group_commit = comparisons["default_vs_no_group_commit"]
    rows = []
    for key, server in servers.items():
        fig = figs[key]
        done = saves[key]
        rows.append(
            [
                server.name,
                f"{fig.median:,.0f}",
                f"{fig.low:,.0f}-{fig.high:,.0f}",
                "—" if key == "off" else _fmt_paired(vs_off[key]),
                f"{statistics.median(server.p50_ms):.2f} / {statistics.median(server.p99_ms):.2f}",
                f"{statistics.median(server.cpu_ms_per_request):.3f}",
                "—" if done is None else f"{done / max(server.completed, 1):.2f}",
            ]
        )
    floor = vs_off["periodic"]
    return {
        "title": TITLE,
        "method": (
            f"{len(servers)} gunicorn servers ({WORKERS} uvicorn workers each, "
            "`service/backend/gunicorn.conf.py`, loopback), running side by side; `wrk -t1 "
            f"-c{CONNECTIONS}` loads one at a time for {seconds} s per run, {runs} rounds "
            "after a warm-up, each round loading every variant once, variants alternating "
            "(ABBA). Mix: ALLOW, HOLD with two reasons, BLOCK, HOLD lifted by an override. "
            "Every variant writes the durable audit log (file lock, append, fsync) per check. "
            "Requests per second as wrk reports them; ratios are medians of the per-round "
            "ratios, [lowest-highest]; latency median / 99th percentile; server CPU (master "
            "+ workers, all threads) per request from /proc."
        ),
        "table": {
            "header": [
                "variant",
                "requests/s (median)",
                "min-max",
                "vs metrics off (per round)",
                "latency p50 / p99 (ms)",
                "server CPU ms / request",
                "shard saves / request",
            ],
            "rows": rows,
        },
        "targets": targets(comparisons),
        "notes": [
            f"2 cores: wrk and the {WORKERS} workers (and their I/O threads) compete for them; "
            "the same client and concurrency load every variant in alternation, so the "
            "comparison is fair while the absolute numbers are a floor.",
            "Periodic mode does no per-request work that metrics off does not (its change "
            "hook is unset; a thread saves every 5 s), so its ratio to metrics off is this "
            f"run's noise floor: {_fmt_paired(floor)}.",
            "The off, prometheus_client and no-group-commit variants serve the same app with "
            "one change each (`benchmarks/_apps.py`): off replaces "
            "`GateMetricStore.bind_to_dir` by a no-op (the store counts in memory only); "
            "prometheus_client also replaces `record_outcome` by the same increments with "
            "`labels(v).inc()`, counters created with every label value; no-group-commit "
            "builds the audit log with `group_commit=False`.",
            "Checked afterwards, per variant (answered by wrk, including the warm-up / audit "
            "lines / counted in the shards, or by prometheus_client's collector): "
            + "; ".join(
                f"{key}: {c['answered']:,} / {c['audited']:,} / "
                + ("-" if c["counted"] is None else f"{c['counted']:,}")
                for key, c in counts.items()
            )
            + ". Counted may exceed answered by the requests in flight when wrk stopped.",
        ],
        "data": {
            "workers": WORKERS,
            "connections": CONNECTIONS,
            "seconds_per_run": seconds,
            "rounds": runs,
            "variants": {key: s.name for key, s in servers.items()},
            "rps": {key: fig.to_json() for key, fig in figs.items()},
            "vs_off": vs_off,
            "default_vs_prometheus_client": vs_prometheus,
            "default_vs_no_group_commit": group_commit,
            "p50_ms": {k: s.p50_ms for k, s in servers.items()},
            "p99_ms": {k: s.p99_ms for k, s in servers.items()},
            "cpu_ms_per_request": {k: s.cpu_ms_per_request for k, s in servers.items()},
            "counts": counts,
            "shard_saves": saves,
            "backend_defaults": _engine.backend_defaults(),
        },
    }
