"""The upstream transport's connection pool against a real HTTP server: reuse, bounds,
keep-alive expiry, connections the upstream closed, release."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.backends.upstream.client import budget, exchange
from rerank_service.backends.upstream.client.connections import KEEPALIVE_EXPIRY, PHASE, Phase
from rerank_service.backends.upstream.client.transport import MAX_RESPONSE_BYTES, UpstreamTransport
from rerank_service.backends.upstream.retry import judge
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.domain import BackendRequest, CallContext, ServiceError
from rerank_service.core.health import Outcome
from rerank_service.observability.metrics import Metrics
from rerank_service.testing.fake_upstream import NATIVE_PATH, NEVER, FakeUpstream, Fault
from tests.conftest import upstream_settings
from tests.support.certs import CertificateAuthority
from tests.support.raw_http import RawHttpServer
from tests.support.waiting import wait_until_async

BODY = {"model": "qwen3-rerank", "input": {"query": "a b", "documents": ["a b c", "d"]}}

Transports = Callable[..., UpstreamTransport]


# No proxy or CA bundle from the machine running the tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_network_environment")


@pytest.fixture
async def transports(upstream: FakeUpstream) -> AsyncIterator[Transports]:
    """`transports(max_connections, url=upstream.url, timeout=10.0, ...)`: a transport,
    closed after the test."""
    upstream.api_key = None
    made: list[UpstreamTransport] = []

    def make(
        max_connections: int, url: str | None = None, timeout: float = 10.0, **options: object
    ) -> UpstreamTransport:
        made.append(UpstreamTransport(url or upstream.url, timeout, max_connections, **options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for transport in made:
        await transport.close()


async def post(transport: UpstreamTransport, deadline: float | None = None) -> int:
    reply = await transport.post_json(NATIVE_PATH, BODY, None, deadline)
    return reply.status


async def test_sequential_calls_reuse_one_connection(transports: Transports, upstream: FakeUpstream) -> None:
    transport = transports(3)
    before = upstream.connections_accepted

    statuses = [await post(transport) for _ in range(5)]

    assert statuses == [200] * 5
    assert upstream.connections_accepted - before == 1


async def test_a_flood_of_calls_never_opens_more_connections_than_allowed(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=0.05))
    transport = transports(3)
    before = upstream.connections_accepted

    statuses = await asyncio.gather(*(post(transport) for _ in range(40)))

    assert statuses == [200] * 40
    assert upstream.max_in_flight == 3
    assert upstream.connections_accepted - before == 3


async def test_a_call_waiting_for_a_connection_past_its_deadline_is_pool_exhausted_not_a_timeout(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(delay=NEVER))
    transport = transports(1)
    busy = asyncio.create_task(post(transport))
    await wait_until_async(lambda: len(upstream.requests) == 1, what="the busy call holding the connection")

    with pytest.raises(ServiceError) as caught:
        await post(transport, deadline=time.monotonic() + 0.1)

    # Our own pool was full: not the upstream's slowness, and no mark against its health.
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "UPSTREAM_POOL_EXHAUSTED"
    assert not caught.value.unreachable
    assert judge(caught.value, caller_deadline_passed=False).outcome is Outcome.NEUTRAL
    assert len(upstream.requests) == 1  # the waiting call never reached the upstream
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy


async def waiting_for_a_connection(
    transport: UpstreamTransport, deadline: float | None = None
) -> asyncio.Task[int]:
    """A call, started and left once it waits for a free connection of the pool: its own
    context shows where it is (connections.PHASE)."""
    context = contextvars.Context()
    call = asyncio.create_task(post(transport, deadline), context=context)
    await wait_until_async(lambda: context.get(PHASE) is Phase.POOL, what="the call waiting for a connection")
    return call


async def test_closing_the_transport_fails_the_calls_waiting_for_a_connection_as_unavailable(
    transports: Transports, upstream: FakeUpstream
) -> None:
    """A reload whose grace ran out closes the transport: each call waiting for the pool
    gets a status (UNAVAILABLE; the backend then falls back), not a bare cancellation
    that leaves its caller waiting out its deadline."""
    upstream.inject(Fault(delay=NEVER))
    transport = transports(1)
    busy = asyncio.create_task(post(transport))
    await wait_until_async(lambda: len(upstream.requests) == 1, what="the busy call holding the connection")
    waiting = [await waiting_for_a_connection(transport) for _ in range(2)]

    await transport.close()

    for call in [busy, *waiting]:
        with pytest.raises(ServiceError) as caught:
            await call
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.reason == "UPSTREAM_UNAVAILABLE"
    assert len(upstream.requests) == 1


async def test_a_call_cancelled_as_the_transport_closes_stays_cancelled(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(delay=NEVER))
    transport = transports(1)
    busy = asyncio.create_task(post(transport))
    await wait_until_async(lambda: len(upstream.requests) == 1, what="the busy call holding the connection")
    waiting = await waiting_for_a_connection(transport)

    waiting.cancel()  # its caller hung up, in the same turn as the close
    await transport.close()

    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(ServiceError):
        await busy


class HeldServer(RawHttpServer):
    """Answers every request, the first one only once `answer_first` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer_first = asyncio.Event()

    async def answer(self, number: int) -> bytes:
        if number == 1:
            await self.answer_first.wait()
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def test_a_waiter_cancelled_as_the_connection_came_free_passes_it_to_the_next(
    transports: Transports,
) -> None:
    """One connection, held by a call; two calls wait for it. Given back, it wakes the
    first waiter, which is cancelled in that same turn, before it runs (its caller hung
    up, or its deadline fired): the second must still get the connection, not wait out
    its budget beside an idle one (and fail, UPSTREAM_POOL_EXHAUSTED)."""
    held = HeldServer()
    transport = transports(1, url=await held.start())
    waiters: list[asyncio.Task[int]] = []

    async def hold_the_connection_then_cancel_the_first_waiter() -> int:
        status = await post(transport)
        # The connection went back as the answer was read, waking the first waiter; this
        # runs before it does.
        waiters[0].cancel()
        return status

    try:
        holder = asyncio.create_task(hold_the_connection_then_cancel_the_first_waiter())
        await wait_until_async(lambda: held.requests == 1, what="the call holding the connection")
        waiters += [await waiting_for_a_connection(transport) for _ in range(2)]
        held.answer_first.set()

        assert await holder == 200
        with pytest.raises(asyncio.CancelledError):
            await waiters[0]
        assert await waiters[1] == 200  # without the wake-up passed on: 10 s, then pool exhausted
        assert (held.requests, held.connections) == (2, 1)
    finally:
        held.close()


