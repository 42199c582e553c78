"""Tests of gatemetrics.aggregate: merging, compaction, crash safety, hostile files.

Shards are written the way each release writes them: format v2 by this release's
:class:`~gatemetrics.Shard`, format v1 by :class:`tests.shard_tools.LegacyV1Shard` (the previous
release's writer, byte for byte). Hostile files are built from real shards of either format.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import logging
import os
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from filelock import FileLock
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import gatemetrics.aggregate as aggregate_module
from backend.app.testing.gate_metrics import GATE_NAMESPACE, GATE_SCHEMA, GateMetricStore
from gatemetrics import (
    MAX_COUNT,
    CounterStore,
    Family,
    Identity,
    LockTimeoutError,
    Schema,
    SchemaError,
    Shard,
    ShardWriteError,
    _faults,
    aggregate_dir,
    new_identity,
    shard_for,
)
from gatemetrics._format import (
    REREADS,
    STABLE_READS,
    BadFile,
    Layout,
    decode_v2,
    decode_v2_slots,
    parse_name,
    v1_names,
    v2_names,
)
from gatemetrics.aggregate import COMPACT_STEPS, MAX_SHARD_BYTES, QUARANTINE_DIR, Aggregate
from gatemetrics.shards import CREATE_STEPS, SAVE_STEPS
from tests.exposition_parser import parse
from tests.processes import Attacker, Reaper, read_line, run_python
from tests.shard_tools import (
    AGGREGATE_SERIES,
    LEGACY_V1_SAVE_STEPS,
    REASONS,
    LegacyV1Shard,
    dead_shard,
    dead_v1_shard,
    in_forked_child,
    is_locked,
    legacy_bind,
)


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
    """Stores of this live test process bound to a directory (format v2); closed at teardown."""
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


@pytest.fixture
def live_v1() -> Iterator[Callable[[Path, int], LegacyV1Shard]]:
    """Previous-release owners living in this test process (format v1, write-through)."""
    shards: list[LegacyV1Shard] = []

    def make(directory: Path, allows: int) -> LegacyV1Shard:
        store = GateMetricStore()
        shard = legacy_bind(store, directory, durability="none")
        shards.append(shard)
        for _ in range(allows):
            store.record_decision(True)
        return shard

    yield make
    for shard in shards:
        shard.store.set_change_hook(None)
        shard.close(save=False)


def shard_names(directory: Path) -> list[str]:
    """Every file of the shard family in ``directory``: v1 (``shard-``) and v2 (``v2-``)."""
    return sorted(p for p in os.listdir(directory) if p.startswith(("shard-", "v2-")))


def incarnation_of(name: str) -> str:
    parsed = parse_name(name)
    assert parsed is not None, name
    return parsed[0]


def live_v2_name(store: GateMetricStore, directory: Path) -> str:
    path = shard_for(store, directory).path
    assert path is not None
    return os.path.basename(path)


def test_the_shard_names_helper_sees_both_formats(tmp_path: Path) -> None:
    v2 = dead_shard(tmp_path)
    v1 = dead_v1_shard(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    assert v2 == v2_names(incarnation_of(v2))[0]
    assert shard_names(tmp_path) == sorted([v2, v1, v1_names(incarnation_of(v1))[1]])


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


def test_live_and_dead_shards_of_both_formats_and_the_archive_are_summed(
    tmp_path: Path,
    live: Callable[[Path, int], GateMetricStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
) -> None:
    dead_shard(tmp_path, allows=2, denies=1)
    agg(tmp_path, compact=True)  # into the archive
    dead_v2 = dead_shard(tmp_path, allows=3)
    dead_v1 = dead_v1_shard(tmp_path, allows=5)
    live_v2 = live_v2_name(live(tmp_path, 4), tmp_path)
    old_owner = live_v1(tmp_path, 6)
    result = agg(tmp_path)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 20, "DENY": 1}
    assert result.snapshot().get("reason_counts", "OPS_GATE_FAIL") == 1
    assert (result.live, result.dead) == (2, 2)
    assert result.files_read == 5  # the archive and four shards
    assert result.archive.exists
    assert result.archive.absorbed_total == 1
    found = {s.name: (s.format, s.state, s.action) for s in result.shards}
    assert found == {
        dead_v2: (2, "dead", "counted"),
        dead_v1: (1, "dead", "counted"),
        live_v2: (2, "live", "counted"),
        old_owner.names()[0]: (1, "live", "counted"),
    }
    assert_bounded(result)


def test_equal_counts_give_byte_identical_output_whatever_the_split(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    dead_shard(one, allows=6, denies=3)
    dead_shard(two, 1, 0)
    dead_v1_shard(two, 2, 2)
    dead_shard(two, 3, 1)
    first, second = agg(one), agg(two)
    assert first.counts == second.counts
    text = first.render_prometheus().replace('dead"} 1', 'dead"} 3')
    assert text == second.render_prometheus()
    agg(one, compact=True)
    agg(two, compact=True)
    assert agg(one).render_prometheus() == agg(two).render_prometheus()
    assert agg(one).render_json() == agg(two).render_json()


# -- compaction ------------------------------------------------------------------------------


def test_compaction_folds_dead_shards_of_both_formats_and_keeps_live_ones_and_their_files(
    tmp_path: Path,
    live: Callable[[Path, int], GateMetricStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
) -> None:
    for n in range(1, 4):
        dead_shard(tmp_path, allows=n)
    for n in (4, 5):
        dead_v1_shard(tmp_path, allows=n)
    live_v2 = live_v2_name(live(tmp_path, 10), tmp_path)
    old_owner = live_v1(tmp_path, 20)
    v1_json, v1_lock, v1_tmp = old_owner.names()
    # A live v1 writer mid-save (its temp file) and a dead v1 writer's orphan temp file.
    (tmp_path / v1_tmp).write_text("half written")
    (tmp_path / v1_names(new_identity().incarnation)[2]).write_text("orphan")
    # A v1 lock file whose owner died before its first save.
    (tmp_path / v1_names(new_identity().incarnation)[1]).write_text("")
    # A v2 creator that died before its rename, and one creating right now (its flock held).
    (tmp_path / v2_names(new_identity().incarnation)[1]).write_bytes(b"\0" * 100)
    creating = v2_names(new_identity().incarnation)[1]
    creator = os.open(tmp_path / creating, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(creator, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = agg(tmp_path, compact=True)
        assert result.snapshot().family("decision_counts") == {"ALLOW": 45, "DENY": 0}
        assert (result.live, result.dead) == (2, 5)
        assert result.compaction is not None
        assert result.compaction.absorbed == 5
        assert result.compaction.removed_shards == 5
        assert result.compaction.removed_temp_files == 2  # the dead v1 .tmp, the dead .creating
        assert result.compaction.removed_lock_files == 3  # two dead v1 shards' and the orphan
        assert shard_names(tmp_path) == sorted([live_v2, v1_json, v1_lock, v1_tmp, creating])
    finally:
        os.close(creator)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert archive["absorbed"] == []  # pruned: their files are gone
    assert archive["absorbed_total"] == 5
    assert archive["counts"]["decision_counts"] == {"ALLOW": 15, "DENY": 0}
    mtime = (tmp_path / "archive.json").stat().st_mtime_ns
    again = agg(tmp_path, compact=True)
    assert again.counts == result.counts
    assert again.compaction is not None
    assert again.compaction.absorbed == 0
    assert again.compaction.removed_temp_files == 1  # the creator is gone now: an orphan
    assert (tmp_path / "archive.json").stat().st_mtime_ns == mtime  # nothing to rewrite


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_shard_the_archive_already_absorbed_is_never_counted_again(
    tmp_path: Path, fmt: int
) -> None:
    """The crash window between writing the archive and deleting the shard."""
    name = (dead_v1_shard if fmt == 1 else dead_shard)(tmp_path, allows=5)
    kept = (tmp_path / name).read_bytes()
    agg(tmp_path, compact=True)
    assert shard_names(tmp_path) == []
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    archive["absorbed"] = [incarnation_of(name)]  # as written in step 1, before the deletions
    (tmp_path / "archive.json").write_bytes(orjson.dumps(archive))
    (tmp_path / name).write_bytes(kept)
    result = agg(tmp_path)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 5, "DENY": 0}
    assert [(s.action, s.format) for s in result.shards] == [("absorbed", fmt)]
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 5, "DENY": 0}
    assert shard_names(tmp_path) == []
    assert orjson.loads((tmp_path / "archive.json").read_bytes())["absorbed"] == []


def _list_as_absorbed(directory: Path, incarnation: str) -> None:
    agg(directory, compact=True)  # an archive to edit
    archive = orjson.loads((directory / "archive.json").read_bytes())
    archive["absorbed"] = [incarnation]
    (directory / "archive.json").write_bytes(orjson.dumps(archive))


def test_liveness_beats_the_archive_for_a_v2_shard(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    """Absorbing needs the shard's own flock: an owner holding it was never absorbed."""
    dead_shard(tmp_path, allows=1)
    store = live(tmp_path, 3)
    name = live_v2_name(store, tmp_path)
    _list_as_absorbed(tmp_path, incarnation_of(name))
    for compact in (False, True, True):
        result = agg(tmp_path, compact=compact)
        assert result.snapshot().family("decision_counts") == {"ALLOW": 4, "DENY": 0}
        (report,) = result.shards
        assert (report.name, report.state, report.action) == (name, "live", "counted")
        assert (tmp_path / name).exists()  # never deleted while its owner lives
    store.record_decision(True)
    assert decisions(tmp_path) == {"ALLOW": 5, "DENY": 0}


