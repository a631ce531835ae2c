"""The score cache end to end: live servers in front of a counting fake upstream (and a
local model), a real Redis shared by replicas, cache-control over gRPC and HTTP."""

from __future__ import annotations

import concurrent.futures
import struct
import textwrap
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.cache.build import build_score_cache
from rerank_service.config import ConfigError, load_settings
from rerank_service.config.server import ServerConfig
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, ServerFactory, upstream_settings
from tests.support.process import ServiceProcess
from tests.support.redis_server import RedisServer
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread
from tests.support.tenants import bearer
from tests.support.tiny_models import build_tiny_cross_encoder
from tests.support.waiting import wait_until

QUERY = "how do i bake bread"
DOCUMENTS = [
    "bake bread with flour, water and yeast",
    "cats sleep most of the day",
    "sourdough bread needs a starter",
    "the stock market fell",
    "knead the dough for ten minutes",
    "a recipe for rye bread",
]
CACHE_ON = {"cache_memory_mb": 16}


def documents_sent(body: Any) -> list[str]:
    """The documents of one upstream request, in any format."""
    source = body.get("input", body)
    sent = source.get("documents", source.get("texts"))
    return [d["text"] if isinstance(d, dict) else d for d in sent]


def sent_upstream(upstream: FakeUpstream) -> list[list[str]]:
    return [documents_sent(recorded.body) for recorded in upstream.requests]


def call(
    stub: rerank_pb2_grpc.RerankServiceStub,
    documents: list[str] = DOCUMENTS,
    metadata: Any = (),
    **fields: Any,
) -> tuple[rerank_pb2.RerankResponse, dict[str, str]]:
    response, rpc = stub.Rerank.with_call(
        request(query=QUERY, documents=documents, **fields), metadata=metadata, timeout=30
    )
    return response, {key: str(value) for key, value in rpc.trailing_metadata() or ()}


def ranking(response: rerank_pb2.RerankResponse) -> list[tuple[int, bytes, str]]:
    """Each result's index, score (its float's bits) and text: equal means equal to the last bit."""
    return [
        (result.index, struct.pack("<d", result.relevance_score), result.document.text)
        for result in response.output.results
    ]


# --- one server: repeats, halves, failures ---------------------------------------------------------


