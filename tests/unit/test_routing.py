"""Route.pick and Router: weighted choice, priorities, panic mode, probes, fallback, readiness, reloads."""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast

import grpc
import pytest

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    NO_TIME_LEFT,
    BackendRequest,
    BackendResult,
    CallContext,
    DeploymentInfo,
    DeploymentState,
    FailureKind,
    ModelInfo,
    RerankRequest,
    ScoredDocument,
    ServiceError,
    Timings,
    not_ready,
    replaced,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.core.health import DeploymentHealth, Outcome
from rerank_service.core.readiness import Readiness
from rerank_service.core.retry_budget import RetryBudget
from rerank_service.core.token_window import EstimatedWindow
from rerank_service.observability.metrics import Metrics
from rerank_service.routing.cached_scores import CachedScores
from rerank_service.routing.deployment import Deployment
from rerank_service.routing.route import Member, Route
from rerank_service.routing.router import Router
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import upstream_settings

ROUTE = "qwen3-rerank"
FAILURES = 3
COOLDOWN = 5.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """Answers each call (or fails it with `reason`, a failure of `kind`) and records what it was asked."""

    def __init__(
        self,
        name: str,
        model: str = ROUTE,
        *,
        reason: str | None = None,
        kind: FailureKind = FailureKind.DEPLOYMENT,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        ready: bool = True,
        limits: CallLimits | None = None,
        max_documents: int = 100,
        supports_instruct: bool = True,
        span: tuple[float, float] = (1.0, 2.0),
        delay: float = 0.0,
        log: list[str] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.reason = reason
        self.kind = kind
        self.code = code
        self.limits = limits or CallLimits()
        self.max_documents = max_documents
        self.supports_instruct = supports_instruct
        self.span = span
        self.delay = delay
        self.log = log if log is not None else []
        self.gate: asyncio.Event | None = None  # set: each call waits for it
        self.calls: list[tuple[BackendRequest, CallContext]] = []
        self.started = 0
        self.closed = 0
        self._readiness = Readiness(ready)

    @property
    def readiness(self) -> Readiness:
        return self._readiness

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                self.model,
                max_documents=self.max_documents,
                max_query_tokens=4000,
                supports_instruct=self.supports_instruct,
                backend="upstream",
                format="cohere",
                upstream_url=f"http://{self.name}.example",
            )
        ]

    def call_limits(self, model: str) -> CallLimits:
        assert model == self.model
        return self.limits

    async def start(self) -> None:
        self.started += 1
        self._readiness.set(True)

    async def close(self) -> None:
        self.closed += 1
        self._readiness.set(False)

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        self.calls.append((request, context))
        self.log.append(self.name)
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)  # the backend's work, not synchronisation
        timings = Timings(upstream_spans=(self.span,))
        if self.reason is not None or self.code is not grpc.StatusCode.UNAVAILABLE:
            raise ServiceError(
                self.code, f"{self.name} failed", reason=self.reason, timings=timings, kind=self.kind
            )
        scores = [ScoredDocument(index, 0.5) for index in range(len(request.documents))]
        return BackendResult(scores, total_tokens=7, timings=timings)


def deployment(backend: FakeBackend, health: DeploymentHealth | None = None) -> Deployment:
    return Deployment(backend.name, backend, health)


def health_on(clock: Clock | None = None, cooldown: float = COOLDOWN) -> DeploymentHealth:
    if clock is None:
        return DeploymentHealth(min_failures=FAILURES, cooldown=cooldown)
    return DeploymentHealth(min_failures=FAILURES, cooldown=cooldown, clock=clock)


def eject(health: DeploymentHealth) -> None:
    for _ in range(FAILURES):
        health.record(Outcome.FAILURE)
    assert health.state is DeploymentState.EJECTED


def take_down(health: DeploymentHealth) -> None:
    for _ in range(FAILURES):
        health.record(Outcome.FAILURE, unreachable=True)
    assert health.state is DeploymentState.DOWN


def route_of(*members: Member, budget: RetryBudget | None = None, seed: int = 1) -> Route:
    return Route(ROUTE, list(members), budget or RetryBudget(), _rng=random.Random(seed))


def request(model: str = ROUTE) -> BackendRequest:
    return BackendRequest(model=model, query="q", documents=["a", "b"], instruct=None, top_n=None)


def picked(route: Route, tried: set[Deployment] | None = None) -> str:
    member = route.pick(tried or set())
    assert member is not None
    return member.deployment.name


def shares(route: Route, picks: int = 10_000) -> dict[str, float]:
    counts = Counter(picked(route) for _ in range(picks))
    return {name: count / picks for name, count in counts.items()}


def ready(router: Router) -> bool:
    """Read afresh each time (mypy would narrow a property across awaits)."""
    return router.readiness.ready


def refusing(health: DeploymentHealth) -> bool:
    return health.refusing


async def call_error(router: Router, context: CallContext | None = None) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        await router.rerank(request(), context or CallContext())
    return raised.value


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    give_up = time.monotonic() + within
    while not condition():
        assert time.monotonic() < give_up, "the condition never came true"
        await asyncio.sleep(0.001)


@asynccontextmanager
async def running(router: Router) -> AsyncIterator[Router]:
    await router.start()
    await asyncio.sleep(0)  # the router's watches of each backend's readiness begin
    try:
        yield router
    finally:
        await router.close()


# --- Route.pick ---------------------------------------------------------------------------------------


def test_picks_follow_the_weights_of_one_priority() -> None:
    a, b, c = (deployment(FakeBackend(name)) for name in "abc")
    route = route_of(Member(a, ROUTE, weight=1), Member(b, ROUTE, weight=3), Member(c, ROUTE, weight=6))

    found = shares(route)

    assert found["a"] == pytest.approx(0.1, abs=0.02)
    assert found["b"] == pytest.approx(0.3, abs=0.02)
    assert found["c"] == pytest.approx(0.6, abs=0.02)


def test_of_two_drawn_the_less_loaded_one_is_picked() -> None:
    busy, idle = deployment(FakeBackend("busy")), deployment(FakeBackend("idle"))
    busy.in_flight = 4
    route = route_of(Member(busy, ROUTE), Member(idle, ROUTE))

    found = shares(route)

    assert found["busy"] == pytest.approx(0.25, abs=0.02)  # only when both draws were it


