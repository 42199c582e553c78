"""The ``gatemetrics`` command line: ``aggregate`` and ``status``, and the subcommands that
installed distributions register (entry point group ``gatemetrics.commands``; the release-gate
service registers ``demo``).

Exit status (also listed by ``--help``): 0 on success; 1 when the work failed (a missing or
unreadable directory, an unwritable target, no schema known for the directory, shards or an
archive written with another schema) or was refused (a shard directory or archive that any user
may write, a textfile target that is a symlink: ``status`` still prints its table, with the
problem on top); 75 (``EX_TEMPFAIL``) when the directory lock was not free in time, so a wrapper
can retry (the textfile is left alone then: the run holding the lock writes it); 2 for usage
errors (argparse's convention). Every failure prints exactly one line on stderr,
``gatemetrics: error: ...``. Warnings about broken shard files (quarantined or skipped) go to
stderr too, one line each, and do not fail the run.

Which schema: ``--schema MODULE:NAME`` pins one; without it the directory says
(:func:`gatemetrics.aggregate.recorded_schema`: its ``schema.json``, else its v2 shards'
headers). Which namespace: ``--namespace``, else the one ``schema.json`` records for that
schema, else the prefix all the schema's family names share
(:func:`gatemetrics.aggregate.default_namespace`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from gatemetrics._checks import check_seconds
from gatemetrics._format import schema_fingerprint
from gatemetrics.aggregate import (
    ARCHIVE_NAME,
    Aggregate,
    aggregate_dir,
    default_namespace,
    read_dir,
    recorded_schema,
)
from gatemetrics.errors import LockTimeoutError, SchemaError, ShardWriteError
from gatemetrics.exposition import samples
from gatemetrics.schema import Schema
from gatemetrics.shards import write_file_atomically

__all__ = [
    "COMMANDS_GROUP",
    "EXIT_FAILURE",
    "EXIT_LOCK_TIMEOUT",
    "EXIT_USAGE",
    "ORPHAN_TEMP_AGE_S",
    "STATUS_JSON_VERSION",
    "format_status",
    "main",
    "status_document",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOCK_TIMEOUT = 75  # sysexits.h EX_TEMPFAIL: try again later
ORPHAN_TEMP_AGE_S = 60.0
#: Entry point group of the subcommands other distributions add (``name = "module:register"``;
#: ``register(subparsers)`` adds a parser whose ``handler`` default runs it).
COMMANDS_GROUP = "gatemetrics.commands"
#: Where a subcommand the engine knows of comes from, for the usage error when it is missing.
_KNOWN_COMMANDS = {
    "demo": "the release-gate service (from a clone: python3 -m pip install ./service)",
}
#: Version of the ``status --json`` document; bumped only when a field changes meaning or goes.
STATUS_JSON_VERSION = 1
_NAMESPACE = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*\Z")

_EPILOG = """exit status:
  0   success
  1   the work failed or was refused (missing or unreadable directory, no schema known,
      shards or archive written with another schema, world-writable directory, symlinked
      textfile); one line on stderr: gatemetrics: error: ...
  2   usage error (unknown option or command, bad value)
  75  the directory lock was not free in time (EX_TEMPFAIL: retry later)
