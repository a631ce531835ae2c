"""A probe of a down deployment, through the upstream backend: what its caller is told
when the probe's own bound (--upstream-breaker-probe-timeout) ends it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.domain import BackendRequest, CallContext, DeploymentState, FailureKind, ServiceError
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, upstream_settings
from tests.support.waiting import wait_until_async

REQUEST = BackendRequest(
    model="qwen3-rerank", query="a b", documents=["a b c", "d"], instruct=None, top_n=None
)

# No proxy or CA bundle from the machine running the tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_network_environment")


@pytest.fixture
async def down() -> AsyncIterator[tuple[UpstreamBackend, FakeUpstream]]:
    """A backend whose deployment is down (its one connection refused), its cool-down
    over: the next call probes it, on an upstream that listens again but never answers."""
    with FakeUpstream(api_key=UPSTREAM_KEY) as own:
        settings = upstream_settings(
            own,
            upstream_breaker_failures=1,
            upstream_breaker_cooldown=0.05,
            upstream_breaker_probe_timeout=0.3,
            upstream_retry_backoff=0.01,  # 3 attempts a call: the probe is never retried
        )
        backend = UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings))
        await backend.start()
        try:
            own.go_down()
            with pytest.raises(ServiceError):
                await backend.rerank(REQUEST, CallContext())
            assert backend.health.state is DeploymentState.DOWN
            own.come_back()
            own.always(Fault(delay=NEVER))
            await wait_until_async(lambda: backend.health.probe_due, what="the cool-down's end")
            yield backend, own
        finally:
            await backend.close()


async def test_a_probe_that_hangs_is_unavailable_naming_the_probe_timeout_not_the_callers_deadline(
    down: tuple[UpstreamBackend, FakeUpstream],
) -> None:
    backend, upstream = down

    with pytest.raises(ServiceError) as caught:
        await backend.rerank(REQUEST, CallContext(deadline=time.monotonic() + 60.0))

    # Not DEADLINE_EXCEEDED "within the call's deadline" (retry with a longer one): the
    # caller has most of a minute left, which the route may spend on another deployment.
    error = caught.value
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"
    assert "--upstream-breaker-probe-timeout (0.3 s)" in error.message
    assert error.kind is FailureKind.DEPLOYMENT  # the route falls back
    assert len(upstream.requests) == 1  # a hanging probe holds its caller once, not once an attempt
    assert backend.health.state is DeploymentState.DOWN  # nothing proved it back


async def test_a_probe_cut_off_by_the_callers_own_deadline_is_the_callers(
    down: tuple[UpstreamBackend, FakeUpstream],
) -> None:
    backend, upstream = down

    with pytest.raises(ServiceError) as caught:
        await backend.rerank(REQUEST, CallContext(deadline=time.monotonic() + 0.1))

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the call's deadline" in caught.value.message
    assert len(upstream.requests) == 1