def closed_loop_shares(
    weights: list[int], in_flight: int, calls: int = 40_000, slow: float = 1.0
) -> list[float]:
    """Each deployment's share of `calls` picked as `in_flight` callers pick them, each calling
    again as its call ends, every call taking as long (the first deployment's `slow` times as
    long): an event queue, no clock, the route's seeded draws: the same shares on every run."""
    members = [Member(deployment(FakeBackend(f"d{i}")), ROUTE, weight=w) for i, w in enumerate(weights)]
    route = route_of(*members)
    took = {member.deployment.name: 1.0 for member in members} | {"d0": slow}
    # (when a call ends, a number that orders ties, the deployment it was on)
    ends: list[tuple[float, int, Deployment | None]] = [(n / in_flight, n, None) for n in range(in_flight)]
    counts: Counter[str] = Counter()
    for number in range(calls):
        now, _, ended = heapq.heappop(ends)
        if ended is not None:
            ended.in_flight -= 1
        member = route.pick(set())
        assert member is not None
        member.deployment.in_flight += 1
        counts[member.deployment.name] += 1
        heapq.heappush(ends, (now + took[member.deployment.name], in_flight + number, member.deployment))
    return [counts[member.deployment.name] / calls for member in members]


@pytest.mark.parametrize("in_flight", [1, 2, 3, 4, 8, 32])
@pytest.mark.parametrize(("weights", "within"), [([19, 1], 0.012), ([99, 1], 0.004), ([3, 2, 1], 0.025)])
def test_equally_fast_deployments_share_the_calls_by_weight_however_few_are_in_flight(
    weights: list[int], within: float, in_flight: int
) -> None:
    """At a few calls in flight the heavier deployment nearly always holds one and the lighter
    none: a lighter one that won each draw against it for that got about twice its weight.
    (The bounds are several standard deviations of 40,000 draws wide.)"""
    found = closed_loop_shares(weights, in_flight)

    for share, weight in zip(found, weights, strict=True):
        assert share == pytest.approx(weight / sum(weights), abs=within)


def test_the_second_draw_takes_the_call_by_how_far_the_first_is_over_its_share() -> None:
    heavy, light = deployment(FakeBackend("heavy")), deployment(FakeBackend("light"))
    heavy.in_flight = 1  # its share of the one call in flight is 0.95: over it by 0.05, light under by 0.05
    route = route_of(Member(heavy, ROUTE, weight=19), Member(light, ROUTE, weight=1))

    found = shares(route, 40_000)

    # Drawn first (5%), or second after heavy (95% x 5%), then taking the call 1 time in 10.
    assert found["light"] == pytest.approx(0.05 + 0.95 * 0.05 * 0.1, abs=0.006)


def test_a_slower_deployment_gets_fewer_calls_than_its_weight() -> None:
    heavier_but_slow = closed_loop_shares([3, 1], in_flight=16, slow=4.0)[0]

    # 0.75 by weight; two draws can take it down to 0.5625 (when both are it, 0.75 x 0.75)
    assert heavier_but_slow < 0.65


def test_the_lowest_priority_number_is_always_picked_while_it_is_healthy() -> None:
    primary, fallback = deployment(FakeBackend("primary")), deployment(FakeBackend("fallback"))
    route = route_of(Member(fallback, ROUTE, priority=1, weight=100), Member(primary, ROUTE, priority=0))

    assert set(shares(route, 1000)) == {"primary"}
    assert picked(route, {primary}) == "fallback"
    assert route.pick({primary, fallback}) is None


def test_the_fallback_tier_is_picked_only_when_the_whole_first_tier_is_ejected_or_unusable() -> None:
    clock = Clock()
    first, second = health_on(clock), health_on(clock)
    not_ready = FakeBackend("not-ready", ready=False)
    route = route_of(
        Member(deployment(FakeBackend("first"), first), ROUTE),
        Member(deployment(FakeBackend("second"), second), ROUTE),
        Member(deployment(not_ready), ROUTE),
        Member(deployment(FakeBackend("fallback")), ROUTE, priority=1),
    )

    eject(first)
    assert set(shares(route, 1000)) == {"second"}  # one of the first tier is still healthy

    eject(second)
    assert set(shares(route, 1000)) == {"fallback"}

    not_ready.readiness.set(True)
    assert set(shares(route, 1000)) == {"not-ready"}


def test_when_every_deployment_is_ejected_they_are_still_picked_in_priority_order() -> None:
    clock = Clock()
    healths = [health_on(clock) for _ in range(3)]
    route = route_of(
        Member(deployment(FakeBackend("a"), healths[0]), ROUTE),
        Member(deployment(FakeBackend("b"), healths[1]), ROUTE),
        Member(deployment(FakeBackend("c"), healths[2]), ROUTE, priority=1),
    )
    for health in healths:
        eject(health)

    found = shares(route, 1000)

    assert set(found) == {"a", "b"}  # panic mode: trying beats refusing
    assert picked(route, {member.deployment for member in route.members[:2]}) == "c"


def test_panic_mode_prefers_an_ejected_deployment_to_one_that_would_refuse() -> None:
    clock = Clock()
    down_health, ejected_health = health_on(clock), health_on(clock)
    take_down(down_health)
    eject(ejected_health)
    route = route_of(
        Member(deployment(FakeBackend("down"), down_health), ROUTE, priority=0),
        Member(deployment(FakeBackend("ejected"), ejected_health), ROUTE, priority=1),
    )

    assert set(shares(route, 1000)) == {"ejected"}


def test_when_every_deployment_would_refuse_one_is_still_picked_to_say_when_to_come_back() -> None:
    clock = Clock()
    health = health_on(clock)
    take_down(health)
    down = deployment(FakeBackend("down"), health)
    route = route_of(Member(down, ROUTE), Member(deployment(FakeBackend("off", ready=False)), ROUTE))

    assert route.pick(set()) is not None
    assert picked(route, {down}) == "off"


