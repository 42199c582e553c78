"""The ``gatemetrics`` command line: ``demo`` (and, with the aggregator, ``aggregate``/``status``).

Exit status: 0 on success, 1 when the work failed (one clear line on stderr), 2 for usage errors
(argparse's convention).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatemetrics",
        description="Release-gate telemetry: multiprocess counters, aggregation, demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run a self-contained demonstration and compare expected with counted totals",
        description="Make realistic release-gate decisions and print the exposition and a "
        "summary of expected against counted totals.",
    )
    demo.add_argument("--decisions", type=_positive_int, default=2000, help="decisions to make")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (``gatemetrics demo | head``): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a killed pipe writer


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        # The demo is the release gate's; the engine only dispatches to it.
        from backend.app.demo import run_demo  # noqa: PLC0415 - engine stays gate-agnostic

        return run_demo(decisions=args.decisions, seed=args.seed, out=sys.stdout)
    raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover
