"""One deployment: a backend that serves a route, with its own health and load."""

from __future__ import annotations

import asyncio
import time
from dataclasses import InitVar, dataclass, field
from functools import partial

import grpc

from rerank_service.core.backend import Backend
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    DeploymentState,
    ServiceError,
    every_state,
)
from rerank_service.core.health import DeploymentHealth
from rerank_service.observability.metrics import DeploymentMetrics, Metrics
from rerank_service.routing.cached_scores import CachedScores

# rerank_deployment_state's value for each state: the higher, the worse (with workers, the
# one whose calls found it last is reported: observability/metrics.py).
_STATE_LEVELS = every_state({DeploymentState.HEALTHY: 0, DeploymentState.EJECTED: 1, DeploymentState.DOWN: 2})
# What an ejected deployment avoided for its 429s is called in rerank_deployment_ejections_total
# (`state`): its gauge reads 1, as for an ejection, since the route avoids it the same way.
RATE_LIMITED = "rate_limited"


@dataclass(eq=False)
class Deployment:
    """A backend, and what the router needs to choose it: health, weight, calls in flight.

    One backend (its connection pool, its health) may serve several routes: without a
    `models:` section one upstream serves every configured model name.
    """

    name: str
    backend: Backend
    health: DeploymentHealth | None  # None: a local model, healthy whenever it is ready
    key: object = None  # what it was built from: a reload keeps a deployment whose key is equal
    # The score cache in front of the backend (None: every pair goes to the backend).
    scores: CachedScores | None = None
    # Where its calls and state are recorded (None: a Metrics of its own, served nowhere: tests).
    metrics: InitVar[Metrics | None] = None
    in_flight: int = 0
    # Calls pinned to a route it serves (CallPin): a reload closes it only after them.
    _held: int = field(init=False, default=0)
    _metrics: DeploymentMetrics = field(init=False)
    _idle: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _adopted: bool = field(init=False, default=False)  # a router serves it: its state is written

    def __post_init__(self, metrics: Metrics | None) -> None:
        self._metrics = (metrics if metrics is not None else Metrics()).for_deployment(self.name)
        if self.health is not None:
            self.health.on_change(self._state_changed)

    @property
    def state(self) -> DeploymentState:
        return DeploymentState.HEALTHY if self.health is None else self.health.state

    @property
    def usable(self) -> bool:
        """Ready, and not ejected: a first choice."""
        return self.backend.readiness.ready and self.state is DeploymentState.HEALTHY

    @property
    def refusing(self) -> bool:
        """Refusing calls for a while (not started, or down within its cool-down): what the
        route's readiness is judged on."""
        return not self.backend.readiness.ready or (self.health is not None and self.health.refusing)

    @property
    def refuses_now(self) -> bool:
        """A call now would be refused at once: refusing, or down past its cool-down with this
        interval's probe already sent. No call is sent (nor fallen back) to it."""
        return not self.backend.readiness.ready or (self.health is not None and self.health.refuses_now)

    @property
    def probe_due(self) -> bool:
        """Down, and a probe may go through now: the way a down deployment comes back."""
        return self.health is not None and self.health.probe_due

    async def rerank(self, route: str, request: BackendRequest, context: CallContext) -> BackendResult:
        self.in_flight += 1
        try:
            if self.scores is None:
                return await self._measured(route, request, context)
            # The deployment's metrics count its backend calls: a call the score cache
            # answers whole makes none, and a partial one's time is the backend's part.
            return await self.scores.rerank(route, request, context, partial(self._measured, route))
        except ServiceError as error:
            raise error.at_deployment(self.name) from error
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def _measured(self, route: str, request: BackendRequest, context: CallContext) -> BackendResult:
        """One backend call, recorded in the deployment's metrics whatever its outcome."""
        started = time.perf_counter()
        try:
            result = await self.backend.rerank(request, context)
        except ServiceError as error:
            self._metrics.finished(route, error.code, time.perf_counter() - started)
            raise
        except asyncio.CancelledError:  # given up (its caller, its deadline, a split call's failure)
            self._metrics.finished(route, grpc.StatusCode.CANCELLED, time.perf_counter() - started)
            raise
        self._metrics.finished(route, None, time.perf_counter() - started)
        return result

    async def idle(self) -> None:
        """Return once no call is in flight, nor held between its chunks."""
        while self.in_flight or self._held:
            self._idle.clear()
            await self._idle.wait()

    def hold(self) -> None:
        """A call pinned to a route it serves may still send it a chunk or fall back to it:
        keep it open (a reload) until `release`."""
        self._held += 1

    def release(self) -> None:
        self._held -= 1
        if not self._held:
            self._idle.set()

    def adopt(self) -> None:
        """A router serves it from now on: its state is written from now on. Not from when it
        is built: a reload that is refused has built a successor of the same name, which must
        not write over the state of the deployment still serving."""
        self._adopted = True
        self._state_changed()

    def retire(self, replaced: bool) -> None:
        """A reload took it out of every route (`replaced`: by a deployment of its name)."""
        self._metrics.retire(replaced)

    def _state_changed(self) -> None:
        if not self._adopted:
            return
        state = self.state
        shown = RATE_LIMITED if self.health is not None and self.health.rate_limited else state.value
        self._metrics.set_state(shown, _STATE_LEVELS[state])