def test_when_every_deployment_would_refuse_the_one_back_soonest_is_picked() -> None:
    """Its refusal's RetryInfo says when the route serves again: the lowest priority's, a
    30 s cool-down, sent callers away for 30 s while the other was back after 1 s."""
    clock = Clock()
    slow_back, soon_back = health_on(clock, cooldown=30.0), health_on(clock, cooldown=1.0)
    take_down(slow_back)
    take_down(soon_back)
    route = route_of(
        Member(deployment(FakeBackend("eu-west"), slow_back), ROUTE, priority=0),
        Member(deployment(FakeBackend("us-east"), soon_back), ROUTE, priority=1),
        Member(deployment(FakeBackend("loading", ready=False)), ROUTE, priority=0),
    )

    assert picked(route) == "us-east"
    assert soon_back.refused_for == pytest.approx(1.0)


def test_a_down_deployment_whose_probe_is_due_is_picked_first_whatever_its_priority() -> None:
    clock = Clock()
    health = health_on(clock)
    take_down(health)
    route = route_of(
        Member(deployment(FakeBackend("healthy")), ROUTE, priority=0, weight=10),
        Member(deployment(FakeBackend("down"), health), ROUTE, priority=2),
    )
    assert picked(route) == "healthy"  # within its cool-down: never a first choice

    clock.now += COOLDOWN

    assert picked(route) == "down"
    assert health.admit() is True  # the probe went
    assert picked(route) == "healthy"  # the next probe is not due yet


# --- Router: fallback -----------------------------------------------------------------------------------


async def test_a_call_falls_over_to_the_next_deployment_and_names_the_one_that_answered() -> None:
    failing = FakeBackend("a", reason="UPSTREAM_UNAVAILABLE", span=(1.0, 2.0))
    answering = FakeBackend("b", model="b-model", span=(2.5, 3.0))
    route = route_of(Member(deployment(failing), ROUTE), Member(deployment(answering), "b-model", priority=1))
    router = Router([route])

    result = await router.rerank(request(), CallContext())

    assert result.deployment == "b"
    assert [score.index for score in result.scores] == [0, 1]
    assert result.timings.upstream_spans == ((1.0, 2.0), (2.5, 3.0))  # both attempts' time
    assert [sent.model for sent, _ in failing.calls] == [ROUTE]
    assert [sent.model for sent, _ in answering.calls] == ["b-model"]  # the name it knows the model by
    assert answering.calls[0][1].retry_budget is route.budget


async def test_a_fallback_tries_the_same_priority_before_the_next() -> None:
    log: list[str] = []
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_TIMEOUT", log=log)), ROUTE),
        Member(deployment(FakeBackend("b", reason="UPSTREAM_BAD_RESPONSE", log=log)), ROUTE),
        Member(deployment(FakeBackend("c", log=log)), ROUTE, priority=1),
    )

    result = await Router([route]).rerank(request(), CallContext())

    assert result.deployment == "c"
    assert sorted(log[:2]) == ["a", "b"]
    assert log[2:] == ["c"]


@pytest.mark.parametrize("reason", ["UPSTREAM_UNAVAILABLE", "MODEL_FAILED", "ANY_REASON_AT_ALL"])
async def test_failures_that_say_the_deployment_cannot_answer_now_fall_over(reason: str) -> None:
    # The backend's kind decides, whatever the reason (which kind each reason has is
    # checked where the errors are made).
    route = route_of(
        Member(deployment(FakeBackend("a", reason=reason, kind=FailureKind.DEPLOYMENT)), ROUTE),
        Member(deployment(FakeBackend("b")), ROUTE, priority=1),
    )

    assert (await Router([route]).rerank(request(), CallContext())).deployment == "b"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, None),
        (grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
        (grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_REJECTED_REQUEST"),
        (grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED"),
        (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),  # the kind decides, not the reason
    ],
)
async def test_a_failure_that_is_the_requests_own_fault_never_falls_over(
    code: grpc.StatusCode, reason: str | None
) -> None:
    other = FakeBackend("b")
    route = route_of(
        Member(deployment(FakeBackend("a", code=code, reason=reason, kind=FailureKind.REQUEST)), ROUTE),
        Member(deployment(other), ROUTE, priority=1),
    )

    error = await call_error(Router([route]))

    assert (error.code, error.reason, error.deployment) == (code, reason, "a")
    assert other.calls == []


async def test_when_every_deployment_fails_the_last_failure_is_raised_with_all_their_timings() -> None:
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_UNAVAILABLE", span=(1.0, 2.0))), ROUTE),
        Member(deployment(FakeBackend("b", reason="UPSTREAM_TIMEOUT", span=(3.0, 4.0))), ROUTE, priority=1),
    )

    error = await call_error(Router([route]))

    assert (error.reason, error.deployment) == ("UPSTREAM_TIMEOUT", "b")
    assert error.timings.upstream_spans == ((1.0, 2.0), (3.0, 4.0))


async def test_a_fallback_that_refuses_the_request_leaves_the_caller_the_failure_that_fell_over() -> None:
    # A local fallback counts the query with its own tokenizer, and may take less than the
    # route accepted: its refusal must not turn the primary's UNAVAILABLE into the caller's fault.
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_UNAVAILABLE", span=(1.0, 2.0))), ROUTE),
        Member(
            deployment(
                FakeBackend(
                    "b", code=grpc.StatusCode.INVALID_ARGUMENT, kind=FailureKind.REQUEST, span=(3.0, 4.0)
                )
            ),
            ROUTE,
            priority=1,
        ),
    )

    error = await call_error(Router([route]))

    assert (error.code, error.reason, error.deployment) == (
        grpc.StatusCode.UNAVAILABLE,
        "UPSTREAM_UNAVAILABLE",
        "a",
    )
    assert error.timings.upstream_spans == ((1.0, 2.0), (3.0, 4.0))


class GuardedBackend(FakeBackend):
    """Refuses through its health, as an upstream deployment does, before sending anything."""

    def __init__(self, name: str, health: DeploymentHealth) -> None:
        super().__init__(name)
        self.health = health

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        self.health.admit()
        return await super().rerank(request, context)


