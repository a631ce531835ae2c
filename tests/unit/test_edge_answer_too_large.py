"""An answer over --max-message-bytes fails the call: its error still names the deployments
that answered and the time they took, as any failed call that reached a deployment does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import SERVICE, Answer, RerankServiceEdge
from rerank_service.core.domain import RerankOutcome, Timings
from rerank_service.core.engine import RerankEngine
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.call import Pipeline
from rerank_service.pipeline.callers import CallerDirectory
from rerank_service.pipeline.record import DEPLOYMENT_KEY, UPSTREAM_TIME_KEY

LIMIT = 1024


class _AnswersTooMuch:
    """Rerank answers more than LIMIT bytes, from two deployments that took 250 ms."""

    async def ListModels(self, request: Any, context: Any, call: Any) -> Any:
        raise NotImplementedError

    async def RerankStream(self, requests: Any, context: Any, call: Any) -> AsyncIterator[Any]:
        responses: tuple[Any, ...] = ()
        for response in responses:
            yield response

    async def Rerank(self, request: Any, context: Any, call: Any) -> Answer[Any]:
        results = [rerank_pb2.RerankResult(index=index, relevance_score=0.5) for index in range(500)]
        outcome = RerankOutcome(
            results=[],
            total_tokens=7,
            deployments=["east", "west"],
            timings=Timings(upstream_spans=((10.0, 10.25),)),
        )
        return Answer(rerank_pb2.RerankResponse(output=rerank_pb2.RerankOutput(results=results)), outcome)


async def test_an_answer_too_large_names_its_deployments_and_their_upstream_time() -> None:
    """It carried neither: x-deployment was missing and x-upstream-time said 0.000."""
    pipeline = Pipeline(cast(RerankEngine, None), Admission(4), CallerDirectory(api_keys=[]))
    edge = RerankServiceEdge(pipeline, UPSTREAM_TIME_KEY, stream_idle_timeout=60.0, max_answer_bytes=LIMIT)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((edge.handler(_AnswersTooMuch()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            rerank: grpc.aio.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
                f"/{SERVICE.full_name}/Rerank", rerank_pb2.RerankRequest.SerializeToString
            )
            call = rerank(rerank_pb2.RerankRequest(model="m", query="q", documents=["d"]), timeout=10)
            code = await call.code()
            trailing = {key: value for key, value in await call.trailing_metadata() or ()}
    finally:
        await server.stop(None)

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailing[DEPLOYMENT_KEY] == "east,west"
    assert trailing[UPSTREAM_TIME_KEY] == "250.000"
