"""The upstream transport through its public interface, against the real fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import grpc
import pytest

from rerank_service.backends.upstream.client.transport import (
    MAX_RESPONSE_BYTES,
    UpstreamTransport,
    cut_while_unreachable,
)
from rerank_service.config.secret import Secret
from rerank_service.core.domain import ServiceError
from rerank_service.observability.metrics import Metrics
from rerank_service.testing.fake_upstream import NATIVE_PATH, NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.waiting import wait_until_async

BODY = {"model": "qwen3-rerank", "input": {"query": "a b", "documents": ["a b c", "d"]}}
KEY = Secret(UPSTREAM_KEY)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

Transports = Callable[..., UpstreamTransport]


# No proxy or CA bundle from the machine running the tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_network_environment")


@pytest.fixture
def metrics() -> Metrics:
    """Where the test's transports count their attempts."""
    return Metrics()


@pytest.fixture
async def transports(upstream: FakeUpstream, metrics: Metrics) -> AsyncIterator[Transports]:
    """`transports(timeout=5.0, url=upstream.url, connect_timeout=None)`: a transport, closed
    after the test."""
    made: list[UpstreamTransport] = []

    def make(
        timeout: float = 5.0, url: str | None = None, connect_timeout: float | None = None
    ) -> UpstreamTransport:
        made.append(
            UpstreamTransport(
                url or upstream.url, timeout, 4, connect_timeout=connect_timeout, metrics=metrics
            )
        )
        return made[-1]

    yield make
    for transport in made:
        await transport.close()


async def failure_of(transport: UpstreamTransport, deadline: float | None = None) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await transport.post_json(NATIVE_PATH, BODY, KEY, deadline)
    return caught.value


def attempts(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("rerank_upstream_requests_total", {"status": outcome}) or 0.0


# --- time: the caller's deadline and the upstream timeout ---------------------------------------


async def test_a_call_is_cut_to_the_time_the_caller_has_left(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=NEVER))
    started = time.monotonic()

    error = await failure_of(transports(timeout=30.0), deadline=started + 0.3)

    # Ended by the deadline, not by the 30 s timeout: a bound far from both, so a loaded
    # machine's slow turn cannot fail it.
    assert 0.25 <= time.monotonic() - started < 10.0
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "UPSTREAM_TIMEOUT"
    assert "the call's deadline" in error.message
    assert not error.unreachable  # it connected: reachable, only slow to answer


@pytest.mark.parametrize("deadline_in", [None, 60.0], ids=["no deadline", "a later deadline"])
async def test_the_upstream_timeout_bounds_a_call_whose_caller_gives_it_longer(
    transports: Transports, upstream: FakeUpstream, deadline_in: float | None
) -> None:
    upstream.always(Fault(delay=NEVER))
    started = time.monotonic()
    deadline = None if deadline_in is None else started + deadline_in

    error = await failure_of(transports(timeout=0.3), deadline)

    assert 0.25 <= time.monotonic() - started < 10.0  # the timeout, not the deadline (or never)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the upstream timeout" in error.message


async def test_a_deadline_already_passed_sends_nothing(
    transports: Transports, upstream: FakeUpstream
) -> None:
    error = await failure_of(transports(), deadline=time.monotonic() - 0.01)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert upstream.requests == []


async def test_a_deadline_with_almost_no_time_left_sends_nothing(
    transports: Transports, upstream: FakeUpstream, metrics: Metrics
) -> None:
    # A millisecond: no upstream answers that fast; the request would be abandoned at once.
    error = await failure_of(transports(), deadline=time.monotonic() + 0.001)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the call's deadline" in error.message
    assert attempts(metrics, "timeout") == 0  # no attempt was made
    assert upstream.requests == []


async def test_a_probe_cut_off_by_its_own_bound_is_unavailable_not_the_callers_deadline(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=NEVER))

    with pytest.raises(ServiceError) as caught:
        await transports().post_json(NATIVE_PATH, BODY, KEY, time.monotonic() + 60.0, probe_timeout=0.3)

    # The caller's deadline is far off: the route may still try another deployment within it.
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "UPSTREAM_UNAVAILABLE"
    assert "--upstream-breaker-probe-timeout (0.3 s)" in caught.value.message
    assert not caught.value.unreachable  # it connected: still down, but not unreachable


