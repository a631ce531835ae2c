"""A worker's reload (`serve --workers N`) compares the file's settings with those it serves:
the ports it serves are the supervisor's, not a change the file made."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rerank_service.config import Settings, load_settings
from rerank_service.config.server import ServerConfig
from rerank_service.config.snapshot import ConfigSnapshot
from rerank_service.server import needs_restart
from rerank_service.workers import Supervisor, as_restarted, as_served

# As the file and flags say (port 0: chosen by the supervisor), and as a worker serves them.
STARTED = Settings(port=0, http_port=0, metrics_port=9100)
SERVED = dataclasses.replace(STARTED, port=50123, http_port=8123, metrics_port=None)


def _left_as_started(reloaded: Settings) -> list[str]:
    return needs_restart(ServerConfig.from_settings(SERVED), ServerConfig.from_settings(reloaded))


def test_a_reload_of_the_file_as_it_was_names_no_setting_left_as_started() -> None:
    reloaded = as_served(dataclasses.replace(STARTED), STARTED, SERVED)

    assert _left_as_started(reloaded) == []
    assert (reloaded.port, reloaded.http_port, reloaded.metrics_port) == (50123, 8123, None)


def test_a_port_the_file_changes_is_named_as_left_as_started() -> None:
    edited = dataclasses.replace(STARTED, port=50051, metrics_port=9200)

    reloaded = as_served(edited, STARTED, SERVED)

    assert sorted(_left_as_started(reloaded)) == ["grpc.port", "process.metrics_port"]
    assert reloaded.http_port == 8123  # unchanged in the file: the supervisor's


def test_a_restarted_worker_takes_what_a_reload_applies_and_keeps_what_it_leaves_as_started() -> None:
    """`as_restarted`: the upstream (the routes) as reloaded; the admission limit, the log
    level and the TLS files as started, as the running workers serve them."""
    started = Settings(backend="upstream", upstream_url="http://a.example/rerank", max_concurrent_requests=50)
    reloaded = dataclasses.replace(
        started,
        upstream_url="http://b.example/rerank",
        max_concurrent_requests=5,
        log_level="warning",
        tls_cert=Path("cert.pem"),
        tls_key=Path("key.pem"),
    )

    restarted = as_restarted(reloaded, started)

    assert restarted.upstream_url == "http://b.example/rerank"
    assert (restarted.max_concurrent_requests, restarted.log_level) == (50, "info")
    assert (restarted.tls_cert, restarted.tls_key) == (None, None)
    # Nothing a reload would name as left as started: the config its siblings serve.
    assert needs_restart(ServerConfig.from_settings(started), ServerConfig.from_settings(restarted)) == []


def _local_file(path: Path, device: str | None) -> None:
    chosen = f"device: {device}\n" if device else ""
    path.write_text(
        f"workers: 2\n{chosen}models:\n  - name: demo\n"
        "    deployments: [{format: local, source: bundled}]\n",
        encoding="utf-8",
    )


def test_the_supervisor_refuses_a_reload_a_fresh_start_of_its_workers_would_refuse(tmp_path: Path) -> None:
    """Workers sharing a local model's device (device auto) are refused at start and by
    check-config: a reload to it was taken, and a worker restarted later started from it."""
    config = tmp_path / "rerank.yaml"
    _local_file(config, "cpu")
    args = {"config": str(config)}
    supervisor = Supervisor(load_settings(args, {}), args)
    supervisor._config = ConfigSnapshot(args, str(tmp_path))
    supervisor._config.copy()
    _local_file(config, None)  # device: auto

    assert not supervisor._copy_config_for_reload()

    assert supervisor._accepted.device == "cpu"
    assert "device: cpu" in supervisor._config.path.read_text(encoding="utf-8")


def test_without_a_file_the_supervisor_reads_the_key_files_a_reload_hands_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers read no key file: on SIGHUP the supervisor does, once, and a key file it
    cannot read is a refusal (the workers keep the key they have), not a worker's exit."""
    for name in ("RERANK_UPSTREAM_API_KEY", "RERANK_UPSTREAM_API_KEY_FILE", "DASHSCOPE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    key = tmp_path / "upstream.key"
    key.write_text("sk-upstream-key-first-0123\n", encoding="utf-8")
    key.chmod(0o600)
    args = {
        "backend": "upstream",
        "upstream_url": "http://upstream.example/rerank",
        "upstream_api_key_file": str(key),
    }
    supervisor = Supervisor(load_settings(args), args)
    supervisor._config = ConfigSnapshot(args, str(tmp_path))
    key.write_text("sk-upstream-key-rotated-0123\n", encoding="utf-8")

    assert supervisor._copy_config_for_reload()
    assert supervisor._loaded.upstream_api_key is not None
    assert supervisor._loaded.upstream_api_key.reveal() == "sk-upstream-key-rotated-0123"

    key.rename(tmp_path / "moved.key")
    assert not supervisor._copy_config_for_reload()
    assert supervisor._loaded.upstream_api_key.reveal() == "sk-upstream-key-rotated-0123"