"""


def _version() -> str:
    try:
        return importlib.metadata.version("gatemetrics")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for: reading the distribution's metadata
    imports modules (email) that a process which has dropped privileges may not reach."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        sys.stdout.write(f"gatemetrics {_version()}\n")
        parser.exit()


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and the registered subcommands that could not be loaded (name: why)."""
    parser = argparse.ArgumentParser(
        prog="gatemetrics",
        description="Exact multiprocess counters: aggregate a shard directory, show its state.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agg = sub.add_parser(
        "aggregate",
        help="merge a shard directory into one exposition (and compact it)",
        description="Merge every shard of a directory with its archive and print the "
        "exposition, or write it atomically (mode 0644) to a textfile for node_exporter. "
        "Compacts the directory unless --no-compact is given.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_dir_options(agg)
    agg.add_argument(
        "--textfile",
        metavar="PATH",
        help="write here atomically instead of stdout (e.g. .../textfile/release_gate.prom)",
    )
    agg.add_argument(
        "--format",
        choices=("prometheus", "openmetrics", "json"),
        default="prometheus",
        help="output format: the Prometheus text format 0.0.4 (default, what node_exporter's "
        "textfile collector reads), OpenMetrics 1.0.0 (stdout only), or JSON",
    )
    agg.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="write to the target of a --textfile that is a symlink (refused by default)",
    )
    agg.add_argument(
        "--no-compact",
        action="store_true",
        help="only read, under shared locks as a scrape does: do not fold dead shards into the "
        "archive or remove anything",
    )

    status = sub.add_parser(
        "status",
        help="show the shards of a directory, their owners and totals",
        description="A readable table of a shard directory: live and dead shards, the age of "
        "each shard's last save, its format (v2, or v1 of the previous release), the archive, "
        "quarantined files and totals. Changes nothing.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_dir_options(status)
    status.add_argument(
        "--json",
        action="store_true",
        help="print what the table shows as one JSON document (see the README)",
    )
    return parser, _register_commands(sub)


def _register_commands(sub: Any) -> dict[str, str]:
    """Let every installed ``gatemetrics.commands`` entry point add its subcommand.

    A registration that fails (its distribution is broken) costs only its own command: the
    others, and aggregate and status, still work, and running it says why.
    """
    broken: dict[str, str] = {}
    for entry in sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=_ep_name):
        if entry.name in sub.choices:
            continue  # the first distribution to claim a name keeps it
        try:
            register: Callable[[Any], object] = entry.load()
            register(sub)
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin is its own
            broken[entry.name] = f"{entry.value} failed to load: {type(exc).__name__}: {exc}"
    return broken


def _ep_name(entry: importlib.metadata.EntryPoint) -> str:
    return entry.name


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
        default=None,
        metavar="MODULE:NAME",
        help="the Schema the shards were written with (default: the one the directory "
        "records in schema.json, else in its shards)",
    )
    parser.add_argument(
        "--namespace",
        default=None,
        type=_namespace,
        help="prefix of the pipeline families (default: the one schema.json records, else "
        "the prefix the schema's family names share, else gatemetrics)",
    )
    parser.add_argument(
        "--allow-world-writable",
        action="store_true",
        help="use a shard directory or archive that any user may write (refused by default: "
        "any local user could then plant files in it)",
    )