@pytest.mark.parametrize("probed", [False, True], ids=["in-its-cool-down", "its-probe-out"])
async def test_no_fallback_to_a_deployment_that_would_only_refuse(probed: bool) -> None:
    clock = Clock()
    down_health = health_on(clock)
    take_down(down_health)
    if probed:  # past its cool-down, this interval's probe already sent: refused as well
        clock.now += COOLDOWN
        assert down_health.admit() is True
    down = GuardedBackend("down", down_health)
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_UNAVAILABLE")), ROUTE),
        Member(deployment(down, down_health), ROUTE, priority=1),
        budget=RetryBudget(share=0, floor=1),
    )
    metrics = Metrics()

    error = await call_error(Router([route], metrics))

    # The primary's failure, not the refusal's CIRCUIT_OPEN and RetryInfo (kept for a route
    # whose every deployment is down); no fallback counted, nor budget spent, for nothing sent.
    assert (error.reason, error.deployment, error.retry_after) == ("UPSTREAM_UNAVAILABLE", "a", None)
    assert down.calls == []
    assert not metrics.registry.get_sample_value("rerank_route_fallbacks_total", {"route": ROUTE})
    assert route.budget.try_spend()  # its one extra attempt is still there


class GatedLookup:
    """A score cache in front of a deployment whose every lookup waits for `gate` (a Redis
    round trip), then misses every pair."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0

    async def rerank(
        self,
        route: str,
        request: BackendRequest,
        context: CallContext,
        score: Callable[[BackendRequest, CallContext], Awaitable[BackendResult]],
    ) -> BackendResult:
        self.waiting += 1
        await self.gate.wait()
        return await score(request, context)


def _answered_by(outcome: BackendResult | BaseException) -> str | None:
    """The deployment that answered, or the failure's reason."""
    if isinstance(outcome, BackendResult):
        return outcome.deployment
    return outcome.reason if isinstance(outcome, ServiceError) else repr(outcome)


async def test_calls_choosing_while_a_probe_waits_on_its_cache_lookup_go_to_the_fallback_not_a_refusal() -> (
    None
):
    clock = Clock()
    health = health_on(clock)
    take_down(health)
    clock.now += COOLDOWN  # its probe is due
    lookup = GatedLookup()
    probed, fallback = GuardedBackend("down", health), FakeBackend("fallback")
    route = route_of(
        Member(Deployment("down", probed, health, scores=cast(CachedScores, lookup)), ROUTE),
        Member(deployment(fallback), ROUTE, priority=1),
        budget=RetryBudget(share=0, floor=0),  # no fallback at all: a refusal would end a call
    )
    metrics = Metrics()
    router = Router([route], metrics)

    probe = asyncio.create_task(router.rerank(request(), CallContext()))
    await eventually(lambda: lookup.waiting == 1)
    others = [asyncio.create_task(router.rerank(request(), CallContext())) for _ in range(3)]
    await eventually(lambda: len(fallback.calls) + lookup.waiting == 4)  # each has made its choice
    lookup.gate.set()
    answered = await asyncio.gather(probe, *others, return_exceptions=True)

    # The probe was one call's; the others, choosing while it waited, went where they could
    # be answered, neither refused nor counted as fallbacks.
    assert [_answered_by(outcome) for outcome in answered] == ["down"] + ["fallback"] * 3
    assert (len(probed.calls), lookup.waiting) == (1, 1)
    assert not metrics.registry.get_sample_value("rerank_route_fallbacks_total", {"route": ROUTE})


async def test_no_fallback_once_the_routes_retry_budget_is_spent() -> None:
    other = FakeBackend("b")
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_UNAVAILABLE")), ROUTE),
        Member(deployment(other), ROUTE, priority=1),
        budget=RetryBudget(share=0, floor=0),
    )

    error = await call_error(Router([route]))

    assert (error.reason, error.deployment) == ("UPSTREAM_UNAVAILABLE", "a")
    assert other.calls == []


async def test_each_fallback_spends_the_routes_retry_budget() -> None:
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_UNAVAILABLE")), ROUTE),
        Member(deployment(FakeBackend("b")), ROUTE, priority=1),
        budget=RetryBudget(share=0, floor=1),
    )
    metrics = Metrics()
    router = Router([route], metrics)

    assert (await router.rerank(request(), CallContext())).deployment == "b"
    assert (await call_error(router)).deployment == "a"  # the one extra attempt was spent
    counted = metrics.registry.get_sample_value
    assert counted("rerank_route_fallbacks_total", {"route": ROUTE}) == 1
    assert counted("rerank_route_retry_budget_exhausted_total", {"route": ROUTE}) == 1


async def test_no_fallback_once_the_callers_deadline_has_passed() -> None:
    other = FakeBackend("b")
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_UNAVAILABLE", delay=0.05)), ROUTE),
        Member(deployment(other), ROUTE, priority=1),
    )

    error = await call_error(Router([route]), CallContext(deadline=time.monotonic() + 0.02))

    assert (error.reason, error.deployment) == ("UPSTREAM_UNAVAILABLE", "a")
    assert other.calls == []


async def test_no_fallback_with_no_time_left_to_send_it() -> None:
    """Under NO_TIME_LEFT of the deadline the transport sends nothing: a fallback then was
    counted and charged, and its DEADLINE_EXCEEDED hid the failure that ended the call."""
    other = FakeBackend("b")
    route = route_of(
        Member(deployment(FakeBackend("a", reason="UPSTREAM_UNAVAILABLE")), ROUTE),
        Member(deployment(other), ROUTE, priority=1),
    )

    error = await call_error(Router([route]), CallContext(deadline=time.monotonic() + NO_TIME_LEFT * 0.8))

    assert (error.reason, error.deployment) == ("UPSTREAM_UNAVAILABLE", "a")
    assert other.calls == []


async def test_a_call_for_a_model_no_route_serves_is_not_found() -> None:
    route = route_of(Member(deployment(FakeBackend("a")), ROUTE))

    with pytest.raises(ServiceError) as raised:
        await Router([route]).rerank(request("other"), CallContext())

    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


# --- Router: readiness --------------------------------------------------------------------------------


