"""A reload rebuilds a deployment only when a setting its backend reads has changed:
the list of those settings (routing/build.py) is checked against the backends' code."""

from __future__ import annotations

import ast
from pathlib import Path

from rerank_service.config import Settings
from rerank_service.routing.build import BACKEND_SETTINGS

BACKENDS = Path(__file__).resolve().parents[2] / "rerank_service" / "backends"
# Read by backends but not what they are built from: where each value came from (error
# messages), and every configured secret (masking; each deployment's own key is listed).
NOT_BUILT_FROM = {"sources", "secrets"}


def _settings_read_by_backends() -> set[str]:
    read: set[str] = set()
    for module in BACKENDS.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "settings"
            ):
                read.add(node.attr)
    return read


def test_every_setting_a_backend_reads_is_one_a_deployment_is_built_from() -> None:
    read = _settings_read_by_backends()

    assert read  # the scan found the backends' reads
    assert read - NOT_BUILT_FROM <= set(BACKEND_SETTINGS), sorted(
        read - NOT_BUILT_FROM - set(BACKEND_SETTINGS)
    )


def test_the_list_names_settings_and_no_front_door_key() -> None:
    settings = Settings()
    front_door = {
        "host", "port", "http_port", "http_body_timeout", "http_keepalive_timeout", "workers", "log_level",
        "max_concurrent_requests", "max_open_calls", "max_connections", "handshake_timeout", "api_keys",
        "shutdown_grace", "metrics_port", "tls_cert", "models", "retry_budget", "chunk_concurrency",
    }  # fmt: skip

    assert all(hasattr(settings, name) for name in BACKEND_SETTINGS)
    assert all(hasattr(settings, name) for name in front_door)
    assert not front_door & set(BACKEND_SETTINGS)
