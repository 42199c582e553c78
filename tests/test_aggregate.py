"""Tests of gatemetrics.aggregate: merging, compaction, crash safety, hostile files."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from filelock import FileLock
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import gatemetrics.aggregate as aggregate_module
from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA, GateMetricStore
from gatemetrics import (
    MAX_COUNT,
    Identity,
    LockTimeoutError,
    SchemaError,
    Shard,
    ShardWriteError,
    _faults,
    aggregate_dir,
    new_identity,
    shard_for,
)
from gatemetrics.aggregate import COMPACT_STEPS, MAX_SHARD_BYTES, QUARANTINE_DIR, Aggregate
from gatemetrics.shards import SAVE_STEPS
from tests.exposition_parser import parse
from tests.processes import Reaper, run_python
from tests.shard_tools import AGGREGATE_SERIES, REASONS, dead_shard, in_forked_child


def agg(directory: Path, *, compact: bool = False, **kwargs: Any) -> Aggregate:
    return aggregate_dir(
        directory, GATE_SCHEMA, namespace=GATE_NAMESPACE, compact=compact, **kwargs
    )


def decisions(directory: Path) -> dict[str, int]:
    return agg(directory).snapshot().family("decision_counts")


def assert_bounded(result: Aggregate) -> None:
    """Invariant 1: only declared series, each family once, in the documented order."""
    families = parse(result.render_prometheus())
    assert list(families) == list(AGGREGATE_SERIES)
    for name, fam in families.items():
        assert set(fam.samples) == AGGREGATE_SERIES[name]


@pytest.fixture
def live() -> Iterator[Callable[[Path, int], GateMetricStore]]:
    """Stores of this live test process bound to a directory; closed at teardown."""
    bindings = []

    def make(directory: Path, allows: int) -> GateMetricStore:
        store = GateMetricStore()
        bindings.append(store.bind_to_dir(directory))
        for _ in range(allows):
            store.record_decision(True)
        return store

    yield make
    for binding in bindings:
        binding.close()


def shard_names(directory: Path) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.startswith("shard-"))


# -- merging ---------------------------------------------------------------------------------


def test_an_empty_directory_aggregates_to_zero_with_every_series(tmp_path: Path) -> None:
    result = agg(tmp_path)
    assert result.counts == tuple(GATE_SCHEMA.zeros())
    assert (result.live, result.dead, result.quarantined_total, result.files_read) == (0, 0, 0, 0)
    assert_bounded(result)
    assert not result.archive.exists


def test_unusable_directories_raise_os_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        agg(tmp_path / "missing")
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        agg(tmp_path / "f")


@pytest.mark.parametrize("namespace", ["", "bad-name", "9lives"])
def test_a_bad_namespace_is_a_schema_error(tmp_path: Path, namespace: str) -> None:
    with pytest.raises(SchemaError):
        aggregate_dir(tmp_path, GATE_SCHEMA, namespace=namespace)


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_a_bad_lock_timeout_is_a_value_error(tmp_path: Path, timeout: float) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        agg(tmp_path, lock_timeout=timeout)


def test_a_held_directory_lock_times_out(tmp_path: Path) -> None:
    lock = FileLock(str(tmp_path / "aggregate.lock"), thread_local=False)
    with lock, pytest.raises(LockTimeoutError) as err:
        agg(tmp_path, lock_timeout=0.05)
    assert err.value.path == str(tmp_path / "aggregate.lock")
    assert err.value.timeout == 0.05
    assert isinstance(err.value, TimeoutError)
    assert decisions(tmp_path) == {"ALLOW": 0, "DENY": 0}  # free again


def test_live_and_dead_shards_and_the_archive_are_summed(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    dead_shard(tmp_path, allows=2, denies=1)
    agg(tmp_path, compact=True)  # into the archive
    dead_shard(tmp_path, allows=3)
    live(tmp_path, 4)
    result = agg(tmp_path)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 9, "DENY": 1}
    assert result.snapshot().get("reason_counts", "OPS_GATE_FAIL") == 1
    assert (result.live, result.dead) == (1, 1)
    assert result.files_read == 3
    assert result.archive.exists
    assert result.archive.absorbed_total == 1
    assert_bounded(result)


def test_equal_counts_give_byte_identical_output_whatever_the_split(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    dead_shard(one, allows=6, denies=3)
    for allows, denies in [(1, 0), (2, 2), (3, 1)]:
        dead_shard(two, allows, denies)
    first, second = agg(one), agg(two)
    assert first.counts == second.counts
    text = first.render_prometheus().replace('dead"} 1', 'dead"} 3')
    assert text == second.render_prometheus()
    agg(one, compact=True)
    agg(two, compact=True)
    assert agg(one).render_prometheus() == agg(two).render_prometheus()
    assert agg(one).render_json() == agg(two).render_json()


# -- compaction ------------------------------------------------------------------------------


def test_compaction_folds_dead_shards_into_the_archive_and_keeps_live_ones(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    for n in range(1, 4):
        dead_shard(tmp_path, allows=n)
    store = live(tmp_path, 10)
    live_inc = shard_for(store, tmp_path).identity
    assert live_inc is not None
    # A live writer mid-save (its temp file) and a dead one's orphan temp file.
    (tmp_path / f"shard-{live_inc.incarnation}.tmp").write_text("half written")
    dead_tmp = f"shard-{new_identity().incarnation}.tmp"
    (tmp_path / dead_tmp).write_text("orphan")
    # A lock file whose owner died before its first save.
    orphan_lock = f"shard-{new_identity().incarnation}.lock"
    (tmp_path / orphan_lock).write_text("")
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 16, "DENY": 0}
    assert (result.live, result.dead) == (1, 3)
    assert result.compaction is not None
    assert result.compaction.absorbed == 3
    assert result.compaction.removed_shards == 3
    assert result.compaction.removed_temp_files == 1
    assert result.compaction.removed_lock_files == 4
    inc = live_inc.incarnation
    assert shard_names(tmp_path) == [f"shard-{inc}.json", f"shard-{inc}.lock", f"shard-{inc}.tmp"]
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert archive["absorbed"] == []  # pruned: their files are gone
    assert archive["absorbed_total"] == 3
    assert archive["counts"]["decision_counts"] == {"ALLOW": 6, "DENY": 0}
    mtime = (tmp_path / "archive.json").stat().st_mtime_ns
    again = agg(tmp_path, compact=True)
    assert again.counts == result.counts
    assert again.compaction is not None
    assert again.compaction.absorbed == 0
    assert (tmp_path / "archive.json").stat().st_mtime_ns == mtime  # nothing to rewrite


def test_a_shard_the_archive_already_absorbed_is_never_counted_again(tmp_path: Path) -> None:
    """The crash window between writing the archive and deleting the shard."""
    name = dead_shard(tmp_path, allows=5)
    kept = (tmp_path / name).read_bytes()
    agg(tmp_path, compact=True)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    inc = name.removeprefix("shard-").removesuffix(".json")
    archive["absorbed"] = [inc]  # as written in step 1, before the deletions
    (tmp_path / "archive.json").write_bytes(orjson.dumps(archive))
    (tmp_path / name).write_bytes(kept)
    result = agg(tmp_path)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 5, "DENY": 0}
    assert [s.action for s in result.shards] == ["absorbed"]
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 5, "DENY": 0}
    assert shard_names(tmp_path) == []
    assert orjson.loads((tmp_path / "archive.json").read_bytes())["absorbed"] == []


def test_a_thousand_dead_incarnations_compact_to_one_archive(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    for i in range(1000):
        store = GateMetricStore()
        store.record_outcome(i % 2 == 0, ["NO_DRIFT_DATA"])
        shard = shard_for(store, tmp_path, durability="none")
        assert shard.save()
        shard.close(save=False)
    live(tmp_path, 1)
    live(tmp_path, 2)
    result = agg(tmp_path, compact=True)
    assert (result.live, result.dead) == (2, 1000)
    assert result.files_read == 1002
    expected = {"ALLOW": 503, "DENY": 500}
    assert result.snapshot().family("decision_counts") == expected
    assert len(shard_names(tmp_path)) == 4  # two live shards and their locks
    assert sorted(set(os.listdir(tmp_path)) - set(shard_names(tmp_path))) == [
        "aggregate.lock",
        "archive.json",
    ]
    assert (tmp_path / "archive.json").stat().st_size < 2000  # the ids were pruned
    after = agg(tmp_path)
    assert after.files_read == 3  # the archive and one shard per live process
    assert after.snapshot().family("decision_counts") == expected
    assert after.archive.absorbed_total == 1000


def test_compaction_never_removes_anything_when_the_archive_cannot_be_written(
    tmp_path: Path,
) -> None:
    dead_shard(tmp_path, allows=2)
    before = sorted(os.listdir(tmp_path))
    (tmp_path / "archive.json.tmp").mkdir()  # the archive's temp path is unusable
    with pytest.raises(ShardWriteError, match="cannot write the archive"):
        agg(tmp_path, compact=True)
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "aggregate.lock", "archive.json.tmp"])
    (tmp_path / "archive.json.tmp").rmdir()
    assert decisions(tmp_path) == {"ALLOW": 2, "DENY": 0}


# -- hostile and broken files: each costs only itself -------------------------------------------


def _valid_doc(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    name = dead_shard(tmp_path, allows=1)
    doc = orjson.loads((tmp_path / name).read_bytes())
    (tmp_path / name).unlink()
    return name, doc


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _doc(mutate: Callable[[dict[str, Any]], None]) -> Callable[[Path, str, dict[str, Any]], None]:
    def make(path: Path, _name: str, doc: dict[str, Any]) -> None:
        mutate(doc)
        _write(path, orjson.dumps(doc))

    return make


def _raw(data: bytes) -> Callable[[Path, str, dict[str, Any]], None]:
    return lambda path, _name, _doc: _write(path, data)


def _copied(path: Path, name: str, doc: dict[str, Any]) -> None:
    _write(path, orjson.dumps(doc))  # the original incarnation's content under another name


def _symlink(path: Path, name: str, doc: dict[str, Any]) -> None:
    target = path.parent / name  # a valid shard of another (dead) incarnation
    _write(target, orjson.dumps(doc))
    path.symlink_to(target)


def _huge(path: Path, _name: str, _doc: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        f.truncate(2**31)  # sparse: 2 GiB that must never be read into memory


HOSTILE: dict[str, Callable[[Path, str, dict[str, Any]], None]] = {
    "truncated": lambda path, name, doc: _write(path, orjson.dumps(doc)[:40]),
    "empty": _raw(b""),
    "not-json": _raw(b"release_gate_decision_total 5\n"),
    "not-utf8": _raw(b'{"format": "\xff\xfe"}'),
    "nan": lambda path, name, doc: _write(
        path, orjson.dumps(doc).replace(b'"ALLOW":1', b'"ALLOW":NaN')
    ),
    "json-array": _raw(b"[1, 2, 3]"),
    "huge": _huge,
    "negative-count": _doc(lambda d: d["counts"]["decision_counts"].update(ALLOW=-5)),
    "float-count": _doc(lambda d: d["counts"]["decision_counts"].update(ALLOW=1.5)),
    "bool-count": _doc(lambda d: d["counts"]["decision_counts"].update(ALLOW=True)),
    "string-count": _doc(lambda d: d["counts"].update(audit_write_failures="7")),
    "overflowing-count": _doc(lambda d: d["counts"].update(audit_write_failures=MAX_COUNT + 1)),
    "wrongly-typed-family": _doc(lambda d: d["counts"].update(reason_counts=[1, 2])),
    "unknown-family": _doc(lambda d: d["counts"].update(evil_counts={"x": 1})),
    "unknown-label-value": _doc(lambda d: d["counts"]["decision_counts"].update(MAYBE=1)),
    "label-injection": _doc(
        lambda d: d["counts"]["reason_counts"].update(
            {'TIER_FAIL"} 1\nrelease_gate_decision_total{decision="ALLOW': 1000}
        )
    ),
    "missing-field": _doc(lambda d: d.pop("saved_at")),
    "extra-field": _doc(lambda d: d.update(evil=1)),
    "wrong-format": _doc(lambda d: d.update(format="prometheus-mmap")),
    "future-version": _doc(lambda d: d.update(version=2)),
    "wrong-pid": _doc(lambda d: d.update(pid="1234")),
    "nan-timestamp-as-string": _doc(lambda d: d.update(saved_at="NaN")),
    "negative-timestamp": _doc(lambda d: d["counts"].update(store_start_timestamp=-1.0)),
    "copied-shard": _copied,
    "symlink": _symlink,
    "directory": lambda path, name, doc: path.mkdir(),
    "fifo": lambda path, name, doc: os.mkfifo(path),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_shard_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    good = dead_shard(tmp_path, allows=2, denies=1)
    source, doc = _valid_doc(tmp_path)
    bad = f"shard-{new_identity().incarnation}.json"
    HOSTILE[case](tmp_path / bad, source, doc)
    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path)
    # The good shard still counts, the bad one does not, nothing out of schema appears.
    expected = {"ALLOW": 2 + int(case == "symlink"), "DENY": 1}
    assert result.snapshot().family("decision_counts") == expected
    assert result.quarantined_total == 1
    assert_bounded(result)
    lines = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"skipped {bad} (compaction will quarantine it): ")
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == expected
    assert result.quarantined_total == 1
    lines = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"quarantined {bad}: ")
    assert bad not in os.listdir(tmp_path)
    (moved,) = os.listdir(tmp_path / QUARANTINE_DIR)
    assert moved.startswith(f"{bad}.")
    assert good not in os.listdir(tmp_path)  # absorbed as usual

    later = agg(tmp_path)
    assert later.quarantined_total == 1  # persisted in the archive, never decreasing
    assert later.snapshot().family("decision_counts") == expected
    assert_bounded(later)


def test_a_file_with_a_hostile_name_is_quarantined(tmp_path: Path) -> None:
    dead_shard(tmp_path, allows=1)
    for name in ["shard-evil.json", "shard-.lock", "shard-x.json.bak"]:
        (tmp_path / name).write_text("{}")
    (tmp_path / "notes.txt").write_text("ignored: not ours")
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 3
    assert sorted(n.rsplit(".", 1)[0] for n in os.listdir(tmp_path / QUARANTINE_DIR)) == [
        "shard-.lock",
        "shard-evil.json",
        "shard-x.json.bak",
    ]
    assert (tmp_path / "notes.txt").exists()
    assert decisions(tmp_path) == {"ALLOW": 1, "DENY": 0}


def test_an_unreadable_shard_is_quarantined(tmp_path: Path, reaper: Reaper) -> None:
    # Real EACCES: as root, run the aggregator as an unprivileged user (after its imports).
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        directory = Path(top) / "shards"
        directory.mkdir()
        dead_shard(directory, allows=3)
        _, doc = _valid_doc(directory)
        bad = directory / f"shard-{new_identity().incarnation}.json"
        bad.write_bytes(orjson.dumps(doc))
        bad.chmod(0)
        for path in (Path(top), directory, *directory.iterdir()):
            if path != bad:
                path.chmod(0o777 if path.is_dir() else 0o666)
        drop = "os.setgroups([]); os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else ""
        code, out, err = run_python(
            reaper,
            f"""
            import backend.app.testing.gate_metrics as g, gatemetrics.aggregate as a
            import gatemetrics.shards, gatemetrics.exposition, orjson, logging
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            {drop}
            r = a.aggregate_dir(sys.argv[1], g.GATE_SCHEMA, namespace="release_gate", compact=True)
            print(r.snapshot().get("decision_counts", "ALLOW"), r.quarantined_total)
            """,
            str(directory),
        )
        assert code == 0, err
        assert out.split() == ["3", "1"]
        assert f"quarantined {bad.name}: cannot be read: Permission denied" in err
        assert not bad.exists()


def test_a_live_owners_broken_shard_is_skipped_not_quarantined(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore], caplog: pytest.LogCaptureFixture
) -> None:
    store = live(tmp_path, 3)
    path = shard_for(store, tmp_path).path
    assert path is not None
    Path(path).write_bytes(b"{ torn")
    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 0
    assert [s.action for s in result.shards] == ["skipped"]
    assert result.live == 1
    assert Path(path).exists()  # its owner rewrites it; moving it could lose a fresh save
    assert any("its owner is alive" in r.getMessage() for r in caplog.records)
    store.record_decision(True)  # the next save repairs it
    assert decisions(tmp_path) == {"ALLOW": 4, "DENY": 0}


@pytest.mark.parametrize(
    "content", [b"", b"{ not json", b"[]", b'{"format": "gatemetrics-archive"}', b"\xff"]
)
def test_a_broken_archive_is_quarantined_and_its_totals_lost(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    dead_shard(tmp_path, allows=5)
    agg(tmp_path, compact=True)
    dead_shard(tmp_path, allows=2)
    (tmp_path / "archive.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="gatemetrics"):
        result = agg(tmp_path)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 2, "DENY": 0}
    assert result.quarantined_total == 1
    assert any("its totals are lost" in r.getMessage() for r in caplog.records)
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 1
    assert [n.split(".")[0] for n in os.listdir(tmp_path / QUARANTINE_DIR)] == ["archive"]
    after = agg(tmp_path)
    assert after.snapshot().family("decision_counts") == {"ALLOW": 2, "DENY": 0}
    assert after.quarantined_total == 1
    assert after.archive.problem is None


def test_an_archive_of_another_schema_stops_the_run_and_changes_nothing(tmp_path: Path) -> None:
    dead_shard(tmp_path, allows=5)
    agg(tmp_path, compact=True)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    archive["counts"]["jobs"] = {"a": 1}
    (tmp_path / "archive.json").write_bytes(orjson.dumps(archive))
    dead_shard(tmp_path, allows=1)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SchemaError, match="another schema"):
        agg(tmp_path, compact=True)
    assert sorted(os.listdir(tmp_path)) == before


def test_the_quarantine_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate_module, "QUARANTINE_KEEP", 3)
    for round_ in range(3):
        for i in range(2):
            (tmp_path / f"shard-bad{round_}{i}.json").write_text("x")
        agg(tmp_path, compact=True)
    assert len(os.listdir(tmp_path / QUARANTINE_DIR)) == 3
    assert agg(tmp_path).quarantined_total == 6
    (tmp_path / QUARANTINE_DIR / "shard-dir.json.1").mkdir()  # an old quarantined directory
    (tmp_path / "shard-bad-last.json").write_text("x")
    agg(tmp_path, compact=True)
    assert len(os.listdir(tmp_path / QUARANTINE_DIR)) == 3


def test_a_quarantine_that_is_a_symlink_is_never_used(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / QUARANTINE_DIR).symlink_to(elsewhere)
    (shards / "shard-bad.json").write_text("x")
    result = agg(shards, compact=True)
    assert result.quarantined_total == 1
    assert os.listdir(elsewhere) == []
    assert (shards / "shard-bad.json").exists()
    assert agg(shards, compact=True).quarantined_total == 1  # counted once, not per run


def test_counts_that_would_overflow_the_aggregate_are_quarantined(tmp_path: Path) -> None:
    for _ in range(2):
        store = GateMetricStore()
        store.increment("audit_write_failures", None, MAX_COUNT - 10)
        shard = shard_for(store, tmp_path)
        assert shard.save()
        shard.close(save=False)
    result = agg(tmp_path)
    assert result.snapshot().get("audit_write_failures") == MAX_COUNT - 10
    assert result.quarantined_total == 1
    assert_bounded(result)


def test_a_shard_vanishing_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = dead_shard(tmp_path, allows=1)
    real_open = os.open

    def vanishing_open(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(name):
            raise FileNotFoundError(errno.ENOENT, "gone", path)
        return real_open(path, flags, *args)

    # A file removed between listing and opening (only a process breaking the protocol can do
    # that under the directory lock); forcing the interleaving needs the open to fail here.
    monkeypatch.setattr(aggregate_module.os, "open", vanishing_open)
    result = agg(tmp_path)
    assert result.counts == tuple(GATE_SCHEMA.zeros())
    assert [s.problem for s in result.shards] == ["vanished while being read"]


def test_max_shard_bytes_is_generous_for_real_shards(tmp_path: Path) -> None:
    store = GateMetricStore()
    store.increment("decision_counts", "ALLOW", MAX_COUNT)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    assert shard.path is not None
    name = os.path.basename(shard.path)
    shard.close(save=False)
    assert (tmp_path / name).stat().st_size < MAX_SHARD_BYTES // 100


# -- crash points: a real SIGKILL at every step of a compaction ---------------------------------

_CRASH_CASES = [(step, 0) for step in COMPACT_STEPS] + [
    ("compact.shard_deleted", 1),
    ("compact.lock_deleted", 2),
    ("compact.quarantined", 1),
]


@pytest.mark.parametrize(("step", "skip"), _CRASH_CASES)
def test_a_compaction_killed_at_any_step_leaves_an_exact_directory(
    tmp_path: Path,
    reaper: Reaper,
    live: Callable[[Path, int], GateMetricStore],
    step: str,
    skip: int,
) -> None:
    for n in (1, 2, 4):
        dead_shard(tmp_path, allows=n, denies=1)
    (tmp_path / f"shard-{new_identity().incarnation}.tmp").write_text("orphan")
    (tmp_path / f"shard-{new_identity().incarnation}.lock").write_text("")
    (tmp_path / "shard-hostile-1.json").write_text("x")
    (tmp_path / "shard-hostile-2.json").write_text("y")
    live(tmp_path, 8)
    expected = {"ALLOW": 15, "DENY": 3}
    assert decisions(tmp_path) == expected

    code, out, err = run_python(
        reaper,
        """
        import backend.app.testing.gate_metrics as g, gatemetrics.aggregate as a
        _faults.install_kill_at(sys.argv[2], skip=int(sys.argv[3]))
        a.aggregate_dir(sys.argv[1], g.GATE_SCHEMA, namespace="release_gate", compact=True)
        print("not killed", flush=True)
        """,
        str(tmp_path),
        step,
        str(skip),
    )
    assert code == -signal.SIGKILL, out + err  # the step was reached and the kill was real

    result = agg(tmp_path)  # whatever the step: exact, no double count, nothing lost
    assert result.snapshot().family("decision_counts") == expected
    assert result.quarantined_total == 2
    assert_bounded(result)
    result = agg(tmp_path, compact=True)  # the next compaction finishes the job
    assert result.snapshot().family("decision_counts") == expected
    assert result.quarantined_total == 2
    assert len(shard_names(tmp_path)) == 2  # the live shard and its lock
    assert "archive.json.tmp" not in os.listdir(tmp_path)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert archive["absorbed"] == []
    assert archive["quarantining"] == []
    assert archive["absorbed_total"] == 3
    assert decisions(tmp_path) == expected


# -- hostile environments --------------------------------------------------------------------


def test_a_crash_hook_that_raises_midway_is_a_crash_not_an_error(tmp_path: Path) -> None:
    dead_shard(tmp_path, allows=3)

    def hook(step: str) -> None:
        if step == "archive.replaced":
            raise _faults.SimulatedCrash(step)

    _faults.HOOK = hook
    try:
        with pytest.raises(_faults.SimulatedCrash):
            agg(tmp_path, compact=True)
    finally:
        _faults.HOOK = None
    assert decisions(tmp_path) == {"ALLOW": 3, "DENY": 0}
    assert agg(tmp_path, compact=True).snapshot().family("decision_counts") == {
        "ALLOW": 3,
        "DENY": 0,
    }
    shutil.rmtree(tmp_path / QUARANTINE_DIR, ignore_errors=True)


# -- the model: a RuleBasedStateMachine over real files -----------------------------------------


reason_lists = st.lists(st.sampled_from(list(REASONS)), max_size=3)


class _Proc:
    """One modelled process incarnation: a store, its shard, and what it last saved."""

    def __init__(self, directory: Path, pid: int) -> None:
        def identity() -> Identity:
            ns = time.time_ns()
            return Identity(f"00000000-{pid}-{ns:x}-{secrets.token_hex(8)}", pid, "model", 0.0)

        self.pid = pid
        self.store = GateMetricStore()
        self.shard = Shard(self.store, directory, durability="none", identity_factory=identity)
        self.saved = [0] * GATE_SCHEMA.size
        self.has_file = False  # whether its current incarnation's shard exists

    def counts(self) -> list[int]:
        return list(self.store.snapshot().counts)

    def die(self) -> None:
        """SIGKILL in-process: the kernel drops the lock, nothing else happens."""
        lock, self.shard._lock = self.shard._lock, None
        self.shard._identity = None
        if lock is not None:
            lock.release()


class ShardDirectoryMachine(RuleBasedStateMachine):
    """Processes record, save, fork, die and get their pids reused; aggregators run and crash.

    After every step the read-only aggregate equals the model (the sum of what every
    incarnation last saved), never decreases, and carries only the declared series.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gm-model-"))
        self.live: list[_Proc] = []
        self.dead_total = [0] * GATE_SCHEMA.size
        self.dead_pids: list[int] = []
        self.next_pid = 100_000
        self.quarantined = 0
        self.last = [0] * GATE_SCHEMA.size
        self.forks = 0

    def teardown(self) -> None:
        _faults.HOOK = None
        for proc in self.live:
            proc.die()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pick(self, i: int) -> _Proc:
        return self.live[i % len(self.live)]

    def _bury(self, proc: _Proc) -> None:
        self.live.remove(proc)
        self.dead_pids.append(proc.pid)
        self.dead_total = [a + b for a, b in zip(self.dead_total, proc.saved, strict=True)]

    @precondition(lambda self: len(self.live) < 4)
    @rule(reuse=st.booleans())
    def start(self, reuse: bool) -> None:
        if reuse and self.dead_pids:
            pid = self.dead_pids[-1]  # pid reuse: same pid, a new incarnation
        else:
            self.next_pid += 1
            pid = self.next_pid
        self.live.append(_Proc(self.dir, pid))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9), calls=st.lists(st.tuples(st.booleans(), reason_lists), max_size=4))
    def record(self, i: int, calls: list[tuple[bool, list[str]]]) -> None:
        proc = self._pick(i)
        for allowed, reasons in calls:
            proc.store.record_outcome(allowed, reasons, breach=len(reasons) == 3)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def save(self, i: int) -> None:
        proc = self._pick(i)
        assert proc.shard.save()
        proc.saved = proc.counts()
        proc.has_file = True

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9), step=st.sampled_from(SAVE_STEPS))
    def crash_while_saving(self, i: int, step: str) -> None:
        proc = self._pick(i)
        _faults.HOOK = _crash_at(step, 0)
        try:
            with pytest.raises(_faults.SimulatedCrash):
                proc.shard.save()
        finally:
            _faults.HOOK = None
        if step in ("save.replaced", "save.done"):
            proc.saved = proc.counts()
        proc.die()
        self._bury(proc)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def exit_gracefully(self, i: int) -> None:
        proc = self._pick(i)
        assert proc.shard.close(save=True)
        proc.saved = proc.counts()
        self._bury(proc)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def sigkill(self, i: int) -> None:
        proc = self._pick(i)
        proc.die()
        self._bury(proc)

    @precondition(lambda self: self.live and self.forks < 2)
    @rule(i=st.integers(0, 9), allows=st.integers(0, 3), denies=st.integers(0, 3))
    def fork(self, i: int, allows: int, denies: int) -> None:
        """A real fork: the child counts from zero as a new incarnation; the parent keeps its."""
        self.forks += 1
        proc = self._pick(i)
        before = proc.counts()

        def child() -> bool:
            zero = not any(proc.counts())
            for _ in range(allows):
                proc.store.record_decision(True)
            for _ in range(denies):
                proc.store.record_decision(False, ["NO_FLAKE_DATA"])
            return proc.shard.save() and zero

        assert in_forked_child(child)
        assert proc.counts() == before
        child = GateMetricStore()
        for _ in range(allows):
            child.record_decision(True)
        for _ in range(denies):
            child.record_decision(False, ["NO_FLAKE_DATA"])
        counts = child.snapshot().counts
        self.dead_total = [a + b for a, b in zip(self.dead_total, counts, strict=True)]

    @rule()
    def compact(self) -> None:
        agg(self.dir, compact=True)

    @rule(step=st.sampled_from(COMPACT_STEPS), skip=st.integers(0, 2))
    def crash_while_compacting(self, step: str, skip: int) -> None:
        _faults.HOOK = _crash_at(step, skip)
        try:
            agg(self.dir, compact=True)  # the step may not come up: then it just completes
        except _faults.SimulatedCrash:
            pass
        finally:
            _faults.HOOK = None

    @rule(kind=st.sampled_from(["garbage", "name", "injection", "directory"]))
    def hostile_file(self, kind: str) -> None:
        name = f"shard-{new_identity().incarnation}.json"
        path = self.dir / name
        if kind == "garbage":
            path.write_bytes(b"\x00\xff{")
        elif kind == "name":
            (self.dir / f"shard-{secrets.token_hex(4)}.json").write_text("{}")
        elif kind == "injection":
            doc = {"counts": {"decision_counts": {'ALLOW"} 9\nx{y="': 1}}}
            path.write_bytes(orjson.dumps(doc))
        else:
            path.mkdir()
        self.quarantined += 1

    @invariant()
    def aggregate_equals_the_model(self) -> None:
        result = agg(self.dir)
        expected = list(self.dead_total)
        for proc in self.live:
            expected = [a + b for a, b in zip(expected, proc.saved, strict=True)]
        assert list(result.counts) == expected
        assert all(n >= o for n, o in zip(result.counts, self.last, strict=True))
        self.last = list(result.counts)
        assert result.quarantined_total == self.quarantined
        assert result.live == sum(1 for p in self.live if p.has_file)
        assert_bounded(result)


