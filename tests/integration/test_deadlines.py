"""The caller's deadline bounds the upstream call; the upstream timeout bounds it too."""

from __future__ import annotations

import asyncio
import threading
import time
from urllib.parse import urlsplit

import grpc
import pytest

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.core.domain import BackendRequest, BackendResult, CallContext
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import ServerFactory
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, details_of, expect_error, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until


def test_caller_deadline_cuts_the_upstream_call_short(
    server: ServerThread, upstream: FakeUpstream, logs: LogCapture
) -> None:
    upstream.inject(Fault(delay=10))

    started = time.monotonic()
    error = expect_error(lambda: server.stub.Rerank(request(), timeout=0.5))
    elapsed = time.monotonic() - started

    assert code_of(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 5.0  # cut at 0.5 s, not the upstream's 10 s (a bound, not a timing)
    # The service hung up on the upstream instead of waiting out its 10 s answer.
    wait_until(lambda: len(upstream.abandoned) == 1, timeout=3.0, what="the upstream call abandoned")
    assert upstream.abandoned[0].received_at - started < 5.0  # this test's call
    [call] = logs.wait_for_calls(1)
    assert call["code"] == "DEADLINE_EXCEEDED"  # as the caller was told, not CANCELLED
    assert call["latency_ms"] < 5000


def test_upstream_timeout_applies_when_the_caller_sets_no_deadline(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(delay=10))
    with serve(upstream_timeout=0.5) as server:
        started = time.monotonic()
        error = expect_error(lambda: server.stub.Rerank(request()))
        elapsed = time.monotonic() - started

    assert code_of(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "upstream timeout" in details_of(error)
    assert 0.4 < elapsed < 5.0
    wait_until(lambda: len(upstream.abandoned) == 1, timeout=3.0, what="the upstream call abandoned")


def test_a_generous_deadline_does_not_extend_the_upstream_timeout(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(delay=10))
    with serve(upstream_timeout=0.5) as server:
        started = time.monotonic()
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=30))
        elapsed = time.monotonic() - started

    assert code_of(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 5.0  # cut at 0.5 s, not the upstream's 10 s (a bound, not a timing)


def test_a_slow_upstream_within_the_deadline_succeeds(server: ServerThread, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(delay=0.3))

    response = server.stub.Rerank(request(), timeout=5)

    assert len(response.output.results) == 2
    assert upstream.abandoned == []


def test_a_call_grpc_ends_at_its_deadline_on_a_deployment_names_that_deployment(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment that does not bound the call by its deadline itself (a local model's
    inference, a wait of its own) is left by grpc's end of the call: its log line named no
    deployment, where the same call failed by the deployment names it."""
    entered = threading.Event()

    async def holds(backend: UpstreamBackend, request: BackendRequest, context: CallContext) -> BackendResult:
        entered.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("never answers")

    monkeypatch.setattr(UpstreamBackend, "rerank", holds)
    with serve() as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=0.5))
        [call] = logs.wait_for_calls(1)

    assert entered.is_set()
    assert code_of(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert call["code"] == "DEADLINE_EXCEEDED"
    assert call["deployment"] == urlsplit(upstream.url).netloc  # the deployment's default name
