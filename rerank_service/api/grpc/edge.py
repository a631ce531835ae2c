"""The gRPC adapter of every RerankService call: it registers the contract's methods with
grpc and takes each call through the pipeline (pipeline/call.py), translating its steps'
results to gRPC: a status with `google.rpc` details (status.py), trailing metadata.

Authentication comes first, from the metadata alone, when grpc routes the call: a call
without an accepted key goes to a refusal that never reads its request. Every method is
registered as request-streaming, so grpc hands a call to the edge as soon as it arrives,
not once its request has (a unary call and a client-streaming call of one message are
the same on the wire): a unary call opens its pipeline call, is counted open (in its
caller's share of --max-open-calls too, as a stream is, until it holds its slot), reads
its one request within --stream-idle-timeout, is admitted (a request that would be
refused is not even parsed), runs the servicer's method, which hands the engine's work
to the pipeline and returns an `Answer`, and is answered with its status and trailing
metadata; the pipeline records it once. A call whose request never comes is thus counted, bounded in
time and logged, where grpc's own unary handling held it unseen, in one of grpc's open
calls (the room health checks have beside RerankService's included). A stream is one
call in the pipeline (counted open; its items take slots and bytes while in flight:
`_StreamItems`), and each of its items is a call of its own, opened by the servicer; the
edge writes its answers, each within --stream-idle-timeout (a client that does not read
ends the stream, `_write_answers`).

The methods are read from the contract's descriptor, so a new RPC is wrapped the same
way (and start-up fails if the servicer lacks it, or if it has a shape the edge does
not serve yet: client streaming with one answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc.aio import ServicerContext
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.status import Metadata, error_metadata
from rerank_service.api.grpc.tls import certificate_names
from rerank_service.core.domain import NO_TIMINGS, CacheOutcome, RerankOutcome, ServiceError, Timings
from rerank_service.observability.trace_context import trace_context
from rerank_service.pipeline.admission import Admission, SlotWait
from rerank_service.pipeline.auth import bearer_token
from rerank_service.pipeline.call import Call, Pipeline, unauthenticated
from rerank_service.pipeline.callers import Caller, CallerDirectory, certificate_identities
from rerank_service.pipeline.record import (
    CACHE_KEY,
    DEPLOYMENT_KEY,
    INFERENCE_TIME_KEY,
    QUEUE_TIME_KEY,
    REQUEST_ID_KEY,
    TOTAL_TIME_KEY,
    UPSTREAM_IDS_KEY,
    UPSTREAM_TIME_KEY,
    USAGE_SOURCE_KEY,
    reported_ids,
)

Response = TypeVar("Response")
T = TypeVar("T")
SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["RerankService"]

UNDECODABLE_MESSAGE = (
    "the request is not a valid protobuf message (bad encoding or invalid UTF-8 in a string)"
)
# A call its client half-closed before sending its one request.
NO_REQUEST_MESSAGE = "the call ended without its request"


@dataclass(frozen=True, slots=True)
class Answer(Generic[Response]):
    """What a servicer method returns: the response, and the outcome it was built from."""

    message: Response
    outcome: RerankOutcome | None = None


class _Undecodable:
    """What a request message that does not parse is handed on as: grpc would answer
    UNKNOWN; the edge answers INVALID_ARGUMENT."""


_UNDECODABLE = _Undecodable()


@dataclass(frozen=True, slots=True)
class _Received:
    """A request message, and how many bytes it came in (admission counts them)."""

    message: Any
    size: int


@dataclass(frozen=True, slots=True)
class _Unparsed:
    """A unary request that arrived while admission had no room for it: not parsed (a
    refusal then costs no parsing), unless there is room by the time its call starts."""

    data: bytes
    parse: Callable[[bytes], _Received | _Undecodable]

    @property
    def size(self) -> int:
        return len(self.data)


def _tolerant(
    parse: Callable[[bytes], Any], admission: Admission | None = None
) -> Callable[[bytes], _Received | _Unparsed | _Undecodable]:
    """The method's deserializer: a message that does not parse is handed on, not raised;
    with `admission` (unary methods), one that would be refused is not parsed at all."""

    def tolerant(data: bytes) -> _Received | _Undecodable:
        try:
            return _Received(parse(data), len(data))
        except DecodeError:
            return _UNDECODABLE

    if admission is None:
        return tolerant

    def deferring(data: bytes) -> _Received | _Unparsed | _Undecodable:
        return tolerant(data) if admission.has_room(len(data)) else _Unparsed(data, tolerant)

    return deferring


# Where a gRPC caller's key goes, as a refusal names it.
KEY_CARRIER = "'authorization: Bearer <key>' metadata"


def _undecodable() -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)


def answer_too_large(size: int, limit: int, outcome: RerankOutcome | None = None) -> ServiceError:
    """An answer grpc would refuse to send (`--max-message-bytes` bounds both ways): said as
    the call's own failure, so it is logged and metered as one (grpc's refusal comes after
    the call has been recorded as answered, and ends a whole stream). With the `outcome`
    that was too large, the error names the deployments that answered and their time, as
    any failed call that reached a deployment does."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the answer is {size} bytes, more than --max-message-bytes ({limit}): ask for fewer "
        "results (top_n) or without the documents' text (return_documents false)",
        reason="ANSWER_TOO_LARGE",
        timings=NO_TIMINGS if outcome is None else outcome.timings,
        deployment=",".join(outcome.deployments) if outcome is not None and outcome.deployments else None,
    )


