"""Tests of gatemetrics.cli, run as a real subprocess the way operators run it."""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import re
import shutil
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

from gatemetrics import CounterStore, bind, shard_for
from gatemetrics._format import (
    MAX_RECORDED_SERIES,
    BadFile,
    parse_name,
    schema_fingerprint,
    schema_from_record,
    schema_record,
)
from tests.engine.schema import (
    OTHER_SCHEMA,
    SHOP_FAMILIES,
    SHOP_PIPELINE_FAMILIES,
    SHOP_SCHEMA,
    WIDER_SHOP_SCHEMA,
    dead_shop_shard,
    dead_shop_v1_shard,
)
from tests.exposition_parser import parse
from tests.processes import ATTACKER_UID, ROOT, Reaper, require_tool, run_cli, wait_until

FAMILIES = SHOP_FAMILIES + SHOP_PIPELINE_FAMILIES


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gatemetrics: error: "), lines[0]
    return lines[0]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    path = tmp_path / "shards"
    path.mkdir()
    dead_shop_shard(path, paid=2, refused=1)
    dead_shop_shard(path, paid=3)
    return path


@pytest.fixture
def live_store(shard_dir: Path) -> Iterator[CounterStore]:
    """A store of this (live) test process, so the CLI sees a live owner."""
    store = CounterStore(SHOP_SCHEMA)
    binding = bind(store, shard_dir)
    # One record of three series (one save, generation 1), like one refused order.
    slot = SHOP_SCHEMA.slot
    store.increment_slots(
        [slot("orders", "refused"), slot("refusals", "no_money"), slot("refusals", "fraud")]
    )
    try:
        yield store
    finally:
        binding.close()


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr


# -- aggregate -------------------------------------------------------------------------------


def test_aggregate_prints_the_merged_exposition_and_compacts(
    shard_dir: Path, live_store: CounterStore
) -> None:
    result = run_cli("aggregate", "--dir", str(shard_dir))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    families = parse(result.stdout)
    assert list(families) == FAMILIES
    assert families["shop_orders_total"].samples == {
        ("outcome", "paid"): 5,
        ("outcome", "refused"): 2,
    }
    assert families["shop_refusals_total"].samples[("why", "no_stock")] == 1
    assert families["shop_shards"].kind == "gauge"
    assert families["shop_shards"].samples == {("state", "live"): 1, ("state", "dead"): 2}
    assert families["shop_quarantined_shards_total"].samples == {None: 0}
    live = shard_for(live_store, shard_dir).path
    assert live is not None
    shard_files = [p for p in os.listdir(shard_dir) if parse_name(p) is not None]
    assert shard_files == [os.path.basename(live)]  # only the live one is left
    again = run_cli("aggregate", "--dir", str(shard_dir))
    assert again.stdout.replace('{state="dead"} 0', "") != ""
    assert parse(again.stdout)["shop_orders_total"].samples == (
        families["shop_orders_total"].samples
    )


def test_no_compact_changes_nothing(shard_dir: Path) -> None:
    before = sorted(os.listdir(shard_dir))
    result = run_cli("aggregate", "--dir", str(shard_dir), "--no-compact")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(shard_dir)) == sorted([*before, "aggregate.lock"])
    assert parse(result.stdout)["shop_shards"].samples[("state", "dead")] == 2


