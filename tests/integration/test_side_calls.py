"""Callers without a key cannot take the slots of callers with one: health and reflection
calls are bounded apart from RerankService's, silent connections are closed, and a
client at the advertised stream limit never sees a refused stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.config.secret import Secret
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import CALLER_KEY, ServerFactory
from tests.support.logs import LogCapture
from tests.support.rpc import error_info, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until, wait_until_async

WATCH = "/grpc.health.v1.Health/Watch"
CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
AUTHORIZED = (("authorization", f"Bearer {CALLER_KEY}"),)
WATCH_REQUEST = health_pb2.HealthCheckRequest()


def _code(error: BaseException) -> str:
    return error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__


async def _flood_then_rerank(
    server: ServerThread, watches: int, reflections: int, calls: int
) -> dict[str, Any]:
    """Open keyless Watch and reflection streams on two connections, hold them, and make
    authenticated Rerank calls meanwhile; what each side got."""
    assert server.server is not None
    side = server.server.side_calls
    wanted_open = min(watches + reflections, side.limits.streams)
    flooders = [
        grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(2)
    ]
    caller = grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
    held: list[Any] = []
    try:
        for number in range(watches):
            channel = flooders[number % 2]
            held.append(
                channel.unary_stream(WATCH, health_pb2.HealthCheckRequest.SerializeToString)(WATCH_REQUEST)
            )
        for number in range(reflections):
            channel = flooders[number % 2]
            stream: Any = channel.stream_stream(
                REFLECTION, reflection_pb2.ServerReflectionRequest.SerializeToString
            )()
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            held.append(stream)
        # The server's count, read from this thread: the refused streams have ended by then.
        await asyncio.to_thread(
            wait_until, lambda: side.streams.open >= wanted_open, 30, 0.01, what="the flood open"
        )
        stub = rerank_pb2_grpc.RerankServiceStub(caller)
        rerank_codes: Counter[str] = Counter()
        for _ in range(calls):
            try:
                await stub.Rerank(request(), metadata=AUTHORIZED, timeout=10)
                rerank_codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                rerank_codes[error.code().name] += 1
        check = health_pb2.HealthCheckResponse.FromString(
            await caller.unary_unary(CHECK, health_pb2.HealthCheckRequest.SerializeToString)(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        )
        open_streams = side.streams.open
        # Each refused flood stream has ended with its status; the others are still open.
        refused: Counter[str] = Counter()
        for call in held:
            if call.done():
                refused[(await call.code()).name] += 1
            call.cancel()
        return {
            "rerank": rerank_codes,
            "check": health_pb2.HealthCheckResponse.ServingStatus.Name(check.status),
            "open": open_streams,
            "refused": refused,
        }
    finally:
        for channel in (*flooders, caller):
            await channel.close()


def test_keyless_watch_and_reflection_floods_leave_every_authenticated_call_its_slot(
    serve: ServerFactory,
) -> None:
    # The attacks at a scale this machine runs quickly: 600 Watch and 200 reflection
    # streams without a key against --max-open-calls 300 (before: every Rerank refused
    # "Concurrent RPC limit exceeded" once 300 were open).
    settings = {"api_keys": (Secret(CALLER_KEY),), "max_open_calls": 300, "max_concurrent_requests": 100}
    with serve(**settings, max_watch_streams=64) as server:
        result = server.run(_flood_then_rerank(server, watches=600, reflections=200, calls=100), timeout=120)

    assert result["rerank"] == {"OK": 100}
    assert result["check"] == "SERVING"
    assert result["open"] == 64  # the streams' own bound, no more
    assert result["refused"] == {"RESOURCE_EXHAUSTED": 800 - 64}


RERANK = "/rerank.v1.RerankService/Rerank"
OTHER_KEY = "caller-key-other-012345"


async def _silent_unary_flood(server: ServerThread, calls: int, held: int, key: str | None) -> dict[str, Any]:
    """Open `calls` Rerank calls whose request never comes (headers only) from the caller
    of `key` (None: no key) on one connection, wait until all but `held` of them have been
    refused, then make a health Check and another caller's Rerank meanwhile; what each got."""
    assert server.server is not None
    admission = server.server.admission
    flooder = grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
    caller = grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
    never = asyncio.Event()

    async def nothing() -> AsyncIterator[bytes]:
        await never.wait()
        sent: tuple[bytes, ...] = ()  # an async generator that yields nothing
        for message in sent:
            yield message

    metadata = () if key is None else (("authorization", f"Bearer {key}"),)
    rerank: grpc.aio.StreamUnaryMultiCallable[Any, Any] = flooder.stream_unary(RERANK)
    silent = [rerank(nothing(), metadata=metadata) for _ in range(calls)]
    try:
        refused_all = await wait_until_async(
            lambda: sum(call.done() for call in silent) >= calls - held, within=30
        )
        assert refused_all, f"{sum(call.done() for call in silent)} of {calls} silent calls refused"
        refused: Counter[str] = Counter()
        for call in silent:
            if call.done():
                error = await _error_of(call)
                info = error_info(cast(grpc.RpcError, error))
                refused[f"{error.code().name} {info.reason if info is not None else ''}".strip()] += 1
        open_now = admission.open
        check = health_pb2.HealthCheckResponse.FromString(
            await caller.unary_unary(CHECK, health_pb2.HealthCheckRequest.SerializeToString)(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        )
        try:
            await rerank_pb2_grpc.RerankServiceStub(caller).Rerank(
                request(), metadata=(("authorization", f"Bearer {OTHER_KEY}"),), timeout=10
            )
            other = "OK"
        except grpc.aio.AioRpcError as error:
            info = error_info(cast(grpc.RpcError, error))
            other = f"{error.code().name} {info.reason if info is not None else error.details()}"
        for call in silent:
            call.cancel()
        assert await wait_until_async(lambda: admission.open == 0, what="the silent calls ended")
        return {
            "refused": refused,
            "open": open_now,
            "check": health_pb2.HealthCheckResponse.ServingStatus.Name(check.status),
            "other": other,
        }
    finally:
        never.set()
        for channel in (flooder, caller):
            await channel.close()


async def _error_of(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("a silent call was answered")


@pytest.mark.parametrize(
    ("keys", "held", "refused", "other"),
    [
        # A caller with a key holds its share of --max-open-calls (0.5 of 20), no more.
        ((CALLER_KEY, OTHER_KEY), 10, {"RESOURCE_EXHAUSTED CALLER_LIMITED": 20}, "OK"),
        # No keys: every call is the one anonymous caller's, held to --max-open-calls only.
        ((), 20, {"RESOURCE_EXHAUSTED OVERLOADED": 10}, "RESOURCE_EXHAUSTED OVERLOADED"),
    ],
    ids=["caller-keys", "open"],
)
def test_unary_calls_whose_request_never_comes_leave_health_checks_their_room(
    serve: ServerFactory, keys: tuple[str, ...], held: int, refused: dict[str, int], other: str
) -> None:
    """grpc held each until its request came, unseen by the edge, in one of its own open
    calls: 30 such calls took the room kept for health checks (Check refused
    "Concurrent RPC limit exceeded", as every other caller's call). Now the edge counts
    each as it arrives and refuses the excess at once, with its own refusal."""
    settings = {
        "api_keys": tuple(Secret(key) for key in keys),
        "max_open_calls": 20,
        "max_concurrent_requests": 4,
        "max_health_checks": 2,
        "max_watch_streams": 2,
    }
    with serve(**settings) as server:
        key = keys[0] if keys else None
        result = server.run(_silent_unary_flood(server, calls=30, held=held, key=key), timeout=120)

    assert result["refused"] == refused
    assert result["open"] == held
    assert result["check"] == "SERVING"
    assert result["other"] == other


def test_a_watch_ends_at_its_maximum_age_and_one_that_sends_no_request_at_the_timeout(
    serve: ServerFactory,
) -> None:
    async def watch_and_stay_silent(target: str) -> tuple[list[str], str, str]:
        async with grpc.aio.insecure_channel(target) as channel:
            watch = channel.unary_stream(
                WATCH,
                health_pb2.HealthCheckRequest.SerializeToString,
                health_pb2.HealthCheckResponse.FromString,
            )(WATCH_REQUEST, timeout=30)
            statuses = [
                health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                async for answer in _until_end(watch)
            ]
            aged = (await watch.code()).name
            silent: Any = channel.stream_stream(WATCH)(timeout=30)  # opened, its request never sent
            silent_code = (await silent.code()).name
            return statuses, aged, silent_code

    with serve(watch_stream_max_age=0.5, side_call_timeout=0.5) as server:
        statuses, aged, silent = asyncio.run(watch_and_stay_silent(server.target))
        assert server.server is not None
        wait_until(
            lambda: server.server is not None and server.server.side_calls.streams.open == 0,
            what="every stream ended",
        )

    assert statuses == ["SERVING"]
    assert aged == "UNAVAILABLE"
    assert silent == "DEADLINE_EXCEEDED"


async def _until_end(call: Any) -> Any:
    try:
        async for answer in call:
            yield answer
    except grpc.aio.AioRpcError:
        return


@pytest.mark.parametrize(
    "method",
    ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"],
)
def test_a_side_call_whose_request_does_not_parse_is_invalid_argument_as_a_rerank_call_is(
    server: ServerThread, method: str
) -> None:
    """grpc answers a deserializer's exception UNKNOWN, naming a Python class."""
    with grpc.insecure_channel(server.target) as channel:
        send = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as refused:
            send(b"\xff\xff\xff\xff", timeout=10)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (refused.value.details() or "")
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # the slot was given back


def test_silent_connections_are_closed_after_the_handshake_timeout(serve: ServerFactory) -> None:
    with serve(handshake_timeout=0.5, max_connections=16) as server:
        assert server.server is not None
        assert server.server.port is not None
        port = server.server.port
        # More silent connections than --max-connections, from another loopback address.
        silent = [
            socket.create_connection(("127.0.0.1", port), timeout=20, source_address=("127.0.0.2", 0))
            for _ in range(24)
        ]
        try:
            closed = [_closed_by_server(connection) for connection in silent]
        finally:
            for connection in silent:
                connection.close()
        # Once they are gone, a new connection is served.
        with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            answer = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=10)

    assert all(closed)
    assert len(answer.output.results) == len(request().documents)


def test_one_address_holding_silent_connections_leaves_room_for_everyone_else(serve: ServerFactory) -> None:
    # 80 silent connections from 127.0.0.2 against --max-connections 64 (the handshake
    # timeout set long, so only the cap per address acts): before, every new connection of
    # any other client was refused until they went.
    settings = {"api_keys": (Secret(CALLER_KEY),), "max_connections": 64, "max_connections_per_peer": 16}
    with serve(**settings, handshake_timeout=600) as server:
        assert server.server is not None
        assert server.server.port is not None
        port = server.server.port
        flood = [
            socket.create_connection(("127.0.0.1", port), timeout=20, source_address=("127.0.0.2", 0))
            for _ in range(80)
        ]
        try:
            # The 16 past --max-connections are refused by grpc, 48 more closed by the cap.
            for connection in flood:
                connection.setblocking(False)
            wait_until(lambda: sum(map(_closed_now, flood)) >= 64, 30, what="64 of the flood closed")
            closed = sum(map(_closed_now, flood))
            codes: Counter[str] = Counter()
            for _ in range(50):  # each on a new connection, while the 16 are still held
                with grpc.insecure_channel(
                    server.target, options=[("grpc.use_local_subchannel_pool", 1)]
                ) as channel:
                    try:
                        rerank_pb2_grpc.RerankServiceStub(channel).Rerank(
                            request(), metadata=AUTHORIZED, timeout=10
                        )
                        codes["OK"] += 1
                    except grpc.RpcError as error:
                        codes[error.code().name] += 1
        finally:
            for connection in flood:
                connection.close()

    assert closed == 64
    assert codes == {"OK": 50}


def _closed_now(connection: socket.socket) -> bool:
    """Whether the server has closed this connection (what it sent before is read and dropped)."""
    try:
        while connection.recv(4096):
            pass
    except BlockingIOError:
        return False  # open, nothing more to read now
    except OSError:
        return True  # reset
    return True


def _closed_by_server(connection: socket.socket) -> bool:
    """Read what the server sends (its own SETTINGS) until it closes the connection."""
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


def test_a_client_at_the_stream_limit_never_sees_a_refused_stream(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    # 256 calls in flight on one channel, at --max-streams-per-connection: each completion
    # raced the next call against the server's release of the stream, and a share of calls
    # failed UNAVAILABLE "RST_STREAM with error code 7" (REFUSED_STREAM).
    callers = 256
    with (
        serve(max_streams_per_connection=callers, upstream_max_connections=callers) as server,
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel,
    ):
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        stub.Rerank(request(), timeout=10)  # the client has the server's settings now
        upstream.always(Fault(delay=0.3))
        codes: Counter[str] = Counter()
        lock = threading.Lock()
        stop = time.monotonic() + 3

        def call_until_stopped() -> None:
            while time.monotonic() < stop:
                try:
                    stub.Rerank(request(), timeout=30)
                    outcome = "OK"
                except grpc.RpcError as error:
                    outcome = f"{error.code().name}: {error.details()}"
                with lock:
                    codes[outcome] += 1

        with concurrent.futures.ThreadPoolExecutor(callers) as pool:
            for future in [pool.submit(call_until_stopped) for _ in range(callers)]:
                future.result()

    assert set(codes) == {"OK"}, codes
    assert codes["OK"] >= callers


def test_a_rerank_stream_cancelled_by_its_client_leaves_no_lost_task(
    serve: ServerFactory, logs: LogCapture
) -> None:
    async def cancel_streams(target: str, count: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            for _ in range(count):
                call = stub.RerankStream()
                await call.write(rerank_pb2.RerankStreamRequest(id="a", request=request()))
                await call.read()
                await call.done_writing()
                call.cancel()

    with serve() as server:
        asyncio.run(cancel_streams(server.target, 30))
        assert server.server is not None
        wait_until(
            lambda: server.server is not None and server.server.admission.open == 0, what="every stream ended"
        )

    # asyncio logs a failed task nobody awaited when the task is collected: collect them now.
    # (Its logger goes to the service's log, not to the root logger caplog reads.)
    gc.collect()
    lost = [event for event in logs.events() if "never retrieved" in str(event.get("event"))]
    assert lost == []