class GatedServer(RawHttpServer):
    """Answers request n (1 for the first) once `gates[n - 1]` is set; never, unset."""

    def __init__(self, requests: int) -> None:
        super().__init__()
        self.gates = [asyncio.Event() for _ in range(requests)]

    async def answer(self, number: int) -> bytes:
        await self.gates[number - 1].wait()
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def held_then_waiting(
    transport: UpstreamTransport, server: GatedServer, deadline: float | None = None
) -> tuple[asyncio.Task[int], asyncio.Task[int]]:
    """The pool's one connection held by a call the server has not answered, and a second
    call (with `deadline`) waiting for it."""
    holder = asyncio.create_task(post(transport))
    await wait_until_async(lambda: server.requests == 1, what="the call holding the connection")
    return holder, await waiting_for_a_connection(transport, deadline)


async def test_a_call_that_waited_for_the_pool_gets_the_whole_upstream_timeout_for_its_exchange(
    transports: Transports,
) -> None:
    """--upstream-timeout bounds the upstream's time, not the wait in our own pool: a call
    that waited most of it for a connection is not then cut off, its request abandoned,
    and its upstream blamed (DEADLINE_EXCEEDED, a mark against the deployment's health)."""
    # Margins of over a second each way on a loaded machine: the wait ends half-way through
    # the timeout, and the answer comes 0.2 s past the old bound, 1 s before the new one.
    timeout = 2.5
    server = GatedServer(2)
    transport = transports(1, url=await server.start(), timeout=timeout)
    try:
        holder, waiting = await held_then_waiting(transport, server)
        began = time.monotonic()  # the waiting call's time began before this
        # The wait for our own pool takes most of the upstream timeout...
        await wait_until_async(lambda: time.monotonic() >= began + 0.5 * timeout, what="the wait")
        server.gates[0].set()
        assert await holder == 200
        await wait_until_async(lambda: server.requests == 2, what="the waiting call's request")
        # ... and the upstream answers within the upstream timeout of its request, past
        # the end of the one that began with the wait.
        await wait_until_async(lambda: time.monotonic() >= began + timeout + 0.2, what="the old bound")
        server.gates[1].set()

        assert await waiting == 200  # before: UPSTREAM_TIMEOUT at `timeout`, the answer thrown away
    finally:
        server.close()


