"""SIGTERM while the server starts (a model loading) stops it at once, exit 0.

Real `rerank-service serve` processes whose local model never finishes loading: a
`sitecustomize` module on their PYTHONPATH (a test hook, written here) replaces the model
loader with one that blocks its thread for good, as a load nothing can interrupt does. A
process stopped then must not wait for the load (nor be killed at the end of the drain);
under `--workers` the supervisor exits 0, and a worker it has to kill while still starting
(its event loop blocked) is no failed drain. Nor must one stopped while a reload (SIGHUP)
loads a model.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.process import StartingProcess
from tests.support.waiting import wait_until

# Where the hook blocks: "thread", the model load in its thread (the event loop runs on);
# "loop", the backend's start itself, on the event loop (the process cannot handle SIGTERM).
_HOOK = """
import json
import os
import threading

from rerank_service.backends.local import backend

BLOCKED = "test: model load blocked"


def _say_blocked():
    print(json.dumps({"event": BLOCKED, "pid": os.getpid()}), flush=True)


def _loader(choice):
    def load(source, device, dtype):
        _say_blocked()
        threading.Event().wait()  # for good: a load nothing interrupts

    return load


async def _start(self):
    _say_blocked()
    threading.Event().wait()  # on the event loop: no signal handler ever runs


if os.environ.get("RERANK_TEST_BLOCK") == "thread":
    backend._default_loader = _loader
elif os.environ.get("RERANK_TEST_BLOCK") == "loop":
    backend.LocalBackend.start = _start
"""
BLOCKED = "test: model load blocked"


@pytest.fixture
def hook(tmp_path: Path) -> dict[str, str]:
    """The environment that puts the blocking loader on the server's PYTHONPATH."""
    (tmp_path / "sitecustomize.py").write_text(_HOOK, encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def processes() -> Iterator[list[StartingProcess]]:
    started: list[StartingProcess] = []
    yield started
    for process in started:  # a test that failed leaves none behind
        process.kill()


def test_sigterm_while_the_model_loads_exits_zero_at_once_without_waiting_for_it(
    hook: dict[str, str], processes: list[StartingProcess]
) -> None:
    server = StartingProcess(["--device", "cpu"], env={**hook, "RERANK_TEST_BLOCK": "thread"})
    processes.append(server)
    server.wait_for(BLOCKED)

    code = server.stop(timeout=30)  # the load never ends: waiting for it would never exit

    names = [event.get("event") for event in server.events()]
    assert code == 0, server.lines[-20:]
    assert "serving" not in names
    assert names[-3:] == ["stopping while starting", "draining", "stopped"]
    assert "Traceback" not in "".join(server.lines)


def test_sigterm_to_workers_still_loading_exits_zero_at_once(
    hook: dict[str, str], processes: list[StartingProcess]
) -> None:
    args = ["--device", "cpu", "--workers", "2", "--shutdown-grace", "1"]
    supervisor = StartingProcess(args, env={**hook, "RERANK_TEST_BLOCK": "thread"})
    processes.append(supervisor)
    supervisor.wait_for(BLOCKED, count=2)

    # Not killed at the end of the drain (11 s): each worker stops at once.
    code = supervisor.stop(timeout=30)

    stopped = supervisor.named("worker stopped")
    assert code == 0, supervisor.lines[-20:]
    assert sorted((event["worker"], event.get("exit_code")) for event in stopped) == [(0, 0), (1, 0)]
    assert len(supervisor.named("stopping while starting")) == 2
    assert supervisor.named("worker killed") == []


def test_a_worker_killed_while_still_starting_is_no_failed_drain(
    hook: dict[str, str], processes: list[StartingProcess]
) -> None:
    args = ["--device", "cpu", "--workers", "2", "--shutdown-grace", "1"]
    supervisor = StartingProcess(args, env={**hook, "RERANK_TEST_BLOCK": "loop"})
    processes.append(supervisor)
    supervisor.wait_for(BLOCKED, count=2)

    code = supervisor.stop(timeout=60)  # they cannot stop: killed after grace + 10 s

    killed = supervisor.named("worker killed")
    assert code == 0, supervisor.lines[-20:]
    assert [event["exit_code"] for event in supervisor.named("supervisor stopped")] == [0]
    assert sorted((event["worker"], event["why"]) for event in killed) == [
        (0, "start too long"),
        (1, "start too long"),
    ]


KEY_ENV = "STOP_WHILE_STARTING_TEST_UPSTREAM_KEY"


def _write(path: Path, upstream: FakeUpstream, local: bool) -> Path:
    routes: list[dict[str, Any]] = [
        {
            "name": "search",
            "deployments": [
                {
                    "format": "dashscope",
                    "url": upstream.url,
                    "name": "up",
                    "model": "qwen3-rerank",
                    "api_key_env": KEY_ENV,
                }
            ],
        }
    ]
    if local:
        routes.append({"name": "loc", "deployments": [{"format": "local", "source": "bundled"}]})
    document = {"allow_backend_change": True, "models": routes}
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def test_sigterm_while_a_reload_loads_a_model_exits_zero_at_once_without_waiting_for_it(
    tmp_path: Path, upstream: FakeUpstream, hook: dict[str, str], processes: list[StartingProcess]
) -> None:
    """The drain ended (`stopped`), then the process waited for the reload's load thread."""
    config = _write(tmp_path / "routes.yaml", upstream, local=False)
    server = StartingProcess(
        ["--config", str(config), "--device", "cpu"],
        env={**hook, "RERANK_TEST_BLOCK": "thread", KEY_ENV: UPSTREAM_KEY},
    )
    processes.append(server)
    server.wait_for("serving")
    _write(config, upstream, local=True)
    server.process.send_signal(signal.SIGHUP)
    server.wait_for(BLOCKED)  # the reload's model load, which never ends

    code = server.stop(timeout=30)

    names = [event.get("event") for event in server.events()]
    assert code == 0, server.lines[-20:]
    assert names[-2:] == ["draining", "stopped"]
    assert "reloaded" not in names
    assert "Traceback" not in "".join(server.lines)


def test_a_sighup_while_the_server_drains_is_ignored_and_the_exit_waits_for_no_load(
    tmp_path: Path, upstream: FakeUpstream, hook: dict[str, str], processes: list[StartingProcess]
) -> None:
    """A SIGHUP after SIGTERM (a config reloader beside a terminating pod) still reloaded:
    a model it began to load held the exit after `stopped`, past any grace."""
    config = _write(tmp_path / "routes.yaml", upstream, local=False)
    server = StartingProcess(
        ["--config", str(config), "--device", "cpu", "--shutdown-grace", "120"],
        env={**hook, "RERANK_TEST_BLOCK": "thread", KEY_ENV: UPSTREAM_KEY},
    )
    processes.append(server)
    server.wait_for("serving")
    port = next(event["port"] for event in server.events() if event.get("event") == "listening")
    upstream.inject(Fault(delay=NEVER))  # a call in flight holds the drain open
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        held = rerank_pb2_grpc.RerankServiceStub(channel).Rerank.future(
            rerank_pb2.RerankRequest(model="search", query="q", documents=["a", "b"]), timeout=120
        )
        wait_until(lambda: upstream.in_flight == 1, what="the call at the upstream")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("draining")
        _write(config, upstream, local=True)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("reload ignored")
        held.cancel()  # the drain's last call: the server stops
        code = server.process.wait(timeout=60)

    names = [event.get("event") for event in server.events()]
    assert code == 0, server.lines[-20:]
    assert BLOCKED not in names
    assert names[-1] == "stopped"
