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


CALLER = "sk-caller-one-0123456789"


@pytest.fixture
def keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, ConfigSnapshot]:
    """A file with caller keys (`api_keys_file`) and a deployment with its own key, copied."""
    for name in ("RERANK_API_KEYS", "RERANK_UPSTREAM_API_KEY", "DASHSCOPE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SNAPSHOT_UPSTREAM_KEY", "sk-upstream-test-key-0123456789")
    keys = tmp_path / "keys"
    keys.write_text(f"{CALLER}\n", encoding="utf-8")
    keys.chmod(0o600)
    config = tmp_path / "rerank.yaml"
    _keyed_routes(config, "first", api_keys_file=str(keys))
    directory = tmp_path / "supervisor"
    directory.mkdir()
    taken = ConfigSnapshot({"config": str(config)}, str(directory))
    taken.copy()
    return config, taken


def _keyed_routes(path: Path, route: str, *, keyless: bool = False, **settings: str) -> None:
    deployment = {"format": "dashscope", "url": "http://upstream.example", "model": "qwen3-rerank"}
    if not keyless:
        deployment["api_key_env"] = "SNAPSHOT_UPSTREAM_KEY"
    document = {**settings, "models": [{"name": route, "deployments": [deployment]}]}
    path.write_text(json.dumps(document), encoding="utf-8")


def test_a_file_that_drops_the_caller_keys_is_copied_with_them_as_started(
    keyed: tuple[Path, ConfigSnapshot],
) -> None:
    """A reload keeps the caller keys as started: the workers serve the first copy's."""
    config, snapshot = keyed
    _keyed_routes(config, "second")  # no api_keys_file any more

    settings = snapshot.copy()

    assert _served(snapshot) == ["second"]
    assert [key.reveal() for key in settings.api_keys] == [CALLER]
    assert [key.reveal() for key in snapshot.api_keys] == [CALLER]


def test_a_keyless_deployment_the_started_caller_keys_refuse_leaves_the_copy_as_it_was(
    keyed: tuple[Path, ConfigSnapshot],
) -> None:
    """Every worker refuses it (its keys stay as started); made the copy, a worker restarted
    from it passed callers' tokens upstream."""
    config, snapshot = keyed
    _keyed_routes(config, "second", keyless=True)  # no api_keys_file, a deployment with no key
    checked: list[Settings] = []

    with pytest.raises(
        ConfigError, match=r"has no key while RERANK_API_KEYS is set.*caller keys stay as started"
    ):
        snapshot.copy(check=checked.append)

    assert checked == []
    assert _served(snapshot) == ["first"]
    assert not snapshot.path.with_name(snapshot.path.name + ".new").exists()
    assert [key.reveal() for key in snapshot.api_keys] == [CALLER]
