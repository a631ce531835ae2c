"""Health follows the backend's readiness and the drain; reflection describes the contract."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import upstream_settings
from tests.support.backends import GatedBackend
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "rerank.v1.RerankService"


def health_status(channel: grpc.Channel, service: str) -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(response.status)


@pytest.fixture
def gated(upstream: FakeUpstream, logs: LogCapture) -> Iterator[tuple[ServerThread, GatedBackend]]:
    settings = upstream_settings(upstream)
    backend = GatedBackend(UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings)))
    with ServerThread(settings, backend=backend, start=False) as harness:
        yield harness, backend
        backend.gate.set()


def test_health_is_not_serving_until_the_backend_is_ready(gated: tuple[ServerThread, GatedBackend]) -> None:
    harness, backend = gated
    starting = harness.start_until_listening()
    assert harness.channel is not None

    # The port is open, the backend is not ready: probes see NOT_SERVING, calls UNAVAILABLE.
    assert health_status(harness.channel, "") == NOT_SERVING
    assert health_status(harness.channel, SERVICE) == NOT_SERVING
    error = expect_error(lambda: harness.stub.Rerank(request(), timeout=5))
    assert code_of(error) == grpc.StatusCode.UNAVAILABLE

    backend.gate.set()
    starting.result(timeout=10)
    assert health_status(harness.channel, "") == SERVING
    assert health_status(harness.channel, SERVICE) == SERVING
    assert len(harness.stub.Rerank(request(), timeout=5).output.results) == 2


def test_draining_reports_not_serving_and_finishes_calls_in_flight(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    assert server.channel is not None
    assert server.server is not None
    watch = health_pb2_grpc.HealthStub(server.channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
    )
    assert next(watch).status == SERVING
    upstream.inject(Fault(delay=0.8))
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(server.stub.Rerank, request(), timeout=10)
        wait_until(lambda: len(upstream.requests) == 1, what="the call waiting on the upstream")
        stopping = server.begin(server.server.stop(grace=5))

        assert next(watch).status == NOT_SERVING
        response = in_flight.result(timeout=10)
    stopping.result(timeout=10)

    assert len(response.output.results) == 2  # the call in flight was not cut
    server.server.port = None  # already stopped; the fixture need not stop it again


def test_reflection_lists_the_services(server: ServerThread) -> None:
    assert server.channel is not None
    services = ProtoReflectionDescriptorDatabase(server.channel).get_services()

    assert set(services) >= {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_reflection_serves_the_contract_with_its_comments(server: ServerThread) -> None:
    assert server.channel is not None
    database = ProtoReflectionDescriptorDatabase(server.channel)
    file: descriptor_pb2.FileDescriptorProto = database.FindFileContainingSymbol(SERVICE)

    assert file.name == "rerank/v1/rerank.proto"
    assert [method.name for method in file.service[0].method] == ["Rerank", "RerankStream", "ListModels"]
    comments = "".join(location.leading_comments for location in file.source_code_info.location)
    assert "RerankService ranks candidate documents" in comments
    assert "How many of the best documents to return" in comments
