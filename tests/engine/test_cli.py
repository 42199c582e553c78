"""Tests of gatemetrics.cli, run as a real subprocess the way operators run it."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from filelock import FileLock

from backend.app.testing.gate_metrics import GateMetricStore
from gatemetrics import shard_for
from gatemetrics._format import parse_name
from tests.exposition_parser import parse
from tests.processes import ROOT, Reaper, read_line, require_tool, wait_until
from tests.shard_tools import GATE_FAMILIES, PIPELINE_FAMILIES, dead_shard, dead_v1_shard

FAMILIES = GATE_FAMILIES + PIPELINE_FAMILIES


def run_cli(
    *args: str, env: dict[str, str] | None = None, umask: int = -1
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "GATEMETRICS_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "gatemetrics", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**base, **(env or {})},
        umask=umask,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gatemetrics: error: "), lines[0]
    return lines[0]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    path = tmp_path / "shards"
    path.mkdir()
    dead_shard(path, allows=2, denies=1)
    dead_shard(path, allows=3)
    return path


@pytest.fixture
def live_store(shard_dir: Path) -> Iterator[GateMetricStore]:
    """A store of this (live) test process, so the CLI sees a live owner."""
    store = GateMetricStore()
    binding = store.bind_to_dir(shard_dir)
    store.record_decision(False, ["DRIFT_ALERT", "NO_TIER_DATA"])
    try:
        yield store
    finally:
        binding.close()


# -- demo ------------------------------------------------------------------------------------


def test_demo_without_arguments_prints_exposition_and_an_exact_summary() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "result: exact" in result.stdout
    assert "MISMATCH" not in result.stdout
    exposition = "".join(
        line + "\n" for line in result.stdout.splitlines() if line.startswith(("#", "release_"))
    )
    families = parse(exposition)
    assert list(families) == FAMILIES
    returned = int(re.search(r"returned (\d+)", result.stdout)[1])  # type: ignore[index]
    assert sum(families["release_gate_decision_total"].samples.values()) == returned


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [("--decisions", "0"), ("--decisions", "-3"), ("--decisions", "many"), ("--workers", "1")],
)
def test_demo_rejects_bad_arguments(option: str, value: str) -> None:
    result = run_cli("demo", option, value)
    assert result.returncode == 2
    assert option in result.stderr


def test_closed_stdout_is_not_a_traceback_and_leaves_no_worker(reaper: Reaper) -> None:
    proc = reaper.track(
        subprocess.Popen(
            [sys.executable, "-m", "gatemetrics", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    )
    line = read_line(proc)
    while "pid" not in line:
        line = read_line(proc)
    worker = int(re.search(r"pid (\d+)", line)[1])  # type: ignore[index]
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    assert proc.returncode in (0, 141)

    def gone() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout=10)


# -- aggregate -------------------------------------------------------------------------------


def test_aggregate_prints_the_merged_exposition_and_compacts(
    shard_dir: Path, live_store: GateMetricStore
) -> None:
    result = run_cli("aggregate", "--dir", str(shard_dir))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    families = parse(result.stdout)
    assert list(families) == FAMILIES
    assert families["release_gate_decision_total"].samples == {
        ("decision", "ALLOW"): 5,
        ("decision", "DENY"): 2,
    }
    assert families["release_gate_reason_total"].samples[("reason", "OPS_GATE_FAIL")] == 1
    assert families["release_gate_shards"].kind == "gauge"
    assert families["release_gate_shards"].samples == {("state", "live"): 1, ("state", "dead"): 2}
    assert families["release_gate_quarantined_shards_total"].samples == {None: 0}
    live = shard_for(live_store, shard_dir).path
    assert live is not None
    shard_files = [p for p in os.listdir(shard_dir) if parse_name(p) is not None]
    assert shard_files == [os.path.basename(live)]  # only the live one is left
    again = run_cli("aggregate", "--dir", str(shard_dir))
    assert again.stdout.replace('{state="dead"} 0', "") != ""
    assert parse(again.stdout)["release_gate_decision_total"].samples == (
        families["release_gate_decision_total"].samples
    )


def test_no_compact_changes_nothing(shard_dir: Path) -> None:
    before = sorted(os.listdir(shard_dir))
    result = run_cli("aggregate", "--dir", str(shard_dir), "--no-compact")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(shard_dir)) == sorted([*before, "aggregate.lock"])
    assert parse(result.stdout)["release_gate_shards"].samples[("state", "dead")] == 2


def test_aggregate_json_format(shard_dir: Path) -> None:
    result = run_cli("aggregate", "--dir", str(shard_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    assert doc["decision_counts"] == {"ALLOW": 5, "DENY": 1}
    assert doc["pipeline_shards"] == {"live": 0, "dead": 2}
    assert doc["pipeline_quarantined_shards"] == 0
    assert list(doc) == sorted(doc)


def test_dir_defaults_to_the_environment(shard_dir: Path) -> None:
    result = run_cli("aggregate", env={"GATEMETRICS_DIR": str(shard_dir)})
    assert result.returncode == 0, result.stderr
    assert 'release_gate_decision_total{decision="ALLOW"} 5' in result.stdout


def test_textfile_is_written_atomically_with_mode_0644(shard_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "release_gate.prom"
    target.parent.mkdir()
    result = run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target), umask=0o077)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["release_gate.prom"]  # no temp file left
    assert (
        parse(target.read_text())["release_gate_decision_total"].samples[("decision", "ALLOW")] == 5
    )


def test_orphan_temp_files_of_killed_runs_are_removed(shard_dir: Path, tmp_path: Path) -> None:
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    orphan = textdir / ".release_gate.prom.999999.tmp"  # a run SIGKILLed mid-write, long ago
    orphan.write_text("half")
    os.utime(orphan, (1_000_000, 1_000_000))
    fresh = textdir / ".release_gate.prom.999998.tmp"  # a concurrent run writing right now
    fresh.write_text("half")
    other = textdir / ".node.prom.999997.tmp"  # not ours
    other.write_text("x")
    os.utime(other, (1_000_000, 1_000_000))
    target = textdir / "release_gate.prom"
    result = run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(textdir)) == sorted([fresh.name, other.name, target.name])


def test_broken_shards_warn_on_stderr_but_do_not_fail(shard_dir: Path) -> None:
    (shard_dir / "shard-garbage.json").write_bytes(b"\xff\xfe not json")
    result = run_cli("aggregate", "--dir", str(shard_dir))
    assert result.returncode == 0
    assert result.stderr.count("\n") == 1
    assert "gatemetrics: WARNING: quarantined shard-garbage.json" in result.stderr
    families = parse(result.stdout)
    assert families["release_gate_quarantined_shards_total"].samples == {None: 1}
    assert families["release_gate_decision_total"].samples[("decision", "ALLOW")] == 5


# -- failures: one line, a non-zero status, no partial or stale textfile -----------------------


def test_missing_directory(tmp_path: Path) -> None:
    result = run_cli("aggregate", "--dir", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert "does not exist" in one_error_line(result)
    assert result.stdout == ""


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = run_cli("aggregate", "--dir", str(tmp_path / "file"))
    assert result.returncode == 1
    assert "is not a directory" in one_error_line(result)


def test_unreadable_directory(shard_dir: Path, reaper: Reaper) -> None:
    if os.geteuid() != 0:
        shard_dir.chmod(0)
        try:
            result = run_cli("aggregate", "--dir", str(shard_dir))
        finally:
            shard_dir.chmod(0o755)
        assert result.returncode == 1
        assert "Permission denied" in one_error_line(result)
        return
    # As root, permissions do not stop us: drop to an unprivileged user inside the CLI process
    # (after its imports: the interpreter lives under /root) on a directory it may not list.
    # A real EACCES from the kernel, no mock.
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        os.chmod(top, 0o755)  # noqa: S103 - the other user must reach "private"
        private = Path(top) / "private"
        private.mkdir(mode=0o700)
        proc = reaper.python(
            """
            import gatemetrics.cli, backend.app.testing.gate_metrics, gettext, locale, logging
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            sys.exit(gatemetrics.cli.main(sys.argv[1:]))
            """,
            "aggregate",
            "--dir",
            str(private),
        )
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gatemetrics: error: cannot use shard directory")
    assert "Permission denied" in lines[0]


def test_lock_timeout_exits_75_and_removes_the_stale_textfile(
    shard_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "release_gate.prom"
    assert run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target)).returncode == 0
    assert target.exists()
    os.utime(target, (1_000_000, 1_000_000))  # an earlier run's file
    lock = FileLock(str(shard_dir / "aggregate.lock"), thread_local=False)
    with lock:
        result = run_cli(
            "aggregate",
            "--dir",
            str(shard_dir),
            "--textfile",
            str(target),
            "--lock-timeout",
            "0.2",
        )
    assert result.returncode == 75
    line = one_error_line(result)
    assert "aggregate.lock not free within 0.2 s" in line
    assert "removed the previous" in line
    assert not target.exists()


def test_unwritable_textfile_target_leaves_nothing(shard_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "aggregate", "--dir", str(shard_dir), "--textfile", str(tmp_path / "missing" / "x.prom")
    )
    assert result.returncode == 1
    assert "cannot write textfile" in one_error_line(result)
    target = tmp_path / "target-is-a-dir.prom"
    target.mkdir()
    result = run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target))
    assert result.returncode == 1
    assert "cannot write textfile" in one_error_line(result)
    assert os.listdir(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "target-is-a-dir.prom"]


def test_a_textfile_refreshed_by_a_concurrent_run_is_kept(shard_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "release_gate.prom"
    target.write_text("# fresher than the failed run\n")
    future = 4_000_000_000
    os.utime(target, (future, future))
    with FileLock(str(shard_dir / "aggregate.lock"), thread_local=False):
        result = run_cli(
            "aggregate", "--dir", str(shard_dir), "--textfile", str(target), "--lock-timeout", "0"
        )
    assert result.returncode == 75
    assert target.exists()


@pytest.mark.parametrize("spec", ["nope", "json:dumps", "no.such.module:X", "gatemetrics:nothing"])
def test_bad_schema_is_a_usage_error(shard_dir: Path, spec: str) -> None:
    result = run_cli("aggregate", "--dir", str(shard_dir), "--schema", spec)
    assert result.returncode == 2
    assert "--schema" in result.stderr


def test_missing_dir_option_is_a_usage_error() -> None:
    result = run_cli("aggregate")
    assert result.returncode == 2
    assert "GATEMETRICS_DIR" in result.stderr


@pytest.mark.parametrize("value", ["-1", "nan", "soon", "99999"])
def test_bad_lock_timeout_is_a_usage_error(shard_dir: Path, value: str) -> None:
    result = run_cli("aggregate", "--dir", str(shard_dir), "--lock-timeout", value)
    assert result.returncode == 2


# -- status ----------------------------------------------------------------------------------


def test_status_is_a_readable_table_and_changes_nothing(
    shard_dir: Path, live_store: GateMetricStore
) -> None:
    assert run_cli("aggregate", "--dir", str(shard_dir)).returncode == 0  # an archive exists
    dead_shard(shard_dir, allows=4)
    (shard_dir / "shard-junk.json").write_text("[]")
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    result = run_cli("status", "--dir", str(shard_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"directory   {shard_dir}" in out
    assert re.search(r"archive +2 dead incarnations absorbed, last compaction \d+\.\ds ago", out)
    assert "shards      1 live, 1 dead" in out
    assert "1 quarantined in total (1 waiting for compaction)" in out
    header = r"^STATE +PID +HOST +GEN +LAST SAVE +COUNT +FORMAT +FILE$"
    assert re.search(header, out, re.M)
    assert re.search(
        rf"^live +{os.getpid()} +\S+ +1 +\d+\.\ds ago +3 +v2 +v2-\S+\.shard$", out, re.M
    )
    assert re.search(r"^dead +\d+ +\S+ +1 +\d+\.\ds ago +4 +v2 +v2-\S+\.shard$", out, re.M)
    assert re.search(r"^QUARANTINE +- +- +- +- +- +- +shard-junk\.json  \(not a shard", out, re.M)
    assert re.search(r'release_gate_decision_total\{decision="ALLOW"\} +9', out)
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before


def test_status_shows_the_format_of_v1_and_v2_shards(
    shard_dir: Path, live_store: GateMetricStore
) -> None:
    old = dead_v1_shard(shard_dir, allows=6)  # a dead worker of the previous release
    result = run_cli("status", "--dir", str(shard_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "shards      1 live, 3 dead" in out
    assert re.search(rf"^dead +\d+ +\S+ +1 +\d+\.\ds ago +6 +v1 +{re.escape(old)}$", out, re.M)
    assert len(re.findall(r"^dead .* v2 +v2-\S+\.shard$", out, re.M)) == 2
    assert re.search(rf"^live +{os.getpid()} .* v2 +v2-\S+\.shard$", out, re.M)
    assert re.search(r'release_gate_decision_total\{decision="ALLOW"\} +11', out)
    # Compaction absorbs the v1 shard like a v2 one; the counts stay.
    result = run_cli("aggregate", "--dir", str(shard_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["decision_counts"] == {"ALLOW": 11, "DENY": 2}
    assert not (shard_dir / old).exists()


def test_status_of_an_empty_directory(tmp_path: Path) -> None:
    result = run_cli("status", "--dir", str(tmp_path))
    assert result.returncode == 0
    assert "none yet (nothing compacted)" in result.stdout
    assert "(no shard files)" in result.stdout


def test_status_of_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli("status", "--dir", str(tmp_path / "gone"))
    assert result.returncode == 1
    one_error_line(result)


# -- real tools ------------------------------------------------------------------------------


def test_promtool_accepts_the_aggregated_exposition(promtool: str, shard_dir: Path) -> None:
    text = run_cli("aggregate", "--dir", str(shard_dir)).stdout
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_node_exporter_textfile_collector_serves_the_textfile(
    shard_dir: Path, tmp_path: Path, reaper: Reaper
) -> None:
    exporter = require_tool("prometheus-node-exporter")
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    target = textdir / "release_gate.prom"
    result = run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target), umask=0o077)
    assert result.returncode == 0, result.stderr
    port = free_port()
    reaper.track(
        subprocess.Popen(
            [
                exporter,
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={textdir}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    scraped: list[str] = []

    def scrape() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                scraped.append(resp.read().decode())
        except OSError:
            return False
        return True

    wait_until(scrape, timeout=20, interval=0.05)
    text = scraped[-1]
    assert "node_textfile_scrape_error 0" in text
    assert 'release_gate_decision_total{decision="ALLOW"} 5' in text
    assert 'release_gate_shards{state="dead"} 2' in text
    assert "release_gate_quarantined_shards_total 0" in text
    assert "# TYPE release_gate_decision_total counter" in text
    assert "# TYPE release_gate_shards gauge" in text


# -- a directory other users may write ---------------------------------------------------------


@pytest.mark.parametrize("what", ["directory", "archive"])
def test_a_world_writable_directory_or_archive_is_refused_and_nothing_changes(
    shard_dir: Path, tmp_path: Path, what: str
) -> None:
    assert run_cli("aggregate", "--dir", str(shard_dir), "--no-compact").returncode == 0
    if what == "archive":
        assert run_cli("aggregate", "--dir", str(shard_dir)).returncode == 0  # writes one
        (shard_dir / "archive.json").chmod(0o666)
        dead_shard(shard_dir, allows=1)
    else:
        shard_dir.chmod(0o1777)  # the sticky bit does not help: anyone may still plant files
    before = sorted(os.listdir(shard_dir))
    target = tmp_path / "release_gate.prom"
    result = run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "world-writable" in line
    assert "--allow-world-writable" in line
    assert sorted(os.listdir(shard_dir)) == before  # refused before anything was compacted
    assert not target.exists()

    status = run_cli("status", "--dir", str(shard_dir))
    assert status.returncode == 1
    assert status.stdout.startswith("PROBLEM")
    assert "world-writable" in status.stdout.splitlines()[0]
    assert "world-writable" in one_error_line(status)

    allowed = run_cli("aggregate", "--dir", str(shard_dir), "--allow-world-writable")
    assert allowed.returncode == 0, allowed.stderr
    assert run_cli("status", "--dir", str(shard_dir), "--allow-world-writable").returncode == 0


def test_a_symlinked_textfile_is_refused_unless_asked_for(shard_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me\n")
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    link = textdir / "release_gate.prom"
    link.symlink_to(elsewhere)
    before = sorted(os.listdir(shard_dir))
    result = run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(link))
    assert result.returncode == 1
    assert "is a symlink" in one_error_line(result)
    assert link.is_symlink()  # a refused (failed) run never removes the link either
    assert elsewhere.read_text() == "keep me\n"
    assert sorted(os.listdir(shard_dir)) == before  # refused before compacting

    followed = run_cli(
        "aggregate", "--dir", str(shard_dir), "--textfile", str(link), "--follow-symlinks"
    )
    assert followed.returncode == 0, followed.stderr
    assert link.is_symlink()
    assert 'release_gate_decision_total{decision="ALLOW"} 5' in elsewhere.read_text()
    assert os.listdir(textdir) == ["release_gate.prom"]


def test_a_planted_temp_file_beside_the_textfile_is_never_written_through(
    shard_dir: Path, tmp_path: Path
) -> None:
    """Whatever sits under the temp name (here a hard link of another file) is replaced, not
    truncated or followed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    target = textdir / "release_gate.prom"
    code = f"""
import os, sys
from gatemetrics.cli import main
os.link({str(victim)!r}, {str(textdir)!r} + f"/.release_gate.prom.{{os.getpid()}}.tmp")
sys.exit(main(["aggregate", "--dir", {str(shard_dir)!r}, "--textfile", {str(target)!r}]))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "keep me\n"
    assert 'release_gate_decision_total{decision="ALLOW"} 5' in target.read_text()
