"""Micro-benchmark of the service's own per-call Python work, with no network.

    .venv/bin/python -m bench.hot_path [--iterations N] [--counts 20 500]

One call's path through the service, minus gRPC, HTTP and JSON: `servicer.to_domain`,
`RerankEngine.rerank` (validate, split, the backend call, merge, rank) with an
in-memory backend whose `rerank` is the DashScope-native dialect's `parse_answer` over
an already decoded upstream answer, and `servicer.to_proto`. Beside it, each call's
bookkeeping in the call pipeline (`Pipeline.open`, admission, `Call.finish`), and its two
largest parts: the call's metrics and its access-log line (JSON, written to /dev/null,
as the service logs by default). Then all of it at once, as grpc runs it: the gRPC
method handler the service registers (the edge, the servicer, the pipeline; the request
parsed from bytes and the answer serialized), called with a stand-in for grpc's
ServicerContext, over the same backend, and over the router with the score cache in
front of it answering every pair (a hit), or full and asked only new pairs (each call a
miss whose scores are stored, evicting as many). Everything a call costs the service but
grpc's C core, the event loop's own turns and the upstream's HTTP. The request and the
answer are `bench.perf`'s (`bench/perf_payloads.py`): corpus documents of 20-40 words,
every document scored, indexes shuffled, the call limits of `qwen3-rerank` (500
documents, 120,000 tokens per upstream call).

Prints CPU µs per call (process time: what the service pays, and steadier than wall
time on a shared machine) for the whole path and for each part, the best of several
rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, NoReturn

import grpc
import orjson
from rerank.v1 import rerank_pb2

from bench.perf_payloads import request as perf_request
from bench.perf_payloads import upstream_answer
from rerank_service.api.grpc.edge import RerankServiceEdge
from rerank_service.api.grpc.servicer import RerankServicer, to_domain, to_proto
from rerank_service.backends.upstream.dashscope import DashScopeNative
from rerank_service.cache import MemoryTier, ScoreCache
from rerank_service.cache.build import build_score_cache
from rerank_service.cache.keys import KEY_SIZE
from rerank_service.config import Settings
from rerank_service.config.server import ServerConfig
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import BackendRequest, BackendResult, CallContext, ModelInfo, RerankOutcome
from rerank_service.core.engine import RerankEngine
from rerank_service.core.readiness import Readiness
from rerank_service.observability.logging import configure_logging
from rerank_service.observability.metrics import Metrics
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.call import Pipeline
from rerank_service.pipeline.callers import CallerDirectory
from rerank_service.pipeline.record import UPSTREAM_TIME_KEY, call_facts, log_call
from rerank_service.routing.cached_scores import CachedScores
from rerank_service.routing.deployment import Deployment
from rerank_service.routing.route import Member, Route
from rerank_service.routing.router import Router

MODEL = ModelInfo(
    "qwen3-rerank", max_documents=10_000, max_query_tokens=4000, supports_instruct=True, backend="bench"
)
# What the upstream backend gives qwen3-rerank (backends/upstream/backend.py).
LIMITS = CallLimits(max_documents=500, max_tokens=120_000)


class AnswerBackend:
    """Answers every call with the same decoded upstream body, checked by the dialect."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self._dialect = DashScopeNative()

    @property
    def readiness(self) -> Readiness:
        return Readiness(True)

    def models(self) -> list[ModelInfo]:
        return [MODEL]

    def call_limits(self, model: str) -> CallLimits:
        return LIMITS

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        answer = self._dialect.parse_answer(self._body, request)
        assert answer.total_tokens is not None  # the benchmark's answer reports usage
        return BackendResult(answer.scores, answer.total_tokens, answer.request_id)


METHOD, PEER = "/rerank.v1.RerankService/Rerank", "ipv4:127.0.0.1:50000"


class _Details:
    """grpc's HandlerCallDetails of a Rerank call without metadata."""

    method = METHOD
    invocation_metadata = ()


class _Context:
    """What the edge and the servicer ask of grpc's ServicerContext for a unary call: its one
    request, read (`read`) through the method's deserializer as grpc reads it."""

    trailing: object = None

    def __init__(self, request: bytes, parse: Callable[[bytes], object]) -> None:
        self._request = request
        self._parse = parse

    async def read(self) -> object:
        return self._parse(self._request)

    def peer(self) -> str:
        return PEER

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None  # no deadline

    def set_trailing_metadata(self, metadata: object) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str, metadata: object = ()) -> NoReturn:
        raise SystemExit(f"the handler failed the call: {code.name} {details}")


