"""A deployment's scores through the score cache: only the pairs it has not scored go to it.

The cache's key holds what changes a score (cache/keys.py): the model the deployment runs,
as its config says (an upstream's model id, format, score transform and prompt template; a
local model's source, the revision of its files, engine, quantization, dtype and device),
so deployments of one model share scores and a fallback to another model never reads them.
A call's documents the cache knows are answered from it; the others are sent to the
deployment in one request, and their scores stored once the backend's answer passed its
checks (a failed call stores nothing). Each chunk of a split call comes here on its own.
An answer whose scores are being stored when the call ends (its deadline, its caller gone,
another chunk failed) is kept as the call's spent (`Attempted.spend`): billed all the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from itertools import accumulate
from operator import attrgetter, itemgetter

from rerank_service.cache import PairKeys, ScoreCache, deployment_fingerprint
from rerank_service.config.deployments import DeploymentConfig
from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CacheMode,
    CacheOutcome,
    CallContext,
    ScoredDocument,
    replaced,
)
from rerank_service.core.readiness import Readiness
from rerank_service.observability.cache_metrics import CacheMetrics
from rerank_service.observability.logging import get_logger

_log = get_logger("rerank_service.cache")

Identity = Mapping[str, str | int | float | bool | None]
Score = Callable[[BackendRequest, CallContext], Awaitable[BackendResult]]
_INDEX, _SCORE = attrgetter("index"), attrgetter("score")  # of a ScoredDocument (and a CachedScore)
_TOKENS = itemgetter(1)  # of a CachedScore: its token count, None for none


class CachedScores:
    """The score cache in front of one deployment (which may serve several models)."""

    def __init__(
        self,
        cache: ScoreCache,
        identity: Callable[[str], Identity],
        metrics: CacheMetrics,
        readiness: Readiness | None = None,
    ) -> None:
        self._cache = cache
        self._identity = identity
        self._metrics = metrics
        self._readiness = readiness  # the deployment's backend's (None: always ready)
        self._keys: dict[str, PairKeys] = {}  # per model the deployment is sent

    async def rerank(
        self, route: str, request: BackendRequest, context: CallContext, score: Score
    ) -> BackendResult:
        mode = context.cache_mode
        # A backend not ready (a local model loading) refuses the call (BACKEND_NOT_READY), which
        # the router falls back on; its key is not made meanwhile: a local model's precision
        # imports torch, on the event loop, while the loader's thread may still be importing it.
        if mode is CacheMode.OFF or (self._readiness is not None and not self._readiness.ready):
            return await score(request, context)
        # The deployment this is (the router names it as it sends, before this first await):
        # what an answer kept as spent names, should the call end while its scores are stored.
        attempted = context.attempted
        deployment = None if attempted is None else attempted.deployment
        keys = self._keys_of(request.model).keys(request.instruct, request.query, request.documents)
        wait = None if context.deadline is None else max(0.0, context.deadline - time.monotonic())
        cache, metrics = self._cache, self._metrics
        with await cache.lookup(keys, mode, wait=wait) as lookup:
            hits, missing = lookup.hits, lookup.missing
            cached_tokens = sum(filter(None, map(_TOKENS, hits.values()))) if hits else 0
            if not missing:
                metrics.looked_up(route, lookup.outcome.value, len(hits), 0)
                metrics.sync(cache.counts())
                return BackendResult(
                    scores=list(map(ScoredDocument, hits, map(_SCORE, hits.values()))),
                    total_tokens=0,
                    usage_source="cache",
                    cache=CacheOutcome.HIT,
                    cached_tokens=cached_tokens,
                )
            documents = request.documents
            if hits:
                asked = replaced(
                    request,
                    documents=[documents[index] for index in missing],
                    top_n=None,  # every score is kept, so none may be left out
                )
            elif request.top_n is not None:
                asked = replaced(request, top_n=None)
            else:
                asked = request
            try:
                result = await score(asked, context)
            except BaseException:
                metrics.sync(cache.counts())  # what the lookup counted (a Redis error) is shown all the same
                raise
            try:
                # Counted once the backend answered, for the deployment whose answer is used: one
                # that failed falls over to the next, which looks the chunk up again.
                metrics.looked_up(route, lookup.outcome.value, len(hits), len(missing))
                if hits:  # the backend's indices are into the documents it was sent
                    scores = [ScoredDocument(missing[scored.index], scored.score) for scored in result.scores]
                else:
                    scores = result.scores
                indices = list(map(_INDEX, scores))
                await lookup.store_columns(
                    indices,
                    list(map(_SCORE, scores)),
                    _token_shares(request.query, documents, indices, result.total_tokens),
                )
                metrics.sync(cache.counts())
                if hits:
                    scores.extend(map(ScoredDocument, hits, map(_SCORE, hits.values())))
                return replaced(result, scores=scores, cache=lookup.outcome, cached_tokens=cached_tokens)
            except BaseException:
                # The call ended (its deadline, its caller gone, another chunk failed) while its
                # scores were stored (a slow Redis): the backend billed the answer all the same,
                # and the call's metering never gets it, so it is kept as spent.
                if attempted is not None:
                    attempted.spend((replaced(result, deployment=deployment),))
                raise

    def _keys_of(self, model: str) -> PairKeys:
        keys = self._keys.get(model)
        if keys is None:
            keys = self._keys[model] = PairKeys(deployment_fingerprint(dict(self._identity(model))))
        return keys


# How often (seconds) a server copies the cache's counts into its metrics without a call.
REFRESH_EVERY = 1.0


async def refresh_cache_metrics(cache: ScoreCache, metrics: CacheMetrics) -> None:
    """Copy the cache's counts into `metrics` without a call (`CachedScores` does after
    each), once its Redis, if a failure has it skipped, was tried again (a lookup's round trip, once due,
    as a call's round trip would be). Otherwise a process without calls (a worker whose
    connections are elsewhere) would say Redis is down for as long as it takes none, and
    rerank_cache_store_up (the lowest of the workers') with it."""
    await cache.check_store()
    metrics.sync(cache.counts())


async def refresh_cache_metrics_while_running(cache: ScoreCache, metrics: CacheMetrics) -> None:
    """`refresh_cache_metrics` every REFRESH_EVERY seconds until cancelled (a server's task).
    One that fails (a worker's metrics files on a full disk) is logged once and tried again."""
    failing = False
    while True:
        await asyncio.sleep(REFRESH_EVERY)
        try:
            await refresh_cache_metrics(cache, metrics)
            failing = False
        except Exception as exc:
            if not failing:
                _log.warning("score cache metrics not refreshed", error=f"{type(exc).__name__}: {exc}")
            failing = True


def _token_shares(query: str, documents: list[str], indices: list[int], total_tokens: int) -> list[int]:
    """Each scored document's share of the answer's tokens, in the order of `indices`:
    backends report one count per call, shared out by each pair's size (query and document,
    in characters), in whole tokens that add up to the count (each share is the running
    total's floor less the shares before it), so a repeat of the call reports as cached
    exactly what the first reported as used. (A plain loop: it runs on every miss, and
    measured 40% cheaper than the same arithmetic chained through map and accumulate.)"""
    query_size = len(query)
    sizes = [len(documents[index]) + query_size for index in indices]  # the pairs' sizes
    whole = sum(sizes) or 1
    shares: list[int] = []
    append = shares.append
    before = 0  # the shares so far
    for running in accumulate(sizes):
        floor = total_tokens * running // whole
        append(floor - before)
        before = floor
    return shares


# A local deployment's device and dtype settings -> the device type and dtype it runs in.
Precision = Callable[[str, str], tuple[str, str]]


def _as_configured(device: str, dtype: str) -> tuple[str, str]:
    return device, dtype


def _never(source: str) -> bool:
    return False


def score_identity(
    config: DeploymentConfig,
    revision: Callable[[str], str],
    precision: Precision = _as_configured,
    runs_on_torch: Callable[[str], bool] = _never,
) -> Callable[[str], Identity]:
    """What changes a score of `config`'s deployment, for a model it is sent: the cache's
    fingerprint. `revision` names a local model source's files (a digest of them);
    `precision` what its device and dtype settings come to on this machine ("auto": the
    GPU and bfloat16 or float16 where there is one), so replicas on CPU and GPU machines
    sharing a Redis tier never share scores of different precisions; `runs_on_torch`
    whether a model source runs on torch whatever the engine setting (Qwen3-Reranker)."""
    if isinstance(config, LocalDeploymentConfig):
        sources = dict(config.models)
        engine = config.engine
        # Named now, as the deployment is built to load them, not at each model's first call:
        # files replaced after the load (a new snapshot at the same place) must not have the
        # loaded weights' scores stored under the new files' name.
        revisions = {source: revision(source) for source in sources.values()}

        def local(model: str) -> Identity:
            source = sources.get(model, model)
            # ONNX Runtime runs on the CPU in float32 (int8 weights: `quantize`) whatever the
            # machine (it refuses cuda and half precisions); `auto` would name the GPU's. A
            # Qwen3-Reranker runs on torch under either engine: its device and dtype count.
            on_onnx = engine.engine == "onnx" and not runs_on_torch(source)
            device, dtype = ("cpu", "float32") if on_onnx else precision(engine.device, engine.dtype)
            return {
                "kind": "local",
                "source": source,
                "revision": revisions[source] if source in revisions else revision(source),
                "engine": "onnx" if on_onnx else "torch",  # the engine it runs on
                "quantize": engine.quantize,
                "dtype": dtype,
                "device": device,
            }

        return local

    # TEI's requests name no model: the server at the URL runs the one it was started with,
    # so the URL and path name the model there (two TEI deployments of different models in
    # one route, a cheaper fallback say, must not share scores; nor two behind one gateway
    # host, a path each: https://gw/bge/rerank, https://gw/minilm/rerank).
    server = f"{config.connection.url.rstrip('/')} {config.path or ''}" if config.format == "tei" else None

    def upstream(model: str) -> Identity:
        identity: dict[str, str | int | float | bool | None] = {
            "kind": "upstream",
            "format": config.format,
            "model": model,
            "score_transform": config.score_transform,
            "prompt_template": config.prompt_template,
        }
        if server is not None:
            identity["server"] = server
        return identity

    return upstream
