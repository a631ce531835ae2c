"""The router: the backend the engine sees, which hands each call to a route's deployments.

A call goes to the deployment its route picks (route.py). When that deployment fails in
a way that says it cannot answer now (unreachable, timed out, 5xx, 429, a malformed
answer, down), the call moves to the next one, same priority first, while the caller's
deadline and the route's retry budget allow. A failure that says the request itself is
wrong (an upstream's 400, 413, 422 or 498, a validation error) is returned at once: another
deployment would only say it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    NO_TIME_LEFT,
    BackendRequest,
    BackendResult,
    CacheMode,
    CallContext,
    CallPin,
    FailureKind,
    ModelInfo,
    ServiceError,
    combined,
    model_not_found,
    replaced,
)
from rerank_service.core.readiness import Readiness
from rerank_service.core.retry_budget import FALLBACK_READY
from rerank_service.observability import tracing
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.tracing import SpanHandle
from rerank_service.routing.deployment import Deployment
from rerank_service.routing.route import Route

_log = get_logger("rerank_service.routing")


def fails_over(error: ServiceError) -> bool:
    """The deployment cannot answer now (the backend said so where it made the error)."""
    return error.kind is FailureKind.DEPLOYMENT


class Router:
    """Routes by model name; implements the Backend protocol for the engine."""

    def __init__(self, routes: list[Route], metrics: Metrics | None = None) -> None:
        # Where fallbacks are counted (None: a Metrics of its own, served nowhere: tests).
        self._metrics = metrics if metrics is not None else Metrics()
        self._routes = {route.name: route for route in routes}
        self._deployments = _distinct(routes)
        self._metrics.set_route_members(_members(routes))
        self._readiness = Readiness()
        self._started = False
        self._watches: set[asyncio.Task[None]] = set()  # each ends once its deployment is dropped
        self._retiring: set[asyncio.Task[None]] = set()  # dropped by a reload, closing when idle
        # What the engine asks on every call, made once per change: a route's ListModels entry
        # (limits, its deployments' states) and its per-call limits change only when a
        # deployment's readiness or health does, or a reload does (`_changed` is told of each).
        self._models: list[ModelInfo] | None = None
        self._limits: dict[str, CallLimits] = {}

    @property
    def readiness(self) -> Readiness:
        """Ready while every route has a deployment it can call now."""
        return self._readiness

    @property
    def deployments(self) -> list[Deployment]:
        return list(self._deployments)

    def models(self) -> list[ModelInfo]:
        if self._models is None:
            self._models = [route.model_info() for route in self._routes.values()]
        return list(self._models)

    def call_limits(self, model: str) -> CallLimits:
        limits = self._limits.get(model)
        if limits is None:
            limits = self._limits[model] = self._routes[model].call_limits()
        return limits

    async def start(self) -> None:
        await asyncio.gather(*(deployment.backend.start() for deployment in self._deployments))
        for deployment in self._deployments:
            deployment.adopt()
        self._started = True
        self._follow(self._deployments)
        self._update_readiness()

    async def close(self) -> None:
        self._started = False
        for watch in list(self._watches):
            watch.cancel()
        await asyncio.gather(*(deployment.backend.close() for deployment in self._deployments))
        await asyncio.gather(*self._retiring)
        self._update_readiness()

    async def replace(self, routes: list[Route], grace: float) -> None:
        """Serve `routes` from now on (a reload); calls in flight finish where they started.

        New deployments are started before the switch (if one fails to start, those
        started are closed, the error is raised and nothing changes); deployments no
        route uses any more are closed in the background once their calls end, and the
        calls pinned to the routes they served, which may still fall back to them (or after
        `grace` seconds).
        """
        kept = _distinct(routes)
        added = [deployment for deployment in kept if deployment not in self._deployments]
        started = await asyncio.gather(
            *(deployment.backend.start() for deployment in added), return_exceptions=True
        )
        failed = [outcome for outcome in started if isinstance(outcome, BaseException)]
        if failed:
            await asyncio.gather(
                *(deployment.backend.close() for deployment in added), return_exceptions=True
            )
            raise failed[0]
        dropped = [deployment for deployment in self._deployments if deployment not in kept]
        self._routes = {route.name: route for route in routes}
        self._deployments = kept
        self._metrics.set_route_members(_members(routes))
        self._models, self._limits = None, {}
        for deployment in added:  # its state is written from the switch on, not from its building
            deployment.adopt()
        self._follow(added)
        self._update_readiness()
        names = {deployment.name for deployment in kept}
        for deployment in dropped:
            deployment.retire(replaced=deployment.name in names)
            retiring = asyncio.create_task(
                _close_when_idle(deployment, grace), name=f"retire {deployment.name}"
            )
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        route = self._route(request.model, context)
        route.budget.called()
        if route.cache:
            context = replaced(context, retry_budget=route.budget)
        else:
            context = replaced(context, retry_budget=route.budget, cache_mode=CacheMode.OFF)
        members = route.members
        # The route's span says which deployment it chose and why it moved on: a route of one
        # deployment has no choice to make, and the call's span names its deployment. (A span
        # costs a call about 80 µs of CPU, most of it in the exporter's encoding.)
        span = None if len(members) < 2 else tracing.child("rerank.route", {"rerank.route": route.name})
        if span is None:
            return await self._call(route, request, context, None)
        span.set("rerank.candidates", [member.deployment.name for member in members])
        try:
            return await self._call(route, request, context, span)
        except ServiceError as error:
            span.fail(error.reason or error.code.name)
            raise
        finally:
            span.end()

    def pin_call(self, model: str, pin: CallPin) -> CallLimits:
        """`model`'s call limits (the engine validates and splits the call for them), and
        `pin` filled with their route: the call runs on it whatever a reload changes before
        it is sent (a route replaced meanwhile may take fewer documents a request)."""
        route = self._routes[model]  # the engine found the model in `models()`, no await since
        _pin(route, pin)
        return self.call_limits(model)

    def _route(self, model: str, context: CallContext) -> Route:
        """The call's route: the one it was pinned to as it was validated (`pin_call`) or,
        for a split call, as its first chunk went, whose deployments a reload keeps open
        until the call ends (calls in flight finish where they started)."""
        pin = context.pin
        if pin is not None and isinstance(pin.route, Route):
            return pin.route
        route = self._routes.get(model)
        if route is None:  # a reload removed it after the engine validated the call
            raise model_not_found(model, list(self._routes))
        if pin is not None:  # filled before any await: the call's other chunks see it
            _pin(route, pin)
        return route

    async def _call(
        self, route: Route, request: BackendRequest, context: CallContext, span: SpanHandle | None
    ) -> BackendResult:
        """The route's deployments in its order until one answers, or a failure says stop."""
        tried: set[Deployment] = set()
        failures: list[ServiceError] = []
        while (member := route.pick(tried)) is not None:
            if failures and (
                # Only deployments that would refuse at once are left: a fallback would send
                # nothing, and its refusal would hide the failure that ended the call.
                member.deployment.refuses_now or not self._may_fall_back(route, failures[-1], context, span)
            ):
                break
            deployment = member.deployment
            tried.add(deployment)
            # Before the call's first await (its score cache lookup): a down deployment's due
            # probe is this call's, and calls picking meanwhile go elsewhere.
            health = deployment.health
            claim = 0 if health is None else health.claim_probe()
            if context.attempted is not None:
                context.attempted.deployment = deployment.name
            if span is not None:
                # Both on every pick: a state left by an earlier pick would be read as this one's.
                span.set("rerank.deployment", deployment.name)
                span.set("rerank.deployment.state", deployment.state.value)
            # Whether another deployment could take the call (a rate-limited one hands it over).
            ready = FALLBACK_READY.set(_another_could_take(route, tried)) if len(route.members) > 1 else None
            try:
                # The deployment's own name for the model (most often the route's: no copy).
                sent = request if member.model == request.model else replaced(request, model=member.model)
                result = await deployment.rerank(route.name, sent, context)
            except ServiceError as error:
                failures.append(error)
                if not fails_over(error):
                    break
                continue
            finally:
                if ready is not None:
                    FALLBACK_READY.reset(ready)
                if claim and health is not None:  # given back if unsent (cached, cancelled, failed first)
                    health.unclaim(claim)
            timings = combined([*(failure.timings for failure in failures), result.timings])
            return replaced(result, deployment=deployment.name, timings=timings)
        told = _told(failures)
        raise told.with_timings(combined([failure.timings for failure in failures])) from told

    def _may_fall_back(
        self, route: Route, failure: ServiceError, context: CallContext, span: SpanHandle | None
    ) -> bool:
        if context.deadline is not None and time.monotonic() >= context.deadline - NO_TIME_LEFT:
            return False  # the fallback would send nothing: the caller gets this failure
        if not route.budget.try_spend():
            self._metrics.count_retry_budget_exhausted(route.name)
            if span is not None:
                span.event("retry budget exhausted", {"rerank.deployment": failure.deployment or ""})
            return False
        self._metrics.count_fallback(route.name)
        # The failure's message too: when the fallback answers, no access-log line quotes what
        # the failed deployment said (an upstream's 404 naming the model it does not know).
        _log.warning(
            "fallback",
            route=route.name,
            failed=failure.deployment,
            reason=failure.reason,
            details=failure.message,
        )
        if span is not None:
            reason = failure.reason or failure.code.name
            span.event("fallback", {"rerank.deployment": failure.deployment or "", "error.type": reason})
        return True

    def _follow(self, deployments: Iterable[Deployment]) -> None:
        """Recompute readiness whenever a deployment's readiness or health changes."""
        for deployment in deployments:
            if deployment.health is not None:
                deployment.health.on_change(self._update_readiness)
            watch = asyncio.create_task(self._watch(deployment))
            self._watches.add(watch)
            watch.add_done_callback(self._watches.discard)  # not one kept per reload for good

    async def _watch(self, deployment: Deployment) -> None:
        # Looked at first: a change between this task's creation and its first await counts.
        self._update_readiness()
        while deployment in self._deployments:
            await deployment.backend.readiness.changed()
            self._update_readiness()

    def _update_readiness(self) -> None:
        """A deployment's readiness or health changed (or the routes did): what the routes say
        of themselves is made anew on next asking, and readiness is recomputed."""
        self._models, self._limits = None, {}
        self._readiness.set(
            self._started
            and all(
                any(not member.deployment.refusing for member in route.members)
                for route in self._routes.values()
            )
        )


