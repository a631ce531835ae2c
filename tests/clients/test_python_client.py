"""The Python client package (rerank_client) against the live server, blocking and asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import pytest
from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from rerank_client import AsyncRerankClient, RerankClient, field_violations
from rerank_client.client import build_request

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.clients.conftest import LiveServer
from tests.conftest import ServerFactory, upstream_settings
from tests.support.backends import GatedBackend
from tests.support.logs import LogCapture
from tests.support.server import ServerThread
from tests.support.waiting import wait_until_async

DOCUMENTS = ["a red apple", "a car", "apple pie"]


def test_rerank_with_top_n_and_documents(live_server: LiveServer) -> None:
    with RerankClient(live_server.target, api_key=live_server.api_key) as client:
        result = client.rerank("red apple", DOCUMENTS, top_n=2, return_documents=True)
        again = client.rerank("red apple", DOCUMENTS, top_n=2, return_documents=True)

    assert [(r.index, r.relevance_score, r.text) for r in result.results] == [
        (0, 1.0, "a red apple"),
        (2, 0.5, "apple pie"),
    ]
    # Another suite may have scored these pairs already: the server's cache then answers them.
    assert result.total_tokens + result.cached_tokens > 0
    assert result.request_id
    assert again.results == result.results
    assert (again.total_tokens, again.cached_tokens) == (0, result.total_tokens + result.cached_tokens)


def test_a_long_document_is_chunked_and_its_best_chunk_located(live_server: LiveServer) -> None:
    long = "pear plum grape " * 300 + "red apple"
    with RerankClient(live_server.target, api_key=live_server.api_key) as client:
        chunk = rerank_pb2.LONG_DOCUMENTS_CHUNK
        result = client.rerank("red apple", [long, "a car"], long_documents=chunk, max_tokens_per_doc=200)

    best, short = result.results
    assert (best.index, best.truncated) == (0, False)
    assert best.chunks > 1
    assert best.best_chunk is not None
    assert long[best.best_chunk.start : best.best_chunk.end].endswith("red apple")
    assert (short.chunks, short.best_chunk) == (1, None)


def test_invalid_argument_names_the_field(live_server: LiveServer) -> None:
    with (
        RerankClient(live_server.target, api_key=live_server.api_key) as client,
        pytest.raises(grpc.RpcError) as caught,
    ):
        client.rerank("", DOCUMENTS)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "query" in field_violations(caught.value)


def test_the_bearer_token_is_required(live_server: LiveServer) -> None:
    with RerankClient(live_server.target) as client, pytest.raises(grpc.RpcError) as caught:
        client.rerank("red apple", DOCUMENTS)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_key_read_from_a_file_is_sent_without_its_newline(live_server: LiveServer) -> None:
    """As the Go, Node and Java clients do: grpc would fail each call INTERNAL "Invalid metadata"."""
    with RerankClient(live_server.target, api_key=f" {live_server.api_key}\n") as client:
        models = client.list_models()

    assert "qwen3-rerank" in [model.name for model in models]


async def test_the_asyncio_client_sends_a_key_without_its_newline(live_server: LiveServer) -> None:
    async with AsyncRerankClient(live_server.target, api_key=f"{live_server.api_key}\n") as client:
        result = await client.rerank("red apple", DOCUMENTS, top_n=1)

    assert result.request_id


@pytest.mark.parametrize("client_class", [RerankClient, AsyncRerankClient])
@pytest.mark.parametrize("key", ["clé-secrète", "two words", "tab\tkey", "nul\x00key"])
def test_a_key_no_header_can_carry_is_refused_when_the_client_is_made(
    client_class: type[RerankClient] | type[AsyncRerankClient], key: str
) -> None:
    with pytest.raises(ValueError, match="api_key must be printable ASCII") as caught:
        client_class("127.0.0.1:1", api_key=key)

    assert key not in str(caught.value)  # the error may end up in a log


def test_a_blank_key_is_no_key(live_server: LiveServer) -> None:
    with RerankClient(live_server.target, api_key=" \n") as client, pytest.raises(grpc.RpcError) as caught:
        client.list_models()

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_deadline_is_honoured(live_server: LiveServer) -> None:
    started = time.monotonic()
    with (
        RerankClient(live_server.target, api_key=live_server.api_key) as client,
        pytest.raises(grpc.RpcError) as caught,
    ):
        client.rerank("[[delay=6]] red apple", DOCUMENTS, timeout=0.3)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0  # cut at 0.3 s, not the upstream's 6 s


def test_an_answer_over_grpcs_4_mib_default_is_received(live_server: LiveServer) -> None:
    """The server answers up to --max-message-bytes (16 MiB): gRPC's 4 MiB receive
    default would fail an answer that was already ranked and billed."""
    documents = [f"doc {i} " + "lorem ipsum dolor sit amet " * 40_000 for i in range(5)]  # 5 x 1 MiB
    with RerankClient(live_server.target, api_key=live_server.api_key) as client:
        result = client.rerank("lorem", documents, return_documents=True)

    assert sorted(r.text or "" for r in result.results) == sorted(documents)


async def test_the_asyncio_client_receives_an_answer_over_4_mib(live_server: LiveServer) -> None:
    documents = [f"doc {i} " + "lorem ipsum dolor sit amet " * 40_000 for i in range(5)]
    async with AsyncRerankClient(live_server.target, api_key=live_server.api_key) as client:
        result = await client.rerank("lorem", documents, return_documents=True)

    assert sorted(r.text or "" for r in result.results) == sorted(documents)


def test_a_zero_timeout_is_a_deadline_not_the_default(live_server: LiveServer) -> None:
    # The upstream answers after 5 s: under the client's default (30 s) the call would succeed.
    with (
        RerankClient(live_server.target, api_key=live_server.api_key) as client,
        pytest.raises(grpc.RpcError) as caught,
    ):
        client.rerank("[[delay=5]] zero timeout, blocking", DOCUMENTS, timeout=0)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_asyncio_client_honours_a_zero_timeout(live_server: LiveServer) -> None:
    async with AsyncRerankClient(live_server.target, api_key=live_server.api_key) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.rerank("[[delay=5]] zero timeout, asyncio", DOCUMENTS, timeout=0)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_failed_stream_item_keeps_its_error_metadata(live_server: LiveServer) -> None:
    """RerankError.metadata (ErrorInfo's: the model asked for here, upstream_status and
    upstream_request_id for an upstream error) reaches the caller."""
    with RerankClient(live_server.target, api_key=live_server.api_key) as client:
        (answer,) = client.rerank_stream(
            [("m", build_request("red apple", DOCUMENTS, "no-such-model"))], timeout=30
        )

    assert answer.error is not None
    assert (answer.error.code, answer.error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert answer.error.metadata["model"] == "no-such-model"
    assert "qwen3-rerank" in answer.error.metadata["served_models"]


def test_stream_answers_every_item_by_id(live_server: LiveServer) -> None:
    requests = [
        ("a", build_request("red apple", DOCUMENTS, "qwen3-rerank")),
        ("b", build_request("", DOCUMENTS, "qwen3-rerank")),
        ("c", build_request("apple", DOCUMENTS, "qwen3-rerank")),
    ]
    with RerankClient(live_server.target, api_key=live_server.api_key) as client:
        answers = {answer.id: answer for answer in client.rerank_stream(requests, timeout=30)}

    assert sorted(answers) == ["a", "b", "c"]
    error = answers["b"].error
    assert error is not None
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "query" in error.field_violations
    for key in ("a", "c"):
        result = answers[key].result
        assert result is not None
        assert len(result.results) == 3


def test_list_models(live_server: LiveServer) -> None:
    with RerankClient(live_server.target, api_key=live_server.api_key) as client:
        assert "qwen3-rerank" in [model.name for model in client.list_models()]


async def test_asyncio_client_reranks_streams_and_reports_errors(live_server: LiveServer) -> None:
    async def requests() -> AsyncIterator[tuple[str, object]]:
        yield "x", build_request("red apple", DOCUMENTS, "qwen3-rerank")
        yield "y", build_request("red apple", [], "qwen3-rerank")

    async with AsyncRerankClient(live_server.target, api_key=live_server.api_key) as client:
        result = await client.rerank("red apple", DOCUMENTS, top_n=1)
        answers = {answer.id: answer async for answer in client.rerank_stream(requests(), timeout=30)}  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.rerank("red apple", [""])

    assert [r.index for r in result.results] == [0]
    assert answers["x"].result is not None
    assert answers["y"].error is not None
    assert "documents" in answers["y"].error.field_violations
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[0]" in field_violations(caught.value)


async def test_leaving_the_asyncio_clients_stream_loop_cancels_the_stream(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    """grpc.aio's task that sends the items kept the call open after a `break`: the client
    went on sending every item, and the server ran (and billed) each."""
    more = 50
    rest = asyncio.Event()

    async def requests() -> AsyncIterator[tuple[str, rerank_pb2.RerankRequest]]:
        yield "first", build_request("red apple", DOCUMENTS, "qwen3-rerank")
        await rest.wait()
        for index in range(more):
            yield f"i{index}", build_request("red apple", DOCUMENTS, "qwen3-rerank")

    def stream_lines() -> list[dict[str, object]]:
        return [event for event in logs.events() if event["event"] == "stream"]

    with serve() as server:
        async with AsyncRerankClient(server.target, timeout=30) as client:
            async for answer in client.rerank_stream(requests(), timeout=30):
                first = answer.id
                break
            rest.set()  # the items the server must not see: the caller left the loop
            # Without the cancel, the stream ended OK once every item was run.
            await wait_until_async(lambda: bool(stream_lines()), what="the stream's log line")

    [stream_line] = stream_lines()
    assert first == "first"
    assert stream_line["code"] == "CANCELLED"
    assert len(upstream.requests) < 1 + more


class FlakyServicer(rerank_pb2_grpc.RerankServiceServicer):
    """Answers UNAVAILABLE to the first `failures` calls, then a one-result ranking; a
    stream, after reading its items, always UNAVAILABLE."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.items = 0

    def Rerank(
        self, request: rerank_pb2.RerankRequest, context: grpc.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return rerank_pb2.RerankResponse(
            request_id="r",
            output=rerank_pb2.RerankOutput(results=[rerank_pb2.RerankResult(index=0, relevance_score=1)]),
        )

    def RerankStream(
        self, requests: Iterator[rerank_pb2.RerankStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[rerank_pb2.RerankStreamResponse]:
        self.calls += 1
        self.items += sum(1 for _ in requests)  # every item read, as the service would run them
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details("max connection age")
        return iter(())


def test_a_stream_that_ends_unavailable_is_not_replayed_by_the_channel() -> None:
    """The server may have run a stream's items before it ended UNAVAILABLE (a connection
    aged out): replaying them would score, bill and charge each again."""
    servicer = FlakyServicer(failures=4)  # type: ignore[abstract]  # ListModels is never called
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rerank_pb2_grpc.add_RerankServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        items = [("a", build_request("q", ["d"], "m")), ("b", build_request("q", ["e"], "m"))]
        with RerankClient(f"127.0.0.1:{port}") as client, pytest.raises(grpc.RpcError) as caught:
            list(client.rerank_stream(items))
    finally:
        server.stop(0)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (servicer.calls, servicer.items) == (1, 2)


@pytest.mark.parametrize(("failures", "succeeds"), [(2, True), (4, False)])
def test_unavailable_is_retried_by_the_channel_not_by_hand(failures: int, succeeds: bool) -> None:
    servicer = FlakyServicer(failures)  # type: ignore[abstract]  # ListModels is never called
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rerank_pb2_grpc.add_RerankServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RerankClient(f"127.0.0.1:{port}") as client:
            if succeeds:
                assert client.rerank("q", ["d"]).results[0].index == 0
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    client.rerank("q", ["d"])
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)

    assert servicer.calls == min(failures + 1, 4)  # the service config allows 4 attempts


def test_a_request_over_grpcs_256_kib_retry_buffer_is_still_retried(
    upstream: FakeUpstream, logs: LogCapture
) -> None:
    """gRPC re-sends only as much of a call as it kept (256 KiB by default): a larger Rerank
    must still get the policy's 4 attempts, as when a draining pod answers UNAVAILABLE."""
    settings = upstream_settings(upstream)
    backend = GatedBackend(UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings)))
    with ServerThread(settings, backend=backend, start=False) as harness:
        harness.start_until_listening()  # the backend is not ready: every Rerank is UNAVAILABLE
        try:
            with RerankClient(harness.target, timeout=10) as client, pytest.raises(grpc.RpcError) as caught:
                client.rerank("q", ["x" * 1000] * 300)  # about 300 KB
        finally:
            backend.gate.set()
        attempts = [call for call in logs.wait_for_calls(4) if call.get("method", "").endswith("/Rerank")]

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(attempts) == 4  # the service config allows 4 attempts
