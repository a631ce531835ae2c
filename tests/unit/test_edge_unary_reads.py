"""A unary RerankService call is the edge's from the moment it arrives, not once its request
has: grpc's own unary handling held a call whose request never came in one of grpc's open
calls, unseen (never counted, never ended, never logged), and answered a call half-closed
without its request with no status at all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import NO_REQUEST_MESSAGE, SERVICE, Answer, RerankServiceEdge
from rerank_service.core.engine import RerankEngine
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.call import Pipeline
from rerank_service.pipeline.callers import CallerDirectory
from rerank_service.pipeline.record import UPSTREAM_TIME_KEY
from tests.support.logs import LogCapture
from tests.support.rpc import error_info
from tests.support.waiting import wait_until_async

RERANK = f"/{SERVICE.full_name}/Rerank"
LIST_MODELS = f"/{SERVICE.full_name}/ListModels"
MAX_MESSAGE_BYTES = 4096


class _Answers:
    """Rerank and ListModels answer at once, with empty messages."""

    async def Rerank(self, request: Any, context: Any, call: Any) -> Answer[Any]:
        return Answer(rerank_pb2.RerankResponse())

    async def ListModels(self, request: Any, context: Any, call: Any) -> Answer[Any]:
        return Answer(rerank_pb2.ListModelsResponse())

    async def RerankStream(self, requests: Any, context: Any, call: Any) -> AsyncIterator[Any]:
        responses: tuple[Any, ...] = ()
        for response in responses:
            yield response


class _Served:
    def __init__(
        self,
        admission: Admission,
        edge: RerankServiceEdge,
        server: grpc.aio.Server,
        channel: grpc.aio.Channel,
    ) -> None:
        self.admission = admission
        self.edge = edge
        self.server = server
        self.channel = channel

    def silent(self, path: str, never: asyncio.Event, **kwargs: Any) -> Any:
        """A call of `path` whose request never comes: its headers only (a request iterator
        that never yields, over the unary method's path), until `never` is set (then it
        half-closes without one)."""

        async def nothing() -> AsyncIterator[bytes]:
            await never.wait()
            sent: tuple[bytes, ...] = ()  # an async generator that yields nothing
            for message in sent:
                yield message

        call: grpc.aio.StreamUnaryMultiCallable[Any, Any] = self.channel.stream_unary(path)
        return call(nothing(), **kwargs)


async def _serve(read_within: float = 60.0, max_open: int | None = None) -> _Served:
    admission = Admission(4, max_open=max_open)
    pipeline = Pipeline(cast(RerankEngine, None), admission, CallerDirectory())
    edge = RerankServiceEdge(pipeline, UPSTREAM_TIME_KEY, stream_idle_timeout=read_within)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((edge.handler(_Answers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return _Served(admission, edge, server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))


def _lines(logs: LogCapture, path: str) -> list[dict[str, Any]]:
    return [line for line in logs.calls() if line.get("method") == path]


@pytest.mark.parametrize("path", [RERANK, LIST_MODELS])
async def test_a_call_half_closed_without_its_request_is_invalid_argument_and_logged(
    path: str, logs: LogCapture
) -> None:
    """It was never answered: grpc's unary handler returned without a status, and its
    client waited until its deadline (or forever)."""
    served = await _serve()
    try:
        ended = asyncio.Event()
        ended.set()
        call = served.silent(path, ended, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert await wait_until_async(lambda: len(_lines(logs, path)) == 1, what="the call's log line")
    finally:
        await served.channel.close()
        await served.server.stop(None)

    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == NO_REQUEST_MESSAGE
    [line] = _lines(logs, path)
    assert (line["code"], line["details"]) == ("INVALID_ARGUMENT", NO_REQUEST_MESSAGE)
    assert served.admission.open == 0


async def test_a_call_whose_request_never_comes_is_counted_open_until_the_bound_ends_it(
    logs: LogCapture,
) -> None:
    """Counted open (--max-open-calls, its caller's share) while it waits, then ended
    DEADLINE_EXCEEDED past --stream-idle-timeout: grpc held it unseen, for ever."""
    never = asyncio.Event()
    served = await _serve(read_within=0.5)
    try:
        call = served.silent(RERANK, never)  # no deadline: only the bound ends it
        assert await wait_until_async(lambda: served.admission.open == 1, what="the silent call counted open")
        assert served.admission.in_flight == 0  # no slot before its request is in
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert await wait_until_async(lambda: len(_lines(logs, RERANK)) == 1, what="the call's log line")
    finally:
        never.set()
        await served.channel.close()
        await served.server.stop(None)

    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-idle-timeout" in (failed.value.details() or "")
    info = error_info(cast(grpc.RpcError, failed.value))
    assert info is not None
    assert info.reason == "REQUEST_TIMEOUT"
    [line] = _lines(logs, RERANK)
    assert line["code"] == "DEADLINE_EXCEEDED"
    assert served.admission.open == 0


async def test_silent_calls_past_max_open_calls_are_refused_by_the_edge_at_once(
    logs: LogCapture,
) -> None:
    """Refused OVERLOADED as they arrive, so grpc's own limit (--max-open-calls plus the
    side calls' room) is never reached by them."""
    never = asyncio.Event()
    served = await _serve(max_open=2)
    try:
        calls = [served.silent(RERANK, never) for _ in range(5)]
        assert await wait_until_async(
            lambda: sum(call.done() for call in calls) == 3, what="the calls past the bound refused"
        )
        codes = [(await call.code()).name for call in calls if call.done()]
        assert served.admission.open == 2
        assert sum(not call.done() for call in calls) == 2  # held, open
        for call in calls:
            call.cancel()
        assert await wait_until_async(lambda: served.admission.open == 0, what="the held calls ended")
    finally:
        never.set()
        await served.channel.close()
        await served.server.stop(None)

    assert codes == ["RESOURCE_EXHAUSTED"] * 3
    assert await wait_until_async(lambda: len(_lines(logs, RERANK)) == 5, what="every call logged")
    codes_logged = sorted(line["code"] for line in _lines(logs, RERANK))
    assert codes_logged == ["CANCELLED"] * 2 + ["RESOURCE_EXHAUSTED"] * 3


async def test_a_request_over_max_message_bytes_is_grpcs_refusal_and_the_call_is_recorded_cancelled(
    logs: LogCapture,
) -> None:
    """grpc refuses it itself (RESOURCE_EXHAUSTED), which ends the request as a half-close
    would: recorded as a stream's such item is, not as a call without its request."""
    served = await _serve()
    try:
        rerank: grpc.aio.UnaryUnaryMultiCallable[Any, Any] = served.channel.unary_unary(
            RERANK, rerank_pb2.RerankRequest.SerializeToString
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await rerank(rerank_pb2.RerankRequest(query="q" * MAX_MESSAGE_BYTES), timeout=30)
        assert await wait_until_async(lambda: len(_lines(logs, RERANK)) == 1, what="the call's log line")
        answered = await rerank(rerank_pb2.RerankRequest(model="m", query="q", documents=["d"]), timeout=30)
    finally:
        await served.channel.close()
        await served.server.stop(None)

    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _lines(logs, RERANK)[0]["code"] == "CANCELLED"
    assert answered == b""  # the next call is served (an empty answer, serialized)
    assert served.admission.open == 0


async def test_a_call_whose_request_has_not_come_by_its_deadline_is_recorded_deadline_exceeded(
    logs: LogCapture,
) -> None:
    never = asyncio.Event()
    served = await _serve()
    try:
        call = served.silent(RERANK, never, timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert await wait_until_async(lambda: len(_lines(logs, RERANK)) == 1, what="the call's log line")
    finally:
        never.set()
        await served.channel.close()
        await served.server.stop(None)

    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _lines(logs, RERANK)[0]["code"] == "DEADLINE_EXCEEDED"
    assert served.admission.open == 0


async def test_a_call_whose_request_has_not_come_when_the_server_drains_ends_unavailable_at_once(
    logs: LogCapture,
) -> None:
    """It held grpc's drain for --stream-idle-timeout (or the whole grace) for a call that
    never ran; a call that comes in as the drain begins is refused the same way."""
    never = asyncio.Event()
    served = await _serve(read_within=600.0)
    try:
        call = served.silent(RERANK, never)
        assert await wait_until_async(lambda: served.admission.open == 1, what="the silent call counted open")
        served.edge.drain()  # as the server's stop begins it
        late = served.silent(RERANK, never)  # grpc takes calls until it stops: the edge refuses it
        failures = []
        for each in (call, late):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(each, 60)  # a bound for a broken edge: the read's is 600 s
            failures.append(failed.value)
        await asyncio.wait_for(served.server.stop(600.0), 60)  # grpc's drain, no call left in it
        assert await wait_until_async(lambda: len(_lines(logs, RERANK)) == 2, what="the calls' log lines")
    finally:
        never.set()
        await served.channel.close()
        await served.server.stop(None)

    assert [failure.code() for failure in failures] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert all("shutting down" in (failure.details() or "") for failure in failures)
    assert [line["code"] for line in _lines(logs, RERANK)] == ["UNAVAILABLE"] * 2
    assert served.admission.open == 0