def _another_could_take(route: Route, tried: set[Deployment]) -> bool:
    """Whether a deployment of `route` not yet tried for the call would take it now."""
    return any(
        member.deployment not in tried and not member.deployment.refuses_now for member in route.members
    )


def _told(failures: list[ServiceError]) -> ServiceError:
    """The failure the caller gets: the last, unless a fallback refused the request after a
    deployment could not answer it. That refusal says only that the fallback cannot take what
    the route accepted (a local model's own query limit, say): the caller gets the failure
    that says what went wrong, UNAVAILABLE say, which a retry may get past."""
    last = failures[-1]
    if len(failures) > 1 and not fails_over(last):
        return failures[-2]  # a failure that fell over: a refusal ends the call at once
    return last


def _distinct(routes: Iterable[Route]) -> list[Deployment]:
    found: list[Deployment] = []
    for route in routes:
        for member in route.members:
            if member.deployment not in found:
                found.append(member.deployment)
    return found


def _members(routes: Iterable[Route]) -> set[tuple[str, str]]:
    """Each (route, deployment) pair the routes serve (rerank_route_members)."""
    return {(route.name, member.deployment.name) for route in routes for member in route.members}


def _pin(route: Route, pin: CallPin) -> None:
    """Pin a call to `route`, every deployment of it held open (a reload) until the pin is
    released: the call may still send a chunk to, or fall back to, any of them."""
    pin.route = route
    for deployment in _distinct([route]):
        deployment.hold()
        pin.on_release(deployment.release)


async def _close_when_idle(deployment: Deployment, grace: float) -> None:
    """Close `deployment` once no call is in flight on it nor pinned to a route it served (a
    call on another of that route's deployments may still fall back to it: `_pin`)."""
    try:
        await asyncio.wait_for(deployment.idle(), grace)
    except TimeoutError:
        _log.warning("closing a deployment with calls in flight", deployment=deployment.name, grace_s=grace)
    await deployment.backend.close()
