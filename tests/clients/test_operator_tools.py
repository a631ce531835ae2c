"""grpcurl and grpc_health_probe against the live server, relying on reflection and health alone."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rerank_service.config import Settings
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.clients.conftest import ROOT, LiveServer
from tests.conftest import ServerFactory
from tests.support.backends import GatedBackend
from tests.support.fault_scenarios import health_of
from tests.support.rpc import request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

TOOLS = ROOT / ".ci" / "tools" / "go" / "bin"


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} is missing: run .ci/tools/install-go-tools.sh (make tools)"
    return str(path)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=60, check=False
    )


def probe(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("grpc-health-probe"), f"-addr={target}", "-connect-timeout=2s", "-rpc-timeout=2s"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_grpcurl_lists_the_services_through_reflection(live_server: LiveServer) -> None:
    result = grpcurl(live_server.target, "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "rerank.v1.RerankService",
    ]


def test_grpcurl_describes_the_service_with_its_comments(live_server: LiveServer) -> None:
    result = grpcurl(live_server.target, "describe", "rerank.v1.RerankService")

    assert result.returncode == 0, result.stderr
    assert "// RerankService ranks candidate documents by their relevance to a query." in result.stdout
    for rpc in ("rpc Rerank (", "rpc RerankStream ( stream", "rpc ListModels ("):
        assert rpc in result.stdout


def test_grpcurl_describes_a_method_by_its_full_name(live_server: LiveServer) -> None:
    """protobuf's descriptor pool finds no method by its full name: reflection answered
    NOT_FOUND (`Symbol not found`)."""
    for method, shown in (
        ("rerank.v1.RerankService.Rerank", "rpc Rerank ( .rerank.v1.RerankRequest )"),
        ("grpc.health.v1.Health.Check", "rpc Check ( .grpc.health.v1.HealthCheckRequest )"),
    ):
        result = grpcurl(live_server.target, "describe", method)
        assert result.returncode == 0, result.stderr
        assert f"{method} is a method:" in result.stdout
        assert shown in result.stdout
    missing = grpcurl(live_server.target, "describe", "rerank.v1.RerankService.NoSuchMethod")
    assert missing.returncode != 0
    assert "Symbol not found" in missing.stderr


def test_grpcurl_invokes_rerank_with_the_bearer_key(live_server: LiveServer) -> None:
    body = {"model": "qwen3-rerank", "query": "red apple", "documents": ["a red apple", "a car"], "top_n": 1}

    result = grpcurl(
        "-H", f"authorization: Bearer {live_server.api_key}", "-d", json.dumps(body),
        live_server.target, "rerank.v1.RerankService/Rerank",
    )  # fmt: skip
    refused = grpcurl("-d", json.dumps(body), live_server.target, "rerank.v1.RerankService/Rerank")

    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    # index 0 and truncated false are proto3's defaults (left out); one chunk: it fit the window
    assert answer["output"]["results"] == [{"relevanceScore": 1, "chunks": 1}]
    assert "Unauthenticated" in refused.stderr


def test_grpcurl_shows_the_field_violation(live_server: LiveServer) -> None:
    body = {"model": "qwen3-rerank", "query": "", "documents": ["a"]}

    result = grpcurl(
        "-H", f"authorization: Bearer {live_server.api_key}", "-d", json.dumps(body),
        live_server.target, "rerank.v1.RerankService/Rerank",
    )  # fmt: skip

    assert "InvalidArgument" in result.stderr
    assert '"field": "query"' in result.stderr


def test_health_probe_passes_while_serving(live_server: LiveServer) -> None:
    result = probe(live_server.target)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout + result.stderr


def test_health_probe_fails_while_the_backend_is_not_ready(tmp_path: Path) -> None:
    from rerank_service.backends.upstream import UpstreamBackend

    settings = Settings(backend="upstream", upstream_url="http://127.0.0.1:9")
    backend = GatedBackend(UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings)))
    with ServerThread(settings, backend=backend, start=False) as harness:
        starting = harness.start_until_listening()
        not_ready = probe(harness.target)
        backend.gate.set()
        starting.result(timeout=10)
        ready = probe(harness.target)

    assert not_ready.returncode != 0
    assert "NOT_SERVING" in not_ready.stdout + not_ready.stderr
    assert ready.returncode == 0


def test_health_probe_fails_when_nothing_listens() -> None:
    assert probe("127.0.0.1:9").returncode != 0


def test_health_probe_fails_while_the_server_drains(serve: ServerFactory, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(delay=1.5))
    with serve() as server, ThreadPoolExecutor(1) as pool:
        assert server.server is not None
        channel = server.channel
        assert channel is not None
        in_flight = pool.submit(server.stub.Rerank, request(), timeout=10)
        wait_until(lambda: len(upstream.requests) == 1, what="the call waiting on the upstream")
        stopping = server.begin(server.server.stop(grace=5))
        wait_until(lambda: health_of(channel, "") != "SERVING", what="the server draining")
        draining = probe(server.target)
        response = in_flight.result(timeout=10)
        stopping.result(timeout=10)
        server.server.port = None  # stopped already

    assert draining.returncode != 0
    assert len(response.output.results) == 2  # the call in flight still finished
