"""The process's score cache from its configuration (`--cache-*`)."""

from __future__ import annotations

from rerank_service.cache.memory import MemoryTier
from rerank_service.cache.redis_tier import RedisTier, redis_client
from rerank_service.cache.score_cache import ScoreCache
from rerank_service.config import SettingError, ca_bundle
from rerank_service.config.server import CacheConfig
from rerank_service.observability.cache_metrics import CacheMetrics


def build_score_cache(config: CacheConfig, metrics: CacheMetrics | None = None) -> ScoreCache | None:
    """The tiers the configuration asks for; None when it asks for none (no memory, no store).
    `metrics` report its state from now on, before its first call (rerank_cache_store_up)."""
    memory = MemoryTier(config.memory_bytes, config.ttl) if config.memory_bytes > 0 else None
    redis = None
    if config.store is not None:
        ca_file = None
        if config.store_ca_file is not None:
            ca_file = ca_bundle(config.store_ca_file, "cache_store_ca_file")
        try:
            client = redis_client(config.store, timeout=config.store_timeout, ca_file=ca_file)
        except ValueError as exc:  # a URL redis-py cannot read (settings.py refuses those first)
            raise SettingError("cache_store", str(exc)) from None
        redis = RedisTier(client, ttl=config.ttl, timeout=config.store_timeout)
    if memory is None and redis is None:
        return None
    cache = ScoreCache(memory, redis)
    if metrics is not None:
        metrics.sync(cache.counts())
    return cache
