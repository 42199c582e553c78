"""Tests of gatemetrics.cli, run as a real subprocess the way users run it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.exposition_parser import parse


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatemetrics", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_prints_exposition_and_an_exact_summary() -> None:
    result = run_cli("demo", "--decisions", "500")
    assert result.returncode == 0, result.stderr
    assert "result: exact" in result.stdout
    assert "MISMATCH" not in result.stdout
    exposition = "".join(
        line + "\n" for line in result.stdout.splitlines() if line.startswith(("#", "release_"))
    )
    families = parse(exposition)
    decisions = families["release_gate_decision_total"].samples
    assert sum(decisions.values()) == 500


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_demo_rejects_bad_decision_counts(value: str) -> None:
    result = run_cli("demo", "--decisions", value)
    assert result.returncode == 2
    assert "--decisions" in result.stderr


def test_closed_stdout_is_not_a_traceback() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatemetrics", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err
    assert proc.returncode in (0, 141)