def test_a_live_v2_shard_listed_as_absorbed_is_counted_once_after_its_owner_exits(
    tmp_path: Path,
) -> None:
    dead_shard(tmp_path, allows=1)
    store = GateMetricStore()
    binding = store.bind_to_dir(tmp_path)
    for _ in range(3):
        store.record_decision(True)
    name = live_v2_name(store, tmp_path)
    _list_as_absorbed(tmp_path, incarnation_of(name))
    assert agg(tmp_path, compact=True).snapshot().get("decision_counts", "ALLOW") == 4
    binding.close()
    result = agg(tmp_path, compact=True)  # invariant 3: never decreasing
    assert result.snapshot().family("decision_counts") == {"ALLOW": 4, "DENY": 0}
    assert decisions(tmp_path) == {"ALLOW": 4, "DENY": 0}


def test_a_thousand_dead_incarnations_of_both_formats_compact_to_one_archive(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    for i in range(1000):
        store = GateMetricStore()
        store.record_outcome(i % 2 == 0, ["NO_DRIFT_DATA"])
        if i % 10 == 0:  # one in ten from the previous release
            old = LegacyV1Shard(store, tmp_path, durability="none")
            old.save()
            old.close(save=False)
            continue
        shard = shard_for(store, tmp_path)
        assert shard.save()
        shard.close(save=False)
    live(tmp_path, 1)
    live(tmp_path, 2)
    assert len(shard_names(tmp_path)) == 900 + 200 + 2
    result = agg(tmp_path, compact=True)
    assert (result.live, result.dead) == (2, 1000)
    assert result.files_read == 1002
    expected = {"ALLOW": 503, "DENY": 500}
    assert result.snapshot().family("decision_counts") == expected
    assert len(shard_names(tmp_path)) == 2  # the two live v2 shards, nothing else
    assert sorted(set(os.listdir(tmp_path)) - set(shard_names(tmp_path))) == [
        "aggregate.lock",
        "archive.json",
        "schema.json",  # the schema the archive is laid out for (see recorded_schema)
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
    dead_v1_shard(tmp_path, allows=3)
    before = sorted(os.listdir(tmp_path))

    def disk_full(step: str) -> None:
        # A full disk cannot be made real here without mounting a file system (and root
        # ignores permissions): the write fails the way ENOSPC makes it fail.
        if step == "archive.tmp_written":
            raise OSError(errno.ENOSPC, "No space left on device")

    _faults.HOOK = disk_full
    try:
        with pytest.raises(ShardWriteError, match="cannot write the archive"):
            agg(tmp_path, compact=True)
    finally:
        _faults.HOOK = None
    # Nothing removed; schema.json, written before the archive, records the schema only.
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "aggregate.lock", "schema.json"])
    assert decisions(tmp_path) == {"ALLOW": 5, "DENY": 0}


# -- hostile and broken files: each costs only itself -------------------------------------------

HostileMaker = Callable[[Path, str, bytes], object]


def _v1_source(directory: Path) -> tuple[str, bytes]:
    """A valid v1 shard's name and bytes (its files then removed): the material of a forgery."""
    name = dead_v1_shard(directory, allows=1)
    data = (directory / name).read_bytes()
    for leftover in v1_names(incarnation_of(name))[:2]:
        (directory / leftover).unlink()
    return name, data


def _v2_source(directory: Path) -> tuple[str, bytes]:
    name = dead_shard(directory, allows=1)
    data = (directory / name).read_bytes()
    (directory / name).unlink()
    return name, data


def _v1_doc(mutate: Callable[[dict[str, Any]], None]) -> HostileMaker:
    def make(path: Path, _name: str, data: bytes) -> None:
        doc = orjson.loads(data)
        doc["incarnation"] = incarnation_of(path.name)  # only the mutation is wrong
        mutate(doc)
        path.write_bytes(orjson.dumps(doc))

    return make


def _v1_nan(path: Path, name: str, data: bytes) -> None:
    _v1_doc(lambda d: None)(path, name, data)
    path.write_bytes(path.read_bytes().replace(b'"ALLOW":1', b'"ALLOW":NaN'))


def _raw(content: bytes) -> HostileMaker:
    return lambda path, _name, _data: path.write_bytes(content)


def _copied(path: Path, _name: str, data: bytes) -> None:
    path.write_bytes(data)  # the original incarnation's content under another name


def _symlink(path: Path, name: str, data: bytes) -> None:
    target = path.parent / name  # a valid shard of another (dead) incarnation
    target.write_bytes(data)
    path.symlink_to(target)


def _huge(path: Path, _name: str, _data: bytes) -> None:
    with open(path, "wb") as f:
        f.truncate(2**31)  # sparse: 2 GiB that must never be read into memory


_COMMON: dict[str, HostileMaker] = {
    "empty": _raw(b""),
    "huge": _huge,
    "copied-shard": _copied,
    "symlink": _symlink,
    "directory": lambda path, _name, _data: path.mkdir(),
    "fifo": lambda path, _name, _data: os.mkfifo(path),
}

HOSTILE_V1: dict[str, HostileMaker] = {
    **_COMMON,
    "truncated": lambda path, _name, data: path.write_bytes(data[:40]),
    "not-json": _raw(b"release_gate_decision_total 5\n"),
    "not-utf8": _raw(b'{"format": "\xff\xfe"}'),
    "nan": _v1_nan,
    "json-array": _raw(b"[1, 2, 3]"),
    "negative-count": _v1_doc(lambda d: d["counts"]["decision_counts"].update(ALLOW=-5)),
    "float-count": _v1_doc(lambda d: d["counts"]["decision_counts"].update(ALLOW=1.5)),
    "bool-count": _v1_doc(lambda d: d["counts"]["decision_counts"].update(ALLOW=True)),
    "string-count": _v1_doc(lambda d: d["counts"].update(audit_write_failures="7")),
    "overflowing-count": _v1_doc(lambda d: d["counts"].update(audit_write_failures=MAX_COUNT + 1)),
    "wrongly-typed-family": _v1_doc(lambda d: d["counts"].update(reason_counts=[1, 2])),
    "unknown-family": _v1_doc(lambda d: d["counts"].update(evil_counts={"x": 1})),
    "unknown-label-value": _v1_doc(lambda d: d["counts"]["decision_counts"].update(MAYBE=1)),
    "label-injection": _v1_doc(
        lambda d: d["counts"]["reason_counts"].update(
            {'TIER_FAIL"} 1\nrelease_gate_decision_total{decision="ALLOW': 1000}
        )
    ),
    "missing-field": _v1_doc(lambda d: d.pop("saved_at")),
    "missing-store-generation": _v1_doc(lambda d: d["counts"].pop("store_generation")),
    "extra-field": _v1_doc(lambda d: d.update(evil=1)),
    "wrong-format": _v1_doc(lambda d: d.update(format="prometheus-mmap")),
    "future-version": _v1_doc(lambda d: d.update(version=2)),
    "wrong-pid": _v1_doc(lambda d: d.update(pid="1234")),
    "nan-timestamp-as-string": _v1_doc(lambda d: d.update(saved_at="NaN")),
    "negative-timestamp": _v1_doc(lambda d: d["counts"].update(store_start_timestamp=-1.0)),
}


# v2 forgeries: the documented layout (gatemetrics._format), rebuilt with valid checksums so that
# only the one thing each case breaks is wrong. The prefix is magic, version, flags, header
# length, slot offset, slot stride, slot size, the lengths of the JSON sections that follow it
# (the first is the owner's identity) and the schema fingerprint; then the sections, then the
# header's crc32.
_PREFIX = Layout.PREFIX
_CRC = struct.Struct("<I")
_LAYOUT = Layout(GATE_SCHEMA)
_FIELDS = {"magic": 0, "version": 1, "flags": 2, "header_len": 3, "stride": 5, "fingerprint": -1}


def _v2_sections(data: bytes) -> list[bytes]:
    """The JSON sections of a v2 header, in order (the owner's identity first)."""
    fields = list(_PREFIX.unpack_from(data))
    sections, at = [], _PREFIX.size
    for length in fields[7:-1]:
        sections.append(data[at : at + length])
        at += length
    return sections


def _v2_reheader(
    data: bytes, *, sections: list[bytes] | None = None, crc: bool = True, **changes: Any
) -> bytes:
    """``data`` with a new header (same slot offset), its checksum recomputed when ``crc``."""
    fields = list(_PREFIX.unpack_from(data))
    if sections is None:
        sections = _v2_sections(data)
    assert len(sections) == len(fields) - 8
    fields[7:-1] = [len(s) for s in sections]
    fields[3] = _PREFIX.size + sum(map(len, sections)) + _CRC.size
    for key, value in changes.items():
        fields[_FIELDS[key]] = value
    body = _PREFIX.pack(*fields) + b"".join(sections)
    header = body + _CRC.pack(zlib.crc32(body) if crc else zlib.crc32(body) ^ 1)
    slot_offset = _PREFIX.unpack_from(data)[4]
    assert len(header) <= slot_offset, "a forged header must fit in its first page"
    return header.ljust(slot_offset, b"\0") + data[slot_offset:]


def _v2_with_ident(
    mutate: Callable[[dict[str, Any]], None] = lambda ident: None,
    record: Callable[[Any], Any] | None = None,
    **changes: Any,
) -> HostileMaker:
    """Forge the identity (``mutate``) and the schema record (``record`` returns the new one)."""

    def make(path: Path, _name: str, data: bytes) -> None:
        path.write_bytes(_forge(data, path, mutate, record, **changes))

    return make


def _forge(
    data: bytes,
    path: Path,
    mutate: Callable[[dict[str, Any]], None] = lambda ident: None,
    record: Callable[[Any], Any] | None = None,
    **changes: Any,
) -> bytes:
    sections = _v2_sections(data)
    ident = orjson.loads(sections[0])
    ident["incarnation"] = incarnation_of(path.name)
    mutate(ident)
    if record is not None:
        if len(sections) > 1:  # the schema record in a section of its own
            sections[1] = orjson.dumps(record(orjson.loads(sections[1])))
        else:  # the schema record inside the identity
            ident["schema"] = record(ident["schema"])
    sections[0] = orjson.dumps(ident)
    return _v2_reheader(data, sections=sections, **changes)


def _v2_as_written_for(data: bytes, path: Path) -> bytes:
    """A valid v2 shard's bytes as if ``path``'s incarnation had written them."""
    return _forge(data, path)


def _raw_ident(content: bytes) -> HostileMaker:
    def make(path: Path, _name: str, data: bytes) -> None:
        sections = _v2_sections(data)
        sections[0] = content
        path.write_bytes(_v2_reheader(data, sections=sections))

    return make


def _v2_slots(data: bytes) -> list[tuple[int, int]]:
    """``(offset, seq)`` of both slots, in file order."""
    slot_offset, stride = _PREFIX.unpack_from(data)[4:6]
    offsets = [slot_offset, slot_offset + stride]
    return [(o, struct.unpack_from("<Q", data, o)[0]) for o in offsets]


def _tear(data: bytes, offset: int) -> bytes:
    """Flip one byte inside the slot at ``offset`` (its checksum then fails)."""
    at = offset + 40  # inside the counts
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _v2_slot(
    *, counts: Callable[[list[int]], None] | None = None, saved_at: float = 1.0
) -> HostileMaker:
    """A forged newest slot with a valid checksum but a bad value."""

    def make(path: Path, _name: str, data: bytes) -> None:
        data = _v2_as_written_for(data, path)
        values = [0] * GATE_SCHEMA.size
        values[GATE_SCHEMA.slot("decision_counts", "ALLOW")] = 1
        if counts is not None:
            counts(values)
        (offset, seq), _ = sorted(_v2_slots(data), key=lambda s: -s[1])
        slot = _LAYOUT.pack(seq + 2, 9, saved_at, 1.0, values)
        path.write_bytes(data[:offset] + slot + data[offset + len(slot) :])

    return make


def _written_with(schema: Schema) -> HostileMaker:
    """A real shard written by this release over ``schema``, under ``path``'s incarnation."""

    def make(path: Path, _name: str, _data: bytes) -> None:
        store = CounterStore(schema)
        store.increment(schema.families[0].key, schema.families[0].values[0], 7)
        ident = Identity(incarnation_of(path.name), 4242, "elsewhere", 1.0)
        with tempfile.TemporaryDirectory(dir=path.parent.parent) as elsewhere:
            shard = Shard(store, elsewhere, identity_factory=lambda: ident)
            assert shard.save()
            written = shard.path
            assert written is not None
            shard.close(save=False)
            os.rename(written, path)

    return make


def _gate_schema_with(key: str, **changes: Any) -> Schema:
    """GATE_SCHEMA with family ``key`` changed (validated like any family)."""
    return Schema(
        dataclasses.replace(f, **changes) if f.key == key else f for f in GATE_SCHEMA.families
    )


_INJECTED = 'TIER_FAIL"} 1\nrelease_gate_decision_total{decision="ALLOW'


def _inject(record: Any) -> Any:
    record["families"][1]["values"][0] = _INJECTED
    return record


HOSTILE_V2: dict[str, HostileMaker] = {
    **_COMMON,
    "truncated": lambda path, _name, data: path.write_bytes(_v2_as_written_for(data, path)[:-1]),
    "truncated-in-the-prefix": lambda path, _name, data: path.write_bytes(data[:40]),
    "truncated-in-the-header": lambda path, _name, data: path.write_bytes(data[:100]),
    "extended": lambda path, _name, data: path.write_bytes(
        _v2_as_written_for(data, path) + b"\0" * 4096
    ),
    "v1-json-under-a-v2-name": _raw(b'{"format": "gatemetrics-shard", "version": 1}'),
    "bad-magic": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), magic=b"PROMMMAP")
    ),
    "unknown-version": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), version=3)
    ),
    "unknown-flags": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), flags=1)
    ),
    "bad-header-length": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), header_len=4000)
    ),
    "bad-slot-layout": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), stride=8192)
    ),
    "bad-header-checksum": lambda path, _name, data: path.write_bytes(
        _v2_reheader(_v2_as_written_for(data, path), crc=False)
    ),
    "identity-not-json": _raw_ident(b"{not json"),
    "identity-not-an-object": _raw_ident(b"[1, 2]"),
    "wrong-pid": _v2_with_ident(lambda m: m.update(pid="1234")),
    "zero-pid": _v2_with_ident(lambda m: m.update(pid=0)),
    "host-too-long": _v2_with_ident(lambda m: m.update(host="h" * 300)),
    "nan-started-at": _v2_with_ident(lambda m: m.update(started_at="NaN")),
    "cells-do-not-match": _v2_with_ident(lambda m: m["cells"].update(int=m["cells"]["int"] + 1)),
    "another-fingerprint-and-a-malformed-schema-record": _v2_with_ident(
        record=lambda r: {"families": "all of them"}, fingerprint=b"\1" * 16
    ),
    "both-slots-torn": lambda path, _name, data: path.write_bytes(
        _tear(_tear(_v2_as_written_for(data, path), _v2_slots(data)[0][0]), _v2_slots(data)[1][0])
    ),
    "negative-count": _v2_slot(counts=lambda c: c.__setitem__(0, -5)),
    "nan-saved-at": _v2_slot(saved_at=float("nan")),
    "negative-saved-at": _v2_slot(saved_at=-1.0),
    "label-injection-in-its-schema-record": _v2_with_ident(record=_inject, fingerprint=b"\0" * 16),
    "schema-with-an-unknown-label-value": _written_with(
        _gate_schema_with("decision_counts", values=("ALLOW", "DENY", "MAYBE"))
    ),
    "schema-with-an-unknown-family": _written_with(
        GATE_SCHEMA.extend([Family("evil_total", "Not ours.", key="evil_counts")])
    ),
    "schema-with-another-label-name": _written_with(
        _gate_schema_with("decision_counts", label="verdict")
    ),
    "schema-with-another-kind": _written_with(_gate_schema_with("decision_counts", kind="gauge")),
    "schema-with-another-metric-name": _written_with(
        _gate_schema_with("decision_counts", name="release_gate_decisions_total")
    ),
}


def _assert_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str, expected: dict[str, int]
) -> None:
    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path)
    # The good shards still count, the bad one does not, nothing out of schema appears.
    assert result.snapshot().family("decision_counts") == expected
    assert result.quarantined_total == 1
    assert_bounded(result)
    (report,) = [s for s in result.shards if s.name == bad]
    assert (report.state, report.action) == ("dead", "quarantined")
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
    assert shard_names(tmp_path) == []  # the good ones absorbed as usual

    later = agg(tmp_path)
    assert later.quarantined_total == 1  # persisted in the archive, never decreasing
    assert later.snapshot().family("decision_counts") == expected
    assert_bounded(later)


@pytest.mark.parametrize("case", list(HOSTILE_V1))
def test_a_hostile_v1_shard_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    dead_shard(tmp_path, allows=2, denies=1)
    dead_v1_shard(tmp_path, allows=3)
    source, data = _v1_source(tmp_path)
    bad = v1_names(new_identity().incarnation)[0]
    HOSTILE_V1[case](tmp_path / bad, source, data)
    expected = {"ALLOW": 5 + int(case == "symlink"), "DENY": 1}
    _assert_costs_only_itself(tmp_path, caplog, bad, expected)


# What the aggregator must have found wrong, where the route matters (a forgery that broke the
# wrong thing would still be quarantined, proving nothing about the case).
V2_PROBLEMS = {
    "copied-shard": "incarnation",
    "truncated": "wrong size",
    "extended": "wrong size",
    "bad-magic": "magic",
    "bad-header-checksum": "checksum",
    "both-slots-torn": "both slots",
    "negative-count": "negative",
    "label-injection-in-its-schema-record": "another schema",
    **{case: "another schema" for case in HOSTILE_V2 if case.startswith("schema-with")},
}


@pytest.mark.parametrize("case", list(HOSTILE_V2))
def test_a_hostile_v2_shard_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    dead_shard(tmp_path, allows=2, denies=1)
    dead_v1_shard(tmp_path, allows=3)
    source, data = _v2_source(tmp_path)
    bad = v2_names(new_identity().incarnation)[0]
    HOSTILE_V2[case](tmp_path / bad, source, data)
    (report,) = [s for s in agg(tmp_path).shards if s.name == bad]
    assert report.problem is not None
    assert V2_PROBLEMS.get(case, "") in report.problem
    caplog.clear()
    expected = {"ALLOW": 5 + int(case == "symlink"), "DENY": 1}
    _assert_costs_only_itself(tmp_path, caplog, bad, expected)


@pytest.mark.parametrize("field", ["saved_at", "started_at"])
def test_a_v1_shards_bad_timestamp_is_reported_under_its_own_name(
    tmp_path: Path, field: str
) -> None:
    source, data = _v1_source(tmp_path)
    bad = tmp_path / v1_names(new_identity().incarnation)[0]
    _v1_doc(lambda d: d.update({field: "NaN"}))(bad, source, data)
    (report,) = agg(tmp_path).shards
    assert report.action == "quarantined"
    assert report.problem is not None
    assert field in report.problem
    assert "store_start_timestamp" not in report.problem


def test_the_v2_forgery_helpers_alone_break_nothing(tmp_path: Path) -> None:
    """Each forged v2 case breaks one thing only: the same helpers with no change still count."""
    source, data = _v2_source(tmp_path)
    for make in (
        lambda path: path.write_bytes(_v2_as_written_for(data, path)),
        lambda path: path.write_bytes(_v2_reheader(_v2_as_written_for(data, path))),
        lambda path: _v2_with_ident()(path, source, data),
        lambda path: _v2_with_ident(record=lambda r: r, fingerprint=b"\0" * 16)(path, source, data),
        lambda path: _v2_slot()(path, source, data),
        lambda path: _written_with(GATE_SCHEMA)(path, source, data),
    ):
        make(tmp_path / v2_names(new_identity().incarnation)[0])
    result = agg(tmp_path)
    assert result.quarantined_total == 0
    assert [s.action for s in result.shards] == ["counted"] * 6
    assert result.snapshot().get("decision_counts", "ALLOW") == 1 + 1 + 1 + 1 + 1 + 7


