"""A deployment's scores through the score cache: only the pairs it has not scored go to it.

The cache's key holds what changes a score (cache/keys.py): the model the deployment runs,
as its config says (an upstream's model id, format, score transform and prompt template; a
local model's source, the revision of its files, engine, quantization, dtype and device),
so deployments of one model share scores and a fallback to another model never reads them.
A call's documents the cache knows are answered from it; the others are sent to the
deployment in one request, and their scores stored once the backend's answer passed its
checks (a failed call stores nothing). Each chunk of a split call comes here on its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping

from rerank_service.cache import CachedScore, PairKeys, ScoreCache, deployment_fingerprint
from rerank_service.config.deployments import DeploymentConfig
from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CacheMode,
    CacheOutcome,
    CallContext,
    ScoredDocument,
)
from rerank_service.observability.cache_metrics import CacheMetrics

Identity = Mapping[str, str | int | float | bool | None]
Score = Callable[[BackendRequest, CallContext], Awaitable[BackendResult]]


class CachedScores:
    """The score cache in front of one deployment (which may serve several models)."""

    def __init__(self, cache: ScoreCache, identity: Callable[[str], Identity], metrics: CacheMetrics) -> None:
        self._cache = cache
        self._identity = identity
        self._metrics = metrics
        self._keys: dict[str, PairKeys] = {}  # per model the deployment is sent

    async def rerank(
        self, route: str, request: BackendRequest, context: CallContext, score: Score
    ) -> BackendResult:
        if context.cache_mode is CacheMode.OFF:
            return await score(request, context)
        keys = self._keys_of(request.model).keys(request.instruct, request.query, request.documents)
        wait = None if context.deadline is None else max(0.0, context.deadline - time.monotonic())
        with await self._cache.lookup(keys, context.cache_mode, wait=wait) as lookup:
            hits, missing = lookup.hits, lookup.missing
            self._metrics.looked_up(route, lookup.outcome.value, len(hits), len(missing))
            cached_tokens = sum(hit.tokens or 0 for hit in hits.values())
            if not missing:
                self._metrics.sync(self._cache.counts())
                return BackendResult(
                    scores=[ScoredDocument(index, hit.score) for index, hit in hits.items()],
                    total_tokens=0,
                    usage_source="cache",
                    cache=CacheOutcome.HIT,
                    cached_tokens=cached_tokens,
                )
            documents = request.documents
            asked = dataclasses.replace(
                request,
                documents=documents if not hits else [documents[index] for index in missing],
                top_n=None,  # every score is kept, so none may be left out
            )
            result = await score(asked, context)
            if hits:  # the backend's indices are into the documents it was sent
                scores = [ScoredDocument(missing[scored.index], scored.score) for scored in result.scores]
            else:
                scores = result.scores
            await lookup.store(_entries(request.query, documents, scores, result.total_tokens))
            self._metrics.sync(self._cache.counts())
            scores.extend(ScoredDocument(index, hit.score) for index, hit in hits.items())
            return dataclasses.replace(
                result, scores=scores, cache=lookup.outcome, cached_tokens=cached_tokens
            )

    def _keys_of(self, model: str) -> PairKeys:
        keys = self._keys.get(model)
        if keys is None:
            keys = self._keys[model] = PairKeys(deployment_fingerprint(dict(self._identity(model))))
        return keys


def _entries(
    query: str, documents: list[str], scores: list[ScoredDocument], total_tokens: int
) -> dict[int, CachedScore]:
    """The scores to store, each with its share of the answer's tokens: backends report one
    count per call, shared out by each pair's size (query and document, in characters), in
    whole tokens that add up to the count (each share is the running total's floor less the
    shares before it), so a repeat of the call reports as cached exactly what the first
    reported as used."""
    query_size = len(query)
    whole = sum(query_size + len(documents[scored.index]) for scored in scores) or 1
    entries = {}
    running = given = 0
    for scored in scores:
        running += query_size + len(documents[scored.index])
        share = total_tokens * running // whole - given
        given += share
        entries[scored.index] = CachedScore(scored.score, share)
    return entries


def score_identity(config: DeploymentConfig, revision: Callable[[str], str]) -> Callable[[str], Identity]:
    """What changes a score of `config`'s deployment, for a model it is sent: the cache's
    fingerprint. `revision` names a local model source's files (a digest of them)."""
    if isinstance(config, LocalDeploymentConfig):
        sources = dict(config.models)
        engine = config.engine

        def local(model: str) -> Identity:
            source = sources.get(model, model)
            return {
                "kind": "local",
                "source": source,
                "revision": revision(source),
                "engine": engine.engine,
                "quantize": engine.quantize,
                "dtype": engine.dtype,
                "device": engine.device,
            }

        return local

    def upstream(model: str) -> Identity:
        return {
            "kind": "upstream",
            "format": config.format,
            "model": model,
            "score_transform": config.score_transform,
            "prompt_template": config.prompt_template,
        }

    return upstream
