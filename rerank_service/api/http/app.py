"""The HTTP front door's routes: the rerank APIs existing SDKs speak, translated to and
from the call pipeline (pipeline/call.py) that gRPC calls go through too.

A rerank route takes the pipeline's steps in this order: the call opened (its request
id); the caller's key (from the headers alone, before the body is read); the body's
headers (its length, its type, and no compression: a gzip body is refused, never
inflated past what admission charged); admission of its bytes (a body that would not
be admitted is not read; the bodies still arriving of one caller, or one client address,
hold at most its share of the budget: admission.py); the body, bounded in size and
time; the call's admission slot, taken only now, so a body trickling in holds bytes but
never a slot a working call needs (a call held back at `Expect: 100-continue`, no room
when its headers came, is refused, its connection closed, or takes a slot freed meanwhile;
one that may wait for its slot sends its body first, as any call); JSON, then the wire
format's fields; the engine; the answer or the error in the route's format, its status
mapped once (statuses.py); the pipeline records the call once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
from aiohttp import HttpVersion11, hdrs, web

from rerank_service.api.http import openapi
from rerank_service.api.http.formats import COHERE, COMPATIBLE, NATIVE, BadRequest, Json, WireFormat
from rerank_service.api.http.statuses import (
    dashscope_code,
    http_status,
    retry_after_header,
    retry_after_seconds,
)
from rerank_service.core.domain import (
    Attempted,
    CacheOutcome,
    CallContext,
    RerankOutcome,
    RerankRequest,
    ServiceError,
    invalid_argument,
)
from rerank_service.observability.trace_context import trace_context
from rerank_service.pipeline.admission import SlotWait
from rerank_service.pipeline.auth import bearer_token
from rerank_service.pipeline.cache_control import cache_mode
from rerank_service.pipeline.call import Call, Pipeline, body_holder
from rerank_service.pipeline.callers import Caller, certificate_identities
from rerank_service.pipeline.record import (
    CACHE_KEY,
    DEPLOYMENT_KEY,
    REQUEST_ID_KEY,
    UPSTREAM_IDS_KEY,
    USAGE_SOURCE_KEY,
    reported_ids,
)

NATIVE_PATH = "/api/v1/services/rerank/text-rerank/text-rerank"
COMPATIBLE_PATH = "/compatible-api/v1/reranks"
RERANK_ROUTES: dict[str, WireFormat] = {
    NATIVE_PATH: NATIVE,
    COMPATIBLE_PATH: COMPATIBLE,
    "/v1/rerank": COHERE,
    "/v2/rerank": COHERE,
}
MODELS_PATH = "/v1/models"
JSON_TYPE = "application/json"
# Every answer's `Server` header, the HTTP parser's 400s included (server.py): not aiohttp's
# default, which tells every caller the exact Python and aiohttp versions.
SERVER_NAME = "rerank-service"
# Where an HTTP caller's key goes, as a refusal names it.
KEY_CARRIER = "'Authorization: Bearer <key>' header"
# Where a request keeps the caller it was authenticated as.
_CALLER = web.RequestKey("caller", Caller)
# Set on a call that sent `Expect: 100-continue` and was not told to continue: the expect
# handler found it would be refused, so it is refused from its headers.
_HELD_BACK = web.RequestKey("held_back", bool)
# The interim answer that tells an `Expect: 100-continue` client to send its body.
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TRACE_HEADERS = ("traceparent", "tracestate")


class FrontDoor:
    """The routes, bound to the engine and the limits the gRPC server uses too."""

    def __init__(
        self,
        pipeline: Pipeline,
        ready: Callable[[], bool],
        live: Callable[[], bool],
        max_body_bytes: int,
        body_timeout: float,
        call_timeout: float,
    ) -> None:
        self._pipeline = pipeline
        self._admission = pipeline.admission
        self._ready = ready
        self._live = live
        self._max_body_bytes = max_body_bytes
        self._body_timeout = body_timeout
        # The deadline of every call (an HTTP caller sends none): the engine, the router and the
        # upstream client cut their work to it, as they do for a gRPC caller's deadline.
        self._call_timeout = call_timeout
        self._models_measured = pipeline.metrics.for_http_route(MODELS_PATH)

    def application(self) -> web.Application:
        # client_max_size: aiohttp's own bound on a body read (a larger one is 413).
        app = web.Application(
            middlewares=[_json_for_unrouted],
            client_max_size=self._max_body_bytes,
            handler_args={"max_field_size": 16384},
        )
        for path, wire in RERANK_ROUTES.items():
            handle = self._rerank_route(path, wire)
            app.router.add_post(path, handle, expect_handler=self._expect(handle))
        app.router.add_get(MODELS_PATH, self._models)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/openapi.json", self._openapi)
        app.on_response_prepare.append(_name_the_server)
        return app

    def _rerank_route(self, path: str, wire: WireFormat) -> Callable[[web.Request], Awaitable[web.Response]]:
        measured = self._pipeline.metrics.for_http_route(path)

        async def handle(http: web.Request) -> web.Response:
            pipeline = self._pipeline
            trace = trace_context(_trace_headers(http))
            call = pipeline.open(f"HTTP POST {path}", http.remote or "", measured, trace=trace)
            try:
                response = await answer(http, call)
                call.http_status = response.status
                return response
            except asyncio.CancelledError:  # the client hung up: logged as nginx names it
                call.http_status = 499
                raise
            finally:
                call.finish()

        async def answer(http: web.Request, call: Call) -> web.Response:
            try:
                try:
                    context = self._authenticate(
                        http, time.monotonic() + self._call_timeout, call.trace, call.attempted
                    )
                    call.caller = http[_CALLER]
                    self._check_body_headers(http)
                    call.admit_bytes(http.content_length or 0)
                    slot_taken = False
                    if http.get(_HELD_BACK):  # the client waits for a word before it sends the body
                        # Nothing has run since the expect handler saw no slot, so this refuses, or
                        # takes the slot, or finds it may wait for one: then, as any call, its
                        # body comes first (a body that never comes holds no working slot).
                        try:
                            call.admit_call()
                            slot_taken = True
                        except SlotWait:
                            pass
                        await _tell_to_continue(http)
                    raw = await self._body(http)
                    call.arrived()  # its bytes stay charged, no longer as arriving
                    if not slot_taken:
                        try:
                            call.admit_call()  # the slot, now that the body is here (its bytes are charged)
                        except SlotWait as wait:  # every slot taken, some by a caller past its share
                            await call.admitted(wait, _left(context))
                    body = _json(raw)
                    try:
                        request = wire.parse(body)
                    except BadRequest:
                        # Read but not valid: metered for its caller, as the gRPC door meters
                        # a request its validation refuses.
                        call.model = _model_named(body)
                        raise
                    outcome = await call.rerank(request, context)
                    call.succeeded()
                    return self._answer(wire, outcome, request, body, call.request_id)
                except BadRequest as bad:
                    raise invalid_argument(bad.violations) from None
            except ServiceError as error:
                call.failed(error)
                reported = error.upstream_request_id or call.request_id
                return self._refuse(wire, http_status(error), error, reported)
            except _HttpError as error:
                call.failed_with(error.code, error.message)
                return self._json_response(
                    wire.error(dashscope_code(error.status), error.message, call.request_id),
                    error.status,
                    call.request_id,
                )
            except Exception:
                bug = call.bug()
                return self._json_response(
                    wire.error("InternalError", bug.message, call.request_id), 500, call.request_id
                )

        return handle

    def _expect(
        self, handle: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
        """`Expect: 100-continue`: the client waits to send its body until told to. A call
        that will be refused from its headers alone (its key, its length, its type,
        admission) is answered at once, so the body is never sent; the others are told to
        continue. An HTTP/1.0 request's expectation is ignored (RFC 9110 10.1.1): it has no
        1xx answers, and its call goes on as one without it."""

        async def expect(http: web.Request) -> web.StreamResponse | None:
            if http.version < HttpVersion11 or http.headers.get("Expect", "").lower() != "100-continue":
                return None
            try:
                self._authenticate(http)
                self._check_body_headers(http)
                size = http.content_length or 0
                holder = body_holder(http[_CALLER], http.remote or "")
                refused = not (self._admission.has_room(size) and self._admission.body_fits(size, holder))
            except (ServiceError, _HttpError):
                refused = True
            if refused:
                http[_HELD_BACK] = True
                response = await handle(http)  # refuses from the headers, and logs it, as any call
                if response.status >= 400:
                    # Its body was never asked for: the client may send it or not, so the
                    # connection cannot go on (what it sends next could be read as either).
                    response.force_close()
                    response.headers[hdrs.CONNECTION] = "close"
                return response
            # A client gone already (_HttpError): its route goes on as any call's, finds so
            # reading the body (or is cancelled), and logs it CANCELLED as any whose client left.
            with contextlib.suppress(_HttpError):
                await _tell_to_continue(http)
            return None

        return expect

    def _check_body_headers(self, http: web.Request) -> None:
        """The body's encoding, declared length and type, before anything is read or admitted for it."""
        encoding = http.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Admission charges the bytes sent; inflating them could hold hundreds of times more.
            message = f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed"
            raise _HttpError(415, grpc.StatusCode.INVALID_ARGUMENT, message)
        if http.content_length is None:  # the bytes to admit must be known first
            raise _HttpError(411, grpc.StatusCode.INVALID_ARGUMENT, "a Content-Length header is required")
        if http.content_length > self._max_body_bytes:
            raise self._too_large()
        if http.content_type != JSON_TYPE:
            got = http.content_type or "none"
            raise _HttpError(
                415, grpc.StatusCode.INVALID_ARGUMENT, f"Content-Type must be {JSON_TYPE}, got {got!r}"
            )

    def _too_large(self) -> _HttpError:
        message = f"the body is larger than {self._max_body_bytes} bytes (--max-message-bytes)"
        return _HttpError(413, grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _authenticate(
        self,
        http: web.Request,
        deadline: float | None = None,
        trace: tuple[str | None, str | None] = (None, None),
        attempted: Attempted | None = None,
    ) -> CallContext:
        """The caller (kept with the request for its call) and what its call carries; `trace`:
        the trace context read when the call opened, `attempted` its record of where it was
        sent (pipeline/call.py)."""
        headers = list(http.headers.items())
        token = bearer_token(headers)
        http[_CALLER] = self._pipeline.authenticate(token, KEY_CARRIER, self._peer_identities(http))
        traceparent, tracestate = trace
        return CallContext(
            deadline=deadline,
            bearer_token=token,
            traceparent=traceparent,
            tracestate=tracestate,
            cache_mode=cache_mode(headers),
            attempted=attempted,
        )

    def _peer_identities(self, http: web.Request) -> list[str]:
        """The client certificate's identities (mTLS), where callers are known by them: its
        URI SANs, or its subject CN."""
        if not self._pipeline.callers.identifies_peers or http.transport is None:
            return []
        certificate = http.transport.get_extra_info("peercert") or {}
        uris = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "URI"]
        names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
        return certificate_identities(uris, names[0] if names else None)

    async def _body(self, http: web.Request) -> bytes:
        try:
            # A client that sends its body a byte a second must not hold a slot for ever.
            async with asyncio.timeout(self._body_timeout):
                raw = await http.read()
        except TimeoutError:
            message = f"the body did not arrive within {self._body_timeout:g} s"
            raise _HttpError(408, grpc.StatusCode.DEADLINE_EXCEEDED, message) from None
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        except ConnectionResetError:
            # The client went away before its body was in: its call, not a bug of ours
            # (logged as any call, 499 as nginx names it; nobody reads the answer).
            message = "the client closed the connection before its body arrived"
            raise _HttpError(499, grpc.StatusCode.CANCELLED, message) from None
        return raw

    def _answer(
        self, wire: WireFormat, outcome: RerankOutcome, request: RerankRequest, body: Any, request_id: str
    ) -> web.Response:
        reported = outcome.upstream_request_id or request_id
        response = self._json_response(wire.render(outcome, request, reported, body), 200, reported)
        response.headers[USAGE_SOURCE_KEY] = outcome.usage_source
        if outcome.deployments:
            response.headers[DEPLOYMENT_KEY] = ",".join(outcome.deployments)
        if outcome.upstream_request_ids:
            response.headers[UPSTREAM_IDS_KEY] = reported_ids(outcome.upstream_request_ids)
        if outcome.cache is not CacheOutcome.OFF:
            response.headers[CACHE_KEY] = outcome.cache.value
        return response

    def _refuse(self, wire: WireFormat, status: int, error: ServiceError, request_id: str) -> web.Response:
        body = wire.error(dashscope_code(status, error), error.message, request_id)
        if error.quota_violations:  # a caller's limit: google.rpc's QuotaFailure and RetryInfo, as JSON
            body.update(quota_fields(error))
        response = self._json_response(body, status, request_id)
        retry_after = retry_after_header(error)
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after

        if error.deployment:
            response.headers[DEPLOYMENT_KEY] = error.deployment
        return response

    @staticmethod
    def _json_response(body: Json, status: int, request_id: str) -> web.Response:
        return web.Response(
            body=orjson.dumps(body),
            status=status,
            content_type=JSON_TYPE,
            headers={REQUEST_ID_KEY: request_id},
        )

    async def _models(self, http: web.Request) -> web.Response:
        # A call of the pipeline as a rerank route's is (its access-log line and metrics, as
        # gRPC ListModels has): a key guessed here leaves a trace. It only lists, so it takes
        # no admission slot.
        trace = trace_context(_trace_headers(http))
        call = self._pipeline.open(
            f"HTTP GET {MODELS_PATH}", http.remote or "", self._models_measured, trace=trace
        )
        try:
            response = self._list_models(http, call)
            call.http_status = response.status
            return response
        finally:
            call.finish()

    def _list_models(self, http: web.Request, call: Call) -> web.Response:
        request_id = call.request_id
        try:
            self._authenticate(http)
            call.caller = http[_CALLER]
            data = self._models_shown(call.caller)
        except ServiceError as error:
            call.failed(error)
            return self._json_response({"message": error.message, "request_id": request_id}, 401, request_id)
        except Exception:
            bug = call.bug()
            return self._json_response({"message": bug.message, "request_id": request_id}, 500, request_id)
        call.succeeded()
        return self._json_response({"object": "list", "data": data}, 200, request_id)

    def _models_shown(self, caller: Caller) -> list[Json]:
        """What GET /v1/models lists: the models `caller` may call, as ListModels does."""
        return [
            {
                "id": model.name,
                "object": "model",
                "owned_by": "rerank-service",
                "max_documents": model.max_documents,
                "max_query_tokens": model.max_query_tokens,
                "supports_instruct": model.supports_instruct,
                "backend": model.backend,
                "deployments": [
                    {
                        "name": deployment.name,
                        "backend": deployment.backend,
                        "format": deployment.format,
                        "upstream_url": deployment.upstream_url,
                        "priority": deployment.priority,
                        "weight": deployment.weight,
                        "state": deployment.state.value,
                    }
                    for deployment in model.deployments
                ],
            }
            for model in self._pipeline.engine.models()
            if caller.may_call(model.name)  # a caller sees only what it may call
        ]

    async def _healthz(self, http: web.Request) -> web.Response:
        live = self._live()
        return web.json_response({"status": "ok" if live else "draining"}, status=200 if live else 503)

    async def _readyz(self, http: web.Request) -> web.Response:
        ready = self._ready()
        return web.json_response({"status": "ready" if ready else "not ready"}, status=200 if ready else 503)

    async def _openapi(self, http: web.Request) -> web.Response:
        return web.json_response(openapi.document())