@pytest.mark.parametrize("by_caller", [False, True], ids=["the upstream timeout", "the caller's deadline"])
async def test_a_call_that_waited_for_the_pool_then_got_no_answer_times_out_as_it_should(
    transports: Transports, by_caller: bool
) -> None:
    """After the wait for the pool, a slow upstream is the upstream's timeout (a failure
    for its health); the caller's own deadline ending it is the caller's (neutral)."""
    server = GatedServer(2)  # the second request is never answered
    transport = transports(1, url=await server.start(), timeout=10.0 if by_caller else 0.5)
    try:
        holder, waiting = await held_then_waiting(
            transport, server, deadline=time.monotonic() + 0.5 if by_caller else None
        )
        server.gates[0].set()
        assert await holder == 200

        with pytest.raises(ServiceError) as caught:
            await waiting

        assert server.requests == 2
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert caught.value.reason == "UPSTREAM_TIMEOUT"
        assert ("the call's deadline" if by_caller else "the upstream timeout") in caught.value.message
        verdict = judge(caught.value, caller_deadline_passed=by_caller)
        assert verdict.outcome is (Outcome.NEUTRAL if by_caller else Outcome.FAILURE)
    finally:
        server.close()


async def test_a_call_whose_wait_for_the_pool_left_it_almost_no_time_sends_nothing(
    transports: Transports, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that comes free with (almost) nothing left of the caller's deadline
    carries no request (it would be abandoned at once, its work wasted): the pool's wait
    ran out, UPSTREAM_POOL_EXHAUSTED, neutral for the deployment's health. "Almost" is
    made half a second here, so that the test need not hit a few milliseconds."""
    monkeypatch.setattr(budget, "MIN_EXCHANGE", 0.5, raising=False)
    server = GatedServer(2)
    metrics = Metrics()
    transport = transports(1, url=await server.start(), metrics=metrics)
    try:
        deadline = time.monotonic() + 1.0
        holder, waiting = await held_then_waiting(transport, server, deadline)
        await wait_until_async(lambda: time.monotonic() >= deadline - 0.4, what="the deadline nearing")
        server.gates[0].set()
        assert await holder == 200
        server.gates[1].set()  # answered at once, were it sent

        with pytest.raises(ServiceError) as caught:
            await waiting

        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.reason == "UPSTREAM_POOL_EXHAUSTED"
        assert judge(caught.value, caller_deadline_passed=False).outcome is Outcome.NEUTRAL
        assert attempts(metrics, "pool_timeout") == 1
        assert server.requests == 1
        assert await post(transport) == 200  # the connection went back to the pool
        assert server.connections == 1
    finally:
        server.close()


@pytest.mark.parametrize("idle", [True, False], ids=["an idle connection", "room for a new one"])
async def test_a_call_left_almost_no_time_with_a_connection_free_at_once_is_the_callers_timeout(
    transports: Transports, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, idle: bool
) -> None:
    """A connection free at once (an idle one, or room to open one) with (almost) nothing
    left of the caller's deadline carries nothing, and no wait for the pool ran out: the
    caller's deadline did, DEADLINE_EXCEEDED as for a call that comes with none left, not
    UPSTREAM_POOL_EXHAUSTED (an operator would raise --upstream-max-connections for
    nothing). "Almost" is made an hour here, so that no deadline is raced."""
    monkeypatch.setattr(budget, "MIN_EXCHANGE", 3600.0)
    metrics = Metrics()
    transport = transports(4, metrics=metrics)
    if idle:
        assert await post(transport) == 200  # its connection stays in the pool, idle
    requests, connections = len(upstream.requests), upstream.connections_accepted

    with pytest.raises(ServiceError) as caught:
        # Before the upstream timeout (10 s): the caller's deadline is what bounds the call.
        await post(transport, deadline=time.monotonic() + 5.0)

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.reason == "UPSTREAM_TIMEOUT"
    assert "the call's deadline" in caught.value.message
    assert judge(caught.value, caller_deadline_passed=True).outcome is Outcome.NEUTRAL
    assert attempts(metrics, "timeout") == 1
    assert attempts(metrics, "pool_timeout") == 0
    # Nothing sent, no connection opened; an idle one went back to the pool.
    assert (len(upstream.requests), upstream.connections_accepted) == (requests, connections)
    monkeypatch.undo()
    assert await post(transport) == 200
    assert upstream.connections_accepted == connections + (0 if idle else 1)


def attempts(metrics: Metrics, outcome: str) -> float:
    """How many upstream attempts `metrics` counted with this outcome."""
    return metrics.registry.get_sample_value("rerank_upstream_requests_total", {"status": outcome}) or 0.0


async def test_a_body_left_unread_frees_its_slot_and_drops_its_connection(
    transports: Transports, upstream: FakeUpstream
) -> None:
    transport = transports(1)
    before = upstream.connections_accepted
    upstream.inject(Fault(pad_to=MAX_RESPONSE_BYTES + 1))  # refused on its length, never read
    with pytest.raises(ServiceError):
        await post(transport)

    assert await asyncio.wait_for(post(transport), 5) == 200  # the only slot came back
    assert upstream.connections_accepted - before == 2  # the unread one could not be reused


async def test_a_cancelled_call_frees_its_slot(transports: Transports, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(delay=5))
    transport = transports(1)
    slow = asyncio.create_task(post(transport))
    await wait_until_async(lambda: len(upstream.requests) == 1, what="the slow call holding the slot")
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow

    assert await asyncio.wait_for(post(transport), 2) == 200


async def test_a_connection_the_server_said_it_closes_is_not_reused(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(headers={"connection": "close"}))
    transport = transports(3)
    before = upstream.connections_accepted

    assert [await post(transport) for _ in range(3)] == [200, 200, 200]
    assert upstream.connections_accepted - before == 2


async def test_an_idle_connection_the_upstream_closed_does_not_fail_the_next_call(
    transports: Transports,
) -> None:
    with FakeUpstream() as own:
        transport = transports(2, url=own.url)
        assert await post(transport) == 200
        own.go_down()  # closes the idle connection under the pool
        own.come_back()
        await wait_until_async(lambda: own.open_connections == 0, what="the idle connection closed")

        assert [await post(transport) for _ in range(2)] == [200, 200]
        assert own.connections_accepted == 2  # one new connection, then reused


async def test_an_idle_connection_is_closed_after_its_keep_alive(transports: Transports) -> None:
    with FakeUpstream() as own:
        transport = transports(2, url=own.url, keepalive_expiry=0.2)
        assert await post(transport) == 200
        assert own.open_connections == 1

        await wait_until_async(lambda: own.open_connections == 0, what="the keep-alive expiring")


async def test_an_idle_connection_is_closed_within_the_keep_alive_expiry_whenever_the_sweep_runs(
    transports: Transports, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPERATIONS.md: closed by 30 s idle. aiohttp closes idle connections in sweeps, each
    due a fixed time after the last; the worst case is a connection that went idle just
    after one. Driven on a fake clock (aiohttp's pool reads time.monotonic as `monotonic`,
    and sweeps in TCPConnector._cleanup, rescheduling itself as _cleanup_handle): each
    sweep is run at once, the clock moved on by the delay aiohttp gave the next."""
    now = [1000.0]
    monkeypatch.setattr(aiohttp.connector, "monotonic", lambda: now[0])
    loop = asyncio.get_running_loop()
    with FakeUpstream() as own:
        transport = transports(2, url=own.url)
        assert await post(transport) == 200  # idle since 1000
        assert transport._session is not None
        connector = transport._session.connector
        assert isinstance(connector, aiohttp.TCPConnector)

        now[0] -= 0.001  # a sweep just before the connection went idle: it stays
        connector._cleanup()
        for _ in range(5):
            if not connector._conns:
                break
            handle = connector._cleanup_handle
            assert handle is not None
            now[0] += handle.when() - loop.time()  # to when the next sweep is due
            connector._cleanup()

        assert not connector._conns
        assert now[0] - 1000 <= KEEPALIVE_EXPIRY
        await wait_until_async(lambda: own.open_connections == 0, what="the connection closed")


async def test_closing_the_transport_closes_every_connection(transports: Transports) -> None:
    with FakeUpstream() as own:
        own.always(Fault(delay=0.05))
        transport = transports(4, url=own.url)
        await asyncio.gather(*(post(transport) for _ in range(4)))
        assert own.open_connections == 4

        await transport.close()

        await wait_until_async(lambda: own.open_connections == 0, what="every connection closed")


async def test_an_https_upstream_reuses_its_tls_connection(transports: Transports, tmp_path: Path) -> None:
    ca = CertificateAuthority()
    cert, key = ca.issue_server().write(tmp_path, "upstream")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    with FakeUpstream(tls=server_context) as own:
        url = own.url.replace("http://127.0.0.1", "https://localhost")
        transport = transports(2, url=url, ca_file=ca.write(tmp_path))

        assert [await post(transport) for _ in range(3)] == [200, 200, 200]
        assert own.connections_accepted == 1


class ClosingServer:
    """A raw HTTP/1.1 server that answers each connection's first request and closes the
    connection on the second without answering: an idle connection whose keep-alive ran
    out on the server's side just as the client sent on it.

    `held`: seconds it works on a request it will not answer before closing (then it is no
    close crossing the request: the request killed it). `answers`: how many requests it
    answers in all, the first of each connection (None: no bound). `begun`: bytes of an
    answer it sends before that close (its worker died answering). `reset`: it closes with
    a reset (RST), as a socket closed with a request unread does, not a FIN."""

    def __init__(
        self,
        held: float = 0.0,
        answers: int | None = None,
        answer_when: Callable[[], bool] | None = None,
        begun: bytes = b"",
        reset: bool = False,
    ) -> None:
        self.requests = 0
        self.connections = 0
        self.held = held
        self.answers = answers
        self.answer_when = answer_when  # each answer waits for it (None: none)
        self.begun = begun
        self.reset = reset

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if answered or self.answers == 0:
                    await self._hold()
                    if self.begun:
                        writer.write(self.begun)
                        await writer.drain()
                    if self.reset:  # no lingering: the close is a reset
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break  # closed without a (whole) word
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if self.answer_when is not None:
                    await wait_until_async(self.answer_when)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                )
                await writer.drain()
                answered = True
                if self.answers is not None:
                    self.answers -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _hold(self) -> None:
        """Wait until more than `held` seconds passed since the request came, on the clock
        the client reads (it sent the request before then): no margin to guess."""
        until = time.monotonic() + self.held
        await wait_until_async(lambda: time.monotonic() > until)


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_reused_connection_closed_without_an_answer_is_retried_once_on_a_fresh_one(
    transports: Transports, monkeypatch: pytest.MonkeyPatch, reset: bool
) -> None:
    """OPERATIONS.md: the idle-close race is sent once more, within the attempt, whether
    the upstream's close comes as a FIN or (its socket holding the request unread) a reset."""
    # The close comes at once; however slow this machine, it is taken for a stale connection.
    monkeypatch.setattr(exchange, "_STALE_CLOSE_WINDOW", 60.0)
    # And a reset however soon the connection is reused (the next test: not so by default).
    monkeypatch.setattr(exchange, "_RESET_RACE_IDLE", 0.0)
    closing = ClosingServer(reset=reset)
    transport = transports(1, url=await closing.start())
    try:
        assert await post(transport) == 200
        assert await post(transport) == 200  # its connection failed; the retry opened another

        assert (closing.requests, closing.connections) == (3, 2)
    finally:
        closing.server.close()


