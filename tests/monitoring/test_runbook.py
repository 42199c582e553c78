"""The runbook (monitoring/runbooks/ptf-admin-runbook.md).

Every alert's runbook_url lands on its own heading (GitHub's anchor rules), every alert has a
section with the four parts on-call needs and every section belongs to an alert (or is one of
the general sections), every PromQL snippet parses (promtool) and runs (a real Prometheus), and
the audit-log commands really find the offending request in a JSON-lines log (bash, grep, jq).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from backend.app.testing.gate_metrics import GateMetricStore
from tests.monitoring_tools import (
    ROOT,
    RUNBOOK,
    RUNBOOK_URL,
    Heading,
    MonitoringStack,
    alert_names,
    fenced_blocks,
    github_slug,
    markdown_headings,
    promtool_check_expressions,
    rules_by_alert,
    run,
    textfile_exposition,
    write_textfile,
)
from tests.processes import require_tool

# Run by the nox session `monitoring`; the `tests` session deselects this marker.
pytestmark = pytest.mark.monitoring

# Sections that belong to no single alert.
GENERAL_SECTIONS = ("Overview", "Where things are on a host")
# The parts of every alert section, in order.
ALERT_PARTS = ("What it means", "Diagnostic PromQL", "Likely root causes", "Response steps")
BREACH = "ReleaseGateContractBreach"
AUDIT_FAILURE = "ReleaseGateAuditWriteFailure"


def runbook() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


def sections() -> dict[str, str]:
    """Level-2 heading text -> the markdown under it, up to the next level-2 heading."""
    lines = runbook().splitlines()
    level2 = [h for h in markdown_headings(runbook()) if h.level == 2]
    ends = [h.line - 1 for h in level2[1:]] + [len(lines)]
    return {h.text: "\n".join(lines[h.line : end]) for h, end in zip(level2, ends, strict=True)}


def parts(section: str) -> dict[str, str]:
    """Level-3 heading text -> the markdown under it, inside one section."""
    pieces = re.split(r"^### (.+)$", section, flags=re.M)
    return dict(zip(pieces[1::2], pieces[2::2], strict=True))


def headings() -> list[Heading]:
    return markdown_headings(runbook())


# -- anchors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("ReleaseGateContractBreach", "releasegatecontractbreach"),
        ("Where things are on a host", "where-things-are-on-a-host"),
        ("`release_gate.prom`: stale?", "release_gateprom-stale"),
        ("Step 1 -- check (the) disk", "step-1----check-the-disk"),
        ("[Linked](https://example.com) **bold** text", "linked-bold-text"),
        ("Ünïcode Überschrift", "ünïcode-überschrift"),
        ("  Trailing spaces  ", "trailing-spaces"),
    ],
)
def test_github_slug_follows_githubs_rules(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_repeated_headings_get_numbered_anchors() -> None:
    text = "# A\n## What it means\n```sh\n# a comment\n```\n## What it means\n### What it means\n"
    assert [h.anchor for h in markdown_headings(text)] == [
        "a",
        "what-it-means",
        "what-it-means-1",
        "what-it-means-2",
    ]


def test_every_runbook_url_lands_on_its_alerts_own_heading() -> None:
    by_anchor = {h.anchor: h for h in headings()}
    for alert, rule in rules_by_alert().items():
        base, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert base == RUNBOOK_URL
        assert base.endswith("/blob/main/" + RUNBOOK.relative_to(ROOT).as_posix())
        assert anchor in by_anchor, f"{alert}: #{anchor} is no heading of the runbook"
        assert by_anchor[anchor].text == alert
        assert by_anchor[anchor].level == 2


def test_every_link_inside_the_runbook_resolves() -> None:
    anchors = {h.anchor for h in headings()}
    links = re.findall(r"\]\(([^)\s]+)\)", runbook())
    assert links
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, link
        elif not link.startswith("https://"):
            assert (RUNBOOK.parent / link).resolve().exists(), link


# -- sections --------------------------------------------------------------------------------


def test_every_alert_has_a_section_and_every_section_an_alert() -> None:
    titles = [h.text for h in headings() if h.level == 2]
    assert len(titles) == len(set(titles)), "a section appears twice"
    alert_sections = [t for t in titles if t not in GENERAL_SECTIONS]
    assert sorted(alert_sections) == sorted(alert_names())
    assert all(g in titles for g in GENERAL_SECTIONS)
    (title,) = [h.text for h in headings() if h.level == 1]
    assert "runbook" in title


@pytest.mark.parametrize("alert", alert_names())
def test_alert_section_has_meaning_promql_causes_and_numbered_steps(alert: str) -> None:
    section = parts(sections()[alert])
    assert tuple(p for p in section if p in ALERT_PARTS) == ALERT_PARTS, list(section)
    assert len(section["What it means"].split()) >= 30
    assert fenced_blocks(section["Diagnostic PromQL"], "promql")
    causes = re.findall(r"^- \S", section["Likely root causes"], flags=re.M)
    assert len(causes) >= 2
    steps = [int(n) for n in re.findall(r"^(\d+)\. \S", section["Response steps"], flags=re.M)]
    assert steps == list(range(1, len(steps) + 1)), steps
    assert len(steps) >= 3


def test_breach_section_shows_how_to_find_the_request_in_the_audit_log() -> None:
    section = sections()[BREACH]
    commands = "\n".join(fenced_blocks(section, "sh"))
    assert "$RELEASE_GATE_AUDIT_LOG" in commands
    assert "CONTRACT_BREACH_NO_OVERRIDE" in commands
    assert "$from" in commands
    assert "$to" in commands


# -- PromQL ----------------------------------------------------------------------------------


def promql_snippets() -> list[str]:
    return fenced_blocks(runbook(), "promql")


def test_every_promql_snippet_parses(promtool: str, tmp_path: Path) -> None:
    snippets = promql_snippets()
    assert len(snippets) >= 2 * len(alert_names())
    result = promtool_check_expressions(promtool, snippets, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(snippets)} rules found" in result.stdout


def test_every_promql_snippet_runs_in_real_prometheus(monitoring_stack: MonitoringStack) -> None:
    instance = monitoring_stack.node_exporter_url.removeprefix("http://")
    for snippet in promql_snippets():
        # The placeholder on-call replaces with the alert's instance label.
        result = monitoring_stack.query(snippet.replace("<instance>", instance))
        # A snippet that looks for trouble ("> 0", "== 1", "unless", absent()) may be empty on
        # a healthy host; any other must answer, or it names a series or label that does not
        # exist.
        filtered = re.search(r"(>|<|==)\s*\d+\s*$|\bunless\b|\babsent\(", snippet.strip())
        assert result or filtered, f"no data for:\n{snippet}"


# -- the audit log commands ------------------------------------------------------------------


def audit_entry(logged_at: float, **fields: Any) -> dict[str, Any]:
    """An entry with every key of the durable audit log (team notes); ``fields`` override."""
    entry: dict[str, Any] = {
        "ts_ms": int(logged_at * 1000),
        "logged_at": logged_at,
        "decision": "DENY",
        "allowed": False,
        "verdict": "release_block",
        "reasons": ["TIER_FAIL"],
        "override_applied": False,
        "override": None,
        "release_scope": "svc-a",
        "audit_detail": "denied: TIER_FAIL",
        "pid": 4242,
        "host": "gate-1",
    }
    entry.update(fields)
    return entry


def run_commands(script: str, log: Path) -> subprocess.CompletedProcess[str]:
    """Run runbook commands in bash with strict options, as on-call would paste them."""
    bash = require_tool("bash")
    require_tool("jq")
    env = {"PATH": os.environ["PATH"], "RELEASE_GATE_AUDIT_LOG": str(log), "LC_ALL": "C.UTF-8"}
    return run(bash, "-c", f"set -euo pipefail\n{script}", env=env)


def window_block() -> str:
    (block,) = fenced_blocks(sections()["Where things are on a host"], "sh")
    assert "FROM=" in block
    assert "TO=" in block
    return block


def test_audit_log_commands_find_only_the_offending_request(tmp_path: Path) -> None:
    now = time.time()
    override = {
        "ttl_seconds": 3600,
        "created_at_ms": int(now * 1000) - 400_000,
        "scope": "svc-a",
        "reason": "hotfix, ship it",
        "created_by": "alice",
    }
    breach = audit_entry(
        now - 300.25,
        reasons=["GUARD_VIOLATION", "TIER_FAIL"],
        override=override,
        audit_detail="override rejected: CONTRACT_BREACH_NO_OVERRIDE (GUARD_VIOLATION)",
    )
    entries = [
        # A breach outside the window (two hours ago).
        audit_entry(
            now - 7200,
            reasons=["OPS_GATE_FAIL"],
            override={**override, "created_by": "bob"},
            release_scope="svc-old",
            audit_detail="override rejected: CONTRACT_BREACH_NO_OVERRIDE (OPS_GATE_FAIL)",
        ),
        breach,
        # grep -F matches this line (the marker is in the scope), jq must not.
        audit_entry(now - 200, release_scope="CONTRACT_BREACH_NO_OVERRIDE-lookalike"),
        audit_entry(now - 100, decision="ALLOW", allowed=True, verdict="release_ok", reasons=[]),
    ]
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))

    json_block, table_block = fenced_blocks(sections()[BREACH], "sh")
    found = run_commands(window_block() + json_block, log)
    assert found.returncode == 0, found.stderr
    assert [orjson.loads(line) for line in found.stdout.splitlines()] == [breach]

    table = run_commands(window_block() + table_block, log)
    assert table.returncode == 0, table.stderr
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(breach["logged_at"])))
    row = [when, "gate-1", "4242", "svc-a", "GUARD_VIOLATION,TIER_FAIL", "alice", "hotfix, ship it"]
    assert table.stdout.splitlines() == ["\t".join(row)]


def sync_failed_marker(logged_at: float, offsets: list[int]) -> dict[str, Any]:
    """The marker JsonlAuditLog appends after lines it could not confirm (audit.py)."""
    return {
        "event": "AUDIT_SYNC_FAILED",
        "audit_error": "EIO",
        "entries": len(offsets),
        "offsets": offsets,
        "pid": 4242,
        "host": "gate-1",
        "logged_at": logged_at,
    }


def test_audit_log_commands_find_the_denied_checks_a_marker_lists(tmp_path: Path) -> None:
    now = time.time()
    lines = [
        orjson.dumps(audit_entry(now - 7300, release_scope="svc-old")),
        orjson.dumps(audit_entry(now - 100, decision="ALLOW", allowed=True, release_scope="ok")),
        orjson.dumps(
            audit_entry(now - 90, decision="ALLOW", allowed=True, release_scope="x\u00e9")
        ),
        orjson.dumps(audit_entry(now - 90, decision="ALLOW", allowed=True, release_scope="y")),
    ]
    offsets = [sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))]
    old_marker = sync_failed_marker(now - 7200, [offsets[0]])  # outside the window
    marker = sync_failed_marker(now - 80, [offsets[2], offsets[3]])
    log = tmp_path / "audit.jsonl"
    log.write_bytes(
        b"".join(line + b"\n" for line in [*lines, orjson.dumps(old_marker), orjson.dumps(marker)])
    )
    markers_block, lines_block = fenced_blocks(sections()[AUDIT_FAILURE], "sh")
    found = run_commands(window_block() + markers_block, log)
    assert found.returncode == 0, found.stderr
    assert [orjson.loads(line) for line in found.stdout.splitlines()] == [marker]
    denied = run_commands(window_block() + lines_block, log)
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout.encode().splitlines() == lines[2:]  # byte offsets, not characters


def test_every_audit_log_command_of_the_runbook_runs(tmp_path: Path) -> None:
    now = time.time()
    log = tmp_path / "audit.jsonl"
    entries = [
        audit_entry(now - 60, release_scope="svc-a"),
        audit_entry(now - 50, release_scope="svc-b"),
        audit_entry(now - 40, release_scope="svc-a"),
        sync_failed_marker(now - 30, [0]),  # the other commands must skip markers
    ]
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))
    blocks = [b for b in fenced_blocks(runbook(), "sh") if "RELEASE_GATE_AUDIT_LOG" in b]
    assert len(blocks) >= 3
    for block in blocks:
        result = run_commands(window_block() + block, log)
        assert result.returncode in {0, 1}, (block, result.stderr)  # 1: grep found nothing
        assert not result.stderr, (block, result.stderr)
    (spike_block,) = fenced_blocks(sections()["ReleaseGateDenySpike"], "sh")
    by_scope = run_commands(window_block() + spike_block, log).stdout.split()
    assert by_scope == ["2", "svc-a", "1", "svc-b"]


def test_duplicate_series_command_names_each_series_and_the_files_that_export_it(
    tmp_path: Path,
) -> None:
    # ReleaseGateTextfileGatheringErrors: the command on-call runs in the textfile directory.
    (block,) = fenced_blocks(sections()["ReleaseGateTextfileGatheringErrors"], "sh")
    default = "/var/lib/node_exporter/textfile"
    assert f"cd {default}\n" in block
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    exposition = textfile_exposition(GateMetricStore())
    write_textfile(textfile_dir, exposition)
    write_textfile(textfile_dir, exposition, "a-copy.prom")  # the stale copy
    # Label values with spaces, a series in one file only, and a file that is not *.prom.
    write_textfile(textfile_dir, '# HELP x X.\n# TYPE x gauge\nx{a="b c"} 1\ny 1\n', "b.prom")
    write_textfile(textfile_dir, '# HELP x X.\n# TYPE x gauge\nx{a="b c"} 2\n', "c.prom")
    write_textfile(textfile_dir, exposition, "release_gate.prom.bak")
    result = run_commands(block.replace(default, str(textfile_dir)), tmp_path / "audit.jsonl")
    assert result.returncode == 0, result.stderr
    gate_series = [
        line.rsplit(" ", 1)[0] for line in exposition.splitlines() if not line.startswith("#")
    ]
    expected = sorted(
        [f"{series}: a-copy.prom release_gate.prom" for series in gate_series]
        + ['x{a="b c"}: b.prom c.prom']
    )
    assert result.stdout.splitlines() == expected