def test_a_repeated_call_sends_nothing_upstream_and_answers_the_same(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(**CACHE_ON) as server:
        first, first_meta = call(server.stub, top_n=3, return_documents=True)
        again, again_meta = call(server.stub, top_n=3, return_documents=True)

    assert len(upstream.requests) == 1
    assert ranking(again) == ranking(first)
    assert (first_meta["x-cache"], again_meta["x-cache"]) == ("miss", "hit")
    # Usage is honest: the repeat scored nothing; its cached tokens are what the first used.
    assert first.usage.total_tokens > 0
    assert (again.usage.total_tokens, again.usage.cached_tokens) == (0, first.usage.total_tokens)
    assert again_meta["x-usage-source"] == "cache"


def test_a_call_answered_whole_from_the_cache_is_no_call_of_its_deployment(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """The deployment's calls and latency are its backend's: counted, hits inflated its OK
    share and drew its latency down to the cache's microseconds, hiding a slow upstream."""
    with serve(**CACHE_ON) as server:
        call(server.stub)
        for _ in range(3):
            call(server.stub)
        assert server.server is not None
        registry = server.server.metrics.registry
        (deployment,) = {d.name for d in server.server.backend.deployments}  # type: ignore[attr-defined]
        labels = {"route": "qwen3-rerank", "deployment": deployment}
        calls = registry.get_sample_value("rerank_deployment_calls_total", {**labels, "code": "OK"})
        timed = registry.get_sample_value("rerank_deployment_latency_seconds_count", labels)
        hits = registry.get_sample_value(
            "rerank_cache_calls_total", {"route": "qwen3-rerank", "outcome": "hit"}
        )

    assert len(upstream.requests) == 1
    assert (calls, timed, hits) == (1.0, 1.0, 3.0)


def test_a_half_cached_call_sends_exactly_the_uncached_documents(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(**CACHE_ON) as server:
        call(server.stub, documents=DOCUMENTS[:3])
        upstream.reset()
        mixed, meta = call(server.stub, documents=DOCUMENTS, top_n=4)
        uncached, _ = call(
            server.stub, documents=DOCUMENTS, top_n=4, metadata=(("cache-control", "no-store"),)
        )
        assert server.server is not None
        registry = server.server.metrics.registry
        route = {"route": "qwen3-rerank"}
        counted = [
            registry.get_sample_value(f"rerank_cache_{name}_total", {**route, **labels})
            for name, labels in (
                ("pairs", {"result": "hit"}),
                ("pairs", {"result": "miss"}),
                ("calls", {"outcome": "miss"}),
                ("calls", {"outcome": "partial"}),
            )
        ]
        entries = registry.get_sample_value("rerank_cache_entries")

    assert sent_upstream(upstream) == [DOCUMENTS[3:], DOCUMENTS]
    assert meta["x-cache"] == "partial"
    assert ranking(mixed) == ranking(uncached)  # top_n, order and indices as uncached
    assert mixed.usage.cached_tokens > 0
    # 3 pairs, then 6 (the first 3 hits); the no-store call is not looked up.
    assert counted == [3.0, 6.0, 1.0, 1.0]
    assert entries == len(DOCUMENTS)


def test_a_failed_answer_is_never_cached(serve: ServerFactory, upstream: FakeUpstream) -> None:
    garbage = Fault(
        mutate=lambda body: {**body, "output": {"results": [{"index": 99, "relevance_score": 2}]}}
    )
    with serve(upstream_max_attempts=1, **CACHE_ON) as server:
        upstream.inject(garbage)
        failed = expect_error(lambda: call(server.stub))
        _, meta = call(server.stub)

    assert failed.code() == grpc.StatusCode.INTERNAL
    assert "malformed" in (failed.details() or "")
    assert meta["x-cache"] == "miss"
    assert sent_upstream(upstream) == [DOCUMENTS, DOCUMENTS]


def test_a_split_call_that_failed_caches_the_chunks_that_succeeded(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(
        upstream_max_attempts=1, upstream_documents_per_call=2, chunk_concurrency=1, **CACHE_ON
    ) as server:
        upstream.cycle([Fault(), Fault(status=500, body={"code": "InternalError", "message": "x"})])
        expect_error(lambda: call(server.stub))
        upstream.cycle([])
        first_sent = sent_upstream(upstream)
        upstream.reset()
        _, meta = call(server.stub)

    assert first_sent[0] == DOCUMENTS[:2]
    # The first chunk's scores were kept; the rest go upstream now.
    assert sent_upstream(upstream) == [DOCUMENTS[2:4], DOCUMENTS[4:6]]
    assert meta["x-cache"] == "partial"


def test_a_deployment_that_passes_callers_tokens_through_is_never_cached(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """Only the upstream can tell a good token from a bad one: a cached answer would reach a
    caller with no token, or a wrong one."""
    with serve(upstream_api_key=None, **CACHE_ON) as server:
        _, first = call(server.stub, metadata=bearer(UPSTREAM_KEY))
        no_token = expect_error(lambda: call(server.stub))
        wrong_token = expect_error(lambda: call(server.stub, metadata=bearer("not-the-key")))
        _, again = call(server.stub, metadata=bearer(UPSTREAM_KEY))

    assert code_of(no_token) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(wrong_token) == grpc.StatusCode.UNAUTHENTICATED
    assert len(upstream.requests) == 3  # the first, the wrong token's, the repeat: none from a cache
    assert "x-cache" not in first
    assert "x-cache" not in again


def test_cache_control_is_honoured_over_grpc(serve: ServerFactory, upstream: FakeUpstream) -> None:
    with serve(**CACHE_ON) as server:
        _, no_store = call(server.stub, metadata=(("cache-control", "no-store"),))
        _, after_no_store = call(server.stub)  # nothing was stored: a miss
        _, no_cache = call(server.stub, metadata=(("cache-control", "no-cache"),))
        _, hit = call(server.stub)

    assert "x-cache" not in no_store
    assert [after_no_store["x-cache"], no_cache["x-cache"], hit["x-cache"]] == ["miss", "miss", "hit"]
    assert len(upstream.requests) == 3  # no-store, the miss, no-cache (read nothing, stored)


def test_cache_control_is_honoured_over_http(serve: ServerFactory, upstream: FakeUpstream) -> None:
    body = {"model": "qwen3-rerank", "input": {"query": QUERY, "documents": DOCUMENTS}}
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}

    def post(cache_control: str | None = None) -> httpx.Response:
        sent = headers if cache_control is None else {**headers, "Cache-Control": cache_control}
        url = f"http://127.0.0.1:{port}/api/v1/services/rerank/text-rerank/text-rerank"
        return httpx.post(url, json=body, headers=sent, timeout=30)

    with serve(http_port=0, **CACHE_ON) as server:
        assert server.server is not None
        assert server.server.http is not None
        port = server.server.http.port
        no_store = post("no-store")
        miss = post()
        no_cache = post("no-cache")
        hit = post()

    assert [r.status_code for r in (no_store, miss, no_cache, hit)] == [200] * 4
    assert "x-cache" not in no_store.headers
    assert [miss.headers["x-cache"], no_cache.headers["x-cache"], hit.headers["x-cache"]] == [
        "miss",
        "miss",
        "hit",
    ]
    assert len(upstream.requests) == 3
    assert hit.json()["output"] == miss.json()["output"]
    assert hit.json()["usage"] == {"total_tokens": 0, "cached_tokens": miss.json()["usage"]["total_tokens"]}


def test_fifty_identical_calls_at_once_make_one_upstream_call(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(**CACHE_ON) as server:
        # The upstream holds its answer until every call has arrived at the server.
        upstream.inject(Fault(delay=1.0))
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: call(server.stub), range(50)))

    assert len(upstream.requests) == 1
    assert len({tuple(ranking(response)) for response, _ in answers}) == 1
    assert sorted(meta["x-cache"] for _, meta in answers).count("miss") == 1


# --- every format, and a local model: cached equals uncached, field by field ---------------------


@pytest.mark.parametrize("dialect", ["dashscope", "compatible", "cohere", "tei", "voyage"])
def test_a_cached_answer_equals_the_uncached_one_for_every_format(dialect: str) -> None:
    speaks = "dashscope" if dialect == "compatible" else dialect  # one fake serves both paths
    models = ("qwen3-rerank",)
    with FakeUpstream(api_key=UPSTREAM_KEY, models=models, format=speaks) as fake:
        settings = upstream_settings(fake, upstream_dialect=dialect, upstream_models=models, **CACHE_ON)
        with ServerThread(settings) as server:
            no_cache = (("cache-control", "no-cache"),)
            uncached, _ = call(server.stub, metadata=no_cache, top_n=4, return_documents=True)
            cached, meta = call(server.stub, top_n=4, return_documents=True)

        assert len(fake.requests) == 1
    assert meta["x-cache"] == "hit"
    assert ranking(cached) == ranking(uncached)
    assert cached.usage.cached_tokens == uncached.usage.total_tokens


@pytest.fixture(scope="module")
def tiny_cross(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "cross")


def test_a_local_models_cached_answer_equals_the_uncached_one(tiny_cross: Path) -> None:
    settings = load_settings(
        {"backend": "local", "local_models": f"tiny={tiny_cross}", "device": "cpu", **CACHE_ON}, env={}
    )
    with ServerThread(settings) as server:
        uncached, first = call(server.stub, model="tiny", metadata=(("cache-control", "no-cache"),))
        cached, again = call(server.stub, model="tiny")

    assert (first["x-cache"], again["x-cache"]) == ("miss", "hit")
    assert ranking(cached) == ranking(uncached)
    assert (cached.usage.total_tokens, cached.usage.cached_tokens) == (0, uncached.usage.total_tokens)


# --- routes: a route with `cache: off`, a fallback to another model ----------------------------


def write_routes(tmp_path: Path, upstream: FakeUpstream) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            models:
              - name: cached
                deployments:
                  - {{format: dashscope, url: "{upstream.url}", model: qwen3-rerank}}
              - name: uncached
                cache: off
                deployments:
                  - {{format: dashscope, url: "{upstream.url}", model: qwen3-rerank, name: other}}
            """
        )
    )
    return path


def test_a_route_with_cache_off_never_uses_it(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = load_settings(
        {"config": str(write_routes(tmp_path, upstream)), **CACHE_ON},
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY},
    )
    with ServerThread(settings) as server:
        call(server.stub, model="cached")
        _, cached = call(server.stub, model="cached")
        call(server.stub, model="uncached")
        _, uncached = call(server.stub, model="uncached")

    assert cached["x-cache"] == "hit"
    assert "x-cache" not in uncached
    assert len(upstream.requests) == 3


# --- replicas sharing Redis; Redis gone ---------------------------------------------------------


def replica_args(upstream: FakeUpstream, redis: RedisServer) -> list[str]:
    return [
        "--backend", "upstream", "--upstream-url", upstream.url, "--upstream-models", "qwen3-rerank",
        "--cache-store", redis.url,
    ]  # fmt: skip


def test_two_replicas_share_their_scores_through_redis(
    upstream: FakeUpstream, redis_empty: RedisServer
) -> None:
    env = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}
    args = replica_args(upstream, redis_empty)
    with (
        ServiceProcess(args, env, score_cache=True) as first,
        ServiceProcess(args, env, score_cache=True) as second,
        grpc.insecure_channel(first.target) as one,
        grpc.insecure_channel(second.target) as two,
    ):
        answered, first_meta = call(rerank_pb2_grpc.RerankServiceStub(one))
        shared, second_meta = call(rerank_pb2_grpc.RerankServiceStub(two))

    assert (first_meta["x-cache"], second_meta["x-cache"]) == ("miss", "hit")
    assert ranking(shared) == ranking(answered)
    assert len(upstream.requests) == 1


def test_with_redis_gone_calls_are_answered_as_misses_and_shared_again_once_it_is_back(
    serve: ServerFactory, upstream: FakeUpstream, redis_own: RedisServer
) -> None:
    # No memory tier: every hit comes from Redis.
    with serve(cache_memory_mb=0, cache_store=redis_own.url) as server:
        call(server.stub)
        _, shared = call(server.stub)
        redis_own.kill()
        outage = [call(server.stub)[1] for _ in range(3)]
        redis_own.start()  # empty: it kept nothing

        attempt = iter(range(1000))

        def shared_again() -> bool:
            documents = [f"{document} ({next(attempt)})" for document in DOCUMENTS]
            call(server.stub, documents=documents)
            return call(server.stub, documents=documents)[1]["x-cache"] == "hit"

        wait_until(shared_again, timeout=30, what="Redis's scores shared again")

    assert shared["x-cache"] == "hit"
    assert [meta["x-cache"] for meta in outage] == ["miss"] * 3  # answered all the same


def test_the_cache_is_on_by_default(upstream: FakeUpstream) -> None:
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--upstream-models", "qwen3-rerank"]
    env = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}
    with (
        ServiceProcess(args, env, score_cache=True) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        metas = [call(stub)[1]["x-cache"] for _ in range(2)]

    assert metas == ["miss", "hit"]
    assert len(upstream.requests) == 1


def test_a_cache_store_that_is_not_redis_is_refused_with_its_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache-store"):
        load_settings({"cache_store": "http://redis.internal:6379"}, env={})
    with pytest.raises(ConfigError, match="cache-store-ca-file"):
        load_settings({"cache_store": "redis://redis.internal", "cache_store_ca_file": str(tmp_path)}, env={})


def test_an_unreadable_store_ca_file_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    stored = {"cache_store": "rediss://redis.internal:6380", "cache_store_ca_file": str(missing)}
    config = ServerConfig.from_settings(load_settings(stored, env={}))

    with pytest.raises(ConfigError, match=r"cache-store-ca-file .*no-such-ca\.pem: No such file"):
        build_score_cache(config.cache)