class _Routes(grpc.GenericRpcHandler):
    """RerankService's methods by path; a call without an accepted key gets the refusal
    handler of its method instead, chosen from the metadata alone. Where callers are also
    known by their client certificates, which the metadata does not show, a call without
    an accepted key is let through to be identified by its certificate (or refused) when
    it starts: mTLS has already let only clients of the configured CA connect."""

    def __init__(
        self,
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
        refusals: dict[tuple[str, bool], grpc.RpcMethodHandler[Any, Any]],
        callers: CallerDirectory,
    ) -> None:
        self._handlers = handlers
        self._refusals = refusals
        self._callers = callers

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._handlers.get(handler_call_details.method)
        callers = self._callers
        if handler is None or not callers.enabled or callers.identifies_peers:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if callers.accepts(token):
            return handler
        return self._refusals[handler_call_details.method, token is None]


# Server streaming → grpc's handler for that shape, request-streaming always: grpc then runs
# the handler as soon as the call arrives (a unary one's request is read by the edge).
_HANDLER_FACTORIES: dict[bool, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    False: grpc.stream_unary_rpc_method_handler,
    True: grpc.stream_stream_rpc_method_handler,
}


class RerankServiceEdge:
    def __init__(
        self,
        pipeline: Pipeline,
        backend_time_key: str,
        stream_idle_timeout: float,
        max_answer_bytes: int | None = None,
    ) -> None:
        self._pipeline = pipeline
        # The largest unary answer grpc may send (None: no bound); a stream's items are the
        # servicer's to bound, as an item's failure is an answer on the stream.
        self._max_answer_bytes = max_answer_bytes
        self._admission = pipeline.admission
        self._callers = pipeline.callers
        self._stream_idle_timeout = stream_idle_timeout
        # The unary calls reading their request, each ended past the same bound.
        self._reads = _RequestReads(stream_idle_timeout)
        # x-inference-time for a local backend, x-upstream-time for an upstream one.
        self._backend_time_key = backend_time_key
        # The server's drain, as the RerankStreams open see it (`drain`).
        self._drain = _Drain()

    def drain(self) -> None:
        """The server is shutting down: each RerankStream takes no new item (one read is
        answered UNAVAILABLE), its items in flight are finished and sent, then it ends
        UNAVAILABLE (OK if its client half-closed meanwhile). An idle stream ends at once:
        none holds grpc's drain for the whole grace, or starts work the grace would cut.
        So does a unary call still waiting for its request (UNAVAILABLE: it never ran)."""
        self._drain.begin()
        self._reads.drain()

    def handler(self, servicer: object) -> grpc.GenericRpcHandler:
        """grpc's handler for every RerankService method of `servicer`, each behind the edge."""
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        refusals: dict[tuple[str, bool], grpc.RpcMethodHandler[Any, Any]] = {}
        for method in SERVICE.methods:
            if method.client_streaming and not method.server_streaming:
                # _unary reads one request; such a method needs the stream's checks first.
                raise NotImplementedError(f"the edge does not serve client-streaming {method.name} yet")
            behavior = getattr(servicer, method.name)
            path = f"/{SERVICE.full_name}/{method.name}"
            message_class = message_factory.GetMessageClass(method.input_type)
            parse = _tolerant(message_class.FromString, None if method.client_streaming else self._admission)
            # A unary method's answer is serialized by the edge, which checks its size (grpc
            # sends bytes as they are); a stream's items by grpc.
            serialize = (
                message_factory.GetMessageClass(method.output_type).SerializeToString
                if method.server_streaming
                else None
            )
            wrapped = self._stream(path, behavior) if method.server_streaming else self._unary(path, behavior)
            factory = _HANDLER_FACTORIES[method.server_streaming]
            handlers[path] = factory(wrapped, request_deserializer=parse, response_serializer=serialize)
            # A call without an accepted key is refused before its message is read: as a
            # handler that never reads, grpc neither buffers nor parses the body (a 15 MB
            # request without a key costs nothing). Logged and counted like any call. A new
            # error each call: one raised again and again would gather every call's frames
            # in its traceback, and hold them (and each call's state) for good.
            for missing in (True, False):
                refusal = functools.partial(unauthenticated, missing, KEY_CARRIER)
                refusing = (
                    self._stream(path, behavior, refusal)
                    if method.server_streaming
                    else self._unary(path, behavior, refusal)
                )
                refusals[path, missing] = factory(
                    refusing, request_deserializer=parse, response_serializer=serialize
                )
        return _Routes(handlers, refusals, self._callers)

    def _unary(
        self,
        path: str,
        behavior: Callable[[Any, ServicerContext[Any, Any], Call], Awaitable[Answer[Any]]],
        refusal: Callable[[], ServiceError] | None = None,
    ) -> Callable[[Any, ServicerContext[Any, Any]], Awaitable[Any]]:
        """The edge around one unary method, registered as request-streaming (it reads the
        one request itself); with `refusal`, every call is refused with the error it makes,
        logged and counted, without running the method or reading the request."""
        pipeline = self._pipeline
        measured = pipeline.metrics.for_method(path)
        reads = self._reads

        async def unary(requests: Any, context: ServicerContext[Any, Any]) -> Any:
            # The peer is read now: once a deadline has cancelled the call it is gone.
            call = pipeline.open(path, context.peer(), measured, trace=_trace(context))
            ran = False
            try:
                try:
                    if refusal is not None:  # the key, checked before routing (_Routes)
                        raise refusal()
                    call.caller = self._identify(context)
                    # Open from its start, before its request has come (grpc buffers what has
                    # come of it, up to --max-message-bytes): counted against --max-open-calls
                    # and, until it holds its slot, its caller's share of them.
                    call.admit_open()
                    # Within --stream-idle-timeout, or the call's deadline (grpc ends the
                    # request then, as a half-close would), or until the server drains. As the
                    # deserializer hands it on (_Received, _Unparsed, _Undecodable: see
                    # _tolerant), or EOF.
                    received: Any = await reads.within(context.read)
                    if received is grpc.aio.EOF:  # half-closed first (or ended by grpc: below)
                        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST_MESSAGE)
                    size = received.size if isinstance(received, _Received | _Unparsed) else 0
                    try:
                        call.admit_call(size)
                    except SlotWait as wait:  # every slot taken, some by a caller past its share
                        await call.admitted(wait, context.time_remaining())
                    if isinstance(received, _Unparsed):  # room was made meanwhile
                        received = received.parse(received.data)
                    if not isinstance(received, _Received):
                        raise _undecodable()
                    ran = True
                    answer = await behavior(received.message, context, call)
                    data = answer.message.SerializeToString()
                    if self._max_answer_bytes is not None and len(data) > self._max_answer_bytes:
                        too_large = answer_too_large(len(data), self._max_answer_bytes, answer.outcome)
                        del answer, data  # not held by this frame while grpc keeps it (_abort)
                        raise too_large
                except ServiceError as error:
                    call.failed(error)
                    # Timing only for a call that ran: a refusal spent nothing worth naming.
                    failure: ServiceError | None = error
                    timed = ran
                except Exception:
                    failure, timed = call.bug(), False
                else:
                    failure = None
                if failure is not None:  # answered outside the `except`: see _abort
                    await self._abort(call, context, failure, timed)
                outcome = answer.outcome
                timings = NO_TIMINGS if outcome is None else outcome.timings
                context.set_trailing_metadata(
                    _outcome_metadata(outcome, call.request_id) + self._timing(call.started, timings)
                )
                call.succeeded()
                return data
            finally:
                _settle_ended(call, context)
                call.finish()
                # The error's traceback holds this frame, which holds the request: see Call.finish.
                received = None

        return unary

    def _stream(
        self,
        path: str,
        behavior: Callable[[Any, ServicerContext[Any, Any], Call], AsyncGenerator[Any, None]],
        refusal: Callable[[], ServiceError] | None = None,
    ) -> Callable[[Any, ServicerContext[Any, Any]], Awaitable[None]]:
        """The edge around one streaming method; `refusal` as for `_unary`. It writes each
        answer itself, within --stream-idle-timeout (`_write_answers`): an answer its client does not
        take (it does not read: HTTP/2 flow control holds the write) ends the stream, which
        then holds nothing of the server's (slots, bytes) while its client waits."""
        pipeline = self._pipeline
        measured = pipeline.metrics.for_method(path)
        idle_timeout = self._stream_idle_timeout

        async def stream(requests: Any, context: ServicerContext[Any, Any]) -> None:
            # Not unbound afterwards (scoped=False): the stream's task ends with the call, and
            # a generator may be finalised from another context, where reset() fails.
            call = pipeline.open(path, context.peer(), measured, scoped=False, trace=_trace(context))
            # A stream holds an admission slot only while items are in flight, not while it is
            # open: a stream that sends nothing holds nothing (the idle timeout ends it meanwhile).
            items = _StreamItems(
                requests,
                self._admission,
                self._stream_idle_timeout,
                time_remaining=context.time_remaining,
                drain=self._drain,
            )
            try:
                try:
                    if refusal is not None:  # the key, checked before routing (_Routes)
                        raise refusal()
                    call.caller = self._identify(context)
                    # Each item is identified again from the stream's credentials: a reload
                    # may have removed its key or changed its models or limits since.
                    # Its items' slots count against that caller's share (`_StreamItems`).
                    items.identify = lambda: self._identify(context)
                    call.admit_open()
                    # Closed before the items are: its reader and items in flight end first,
                    # so none takes budget the items' close has just given back.
                    async with contextlib.aclosing(behavior(items, context, call)) as responses:
                        await _write_answers(responses, context, idle_timeout)
                except ServiceError as error:
                    call.failed(error)
                    failure: ServiceError | None = error
                except grpc.aio.InternalError:
                    # grpc refused an answer's write: the call had ended (its client went
                    # away, or its deadline passed). grpc's to handle, as when it wrote them.
                    call.failed_with(grpc.StatusCode.CANCELLED, "the stream ended before an answer was sent")
                    raise
                except Exception:
                    failure = call.bug()
                else:
                    failure = None
                if failure is None:
                    # The stream's own id, as its log line says it (each item's answer names its own).
                    context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
                    call.succeeded()
                else:
                    # Its status set, not `abort`ed: grpc sends it once this returns. An abort
                    # waits until it is sent, after an answer its client may never take (all
                    # this stream holds held meanwhile), and grpc keeps the AbortError, with
                    # the error and its traceback, in the call's state (see _abort). Its
                    # traceback holds this frame, which holds it: a cycle, dropped now.
                    failure.__traceback__ = None
                    context.set_code(failure.code)
                    context.set_details(failure.message)
                    context.set_trailing_metadata(error_metadata(failure, call.request_id))
            finally:
                # grpc cancelled it (CancelledError, wherever it waited), or ended its requests
                # at the deadline (which reads as the client's half-close, the stream then
                # ending as answered).
                if call.code is grpc.StatusCode.OK and items.ended_at_deadline:
                    call.failed_with(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
                _settle_ended(call, context)
                items.close()
                call.finish(items=items.sent, event="stream")

        return stream

    async def _abort(
        self, call: Call, context: ServicerContext[Any, Any], error: ServiceError, timed: bool
    ) -> NoReturn:
        """End a unary call with `error` (`timed`: with where its time went). grpc keeps the
        AbortError `abort` raises in the call's state, a reference cycle only a full collection
        frees (rarely run: server.py), with what it refers to: so it is raised outside any
        `except` (else it would hold the error as its __context__), and the error keeps no
        traceback, whose frames hold the request (megabytes of documents) until then."""
        error.__traceback__ = None
        metadata = error_metadata(error, error.upstream_request_id or call.request_id)
        if timed:
            metadata += self._timing(call.started, error.timings)
        try:
            await context.abort(error.code, error.message, metadata)
        except grpc.aio.InternalError:
            # grpc had ended the call itself: it refused a request over --max-message-bytes
            # (its own RESOURCE_EXHAUSTED), or the deadline passed, either of which ends the
            # request as a half-close would. Recorded as a stream's is then: CANCELLED (or
            # DEADLINE_EXCEEDED).
            call.failed_with(grpc.StatusCode.CANCELLED, "grpc ended the call before its answer")
            raise
        raise AssertionError("abort returned")  # it always raises

    def _identify(self, context: ServicerContext[Any, Any]) -> Caller:
        """The call's caller, from its bearer token and its client certificate (mTLS), or
        UNAUTHENTICATED."""
        callers = self._callers
        token = bearer_token(context.invocation_metadata()) if callers.reads_tokens else None
        identities = peer_identities(context) if callers.identifies_peers else ()
        return self._pipeline.authenticate(token, KEY_CARRIER, identities)

    def _timing(self, started: float, timings: Timings) -> Metadata:
        """Where the call's time went, in milliseconds: total, queued, upstream and/or in the model.

        The server's own kind of backend is always named; the other kind too when a route's
        deployment of that kind served the call (a local fallback of an upstream route).
        """
        timing: Metadata = (
            (TOTAL_TIME_KEY, _ms(time.perf_counter() - started)),
            (QUEUE_TIME_KEY, _ms(timings.queue_seconds)),
        )
        if self._backend_time_key != INFERENCE_TIME_KEY or timings.upstream_spans:
            timing += ((UPSTREAM_TIME_KEY, _ms(timings.upstream_seconds)),)
        if self._backend_time_key == INFERENCE_TIME_KEY or timings.inference_seconds:
            timing += ((INFERENCE_TIME_KEY, _ms(timings.inference_seconds)),)
        return timing


# The slowest reading a stream's client is allowed, beside --stream-idle-timeout: a write
# completes only once flow control has let the whole answer through, so its bound grows
# with the answer (a client taking a large answer steadily over a slow link is reading).
MIN_READ_RATE = 64 * 1024  # bytes a second


async def _write_answers(
    responses: AsyncIterator[Any], context: ServicerContext[Any, Any], idle_timeout: float
) -> None:
    """Write a stream's answers as they come, each within `idle_timeout` plus a second per
    MIN_READ_RATE bytes of it, or the stream ends (`_answer_not_taken`). Its headers are
    sent first, alone: grpc would send them with the first answer, and once that write is
    cut short (its client does not read) it takes them for unsent, sends them again with
    the status, and core refuses that batch: the call would never end. (A timer per write:
    a stream's items are not the unary calls' hot path.)"""
    headers_sent = False
    async for response in responses:
        if not headers_sent:
            await context.send_initial_metadata(())
            headers_sent = True
        bound = idle_timeout + response.ByteSize() / MIN_READ_RATE
        timeout = asyncio.timeout(bound)
        try:
            async with timeout:
                await context.write(response)
        except TimeoutError:
            if timeout.expired():
                raise _answer_not_taken(bound) from None
            raise


# grpc's deadline timer may fire a moment before the deadline as Python's clock reads it.
_DEADLINE_SLACK = 0.05
# grpc ends a stream's requests at its deadline a few ms early by Python's clock (under
# 8 ms measured on a loaded machine); a client's own half-close that close to it is rare.
_EOF_SLACK = 0.015


def _settle_ended(call: Call, context: ServicerContext[Any, Any]) -> None:
    """A call's code as its caller is told it: one grpc cancelled at its deadline (its timer
    may fire a moment early) or that ended as answered past it is DEADLINE_EXCEEDED."""
    if call.code is grpc.StatusCode.CANCELLED:
        _ended_by_deadline(call, context)
    elif call.code is grpc.StatusCode.OK:  # answered in time, however close to the deadline
        _ended_by_deadline(call, context, slack=0.0)


def _ended_by_deadline(
    call: Call, context: ServicerContext[Any, Any], slack: float = _DEADLINE_SLACK
) -> None:
    """A call grpc ended: at its deadline (within `slack`), it is recorded DEADLINE_EXCEEDED,
    as its caller is told (else as it was: CANCELLED, the caller went away; or answered)."""
    left = context.time_remaining()
    if left is not None and left <= slack:
        call.failed_with(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")


def unsent(call: Call, context: ServicerContext[Any, Any]) -> None:
    """A RerankStream item whose answer was never sent (the stream ended first), recorded
    as the stream ended for it: DEADLINE_EXCEEDED at its deadline, else CANCELLED, however
    it was answered. Its client resends it, so it is not metered as answered; what the
    backend answered stays billed as spent, as for any call that failed after (usage.py)."""
    call.failed_with(grpc.StatusCode.CANCELLED, "the stream ended before this item's answer was sent")
    _ended_by_deadline(call, context)


class _RequestReads:
    """The unary calls reading their request, each ended (its task cancelled, REQUEST_TIMEOUT
    raised) once it has read for `bound` seconds, or once the server drains (`drain`). One timer
    serves them all, set for the oldest wait: a call costs a dict entry, where a timer of its
    own (asyncio.timeout) cost the hot path several µs a call. The calls are all on one
    loop, the server's."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        # Each waiting task, by when it began to wait: oldest first, as it was added.
        self._started: dict[asyncio.Task[Any], float] = {}
        # Tasks cancelled here, not yet told (`ended`), with the error that ends each.
        self._ended: dict[asyncio.Task[Any], ServiceError] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False

    async def within(self, wait: Callable[[], Awaitable[T]]) -> T:
        """`wait()`, awaited within the bound (and until the drain): its error past either."""
        task = self.begin()
        try:
            return await wait()
        except asyncio.CancelledError:
            ended = self.ended(task)
            if ended is not None:
                raise ended from None
            raise
        finally:
            self.end(task)

    def begin(self) -> asyncio.Task[Any]:
        """The current task begins to wait; paired with `end`. Once the server drains, a
        call's read ends before it begins (raised)."""
        task = asyncio.current_task()
        assert task is not None  # grpc runs each call in a task of its own
        if self._draining:  # came in as the drain began
            raise _drained_before_request()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._started[task] = now
        if self._timer is None:
            self._timer = loop.call_at(now + self.bound, self._expire, loop)
        return task

    def ended(self, task: asyncio.Task[Any]) -> ServiceError | None:
        """The error `task`'s CancelledError stands for when it is this bound's or the
        drain's alone (then taken back, as asyncio.timeout does); None when grpc cancelled
        the call as well."""
        error = self._ended.pop(task, None)
        if error is None:
            return None
        return error if task.uncancel() == 0 else None

    def end(self, task: asyncio.Task[Any]) -> None:
        self._started.pop(task, None)
        if self._ended:
            self._ended.pop(task, None)

    def drain(self) -> None:
        """End every wait now: a call whose request has not come holds grpc's drain (up to
        the bound, or the whole grace) for a call that never ran."""
        self._draining = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._started:
            self._ended[task] = _drained_before_request()
            task.cancel()
        self._started.clear()

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel every wait past the bound, and set the timer for the oldest one left."""
        self._timer = None
        now = loop.time()
        started = self._started
        while started:
            task, since = next(iter(started.items()))
            if since + self.bound > now:
                self._timer = loop.call_at(since + self.bound, self._expire, loop)
                return
            del started[task]
            self._ended[task] = _request_timeout(self.bound)
            task.cancel()


def _request_timeout(seconds: float) -> ServiceError:
    """The end of a unary call whose request has not come (whole) within `seconds`: grpc
    holds the call, and what has come of its request, until the edge ends it."""
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the request did not arrive within {seconds:g} s of the call's start (--stream-idle-timeout)",
        reason="REQUEST_TIMEOUT",
    )


def _answer_not_taken(seconds: float) -> ServiceError:
    """The end of a RerankStream whose client has not taken an answer in `seconds`: it does
    not read, and HTTP/2 flow control holds the write. Ended, the stream holds no slot and no
    bytes; the status is sent after that answer, should the client ever read it."""
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"an answer could not be sent in {seconds:.1f} s: the client does not read the stream "
        "(--stream-idle-timeout, and a second more per 64 KiB of the answer)",
        reason="STREAM_NOT_READ",
    )


def _server_draining() -> ServiceError:
    """The end of a RerankStream once the server drains with none of its items in flight:
    UNAVAILABLE, as grpc refuses a new call then, so that the client goes elsewhere."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down: every item read on this stream was answered; "
        "send the rest on a new stream",
    )


def _drained_before_request() -> ServiceError:
    """The end of a unary call whose request had not come when the server began to drain:
    UNAVAILABLE (it never ran), so that its client sends it elsewhere."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down and this call's request had not arrived: send it again",
    )


def _draining_item() -> ServiceError:
    """An item read once the server drains: not run (the grace would cut it), answered."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, "the server is shutting down: send this item on a new stream"
    )


