"""A call runs on the route it was split for: pinned as the engine prepares it, whatever a
reload changes while it waits to be sent (its caller's limits), and released once it ends."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
import pytest

from rerank_service.config.callers import BucketLimit, CallerLimits
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    FailureKind,
    RerankRequest,
    ServiceError,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.call import Call, Pipeline
from rerank_service.pipeline.callers import Caller, CallerDirectory
from rerank_service.pipeline.limits import Grant, Limiter
from rerank_service.pipeline.limits_store import RedisLimits
from rerank_service.routing.route import Member
from rerank_service.routing.router import Router
from tests.unit.test_routing import (
    ROUTE,
    ClosableBackend,
    FakeBackend,
    deployment,
    eventually,
    request,
    route_of,
    running,
)


class SizedBackend(FakeBackend):
    """Refuses a request over its documents a call, as an upstream answers 413."""

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        most = self.limits.max_documents
        if most is not None and len(request.documents) > most:
            self.calls.append((request, context))
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "too large", kind=FailureKind.REQUEST)
        return await super().rerank(request, context)


class GatedLimiter(Limiter):
    """A limits store that answers (or refuses, `refusal`) once the test opens `gate`: a call
    waits on it between being prepared and being sent, as on Redis."""

    def __init__(self, refusal: ServiceError | None = None) -> None:
        super().__init__(cast(RedisLimits, object()))  # a store: the call awaits `admit`
        self.waiting, self.gate = asyncio.Event(), asyncio.Event()
        self.refusal = refusal

    async def admit(
        self,
        caller: Caller,
        request: RerankRequest,
        lease: str,
        deadline: float | None,
        *,
        documents: int | None = None,
    ) -> Grant | None:
        self.waiting.set()
        await self.gate.wait()
        if self.refusal is not None:
            raise self.refusal
        return None


def limited_call(router: Router, limiter: GatedLimiter) -> Call:
    """A call of a caller with limits, through the pipeline over `router`."""
    engine = RerankEngine(router, chunk_concurrency=1, max_fanout_factor=100)
    pipeline = Pipeline(engine, Admission(4), CallerDirectory(), limiter=limiter)
    method = "/rerank.v1.RerankService/Rerank"
    call = pipeline.open(method, "peer", pipeline.metrics.for_method(method))
    call.caller = Caller(
        "search", limits=CallerLimits(requests=BucketLimit("requests", 1.0, 100)), configured=True
    )
    call.admit(0)
    return call


async def test_a_call_waiting_on_its_limits_through_a_reload_runs_on_the_route_it_was_split_for() -> None:
    old = ClosableBackend("old", limits=CallLimits(max_documents=5))
    new = SizedBackend("new", limits=CallLimits(max_documents=2))  # the new route takes fewer a request
    limiter = GatedLimiter()
    ten = RerankRequest(model=ROUTE, query="q", documents=[f"doc {i}" for i in range(10)])

    async with running(Router([route_of(Member(deployment(old), ROUTE))])) as router:
        call = limited_call(router, limiter)
        task = asyncio.create_task(call.rerank(ten, CallContext()))
        await limiter.waiting.wait()  # split for "old" (2 chunks of 5), waiting on its limits
        await router.replace([route_of(Member(deployment(new), ROUTE))], grace=10.0)
        await asyncio.sleep(0.01)  # a moment in which a wrong close would happen: nothing to wait for
        assert old.closed == 0  # dropped by the reload, kept open for the call
        limiter.gate.set()
        answered = await task

        assert answered.deployments == ["old"]  # where it was split for: every chunk fits
        assert ([len(sent.documents) for sent, _ in old.calls], new.calls) == ([5, 5], [])
        await eventually(lambda: old.closed == 1)  # once the call no longer holds it
        # A call prepared after the reload is split for the new route.
        assert (await router.rerank(request(), CallContext())).deployment == "new"


async def test_a_call_refused_by_its_limits_after_a_reload_lets_the_deployment_it_was_pinned_to_close() -> (
    None
):
    old, new = FakeBackend("old"), FakeBackend("new")
    limiter = GatedLimiter(ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no more"))

    async with running(Router([route_of(Member(deployment(old), ROUTE))])) as router:
        call = limited_call(router, limiter)
        task = asyncio.create_task(call.rerank(RerankRequest(ROUTE, "q", ["a", "b"]), CallContext()))
        await limiter.waiting.wait()
        await router.replace([route_of(Member(deployment(new), ROUTE))], grace=10.0)
        limiter.gate.set()
        with pytest.raises(ServiceError):
            await task

        await eventually(lambda: old.closed == 1)  # never sent: released all the same
        assert (old.calls, new.calls) == ([], [])
