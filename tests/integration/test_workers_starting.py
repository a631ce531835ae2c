"""`serve --workers 2` with a local model: a worker takes connections only once its model is
loaded, at the first start and when it is started again.

The workers share the port (SO_REUSEPORT) and the kernel hands each new connection to any
socket listening on it: a worker that listened while it loads would take its share of the
connections only to refuse their calls ("the model is still loading") while a sibling
serves. Real `rerank-service serve` processes whose model loader is a test hook (a
`sitecustomize` module on their PYTHONPATH, written here): a small scorer, whose load waits
while the test's hold file exists.
"""

from __future__ import annotations

import os
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from tests.support.process import ServiceProcess, StartingProcess
from tests.support.waiting import wait_until

_HOOK = """
import json
import os
import time

from rerank_service.backends.local import backend
from rerank_service.backends.local.scorer import Encoded

HOLD = os.environ["RERANK_TEST_HOLD"]


class _Scorer:
    kind = "cross-encoder"
    supports_instruct = False
    max_length = 64
    device = "cpu"
    dtype = "float32"
    engine = "torch"

    def count_tokens(self, text):
        return len(text.split())

    def encode(self, query, documents, instruct):
        return [Encoded(input_ids=(1,) * (1 + len(d.split())), tokens=1 + len(d.split())) for d in documents]

    def score(self, batch):
        return [0.5 for _ in batch]


def _loader(choice):
    def load(source, device, dtype):
        if os.path.exists(HOLD):
            print(json.dumps({"event": "test: model load held", "pid": os.getpid()}), flush=True)
            while os.path.exists(HOLD):  # the model's load, as long as the test wants
                time.sleep(0.01)
        return _Scorer()

    return load


backend._default_loader = _loader
"""
HELD = "test: model load held"
ARGS = ["--device", "cpu", "--workers", "2", "--http-port", "0"]


@pytest.fixture
def hold(tmp_path: Path) -> Path:
    """While this file exists, a worker's model load waits."""
    return tmp_path / "hold"


@pytest.fixture
def env(tmp_path: Path, hold: Path) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK, encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "RERANK_TEST_HOLD": str(hold)}


def _channel(target: str) -> grpc.Channel:
    # Its own connection: channels would otherwise share one subchannel (one worker).
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _outcomes(target: str, model: str, connections: int = 16) -> Counter[str]:
    """Each of `connections` new connections: its health check, then one call."""
    outcomes: Counter[str] = Counter()
    for _ in range(connections):
        with _channel(target) as channel:
            call = rerank_pb2.RerankRequest(model=model, query="cat", documents=["a cat", "a dog"])
            check = health_pb2.HealthCheckRequest()
            try:
                health = health_pb2_grpc.HealthStub(channel).Check(check, timeout=10)
                rerank_pb2_grpc.RerankServiceStub(channel).Rerank(call, timeout=10)
                outcomes[health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)] += 1
            except grpc.RpcError as exc:
                outcomes[f"{exc.code().name}: {exc.details()}"] += 1
    return outcomes


def _held(events: list[dict[str, Any]], pid: int) -> bool:
    return any(e.get("event") == HELD and e.get("pid") == pid for e in events)


def test_a_worker_started_again_takes_no_connection_until_its_model_is_loaded(
    env: dict[str, str], hold: Path
) -> None:
    with ServiceProcess(ARGS, env=env) as service:
        wait_until(
            lambda: {e["worker"] for e in service.events() if e.get("event") == "worker ready"} == {0, 1},
            60,
            what="both workers ready",
        )
        model = next(e for e in service.events() if e.get("event") == "listening")["models"][0]
        hold.touch()
        started = [e for e in service.events() if e.get("event") == "worker started"]
        victim = next(e["pid"] for e in started if e["worker"] == 1)
        os.kill(victim, signal.SIGKILL)

        def loading() -> int | None:
            started = [e for e in service.events() if e.get("event") == "worker started"]
            pid = started[-1]["pid"] if len(started) == 3 else None
            return pid if pid is not None and _held(service.events(), pid) else None

        wait_until(lambda: loading() is not None, 60, what="the worker started again loading its model")
        # Worker 0 takes every new connection while worker 1 loads its model: each is answered.
        assert _outcomes(service.target, model) == {"SERVING": 16}

        hold.unlink()
        wait_until(
            lambda: any(e.get("event") == "worker ready" and e["restarts"] == 1 for e in service.events()),
            60,
            what="the worker started again serving",
        )
        assert _outcomes(service.target, model) == {"SERVING": 16}
        assert service.terminate() == 0, service.output[-5000:]


@pytest.fixture
def supervisor(env: dict[str, str], hold: Path) -> Iterator[StartingProcess]:
    hold.touch()  # both workers' first load waits
    started = StartingProcess(ARGS, env)
    yield started
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait()


def _refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:`port` is refused (nothing listens), not accepted."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def test_until_the_first_worker_has_loaded_its_model_connections_are_refused_not_accepted(
    supervisor: StartingProcess, hold: Path
) -> None:
    wait_until(lambda: sum(e.get("event") == HELD for e in supervisor.events()) == 2, 60, what="both loading")
    starting = supervisor.named("supervisor starting")[0]

    # The supervisor's own sockets only reserve the ports: neither it nor a worker listens.
    assert _refused(starting["port"])
    assert _refused(starting["http_port"])
    assert not any(e.get("event") in ("listening", "serving") for e in supervisor.events())

    hold.unlink()
    wait_until(lambda: any(e.get("event") == "serving" for e in supervisor.events()), 60, what="serving")
    model = supervisor.named("listening")[0]["models"][0]
    assert _outcomes(f"127.0.0.1:{starting['port']}", model, connections=4) == {"SERVING": 4}
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.process.wait(timeout=60) == 0