def grpc_handler(engine: RerankEngine, metrics: Metrics) -> Callable[[bytes], Coroutine[Any, Any, bytes]]:
    """The service's Rerank handler over `engine`, as grpc calls it: bytes in, bytes out."""
    pipeline = Pipeline(engine, Admission(1_000), CallerDirectory(), metrics)
    edge = RerankServiceEdge(pipeline, UPSTREAM_TIME_KEY, stream_idle_timeout=30.0)
    handler = edge.handler(RerankServicer(pipeline, stream_concurrency=4)).service(_Details())  # type: ignore[arg-type]
    assert handler is not None
    # Request-streaming: the edge reads the one request itself, from the context.
    parse, behave = handler.request_deserializer, handler.stream_unary
    assert behave is not None
    assert parse is not None
    assert handler.response_serializer is None  # the edge answers bytes, sent as they are

    async def call(request: bytes) -> bytes:
        return await behave(iter(()), _Context(request, parse))  # type: ignore[arg-type,no-any-return]

    return call


def routed_engine(backend: AnswerBackend, metrics: Metrics, cache: ScoreCache | None) -> RerankEngine:
    """The engine over a router of one deployment, as the service builds it, with `cache` in
    front of the deployment (None: none)."""
    scores = None if cache is None else CachedScores(cache, lambda model: {"model": model}, metrics.cache)
    deployment = Deployment("bench", backend, None, metrics=metrics, scores=scores)
    router = Router([Route(MODEL.name, [Member(deployment, MODEL.name)])], metrics)
    return RerankEngine.from_config(router, ServerConfig.from_settings(Settings()).calls)


def default_cache() -> ScoreCache:
    """The score cache as the service starts it with its defaults: the memory tier alone."""
    cache = build_score_cache(ServerConfig.from_settings(Settings()).cache)
    assert cache is not None  # the defaults keep a memory tier
    return cache


def full_cache() -> ScoreCache:
    """The default cache, filled with other pairs: every store of a new pair evicts one."""
    config = ServerConfig.from_settings(Settings()).cache
    tier = MemoryTier(config.memory_bytes, config.ttl)
    batch = 1000
    while not tier.evictions:
        tier.put_columns([os.urandom(KEY_SIZE) for _ in range(batch)], [0.5] * batch, [30] * batch)
    return ScoreCache(tier)


def unique_requests(message: rerank_pb2.RerankRequest, calls: int) -> Iterator[bytes]:
    """`message` serialized `calls` times, each with a query of its own: no pair asked twice."""
    for number in range(calls):
        unique = rerank_pb2.RerankRequest()
        unique.CopyFrom(message)
        unique.query = f"{message.query} #{number}"
        yield unique.SerializeToString()