def quota_fields(error: ServiceError) -> Json:
    """A refusal for a caller's limit in JSON: which quota (google.rpc.QuotaFailure's
    violations), whose and which limit, and when a retry can succeed (RetryInfo)."""
    violations = [{"subject": v.subject, "description": v.description} for v in error.quota_violations]
    fields: Json = {"quota_violations": violations}
    fields.update({key: error.metadata[key] for key in ("caller", "limit") if key in error.metadata})
    seconds = retry_after_seconds(error)
    if seconds is not None:
        fields["retry_after_seconds"] = round(seconds, 3)
    return fields


async def _tell_to_continue(http: web.Request) -> None:
    """Sends `100 Continue` to an `Expect: 100-continue` client. One that reset its connection
    after its headers cannot be told (aiohttp: "Cannot write to closing transport"): it is
    gone, as one gone while its body arrives is (`FrontDoor._body`), not a bug of ours."""
    try:
        await http.writer.write(_CONTINUE)
    except ConnectionResetError:
        message = "the client closed the connection before it was told to send its body"
        raise _HttpError(499, grpc.StatusCode.CANCELLED, message) from None


def _left(context: CallContext) -> float | None:
    """Seconds left to the call's deadline (None: none)."""
    return None if context.deadline is None else context.deadline - time.monotonic()


def _model_named(body: Any) -> str:
    """The model a request body names, "" when it names none (as an empty proto field reads)."""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _HttpError(
            400, grpc.StatusCode.INVALID_ARGUMENT, f"the body is not valid JSON: {exc}"
        ) from None


@web.middleware
async def _json_for_unrouted(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A path or a method no route has: JSON like every other answer, not aiohttp's text."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as refused:
        if refused.status == 404:
            message = f"no route {request.method} {request.path}"
        else:
            message = f"{request.method} is not allowed on {request.path}"
        headers = {"Allow": refused.headers["Allow"]} if "Allow" in refused.headers else None
        body = {"code": dashscope_code(refused.status), "message": message}
        return web.json_response(body, status=refused.status, headers=headers)


def _trace_headers(http: web.Request) -> list[tuple[str, str]]:
    """The W3C trace context headers, named in lower case whatever case the client wrote
    (Go's net/http sends `Traceparent`), for trace_context."""
    headers = http.headers
    return [(name, value) for name in _TRACE_HEADERS for value in headers.getall(name, ())]


async def _name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


class _HttpError(Exception):
    """A request the HTTP layer refuses before the engine sees it (media type, size, time, JSON):
    its HTTP status, and the code the access log and metrics name it by."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
