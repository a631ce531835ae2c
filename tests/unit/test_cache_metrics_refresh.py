"""A process refreshes its score cache's metrics without calls (`refresh_cache_metrics`): a
Redis a failure had it skip is tried again once due, so rerank_cache_store_up says it is
back with no call made; an up Redis is sent nothing."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from rerank_service.cache import ScoreCache
from rerank_service.cache.redis_tier import RedisTier, redis_client
from rerank_service.observability.cache_metrics import CacheMetrics
from rerank_service.routing.cached_scores import refresh_cache_metrics
from tests.support.redis_server import RedisServer

STORE_UP = "rerank_cache_store_up"


def _tier(server: RedisServer) -> RedisTier:
    # Tried again at once after a failure: what is waited on is Redis, not the tier's clock.
    return RedisTier(redis_client(server.url, timeout=1.0), ttl=60, timeout=1.0, retry_after=0)


async def test_a_redis_that_failed_is_tried_again_without_a_call_and_read_as_up(
    redis_own: RedisServer,
) -> None:
    registry = CollectorRegistry()
    metrics = CacheMetrics(registry)
    tier = _tier(redis_own)
    cache = ScoreCache(None, tier)
    try:
        redis_own.kill()
        assert await tier.get_many([b"a call's pair"]) == [None]  # its call: a miss, Redis down
        await refresh_cache_metrics(cache, metrics)
        assert registry.get_sample_value(STORE_UP) == 0.0
        errors = tier.errors

        redis_own.start()
        await refresh_cache_metrics(cache, metrics)  # no call

        assert registry.get_sample_value(STORE_UP) == 1.0
        assert tier.errors == errors
    finally:
        await cache.aclose()


async def test_a_redis_that_is_up_is_sent_nothing(redis_empty: RedisServer) -> None:
    registry = CollectorRegistry()
    tier = _tier(redis_empty)
    cache = ScoreCache(None, tier)
    try:
        await refresh_cache_metrics(cache, CacheMetrics(registry))

        assert registry.get_sample_value(STORE_UP) == 1.0
        assert (tier.hits, tier.misses, tier.errors) == (0, 0, 0)  # no round trip
    finally:
        await cache.aclose()