async def test_ready_only_once_started_and_no_longer_once_closed() -> None:
    backend = FakeBackend("a", ready=False)
    router = Router([route_of(Member(deployment(backend), ROUTE))])
    assert not ready(router)

    await router.start()
    assert ready(router)
    assert backend.started == 1

    await router.close()
    assert not ready(router)
    assert backend.closed == 1


async def test_not_ready_while_a_route_has_only_deployments_that_are_down() -> None:
    health = health_on(cooldown=0.05)  # the real clock: the cool-down ends by itself
    route = route_of(Member(deployment(FakeBackend("a"), health), ROUTE))
    other = route_of(Member(deployment(FakeBackend("b")), ROUTE))
    other.name = "other"

    async with running(Router([route, other])) as router:
        assert ready(router)

        take_down(health)
        assert not ready(router)  # at once, not at the next call

        assert await asyncio.wait_for(router.readiness.changed(), 2.0) is True
        assert not refusing(health)  # past the cool-down: probes may go


async def test_one_deployment_that_is_down_or_not_ready_leaves_the_route_ready() -> None:
    clock = Clock()
    health = health_on(clock)
    spare = FakeBackend("spare")
    route = route_of(
        Member(deployment(FakeBackend("a"), health), ROUTE),
        Member(deployment(spare), ROUTE, priority=1),
    )

    async with running(Router([route])) as router:
        take_down(health)
        assert ready(router)  # the spare can still answer

        spare.readiness.set(False)
        await eventually(lambda: not ready(router))

        spare.readiness.set(True)
        await eventually(lambda: ready(router))


async def test_an_ejected_deployment_still_counts_for_readiness() -> None:
    health = health_on(Clock())
    route = route_of(Member(deployment(FakeBackend("a"), health), ROUTE))

    async with running(Router([route])) as router:
        eject(health)

        assert ready(router)


# --- Router: limits and what ListModels shows -------------------------------------------------------------


def test_call_limits_are_the_smallest_of_every_member_and_none_only_when_none_has_one() -> None:
    route = route_of(
        Member(deployment(FakeBackend("a", limits=CallLimits(100, None, 4000))), ROUTE),
        Member(deployment(FakeBackend("b", limits=CallLimits(None, 5000, 2000))), ROUTE),
        Member(deployment(FakeBackend("c", limits=CallLimits(300, 9000, 8000))), ROUTE, priority=1),
    )
    unlimited = route_of(
        Member(deployment(FakeBackend("d", limits=CallLimits(None, None))), ROUTE),
        Member(deployment(FakeBackend("e", limits=CallLimits(None, None))), ROUTE),
    )
    unlimited.name = "unlimited"
    router = Router([route, unlimited])

    assert router.call_limits(ROUTE) == CallLimits(max_documents=100, max_tokens=5000, max_item_tokens=2000)
    assert router.call_limits("unlimited") == CallLimits(max_documents=None, max_tokens=None)


class LoadingBackend(FakeBackend):
    """A local model still loading: not ready, and no window, however it is started, until `loaded`."""

    def __init__(self, name: str) -> None:
        super().__init__(name, ready=False)

    async def start(self) -> None:
        self.started += 1

    def loaded(self, window: EstimatedWindow) -> None:
        self.limits = CallLimits(window=window)
        self.readiness.set(True)


async def test_documents_are_cut_for_the_first_ready_member_with_a_window_while_the_first_loads() -> None:
    # The route's calls go to the fallback meanwhile: cut for nothing, they went to it whole.
    loading = LoadingBackend("local")
    upstream_window, local_window = EstimatedWindow(4000), EstimatedWindow(256)
    route = route_of(
        Member(deployment(loading), ROUTE),
        Member(deployment(FakeBackend("up", limits=CallLimits(window=upstream_window))), ROUTE, priority=1),
    )

    async with running(Router([route])) as router:
        assert router.call_limits(ROUTE).window is upstream_window

        loading.loaded(local_window)
        await eventually(lambda: router.call_limits(ROUTE).window is local_window)


def test_before_any_member_is_ready_documents_are_cut_for_the_first_that_reports_a_window() -> None:
    window = EstimatedWindow(4000)
    route = route_of(
        Member(deployment(FakeBackend("local", ready=False)), ROUTE),
        Member(
            deployment(FakeBackend("up", ready=False, limits=CallLimits(window=window))), ROUTE, priority=1
        ),
        Member(
            deployment(FakeBackend("other", ready=False, limits=CallLimits(window=EstimatedWindow(8)))),
            ROUTE,
            priority=2,
        ),
    )

    assert Router([route]).call_limits(ROUTE).window is window


def test_the_estimated_query_limit_is_the_smallest_of_the_members_that_estimate() -> None:
    # A local member (None) counts with its tokenizer; a chunk may go to any member.
    mixed = route_of(
        Member(deployment(FakeBackend("a", limits=CallLimits(max_query_tokens=4000))), ROUTE),
        Member(deployment(FakeBackend("b", limits=CallLimits(max_query_tokens=2000))), ROUTE),
        Member(deployment(FakeBackend("c", limits=CallLimits())), ROUTE, priority=1),
    )
    local = route_of(Member(deployment(FakeBackend("d", limits=CallLimits())), ROUTE))
    local.name = "local"
    router = Router([mixed, local])

    assert router.call_limits(ROUTE).max_query_tokens == 2000
    assert router.call_limits("local").max_query_tokens is None


def test_model_info_lists_every_deployment_with_its_state_and_the_limits_all_can_honour() -> None:
    clock = Clock()
    ejected, down = health_on(clock), health_on(clock)
    eject(ejected)
    take_down(down)
    route = route_of(
        Member(deployment(FakeBackend("a", max_documents=500)), ROUTE, weight=2),
        Member(deployment(FakeBackend("b", max_documents=100), ejected), ROUTE, weight=1),
        Member(
            deployment(FakeBackend("c", model="c-model", supports_instruct=False), down),
            "c-model",
            priority=1,
        ),
    )

    [info] = Router([route]).models()

    assert (info.name, info.max_documents, info.supports_instruct) == (ROUTE, 100, False)
    assert (info.format, info.upstream_url) == ("cohere", "http://a.example")  # the first deployment's
    healthy, ejected_state, down_state = (
        DeploymentState.HEALTHY,
        DeploymentState.EJECTED,
        DeploymentState.DOWN,
    )
    assert info.deployments == (
        DeploymentInfo("a", "upstream", "cohere", "http://a.example", priority=0, weight=2, state=healthy),
        DeploymentInfo(
            "b", "upstream", "cohere", "http://b.example", priority=0, weight=1, state=ejected_state
        ),
        DeploymentInfo("c", "upstream", "cohere", "http://c.example", priority=1, weight=1, state=down_state),
    )


