"""Tests of backend.app.worker: the gunicorn worker class runs uvicorn on asyncio's loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_worker_class_pins_asyncio_and_keeps_the_rest_of_uvicorns_defaults() -> None:
    pytest.importorskip("uvicorn_worker", reason="needs the server extra: pip install .[server]")
    from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]

    from backend.app.worker import ReleaseGateWorker

    assert issubclass(ReleaseGateWorker, UvicornWorker)
    assert ReleaseGateWorker.CONFIG_KWARGS == {**UvicornWorker.CONFIG_KWARGS, "loop": "asyncio"}


def test_gunicorn_conf_uses_the_release_gate_worker() -> None:
    tree = ast.parse((ROOT / "backend" / "gunicorn.conf.py").read_text(encoding="utf-8"))
    assigned = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    value = assigned["worker_class"]
    assert isinstance(value, ast.Constant)
    assert value.value == "backend.app.worker.ReleaseGateWorker"


def test_the_server_extra_does_not_bring_uvloop() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    server = config["project"]["optional-dependencies"]["server"]
    assert not any("uvloop" in d or "[standard]" in d for d in server)