async def test_a_reused_connection_reset_at_once_without_an_answer_is_left_to_the_retry_policy(
    transports: Transports, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection reused straight after its last answer and reset as the request came
    was not closed by an idle timer: the upstream read the request and dropped it (a worker
    crashing on it). Resent uncounted, each attempt reached it twice (the fault suite's
    reset scenario: 4 requests for 3 attempts)."""
    monkeypatch.setattr(exchange, "_STALE_CLOSE_WINDOW", 60.0)
    monkeypatch.setattr(exchange, "_RESET_RACE_IDLE", 3600.0)  # no connection here idles that long
    closing = ClosingServer(reset=True)
    transport = transports(1, url=await closing.start())
    try:
        assert await post(transport) == 200
        with pytest.raises(ServiceError) as caught:
            await post(transport)

        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert (closing.requests, closing.connections) == (2, 1)
    finally:
        closing.server.close()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize(
    "begun",
    [b"H", b"HTTP/1.1 5", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"],
    ids=["a byte", "part of the status line", "the status line", "a header"],
)
async def test_a_reused_connection_closed_after_part_of_an_answer_is_not_resent(
    transports: Transports, monkeypatch: pytest.MonkeyPatch, begun: bytes, reset: bool
) -> None:
    """An answer begun proves the upstream had the request: its close is no idle-close
    race, and the request goes out no more times than the retry policy allows. So is its
    reset, which aiohttp reports as it does a reset before any answer."""
    monkeypatch.setattr(exchange, "_STALE_CLOSE_WINDOW", 60.0)  # however soon the close comes
    closing = ClosingServer(begun=begun, reset=reset)
    transport = transports(1, url=await closing.start())
    try:
        assert await post(transport) == 200

        with pytest.raises(ServiceError) as caught:
            await post(transport)

        assert caught.value.reason == "UPSTREAM_UNAVAILABLE"  # which the retry policy retries
        assert (closing.requests, closing.connections) == (2, 1)
    finally:
        closing.server.close()


async def test_a_reused_connection_closed_after_the_upstream_held_the_request_is_not_resent(
    transports: Transports,
) -> None:
    """A close that comes later than one already on its way when the request went out is
    the upstream's doing with the request: resent at once, uncounted, one call would reach
    it more times than --upstream-max-attempts. The retry policy decides instead."""
    closing = ClosingServer(held=exchange._STALE_CLOSE_WINDOW)
    transport = transports(1, url=await closing.start())
    try:
        assert await post(transport) == 200

        with pytest.raises(ServiceError) as caught:
            await post(transport)

        assert caught.value.reason == "UPSTREAM_UNAVAILABLE"  # which the retry policy retries
        assert (closing.requests, closing.connections) == (2, 1)
    finally:
        closing.server.close()


async def test_the_stale_close_window_starts_when_the_pool_hands_the_connection_out(
    transports: Transports, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that waited for the pool's one connection longer than the window, then found
    it closed as it sent (the idle-close race), is sent again on a fresh one: the wait for
    the pool is no time the upstream had the request."""
    window = 1.0
    monkeypatch.setattr(exchange, "_STALE_CLOSE_WINDOW", window)
    second_started: list[float] = []
    # The first answer waits until the second call has waited for the pool twice the window.
    closing = ClosingServer(
        answer_when=lambda: bool(second_started) and time.monotonic() > second_started[0] + 2 * window
    )
    transport = transports(1, url=await closing.start())
    try:
        first = asyncio.ensure_future(post(transport))
        await wait_until_async(lambda: closing.requests == 1)
        second_started.append(time.monotonic())
        second = asyncio.ensure_future(post(transport))  # waits for the pool's one connection

        assert await first == 200
        assert await second == 200  # its connection closed as it went out: sent again on a fresh one

        assert (closing.requests, closing.connections) == (3, 2)
    finally:
        closing.server.close()


async def test_a_request_the_upstream_closes_on_is_sent_at_most_max_attempts_times(
    upstream: FakeUpstream,
) -> None:
    """OPERATIONS.md: at most --upstream-max-attempts attempts, a kept-alive connection's
    included: an upstream that works on a request, then closes without answering, gets it
    three times (the first call left a kept-alive connection)."""
    closing = ClosingServer(held=exchange._STALE_CLOSE_WINDOW, answers=1)
    url = await closing.start()
    settings = upstream_settings(
        upstream, upstream_url=url, upstream_max_attempts=3, upstream_retry_backoff=0.01
    )
    backend = UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings))
    await backend.start()
    request = BackendRequest(
        model="qwen3-rerank", query="a b", documents=["a b c"], instruct=None, top_n=None
    )
    try:
        with pytest.raises(ServiceError):  # the one answer is no rerank answer: never mind
            await backend.rerank(request, CallContext())
        assert closing.requests == 1

        with pytest.raises(ServiceError) as caught:
            await backend.rerank(request, CallContext())

        assert caught.value.reason == "UPSTREAM_UNAVAILABLE"
        assert closing.requests - 1 == 3
    finally:
        await backend.close()
        closing.server.close()


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(
    transports: Transports, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(reset=True))
    transport = transports(1)

    with pytest.raises(ServiceError) as caught:
        await post(transport)

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(upstream.requests) == 1


