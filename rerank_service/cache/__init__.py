"""The score cache: a pair's score, once computed, answered again without the backend.

`keys.py` (the pair key: a digest of the deployment's fingerprint, the instruct, the query
and the document), `entry.py` (the cached value, packed), `memory.py` (the in-process LRU
tier, bounded in bytes, with a time to live), `redis_tier.py` (the shared tier: one round
trip a lookup, a miss on any failure), `single_flight.py` (identical pairs in flight
computed once), `score_cache.py` (the tiers and single flight behind one lookup and one
store per call).
"""

from rerank_service.cache.entry import CachedScore
from rerank_service.cache.keys import PairKeys, deployment_fingerprint
from rerank_service.cache.memory import MemoryTier
from rerank_service.cache.redis_tier import RedisTier, redis_client
from rerank_service.cache.score_cache import CacheLookup, CacheStats, ScoreCache
from rerank_service.core.domain import CacheMode, CacheOutcome

__all__ = [
    "CacheLookup",
    "CacheMode",
    "CacheOutcome",
    "CacheStats",
    "CachedScore",
    "MemoryTier",
    "PairKeys",
    "RedisTier",
    "ScoreCache",
    "deployment_fingerprint",
    "redis_client",
]
