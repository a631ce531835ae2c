"""A worker's reload (`serve --workers N`) compares the file's settings with those it serves:
the ports it serves are the supervisor's, not a change the file made."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rerank_service.config import Settings
from rerank_service.config.server import ServerConfig
from rerank_service.server import needs_restart
from rerank_service.workers import as_restarted, as_served

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
