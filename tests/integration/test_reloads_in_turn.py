"""Reloads asked for while one is still under way run in turn, and the last one asked for
is what is served.

Reload A adds a deployment whose start is held back (as a local model's load is slow);
reload B, asked for meanwhile, replaces the route's deployments with another one. Run at
once, A would finish last and put back its routes, with the deployment B had retired in
them, closed: the route would answer nothing until the next reload.

A deployment a reload retires, once closed, gives each call still waiting for its
connections a status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from rerank.v1 import rerank_pb2

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config import Settings
from rerank_service.config.sources import load_settings
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import Metrics
from rerank_service.routing import Router
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.logs import LogCapture
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

KEY_ENV = "RELOAD_TURN_TEST_UPSTREAM_KEY"
HANG = 10.0  # guards against a hang only


def _write(path: Path, deployments: list[dict[str, Any]], **settings: Any) -> Path:
    document = {**settings, "models": [{"name": "search", "deployments": deployments}]}
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def _deployment(name: str, url: str) -> dict[str, Any]:
    return {"format": "dashscope", "url": url, "name": name, "model": "qwen3-rerank", "api_key_env": KEY_ENV}


def _load(path: Path) -> Settings:
    return load_settings({"config": str(path)}, env={KEY_ENV: UPSTREAM_KEY})


def test_a_reload_asked_for_during_another_runs_after_it_and_wins(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deployment named by its host `localhost` (the same fake upstream) starts only
    # once the test lets it.
    asked_to_start, may_start = threading.Event(), threading.Event()
    build = UpstreamBackend.from_config

    def held_back(config: UpstreamDeploymentConfig, metrics: Metrics | None = None) -> UpstreamBackend:
        backend = build(config, metrics)
        if "//localhost:" in config.connection.url:
            start = backend.start

            async def start_when_let() -> None:
                asked_to_start.set()
                await asyncio.to_thread(may_start.wait, HANG)
                await start()

            backend.start = start_when_let  # type: ignore[method-assign]
        return backend

    monkeypatch.setattr(UpstreamBackend, "from_config", held_back)
    local_url = upstream.url.replace("127.0.0.1", "localhost")
    first = _write(tmp_path / "first.yaml", [_deployment("first", upstream.url)])
    grown = _write(
        tmp_path / "grown.yaml", [_deployment("first", upstream.url), _deployment("slow", local_url)]
    )
    replaced = _write(tmp_path / "replaced.yaml", [_deployment("second", upstream.url)])

    with ServerThread(_load(first)) as server:
        assert server.server is not None
        reload_a = server.begin(server.server.reload(lambda: _load(grown)))
        assert asked_to_start.wait(HANG), "reload A never started its new deployment"
        reload_b = server.begin(server.server.reload(lambda: _load(replaced)))
        may_start.set()
        outcomes = (reload_a.result(HANG), reload_b.result(HANG))
        router = server.server.backend
        assert isinstance(router, Router)
        served = sorted(deployment.name for deployment in router.deployments)
        answer = server.stub.Rerank(
            rerank_pb2.RerankRequest(model="search", query="red apple", documents=["a red apple", "a car"]),
            timeout=30,
        )

    assert outcomes == (True, True)
    assert served == ["second"]
    assert len(answer.output.results) == 2


def test_a_reload_asked_for_while_the_server_starts_waits_for_its_deployments(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP while a deployment starts (a local model loading for seconds) dropped it
    mid-start: closed, then started into (a micro-batcher running for a backend no route
    serves), SERVING held back until it had."""
    asked_to_start, may_start = threading.Event(), threading.Event()
    build = UpstreamBackend.from_config
    events: list[str] = []

    def held_back(config: UpstreamDeploymentConfig, metrics: Metrics | None = None) -> UpstreamBackend:
        backend = build(config, metrics)
        start, close = backend.start, backend.close
        name = "slow" if "//localhost:" in config.connection.url else "second"

        async def start_when_let() -> None:
            if name == "slow":
                asked_to_start.set()
                await asyncio.to_thread(may_start.wait, HANG)
            await start()
            events.append(f"{name} started")

        async def recorded_close() -> None:
            events.append(f"{name} closed")
            await close()

        backend.start = start_when_let  # type: ignore[method-assign]
        backend.close = recorded_close  # type: ignore[method-assign]
        return backend

    monkeypatch.setattr(UpstreamBackend, "from_config", held_back)
    local_url = upstream.url.replace("127.0.0.1", "localhost")
    first = _write(tmp_path / "first.yaml", [_deployment("slow", local_url)])
    replaced = _write(tmp_path / "replaced.yaml", [_deployment("second", upstream.url)])

    with ServerThread(_load(first), start=False) as server:
        assert server.server is not None
        starting = server.begin(server.server.start())
        assert asked_to_start.wait(HANG), "the first deployment never started"
        reloading = server.begin(server.server.reload(lambda: _load(replaced)))
        server.run(asyncio.sleep(0))  # the loop has taken the reload up: it ran as far as it may
        waited = not reloading.done()
        may_start.set()
        port = starting.result(HANG)
        outcome = reloading.result(HANG)
        router = server.server.backend
        assert isinstance(router, Router)
        served = [deployment.name for deployment in router.deployments]

    assert port > 0
    assert waited  # not run while the first deployment was starting
    assert outcome is True
    assert served == ["second"]
    # The dropped one started whole before the reload began, and was closed after.
    assert events[:3] == ["slow started", "second started", "slow closed"]


