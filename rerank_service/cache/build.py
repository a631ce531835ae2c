"""The process's score cache from its configuration (`--cache-*`)."""

from __future__ import annotations

from pathlib import Path

from rerank_service.cache.memory import MemoryTier
from rerank_service.cache.redis_tier import RedisTier, redis_client
from rerank_service.cache.score_cache import ScoreCache
from rerank_service.config import SettingError
from rerank_service.config.server import CacheConfig


def build_score_cache(config: CacheConfig) -> ScoreCache | None:
    """The tiers the configuration asks for; None when it asks for none (no memory, no store)."""
    memory = MemoryTier(config.memory_bytes, config.ttl) if config.memory_bytes > 0 else None
    redis = None
    if config.store is not None:
        ca_file = None if config.store_ca_file is None else _readable(config.store_ca_file)
        client = redis_client(config.store, timeout=config.store_timeout, ca_file=ca_file)
        redis = RedisTier(client, ttl=config.ttl, timeout=config.store_timeout)
    if memory is None and redis is None:
        return None
    return ScoreCache(memory, redis)


def _readable(path: Path) -> str:
    """`path`, checked now: a CA file that cannot be read stops start-up (exit 2), not every
    Redis round trip later."""
    try:
        path.read_bytes()
    except OSError as exc:
        raise SettingError("cache_store_ca_file", exc.strerror or str(exc), path) from None
    return str(path)
