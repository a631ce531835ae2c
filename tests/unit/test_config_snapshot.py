"""The config file's copy that `serve --workers N` serves (config/snapshot.py): what a
SIGHUP may put in its place, and what a failed copy leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rerank_service.config import ConfigError, Settings
from rerank_service.config.snapshot import ConfigSnapshot


def _routes(path: Path, route: str) -> None:
    deployment = {"format": "dashscope", "url": "http://upstream.example", "model": "qwen3-rerank"}
    path.write_text(json.dumps({"models": [{"name": route, "deployments": [deployment]}]}), encoding="utf-8")


def _served(snapshot: ConfigSnapshot) -> list[str]:
    return [route["name"] for route in json.loads(snapshot.path.read_text(encoding="utf-8"))["models"]]


@pytest.fixture
def snapshot(tmp_path: Path) -> ConfigSnapshot:
    config = tmp_path / "rerank.yaml"
    _routes(config, "first")
    directory = tmp_path / "supervisor"
    directory.mkdir()
    taken = ConfigSnapshot({"config": str(config)}, str(directory))
    taken.copy()
    _routes(config, "second")
    return taken


def test_a_file_the_check_refuses_leaves_the_copy_as_it_was(snapshot: ConfigSnapshot) -> None:
    """The check stands for what the workers' reload builds: a file every worker would
    refuse must not become the copy a restarted worker starts from."""

    def refuse(settings: Settings) -> None:
        raise ConfigError(f"models[0] {settings.models[0].name} cannot be built")

    with pytest.raises(ConfigError, match="second cannot be built"):
        snapshot.copy(check=refuse)

    assert _served(snapshot) == ["first"]
    assert not snapshot.path.with_name(snapshot.path.name + ".new").exists()


def test_a_copy_the_disk_will_not_take_is_a_refusal_not_a_crash(snapshot: ConfigSnapshot) -> None:
    """A full or read-only disk: an OSError escaping the supervisor's SIGHUP ended its
    supervising while the workers went on serving."""
    snapshot.path.with_name(snapshot.path.name + ".new").mkdir()  # the copy cannot be written

    with pytest.raises(ConfigError, match="cannot copy it for the workers"):
        snapshot.copy()

    assert _served(snapshot) == ["first"]


def test_a_file_that_passes_becomes_the_copy(snapshot: ConfigSnapshot) -> None:
    checked: list[str] = []

    snapshot.copy(check=lambda settings: checked.append(settings.models[0].name))

    assert checked == ["second"]
    assert _served(snapshot) == ["second"]