def test_aggregate_json_format(shard_dir: Path) -> None:
    result = run_cli("aggregate", "--dir", str(shard_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    assert doc["orders"] == {"paid": 5, "refused": 1}
    assert doc["pipeline_shards"] == {"live": 0, "dead": 2}
    assert doc["pipeline_quarantined_shards"] == 0
    assert list(doc) == sorted(doc)


def test_dir_defaults_to_the_environment(shard_dir: Path) -> None:
    result = run_cli("aggregate", env={"GATEMETRICS_DIR": str(shard_dir)})
    assert result.returncode == 0, result.stderr
    assert 'shop_orders_total{outcome="paid"} 5' in result.stdout


def test_textfile_is_written_atomically_with_mode_0644(shard_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "shop.prom"
    target.parent.mkdir()
    result = run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target), umask=0o077)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["shop.prom"]  # no temp file left
    assert parse(target.read_text())["shop_orders_total"].samples[("outcome", "paid")] == 5


def test_orphan_temp_files_of_killed_runs_are_removed(shard_dir: Path, tmp_path: Path) -> None:
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    orphan = textdir / ".shop.prom.999999.tmp"  # a run SIGKILLed mid-write, long ago
    orphan.write_text("half")
    os.utime(orphan, (1_000_000, 1_000_000))
    fresh = textdir / ".shop.prom.999998.tmp"  # a concurrent run writing right now
    fresh.write_text("half")
    other = textdir / ".node.prom.999997.tmp"  # not ours
    other.write_text("x")
    os.utime(other, (1_000_000, 1_000_000))
    target = textdir / "shop.prom"
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
    assert families["shop_quarantined_shards_total"].samples == {None: 1}
    assert families["shop_orders_total"].samples[("outcome", "paid")] == 5


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
            import gatemetrics.cli, gettext, locale, logging
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


def test_lock_timeout_exits_75_and_leaves_the_textfile_to_the_run_holding_the_lock(
    shard_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "shop.prom"
    assert run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target)).returncode == 0
    assert target.exists()
    os.utime(target, (1_000_000, 1_000_000))  # an earlier run's file
    before = target.read_bytes()
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
    assert "removed the previous" not in line
    # The run holding the lock writes the textfile: this one must not remove it.
    assert target.read_bytes() == before


def test_any_other_failure_removes_the_stale_textfile(shard_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "shop.prom"
    assert run_cli("aggregate", "--dir", str(shard_dir), "--textfile", str(target)).returncode == 0
    os.utime(target, (1_000_000, 1_000_000))  # an earlier run's file
    result = run_cli("aggregate", "--dir", str(tmp_path / "gone"), "--textfile", str(target))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "does not exist" in line
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
    target = tmp_path / "shop.prom"
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


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "soon", "99999"])
def test_bad_lock_timeout_is_a_usage_error(shard_dir: Path, value: str) -> None:
    result = run_cli("aggregate", "--dir", str(shard_dir), "--lock-timeout", value)
    assert result.returncode == 2


# -- status ----------------------------------------------------------------------------------


def test_status_is_a_readable_table_and_changes_nothing(
    shard_dir: Path, live_store: CounterStore
) -> None:
    assert run_cli("aggregate", "--dir", str(shard_dir)).returncode == 0  # an archive exists
    dead_shop_shard(shard_dir, paid=4)
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
    assert re.search(r'shop_orders_total\{outcome="paid"\} +9', out)
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before