def test_a_reload_says_which_changed_settings_it_left_as_started(
    tmp_path: Path, upstream: FakeUpstream, logs: LogCapture
) -> None:
    """A reload applies the routes and the callers; the file's other settings take a restart,
    and were silently ignored while the log said `reloaded`."""
    first = _write(tmp_path / "first.yaml", [_deployment("first", upstream.url)])
    moved = _write(tmp_path / "moved.yaml", [_deployment("moved", upstream.url)])
    restart = _write(
        tmp_path / "restart.yaml",
        [_deployment("moved", upstream.url)],
        log_level="error",
        max_concurrent_requests=1,
        cache_ttl=5,
    )

    def as_served(path: Path) -> Settings:  # where the harness serves, as serve's flags would stay
        return dataclasses.replace(_load(path), host="127.0.0.1", port=0)

    with ServerThread(_load(first)) as server:
        assert server.server is not None
        routes_only = server.run(server.server.reload(lambda: as_served(moved)))
        quiet = [e for e in logs.events() if e["event"] == "reload left settings as started"]
        with_restart = server.run(server.server.reload(lambda: as_served(restart)))
        said = [e for e in logs.events() if e["event"] == "reload left settings as started"]

    assert (routes_only, with_restart) == (True, True)
    assert quiet == []
    assert [line["settings"] for line in said] == [
        ["admission.max_concurrent_requests", "cache.ttl", "logging.level"]
    ]
    assert said[0]["level"] == "warning"


NEW_KEY_ENV = "RELOAD_TURN_TEST_NEW_UPSTREAM_KEY"
NEW_KEY = "sk-reloaded-key-5f2b9c0e7d1a"


def test_a_key_a_reload_reads_is_masked_in_every_log_line_from_then_on(
    tmp_path: Path, upstream: FakeUpstream, logs: LogCapture
) -> None:
    # logging is configured with the keys of the settings served first (as serve does); the
    # reloaded file names a deployment whose key is read from a variable only it names.
    first = _write(tmp_path / "first.yaml", [_deployment("first", upstream.url)])
    second = _write(
        tmp_path / "second.yaml", [{**_deployment("second", upstream.url), "api_key_env": NEW_KEY_ENV}]
    )
    env = {KEY_ENV: UPSTREAM_KEY, NEW_KEY_ENV: NEW_KEY}

    with ServerThread(load_settings({"config": str(first)}, env=env)) as server:
        assert server.server is not None
        reloaded = server.begin(server.server.reload(lambda: load_settings({"config": str(second)}, env=env)))
        assert reloaded.result(HANG)
        get_logger("tests.reload").error("upstream refused", detail=f"bad key {NEW_KEY}")

    assert "upstream refused" in logs.text
    assert NEW_KEY not in logs.text


