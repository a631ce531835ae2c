"""rerank_cache_store_up says what the score cache's Redis tier is doing, and only when there
is one: never 0 ("Redis down") for a process without a tier, nor for one (a --workers
worker: the gauge is their minimum) that has served no call yet."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from rerank_service.cache.build import build_score_cache
from rerank_service.config.server import CacheConfig
from rerank_service.observability.cache_metrics import CacheMetrics
from tests.support.redis_server import RedisServer

STORE_UP = "rerank_cache_store_up"


def config(store: str | None, memory_bytes: int = 1 << 20) -> CacheConfig:
    return CacheConfig(
        memory_bytes=memory_bytes, ttl=3600, store=store, store_timeout=0.05, store_ca_file=None
    )


def test_store_up_is_not_reported_before_anything_is_known() -> None:
    registry = CollectorRegistry()
    CacheMetrics(registry)

    assert registry.get_sample_value(STORE_UP) is None


def test_store_up_is_not_reported_without_a_redis_tier() -> None:
    registry = CollectorRegistry()
    metrics = CacheMetrics(registry)
    cache = build_score_cache(config(store=None), metrics)
    assert cache is not None
    metrics.sync(cache.counts())  # as after a call

    assert registry.get_sample_value(STORE_UP) is None


async def test_store_up_reads_the_redis_tier_from_when_the_cache_is_built(redis_empty: RedisServer) -> None:
    registry = CollectorRegistry()
    cache = build_score_cache(config(store=redis_empty.url, memory_bytes=0), CacheMetrics(registry))
    assert cache is not None
    try:
        assert registry.get_sample_value(STORE_UP) == 1.0  # no call made yet
    finally:
        await cache.aclose()
