"""The service's settings (service/backend/app/settings.py): the environment read once, into
absolute paths and bounded limits; a bad value names its variable."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from backend.app.main import Settings, create_app
from gatemetrics import Durability
from tests.app.asgi_client import (
    lifespan,
)
from tests.processes import run_python

pytestmark = pytest.mark.anyio


def test_settings_come_from_the_environment_as_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"GATEMETRICS_DIR": "shards", "RELEASE_GATE_AUDIT_LOG": "a.log"})
    assert settings == Settings(str(tmp_path / "shards"), str(tmp_path / "a.log"), ())


def test_settings_default_to_the_xdg_state_directory() -> None:
    env = {"XDG_STATE_HOME": "/srv/state", "HOME": "/home/gate", "GATEMETRICS_DIR": ""}
    settings = Settings.from_env(env)
    assert settings.metrics_dir == "/srv/state/gatemetrics/shards"
    assert settings.audit_log == "/srv/state/gatemetrics/release-gate-audit.jsonl"
    assert settings.defaulted == ("GATEMETRICS_DIR", "RELEASE_GATE_AUDIT_LOG")
    # A relative XDG_STATE_HOME is ignored, as the XDG spec says: ~/.local/state instead.
    fallback = Settings.from_env({"XDG_STATE_HOME": "state", "HOME": "/home/gate"})
    assert fallback.metrics_dir == "/home/gate/.local/state/gatemetrics/shards"


def test_settings_refuse_to_guess_without_a_home(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.path.expanduser returns "~" unchanged when the user has no home directory at all;
    # simulated here because the test user always has one.
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    with pytest.raises(ValueError, match="set GATEMETRICS_DIR and RELEASE_GATE_AUDIT_LOG"):
        Settings.from_env({"GATEMETRICS_DIR": "/srv/shards"})
    # Nothing to guess when both are set.
    assert (
        Settings.from_env({"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"}).defaulted == ()
    )


def test_settings_default_to_write_through_with_process_crash_durability(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = Settings.from_env({"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"})
    assert (settings.persistence, settings.save_interval, settings.durability) == (
        "write-through",
        5.0,
        Durability.PROCESS_CRASH,
    )
    assert Settings("/a", "/b").durability is Durability.PROCESS_CRASH
    # Empty values count as unset, like the path variables.
    empty = {"GATEMETRICS_PERSISTENCE": "", "GATEMETRICS_DURABILITY": ""}
    with caplog.at_level(logging.WARNING):
        assert Settings.from_env(
            {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"} | empty
        ) == (settings)
    assert caplog.records == []  # nothing deprecated was used


def test_settings_bound_scrapes_and_bodies_by_default_and_from_the_environment() -> None:
    paths = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"}
    settings = Settings.from_env(paths)
    assert (settings.metrics_lock_timeout, settings.metrics_concurrency) == (1.0, 2)
    assert settings.body_timeout == 5.0
    settings = Settings.from_env(
        paths
        | {
            "RELEASE_GATE_METRICS_LOCK_TIMEOUT": "0.25",
            "RELEASE_GATE_METRICS_CONCURRENCY": "3",
            "RELEASE_GATE_BODY_TIMEOUT": "2",
        }
    )
    assert (settings.metrics_lock_timeout, settings.metrics_concurrency) == (0.25, 3)
    assert settings.body_timeout == 2.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELEASE_GATE_METRICS_LOCK_TIMEOUT", "61"),
        ("RELEASE_GATE_METRICS_LOCK_TIMEOUT", "0"),
        ("RELEASE_GATE_BODY_TIMEOUT", "nan"),
        ("RELEASE_GATE_METRICS_CONCURRENCY", "0"),
        ("RELEASE_GATE_METRICS_CONCURRENCY", "65"),
        ("RELEASE_GATE_METRICS_CONCURRENCY", "two"),
    ],
)
def test_settings_refuse_unusable_service_limits_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b", name: value})


def test_settings_read_persistence_interval_and_durability(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = Settings.from_env(
            {
                "GATEMETRICS_DIR": "/a",
                "RELEASE_GATE_AUDIT_LOG": "/b",
                "GATEMETRICS_PERSISTENCE": "periodic",
                "GATEMETRICS_SAVE_INTERVAL": "2.5",
                "GATEMETRICS_DURABILITY": "power-loss",
            }
        )
    assert (settings.persistence, settings.save_interval, settings.durability) == (
        "periodic",
        2.5,
        Durability.POWER_LOSS,
    )
    assert caplog.records == []


@pytest.mark.parametrize(
    ("legacy", "new"),
    [
        ("none", Durability.PROCESS_CRASH),
        ("file", Durability.POWER_LOSS),
        ("full", Durability.POWER_LOSS),
    ],
)
def test_settings_accept_the_previous_durability_names_with_one_warning_line(
    legacy: str, new: Durability, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b"}
    # Logged (operators read logs), not a DeprecationWarning: pytest turns warnings into errors
    # here, so this also checks that none is raised.
    with caplog.at_level(logging.WARNING):
        settings = Settings.from_env(env | {"GATEMETRICS_DURABILITY": legacy})
    assert settings.durability is new
    assert settings == Settings.from_env(env | {"GATEMETRICS_DURABILITY": new.value})
    record = caplog.records[0]  # the first from_env call's; the second used the new name
    assert (record.name, record.levelno) == ("backend.app.main", logging.WARNING)
    message = record.getMessage()
    assert "\n" not in message
    assert "GATEMETRICS_DURABILITY" in message
    assert f"{legacy!r}" in message
    assert "deprecated" in message
    assert f"it now means {new.value!r}" in message
    assert len(caplog.records) == 1


@pytest.mark.parametrize("value", ["FULL", "fsync", "power_loss", "Process-Crash", "sync"])
def test_settings_refuse_an_unknown_durability_listing_the_choices(value: str) -> None:
    env = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b", "GATEMETRICS_DURABILITY": value}
    with pytest.raises(ValueError, match="GATEMETRICS_DURABILITY") as info:
        Settings.from_env(env)
    assert "process-crash" in str(info.value)
    assert "power-loss" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEMETRICS_PERSISTENCE", "write_through"),
        ("GATEMETRICS_PERSISTENCE", "off"),
        ("GATEMETRICS_DURABILITY", "FULL"),
        ("GATEMETRICS_DURABILITY", "fsync"),
        ("GATEMETRICS_SAVE_INTERVAL", "soon"),
        ("GATEMETRICS_SAVE_INTERVAL", "0"),
        ("GATEMETRICS_SAVE_INTERVAL", "-1"),
        ("GATEMETRICS_SAVE_INTERVAL", "nan"),
        ("GATEMETRICS_SAVE_INTERVAL", "inf"),
        ("GATEMETRICS_SAVE_INTERVAL", "86401"),
    ],
)
def test_settings_refuse_bad_persistence_values_naming_the_variable(name: str, value: str) -> None:
    env = {"GATEMETRICS_DIR": "/a", "RELEASE_GATE_AUDIT_LOG": "/b", name: value}
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)


async def test_default_paths_are_created_private_to_the_user(tmp_path: Path) -> None:
    app = create_app(Settings.from_env({"XDG_STATE_HOME": str(tmp_path / "state")}))
    assert await lifespan(app, "startup", "shutdown") == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]
    root = tmp_path / "state" / "gatemetrics"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert (root / "shards").is_dir()
    assert (root / "release-gate-audit.jsonl").is_file()


def test_the_gunicorn_config_reads_the_settings_without_importing_the_app(tmp_path: Path) -> None:
    # gunicorn loads its config in the master: importing the app there would build its module
    # state before the fork, and tie the master's start to the whole app's imports.
    config = Path(__file__).parents[2] / "service" / "backend" / "gunicorn.conf.py"
    result = run_python(
        "import os, runpy, sys\n"
        f"os.environ['GATEMETRICS_DIR'] = {str(tmp_path / 'shards')!r}\n"
        f"os.environ['RELEASE_GATE_AUDIT_LOG'] = {str(tmp_path / 'audit.jsonl')!r}\n"
        f"config = runpy.run_path({str(config)!r})\n"
        "assert 'backend.app.main' not in sys.modules, 'the config imported the app'\n"
        "assert 'backend.app.settings' in sys.modules\n"
        "print(config['_settings'].metrics_dir)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'shards'}\n"
