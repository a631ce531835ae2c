"""Health and reflection calls, bounded apart from RerankService's calls.

Probes and grpcurl call health and reflection without a key, so anyone can open them.
grpc's own limit on open calls (--max-open-calls) counts a call from the moment it
arrives, whatever its method: left there, a flood of keyless Watch or reflection streams
would take every slot and refuse the calls of callers who hold a key. Here each kind has
a bound of its own, and the server adds those bounds to grpc's limit, so side calls never
take a slot a rerank call needs:

- Health Check and List: at most --max-health-checks open; each must send its request
  within --side-call-timeout;
- Health Watch and reflection streams: at most --max-watch-streams open; each must send its
  request (a reflection stream: its next request) within --side-call-timeout, and ends
  after --watch-stream-max-age (UNAVAILABLE: the client watches again). When the server
  stops (`end_streams`) each ends too, UNAVAILABLE, rather than hold grpc's drain for the
  whole grace: a Watch once it has sent the status the server stops with (NOT_SERVING), a
  reflection stream between two requests.

Every method is registered as request-streaming, whatever its shape in the contract: grpc
then hands the call over at once instead of first waiting for its request, so a call is
counted from its first moment and one that never sends is ended by the timeout.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc.aio import ServicerContext
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from rerank_service.api.grpc.edge import NO_REQUEST_MESSAGE, UNDECODABLE_MESSAGE
from rerank_service.config.server import SideCallConfig
from rerank_service.observability.logging import CALLER_LOG_INTERVAL, RateLimit, get_logger

_log = get_logger("rerank_service.side_calls")
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


@dataclass(frozen=True, slots=True)
class SideCallLimits:
    checks: int
    streams: int
    stream_max_age: float
    request_timeout: float

    @classmethod
    def from_config(cls, config: SideCallConfig) -> SideCallLimits:
        return cls(
            checks=config.max_health_checks,
            streams=config.max_watch_streams,
            stream_max_age=config.watch_stream_max_age,
            request_timeout=config.request_timeout,
        )

    @property
    def total(self) -> int:
        """The most side calls open at once: what the server adds to grpc's limit."""
        return self.checks + self.streams


class _Slots:
    """Calls of one kind open at once, up to a bound."""

    def __init__(self, kind: str, setting: str, capacity: int) -> None:
        self.kind = kind
        self.setting = setting
        self.capacity = capacity
        self.open = 0

    def take(self) -> bool:
        if self.open >= self.capacity:
            return False
        self.open += 1
        return True

    def give(self) -> None:
        self.open -= 1


class _Captured:
    """Stands in for a server to the generated `add_*Servicer_to_server` functions, keeping
    the method handlers they would register."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same methods come again, by name, below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.handlers.update({f"/{service}/{name}": handler for name, handler in handlers.items()})


class _Expired(Exception):
    """A side call waited too long for a request."""


class _Undecodable(Exception):
    """A side call's request is not a valid protobuf message."""


class _Ending(Exception):
    """The server is stopping: a stream ends."""


ENDING_MESSAGE = "the server is shutting down; open the stream again"


class _Unknown(Exception):
    """A health Check the server asked itself named a service health does not know."""


class _Asking:
    """The context of a health Check the server asks itself: its NOT_FOUND is _Unknown."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Unknown


class _Written:
    """A Watch stream's context, keeping the last status the watcher wrote on it."""

    def __init__(self, context: ServicerContext[Any, Any]) -> None:
        self._context = context
        self.status: int | None = None
        self.changed = asyncio.Event()

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self.status = message.status
        self.changed.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _next(requests: AsyncIterator[Any]) -> Any:
    return await anext(requests)