class UnaskedServer:
    """A raw HTTP/1.1 server that, once told to, sends an answer nobody asked for on its idle
    connection (a 408, as a server whose idle timeout ran out may) and keeps it open. A
    connection that says "ping" gets "pong"."""

    def __init__(self) -> None:
        self.connections = 0  # HTTP ones
        self.speak = asyncio.Event()
        self.spoken = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"ping"):
                writer.write(b"pong")
                await writer.drain()
                return
            self.connections += 1
            first = self.connections == 1
            await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            if first:
                await self.speak.wait()
                writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
                self.spoken.set()
                await reader.read()  # kept open until the client closes it
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_an_idle_connection_with_unasked_for_bytes_is_not_reused(transports: Transports) -> None:
    unasked = UnaskedServer()
    url = await unasked.start()
    host, port = url.removeprefix("http://").split(":")
    transport = transports(2, url=url)
    ping_reader, ping_writer = await asyncio.open_connection(host, int(port))
    try:
        assert await post(transport) == 200
        unasked.speak.set()
        await unasked.spoken.wait()
        # A round trip sent after the 408 was: by the time its answer is read, the event
        # loop has taken in the 408 too (no sleep needed).
        ping_writer.write(b"ping\r\n\r\n")
        assert await ping_reader.readexactly(4) == b"pong"

        assert await post(transport) == 200  # not the 408 that sat on the idle connection
        assert unasked.connections == 2  # the first call's, then a fresh one
    finally:
        ping_writer.close()
        unasked.server.close()