def measure(step: Callable[[], Awaitable[object]], iterations: int, rounds: int) -> float:
    """CPU µs per call of `step`: the best round's mean."""

    async def run() -> float:
        for _ in range(max(1, iterations // 10)):  # warm up
            await step()
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time_ns()
            for _ in range(iterations):
                await step()
            best = min(best, (time.process_time_ns() - started) / iterations / 1000)
        return best

    return asyncio.run(run())


def bench(count: int, iterations: int, rounds: int) -> dict[str, float]:
    message = perf_request(count)
    body = orjson.loads(upstream_answer(count))
    backend = AnswerBackend(body)
    engine = RerankEngine.from_config(backend, ServerConfig.from_settings(Settings()).calls)
    context = CallContext()
    request = to_domain(message)
    backend_request = BackendRequest(
        model=request.model, query=request.query, documents=request.documents, instruct=None, top_n=None
    )
    outcome = asyncio.run(engine.rerank(request, context))
    check(message, to_proto(outcome, "bench"), body)

    async def whole() -> rerank_pb2.RerankResponse:
        return to_proto(await engine.rerank(to_domain(message), context), "bench")

    async def domain() -> object:
        return to_domain(message)

    async def engine_only() -> RerankOutcome:
        return await engine.rerank(request, context)

    async def parse() -> BackendResult:
        return await backend.rerank(backend_request, context)

    async def proto() -> rerank_pb2.RerankResponse:
        return to_proto(outcome, "bench")

    pipeline = Pipeline(engine, Admission(1_000), CallerDirectory(), Metrics())
    method, peer = METHOD, PEER
    measured = pipeline.metrics.for_method(method)

    async def bookkeeping() -> None:
        call = pipeline.open(method, peer, measured)
        call.admit(message.ByteSize())
        call.documents, call.model, call.outcome = count, request.model, outcome
        call.succeeded()
        call.finish()

    async def metrics() -> None:
        measured.started()
        measured.finished(grpc.StatusCode.OK, 0.01, count, outcome.total_tokens)

    facts = call_facts(method, peer, "bench", count, request.model, outcome, None)

    async def log_line() -> None:
        log_call(facts, grpc.StatusCode.OK, 0.01, None)

    request_bytes = message.SerializeToString()
    handler_metrics, hit_metrics, miss_metrics = Metrics(), Metrics(), Metrics()
    uncached = grpc_handler(routed_engine(backend, handler_metrics, None), handler_metrics)
    cached = grpc_handler(routed_engine(backend, hit_metrics, default_cache()), hit_metrics)
    filled = full_cache()
    missed = grpc_handler(routed_engine(backend, miss_metrics, filled), miss_metrics)
    for call in (uncached, cached, missed):
        check(message, rerank_pb2.RerankResponse.FromString(asyncio.run(call(request_bytes))), body)
    # Every miss is a call not seen before: fewer of them, each made up front.
    miss_iterations = min(iterations, 2_000)
    warm_up = max(1, miss_iterations // 10)  # as measure() warms up
    next_request = iter(list(unique_requests(message, warm_up + miss_iterations * rounds))).__next__

    async def handler() -> bytes:
        return await uncached(request_bytes)

    async def cache_hit() -> bytes:
        return await cached(request_bytes)

    async def cache_miss() -> bytes:
        return await missed(next_request())

    table = {
        "whole path": measure(whole, iterations, rounds),
        "to_domain": measure(domain, iterations, rounds),
        "engine.rerank (with parse_answer)": measure(engine_only, iterations, rounds),
        "  of which parse_answer": measure(parse, iterations, rounds),
        "to_proto": measure(proto, iterations, rounds),
        "call bookkeeping (open, admit, finish)": measure(bookkeeping, iterations, rounds),
        "  of which metrics": measure(metrics, iterations, rounds),
        "  of which the access-log line": measure(log_line, iterations, rounds),
        "gRPC handler, bytes to bytes, over the router (no grpc)": measure(handler, iterations, rounds),
        "  the same, the score cache answering every pair": measure(cache_hit, iterations, rounds),
        "  the same, the score cache full, missing every pair": measure(cache_miss, miss_iterations, rounds),
    }
    if filled.stats().hits:  # every measured call must have asked pairs never seen before
        raise SystemExit("the cache-miss row found pairs in the cache")
    return table


def check(message: rerank_pb2.RerankRequest, response: rerank_pb2.RerankResponse, body: Any) -> None:
    """The path under test gives the right answer: every document, best first."""
    results = body["output"]["results"]
    expected = sorted((-r["relevance_score"], r["index"]) for r in results)
    got = [(-r.relevance_score, r.index) for r in response.output.results]
    if got != expected or len(got) != len(message.documents):
        raise SystemExit("the hot path gave a wrong ranking")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[20, 500], help="documents per call")
    parser.add_argument("--iterations", type=int, default=0, help="calls per round (default: by size)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best one counts")
    args = parser.parse_args()
    # The service's default: JSON lines (here to /dev/null, so the writes cost what they do).
    configure_logging("json", "info", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
    table: dict[int, dict[str, float]] = {}
    for count in args.counts:
        iterations = args.iterations or max(200, 200_000 // count)
        table[count] = bench(count, iterations, args.rounds)
    names = list(next(iter(table.values())))
    width = max(map(len, names))
    print(f"{'µs per call':<{width}}" + "".join(f"{f'{count} docs':>12}" for count in table))
    for name in names:
        print(f"{name:<{width}}" + "".join(f"{table[count][name]:>12.1f}" for count in table))
    if len(table) > 1:
        (low, few), (high, many) = min(table.items()), max(table.items())
        per_document = (many["whole path"] - few["whole path"]) / (high - low)
        print(f"{'per extra document':<{width}}{per_document:>12.2f}")


if __name__ == "__main__":
    main()