def test_a_torn_newest_slot_falls_back_to_the_previous_save(tmp_path: Path) -> None:
    store = GateMetricStore()
    shard = shard_for(store, tmp_path)
    store.record_decision(True)
    store.record_decision(True)
    assert shard.save()
    first = store.generation
    store.record_decision(False, ["TIER_FAIL"])
    assert shard.save()
    assert shard.path is not None
    path = Path(shard.path)
    shard.close(save=False)
    full = agg(tmp_path).snapshot()
    assert full.family("decision_counts") == {"ALLOW": 2, "DENY": 1}
    data = path.read_bytes()
    (newest, seq), (_older, older_seq) = sorted(_v2_slots(data), key=lambda s: -s[1])
    assert (seq, older_seq) == (2, 1)
    path.write_bytes(_tear(data, newest))  # a save cut short, as a SIGKILL mid-pwrite leaves it
    result = agg(tmp_path)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 2, "DENY": 0}
    assert result.snapshot().get("reason_counts", "TIER_FAIL") == 0
    (report,) = result.shards
    assert (report.action, report.generation, report.format) == ("counted", first, 2)
    assert result.quarantined_total == 0  # a torn slot is no broken shard
    result = agg(tmp_path, compact=True)  # and it is absorbed with the older save's counts
    assert result.compaction is not None
    assert result.compaction.absorbed == 1
    assert decisions(tmp_path) == {"ALLOW": 2, "DENY": 0}


def test_a_live_shards_torn_newest_slot_is_read_again_then_the_previous_save_counts(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    store = live(tmp_path, 2)
    store.record_decision(False, ["TIER_FAIL"])
    path = tmp_path / live_v2_name(store, tmp_path)
    data = path.read_bytes()
    newest, _ = max(_v2_slots(data), key=lambda s: s[1])
    at = newest + 40
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([data[at] ^ 0xFF]), at)  # in place: the owner's inode, its lock
    finally:
        os.close(fd)
    result = agg(tmp_path, compact=True)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 2, "DENY": 0}
    (report,) = result.shards
    assert (report.state, report.action) == ("live", "counted")
    assert path.exists()
    store.record_decision(True)  # the owner's next save goes to the other slot, complete
    assert decisions(tmp_path) == {"ALLOW": 3, "DENY": 1}


def test_a_shard_of_an_older_writer_with_a_subset_schema_maps_and_counts(
    tmp_path: Path,
) -> None:
    """A v2 writer whose schema had fewer label values (in another order) and fewer families."""
    older = Schema(
        [
            GATE_SCHEMA.family("decision_counts"),
            Family(
                "release_gate_reason_total",
                "Reasons attached to DENY decisions.",
                key="reason_counts",
                label="reason",
                values=("NO_CANARY_DATA", "TIER_FAIL"),
            ),
            GATE_SCHEMA.family("metric_write_failures"),
        ]
    )
    store = CounterStore(older)
    store.increment("decision_counts", "DENY", 3)
    store.increment("reason_counts", "NO_CANARY_DATA", 2)
    store.increment("reason_counts", "TIER_FAIL", 1)
    store.increment("metric_write_failures", None, 5)
    shard = Shard(store, tmp_path)
    assert shard.save()
    shard.close(save=False)
    dead_shard(tmp_path, allows=1, denies=1)
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 0
    snap = result.snapshot()
    assert snap.family("decision_counts") == {"ALLOW": 1, "DENY": 4}
    reasons = snap.family("reason_counts")
    assert (reasons["NO_CANARY_DATA"], reasons["TIER_FAIL"], reasons["OPS_GATE_FAIL"]) == (2, 1, 1)
    assert sum(reasons.values()) == 4
    assert snap.get("metric_write_failures") == 5
    assert snap.get("audit_write_failures") == 0
    assert shard_names(tmp_path) == []  # absorbed like any other
    assert agg(tmp_path).counts == result.counts
    assert_bounded(result)


def test_a_file_with_a_hostile_name_is_quarantined(tmp_path: Path) -> None:
    dead_shard(tmp_path, allows=1)
    dead_v1_shard(tmp_path, allows=2)
    names = [
        "shard-evil.json",
        "shard-.lock",
        "shard-x.json.bak",
        "v2-evil.shard",
        "v2-.creating",
        f"{v2_names(new_identity().incarnation)[0]}.bak",
        "v2-x.shard.tmp",
    ]
    for name in names:
        (tmp_path / name).write_text("{}")
    (tmp_path / "notes.txt").write_text("ignored: not ours")
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == len(names)
    assert sorted(n.rsplit(".", 1)[0] for n in os.listdir(tmp_path / QUARANTINE_DIR)) == sorted(
        names
    )
    assert (tmp_path / "notes.txt").exists()
    assert decisions(tmp_path) == {"ALLOW": 3, "DENY": 0}


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_unreadable_shard_costs_only_itself(tmp_path: Path, reaper: Reaper, fmt: int) -> None:
    """Real EACCES: as root, run the aggregator as an unprivileged user (after its imports).

    A v1 shard's liveness is its lock file, so an unreadable dead one is quarantined. A v2
    shard's liveness is its own flock, which needs an open descriptor: an unreadable one cannot
    be proven dead, so it is skipped as live (never changed), and still costs only itself.
    """
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        directory = Path(top) / "shards"
        directory.mkdir()
        dead_shard(directory, allows=3)
        if fmt == 1:
            source, data = _v1_source(directory)
            bad = directory / v1_names(new_identity().incarnation)[0]
            _v1_doc(lambda d: None)(bad, source, data)
        else:
            source, data = _v2_source(directory)
            bad = directory / v2_names(new_identity().incarnation)[0]
            bad.write_bytes(_v2_as_written_for(data, bad))
        bad.chmod(0)
        for path in (Path(top), directory, *directory.iterdir()):
            if path != bad:
                path.chmod(0o777 if path.is_dir() else 0o666)
        drop = "os.setgroups([]); os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else ""
        done = run_python(
            f"""
            import backend.app.testing.gate_metrics as g, gatemetrics.aggregate as a
            import gatemetrics.shards, gatemetrics.exposition, orjson, logging
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            {drop}
            r = a.aggregate_dir(sys.argv[1], g.GATE_SCHEMA, namespace="release_gate", compact=True)
            print(r.snapshot().get("decision_counts", "ALLOW"), r.quarantined_total, r.live)
            """,
            str(directory),
        )
        code, out, err = done.returncode, done.stdout, done.stderr
        assert code == 0, err
        if fmt == 1:
            assert out.split() == ["3", "1", "0"]
            assert f"quarantined {bad.name}: cannot be read: Permission denied" in err
            assert not bad.exists()
        else:
            assert out.split() == ["3", "0", "1"]
            assert f"skipped {bad.name} (its owner is alive): cannot be read" in err
            assert bad.exists()


def _break_v2_header(path: Path) -> None:
    path.write_bytes(b"{ torn")  # the same inode: the owner keeps its lock and descriptor


def _break_v2_slots(path: Path) -> None:
    data = path.read_bytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, _seq in _v2_slots(data):
            os.pwrite(fd, bytes([data[offset + 40] ^ 0xFF]), offset + 40)
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", ["v1-json", "v2-slots", "v2-header"])
def test_a_live_owners_broken_shard_is_skipped_not_quarantined(
    tmp_path: Path,
    live: Callable[[Path, int], GateMetricStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    if damage == "v1-json":
        old = live_v1(tmp_path, 3)
        store = old.store
        path = Path(old.path)
        path.write_bytes(b"{ torn")
    else:
        store = live(tmp_path, 3)
        path = tmp_path / live_v2_name(store, tmp_path)
        (_break_v2_slots if damage == "v2-slots" else _break_v2_header)(path)
    with caplog.at_level(logging.WARNING, logger="gatemetrics"):
        result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 0
    assert [(s.state, s.action) for s in result.shards] == [("live", "skipped")]
    assert result.live == 1
    assert path.exists()  # its owner rewrites it; moving it could lose a fresh save
    assert any("its owner is alive" in r.getMessage() for r in caplog.records)
    assert isinstance(store, GateMetricStore)
    store.record_decision(True)
    if damage != "v2-header":  # the next save repairs it (a whole new file, or a whole slot)
        assert decisions(tmp_path) == {"ALLOW": 4, "DENY": 0}
        return
    # A v2 save rewrites a slot, never the header: broken until its owner goes, then the
    # documented exception (a shard corrupt on disk is quarantined, its counts lost).
    assert [s.action for s in agg(tmp_path).shards] == ["skipped"]
    shard_for(store, tmp_path).close(save=False)
    result = agg(tmp_path, compact=True)
    assert result.quarantined_total == 1
    assert not path.exists()
    assert decisions(tmp_path) == {"ALLOW": 0, "DENY": 0}


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
    dead_v1_shard(tmp_path, allows=1)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SchemaError, match="another schema"):
        agg(tmp_path, compact=True)
    assert sorted(os.listdir(tmp_path)) == before


def test_the_archive_keeps_the_v1_layout_the_previous_release_reads(tmp_path: Path) -> None:
    """An old compactor may run during an upgrade: same fields, version 1, v1 counts layout."""
    dead_shard(tmp_path, allows=2)
    dead_v1_shard(tmp_path, allows=1, denies=1)
    (tmp_path / v2_names(new_identity().incarnation)[0]).write_bytes(b"hostile")
    agg(tmp_path, compact=True)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert sorted(archive) == sorted(
        [
            "format",
            "version",
            "counts",
            "absorbed",
            "absorbed_total",
            "quarantined_total",
            "quarantining",
            "updated_at",
            "first_start",
        ]
    )
    assert (archive["format"], archive["version"]) == ("gatemetrics-archive", 1)
    assert GATE_SCHEMA.parse_counts(archive["counts"]) == list(agg(tmp_path).counts)
    assert archive["counts"]["decision_counts"] == {"ALLOW": 3, "DENY": 1}
    assert (archive["absorbed_total"], archive["quarantined_total"]) == (2, 1)
    assert archive["quarantining"] == [] == archive["absorbed"]


def test_the_quarantine_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate_module, "QUARANTINE_KEEP", 3)
    for round_ in range(3):
        (tmp_path / f"shard-bad{round_}.json").write_text("x")
        (tmp_path / f"v2-bad{round_}.shard").write_text("x")
        agg(tmp_path, compact=True)
    assert len(os.listdir(tmp_path / QUARANTINE_DIR)) == 3
    assert agg(tmp_path).quarantined_total == 6
    (tmp_path / QUARANTINE_DIR / "shard-dir.json.1").mkdir()  # an old quarantined directory
    (tmp_path / "shard-bad-last.json").write_text("x")
    agg(tmp_path, compact=True)
    assert len(os.listdir(tmp_path / QUARANTINE_DIR)) == 3


