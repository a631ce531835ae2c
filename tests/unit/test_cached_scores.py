"""The score cache in front of a deployment: what its key holds, what a caller's
cache-control asks, and how usage is shared out among the cached pairs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from random import Random

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerank_service.backends.local import backend as local_backend
from rerank_service.backends.local.scorer import Encoded, Scorer
from rerank_service.cache import MemoryTier, RedisTier, ScoreCache, redis_client
from rerank_service.config import Settings
from rerank_service.config.deployments import deployment_config
from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CacheMode,
    CacheOutcome,
    CallContext,
    ScoredDocument,
    ServiceError,
)
from rerank_service.observability.metrics import Metrics
from rerank_service.pipeline.cache_control import cache_mode
from rerank_service.routing import build
from rerank_service.routing.cached_scores import CachedScores, _token_shares, score_identity

DOCUMENTS = ["bread and flour", "cats sleep", "rye bread recipe", "stock market"]


class CountingBackend:
    """Scores each document by its length; remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        self.asked.append(request.documents)
        return BackendResult(
            [ScoredDocument(index, 1 / (1 + len(text))) for index, text in enumerate(request.documents)],
            total_tokens=10 * len(request.documents) + 1,
        )


def identity_of(**settings: object) -> dict[str, object]:
    config = deployment_config(Settings(backend="upstream", **settings))  # type: ignore[arg-type]
    return dict(score_identity(config, lambda source: "-")("qwen3-rerank"))


def test_deployments_of_one_model_share_a_key_whatever_their_url_or_limits() -> None:
    one = identity_of(upstream_url="https://a.example", upstream_timeout=3.0)
    other = identity_of(upstream_url="https://b.example", upstream_max_connections=7)

    assert one == other


def test_tei_servers_at_two_urls_never_share_a_key() -> None:
    """TEI's requests name no model: the server at each URL runs its own, maybe another."""
    big = identity_of(upstream_dialect="tei", upstream_url="http://tei-big:8080")
    small = identity_of(upstream_dialect="tei", upstream_url="http://tei-small:8080")

    assert big != small


def test_tei_servers_behind_one_host_at_two_paths_never_share_a_key() -> None:
    """One gateway host, one path per model: the URL alone named them alike."""
    bge = identity_of(upstream_dialect="tei", upstream_url="https://gw", upstream_path="/bge/rerank")
    minilm = identity_of(upstream_dialect="tei", upstream_url="https://gw", upstream_path="/minilm/rerank")

    assert bge != minilm


@pytest.mark.parametrize(
    "change",
    [
        {"upstream_dialect": "cohere"},
        {"upstream_score_transform": "sigmoid"},
        {"upstream_prompt_template": "qwen3"},
    ],
)
def test_what_changes_a_score_changes_the_key(change: dict[str, object]) -> None:
    assert identity_of(**change) != identity_of()


def test_a_local_models_key_holds_its_files_revision_and_how_it_runs() -> None:
    config = LocalDeploymentConfig.from_settings(
        Settings(backend="local", local_models=(("m", "/models/m"),))
    )
    revisions = {"/models/m": "r1"}
    identity = score_identity(config, revisions.__getitem__)  # as the deployment is built to load it
    revisions["/models/m"] = "r2"  # new files at the same place, after the load
    loaded = dict(identity("m"))  # the first call: the weights loaded are still r1's
    reloaded = score_identity(config, revisions.__getitem__)  # a deployment built to load the new files
    half = dataclasses.replace(config, engine=dataclasses.replace(config.engine, dtype="float16"))

    assert loaded["source"] == "/models/m"
    assert loaded["revision"] == "r1"
    assert dict(reloaded("m")) != loaded
    assert dict(score_identity(half, revisions.__getitem__)("m")) != dict(reloaded("m"))


def test_a_local_models_key_holds_the_device_and_dtype_it_runs_in_not_auto() -> None:
    """Replicas on a CPU and on a GPU machine never share scores of different precisions."""
    auto = LocalDeploymentConfig.from_settings(Settings(backend="local", local_models=(("m", "/models/m"),)))
    assert (auto.engine.device, auto.engine.dtype) == ("auto", "auto")

    def on_a_gpu(device: str, dtype: str) -> tuple[str, str]:
        return "cuda", "bfloat16"

    def on_a_cpu(device: str, dtype: str) -> tuple[str, str]:
        return "cpu", "float32"

    gpu = dict(score_identity(auto, lambda source: "r1", on_a_gpu)("m"))
    cpu = dict(score_identity(auto, lambda source: "r1", on_a_cpu)("m"))

    assert (gpu["device"], gpu["dtype"]) == ("cuda", "bfloat16")
    assert (cpu["device"], cpu["dtype"]) == ("cpu", "float32")
    assert gpu != cpu