def test_calls_waiting_for_a_retired_deployments_connections_get_a_status_when_it_closes(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A reload retires a deployment while calls wait for its (full) connection pool: when
    the grace runs out and it is closed, each caller gets UNAVAILABLE then, not silence
    until its own deadline."""
    upstream.always(Fault(delay=NEVER))
    first = _write(
        tmp_path / "first.yaml",
        [{**_deployment("first", upstream.url), "max_connections": 1}],
        shutdown_grace=0.5,
    )
    replaced = _write(tmp_path / "replaced.yaml", [_deployment("second", upstream.url)])

    def request(number: int) -> rerank_pb2.RerankRequest:
        # Each its own query: the score cache would have the same ones wait for the first.
        return rerank_pb2.RerankRequest(
            model="search", query=f"apple {number}", documents=["an apple", "a car"]
        )

    with ServerThread(_load(first)) as server:
        assert server.server is not None
        router = server.server.backend
        assert isinstance(router, Router)
        [retired] = router.deployments
        calls = [server.stub.Rerank.future(request(number), timeout=60) for number in range(3)]
        # One call holds the only connection (its answer never comes); two wait for it.
        wait_until(
            lambda: retired.in_flight == 3 and len(upstream.requests) == 1,
            what="one call on the connection, two waiting for it",
        )
        assert server.begin(server.server.reload(lambda: _load(replaced))).result(HANG)
        for call in calls:
            call.exception(HANG)  # ended within HANG, not at its own deadline
        codes = [call.code() for call in calls]

    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3


def test_a_reload_that_changes_the_caller_keys_of_its_file_says_they_stay_as_started(
    tmp_path: Path, upstream: FakeUpstream, logs: LogCapture
) -> None:
    """They stay as started, by design (the edge checks them), and were left out silently."""
    keys, other_keys = tmp_path / "keys", tmp_path / "other-keys"
    keys.write_text("sk-caller-one-0123456789\n", encoding="utf-8")
    other_keys.write_text("sk-caller-two-0123456789\n", encoding="utf-8")
    for path in (keys, other_keys):
        path.chmod(0o600)
    first = _write(tmp_path / "first.yaml", [_deployment("first", upstream.url)], api_keys_file=str(keys))
    rotated = _write(
        tmp_path / "rotated.yaml", [_deployment("first", upstream.url)], api_keys_file=str(other_keys)
    )

    def as_served(path: Path) -> Settings:
        return dataclasses.replace(_load(path), host="127.0.0.1", port=0)

    with ServerThread(as_served(first)) as server:
        assert server.server is not None
        assert server.run(server.server.reload(lambda: as_served(rotated))) is True
        said = [e for e in logs.events() if e["event"] == "reload left settings as started"]

    assert [line["settings"] for line in said] == [["callers.api_keys"]]


def test_a_reload_that_drops_the_caller_keys_of_its_file_and_adds_a_keyless_deployment_is_refused(
    tmp_path: Path, upstream: FakeUpstream, logs: LogCapture
) -> None:
    """The caller keys stay as started: a deployment with no key of its own would get no
    key upstream (nor a caller's token to pass through) and fail every call. Start and
    check-config refuse the file with those keys; a reload, which checked the file with its
    own (none), served it."""
    keys = tmp_path / "keys"
    keys.write_text("sk-caller-one-0123456789\n", encoding="utf-8")
    keys.chmod(0o600)
    first = _write(tmp_path / "first.yaml", [_deployment("first", upstream.url)], api_keys_file=str(keys))
    keyless = tmp_path / "keyless.yaml"
    keyless.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": "search", "deployments": [_deployment("first", upstream.url)]},
                    {
                        "name": "other",
                        "deployments": [
                            {
                                "format": "dashscope",
                                "url": upstream.url,
                                "name": "keyless",
                                "model": "qwen3-rerank",
                            }
                        ],
                    },
                ]
            },
            sort_keys=False,
        ),
        encoding="utf-8",
    )
    caller = (("authorization", "Bearer sk-caller-one-0123456789"),)
    search = rerank_pb2.RerankRequest(model="search", query="apple", documents=["an apple", "a car"])

    with ServerThread(_load(first)) as server:
        assert server.server is not None
        router = server.server.backend
        assert isinstance(router, Router)
        reloaded = server.run(server.server.reload(lambda: _load(keyless)))
        served = [model.name for model in router.models()]
        answer = server.stub.Rerank(search, metadata=caller, timeout=HANG)  # the old routes serve on

    assert reloaded is False
    [refused] = [e for e in logs.events() if e["event"] == "reload refused"]
    assert "models[1].deployments[0] has no key while RERANK_API_KEYS is set" in refused["error"]
    assert served == ["search"]
    assert len(answer.output.results) == 2