def test_a_deployments_state_is_a_gauge_the_higher_the_worse_and_each_ejection_is_counted() -> None:
    metrics = Metrics()

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, {"deployment": "gauged", **labels}) or 0.0

    health = health_on(Clock())
    Deployment("gauged", FakeBackend("gauged"), health, metrics=metrics).adopt()
    assert sample("rerank_deployment_state") == 0

    eject(health)
    assert sample("rerank_deployment_state") == 1
    take_down(health)
    assert sample("rerank_deployment_state") == 2
    health.record(Outcome.SUCCESS)
    assert sample("rerank_deployment_state") == 0
    assert sample("rerank_deployment_ejections_total", state="ejected") == 1


async def test_a_backend_call_given_up_is_counted_cancelled_with_its_time() -> None:
    metrics = Metrics()
    backend = FakeBackend("slow")
    backend.gate = asyncio.Event()  # never set: the call waits until it is cancelled
    health = health_on(Clock())
    given_up = asyncio.create_task(
        Deployment("slow", backend, health, metrics=metrics).rerank(ROUTE, request(), CallContext())
    )
    await eventually(lambda: bool(backend.calls))
    given_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await given_up

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"route": ROUTE, "deployment": "slow", **labels})

    assert sample("rerank_deployment_calls_total", code="CANCELLED") == 1
    assert sample("rerank_deployment_latency_seconds_count") == 1
    assert health.state is DeploymentState.HEALTHY  # the caller gave up: the deployment did not fail


# --- Router.replace: a reload ---------------------------------------------------------------------------


async def test_replace_starts_added_deployments_and_closes_dropped_ones_after_their_calls_finish() -> None:
    old, kept, new = FakeBackend("old"), FakeBackend("kept"), FakeBackend("new")
    old_deployment, kept_deployment, new_deployment = deployment(old), deployment(kept), deployment(new)
    before = route_of(Member(old_deployment, ROUTE), Member(kept_deployment, ROUTE, priority=1))
    after = route_of(Member(kept_deployment, ROUTE), Member(new_deployment, ROUTE, priority=1))

    async with running(Router([before])) as router:
        old.gate = asyncio.Event()
        in_flight = asyncio.create_task(router.rerank(request(), CallContext()))
        await eventually(lambda: len(old.calls) == 1)

        await asyncio.wait_for(router.replace([after], grace=10.0), 2.0)  # returns once switched
        await asyncio.sleep(0.01)  # a moment in which a wrong close would happen: nothing to wait for

        assert new.started == 1
        assert old.closed == 0  # its call is still in flight
        assert (await router.rerank(request(), CallContext())).deployment == "kept"  # new calls: new routes
        assert router.deployments == [kept_deployment, new_deployment]

        old.gate.set()
        assert (await in_flight).deployment == "old"  # finished where it started
        await eventually(lambda: old.closed == 1)

        assert (old.closed, kept.closed, new.closed) == (1, 0, 0)
        assert (old.started, kept.started, new.started) == (1, 1, 1)  # a kept one is not restarted
        assert ready(router)


class ClosableBackend(FakeBackend):
    """Refuses once closed, and answers a turn of the event loop later, as real backends do."""

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        if not self.readiness.ready:
            raise not_ready("closed")
        await asyncio.sleep(0)
        return await super().rerank(request, context)


@pytest.mark.parametrize("reloads", [1, 2], ids=["one-reload", "a-reload-keeping-it-first"])
async def test_a_call_in_flight_falls_back_to_a_deployment_a_reload_dropped_which_closes_after_it(
    reloads: int,
) -> None:
    failing = ClosableBackend("a", reason="UPSTREAM_UNAVAILABLE")
    fallback, unrelated, new = ClosableBackend("b"), FakeBackend("d"), FakeBackend("c")
    failing.gate = asyncio.Event()
    first, second = deployment(failing), deployment(fallback)
    other = Route("other", [Member(deployment(unrelated), ROUTE)])

    async with running(
        Router([route_of(Member(first, ROUTE), Member(second, ROUTE, priority=1)), other])
    ) as router:
        # Through the engine, as every call goes: pinned to its route as it is prepared.
        engine = RerankEngine(router, chunk_concurrency=1, max_fanout_factor=100)
        asked = RerankRequest(model=ROUTE, query="q", documents=["a", "b"])
        call = asyncio.create_task(engine.rerank(asked, CallContext()))
        await eventually(lambda: len(failing.calls) == 1)
        if reloads == 2:  # the same deployments in a route built anew: none dropped
            await router.replace([route_of(Member(first, ROUTE), Member(second, ROUTE, priority=1))], 10.0)
        # "a" and "b" dropped with the route replaced; "d" with the route removed.
        await router.replace([route_of(Member(deployment(new), ROUTE))], grace=10.0)
        # "d", idle, closes; a "b" closed as idle would have closed by then (its retirement
        # takes the same steps, and started first).
        await eventually(lambda: unrelated.closed == 1)
        assert fallback.closed == 0  # the call on its route may still fall back to it

        failing.gate.set()
        answered = await call

        assert answered.deployments == ["b"]
        await eventually(lambda: (failing.closed, fallback.closed) == (1, 1))  # once the call ended


async def test_a_split_call_in_flight_sends_every_chunk_where_it_started_whatever_a_reload_changes() -> None:
    old = ClosableBackend("old", limits=CallLimits(max_documents=2))
    new = FakeBackend("new")
    old.gate = asyncio.Event()
    split = RerankRequest(model=ROUTE, query="q", documents=[f"doc {i}" for i in range(6)])  # 3 chunks

    async with running(Router([route_of(Member(deployment(old), ROUTE))])) as router:
        engine = RerankEngine(router, chunk_concurrency=1, max_fanout_factor=100)  # a chunk at a time
        call = asyncio.create_task(engine.rerank(split, CallContext()))
        await eventually(lambda: len(old.calls) == 1)
        # The route now goes to another deployment: "old" is dropped, to close once idle.
        await router.replace([route_of(Member(deployment(new), ROUTE))], grace=10.0)
        old.gate.set()
        answered = await call

        assert answered.deployments == ["old"]  # one ranking, of one deployment's scores
        assert (len(old.calls), new.calls) == (3, [])
        await eventually(lambda: old.closed == 1)  # once the call no longer holds it