def test_onnx_replicas_on_cpu_and_gpu_machines_share_scores() -> None:
    """ONNX Runtime runs on the CPU in float32 on either machine: the same scores."""
    onnx = LocalDeploymentConfig.from_settings(
        Settings(backend="local", local_models=(("m", "/models/m"),), local_engine="onnx")
    )

    def on_a_gpu(device: str, dtype: str) -> tuple[str, str]:
        return "cuda", "bfloat16"

    def on_a_cpu(device: str, dtype: str) -> tuple[str, str]:
        return "cpu", "float32"

    gpu = dict(score_identity(onnx, lambda source: "r1", on_a_gpu)("m"))
    assert gpu == dict(score_identity(onnx, lambda source: "r1", on_a_cpu)("m"))
    assert (gpu["device"], gpu["dtype"]) == ("cpu", "float32")


def test_auto_comes_to_a_device_type_and_a_dtype_on_this_machine() -> None:
    """What the service hands score_identity: never `auto`."""
    device, dtype = build._precision("auto", "auto")

    assert device in ("cpu", "cuda")
    assert dtype in ("float32", "float16", "bfloat16")
    assert build._precision(device, dtype) == (device, dtype)


@pytest.mark.parametrize(
    ("header", "mode"),
    [
        (None, CacheMode.READ_WRITE),
        ("max-age=60", CacheMode.READ_WRITE),
        ("no-cache", CacheMode.NO_READ),
        ("No-Cache, max-age=0", CacheMode.NO_READ),
        ("no-store", CacheMode.OFF),
        ("no-cache, no-store", CacheMode.OFF),
    ],
)
def test_cache_control_says_what_the_cache_may_do(header: str | None, mode: CacheMode) -> None:
    metadata = [("authorization", "Bearer x")] + ([("Cache-Control", header)] if header else [])
    assert cache_mode(metadata) is mode


async def test_shares_of_tokens_add_up_to_what_the_backend_reported() -> None:
    backend = CountingBackend()
    cached = CachedScores(
        ScoreCache(MemoryTier(1 << 20, 60.0)), lambda model: {"model": model}, Metrics().cache
    )
    request = BackendRequest("m", "bread", DOCUMENTS, None, top_n=2)

    first = await cached.rerank("route", request, CallContext(), backend.rerank)
    again = await cached.rerank("route", request, CallContext(), backend.rerank)

    assert backend.asked == [DOCUMENTS]  # top_n is not passed on: every score is kept
    assert (first.cache, again.cache) == (CacheOutcome.MISS, CacheOutcome.HIT)
    assert (again.total_tokens, again.cached_tokens) == (0, first.total_tokens)
    assert sorted((s.index, s.score) for s in again.scores) == sorted(
        (s.index, s.score) for s in first.scores
    )


class OneTokenScorer:
    """A fake local model: one token a word, every document scored 0.5."""

    kind = "fake"
    supports_instruct = False
    max_length = 512
    device = "cpu"
    dtype = "float32"
    engine = "torch"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        return [Encoded(input_ids=(1,), tokens=1) for _ in documents]

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        return [0.5] * len(batch)