@pytest.mark.parametrize(
    ("upstream_timeout", "deadline_in", "said"),
    [(0.3, 60.0, "the upstream timeout"), (30.0, 0.3, "the call's deadline")],
    ids=["the upstream timeout first", "the caller's deadline first"],
)
async def test_a_probe_ended_by_another_bound_says_that_bound(
    transports: Transports, upstream: FakeUpstream, upstream_timeout: float, deadline_in: float, said: str
) -> None:
    upstream.always(Fault(delay=NEVER))

    with pytest.raises(ServiceError) as caught:
        await transports(timeout=upstream_timeout).post_json(
            NATIVE_PATH, BODY, KEY, time.monotonic() + deadline_in, probe_timeout=30.0
        )

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert said in caught.value.message


async def test_a_body_that_trickles_past_the_timeout_times_out_though_each_read_is_quick(
    transports: Transports, upstream: FakeUpstream
) -> None:
    # A byte every 100 ms: no single read waits long, and the whole body (over 100 bytes)
    # would take more than 10 s.
    upstream.always(Fault(trickle=(1, 0.1)))
    started = time.monotonic()

    error = await failure_of(transports(timeout=0.4))

    assert time.monotonic() - started < 5.0
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED


# --- size ---------------------------------------------------------------------------------------


async def test_a_body_of_exactly_the_bound_is_read_whole(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(pad_to=MAX_RESPONSE_BYTES))

    reply = await transports().post_json(NATIVE_PATH, BODY, KEY, None)

    assert reply.status == 200
    assert len(reply.content) == MAX_RESPONSE_BYTES


async def test_a_body_over_the_bound_is_refused(transports: Transports, upstream: FakeUpstream) -> None:
    upstream.always(Fault(pad_to=MAX_RESPONSE_BYTES + 1))

    error = await failure_of(transports())

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in error.message


# --- what is sent -------------------------------------------------------------------------------


async def test_the_body_goes_as_json_and_any_status_comes_back_as_a_reply(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(status=503, body={"code": "Busy"}, headers={"retry-after": "3"}))
    transport = transports()

    busy = await transport.post_json(NATIVE_PATH, BODY, KEY, None)
    served = await transport.post_json(NATIVE_PATH, BODY, KEY, None)

    assert (busy.status, busy.content, busy.headers["retry-after"]) == (503, b'{"code": "Busy"}', "3")
    assert served.status == 200
    assert [request.body for request in upstream.requests] == [BODY, BODY]
    assert upstream.requests[0].headers["content-type"] == "application/json"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed_and_comes_back_as_it_is(
    transports: Transports, upstream: FakeUpstream, status: int
) -> None:
    with FakeUpstream() as elsewhere:
        upstream.always(Fault(status=status, body=b"", headers={"location": elsewhere.url + NATIVE_PATH}))

        reply = await transports().post_json(NATIVE_PATH, BODY, KEY, None)

        # Followed, the caller's query and documents would go wherever Location says.
        assert reply.status == status  # errors.py: an unexpected status
        assert elsewhere.requests == []
        assert len(upstream.requests) == 1


