"""monitoring/ ships inside the gatemetrics wheel (pyproject's hatch force-include).

The wheel is really built (pip, hatchling from the build-system table), and what an installed
package then finds through importlib.resources is byte for byte what the repository holds: the
alert rules with their promtool unit tests, the dashboard, the runbook and the Kubernetes
manifests, and nothing of the tooling that generates or validates them.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

import pytest

from tests.monitoring_tools import (
    ALERT_RULES,
    DASHBOARD,
    MONITORING,
    POD_MONITOR,
    PROMETHEUS_RULE,
    PROMTOOL_TESTS,
    ROOT,
    RUNBOOK,
    run,
)

# Run by the nox session `monitoring`; the `tests` session deselects this marker.
pytestmark = pytest.mark.monitoring

SHIPPED = [ALERT_RULES, *PROMTOOL_TESTS, DASHBOARD, RUNBOOK, PROMETHEUS_RULE, POD_MONITOR]
PREFIX = "gatemetrics/monitoring/"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gatemetrics wheel, built from the working tree as a user's pip would build it."""
    out = tmp_path_factory.mktemp("wheel")
    result = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("gatemetrics-*.whl")
    return path


def shipped_name(path: Path) -> str:
    return PREFIX + path.relative_to(MONITORING).as_posix()


def test_wheel_carries_rules_dashboard_runbook_and_manifests(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = {n for n in archive.namelist() if n.startswith(PREFIX)}
        assert names == {shipped_name(p) for p in SHIPPED}
        for path in SHIPPED:
            assert archive.read(shipped_name(path)) == path.read_bytes(), path.name


def test_wheel_leaves_the_tooling_out(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for unwanted in ("node_modules", "package.json", "package-lock.json", ".mjs", "build"):
        assert not [n for n in names if n.startswith(PREFIX) and unwanted in n], unwanted


def test_installed_package_finds_them_through_importlib_resources(wheel: Path) -> None:
    # The wheel on sys.path (zipimport) stands for an installed package: the README's recipe
    # must find every file there, not in the repository's checkout.
    script = f"""
import sys
sys.path.insert(0, {str(wheel)!r})
from importlib.resources import files
import gatemetrics
assert gatemetrics.__file__.startswith({str(wheel)!r}), gatemetrics.__file__
monitoring = files("gatemetrics") / "monitoring"
for name in {[p.relative_to(MONITORING).as_posix() for p in SHIPPED]!r}:
    item = monitoring.joinpath(*name.split("/"))
    sys.stdout.buffer.write(name.encode() + b" " + str(len(item.read_bytes())).encode() + b"\\n")
"""
    result = run(sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    sizes = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert sizes == {
        p.relative_to(MONITORING).as_posix(): str(len(p.read_bytes())) for p in SHIPPED
    }


def test_runbook_links_resolve_inside_the_wheel(wheel: Path) -> None:
    # The runbook links the rules and the dashboard by relative path; the layout under
    # gatemetrics/monitoring/ keeps those links working in an installed package.
    links = re.findall(r"\]\((\.\./[^)#\s]+)\)", RUNBOOK.read_text(encoding="utf-8"))
    assert links
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    base = Path(shipped_name(RUNBOOK)).parent
    for link in links:
        target = (base / link).as_posix()
        # Normalise "a/b/../c" without touching the file system.
        parts: list[str] = []
        for part in target.split("/"):
            if part == "..":
                parts.pop()
            else:
                parts.append(part)
        assert "/".join(parts) in names, link


def test_readme_recipe_reads_the_shipped_files(wheel: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    (recipe,) = re.findall(r"```python\n(.*?)\n```", section, flags=re.DOTALL)
    # Run as a user would, against the wheel; then show what it read and the file it handed out.
    script = (
        f"import sys\nsys.path.insert(0, {str(wheel)!r})\n{recipe}\n"
        "assert rules.startswith('# Alert rules of team ptf-admin.'), rules[:80]\n"
        "with as_file(monitoring / 'kubernetes' / 'prometheusrule.yaml') as path:\n"
        "    sys.stdout.write(path.read_text(encoding='utf-8'))\n"
    )
    result = run(sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    first, rest = result.stdout.split("\n", 1)
    assert first.endswith("prometheusrule.yaml")  # the path the recipe printed
    assert rest == PROMETHEUS_RULE.read_text(encoding="utf-8")