def test_status_shows_the_format_of_v1_and_v2_shards(
    shard_dir: Path, live_store: CounterStore
) -> None:
    old = dead_shop_v1_shard(shard_dir, paid=6)  # a dead worker of the previous release
    result = run_cli("status", "--dir", str(shard_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "shards      1 live, 3 dead" in out
    assert re.search(rf"^dead +\d+ +\S+ +1 +\d+\.\ds ago +6 +v1 +{re.escape(old)}$", out, re.M)
    assert len(re.findall(r"^dead .* v2 +v2-\S+\.shard$", out, re.M)) == 2
    assert re.search(rf"^live +{os.getpid()} .* v2 +v2-\S+\.shard$", out, re.M)
    assert re.search(r'shop_orders_total\{outcome="paid"\} +11', out)
    # Compaction absorbs the v1 shard like a v2 one; the counts stay.
    result = run_cli("aggregate", "--dir", str(shard_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["orders"] == {"paid": 11, "refused": 2}
    assert not (shard_dir / old).exists()


def test_status_of_an_empty_directory(tmp_path: Path) -> None:
    result = run_cli(
        "status", "--dir", str(tmp_path), "--schema", "tests.engine.schema:SHOP_SCHEMA"
    )
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
    target = textdir / "shop.prom"
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
    assert 'shop_orders_total{outcome="paid"} 5' in text
    assert 'shop_shards{state="dead"} 2' in text
    assert "shop_quarantined_shards_total 0" in text
    assert "# TYPE shop_orders_total counter" in text
    assert "# TYPE shop_shards gauge" in text


# -- a directory other users may write ---------------------------------------------------------


@pytest.mark.parametrize("what", ["directory", "archive"])
def test_a_world_writable_directory_or_archive_is_refused_and_nothing_changes(
    shard_dir: Path, tmp_path: Path, what: str
) -> None:
    assert run_cli("aggregate", "--dir", str(shard_dir), "--no-compact").returncode == 0
    if what == "archive":
        assert run_cli("aggregate", "--dir", str(shard_dir)).returncode == 0  # writes one
        (shard_dir / "archive.json").chmod(0o666)
        dead_shop_shard(shard_dir, paid=1)
    else:
        shard_dir.chmod(0o1777)  # the sticky bit does not help: anyone may still plant files
    before = sorted(os.listdir(shard_dir))
    target = tmp_path / "shop.prom"
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
    link = textdir / "shop.prom"
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
    assert 'shop_orders_total{outcome="paid"} 5' in elsewhere.read_text()
    assert os.listdir(textdir) == ["shop.prom"]


def test_a_planted_temp_file_beside_the_textfile_is_never_written_through(
    shard_dir: Path, tmp_path: Path
) -> None:
    """Whatever sits under the temp name (here a hard link of another file) is replaced, not
    truncated or followed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    target = textdir / "shop.prom"
    code = f"""
import os, sys
from gatemetrics.cli import main
os.link({str(victim)!r}, {str(textdir)!r} + f"/.shop.prom.{{os.getpid()}}.tmp")
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
    assert 'shop_orders_total{outcome="paid"} 5' in target.read_text()


# -- the schema comes from the directory -------------------------------------------------------


def test_aggregate_and_status_need_no_schema_for_any_schema(shard_dir: Path) -> None:
    """The shop's shards record their schema; after compaction schema.json records it too, and
    a directory left with only its archive still needs no --schema."""
    assert not (shard_dir / "schema.json").exists()
    first = run_cli("aggregate", "--dir", str(shard_dir), "--format", "json")
    assert first.returncode == 0, first.stderr
    assert orjson.loads(first.stdout)["orders"] == {"paid": 5, "refused": 1}
    assert [p for p in os.listdir(shard_dir) if parse_name(p)] == []  # all absorbed
    recorded = orjson.loads((shard_dir / "schema.json").read_bytes())
    assert recorded["namespace"] == "shop"  # the prefix the shop's family names share
    assert [f["name"] for f in recorded["schema"]["families"]] == SHOP_FAMILIES
    # The archive keeps exactly the fields the previous release's reader accepts.
    assert set(orjson.loads((shard_dir / "archive.json").read_bytes())) == {
        "format",
        "version",
        "counts",
        "absorbed",
        "absorbed_total",
        "quarantined_total",
        "quarantining",
        "updated_at",
        "first_start",
    }
    again = run_cli("aggregate", "--dir", str(shard_dir))
    assert again.returncode == 0, again.stderr
    families = parse(again.stdout)
    assert list(families) == FAMILIES
    assert families["shop_orders_total"].samples[("outcome", "paid")] == 5
    status = run_cli("status", "--dir", str(shard_dir))
    assert status.returncode == 0, status.stderr
    assert re.search(
        r"^schema +[0-9a-f]{12} \(3 families, 6 series\), namespace shop$", status.stdout, re.M
    )


def test_a_recorded_namespace_is_used_and_the_flag_overrides_it(shard_dir: Path) -> None:
    assert run_cli("aggregate", "--dir", str(shard_dir), "--namespace", "store").returncode == 0
    assert orjson.loads((shard_dir / "schema.json").read_bytes())["namespace"] == "store"
    result = run_cli("aggregate", "--dir", str(shard_dir))
    assert "store_shards" in parse(result.stdout)
    flagged = run_cli("aggregate", "--dir", str(shard_dir), "--namespace", "mine")
    assert "mine_shards" in parse(flagged.stdout)


def test_schema_json_wins_and_shards_that_do_not_fit_it_are_quarantined(shard_dir: Path) -> None:
    assert run_cli("aggregate", "--dir", str(shard_dir)).returncode == 0  # records SHOP_SCHEMA
    wider = CounterStore(WIDER_SHOP_SCHEMA)
    wider.increment("orders", "cancelled")
    shard = shard_for(wider, shard_dir)
    assert shard.save()
    shard.close(save=False)
    dead_shop_shard(shard_dir, paid=1)
    result = run_cli("aggregate", "--dir", str(shard_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "written with another schema" in result.stderr
    doc = orjson.loads(result.stdout)
    assert doc["orders"] == {"paid": 6, "refused": 1}
    assert doc["pipeline_quarantined_shards"] == 1


def test_without_schema_json_the_schema_most_shards_fit_wins(tmp_path: Path) -> None:
    """A rolling upgrade that adds a label value: the old shards fit the new schema, so the new
    one wins even while old shards are more numerous, and nothing is quarantined."""
    dead_shop_shard(tmp_path, paid=2)
    dead_shop_shard(tmp_path, paid=3)
    wider = CounterStore(WIDER_SHOP_SCHEMA)
    wider.increment("orders", "cancelled", 4)
    shard = shard_for(wider, tmp_path)
    assert shard.save()
    shard.close(save=False)
    result = run_cli("aggregate", "--dir", str(tmp_path), "--format", "json", "--no-compact")
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    assert doc["orders"] == {"paid": 5, "refused": 0, "cancelled": 4}
    assert doc["pipeline_quarantined_shards"] == 0


def test_a_directory_that_records_no_schema_fails_with_one_line(tmp_path: Path) -> None:
    for command in ("aggregate", "status"):
        result = run_cli(command, "--dir", str(tmp_path))
        assert result.returncode == 1
        assert "no schema known" in one_error_line(result)
        assert "--schema" in result.stderr
        assert result.stdout == ""
    assert os.listdir(tmp_path) == []


def test_when_no_shard_fits_the_given_schema_the_run_refuses_and_moves_nothing(
    shard_dir: Path, tmp_path: Path
) -> None:
    before = sorted(os.listdir(shard_dir))
    target = tmp_path / "shop.prom"
    result = run_cli(
        "aggregate",
        "--dir",
        str(shard_dir),
        "--schema",
        "tests.engine.schema:OTHER_SCHEMA",
        "--textfile",
        str(target),
    )
    assert result.returncode == 1
    line = one_error_line(result)
    ours = schema_fingerprint(OTHER_SCHEMA).hex()[:12]
    theirs = schema_fingerprint(SHOP_SCHEMA).hex()[:12]
    assert ours in line
    assert theirs in line
    assert "nothing was moved" in line
    assert sorted(os.listdir(shard_dir)) == sorted([*before, "aggregate.lock"])
    assert not (shard_dir / "quarantine").exists()
    assert not target.exists()


def test_a_hostile_schema_json_cannot_widen_the_label_set(shard_dir: Path) -> None:
    """A schema.json declaring an unbounded label set, a control character or a fingerprint
    that is not its own is ignored (one warning): the shards' schema is used."""
    record = schema_record(SHOP_SCHEMA)
    wide = orjson.loads(orjson.dumps(record))
    wide["families"][0]["values"] = [f"v{i}" for i in range(5000)]
    control = orjson.loads(orjson.dumps(record))
    control["families"][0]["values"] = ["paid", "re\nfused"]
    for bad in (wide, control):
        doc = {
            "format": "gatemetrics-schema",
            "version": 1,
            "namespace": "shop",
            "fingerprint": "0" * 32,
            "schema": bad,
        }
        (shard_dir / "schema.json").write_bytes(orjson.dumps(doc))
        result = run_cli("aggregate", "--dir", str(shard_dir), "--no-compact", "--format", "json")
        assert result.returncode == 0, result.stderr
        assert "ignored schema.json" in result.stderr
        assert orjson.loads(result.stdout)["orders"] == {"paid": 5, "refused": 1}


@pytest.mark.parametrize(
    "change",
    [
        {"values": [f"v{i}" for i in range(MAX_RECORDED_SERIES + 1)]},
        {"values": ["paid", "x" * 129]},
        {"values": ["paid", "bell\x07"]},
        {"name": "shop orders"},
        {"label": "__name__"},
        {"documentation": "x" * 1025},
        {"extra": 1},
    ],
)
def test_a_recorded_schema_is_validated_and_bounded(change: dict[str, object]) -> None:
    record = orjson.loads(orjson.dumps(schema_record(SHOP_SCHEMA)))
    record["families"][0].update(change)
    with pytest.raises(BadFile):
        schema_from_record(record)
    assert schema_from_record(schema_record(SHOP_SCHEMA)) == SHOP_SCHEMA


# -- polish ------------------------------------------------------------------------------------


def test_version_is_the_distributions() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"gatemetrics {importlib.metadata.version('gatemetrics')}"


@pytest.mark.parametrize("command", [(), ("aggregate",), ("status",)])
def test_help_lists_the_exit_codes(command: tuple[str, ...]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "exit status:" in result.stdout
    for code in ("0 ", "1 ", "2 ", "75 "):
        assert re.search(rf"^  {code}", result.stdout, re.M), code


@pytest.mark.parametrize("value", ["_x", "9lives", "a-b", "a:b", ""])
def test_a_bad_namespace_is_a_usage_error(shard_dir: Path, value: str) -> None:
    before = sorted(os.listdir(shard_dir))
    result = run_cli("aggregate", "--dir", str(shard_dir), "--namespace", value)
    assert result.returncode == 2
    assert "--namespace" in result.stderr
    assert sorted(os.listdir(shard_dir)) == before


def test_status_json_is_what_the_table_shows(shard_dir: Path, live_store: CounterStore) -> None:
    table = run_cli("status", "--dir", str(shard_dir))
    result = run_cli("status", "--dir", str(shard_dir), "--json")
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    assert list(doc) == sorted(doc)
    assert doc["version"] == 1
    assert doc["directory"] == str(shard_dir)
    assert doc["writable"] is True
    assert doc["problems"] == []
    assert doc["schema"] == {
        "fingerprint": schema_fingerprint(SHOP_SCHEMA).hex(),
        "families": 3,
        "series": 6,
        "namespace": "shop",
    }
    assert doc["archive"]["exists"] is False
    assert doc["shards"] == {"live": 1, "dead": 2}
    assert doc["quarantine"] == {"quarantined_total": 0, "waiting": 0, "kept": 0}
    files = {f["name"]: f for f in doc["files"]}
    live = shard_for(live_store, shard_dir).path
    assert live is not None
    mine = files[os.path.basename(live)]
    assert (mine["state"], mine["action"], mine["pid"], mine["count"], mine["format"]) == (
        "live",
        "counted",
        os.getpid(),
        3,
        2,
    )
    assert sorted(f["state"] for f in doc["files"]) == ["dead", "dead", "live"]
    assert doc["totals"]['shop_orders_total{outcome="paid"}'] == 5
    assert doc["totals"]['shop_shards{state="live"}'] == 1
    for series, count in doc["totals"].items():
        assert re.search(rf"^  {re.escape(series)} +{count}$", table.stdout, re.M)


def test_status_of_a_directory_the_user_can_read_but_not_write(
    shard_dir: Path, reaper: Reaper
) -> None:
    """As another (unprivileged) user: status works and says the directory is read-only,
    instead of failing with "does not exist" (no aggregate.lock exists yet to open)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        os.chmod(top, 0o755)  # noqa: S103 - the other user must reach the directory
        readable = Path(top) / "shards"
        shutil.copytree(shard_dir, readable)
        for path in (readable, *readable.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        assert not (readable / "aggregate.lock").exists()
        before = sorted(os.listdir(readable))
        user = ATTACKER_UID if os.geteuid() == 0 else None
        if user is None:
            readable.chmod(0o555)
        proc = reaper.python(
            """
            import gatemetrics.cli, gettext, locale, logging
            sys.exit(gatemetrics.cli.main(sys.argv[1:]))
            """,
            "status",
            "--dir",
            str(readable),
            user=user,
        )
        out, err = proc.communicate(timeout=60)
        after = sorted(os.listdir(readable))
        readable.chmod(0o755)
    assert proc.returncode == 0, err
    assert "does not exist" not in out + err
    assert re.search(r"^access +read-only for this user", out, re.M)
    assert "shards      0 live, 2 dead" in out
    assert after == before


def test_a_run_that_only_reads_never_queues_behind_a_scrape(shard_dir: Path) -> None:
    # A scrape (read_dir) holds the directory's flock and aggregate.lock shared.
    dir_fd = os.open(shard_dir, os.O_RDONLY | os.O_DIRECTORY)
    lock_fd = os.open(shard_dir / "aggregate.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_SH)
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        for command in (("aggregate", "--no-compact"), ("status",)):
            result = run_cli(*command, "--dir", str(shard_dir), "--lock-timeout", "0")
            assert result.returncode == 0, (command, result.stderr)
        # A compaction needs the lock to itself: it waits, then gives up.
        result = run_cli("aggregate", "--dir", str(shard_dir), "--lock-timeout", "0.1")
        assert result.returncode == 75
    finally:
        os.close(lock_fd)
        os.close(dir_fd)