async def test_replace_closes_a_dropped_deployment_after_the_grace_even_with_a_call_in_flight() -> None:
    stuck, other = FakeBackend("stuck"), FakeBackend("other")
    stuck.gate = asyncio.Event()

    async with running(Router([route_of(Member(deployment(stuck), ROUTE))])) as router:
        in_flight = asyncio.create_task(router.rerank(request(), CallContext()))
        await eventually(lambda: len(stuck.calls) == 1)

        await asyncio.wait_for(router.replace([route_of(Member(deployment(other), ROUTE))], grace=0.05), 2.0)
        await eventually(lambda: stuck.closed == 1)
        assert other.started == 1
        stuck.gate.set()
        await in_flight


async def test_a_call_retrying_on_an_upstream_deployment_the_grace_closed_falls_back_as_not_ready(
    upstream: FakeUpstream,
) -> None:
    metrics = Metrics()
    settings = upstream_settings(upstream, upstream_retry_backoff=0.01)
    remote = UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings), metrics)
    closed, kept = Deployment("remote", remote, remote.health), deployment(FakeBackend("kept"))
    before = route_of(Member(closed, ROUTE), Member(kept, ROUTE, priority=1))
    upstream.always(Fault(delay=NEVER))  # the attempt is on the wire when the grace runs out

    async with running(Router([before])) as router:
        in_flight = asyncio.create_task(router.rerank(request(), CallContext()))
        await eventually(lambda: len(upstream.requests) == 1)
        await asyncio.wait_for(router.replace([route_of(Member(kept, ROUTE))], grace=0.01), 2.0)

        # Its connection closed under it, the attempt is retried on the deployment that
        # is closed now: refused as not ready, which falls back.
        answered = await asyncio.wait_for(in_flight, 10.0)

    assert answered.deployment == "kept"
    assert metrics.registry.get_sample_value("rerank_upstream_retries_total", {"reason": "unreachable"}) == 1
    assert len(upstream.requests) == 1


async def test_reloads_leave_no_watch_behind_for_the_deployments_they_dropped() -> None:
    """Each deployment's readiness watch ends once a reload drops it: kept for good, they
    added one finished task per reload."""
    async with running(Router([route_of(Member(deployment(FakeBackend("first")), ROUTE))])) as router:
        dropped: list[FakeBackend] = []
        for turn in range(5):
            backend = FakeBackend(f"turn {turn}")
            await router.replace([route_of(Member(deployment(backend), ROUTE))], grace=1.0)
            dropped.append(backend)
        await eventually(lambda: all(backend.closed == 1 for backend in dropped[:-1]))
        await eventually(lambda: len(router._watches) == 1)

        assert (await router.rerank(request(), CallContext())).deployment == "turn 4"


async def test_replace_can_drop_a_route_and_add_another() -> None:
    first = route_of(Member(deployment(FakeBackend("a")), ROUTE))
    second = route_of(Member(deployment(FakeBackend("b", model="bge")), "bge"))
    second.name = "bge"

    async with running(Router([first])) as router:
        await router.replace([second], grace=1.0)

        assert [info.name for info in router.models()] == ["bge"]
        assert (await router.rerank(request("bge"), CallContext())).deployment == "b"
        assert (await call_error(router)).reason == "MODEL_NOT_FOUND"
        assert ready(router)


async def test_route_members_name_each_route_s_deployments_and_a_reload_sets_the_dropped_to_zero() -> None:
    metrics = Metrics()

    def member(route: str, name: str) -> float | None:
        return metrics.registry.get_sample_value("rerank_route_members", {"route": route, "deployment": name})

    old, kept, new = (
        deployment(FakeBackend("old")),
        deployment(FakeBackend("kept")),
        deployment(FakeBackend("new")),
    )
    other = route_of(Member(kept, "bge"))
    other.name = "bge"

    async with running(Router([route_of(Member(old, ROUTE), Member(kept, ROUTE)), other], metrics)) as router:
        assert (member(ROUTE, "old"), member(ROUTE, "kept"), member("bge", "kept")) == (1, 1, 1)
        assert member(ROUTE, "new") is None

        await router.replace([route_of(Member(kept, ROUTE), Member(new, ROUTE))], grace=1.0)

        assert (member(ROUTE, "kept"), member(ROUTE, "new")) == (1, 1)
        assert (member(ROUTE, "old"), member("bge", "kept")) == (0, 0)  # out of the routes, not gone


async def test_a_routes_refused_fallbacks_are_exported_at_zero_from_its_start() -> None:
    """The alert on them reads an increase: a series born at 1 would hide the first refusal."""
    metrics = Metrics()

    async with running(Router([route_of(Member(deployment(FakeBackend("a")), ROUTE))], metrics)):
        exhausted = metrics.registry.get_sample_value(
            "rerank_route_retry_budget_exhausted_total", {"route": ROUTE}
        )

    assert exhausted == 0


class UnstartableBackend(FakeBackend):
    async def start(self) -> None:
        raise RuntimeError("no such model directory")


async def test_a_reload_whose_new_deployment_fails_to_start_changes_nothing() -> None:
    old, fresh, broken = FakeBackend("old"), FakeBackend("fresh"), UnstartableBackend("broken")
    before = route_of(Member(deployment(old), ROUTE))
    after = route_of(Member(deployment(fresh), ROUTE), Member(deployment(broken), ROUTE, priority=1))

    async with running(Router([before])) as router:
        with pytest.raises(RuntimeError, match="no such model directory"):
            await router.replace([after], grace=1.0)
        answered = await router.rerank(request(), CallContext())

    assert answered.deployment == "old"  # the old routes still serve
    assert fresh.closed == 1  # what the failed reload started is closed again
    assert old.closed == 1  # by the router's own close, not by the reload


