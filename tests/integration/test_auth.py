"""Bearer-key auth with configured keys, and pass-through of callers' tokens."""

from __future__ import annotations

import gc
import traceback
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from rerank.v1 import rerank_pb2

from rerank_service.config.secret import Secret
from rerank_service.core.domain import ServiceError
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import CALLER_KEY, UPSTREAM_KEY, ServerFactory
from tests.support import raw_h2
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, details_of, expect_error, request
from tests.support.server import ServerThread

OTHER_KEY = "second-caller-key"
RERANK = "/rerank.v1.RerankService/Rerank"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize(
    "metadata",
    [(), bearer("wrong-key"), (("authorization", CALLER_KEY),), (("authorization", f"Basic {CALLER_KEY}"),)],
    ids=["none", "wrong-key", "no-scheme", "basic-scheme"],
)
def test_a_call_without_an_accepted_key_is_unauthenticated(
    serve: ServerFactory, upstream: FakeUpstream, metadata: tuple[tuple[str, str], ...]
) -> None:
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), metadata=metadata, timeout=5))

    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert upstream.requests == []


@pytest.mark.parametrize("key", [CALLER_KEY, OTHER_KEY])
def test_any_configured_key_is_accepted_and_the_service_key_goes_upstream(
    serve: ServerFactory, upstream: FakeUpstream, key: str
) -> None:
    with serve(api_keys=(Secret(CALLER_KEY), Secret(OTHER_KEY))) as server:
        response = server.stub.Rerank(request(), metadata=bearer(key), timeout=5)

    assert len(response.output.results) == 2
    assert upstream.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_list_models_needs_a_key_too(serve: ServerFactory) -> None:
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        error = expect_error(lambda: server.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5))
        allowed = server.stub.ListModels(
            rerank_pb2.ListModelsRequest(), metadata=bearer(CALLER_KEY), timeout=5
        )

    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert allowed.models[0].name == "qwen3-rerank"


def test_health_and_reflection_stay_open_without_a_key(serve: ServerFactory) -> None:
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        assert server.channel is not None
        health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        services = ProtoReflectionDescriptorDatabase(server.channel).get_services()

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "rerank.v1.RerankService" in services


def test_pass_through_sends_the_callers_token_upstream(serve: ServerFactory, upstream: FakeUpstream) -> None:
    with serve(upstream_api_key=None) as server:
        response = server.stub.Rerank(request(), metadata=bearer(UPSTREAM_KEY), timeout=5)

    assert len(response.output.results) == 2
    assert upstream.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_pass_through_without_a_token_is_unauthenticated_before_any_upstream_call(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(upstream_api_key=None) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in details_of(error)
    assert upstream.requests == []


def test_pass_through_with_a_token_the_upstream_refuses_is_unauthenticated(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(upstream_api_key=None) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), metadata=bearer("not-the-key"), timeout=5))

    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert len(upstream.requests) == 1


def test_keys_never_appear_in_logs(serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture) -> None:
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        server.stub.Rerank(request(), metadata=bearer(CALLER_KEY), timeout=5)
        expect_error(lambda: server.stub.Rerank(request(), metadata=bearer("wrong-key"), timeout=5))

    assert len(logs.calls()) == 2
    assert CALLER_KEY not in logs.text
    assert UPSTREAM_KEY not in logs.text
    assert "wrong-key" not in logs.text


def _refused_calls(server: ServerThread, metadata: tuple[tuple[str, str], ...], count: int) -> None:
    """`count` Rerank calls and as many RerankStreams, each refused for its key."""
    for _ in range(count):
        for call in (
            lambda: server.stub.Rerank(request(), metadata=metadata, timeout=5),
            lambda: list(server.stub.RerankStream(iter([]), metadata=metadata, timeout=5)),
        ):
            assert code_of(expect_error(call)) == grpc.StatusCode.UNAUTHENTICATED


def test_calls_refused_for_their_key_leave_no_error_holding_their_frames(serve: ServerFactory) -> None:
    """Each method's refusal was one error built at start and raised for every such call:
    each raise added the call's frames to its traceback, and with them the call's state
    (about 4 kB a call, held for good: 20,000 keyless calls took 80 MiB). Now each
    refusal is an error of its own, gone with its call."""
    count = 40
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        _refused_calls(server, (), count)  # no key
        _refused_calls(server, bearer("wrong-key"), count)
        gc.collect()  # what the calls left in reference cycles: gone with a full collection
        refusals: list[Any] = [
            error
            for error in gc.get_objects()
            # type(), not isinstance(): that reads __class__, which some modules' objects warn of
            if type(error) is ServiceError and error.code is grpc.StatusCode.UNAUTHENTICATED
        ]
        frames = sum(len(traceback.extract_tb(error.__traceback__)) for error in refusals)

    assert frames < count, f"{len(refusals)} refusals alive, holding {frames} frames"


# A token holding a byte no HTTP header carries, as a raw HTTP/2 client sends it (grpc's own
# client refuses such metadata, grpc's server takes it).
UNSENDABLE = [b"\x01", b"\x7f", b"\r\n", b"\x00"]


@pytest.mark.parametrize("byte", UNSENDABLE, ids=["SOH", "DEL", "CRLF", "NUL"])
def test_pass_through_with_a_token_no_header_carries_is_unauthenticated_before_any_upstream_call(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture, byte: bytes
) -> None:
    """aiohttp refuses to write such a header: the call failed INTERNAL, with a traceback,
    an upstream request counted as an error and a failure charged to the caller."""
    token = b"sk-token-" + byte + b"-tail"
    with serve(upstream_api_key=None) as server:
        status = raw_h2.grpc_status(
            server.target,
            RERANK,
            [(b"authorization", b"Bearer " + token)],
            request().SerializeToString(),
        )
        [line] = logs.wait_for_calls(1)

    assert status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert line["code"] == "UNAUTHENTICATED"
    assert upstream.requests == []
    assert not [event for event in logs.events() if event.get("event") == "unexpected error"]
    assert "sk-token-" not in logs.text


@pytest.mark.parametrize("byte", UNSENDABLE, ids=["SOH", "DEL", "CRLF", "NUL"])
def test_with_keys_a_token_no_header_carries_is_a_key_not_accepted(
    serve: ServerFactory, upstream: FakeUpstream, byte: bytes
) -> None:
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        status = raw_h2.grpc_status(
            server.target,
            RERANK,
            [(b"authorization", b"Bearer " + CALLER_KEY[:4].encode() + byte + CALLER_KEY[4:].encode())],
            request().SerializeToString(),
        )

    assert status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert upstream.requests == []
