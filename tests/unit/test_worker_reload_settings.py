"""A worker's reload (`serve --workers N`) compares the file's settings with those it serves:
the ports it serves are the supervisor's, not a change the file made."""

from __future__ import annotations

import dataclasses

from rerank_service.config import Settings
from rerank_service.config.server import ServerConfig
from rerank_service.server import needs_restart
from rerank_service.workers import as_served

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