async def test_a_refused_reload_leaves_the_state_of_a_deployment_it_would_have_replaced() -> None:
    metrics = Metrics()
    health = health_on()
    live = Deployment("remote", FakeBackend("remote"), health, metrics=metrics)

    async with running(Router([route_of(Member(live, ROUTE))], metrics)) as router:
        take_down(health)
        successor = Deployment("remote", FakeBackend("remote"), health_on(), metrics=metrics)
        broken = deployment(UnstartableBackend("broken"))
        with pytest.raises(RuntimeError):
            await router.replace([route_of(Member(successor, ROUTE), Member(broken, ROUTE))], grace=1.0)

        # Still down, and still read so: the successor that never served wrote nothing.
        assert metrics.registry.get_sample_value("rerank_deployment_state", {"deployment": "remote"}) == 2


async def test_a_deployment_a_reload_drops_reads_0_and_one_replaced_is_written_by_its_successor() -> None:
    metrics = Metrics()

    def state(name: str) -> float | None:
        return metrics.registry.get_sample_value("rerank_deployment_state", {"deployment": name})

    gone_health, swapped_health = health_on(), health_on()
    gone = Deployment("gone", FakeBackend("gone"), gone_health, metrics=metrics)
    swapped = Deployment("swapped", FakeBackend("swapped"), swapped_health, metrics=metrics)
    successor_health = health_on()
    successor = Deployment("swapped", FakeBackend("swapped"), successor_health, metrics=metrics)
    kept = Deployment("kept", FakeBackend("kept"), None, metrics=metrics)

    async with running(
        Router([route_of(Member(gone, ROUTE), Member(swapped, ROUTE), Member(kept, ROUTE))], metrics)
    ) as router:
        take_down(gone_health)
        assert state("gone") == 2

        await router.replace([route_of(Member(successor, ROUTE), Member(kept, ROUTE))], grace=1.0)
        assert state("gone") == 0  # no route serves it: an alert on down deployments stays quiet
        take_down(swapped_health)  # the retiring instance's health changes while it drains
        assert state("swapped") == 0  # the successor's (healthy), not the retired one's
        eject(successor_health)
        assert state("swapped") == 1


class CachedLookup:
    """A score cache in front of a deployment that holds every pair of the `cached` query
    (answered whole, nothing sent); any other query it sends on."""

    def __init__(self, cached: str) -> None:
        self.cached = cached
        self.answered = 0

    async def rerank(
        self,
        route: str,
        request: BackendRequest,
        context: CallContext,
        score: Callable[[BackendRequest, CallContext], Awaitable[BackendResult]],
    ) -> BackendResult:
        if request.query != self.cached:
            return await score(request, context)
        self.answered += 1
        return BackendResult([ScoredDocument(index, 0.5) for index in range(len(request.documents))], 0)


def _probe_due(health: DeploymentHealth) -> bool:
    """Read afresh each time (mypy would narrow a property across awaits)."""
    return health.probe_due


def _probed_route(
    health: DeploymentHealth, lookup: CachedLookup | GatedLookup, fallback: FakeBackend
) -> tuple[Route, GuardedBackend]:
    """A down deployment with its probe due behind `lookup`, and a fallback."""
    take_down(health)
    probed = GuardedBackend("down", health)
    route = route_of(
        Member(Deployment("down", probed, health, scores=cast(CachedScores, lookup)), ROUTE),
        Member(deployment(fallback), ROUTE, priority=1),
    )
    return route, probed


async def test_a_probe_claimed_by_a_call_the_score_cache_answers_whole_goes_with_the_next_call() -> None:
    clock = Clock()
    health = health_on(clock)
    lookup, fallback = CachedLookup(cached="popular"), FakeBackend("fallback")
    route, probed = _probed_route(health, lookup, fallback)
    router = Router([route])
    clock.now += COOLDOWN  # its probe is due

    cached = await router.rerank(replaced(request(), query="popular"), CallContext())
    assert (cached.deployment, lookup.answered, probed.calls) == ("down", 1, [])  # nothing sent

    # The cached call sent no probe: the next call choosing the deployment does, at once,
    # rather than every call going to the fallback until the next interval.
    assert _probe_due(health)
    assert (await router.rerank(request(), CallContext())).deployment == "down"
    assert (len(probed.calls), fallback.calls) == (1, [])


async def test_a_probe_claimed_by_a_call_cancelled_during_its_cache_lookup_goes_with_the_next_call() -> None:
    clock = Clock()
    health = health_on(clock)
    lookup, fallback = GatedLookup(), FakeBackend("fallback")
    route, probed = _probed_route(health, lookup, fallback)
    router = Router([route])
    clock.now += COOLDOWN

    claimer = asyncio.create_task(router.rerank(request(), CallContext()))
    await eventually(lambda: lookup.waiting == 1)
    assert not _probe_due(health)  # claimed by the call waiting on its lookup
    claimer.cancel()  # its caller hung up (or its deadline passed) during the lookup
    await asyncio.gather(claimer, return_exceptions=True)
    assert claimer.cancelled()

    assert _probe_due(health)  # given back
    lookup.gate.set()
    assert (await router.rerank(request(), CallContext())).deployment == "down"
    assert (len(probed.calls), fallback.calls) == (1, [])


async def test_a_probe_its_call_sent_is_that_intervals_only_probe() -> None:
    clock = Clock()
    health = health_on(clock)
    lookup, fallback = GatedLookup(), FakeBackend("fallback")
    route, probed = _probed_route(health, lookup, fallback)
    probed.reason = "UPSTREAM_TIMEOUT"  # sent, and no answer: still down (the health records nothing here)
    lookup.gate.set()
    router = Router([route])
    clock.now += COOLDOWN

    first = await router.rerank(request(), CallContext())  # the probe, then its fallback
    second = await router.rerank(request(), CallContext())

    assert (first.deployment, second.deployment) == ("fallback", "fallback")
    assert len(probed.calls) == 1  # no second probe this interval
    assert health.refuses_now
    clock.now += 1.0  # the next interval
    assert _probe_due(health)