class _Drain:
    """The server's drain as its RerankStreams see it: whether it has begun, and the streams
    open, each of whose reader is woken when it begins."""

    def __init__(self) -> None:
        self.begun = False
        self.streams: set[_StreamItems] = set()

    def begin(self) -> None:
        self.begun = True
        for items in list(self.streams):
            items.draining()


def _unidentified() -> Caller:
    raise RuntimeError("a stream's items are identified once the stream is")


class _StreamItems:
    """A RerankStream's requests as the servicer reads them, with the edge's rules:

    - the stream holds an admission slot while any of its items is in flight: taken with the
      item that finds none in flight, given back when the last one in flight is answered; an
      item that finds no slot is answered with the refusal (RESOURCE_EXHAUSTED, its own
      RerankError), and the stream goes on;
    - each item in flight counts as a slot its caller holds for the fair share (each is an
      upstream call of its own): past its share while others call, an item is answered
      with the fair share refusal, and the stream goes on. Its caller is as the callers
      are when the item is read (`identify`: a reload may have renamed it or changed its
      limits since the stream opened), and the item is given back under that name;
    - each item's bytes are taken from the byte budget until it is answered: while the
      budget has no room the next item is not read (the client waits, flow-controlled);
    - a request that does not parse ends the stream with INVALID_ARGUMENT;
    - while none of its items is in flight (every item read has been answered), the
      stream must send its next item within the idle timeout, or it ends with
      DEADLINE_EXCEEDED `STREAM_IDLE`: an idle stream holds no slot and no task for long;
      and its client must take each answer within it, or it ends with DEADLINE_EXCEEDED
      `STREAM_NOT_READ` (the edge's write): an item in flight, answered but not sent,
      holds its slot that long at most;
    - once the server drains (`drain`), an item read (or handed its slot, or room in the
      byte budget) is answered UNAVAILABLE without running, and once none is in flight the
      stream ends UNAVAILABLE (its client's half-close, read first, still ends it OK: the
      servicer reads on past a full window then, `when_draining`).
    """

    def __init__(
        self,
        requests: AsyncIterable[Any],
        admission: Admission,
        idle_timeout: float,
        time_remaining: Callable[[], float | None] = lambda: None,
        drain: _Drain | None = None,
    ) -> None:
        # Iterated only when the servicer first reads: grpc makes its receiver coroutine
        # then, and a stream refused before any read must not leave one unawaited.
        self._source = requests
        self._requests: AsyncIterator[Any] | None = None
        self._admission = admission
        self._idle_timeout = idle_timeout
        self._admitted = False
        # Its items in flight counted as slots their caller holds (`enter` counted the first,
        # `enter_item` each other), by the item: the name each was counted under, given back
        # under it as the item is answered, the last with the slot.
        self._counted: dict[int, str | None] = {}
        self.identify: Callable[[], Caller] = _unidentified  # an item's caller, as callers are now
        self.received = 0
        self.sent = 0
        self._last_activity = time.monotonic()
        # The bytes each item read and not yet answered holds, by the item itself (its
        # object: two items may share an id), and the items refused a slot, each answered
        # with its refusal (`refusal`) while the stream goes on.
        self._held: dict[int, int] = {}
        self._refused: dict[int, ServiceError] = {}
        # When each item read and not yet opened as a call came (perf_counter's), by the
        # item: its call's clock starts there, its waits for a slot or room included.
        self._arrived: dict[int, float] = {}
        self._closed = False
        # Its requests ended within _EOF_SLACK of its deadline: grpc ends them there, as a
        # client's half-close would (the stream then ends as answered).
        self._time_remaining = time_remaining
        self.ended_at_deadline = False
        # The server's drain, and what its reader waits on besides the next item: done when
        # the drain begins, or (draining) when its last item in flight has been answered.
        self._drain = drain if drain is not None else _Drain()
        self._drain.streams.add(self)
        self._wake: asyncio.Future[None] | None = None
        self._on_drain: list[Callable[[], None]] = []  # `when_draining`'s callbacks
        # The reader while an item waits for admission (`_unless_draining`), and whether
        # the drain has cut that wait short.
        self._waiting: asyncio.Task[Any] | None = None
        self._cut = False

    def refusal(self, item: Any) -> ServiceError | None:
        """Why `item` may not run (admission found no slot for it), or None: it may."""
        return self._refused.pop(id(item), None)

    def arrived(self, item: Any) -> float | None:
        """When `item` was read (perf_counter's), once: where its call's time starts."""
        return self._arrived.pop(id(item), None)

    def answered(self, item: Any) -> None:
        """`item`'s answer has been sent: its bytes, and the stream's slot once nothing
        else is in flight, are given back."""
        size = self._held.pop(id(item), None)
        self._refused.pop(id(item), None)  # a duplicate never asked: no entry outlives its item
        self.sent += 1
        self._last_activity = time.monotonic()
        if size:
            self._admission.give_bytes(size)
        if self._drain.begun and self.sent >= self.received:
            self.wake()  # nothing in flight: a draining stream ends now
        self._uncount(item)

    def _uncount(self, item: Any) -> None:
        """`item`, if it was counted against its caller's share, is no longer in flight: its
        count is given back under the name it was taken under, the stream's slot with the
        last one (nothing else running: its next item takes a slot again)."""
        if id(item) not in self._counted:
            return
        share = self._counted.pop(id(item))
        if self._counted:
            self._admission.release_item(share)
        else:
            self._admitted = False
            self._admission.release(0, share)

    def when_draining(self, callback: Callable[[], None]) -> None:
        """Have `callback` called once the server drains (at once if it does already)."""
        if self._drain.begun:
            callback()
        else:
            self._on_drain.append(callback)

    def draining(self) -> None:
        """The server's drain has begun: what waits for it is told, and the reader looks again."""
        callbacks, self._on_drain = self._on_drain, []
        for callback in callbacks:
            callback()
        if self._waiting is not None and not self._cut:
            self._cut = True
            self._waiting.cancel()  # an item waiting for a slot or room is answered now
        self.wake()

    def wake(self) -> None:
        """Have the reader look again (the drain began, or its last item was answered)."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def close(self) -> None:
        self._closed = True
        self._drain.streams.discard(self)
        held = sum(self._held.values())
        self._held.clear()
        self._refused.clear()
        self._arrived.clear()
        self._admission.give_bytes(held)
        counted = list(self._counted.values())
        self._counted.clear()
        self._admitted = False
        if counted:
            for share in counted[1:]:  # the items still counted, the slot's last
                self._admission.release_item(share)
            self._admission.release(0, counted[0])

    def __aiter__(self) -> _StreamItems:
        return self

    async def __anext__(self) -> Any:
        received = await self._next_or_idle()
        if not isinstance(received, _Received):
            raise _undecodable()
        item = received.message
        self._arrived[id(item)] = time.perf_counter()
        self.received += 1
        self._last_activity = time.monotonic()
        if self._refused_draining(item):
            return item
        try:
            share, capped = self._share_now()
        except ServiceError as refusal:  # a reload removed its key: refused as such, holding nothing
            self._refused[id(item)] = refusal
            return item
        if not self._admitted:
            try:
                try:
                    self._admission.enter(0, share, capped=capped, may_wait=True)
                except SlotWait as wait:  # every slot taken, some by a caller past its share
                    slot = await self._unless_draining(
                        self._admission.wait_for_slot(wait, self._time_remaining())
                    )
                    if self._closed:  # the stream ended while this item waited: its slot goes back
                        if slot:
                            self._admission.release(0, share)
                        raise StopAsyncIteration from None
                    if self._refused_draining(item):  # the drain began while it waited: its slot goes back
                        if slot:
                            self._admission.release(0, share)
                        return item
            except ServiceError as refusal:  # no slot: this item is answered with the refusal
                # Unless the drain began meanwhile: then UNAVAILABLE, not OVERLOADED's "retry
                # shortly", which would send the client back to a server shutting down.
                if not self._refused_draining(item):
                    self._refused[id(item)] = refusal
                return item
            self._admitted = True
        else:
            try:
                self._admission.enter_item(share, capped=capped)
            except ServiceError as refusal:  # its caller at its share: answered with the refusal
                self._refused[id(item)] = refusal
                return item
        self._counted[id(item)] = share
        room = await self._unless_draining(self._admission.take_bytes(received.size))
        if self._closed:  # the stream ended while this item waited for room: nothing is held
            if room:
                self._admission.give_bytes(received.size)
            raise StopAsyncIteration
        if self._refused_draining(item):  # the drain began while it waited for room: not run
            if room:
                self._admission.give_bytes(received.size)
            self._uncount(item)
            return item
        self._held[id(item)] = received.size
        return item

    def _share_now(self) -> tuple[str | None, bool]:
        """The name an item's slot counts against, and whether it is held to the fair share
        (as `Call.share_key` and `Call.share_capped` say for a call): its caller's as the
        callers are now, or UNAUTHENTICATED where a reload removed its key; none, held to
        the share, for a stream no caller is known for (`identify` unset)."""
        if self.identify is _unidentified:
            return None, True
        caller = self.identify()
        return caller.name, caller.held_to_share

    async def _unless_draining(self, wait: Awaitable[None]) -> bool:
        """Await `wait` (an admission wait: cancelled, it holds nothing), cut short when the
        drain begins: whether it ran to its end. `draining` cancels the reader, as
        asyncio.timeout does (in this task: a wait that took its slot or bytes is never
        cancelled past that point); any other cancel (the stream ended) goes on as such."""
        reader = asyncio.current_task()
        assert reader is not None
        self._waiting = reader
        try:
            await wait
        except asyncio.CancelledError:
            if self._cut and reader.uncancel() == 0:  # the drain's cancel alone
                return False
            raise
        finally:
            self._waiting = None
            self._cut = False
        return True

    def _refused_draining(self, item: Any) -> bool:
        """Whether the server drains: `item` is then answered with the refusal, holding nothing."""
        if not self._drain.begun:
            return False
        self._refused[id(item)] = _draining_item()
        return True

    async def _next_or_idle(self) -> Any:
        if self._requests is None:
            self._requests = self._source.__aiter__()
        read: asyncio.Future[Any] = asyncio.ensure_future(anext(self._requests))
        try:
            while not read.done():
                # Items in flight will be answered: wait a whole timeout, then look again.
                # None in flight: what is left of the timeout since the last item or answer.
                idle_for = time.monotonic() - self._last_activity
                busy = self.received > self.sent
                if self._drain.begun and not busy:
                    raise _server_draining()
                wait = self._idle_timeout if busy else self._idle_timeout - idle_for
                if wait <= 0:
                    raise ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the stream sent no item for {self._idle_timeout:g} s with none in flight "
                        "(--stream-idle-timeout)",
                        reason="STREAM_IDLE",
                    )
                # A future, not a task of Event.wait(): no task more per item read.
                woken = self._wake = asyncio.get_running_loop().create_future()
                await asyncio.wait({read, woken}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not read.cancelled() and isinstance(read.exception(), StopAsyncIteration):
                left = self._time_remaining()
                self.ended_at_deadline = left is not None and left <= _EOF_SLACK
            return read.result()  # StopAsyncIteration ends the iteration
        finally:
            self._wake = None
            if not read.done():
                read.cancel()
            elif not read.cancelled():
                # Ended while nobody waited (the call was cancelled meanwhile): its outcome,
                # often the stream's end, is read here so asyncio does not report it as lost.
                read.exception()


def _outcome_metadata(outcome: RerankOutcome | None, request_id: str) -> Metadata:
    if outcome is None:  # a call that reranks nothing (ListModels): its own id
        return ((REQUEST_ID_KEY, request_id),)
    reported = outcome.upstream_request_id or request_id
    metadata: Metadata = ((REQUEST_ID_KEY, reported), (USAGE_SOURCE_KEY, outcome.usage_source))
    if outcome.upstream_request_ids:
        metadata += ((UPSTREAM_IDS_KEY, reported_ids(outcome.upstream_request_ids)),)
    if outcome.deployments:
        metadata += ((DEPLOYMENT_KEY, ",".join(outcome.deployments)),)
    if outcome.cache is not CacheOutcome.OFF:
        metadata += ((CACHE_KEY, outcome.cache.value),)
    return metadata


def peer_identities(context: ServicerContext[Any, Any]) -> list[str]:
    """The client certificate's identities (mTLS): its URI SANs, or its subject CN, read
    from the certificate itself (`certificate_names`); UNAUTHENTICATED for one that holds a
    control character, or that does not parse."""
    pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
    if pem is None:
        return []  # no client certificate (TLS without --tls-client-ca, or plaintext)
    names = certificate_names(pem)
    if names is None:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the client certificate cannot be read")
    return certificate_identities(*names)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _trace(context: ServicerContext[Any, Any]) -> tuple[str | None, str | None]:
    """The caller's trace context, read once for the call: its span's parent, and what the
    upstream is sent."""
    return trace_context(context.invocation_metadata())