def _crash_at(step: str, skip: int) -> Callable[[str], None]:
    remaining = [skip]

    def hook(name: str) -> None:
        if name == step:
            if remaining[0] == 0:
                raise _faults.SimulatedCrash(name)
            remaining[0] -= 1

    return hook


TestAggregateEqualsTheModelAfterEveryStep = ShardDirectoryMachine.TestCase


# -- real processes, real signals, concurrent aggregators ------------------------------------------

_WRITER = """
from backend.app.testing.gate_metrics import GateMetricStore
directory, reason, count, kill_step, kill_skip = sys.argv[1:6]
store = GateMetricStore()
store.bind_to_dir(directory)
if kill_step:
    _faults.install_kill_at(kill_step, skip=int(kill_skip))
for i in range(int(count)):
    store.record_decision(False, [reason])
    print(i + 1, flush=True)
"""

_AGGREGATOR = """
import orjson
import backend.app.testing.gate_metrics as g
from gatemetrics.aggregate import aggregate_dir
directory, stop, compact = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
while True:
    done = os.path.exists(stop)
    r = aggregate_dir(directory, g.GATE_SCHEMA, namespace="release_gate", compact=compact)
    print(orjson.dumps(r.counts).decode(), flush=True)
    if done:
        break
"""


def test_concurrent_writers_killed_mid_save_and_concurrent_aggregators_stay_exact(
    tmp_path: Path, reaper: Reaper
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    stop = tmp_path / "stop"
    per_writer = 300
    # (reason, SIGKILL itself at this save step after this many saves) -- exact by construction
    self_killed = [("TIER_FAIL", "save.tmp_written", 120), ("FLAKY_TESTS", "save.replaced", 80)]
    completing = ["DRIFT_ALERT", "CANARY_BREAKING"]
    victim_reason = "NO_TIER_DATA"  # SIGKILLed by us at a random moment, mid-save most likely
    writers = {
        reason: reaper.python(_WRITER, str(shards), reason, str(per_writer), step, str(skip))
        for reason, step, skip in self_killed
    }
    for reason in [*completing, victim_reason]:
        writers[reason] = reaper.python(_WRITER, str(shards), reason, str(per_writer), "", "0")
    aggregators = [
        reaper.python(_AGGREGATOR, str(shards), str(stop), compact) for compact in ("1", "0", "1")
    ]
    victim = writers[victim_reason]
    assert victim.stdout is not None
    read = [victim.stdout.readline() for _ in range(40 + secrets.randbelow(60))]
    os.kill(victim.pid, signal.SIGKILL)
    outputs = {reason: proc.communicate(timeout=60) for reason, proc in writers.items()}
    stop.touch()
    for reason, _step, _skip in self_killed:
        assert writers[reason].returncode == -signal.SIGKILL, outputs[reason][1]
    for reason in completing:
        assert writers[reason].returncode == 0, outputs[reason][1]
    assert victim.returncode == -signal.SIGKILL
    acked = len(read) + len(outputs[victim_reason][0].split())

    series: list[list[tuple[int, ...]]] = []
    for proc in aggregators:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        series.append([tuple(orjson.loads(line)) for line in out.splitlines()])
    for runs in series:  # every aggregator saw totals that never went down
        assert len(runs) >= 2
        for before, after in itertools.pairwise(runs):
            assert all(a >= b for a, b in zip(after, before, strict=True))

    final = agg(shards, compact=True).snapshot()
    reasons = final.family("reason_counts")
    assert reasons["TIER_FAIL"] == 120  # killed during save 121, before its rename
    assert reasons["FLAKY_TESTS"] == 81  # killed during save 81, after its rename
    assert reasons["DRIFT_ALERT"] == reasons["CANARY_BREAKING"] == per_writer
    assert acked <= reasons[victim_reason] <= acked + 1  # printed only after it returned
    assert final.get("decision_counts", "DENY") == sum(reasons.values())
    assert shard_names(shards) == []  # every writer is dead and compacted away
