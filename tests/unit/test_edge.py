"""The edge wraps every RerankService method of the contract, whatever its shape, so
no RPC can skip admission, auth or the access log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import SERVICE, RerankServiceEdge, _Received, _settle_ended, _StreamItems
from rerank_service.config.secret import Secret
from rerank_service.core.engine import RerankEngine
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.call import Pipeline
from rerank_service.pipeline.callers import CallerDirectory
from rerank_service.pipeline.record import UPSTREAM_TIME_KEY
from tests.support.logs import LogCapture
from tests.support.waiting import wait_until_async


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self.method = method
        self.invocation_metadata = metadata


class _EveryMethod:
    """A servicer with every method of the contract."""

    async def Rerank(self, request: Any, context: Any, call: Any) -> Any:
        raise NotImplementedError

    async def ListModels(self, request: Any, context: Any, call: Any) -> Any:
        raise NotImplementedError

    async def RerankStream(self, requests: Any, context: Any, call: Any) -> AsyncIterator[Any]:
        responses: tuple[Any, ...] = ()
        for response in responses:
            yield response


def _edge(keys: list[Secret] | None = None) -> RerankServiceEdge:
    # No call runs here: the engine is never reached.
    pipeline = Pipeline(cast(RerankEngine, None), Admission(4), CallerDirectory(api_keys=keys or []))
    return RerankServiceEdge(pipeline, UPSTREAM_TIME_KEY, stream_idle_timeout=60.0)


def _handler_for(method: str) -> Any:
    return _edge().handler(_EveryMethod()).service(_Details(f"/{SERVICE.full_name}/{method}"))


@pytest.mark.parametrize("method", [method.name for method in SERVICE.methods])
def test_every_method_of_the_contract_is_served_with_its_shape(method: str) -> None:
    descriptor = SERVICE.methods_by_name[method]

    handler = _handler_for(method)

    assert handler is not None
    # Request-streaming always: grpc hands a unary call to the edge as soon as it arrives,
    # and the edge reads its one request (on the wire the two shapes are the same).
    assert handler.request_streaming
    assert handler.response_streaming == descriptor.server_streaming


def test_a_servicer_missing_a_method_of_the_contract_fails_at_start_up() -> None:
    class Partial:
        async def Rerank(self, request: Any, context: Any, call: Any) -> Any:
            raise NotImplementedError

    with pytest.raises(AttributeError, match=r"RerankStream|ListModels"):
        _edge().handler(Partial())


def test_a_message_is_handed_on_with_its_size_and_one_that_does_not_parse_as_undecodable() -> None:
    parse = _handler_for("Rerank").request_deserializer

    data = rerank_pb2.RerankRequest(model="m", query="q").SerializeToString()
    good = parse(data)
    broken = parse(b"\x0a\xff\xff")  # a string field whose length runs past the end

    # The message, with the bytes it came in (admission counts them).
    assert (good.message, good.size) == (rerank_pb2.RerankRequest(model="m", query="q"), len(data))
    assert not hasattr(broken, "message")


def test_methods_outside_the_contract_are_left_to_grpc() -> None:
    assert _edge().handler(_EveryMethod()).service(_Details("/rerank.v1.RerankService/Nope")) is None


def test_a_call_without_an_accepted_key_is_routed_to_a_refusal_that_reads_nothing() -> None:
    edge = _edge([Secret("caller-key-abcdef")])
    routes = edge.handler(_EveryMethod())
    rerank = f"/{SERVICE.full_name}/Rerank"

    keyless = routes.service(_Details(rerank))
    wrong = routes.service(_Details(rerank, (("authorization", "Bearer nope"),)))
    accepted = routes.service(_Details(rerank, (("authorization", "Bearer caller-key-abcdef"),)))

    assert keyless is not None
    assert wrong is not None
    assert accepted is not None
    # Client streaming: grpc hands the refusal an iterator it never reads, so the request
    # body is neither buffered whole nor parsed.
    assert keyless.request_streaming
    assert wrong.request_streaming
    assert keyless is not accepted
    assert wrong is not accepted


async def test_an_item_waiting_for_byte_budget_as_its_stream_closes_holds_nothing() -> None:
    """Its bytes come free as the stream's end gives back what the stream held: taken then,
    they were held for good, and --max-inflight-bytes shrank with each such stream."""
    admission = Admission(4, max_bytes=100)
    await admission.take_bytes(80)  # what the stream's earlier items hold

    async def one_item() -> AsyncIterator[_Received]:
        yield _Received(rerank_pb2.RerankStreamRequest(id="late"), 60)

    items = _StreamItems(one_item(), admission, idle_timeout=60.0)
    items._admitted = True  # its stream holds a slot: the item waits for room alone
    waiting = asyncio.create_task(anext(items))
    assert await wait_until_async(lambda: admission._freed is not None, what="the item waiting for room")
    items.close()
    admission.give_bytes(80)

    with pytest.raises(StopAsyncIteration):
        await waiting
    assert admission.bytes_in_flight == 0


class _NeverAnswers(_EveryMethod):
    """A servicer whose Rerank and RerankStream wait until grpc cancels them, unaware of any
    deadline (as a call waiting on a paused Redis, or a stream writing an answer, is)."""

    async def Rerank(self, request: Any, context: Any, call: Any) -> Any:
        await asyncio.Event().wait()

    async def RerankStream(self, requests: Any, context: Any, call: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield rerank_pb2.RerankStreamResponse()


async def _call_with_a_deadline(channel: grpc.aio.Channel, path: str) -> None:
    """One call of `path` with a 0.2 s deadline, read to its end."""
    request = rerank_pb2.RerankRequest(model="m", query="q", documents=["d"])
    if path.endswith("/Rerank"):
        await channel.unary_unary(path, rerank_pb2.RerankRequest.SerializeToString)(request, timeout=0.2)
        return

    async def items() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        yield rerank_pb2.RerankStreamRequest(id="a", request=request)
        await asyncio.Event().wait()  # never half-closed: only the deadline ends it

    async for _ in channel.stream_stream(path, rerank_pb2.RerankStreamRequest.SerializeToString)(
        items(), timeout=0.2
    ):
        pass


class _ReadsToTheEnd(_EveryMethod):
    """A servicer whose RerankStream reads items until there are no more, then ends: at the
    deadline grpc ends the requests (as a client's half-close does), the stream ends as
    answered, and only the clock says it was the deadline."""

    async def RerankStream(self, requests: Any, context: Any, call: Any) -> AsyncIterator[Any]:
        async for _ in requests:
            pass
        answers: tuple[Any, ...] = ()  # none: the stream ends as answered
        for answer in answers:
            yield answer


@pytest.mark.parametrize(
    ("method", "servicer"),
    [("Rerank", _NeverAnswers), ("RerankStream", _NeverAnswers), ("RerankStream", _ReadsToTheEnd)],
    ids=["Rerank", "RerankStream-cancelled", "RerankStream-requests-ended"],
)
async def test_a_call_grpc_cancels_at_its_deadline_is_recorded_deadline_exceeded(
    method: str, servicer: type[_EveryMethod], logs: LogCapture
) -> None:
    """As its caller is told: recorded CANCELLED (or OK), it read as callers hanging up, and
    the alerts on DEADLINE_EXCEEDED missed an upstream slower than callers' deadlines."""
    edge = _edge()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((edge.handler(servicer()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            path = f"/{SERVICE.full_name}/{method}"
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await _call_with_a_deadline(channel, path)
            assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await wait_until_async(
                lambda: any(line.get("method") == path for line in logs.events()),
                what="the call's access-log line",
            )
    finally:
        await server.stop(None)

    assert [line["code"] for line in logs.events() if line.get("method") == path] == ["DEADLINE_EXCEEDED"]


class _Remaining:
    """A servicer context whose deadline is `left` seconds away."""

    def __init__(self, left: float | None) -> None:
        self.left = left

    def time_remaining(self) -> float | None:
        return self.left


@pytest.mark.parametrize(
    ("code", "left", "recorded"),
    [
        (grpc.StatusCode.CANCELLED, 0.03, grpc.StatusCode.DEADLINE_EXCEEDED),  # grpc's timer, a moment early
        (grpc.StatusCode.CANCELLED, 5.0, grpc.StatusCode.CANCELLED),  # the caller hung up
        (grpc.StatusCode.OK, 0.03, grpc.StatusCode.OK),  # a stream answered just inside its deadline
        (grpc.StatusCode.OK, 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),  # its requests ended by it
        (grpc.StatusCode.OK, None, grpc.StatusCode.OK),  # no deadline
    ],
)
def test_a_call_ended_near_its_deadline_is_recorded_as_its_caller_is_told(
    code: grpc.StatusCode, left: float | None, recorded: grpc.StatusCode
) -> None:
    """A stream answered OK in the last 50 ms of its deadline was recorded DEADLINE_EXCEEDED;
    only a call grpc cancelled gets the timer's slack."""
    pipeline = Pipeline(cast(RerankEngine, None), Admission(4), CallerDirectory())
    call = pipeline.open("/rerank.v1.RerankService/RerankStream", "peer", pipeline.metrics.for_method("m"))
    call.code = code

    _settle_ended(call, cast(Any, _Remaining(left)))
    settled = call.code
    call.finish()  # its request id unbound: the tests after log outside a call

    assert settled is recorded


@pytest.mark.parametrize(("left", "at_deadline"), [(0.007, True), (0.0, True), (5.0, False), (None, False)])
async def test_requests_that_end_at_the_deadline_are_told_from_a_half_close(
    left: float | None, at_deadline: bool
) -> None:
    """grpc ends a stream's requests at its deadline as a client's half-close would: under
    load a few ms before it by the clock, where a stream answered OK was recorded OK while
    its caller was told DEADLINE_EXCEEDED."""

    async def none() -> AsyncIterator[_Received]:
        nothing: tuple[_Received, ...] = ()
        for received in nothing:
            yield received

    items = _StreamItems(none(), Admission(4), idle_timeout=60.0, time_remaining=lambda: left)

    with pytest.raises(StopAsyncIteration):
        await anext(items)
    assert items.ended_at_deadline is at_deadline