async def _until(task: asyncio.Future[Any], event: asyncio.Event) -> None:
    """Wait until `task` is done or `event` is set."""
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((task, waiting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()


_NOT_A_MESSAGE = object()  # what the tolerant deserializer hands on for bytes that do not parse


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, handing bytes that do not parse on as _NOT_A_MESSAGE: grpc
    answers a deserializer's exception UNKNOWN, naming a Python class (RerankService's
    methods answer INVALID_ARGUMENT: edge.py)."""
    if parse is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _NOT_A_MESSAGE

    return tolerant


class SideCalls(grpc.GenericRpcHandler):
    """The health and reflection services, each call within its kind's bound."""

    def __init__(self, limits: SideCallLimits) -> None:
        self.limits = limits
        self.checks = _Slots("health checks", "--max-health-checks", limits.checks)
        self.streams = _Slots("watch and reflection streams", "--max-watch-streams", limits.streams)
        self._handlers: dict[str, Handler] = {}
        self._refusals = RateLimit(CALLER_LOG_INTERVAL)
        self._health: health_aio.HealthServicer | None = None
        self._ending = asyncio.Event()  # set by end_streams

    def add_health(self, servicer: health_aio.HealthServicer) -> None:
        self._health = servicer
        captured = _Captured()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, captured)
        self._wrap(captured.handlers, watch=True)

    def add_registered(self, register: Callable[[Any], None]) -> None:
        """Serve what `register(server)` would add to a server (reflection's helper)."""
        captured = _Captured()
        register(captured)
        self._wrap(captured.handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._handlers.get(handler_call_details.method)

    def end_streams(self) -> None:
        """End every Watch and reflection stream, and any opened from now on (UNAVAILABLE):
        the server is stopping, and grpc's stop would wait the whole grace for them. A Watch
        ends once its client has been sent the status health says now (enter_graceful_shutdown
        has made it NOT_SERVING), a reflection stream between two requests."""
        self._ending.set()

    def _wrap(self, handlers: dict[str, Handler], *, watch: bool = False) -> None:
        for path, handler in handlers.items():
            if handler.response_streaming:
                self._handlers[path] = grpc.stream_stream_rpc_method_handler(
                    self._streaming(path, handler, watch=watch and not handler.request_streaming),
                    request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
            else:
                self._handlers[path] = grpc.stream_unary_rpc_method_handler(
                    self._unary(path, handler),
                    request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )

    def _unary(self, path: str, handler: Handler) -> Callable[..., Any]:
        behavior: Any = handler.unary_unary  # grpc's stubs type handlers as synchronous

        async def call(requests: AsyncIterator[Any], context: ServicerContext[Any, Any]) -> Any:
            await self._take(self.checks, path, context)
            try:
                request = await self._first(requests, context)
                return await behavior(request, context)
            finally:
                self.checks.give()

        return call

    def _streaming(self, path: str, handler: Handler, *, watch: bool) -> Callable[..., Any]:
        """`watch`: the handler is health's Watch, which writes the status each time it changes."""
        request_streaming = handler.request_streaming
        behavior: Any = handler.stream_stream if request_streaming else handler.unary_stream

        async def call(requests: AsyncIterator[Any], context: ServicerContext[Any, Any]) -> None:
            await self._take(self.streams, path, context)
            try:
                if request_streaming:
                    argument: Any = self._each_in_time(requests)
                else:
                    argument = await self._first(requests, context, stream=True)
                async with asyncio.timeout(self.limits.stream_max_age):
                    if watch:
                        await self._watch(behavior, argument, context)
                        return
                    answers = behavior(argument, context)
                    if inspect.isasyncgen(answers):  # else it writes through the context itself
                        async for answer in answers:
                            await context.write(answer)
                    else:
                        await answers
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the stream reached its maximum age of {self.limits.stream_max_age:g} s "
                    "(--watch-stream-max-age); open it again",
                )
            except _Expired:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._expired_message())
            except _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
            except _Ending:
                await context.abort(grpc.StatusCode.UNAVAILABLE, ENDING_MESSAGE)
            finally:
                self.streams.give()

        return call

    async def _watch(self, behavior: Any, request: Any, context: ServicerContext[Any, Any]) -> None:
        """Health's Watch, until the server stops: then _Ending, once the watcher has written
        the status health says now, so that its client sees NOT_SERVING before the end (the
        watcher writes it in its own time, after enter_graceful_shutdown woke it)."""
        written = _Written(context)
        watching = asyncio.ensure_future(behavior(request, written))
        try:
            await _until(watching, self._ending)
            while not watching.done() and written.status != await self._status_now(request):
                written.changed.clear()
                await _until(watching, written.changed)
            if watching.done():
                watching.result()  # its error, if it failed
                return
            raise _Ending
        finally:
            if not watching.done():
                watching.cancel()
                await asyncio.wait((watching,))

    async def _status_now(self, request: Any) -> int:
        """The status a health Check of the watched service answers now."""
        assert self._health is not None
        try:
            answer = await self._health.Check(request, _Asking())
        except _Unknown:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return int(answer.status)

    async def _take(self, slots: _Slots, path: str, context: ServicerContext[Any, Any]) -> None:
        if slots.take():
            return
        left_out = self._refusals.allow(path)  # a caller can cause these
        if left_out is not None:
            _log.warning(
                "side call refused",
                method=path,
                limit=slots.capacity,
                setting=slots.setting,
                left_out=left_out,
            )
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{slots.capacity} {slots.kind} open ({slots.setting}); retry shortly",
        )

    async def _next_in_time(self, requests: AsyncIterator[Any], *, stream: bool = False) -> Any:
        """The next request, or _Expired past --side-call-timeout (StopAsyncIteration at the
        end); a `stream`'s, or _Ending once the server stops first."""
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                request = await (self._unless_ending(requests) if stream else anext(requests))
        except TimeoutError:
            raise _Expired from None
        if request is _NOT_A_MESSAGE:
            raise _Undecodable
        return request

    async def _unless_ending(self, requests: AsyncIterator[Any]) -> Any:
        """A stream's next request, or _Ending once the server stops first."""
        if self._ending.is_set():
            raise _Ending
        reading = asyncio.ensure_future(_next(requests))
        try:
            await _until(reading, self._ending)
        except BaseException:  # cancelled: its client went, or the timeout above
            reading.cancel()
            raise
        if not reading.done():
            reading.cancel()
            raise _Ending
        return reading.result()

    async def _first(
        self, requests: AsyncIterator[Any], context: ServicerContext[Any, Any], *, stream: bool = False
    ) -> Any:
        try:
            return await self._next_in_time(requests, stream=stream)
        except _Ending:
            await context.abort(grpc.StatusCode.UNAVAILABLE, ENDING_MESSAGE)
        except _Expired:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._expired_message())
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST_MESSAGE)
        except _Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)

    async def _each_in_time(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        while True:
            try:
                request = await self._next_in_time(requests, stream=True)
            except StopAsyncIteration:
                return
            yield request

    def _expired_message(self) -> str:
        return f"no request within {self.limits.request_timeout:g} s (--side-call-timeout)"
