"""A reload (SIGHUP) rebuilds only the deployments whose own settings changed: a change to
a front-door key (HTTP, limits, logging) keeps every deployment as it was, with its loaded
model, its upstream connections and its health record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from rerank.v1 import rerank_pb2

from rerank_service.config import Settings
from rerank_service.config.sources import load_settings
from rerank_service.routing import Router
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.support.logs import LogCapture
from tests.support.server import ServerThread
from tests.support.tiny_models import build_tiny_cross_encoder

KEY_ENV = "RELOAD_TEST_UPSTREAM_KEY"


def _write(path: Path, upstream: FakeUpstream, model_dir: Path, **top: Any) -> Path:
    remote = {
        "format": "dashscope", "url": upstream.url, "name": "remote", "model": "qwen3-rerank",
        "api_key_env": KEY_ENV, **top.pop("remote", {}),
    }  # fmt: skip
    local = {"format": "local", "source": str(model_dir), "name": "nearby"}
    document = {
        "device": "cpu",
        "models": [{"name": "search", "deployments": [remote]}, {"name": "tiny", "deployments": [local]}],
        **top,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def _load(path: Path) -> Settings:
    return load_settings({"config": str(path)}, env={KEY_ENV: UPSTREAM_KEY})


def _deployments(server: ServerThread) -> dict[str, Any]:
    assert server.server is not None
    router = server.server.backend
    assert isinstance(router, Router)
    return {deployment.name: deployment for deployment in router.deployments}


def _call(server: ServerThread, model: str) -> None:
    answer = server.stub.Rerank(
        rerank_pb2.RerankRequest(model=model, query="red apple", documents=["a red apple", "a car"]),
        timeout=30,
    )
    assert len(answer.output.results) == 2


@pytest.mark.usefixtures("offline")
def test_a_front_door_change_keeps_every_deployment_and_a_deployment_change_rebuilds_that_one(
    tmp_path: Path, upstream: FakeUpstream, logs: LogCapture
) -> None:
    model_dir = build_tiny_cross_encoder(tmp_path / "cross")
    config = _write(tmp_path / "config.yaml", upstream, model_dir)
    with ServerThread(_load(config)) as server:
        assert server.server is not None
        _call(server, "search")
        _call(server, "tiny")
        before = _deployments(server)
        # The upstream backend's transport holds its connection pool.
        remote_pool = before["remote"].backend._transport
        remote_health = before["remote"].health
        local_backend = before["nearby"].backend
        loaded = sum(1 for event in logs.events() if event.get("event") == "model loaded")

        # Front-door keys only: the HTTP body timeout and the calls in flight.
        _write(config, upstream, model_dir, http_body_timeout=7.5, max_concurrent_requests=77)
        assert server.run(server.server.reload(lambda: _load(config)))
        kept = _deployments(server)
        kept_pool, kept_health = kept["remote"].backend._transport, kept["remote"].health
        _call(server, "search")
        _call(server, "tiny")

        # One deployment's own key: only that one is built anew.
        _write(config, upstream, model_dir, remote={"timeout": 9.0})
        assert server.run(server.server.reload(lambda: _load(config)))
        after = _deployments(server)
        _call(server, "search")
        loaded_after = sum(1 for event in logs.events() if event.get("event") == "model loaded")

    assert kept["remote"] is before["remote"]
    assert kept["nearby"] is before["nearby"]
    assert kept_pool is remote_pool  # its connections
    assert kept_health is remote_health  # its health record
    assert kept["nearby"].backend is local_backend  # its loaded model
    assert loaded_after == loaded  # no model loaded again
    assert after["remote"] is not before["remote"]
    assert after["nearby"] is before["nearby"]