def test_a_quarantine_that_is_a_symlink_is_replaced_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / QUARANTINE_DIR).symlink_to(elsewhere)
    (shards / "shard-bad.json").write_text("x")
    bad_v2 = v2_names(new_identity().incarnation)[0]
    (shards / bad_v2).write_text("x")
    result = agg(shards, compact=True)
    assert result.quarantined_total == 2
    assert os.listdir(elsewhere) == []
    quarantine = shards / QUARANTINE_DIR
    assert quarantine.is_dir()
    assert not quarantine.is_symlink()
    assert sorted(n.rsplit(".", 1)[0] for n in os.listdir(quarantine)) == sorted(
        ["shard-bad.json", bad_v2]
    )
    assert agg(shards, compact=True).quarantined_total == 2  # counted once, not per run


@pytest.mark.parametrize("formats", [(2, 2), (1, 2), (2, 1)])
def test_counts_that_would_overflow_the_aggregate_are_quarantined(
    tmp_path: Path, formats: tuple[int, int]
) -> None:
    for fmt in formats:
        store = GateMetricStore()
        store.increment("audit_write_failures", None, MAX_COUNT - 10)
        if fmt == 1:
            old = LegacyV1Shard(store, tmp_path, durability="none")
            old.save()
            old.close(save=False)
        else:
            shard = shard_for(store, tmp_path)
            assert shard.save()
            shard.close(save=False)
    result = agg(tmp_path)
    assert result.snapshot().get("audit_write_failures") == MAX_COUNT - 10
    assert result.quarantined_total == 1
    assert sorted(s.action for s in result.shards) == ["counted", "quarantined"]
    assert_bounded(result)


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_shard_vanishing_is_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: int
) -> None:
    name = (dead_v1_shard if fmt == 1 else dead_shard)(tmp_path, allows=1)
    real_open = os.open

    def vanishing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(name):
            raise FileNotFoundError(errno.ENOENT, "gone", path)
        return real_open(path, flags, *args, **kwargs)

    # A file removed between listing and opening (only a process breaking the protocol can do
    # that under the directory lock); forcing the interleaving needs the open to fail here.
    monkeypatch.setattr("gatemetrics.aggregate.os.open", vanishing_open)
    result = agg(tmp_path)
    assert result.counts == tuple(GATE_SCHEMA.zeros())
    assert [s.problem for s in result.shards] == ["vanished while being read"]


def test_max_shard_bytes_is_generous_for_real_shards_of_both_formats(tmp_path: Path) -> None:
    store = GateMetricStore()
    for slot in range(GATE_SCHEMA.size):
        store.increment_slots([slot])
    store.increment("decision_counts", "ALLOW", MAX_COUNT - 1)
    store.increment("reason_counts", "NO_CANARY_DATA", MAX_COUNT - 1)
    shard = shard_for(store, tmp_path)
    assert shard.save()
    assert shard.path is not None
    v2 = Path(shard.path)
    shard.close(save=False)
    old = LegacyV1Shard(store, tmp_path, durability="none")
    old.save()
    v1 = Path(old.path)
    old.close(save=False)
    assert v2.stat().st_size <= MAX_SHARD_BYTES // 64  # a fixed size: a few pages
    assert v1.stat().st_size < MAX_SHARD_BYTES // 100  # JSON grows with the digits


# -- crash points: a real SIGKILL at every step of a compaction ---------------------------------

_CRASH_CASES = [(step, 0) for step in COMPACT_STEPS] + [
    ("compact.shard_deleted", 1),
    ("compact.lock_deleted", 2),
    ("compact.quarantined", 1),
]
# A directory of this release only has no v1 lock file to delete.
_V2_ONLY_CRASH_CASES = [c for c in _CRASH_CASES if c[0] != "compact.lock_deleted"]


