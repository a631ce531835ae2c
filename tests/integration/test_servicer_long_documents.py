"""gRPC refuses a `long_documents` value it does not know, as HTTP does, instead of taking
it for the route's default."""

from __future__ import annotations

import grpc
from rerank.v1 import rerank_pb2

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, expect_error, field_violations, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

NEWER_CLIENTS_MODE = 7  # a value a later version of rerank.proto may define


def test_an_unknown_long_documents_value_is_invalid_argument_naming_the_field(
    server: ServerThread, upstream: FakeUpstream, logs: LogCapture
) -> None:
    error = expect_error(lambda: server.stub.Rerank(request(long_documents=NEWER_CLIENTS_MODE), timeout=5))

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown value 7" in field_violations(error)["long_documents"]
    assert upstream.requests == []
    # Logged with the model and documents it named, as any request refused once read.
    wait_until(lambda: any(e["event"] == "call" for e in logs.events()), what="the call's log line")
    line = next(e for e in logs.events() if e["event"] == "call")
    assert (line["code"], line["model"], line["documents"]) == ("INVALID_ARGUMENT", "qwen3-rerank", 2)


def test_an_unknown_long_documents_value_fails_its_stream_item_only(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    upstream.always(None)
    items = [
        rerank_pb2.RerankStreamRequest(id="newer", request=request(long_documents=NEWER_CLIENTS_MODE)),
        rerank_pb2.RerankStreamRequest(id="unset", request=request()),
    ]

    answered = {answer.id: answer for answer in server.stub.RerankStream(iter(items), timeout=30)}

    refused = answered["newer"].error
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v.field for v in refused.field_violations] == ["long_documents"]
    assert answered["unset"].WhichOneof("result") == "response"
