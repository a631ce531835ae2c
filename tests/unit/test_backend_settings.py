"""A backend is built from its deployment's typed config alone, so a reload keeps every
deployment whose config is equal: a change to a front-door setting touches none."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from rerank_service.config import Settings
from rerank_service.config.deployments import deployment_config
from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.config.upstream import UpstreamDeploymentConfig

BACKENDS = Path(__file__).resolve().parents[2] / "rerank_service" / "backends"

# Settings of the server, not of any deployment: listening, callers, limits, logging, HTTP,
# workers, and the routes' own (the retry budget, how a call is split among chunks).
FRONT_DOOR: dict[str, Any] = {
    "host": "127.0.0.1", "port": 50999, "http_port": 8099, "http_body_timeout": 3.0,
    "http_keepalive_timeout": 9.0, "http_call_timeout": 7.0, "workers": 3, "log_level": "debug",
    "max_concurrent_requests": 10, "max_open_calls": 20, "max_connections": 30, "handshake_timeout": 2.0,
    "shutdown_grace": 1.0, "metrics_port": 9999, "retry_budget": 0.5, "chunk_concurrency": 2,
    "stream_idle_timeout": 5.0, "max_watch_streams": 3,
}  # fmt: skip


def test_no_backend_reads_the_global_settings() -> None:
    for module in BACKENDS.rglob("*.py"):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rerank_service.config")
            for alias in node.names
        }
        assert "Settings" not in imported, module


@pytest.mark.parametrize("backend", ["upstream", "local"])
def test_a_front_door_setting_leaves_the_deployment_config_equal(backend: Any) -> None:
    before = deployment_config(Settings(backend=backend))
    after = deployment_config(dataclasses.replace(Settings(backend=backend), **FRONT_DOOR))

    assert after == before
    assert hash(after) == hash(before)  # the reload's key


@pytest.mark.parametrize(
    ("backend", "change", "config_type"),
    [
        ("upstream", {"upstream_timeout": 3.0}, UpstreamDeploymentConfig),
        ("upstream", {"upstream_breaker_failures": 9}, UpstreamDeploymentConfig),
        ("upstream", {"max_documents": 50}, UpstreamDeploymentConfig),
        ("local", {"max_batch_size": 4}, LocalDeploymentConfig),
        ("local", {"dtype": "float16"}, LocalDeploymentConfig),
    ],
)
def test_a_deployment_setting_changes_its_config(
    backend: Any, change: dict[str, Any], config_type: type[object]
) -> None:
    before = deployment_config(Settings(backend=backend))
    after = deployment_config(dataclasses.replace(Settings(backend=backend), **change))

    assert isinstance(after, config_type)
    assert after != before