async def test_a_call_while_a_local_model_loads_is_not_ready_and_makes_no_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key of a local model asks its precision, which imports torch: made on the event
    loop while the loader's thread imported it, the call failed INTERNAL (a half-imported
    transformers) and the loop stalled. It gets BACKEND_NOT_READY, which the router falls back on."""
    loading, loaded = threading.Event(), threading.Event()
    asked: list[tuple[str, str]] = []

    def default_loader(choice: object) -> local_backend.ScorerLoader:
        def load(source: str, device: str, dtype: str) -> Scorer:
            loading.set()
            loaded.wait(10)  # released by the test; 10 s only ends a broken run
            return OneTokenScorer()

        return load

    def precision(device: str, dtype: str) -> tuple[str, str]:
        asked.append((device, dtype))
        return "cpu", "float32"

    monkeypatch.setattr(local_backend, "_default_loader", default_loader)
    monkeypatch.setattr(build, "_precision", precision)
    settings = Settings(backend="local", local_models=(("m", "/models/m"),))
    [route] = build.build_routes(settings, cache=ScoreCache(MemoryTier(1 << 20, 60.0)))
    deployment = route.members[0].deployment
    starting = asyncio.create_task(deployment.backend.start())
    try:
        assert await asyncio.to_thread(loading.wait, 10)
        with pytest.raises(ServiceError) as refused:
            await deployment.rerank("m", BackendRequest("m", "q", DOCUMENTS, None, None), CallContext())
        asked_while_loading = list(asked)
    finally:
        loaded.set()
        await starting
    answered = await deployment.rerank("m", BackendRequest("m", "q", DOCUMENTS, None, None), CallContext())
    await deployment.backend.close()

    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "BACKEND_NOT_READY"
    assert asked_while_loading == []
    assert answered.cache is CacheOutcome.MISS  # once loaded, the cache is in front of it
    assert asked == [("auto", "auto")]


async def test_a_redis_error_is_counted_even_when_the_backend_call_then_fails() -> None:
    """During an outage of both, every call fails: its Redis errors are shown all the same."""
    metrics = Metrics()
    unreachable = RedisTier(redis_client("redis://127.0.0.1:1", timeout=0.5), ttl=60.0, timeout=0.5)
    cached = CachedScores(ScoreCache(None, unreachable), lambda model: {"model": model}, metrics.cache)

    async def failing(request: BackendRequest, context: CallContext) -> BackendResult:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "upstream down")

    try:
        with pytest.raises(ServiceError):
            await cached.rerank(
                "route", BackendRequest("m", "q", DOCUMENTS, None, None), CallContext(), failing
            )
    finally:
        await unreachable.aclose()

    assert unreachable.errors == 1
    assert metrics.registry.get_sample_value("rerank_cache_store_errors_total") == 1


async def test_a_chunk_that_falls_over_is_counted_once_on_the_deployment_that_answered() -> None:
    metrics = Metrics()
    cache = ScoreCache(MemoryTier(1 << 20, 60.0))  # deployments of one model share it
    failed, answered = (CachedScores(cache, lambda model: {"model": model}, metrics.cache) for _ in range(2))
    request = BackendRequest("m", "q", DOCUMENTS, None, None)

    async def failing(request: BackendRequest, context: CallContext) -> BackendResult:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "upstream down")

    with pytest.raises(ServiceError):  # the router falls over to the next deployment
        await failed.rerank("route", request, CallContext(), failing)
    await answered.rerank("route", request, CallContext(), CountingBackend().rerank)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"route": "route", **labels})

    assert sample("rerank_cache_pairs_total", result="miss") == len(DOCUMENTS)
    assert sample("rerank_cache_calls_total", outcome="miss") == 1


async def test_a_partly_cached_request_asks_the_backend_for_the_rest_only() -> None:
    backend = CountingBackend()
    cached = CachedScores(
        ScoreCache(MemoryTier(1 << 20, 60.0)), lambda model: {"model": model}, Metrics().cache
    )
    await cached.rerank(
        "route", BackendRequest("m", "q", DOCUMENTS[:2], None, None), CallContext(), backend.rerank
    )

    mixed = await cached.rerank(
        "route", BackendRequest("m", "q", DOCUMENTS, None, None), CallContext(), backend.rerank
    )
    off = await cached.rerank(
        "route",
        BackendRequest("m", "q", DOCUMENTS, None, None),
        CallContext(cache_mode=CacheMode.OFF),
        backend.rerank,
    )

    assert backend.asked == [DOCUMENTS[:2], DOCUMENTS[2:], DOCUMENTS]
    assert mixed.cache is CacheOutcome.PARTIAL
    assert off.cache is CacheOutcome.OFF
    assert sorted((s.index, s.score) for s in mixed.scores) == sorted((s.index, s.score) for s in off.scores)


@given(
    st.text(max_size=30),
    st.lists(st.text(max_size=60), max_size=25),
    st.integers(0, 10**9),
    st.randoms(use_true_random=False),
)
def test_token_shares_are_the_running_totals_floors_less_the_shares_before(
    query: str, documents: list[str], total: int, random: Random
) -> None:
    indices = random.sample(range(len(documents)), len(documents))  # in the backend's order
    whole = sum(len(query) + len(documents[index]) for index in indices) or 1
    expected, running, given_so_far = [], 0, 0
    for index in indices:
        running += len(query) + len(documents[index])
        expected.append(total * running // whole - given_so_far)
        given_so_far += expected[-1]
    shares = _token_shares(query, documents, indices, total)
    assert shares == expected
    if whole_size := sum(len(query) + len(document) for document in documents):
        assert sum(shares) == total, whole_size  # every token shared out


def test_a_qwen3_model_under_the_onnx_setting_is_keyed_by_the_torch_precision_it_runs_in() -> None:
    """Qwen3-Reranker runs on torch whatever --local-engine says: a GPU replica's scores
    (bfloat16) and a CPU replica's (float32) of it are never shared, onnx setting or not."""
    onnx = LocalDeploymentConfig.from_settings(
        Settings(backend="local", local_models=(("m", "/models/m"),), local_engine="onnx")
    )

    def on_a_gpu(device: str, dtype: str) -> tuple[str, str]:
        return "cuda", "bfloat16"

    def on_a_cpu(device: str, dtype: str) -> tuple[str, str]:
        return "cpu", "float32"

    def qwen3(source: str) -> bool:
        return True

    gpu = dict(score_identity(onnx, lambda source: "r1", on_a_gpu, qwen3)("m"))
    cpu = dict(score_identity(onnx, lambda source: "r1", on_a_cpu, qwen3)("m"))
    assert (gpu["engine"], gpu["device"], gpu["dtype"]) == ("torch", "cuda", "bfloat16")
    assert gpu != cpu


def test_a_model_source_says_whether_it_runs_on_torch_whatever_the_engine(tmp_path: Path) -> None:
    """What the service hands score_identity: read from the model's config.json."""
    for name, architecture in (("qwen3", "Qwen3ForCausalLM"), ("cross", "BertForSequenceClassification")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    assert build._runs_on_torch(str(tmp_path / "qwen3"))
    assert not build._runs_on_torch(str(tmp_path / "cross"))
    assert not build._runs_on_torch(str(tmp_path / "missing"))  # no model there: answers nothing