@pytest.mark.parametrize(
    "case",
    [("v2", *case) for case in _V2_ONLY_CRASH_CASES] + [("mixed", *c) for c in _CRASH_CASES],
    ids=lambda case: "-".join(map(str, case)),
)
def test_a_compaction_killed_at_any_step_leaves_an_exact_directory(
    tmp_path: Path,
    reaper: Reaper,
    live: Callable[[Path, int], GateMetricStore],
    live_v1: Callable[[Path, int], LegacyV1Shard],
    case: tuple[str, str, int],
) -> None:
    layout, step, skip = case
    for n in (1, 2, 4):
        dead_shard(tmp_path, allows=n, denies=1)
    (tmp_path / v2_names(new_identity().incarnation)[1]).write_bytes(b"a dead creator's")
    (tmp_path / v2_names(new_identity().incarnation)[0]).write_bytes(b"hostile")
    (tmp_path / "v2-hostile-1.shard").write_text("x")
    live_files = [live_v2_name(live(tmp_path, 8), tmp_path)]
    expected = {"ALLOW": 15, "DENY": 3}
    dead, hostile = 3, 2
    if layout == "mixed":
        for n in (16, 32):
            dead_v1_shard(tmp_path, allows=n, denies=1)
        (tmp_path / v1_names(new_identity().incarnation)[2]).write_text("orphan")
        (tmp_path / v1_names(new_identity().incarnation)[1]).write_text("")
        (tmp_path / "shard-hostile-1.json").write_text("x")
        (tmp_path / "shard-hostile-2.json").write_text("y")
        live_files += live_v1(tmp_path, 64).names()[:2]
        expected = {"ALLOW": 15 + 48 + 64, "DENY": 5}
        dead, hostile = 5, 4
    assert decisions(tmp_path) == expected

    done = run_python(
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
    code, out, err = done.returncode, done.stdout, done.stderr
    assert code == -signal.SIGKILL, out + err  # the step was reached and the kill was real

    result = agg(tmp_path)  # whatever the step: exact, no double count, nothing lost
    assert result.snapshot().family("decision_counts") == expected
    assert result.quarantined_total == hostile
    assert_bounded(result)
    result = agg(tmp_path, compact=True)  # the next compaction finishes the job
    assert result.snapshot().family("decision_counts") == expected
    assert result.quarantined_total == hostile
    assert shard_names(tmp_path) == sorted(live_files)  # the live shards (and a v1 lock)
    assert "archive.json.tmp" not in os.listdir(tmp_path)
    archive = orjson.loads((tmp_path / "archive.json").read_bytes())
    assert archive["absorbed"] == []
    assert archive["quarantining"] == []
    assert archive["absorbed_total"] == dead
    assert decisions(tmp_path) == expected


# -- hostile environments --------------------------------------------------------------------


def test_a_crash_hook_that_raises_midway_is_a_crash_not_an_error(tmp_path: Path) -> None:
    dead_shard(tmp_path, allows=3)
    dead_v1_shard(tmp_path, allows=1)

    def hook(step: str) -> None:
        if step == "archive.replaced":
            raise _faults.SimulatedCrash(step)

    _faults.HOOK = hook
    try:
        with pytest.raises(_faults.SimulatedCrash):
            agg(tmp_path, compact=True)
    finally:
        _faults.HOOK = None
    assert decisions(tmp_path) == {"ALLOW": 4, "DENY": 0}
    assert agg(tmp_path, compact=True).snapshot().family("decision_counts") == {
        "ALLOW": 4,
        "DENY": 0,
    }
    assert shard_names(tmp_path) == []


# -- the model: a RuleBasedStateMachine over real files -----------------------------------------


reason_lists = st.lists(st.sampled_from(list(REASONS)), max_size=3)


class _Proc:
    """One modelled process incarnation: a store, its shard (v2, or v1 of the previous
    release), and what it last saved."""

    def __init__(self, directory: Path, pid: int, fmt: int) -> None:
        def identity() -> Identity:
            ns = time.time_ns()
            return Identity(f"00000000-{pid}-{ns:x}-{secrets.token_hex(8)}", pid, "model", 0.0)

        self.pid = pid
        self.fmt = fmt
        self.store = GateMetricStore()
        self.shard = Shard(self.store, directory, identity_factory=identity)
        self.old = LegacyV1Shard(
            self.store, directory, durability="none", identity_factory=identity
        )
        self.saved = [0] * GATE_SCHEMA.size
        self.has_file = False  # whether its current incarnation's shard exists

    @property
    def save_steps(self) -> tuple[str, ...]:
        return SAVE_STEPS if self.fmt == 2 else LEGACY_V1_SAVE_STEPS

    def counts(self) -> list[int]:
        return list(self.store.snapshot().counts)

    def save(self) -> None:
        if self.fmt == 2:
            assert self.shard.save()
        else:
            self.old.save()

    def close(self) -> None:
        if self.fmt == 2:
            assert self.shard.close(save=True)
        else:
            self.old.close(save=True)

    def die(self) -> None:
        """SIGKILL in-process: the kernel drops the lock, nothing else happens."""
        if self.fmt == 1:
            self.old.die()
            return
        fd, self.shard._fd = self.shard._fd, None
        self.shard._identity = None
        if fd is not None:
            os.close(fd)


class ShardDirectoryMachine(RuleBasedStateMachine):
    """Processes of both releases record, save, fork, die and get their pids reused; creators
    and aggregators crash; hostile files and leftovers appear.

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
    @rule(reuse=st.booleans(), old_release=st.booleans())
    def start(self, reuse: bool, old_release: bool) -> None:
        if reuse and self.dead_pids:
            pid = self.dead_pids[-1]  # pid reuse: same pid, a new incarnation
        else:
            self.next_pid += 1
            pid = self.next_pid
        self.live.append(_Proc(self.dir, pid, 1 if old_release else 2))

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
        proc.save()
        proc.saved = proc.counts()
        proc.has_file = True

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9), s=st.integers(0, 4))
    def crash_while_saving(self, i: int, s: int) -> None:
        proc = self._pick(i)
        step = proc.save_steps[s % len(proc.save_steps)]
        _faults.HOOK = _crash_at(step, 0)
        try:
            with pytest.raises(_faults.SimulatedCrash):
                proc.save()
        finally:
            _faults.HOOK = None
        if step in ("save.written", "save.replaced", "save.done"):
            proc.saved = proc.counts()
        proc.die()
        self._bury(proc)

    @precondition(lambda self: any(p.fmt == 2 and not p.has_file for p in self.live))
    @rule(i=st.integers(0, 9), step=st.sampled_from(CREATE_STEPS))
    def crash_while_creating(self, i: int, step: str) -> None:
        """A v2 owner dies while creating its shard (before its first save is written)."""
        fresh = [p for p in self.live if p.fmt == 2 and not p.has_file]
        proc = fresh[i % len(fresh)]
        _faults.HOOK = _crash_at(step, 0)
        try:
            with pytest.raises(_faults.SimulatedCrash):
                proc.save()
        finally:
            _faults.HOOK = None
        proc.die()
        self._bury(proc)  # it saved nothing: its shard, if renamed into place, holds zeros

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def exit_gracefully(self, i: int) -> None:
        proc = self._pick(i)
        proc.close()
        proc.saved = proc.counts()
        self._bury(proc)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 9))
    def sigkill(self, i: int) -> None:
        proc = self._pick(i)
        proc.die()
        self._bury(proc)

    @precondition(lambda self: self.forks < 2 and any(p.fmt == 2 for p in self.live))
    @rule(i=st.integers(0, 9), allows=st.integers(0, 3), denies=st.integers(0, 3))
    def fork(self, i: int, allows: int, denies: int) -> None:
        """A real fork: the child counts from zero as a new incarnation; the parent keeps its."""
        self.forks += 1
        procs = [p for p in self.live if p.fmt == 2]
        proc = procs[i % len(procs)]
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
        forked = GateMetricStore()
        for _ in range(allows):
            forked.record_decision(True)
        for _ in range(denies):
            forked.record_decision(False, ["NO_FLAKE_DATA"])
        counts = forked.snapshot().counts
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

    @rule(
        kind=st.sampled_from(
            ["garbage", "name", "injection", "directory", "v2-garbage", "v2-name", "v2-directory"]
        )
    )
    def hostile_file(self, kind: str) -> None:
        inc = new_identity().incarnation
        path = self.dir / v1_names(inc)[0]
        v2_path = self.dir / v2_names(inc)[0]
        if kind == "garbage":
            path.write_bytes(b"\x00\xff{")
        elif kind == "name":
            (self.dir / f"shard-{secrets.token_hex(4)}.json").write_text("{}")
        elif kind == "injection":
            doc = {"counts": {"decision_counts": {'ALLOW"} 9\nx{y="': 1}}}
            path.write_bytes(orjson.dumps(doc))
        elif kind == "directory":
            path.mkdir()
        elif kind == "v2-garbage":
            v2_path.write_bytes(b"GMSHARD\0" + b"\xff" * 12000)
        elif kind == "v2-name":
            (self.dir / f"v2-{secrets.token_hex(4)}.shard").write_text("{}")
        else:
            v2_path.mkdir()
        self.quarantined += 1

    @rule(kind=st.sampled_from(["v1-tmp", "v1-lock", "v2-creating"]))
    def leftover_of_a_dead_writer(self, kind: str) -> None:
        """Files a killed writer leaves: never counted, never quarantined, removed in time."""
        inc = new_identity().incarnation
        if kind == "v1-tmp":
            (self.dir / v1_names(inc)[2]).write_bytes(b'{"half": ')
        elif kind == "v1-lock":
            (self.dir / v1_names(inc)[1]).write_bytes(b"")
        else:
            (self.dir / v2_names(inc)[1]).write_bytes(b"GMSHARD\0")

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
from tests.shard_tools import legacy_bind
directory, fmt, reason, count, kill_step, kill_skip = sys.argv[1:7]
if kill_step:
    _faults.install_kill_at(kill_step, skip=int(kill_skip))
store = GateMetricStore()
if fmt == "1":  # a worker of the previous release
    legacy_bind(store, directory, durability="none")
else:
    store.bind_to_dir(directory)
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
    formats = sorted({s.format for s in r.shards if s.action == "counted"})
    print(orjson.dumps([r.counts, formats]).decode(), flush=True)
    if done:
        break
"""


def _sigkill_mid_run(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGKILL a writer after 40 to 99 of its lines; ``(lines it printed, stdout, stderr)``."""
    lines = [read_line(proc) for _ in range(40 + secrets.randbelow(60))]
    os.kill(proc.pid, signal.SIGKILL)
    # Drain what it printed before the kill, its lines already buffered here included
    # (communicate() would read past them).
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout=60)
    return len(lines) + len(out.split()), out, err


def _assert_never_decreasing(aggregator: subprocess.Popen[str]) -> set[int]:
    """Every total an aggregator process printed never went down; the formats it counted."""
    out, err = aggregator.communicate(timeout=60)
    assert aggregator.returncode == 0, err
    runs = [orjson.loads(line) for line in out.splitlines()]
    assert len(runs) >= 2
    for (before, _), (after, _) in itertools.pairwise(runs):
        assert all(a >= b for a, b in zip(after, before, strict=True))
    return {f for _counts, formats in runs for f in formats}


def test_writers_of_both_releases_killed_mid_save_and_concurrent_aggregators_stay_exact(
    tmp_path: Path, reaper: Reaper
) -> None:
    """An upgrade in progress: v1 and v2 workers, SIGKILLed at save and create steps or at a
    random moment, while three aggregator processes (two compacting) run over the directory."""
    shards = tmp_path / "shards"
    shards.mkdir()
    stop = tmp_path / "stop"
    per_writer = 300
    # (format, reason, SIGKILL itself at this step after passing it this many times, expected):
    # exact by construction.
    self_killed = [
        ("2", "TIER_FAIL", "save.locked", 120, 120),  # during save 121, before its pwrite
        ("2", "FLAKY_TESTS", "save.written", 80, 81),  # during save 81, after its pwrite
        ("2", "GUARD_VIOLATION", "create.written", 0, 0),  # a .creating never renamed
        ("2", "OPS_GATE_FAIL", "create.renamed", 0, 0),  # a shard of zeros
        ("1", "NO_FLAKE_DATA", "save.tmp_written", 120, 120),  # during save 121, before rename
        ("1", "NO_DRIFT_DATA", "save.replaced", 80, 81),  # during save 81, after its rename
    ]
    completing = [("2", "DRIFT_ALERT"), ("1", "CANARY_BREAKING")]
    victims = [("2", "NO_TIER_DATA"), ("1", "NO_CANARY_DATA")]  # SIGKILLed by us, mid-run
    writers: dict[str, subprocess.Popen[str]] = {}
    for fmt, reason, step, skip, _expected in self_killed:
        writers[reason] = reaper.python(
            _WRITER, str(shards), fmt, reason, str(per_writer), step, str(skip)
        )
    for fmt, reason in completing:
        writers[reason] = reaper.python(_WRITER, str(shards), fmt, reason, str(per_writer), "", "0")
    for fmt, reason in victims:  # they would write for ever: only our SIGKILL ends them
        writers[reason] = reaper.python(_WRITER, str(shards), fmt, reason, str(10**9), "", "0")
    aggregators = [
        reaper.python(_AGGREGATOR, str(shards), str(stop), compact) for compact in ("1", "0", "1")
    ]
    acked: dict[str, int] = {}
    outputs: dict[str, tuple[str, str]] = {}
    for _fmt, reason in victims:
        count, out, err = _sigkill_mid_run(writers[reason])
        acked[reason], outputs[reason] = count, (out, err)
    outputs.update(
        (reason, proc.communicate(timeout=60))
        for reason, proc in writers.items()
        if reason not in outputs
    )
    stop.touch()
    for _fmt, reason, _step, _skip, _expected in self_killed:
        assert writers[reason].returncode == -signal.SIGKILL, outputs[reason][1]
    for _fmt, reason in completing:
        assert writers[reason].returncode == 0, outputs[reason][1]
    for _fmt, reason in victims:
        assert writers[reason].returncode == -signal.SIGKILL, outputs[reason][1]

    seen_formats: set[int] = set()
    for proc in aggregators:
        seen_formats |= _assert_never_decreasing(proc)
    assert seen_formats == {1, 2}  # the aggregators really read both releases' shards

    final = agg(shards, compact=True).snapshot()
    reasons = final.family("reason_counts")
    for _fmt, reason, _step, _skip, expected in self_killed:
        assert reasons[reason] == expected, reason
    for _fmt, reason in completing:
        assert reasons[reason] == per_writer
    for _fmt, reason in victims:  # a line is printed only after its save returned
        assert acked[reason] <= reasons[reason] <= acked[reason] + 1, (reason, outputs[reason][1])
    assert final.get("decision_counts", "DENY") == sum(reasons.values())
    assert shard_names(shards) == []  # every writer is dead and compacted away, leftovers too


# -- live shards kept open between runs of one process --------------------------------------------


def open_fds_under(directory: Path) -> list[str]:
    """The files under ``directory`` this process has descriptors for (``/proc/self/fd``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith(f"{directory}/"):
            found.append(os.path.basename(target).removesuffix(" (deleted)"))
    return sorted(found)


def test_a_live_shard_kept_open_shows_every_later_save_and_holds_no_lock(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    store = live(tmp_path, 1)
    name = live_v2_name(store, tmp_path)
    assert decisions(tmp_path)["ALLOW"] == 1
    assert open_fds_under(tmp_path).count(name) == 2  # the owner's and the one kept
    for expected in range(2, 6):
        store.record_decision(True)
        assert decisions(tmp_path)["ALLOW"] == expected  # read through the kept descriptor
    assert open_fds_under(tmp_path).count(name) == 2  # still one kept, not one per run
    shard = shard_for(store, tmp_path)
    shard.close(save=False)
    # The kept descriptor held no lock: the owner's release makes the shard dead at once, and
    # the next run absorbs it through that descriptor like any dead shard.
    result = agg(tmp_path, compact=True)
    assert (result.live, result.dead) == (0, 1)
    assert result.snapshot().family("decision_counts") == {"ALLOW": 5, "DENY": 0}
    assert shard_names(tmp_path) == []
    assert open_fds_under(tmp_path) == []  # nothing of the directory is left open


def test_a_kept_shard_whose_file_was_removed_is_closed_and_not_counted(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    keep = live(tmp_path, 2)
    gone = live(tmp_path, 3)
    gone_name = live_v2_name(gone, tmp_path)
    assert decisions(tmp_path)["ALLOW"] == 5
    os.unlink(tmp_path / gone_name)  # a stray rm while its owner lives
    assert decisions(tmp_path)["ALLOW"] == 2  # only what is listed counts
    # Only the owner's own descriptor of the removed file is left: ours closed with the run.
    assert open_fds_under(tmp_path).count(gone_name) == 1
    assert open_fds_under(tmp_path).count(live_v2_name(keep, tmp_path)) == 2


def test_a_kept_shard_changed_under_it_is_read_whole_again(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    store = live(tmp_path, 2)
    path = tmp_path / live_v2_name(store, tmp_path)
    assert decisions(tmp_path)["ALLOW"] == 2
    good = path.read_bytes()
    with open(path, "r+b") as f:  # cut in place (same inode, the kept descriptor sees it)
        f.truncate(len(good) - 100)
    result = agg(tmp_path)
    (report,) = result.shards
    assert (report.state, report.action) == ("live", "skipped")
    assert report.problem is not None
    assert "wrong size" in report.problem
    with open(path, "r+b") as f:
        f.write(good)
    assert decisions(tmp_path)["ALLOW"] == 2  # readable again: counted again


def test_no_more_than_the_limit_of_descriptors_are_kept(
    tmp_path: Path,
    live: Callable[[Path, int], GateMetricStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregate_module._KeptShards, "LIMIT", 2)
    names = [live_v2_name(live(tmp_path, 1), tmp_path) for _ in range(5)]
    for _ in range(3):
        assert decisions(tmp_path)["ALLOW"] == 5
        fds = open_fds_under(tmp_path)
        assert sum(fds.count(n) for n in names) == 5 + 2  # the owners' five, two kept


def test_a_forked_child_closes_the_descriptors_kept_by_its_parent(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore]
) -> None:
    names = [live_v2_name(live(tmp_path, 1), tmp_path) for _ in range(3)]
    assert decisions(tmp_path)["ALLOW"] == 3

    def child_sees_only_the_owners_copies() -> bool:
        # The owners' descriptors are the bindings' (closed by their own at-fork hook), so
        # nothing of the directory may be left open in the child.
        return not any(n in open_fds_under(tmp_path) for n in names)

    assert in_forked_child(child_sees_only_the_owners_copies)
    assert decisions(tmp_path)["ALLOW"] == 3  # the parent's kept descriptors still work


def test_a_fork_during_an_aggregation_leaves_no_dead_shard_locked_by_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = tmp_path / dead_shard(tmp_path, allows=2)
    reading = threading.Event()
    forked = threading.Event()
    real = decode_v2_slots

    def slow_decode(*args: Any, **kwargs: Any) -> Any:
        reading.set()  # the run holds the dead shard's flock now
        assert forked.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(aggregate_module, "decode_v2_slots", slow_decode)
    results: list[Aggregate] = []
    thread = threading.Thread(target=lambda: results.append(agg(tmp_path)))
    thread.start()
    try:
        assert reading.wait(10)
        read_end, write_end = os.pipe()
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child waits for the parent, then leaves
            os.close(write_end)
            os.write(ready_write, b"x")  # past fork(), so past the at-fork hooks
            os.read(read_end, 1)
            os._exit(0)
        os.close(read_end)
        os.close(ready_write)
        # Until the child's hooks ran it holds copies of everything (that moment is inherent
        # to fork): wait for it, then the copies must be gone.
        assert os.read(ready_read, 1) == b"x"
        os.close(ready_read)
    finally:
        forked.set()
        thread.join(10)
    try:
        assert results
        assert results[0].dead == 1
        # The run is over in the parent; the child, still alive, must not keep its lock.
        assert not is_locked(dead)
        assert agg(tmp_path, compact=True).snapshot().get("decision_counts", "ALLOW") == 2
        assert shard_names(tmp_path) == []
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("torn_reads", [0, 6, 6 + 19, 6 + 20])
def test_a_live_shard_caught_mid_write_in_both_slots_is_read_again_not_skipped(
    tmp_path: Path, torn_reads: int
) -> None:
    # A live owner saving in a tight loop can tear one slot while the other is re-read; the
    # reader reads both slots again rather than skip the shard (which would make the aggregate
    # go down). The torn reads are scripted here: a real race hits this too rarely to test.
    store = GateMetricStore()
    shard = shard_for(store, tmp_path)
    for _ in range(3):
        store.record_decision(True)
        assert shard.save()
    assert shard.path is not None
    good = Path(shard.path).read_bytes()
    torn = good
    for offset, _seq in _v2_slots(good):
        torn = _tear(torn, offset)
    inc = incarnation_of(os.path.basename(shard.path))
    calls: list[int] = []

    def reread(offset: int, size: int) -> bytes:
        calls.append(offset)
        source = torn if len(calls) <= torn_reads else good
        return source[offset : offset + size]

    with pytest.raises(BadFile, match="both slots"):
        decode_v2(torn, GATE_SCHEMA, inc)  # a dead shard is not re-read
    if torn_reads >= 6 + STABLE_READS:
        with pytest.raises(BadFile, match="both slots"):
            decode_v2(torn, GATE_SCHEMA, inc, reread=reread)
        assert len(calls) == 2 * REREADS + STABLE_READS  # bounded
    else:
        record = decode_v2(torn, GATE_SCHEMA, inc, reread=reread)
        assert record.counts == decode_v2(good, GATE_SCHEMA, inc).counts
        assert record.seq == 3
    shard.close(save=False)


# -- attacks by a user who may write the directory ---------------------------------------------
# The aggregator typically runs from a root cron over a directory the workers' user can write.
# Whatever that user plants there may hide or inflate counts, but never makes the aggregator
# write elsewhere, delete or drop a live worker's counts, or stop later runs. The attacker is a
# real unprivileged user (nobody) when the suite runs as root; see tests.processes.Attacker.

# What an attacker can plant under a name, and the names the engine creates.
PLANT_KINDS = ("symlink", "symlink-to-file", "loop", "fifo", "directory", "socket", "hardlink")


def _engine_names() -> dict[str, str]:
    inc = new_identity().incarnation
    return {
        "aggregate.lock": "aggregate.lock",
        "archive.json": "archive.json",
        "archive.json.tmp": "archive.json.tmp",
        "quarantine": QUARANTINE_DIR,
        "v2 shard": v2_names(inc)[0],
        "v2 creating": v2_names(inc)[1],
        "v1 shard": v1_names(inc)[0],
        "v1 lock": v1_names(inc)[1],
        "v1 tmp": v1_names(inc)[2],
    }


def _cli(*args: str) -> int:
    from gatemetrics.cli import main

    return main(list(args))


def _plant(attacker: Attacker, name: str, kind: str, live_shard: str) -> None:
    if kind == "symlink":  # to a file that does not exist: following it would create it
        attacker.plant(name, "symlink", attacker.outside / f"made-through-{name}")
    elif kind == "symlink-to-file":  # to a file that exists: following it would change it
        attacker.plant(name, "symlink", attacker.outside / "precious")
    elif kind == "hardlink":  # a second name of a live worker's shard
        attacker.plant(name, "hardlink", attacker.shards / live_shard)
    else:
        attacker.plant(name, kind)


@pytest.mark.parametrize("which", list(_engine_names()))
def test_a_planted_entry_under_any_name_the_engine_creates_costs_only_itself(
    attacker: Attacker, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every kind of planted entry under each engine name, one after the other, against a root
    cron's compacting CLI run with a live worker: exit 0, nothing outside changes, the live
    counts and every dead shard stay exact (only a replaced archive loses its own totals: the
    attacker could as well delete it), and compaction keeps absorbing."""
    caplog.set_level(logging.CRITICAL, logger="gatemetrics")
    (attacker.outside / "precious").write_bytes(b"keep me\n")
    textfile = attacker.outside / "release_gate.prom"
    worker, live_shard = attacker.worker(3)
    assert _cli("aggregate", "--dir", str(attacker.shards), "--textfile", str(textfile)) == 0
    name = _engine_names()[which]
    absorbed = 0  # dead shards compacted into the archive so far
    for kind in PLANT_KINDS:
        _plant(attacker, name, kind, live_shard)
        dead_shard(attacker.shards, allows=1)
        before = attacker.outside_state()
        for _ in range(2):  # the planting run, then the next one
            code = _cli("aggregate", "--dir", str(attacker.shards), "--textfile", str(textfile))
            assert code == 0, (which, kind)
            state = {k: v for k, v in attacker.outside_state().items() if k != textfile.name}
            assert state == {k: v for k, v in before.items() if k != textfile.name}, (which, kind)
        absorbed += 1
        result = agg(attacker.shards)
        allows = result.snapshot().get("decision_counts", "ALLOW")
        if which == "archive.json":
            # The planted "archive" replaced the real one: its totals are gone (hidden counts),
            # the live worker's and the new dead shard's are not.
            absorbed = 1
        assert allows == 3 + absorbed, (which, kind, result.shards)
        assert (attacker.shards / live_shard).is_file(), (which, kind)
        states = {s.name: (s.state, s.action) for s in result.shards}
        assert states[live_shard] == ("live", "counted"), (which, kind)
        dead = [s for s in result.shards if s.state == "dead" and s.action == "counted"]
        assert dead == [], (which, kind)  # every dead shard was absorbed: compaction works
        assert (attacker.shards / "aggregate.lock").is_file()
        assert not (attacker.shards / "aggregate.lock").is_symlink()
        # Clean up what compaction leaves to the planter (a live hard link stays until the
        # worker exits; a loop's other end is not always an engine name); never the engine's
        # own files (a regular file with one link, the real quarantine/).
        for leftover in (name, f"{name}.other"):
            path = attacker.shards / leftover
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                continue
            if stat.S_ISDIR(st.st_mode):
                if leftover != QUARANTINE_DIR:
                    shutil.rmtree(path)
            else:
                path.unlink()
    assert read_textfile_allows(textfile) == 3 + absorbed
    assert worker.stdin is not None
    worker.stdin.write("close\n")
    worker.stdin.flush()
    assert read_line(worker) == "closed"
    assert _cli("aggregate", "--dir", str(attacker.shards)) == 0
    assert decisions(attacker.shards) == {"ALLOW": 3 + absorbed, "DENY": 0}


def read_textfile_allows(path: Path) -> int:
    families = parse(path.read_text())
    return families["release_gate_decision_total"].samples[("decision", "ALLOW")]


def test_a_symlink_named_aggregate_lock_never_creates_a_file_outside(attacker: Attacker) -> None:
    target = attacker.outside / "created-by-root"
    attacker.plant("aggregate.lock", "symlink", target)
    dead_shard(attacker.shards, allows=2)
    for compact in (False, True, True):
        assert agg(attacker.shards, compact=compact).snapshot().get("decision_counts", "ALLOW") == 2
        assert not target.exists()
    lock = attacker.shards / "aggregate.lock"
    assert lock.is_file()
    assert not lock.is_symlink()  # quarantined; the next run made a real lock file
    assert any(n.startswith("aggregate.lock.") for n in os.listdir(lock.parent / QUARANTINE_DIR))


def test_a_hard_link_of_a_live_shard_named_aggregate_lock_never_stalls_the_pipeline(
    attacker: Attacker,
) -> None:
    """The owner's lifetime flock is on that inode: locking it would wait for the owner."""
    _, live_shard = attacker.worker(4)
    attacker.plant("aggregate.lock", "hardlink", attacker.shards / live_shard)
    for compact in (False, True, True):
        result = agg(attacker.shards, compact=compact, lock_timeout=1)
        assert result.snapshot().get("decision_counts", "ALLOW") == 4
    assert (attacker.shards / live_shard).is_file()


def test_a_symlink_named_archive_tmp_never_stops_compaction(attacker: Attacker) -> None:
    (attacker.outside / "precious").write_bytes(b"keep me\n")
    attacker.plant("archive.json.tmp", "symlink", attacker.outside / "precious")
    for round_ in range(1, 4):
        dead = dead_shard(attacker.shards, allows=1)
        result = agg(attacker.shards, compact=True)
        assert result.compaction is not None
        assert result.compaction.absorbed == 1
        assert not (attacker.shards / dead).exists()  # absorbed: dead shards do not pile up
        assert decisions(attacker.shards) == {"ALLOW": round_, "DENY": 0}
    assert (attacker.outside / "precious").read_bytes() == b"keep me\n"


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_archive_listing_a_live_incarnation_never_costs_its_counts(
    attacker: Attacker, fmt: int, live_v1: Callable[[Path, int], LegacyV1Shard]
) -> None:
    """A well-formed archive that lists a live owner as absorbed: the shard still counts, is
    never deleted, and once its owner is killed its counts are absorbed for real."""
    if fmt == 2:
        worker, name = attacker.worker(5)
    else:
        shard = live_v1(attacker.shards, 5)
        name = os.path.basename(shard.path)
    inc = incarnation_of(name)
    dead_shard(attacker.shards, allows=1)
    agg(attacker.shards, compact=True)
    archive = orjson.loads((attacker.shards / "archive.json").read_bytes())
    archive["absorbed"] = [inc]
    forged = orjson.dumps(archive)
    attacker.run(
        "open(sys.argv[1] + '.new', 'wb').write(bytes.fromhex(sys.argv[2]))\n"
        "os.replace(sys.argv[1] + '.new', sys.argv[1])\n",
        str(attacker.shards / "archive.json"),
        forged.hex(),
    )
    for compact in (False, True, True):
        result = agg(attacker.shards, compact=compact)
        assert result.snapshot().get("decision_counts", "ALLOW") == 6
        assert (attacker.shards / name).exists()
        report = next(s for s in result.shards if s.name == name)
        assert (report.state, report.action) == ("live", "counted")
    if fmt == 2:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    else:
        shard.store.set_change_hook(None)
        shard.close(save=False)
    result = agg(attacker.shards, compact=True)
    assert result.snapshot().get("decision_counts", "ALLOW") == 6
    assert not (attacker.shards / name).exists()  # absorbed for real now
    assert decisions(attacker.shards) == {"ALLOW": 6, "DENY": 0}


def _archive_with(directory: Path, **changes: Any) -> None:
    dead_shard(directory)
    agg(directory, compact=True)
    archive = orjson.loads((directory / "archive.json").read_bytes())
    for key, value in changes.items():
        if key == "allows":
            archive["counts"]["decision_counts"]["ALLOW"] = value
        else:
            archive[key] = value
    (directory / "archive.json").write_bytes(orjson.dumps(archive))


@pytest.mark.parametrize("near", [MAX_COUNT, MAX_COUNT - 1, MAX_COUNT - 4])
def test_an_archive_near_the_64_bit_limit_saturates_and_never_blames_a_shard(
    tmp_path: Path, live: Callable[[Path, int], GateMetricStore], near: int
) -> None:
    _archive_with(tmp_path, allows=near, absorbed_total=MAX_COUNT, quarantined_total=MAX_COUNT)
    dead = dead_shard(tmp_path, allows=5)
    live(tmp_path, 2)
    for compact in (False, True, True, False):
        result = agg(tmp_path, compact=compact)  # never SchemaError: it reads what it wrote
        assert result.snapshot().get("decision_counts", "ALLOW") == MAX_COUNT
        assert result.archive.saturated
        assert all(s.action in ("counted", "absorbed") for s in result.shards), result.shards
        assert result.quarantined_total == MAX_COUNT
        assert_bounded(result)
    assert not (tmp_path / dead).exists()  # absorbed into the saturated total, not quarantined
    assert not (tmp_path / QUARANTINE_DIR).exists()


def test_an_absurd_shard_is_the_one_left_out_whatever_the_read_order(tmp_path: Path) -> None:
    """Shards whose counts together pass the limit: the largest goes, not the ones after it."""
    huge = _dead_shard_with(tmp_path, MAX_COUNT - 1)
    small = [dead_shard(tmp_path, allows=1) for _ in range(3)]
    result = agg(tmp_path, compact=True)
    actions = {s.name: s.action for s in result.shards}
    assert actions[huge] == "quarantined"
    assert all(actions[name] == "counted" for name in small)
    assert decisions(tmp_path) == {"ALLOW": 3, "DENY": 0}


def _dead_shard_with(directory: Path, allows: int) -> str:
    """A dead v2 shard with ``allows`` ALLOWs, written by the real writer."""
    store = GateMetricStore()
    store.increment("decision_counts", "ALLOW", allows)
    shard = shard_for(store, directory)
    assert shard.save()
    assert shard.path is not None
    name = os.path.basename(shard.path)
    shard.close(save=False)
    return name


@given(
    archived=st.lists(st.integers(0, MAX_COUNT), min_size=2, max_size=2),
    dead=st.lists(st.integers(0, MAX_COUNT), min_size=2, max_size=2),
)
@settings(max_examples=25)
def test_whatever_compaction_writes_at_the_64_bit_limits_it_reads_back(
    archived: list[int], dead: list[int]
) -> None:
    """An archive and a dead shard anywhere up to 2**63-1: compaction never fails, the next
    runs read its archive back, and each total is the exact sum or, past the limit, 2**63-1."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        _archive_with(directory)
        archive = orjson.loads((directory / "archive.json").read_bytes())
        archive["counts"]["decision_counts"] = {"ALLOW": archived[0], "DENY": archived[1]}
        (directory / "archive.json").write_bytes(orjson.dumps(archive))
        store = GateMetricStore()
        store.increment("decision_counts", "ALLOW", dead[0])
        store.increment("decision_counts", "DENY", dead[1])
        shard = shard_for(store, directory)
        assert shard.save()
        shard.close(save=False)
        expected = {
            "ALLOW": min(archived[0] + dead[0], MAX_COUNT),
            "DENY": min(archived[1] + dead[1], MAX_COUNT),
        }
        for compact in (True, True, False):
            result = agg(directory, compact=compact)
            assert result.snapshot().family("decision_counts") == expected
            assert all(s.action in ("counted", "absorbed") for s in result.shards)
        assert shard_names(directory) == []  # absorbed, never quarantined
