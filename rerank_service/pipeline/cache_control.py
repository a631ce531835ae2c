"""A caller's `cache-control` (gRPC metadata or HTTP header): what the score cache may do.

`no-store`: neither read nor store this call's scores; `no-cache`: score every pair anew
(nothing read), and store the scores. Other directives, and none, leave the cache on.
"""

from __future__ import annotations

from rerank_service.core.domain import CacheMode
from rerank_service.pipeline.auth import Metadata


def cache_mode(metadata: Metadata | None) -> CacheMode:
    mode = CacheMode.READ_WRITE
    for key, value in metadata or ():
        if key.lower() != "cache-control" or not isinstance(value, str):
            continue
        directives = {directive.strip().lower() for directive in value.split(",")}
        if "no-store" in directives:
            return CacheMode.OFF
        if "no-cache" in directives:
            mode = CacheMode.NO_READ
    return mode
