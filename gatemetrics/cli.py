"""The ``gatemetrics`` command line: ``aggregate``, ``status`` and ``demo``.

Exit status: 0 on success; 1 when the work failed (a missing or unreadable directory, an
unwritable target, an archive written with another schema) or was refused (a shard directory
or archive that any user may write, a textfile target that is a symlink: ``status`` still
prints its table, with the problem on top); 75 (``EX_TEMPFAIL``) when the directory lock was
not free in time, so a wrapper can retry; 2 for usage errors (argparse's
convention). Every failure prints exactly one line on stderr, ``gatemetrics: error: ...``.
Warnings about broken shard files (quarantined or skipped) go to stderr too, one line each, and
do not fail the run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence

from gatemetrics.aggregate import ARCHIVE_NAME, Aggregate, aggregate_dir
from gatemetrics.errors import LockTimeoutError, SchemaError, ShardWriteError
from gatemetrics.schema import Schema
from gatemetrics.shards import write_file_atomically

__all__ = ["main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOCK_TIMEOUT = 75  # sysexits.h EX_TEMPFAIL: try again later
ORPHAN_TEMP_AGE_S = 60.0

DEFAULT_SCHEMA = "backend.app.testing.gate_metrics:GATE_SCHEMA"
DEFAULT_NAMESPACE = "release_gate"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatemetrics",
        description="Release-gate telemetry: multiprocess counters, aggregation, demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agg = sub.add_parser(
        "aggregate",
        help="merge a shard directory into one exposition (and compact it)",
        description="Merge every shard of a directory with its archive and print the "
        "exposition, or write it atomically (mode 0644) to a textfile for node_exporter. "
        "Compacts the directory unless --no-compact is given.",
    )
    _add_dir_options(agg)
    agg.add_argument(
        "--textfile",
        metavar="PATH",
        help="write here atomically instead of stdout (e.g. .../textfile/release_gate.prom)",
    )
    agg.add_argument(
        "--format", choices=("prometheus", "json"), default="prometheus", help="output format"
    )
    agg.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="write to the target of a --textfile that is a symlink (refused by default)",
    )
    agg.add_argument(
        "--no-compact",
        action="store_true",
        help="only read: do not fold dead shards into the archive or remove anything",
    )

    status = sub.add_parser(
        "status",
        help="show the shards of a directory, their owners and totals",
        description="A readable table of a shard directory: live and dead shards, the age of "
        "each shard's last save, its format (v2, or v1 of the previous release), the archive, "
        "quarantined files and totals. Changes nothing.",
    )
    _add_dir_options(status)

    demo = sub.add_parser(
        "demo",
        help="run a self-contained multiprocess demonstration and check the counts",
        description="Worker processes make realistic release-gate decisions into a "
        "temporary shard directory; one is SIGKILLed and one recycled mid-run. The "
        "aggregator then compacts the directory and prints the exposition and a summary of "
        "expected against counted totals. Exit 0 only when they are equal.",
    )
    demo.add_argument("--decisions", type=_positive_int, default=2000, help="decisions to make")
    demo.add_argument("--workers", type=_worker_count, default=4, help="worker processes (2-16)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    return parser


def _add_dir_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        metavar="DIR",
        default=os.environ.get("GATEMETRICS_DIR") or None,
        help="the shard directory (default: $GATEMETRICS_DIR)",
    )
    parser.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the directory lock (default: 10)",
    )
    parser.add_argument(
        "--schema",
        default=DEFAULT_SCHEMA,
        metavar="MODULE:NAME",
        help=f"the Schema the shards were written with (default: {DEFAULT_SCHEMA})",
    )
    parser.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help=f"prefix of the pipeline families (default: {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--allow-world-writable",
        action="store_true",
        help="use a shard directory or archive that any user may write (refused by default: "
        "any local user could then plant files in it)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _worker_count(text: str) -> int:
    value = _positive_int(text)
    if not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be between 2 and 16: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600: {text}")
    return value


def _load_schema(parser: argparse.ArgumentParser, spec: str) -> Schema:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        parser.error(f"--schema must look like MODULE:NAME, not {spec!r}")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        parser.error(f"--schema {spec}: {exc}")
    if not isinstance(value, Schema):
        parser.error(f"--schema {spec} is a {type(value).__name__}, not a gatemetrics Schema")
    return value


class _Failure(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command in ("aggregate", "status"):
        if not args.dir:
            parser.error("--dir is required when GATEMETRICS_DIR is not set")
        args.schema_obj = _load_schema(parser, args.schema)
    _configure_logging()
    try:
        return _run(args)
    except _Failure as failure:
        print(f"gatemetrics: error: {failure}", file=sys.stderr)
        return failure.status
    except BrokenPipeError:
        # The reader went away (``gatemetrics demo | head``): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a killed pipe writer


def _configure_logging() -> None:
    logger = logging.getLogger("gatemetrics")
    if any(getattr(h, "_gatemetrics_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gatemetrics: %(levelname)s: %(message)s"))
    handler._gatemetrics_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        # The demo is the release gate's; the engine only dispatches to it.
        from backend.app.demo import run_demo  # noqa: PLC0415 - engine stays gate-agnostic

        return run_demo(
            decisions=args.decisions, workers=args.workers, seed=args.seed, out=sys.stdout
        )
    if args.command == "status":
        exposed = _world_writable(os.path.abspath(args.dir))
        result = _aggregate(args, compact=False, exposed=[])
        sys.stdout.write(format_status(result, now=time.time(), problems=exposed))
        if exposed and not args.allow_world_writable:
            raise _Failure(f"{exposed[0]}{_WORLD_WRITABLE_HINT}")
        return 0
    if args.command == "aggregate":
        return _run_aggregate(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover


_WORLD_WRITABLE_HINT = (
    "; any local user could plant files there (chmod o-w, or pass --allow-world-writable)"
)


def _world_writable(directory: str) -> list[str]:
    """Why ``directory`` is open to every local user: it, or its archive, is world-writable.

    A missing directory or archive is not a problem here (the aggregation reports it).
    """
    found: list[str] = []
    try:
        st = os.stat(directory)
    except OSError:
        return found
    if st.st_mode & stat.S_IWOTH:
        found.append(
            f"shard directory {directory} is world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
        )
    try:
        arch = os.lstat(os.path.join(directory, ARCHIVE_NAME))
    except OSError:
        return found
    if stat.S_ISREG(arch.st_mode) and arch.st_mode & stat.S_IWOTH:
        found.append(
            f"archive {os.path.join(directory, ARCHIVE_NAME)} is world-writable "
            f"(mode {stat.S_IMODE(arch.st_mode):04o})"
        )
    return found


def _aggregate(
    args: argparse.Namespace, *, compact: bool, exposed: list[str] | None = None
) -> Aggregate:
    directory = os.path.abspath(args.dir)
    if exposed is None:
        exposed = _world_writable(directory)
    if exposed and not args.allow_world_writable:
        raise _Failure(f"{exposed[0]}{_WORLD_WRITABLE_HINT}")
    try:
        return aggregate_dir(
            directory,
            args.schema_obj,
            namespace=args.namespace,
            compact=compact,
            lock_timeout=args.lock_timeout,
        )
    except FileNotFoundError:
        raise _Failure(f"shard directory {directory} does not exist") from None
    except NotADirectoryError:
        raise _Failure(f"{directory} is not a directory") from None
    except LockTimeoutError as exc:
        raise _Failure(
            f"directory lock {exc.path} not free within {exc.timeout:g} s "
            "(another aggregation is running or hung)",
            EXIT_LOCK_TIMEOUT,
        ) from None
    except ShardWriteError as exc:
        raise _Failure(f"compaction failed, nothing was removed: {exc}") from None
    except SchemaError as exc:
        raise _Failure(f"{directory}: {exc}") from None
    except OSError as exc:
        raise _Failure(f"cannot use shard directory {directory}: {exc.strerror or exc}") from None


def _run_aggregate(args: argparse.Namespace) -> int:
    started = time.time()
    # Refused before anything is read or compacted: a refused run changes nothing.
    target = None if args.textfile is None else _textfile_target(args)
    try:
        result = _aggregate(args, compact=not args.no_compact)
        text = result.render_json() + "\n" if args.format == "json" else result.render_prometheus()
        if target is None:
            sys.stdout.write(text)
        else:
            _write_textfile(target, text)
    except _Failure as failure:
        if target is not None and _remove_stale(target, started):
            failure.args = (f"{failure}; removed the previous {target} (now stale)",)
        raise
    return 0


def _textfile_target(args: argparse.Namespace) -> str:
    """The absolute path to write; a symlink is refused unless ``--follow-symlinks``.

    The textfile usually sits in node_exporter's directory and the aggregator often runs as
    root: a link planted there must not make it write elsewhere.
    """
    target: str = os.path.abspath(args.textfile)
    if not os.path.islink(target):
        return target
    if not args.follow_symlinks:
        raise _Failure(
            f"textfile {target} is a symlink (to {os.readlink(target)}); refusing to write "
            "through it (pass --follow-symlinks to write to its target)"
        )
    return os.path.realpath(target)


def _write_textfile(target: str, text: str) -> None:
    directory, name = os.path.split(target)
    _remove_orphan_temp_files(directory, name)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _Failure(f"cannot write textfile {target}: {exc.strerror or exc}") from None
    try:
        # Hidden and not ending in .prom: node_exporter's textfile collector never reads it.
        write_file_atomically(
            f".{name}.{os.getpid()}.tmp",
            name,
            text.encode(),
            sync=True,
            mode=0o644,
            step_prefix="textfile",
            dir_fd=dir_fd,
        )
    except OSError as exc:
        raise _Failure(f"cannot write textfile {target}: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)


def _remove_orphan_temp_files(directory: str, name: str) -> None:
    """Remove temp files of earlier runs killed mid-write (other pids, older than a minute).

    Writers use their own pid in the name, so a live concurrent run's temp file is younger than
    any run can take to write a textfile; it is never touched.
    """
    prefix, now = f".{name}.", time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for entry in names:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid = entry[len(prefix) : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        path = os.path.join(directory, entry)
        try:
            if os.lstat(path).st_mtime < now - ORPHAN_TEMP_AGE_S:
                os.unlink(path)
        except OSError:
            continue


def _remove_stale(path: str, started: float) -> bool:
    """Remove a textfile no successful run has refreshed since ``started``.

    A failed run must not leave the previous counts looking current: with the file gone,
    Prometheus sees the series disappear (and absent() alerts fire) instead of frozen counters.
    A file refreshed after we started belongs to a concurrent successful run and stays.
    """
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_mtime >= started:
            return False  # only a file we wrote: never a link, a directory or a device
        os.unlink(path)
    except OSError:
        return False
    return True


# -- status ----------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m ago"
    return f"{hours // 24}d ago"


def format_status(result: Aggregate, *, now: float, problems: Sequence[str] = ()) -> str:
    """The ``status`` table of an aggregation (read-only), with ``problems`` of the directory
    itself (such as being world-writable) at the top."""
    lines: list[str] = []
    out = lines.append
    for problem in problems:
        out(f"{'PROBLEM':<11} {problem}")
    arch = result.archive
    if arch.problem is not None:
        archive = f"BROKEN ({arch.problem}); compaction will quarantine it"
    elif arch.saturated:
        archive = "SATURATED: totals held at 2**63-1 (hostile or corrupt archive)"
    elif arch.exists:
        archive = (
            f"{arch.absorbed_total} dead incarnations absorbed, "
            f"last compaction {_age(None if arch.updated_at is None else now - arch.updated_at)}"
        )
    else:
        archive = "none yet (nothing compacted)"
    pending = sum(1 for s in result.shards if s.action == "quarantined")
    out(f"{'directory':<11} {result.directory}")
    out(f"{'archive':<11} {archive}")
    out(f"{'shards':<11} {result.live} live, {result.dead} dead")
    out(
        f"{'quarantine':<11} {result.quarantined_total} quarantined in total"
        f" ({pending} waiting for compaction), {result.quarantine_entries} kept in quarantine/"
    )
    out("")
    header = ("STATE", "PID", "HOST", "GEN", "LAST SAVE", "COUNT", "FORMAT", "FILE")
    rows: list[tuple[str, ...]] = []
    for s in result.shards:
        total = "-" if s.counts is None else str(sum(s.counts))
        state: str = s.state or ""
        if s.action in ("quarantined", "skipped"):
            flag = "BROKEN" if s.action == "skipped" else "QUARANTINE"
            state = f"{state}/{flag}" if state else flag
        rows.append(
            (
                state,
                "-" if s.pid is None else str(s.pid),
                (s.host or "-")[:20],
                "-" if s.generation is None else str(s.generation),
                _age(None if s.saved_at is None else now - s.saved_at),
                total,
                "-" if s.format is None else f"v{s.format}",
                s.name if s.problem is None else f"{s.name}  ({s.problem})",
            )
        )
    if rows:
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
        for row in (header, *rows):
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            out("  ".join((*cells, row[-1])).rstrip())
    else:
        out("(no shard files)")
    out("")
    out("totals")
    snap = result.pipeline_snapshot()
    i = 0
    for fam in snap.schema.families:
        for value in fam.values if fam.label is not None else (None,):
            series = fam.name if value is None else f'{fam.name}{{{fam.label}="{value}"}}'
            out(f"  {series:<60} {snap.counts[i]}")
            i += 1
    return "\n".join(lines) + "\n"