def _namespace(text: str) -> str:
    if not _NAMESPACE.match(text):
        # No leading underscore or colon: "__" is Prometheus's, colons are for recording rules.
        raise argparse.ArgumentTypeError(f"must match [a-zA-Z][a-zA-Z0-9_]*, not {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        # The engine's one duration rule (finite, not negative), then the CLI's own bound.
        seconds = check_seconds("--lock-timeout", value, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds > 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600: {text}")
    return seconds


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
    parser, broken = _build_parser()
    args_list = sys.argv[1:] if argv is None else list(argv)
    _check_command_present(parser, args_list, broken)
    args = parser.parse_args(args_list)
    if args.command in ("aggregate", "status"):
        if not args.dir:
            parser.error("--dir is required when GATEMETRICS_DIR is not set")
        if args.command == "aggregate" and args.format == "openmetrics" and args.textfile:
            # node_exporter's textfile collector parses the text format only: an OpenMetrics
            # counter's "# TYPE x counter" with samples "x_total" would break its gathering.
            parser.error(
                "--format openmetrics writes to stdout only; a --textfile is read by "
                "node_exporter, which wants the text format (--format prometheus)"
            )
        args.schema_obj = None if args.schema is None else _load_schema(parser, args.schema)
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


def _check_command_present(
    parser: argparse.ArgumentParser, argv: list[str], broken: dict[str, str]
) -> None:
    """A usage error naming what to install for a subcommand that is not registered (argparse
    would only say "invalid choice")."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in broken:
        parser.error(f"command {command!r} is installed but broken: {broken[command]}")
    if command in _KNOWN_COMMANDS and command not in _subcommands(parser):
        parser.error(
            f"command {command!r} is not installed; it comes with {_KNOWN_COMMANDS[command]}"
        )


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # argparse offers no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


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
    if args.command == "status":
        exposed = _world_writable(os.path.abspath(args.dir))
        result = _aggregate(args, compact=False, exposed=[])
        writable = os.access(result.directory, os.W_OK)
        if args.json:
            doc = status_document(result, now=time.time(), problems=exposed, writable=writable)
            sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode() + "\n")
        else:
            text = format_status(result, now=time.time(), problems=exposed, writable=writable)
            sys.stdout.write(text)
        if exposed and not args.allow_world_writable:
            raise _Failure(f"{exposed[0]}{_WORLD_WRITABLE_HINT}")
        return 0
    if args.command == "aggregate":
        return _run_aggregate(args)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:  # pragma: no cover - every registered parser sets one
        raise _Failure(f"command {args.command!r} registered no handler")
    return handler(args)


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


def _directory_failure(directory: str, exc: OSError) -> _Failure:
    if isinstance(exc, FileNotFoundError):
        return _Failure(f"shard directory {directory} does not exist")
    if isinstance(exc, NotADirectoryError):
        return _Failure(f"{directory} is not a directory")
    return _Failure(f"cannot use shard directory {directory}: {exc.strerror or exc}")


def _schema_and_namespace(args: argparse.Namespace, directory: str) -> tuple[Schema, str]:
    """``--schema``, else the schema the directory records; ``--namespace``, else the recorded
    one (when it was recorded for that schema), else the schema's default."""
    pinned: Schema | None = args.schema_obj
    if pinned is not None and args.namespace is not None:
        return pinned, args.namespace  # nothing to read
    try:
        found = recorded_schema(directory)
    except OSError as exc:
        raise _directory_failure(directory, exc) from None
    for problem in found.problems:
        logging.getLogger("gatemetrics.cli").warning("%s", problem)
    schema = pinned if pinned is not None else found.schema
    if schema is None:
        raise _Failure(
            f"no schema known for {directory}: no schema.json "
            "and no v2 shard records one; pass --schema MODULE:NAME"
        )
    namespace = args.namespace
    if namespace is None and found.namespace is not None and found.schema == schema:
        namespace = found.namespace
    return schema, namespace or default_namespace(schema)


def _aggregate(
    args: argparse.Namespace, *, compact: bool, exposed: list[str] | None = None
) -> Aggregate:
    directory = os.path.abspath(args.dir)
    if exposed is None:
        exposed = _world_writable(directory)
    if exposed and not args.allow_world_writable:
        raise _Failure(f"{exposed[0]}{_WORLD_WRITABLE_HINT}")
    schema, namespace = _schema_and_namespace(args, directory)
    try:
        if not compact:
            # A run that writes nothing into the directory (status, --no-compact) reads under
            # shared locks, as a scrape does: it never queues behind a scrape or another reader.
            return read_dir(directory, schema, namespace=namespace, lock_timeout=args.lock_timeout)
        return aggregate_dir(
            directory,
            schema,
            namespace=namespace,
            compact=True,
            lock_timeout=args.lock_timeout,
        )
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
        raise _directory_failure(directory, exc) from None


def _run_aggregate(args: argparse.Namespace) -> int:
    started = time.time()
    # Refused before anything is read or compacted: a refused run changes nothing.
    target = None if args.textfile is None else _textfile_target(args)
    try:
        result = _aggregate(args, compact=not args.no_compact)
        if args.format == "json":
            text = result.render_json() + "\n"
        elif args.format == "openmetrics":
            text = result.render_openmetrics()
        else:
            text = result.render_prometheus()
        if target is None:
            sys.stdout.write(text)
        else:
            _write_textfile(target, text)
    except _Failure as failure:
        # Another aggregation holds the lock: it writes the textfile, which is not stale.
        if failure.status == EXIT_LOCK_TIMEOUT:
            raise
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


_READ_ONLY = "read-only for this user: status reads it; compaction needs write access"


def _archive_text(result: Aggregate, now: float) -> str:
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
    return archive


def _declared_series(schema: Schema) -> int:
    """Series as declared: a histogram's series counts once, not once per bucket slot."""
    return sum(f.series for f in schema.families)


def _schema_text(schema: Schema) -> str:
    return (
        f"{schema_fingerprint(schema).hex()[:12]} ({len(schema.families)} families, "
        f"{_declared_series(schema)} series)"
    )


def _shard_state(s: Any) -> str:
    state: str = s.state or ""
    if s.action in ("quarantined", "skipped"):
        flag = "BROKEN" if s.action == "skipped" else "QUARANTINE"
        state = f"{state}/{flag}" if state else flag
    return state


def _series_totals(result: Aggregate) -> list[tuple[str, int]]:
    totals: list[tuple[str, int]] = []
    for fam in samples(result.pipeline_snapshot()):
        for sample in fam.samples:
            # A histogram's line is its series' count (``<name>_count``), not its buckets.
            if sample.suffix not in ("", "_count"):
                continue
            name = f"{fam.name}{sample.suffix}"
            inner = ",".join(f'{label}="{value}"' for label, value in sample.labels)
            totals.append((f"{name}{{{inner}}}" if inner else name, int(sample.value)))
    return totals


def format_status(
    result: Aggregate, *, now: float, problems: Sequence[str] = (), writable: bool = True
) -> str:
    """The ``status`` table of an aggregation (read-only), with ``problems`` of the directory
    itself (such as being world-writable) at the top, and a line saying so when this user
    cannot write the directory (``writable`` false)."""
    lines: list[str] = []
    out = lines.append
    for problem in problems:
        out(f"{'PROBLEM':<11} {problem}")
    archive = _archive_text(result, now)
    pending = sum(1 for s in result.shards if s.action == "quarantined")
    out(f"{'directory':<11} {result.directory}")
    if not writable:
        out(f"{'access':<11} {_READ_ONLY}")
    out(f"{'schema':<11} {_schema_text(result.schema)}, namespace {result.namespace}")
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
        rows.append(
            (
                _shard_state(s),
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
    for series, count in _series_totals(result):
        out(f"  {series:<60} {count}")
    return "\n".join(lines) + "\n"


def status_document(
    result: Aggregate, *, now: float, problems: Sequence[str] = (), writable: bool = True
) -> dict[str, Any]:
    """What the ``status`` table shows, as ``status --json`` prints it (keys sorted).

    Stable: fields are only ever added; one that changes meaning or goes bumps ``version``
    (:data:`STATUS_JSON_VERSION`). Times are Unix seconds (``null`` when unknown), ages are
    seconds before ``now``. The layout is documented in the README ("gatemetrics status").
    """
    arch = result.archive
    pending = sum(1 for s in result.shards if s.action == "quarantined")
    return {
        "version": STATUS_JSON_VERSION,
        "directory": result.directory,
        "writable": writable,
        "problems": list(problems),
        "schema": {
            "fingerprint": schema_fingerprint(result.schema).hex(),
            "families": len(result.schema.families),
            "series": _declared_series(result.schema),
            "namespace": result.namespace,
        },
        "archive": {
            "exists": arch.exists,
            "absorbed_total": arch.absorbed_total,
            "quarantined_total": arch.quarantined_total,
            "updated_at": arch.updated_at,
            "problem": arch.problem,
            "saturated": arch.saturated,
        },
        "shards": {"live": result.live, "dead": result.dead},
        "quarantine": {
            "quarantined_total": result.quarantined_total,
            "waiting": pending,
            "kept": result.quarantine_entries,
        },
        "files": [
            {
                "name": s.name,
                "state": s.state,
                "action": s.action,
                "pid": s.pid,
                "host": s.host,
                "generation": s.generation,
                "saved_at": s.saved_at,
                "age": None if s.saved_at is None else max(0.0, now - s.saved_at),
                "count": None if s.counts is None else sum(s.counts),
                "format": s.format,
                "problem": s.problem,
            }
            for s in result.shards
        ],
        "totals": dict(_series_totals(result)),
    }