async def test_the_bearer_key_is_sent_only_when_a_token_is_given(
    transports: Transports, upstream: FakeUpstream
) -> None:
    transport = transports()

    await transport.post_json(NATIVE_PATH, BODY, KEY, None)
    await transport.post_json(NATIVE_PATH, BODY, None, None)

    with_key, without = (request.headers for request in upstream.requests)
    assert with_key["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "authorization" not in without


async def test_trace_context_is_forwarded_and_tracestate_only_with_a_traceparent(
    transports: Transports, upstream: FakeUpstream
) -> None:
    transport = transports()

    await transport.post_json(NATIVE_PATH, BODY, KEY, None, traceparent=TRACEPARENT, tracestate="a=1")
    await transport.post_json(NATIVE_PATH, BODY, KEY, None, tracestate="a=1")
    await transport.post_json(NATIVE_PATH, BODY, KEY, None)

    traced, state_alone, untraced = (request.headers for request in upstream.requests)
    assert (traced["traceparent"], traced["tracestate"]) == (TRACEPARENT, "a=1")
    assert "traceparent" not in state_alone
    assert "tracestate" not in state_alone
    assert "traceparent" not in untraced


async def test_the_request_asks_for_json_and_accepts_gzip(
    transports: Transports, upstream: FakeUpstream
) -> None:
    await transports().post_json(NATIVE_PATH, BODY, KEY, None)

    headers = upstream.requests[0].headers
    assert headers["accept"] == "application/json"
    assert headers["accept-encoding"] == "gzip"


# --- failures without a status ------------------------------------------------------------------


def nothing_listening() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


async def test_an_upstream_that_refuses_connections_is_unavailable(transports: Transports) -> None:
    error = await failure_of(transports(url=nothing_listening()))

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"


@contextlib.contextmanager
def dropping_connections() -> Iterator[str]:
    """The URL of a host that drops every new connection (as a firewall's DROP does, or a
    host gone from the network): a listener whose one-place accept queue is full."""
    with socket.socket() as listener, socket.socket() as waiting:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # room for one connection waiting to be accepted; none ever is
        waiting.connect(listener.getsockname())
        # Readable once that connection waits in the queue: from now on the kernel drops
        # every connection request that comes, unanswered.
        readable, _, _ = select.select([listener], [], [], 10.0)
        assert readable, "the accept queue never filled"
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


async def test_a_connection_that_never_opens_is_a_timeout_of_an_unreachable_upstream(
    transports: Transports,
) -> None:
    with dropping_connections() as url:
        error = await failure_of(transports(timeout=0.3, url=url))

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "UPSTREAM_TIMEOUT"
    # Unreachable, as a refused connection is: it counts toward the deployment being down.
    assert error.unreachable


async def test_a_connection_not_open_within_the_connect_timeout_is_unavailable_as_an_unreachable_upstream(
    transports: Transports, metrics: Metrics
) -> None:
    with dropping_connections() as url:
        # The caller's deadline and the upstream timeout are far off: the connect's own bound ends it.
        error = await failure_of(
            transports(timeout=30.0, url=url, connect_timeout=0.2), time.monotonic() + 30.0
        )

    # As a refused connection: retried, the call falls over, it counts toward down.
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"
    assert "--upstream-connect-timeout (0.2 s)" in error.message
    assert error.unreachable
    assert attempts(metrics, "timeout") == 1


@pytest.mark.parametrize(
    ("deadline", "unreachable"),
    [(0.3, False), (1.5, True)],
    ids=["cut before a second: says nothing", "unanswered for a second: unreachable"],
)
async def test_a_connect_the_callers_deadline_cuts_is_unreachable_once_unanswered_for_a_second(
    transports: Transports, deadline: float, unreachable: bool
) -> None:
    with dropping_connections() as url:
        error = await failure_of(transports(timeout=30.0, url=url), time.monotonic() + deadline)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the call's deadline" in error.message
    # A host that is there answers a connection request well within a second (Linux resends
    # an unanswered one after 1 s): one unanswered that long is unreachable, whatever cut it.
    assert error.unreachable is unreachable


async def test_an_attempt_cancelled_while_its_connect_went_unanswered_for_a_second_says_so(
    transports: Transports,
) -> None:
    with dropping_connections() as url:
        transport = transports(timeout=30.0, url=url)
        # Cancelled in this task (as grpc cancels a call at its deadline), not by the transport's timers.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                await transport.post_json(NATIVE_PATH, BODY, KEY, None)
        assert cut_while_unreachable()
        assert not cut_while_unreachable()  # read once

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await transport.post_json(NATIVE_PATH, BODY, KEY, None)
        assert not cut_while_unreachable()


@contextlib.contextmanager
def silent_after_connecting() -> Iterator[str]:
    """The address (host:port) of a host that is there but slow to say anything: its kernel
    completes every TCP connect (a backlog no one accepts from), and no byte ever comes back,
    as from a TLS handshake or a proxy's CONNECT left waiting."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


async def test_a_tls_handshake_the_callers_deadline_cuts_after_a_second_is_not_unreachable(
    transports: Transports,
) -> None:
    """The 1 s rule is the TCP connect's (an unanswered SYN): a handshake after a connect that
    was answered says the host is there, however slow."""
    with silent_after_connecting() as address:
        transport = transports(timeout=30.0, url=f"https://{address}")
        error = await failure_of(transport, time.monotonic() + 1.5)
        # Cancelled in this task (as grpc cancels a call at its deadline).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                await transport.post_json(NATIVE_PATH, BODY, KEY, None)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not error.unreachable
    assert not cut_while_unreachable()


async def test_a_proxy_tunnel_the_callers_deadline_cuts_after_a_second_is_not_unreachable() -> None:
    with silent_after_connecting() as address:
        # The proxy answered the TCP connect and never the CONNECT.
        transport = UpstreamTransport("https://upstream.invalid", 30.0, 4, proxy=f"http://{address}")
        try:
            error = await failure_of(transport, time.monotonic() + 1.5)
        finally:
            await transport.close()

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not error.unreachable


async def test_a_name_lookup_the_callers_deadline_cuts_after_a_second_is_not_unreachable(
    transports: Transports, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never_resolved(*args: object, **kwargs: object) -> list[object]:
        await asyncio.Event().wait()
        return []

    # A resolver that never answers: no connection request is ever sent to the upstream.
    monkeypatch.setattr(aiohttp.TCPConnector, "_resolve_host", never_resolved)
    error = await failure_of(transports(timeout=30.0, url="http://upstream.invalid"), time.monotonic() + 1.5)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not error.unreachable


async def test_a_probe_whose_connection_never_opens_is_unavailable_and_unreachable(
    transports: Transports,
) -> None:
    with dropping_connections() as url, pytest.raises(ServiceError) as caught:
        await transports(url=url).post_json(NATIVE_PATH, BODY, KEY, None, probe_timeout=0.3)

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "--upstream-breaker-probe-timeout" in caught.value.message
    assert caught.value.unreachable  # still unreachable: down again for a full cool-down


@pytest.mark.parametrize(
    "fault",
    [Fault(reset=True), Fault(reset_after_bytes=10), Fault(reset_after_bytes=10, chunked=True)],
    ids=["reset before the answer", "reset mid-body", "reset mid-chunk"],
)
async def test_a_connection_reset_is_unavailable(
    transports: Transports, upstream: FakeUpstream, fault: Fault
) -> None:
    upstream.always(fault)

    error = await failure_of(transports())

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"  # retryable: the next attempt may well pass


@pytest.mark.parametrize(
    "fault",
    [
        Fault(reset=True),
        Fault(reset_after_bytes=10),
        Fault(delay=NEVER),
        Fault(pad_to=MAX_RESPONSE_BYTES + 1),
        Fault(body=b"\x1f\x8b not really gzip", headers={"content-encoding": "gzip"}),
    ],
    ids=["reset", "reset mid-body", "timeout", "too large", "corrupt gzip"],
)
async def test_no_error_ever_carries_the_key(
    transports: Transports, upstream: FakeUpstream, fault: Fault
) -> None:
    upstream.always(fault)

    error = await failure_of(transports(timeout=0.3))

    assert UPSTREAM_KEY not in str(error)
    assert UPSTREAM_KEY not in error.message
    assert all(UPSTREAM_KEY not in value for value in error.metadata.values())


async def test_no_error_carries_the_key_when_the_upstream_is_unreachable(transports: Transports) -> None:
    error = await failure_of(transports(url=nothing_listening()))

    assert UPSTREAM_KEY not in str(error)


# --- the per-attempt metric ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (Fault(), "200"),
        (Fault(status=503), "503"),
        (Fault(reset=True), "reset"),
        (Fault(delay=NEVER), "timeout"),
        (Fault(pad_to=MAX_RESPONSE_BYTES + 1), "too_large"),
        (Fault(body=b"\x1f\x8b not really gzip", headers={"content-encoding": "gzip"}), "protocol_error"),
    ],
)
async def test_each_attempt_is_counted_by_its_outcome(
    transports: Transports, upstream: FakeUpstream, metrics: Metrics, fault: Fault, outcome: str
) -> None:
    upstream.always(fault)
    # A short timeout only where the upstream never answers: on a loaded machine any other
    # answer may take longer than that, and would then be counted as a timeout.
    timeout = 0.3 if outcome == "timeout" else 5.0

    with contextlib.suppress(ServiceError):  # the failures are what is counted here
        await transports(timeout=timeout).post_json(NATIVE_PATH, BODY, KEY, None)

    assert attempts(metrics, outcome) == 1
    assert metrics.registry.get_sample_value("rerank_upstream_latency_seconds_count") == 1


async def test_a_call_cancelled_mid_attempt_is_counted_as_cancelled(
    transports: Transports, upstream: FakeUpstream, metrics: Metrics
) -> None:
    upstream.always(Fault(delay=NEVER))
    call = asyncio.create_task(transports().post_json(NATIVE_PATH, BODY, KEY, None))
    await wait_until_async(lambda: len(upstream.requests) == 1, what="the attempt reaching the upstream")

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert attempts(metrics, "cancelled") == 1
