"""The upstream wire formats by name: the --upstream-dialect values and what each builds.

Kept apart from dialect.py, which each format's module imports for the protocol and
the shared parsing, so the base never imports the formats back.
"""

from __future__ import annotations

from collections.abc import Callable

from rerank_service.backends.upstream.cohere import Cohere
from rerank_service.backends.upstream.compatible import DashScopeCompatible
from rerank_service.backends.upstream.dashscope import DashScopeNative
from rerank_service.backends.upstream.dialect import Dialect, DialectOptions
from rerank_service.backends.upstream.tei import TextEmbeddingsInference
from rerank_service.backends.upstream.voyage import Voyage

DIALECTS: dict[str, Callable[[DialectOptions], Dialect]] = {
    DashScopeNative.name: DashScopeNative,
    DashScopeCompatible.name: DashScopeCompatible,
    Cohere.name: Cohere,
    TextEmbeddingsInference.name: TextEmbeddingsInference,
    Voyage.name: Voyage,
}


def build_dialect(name: str, options: DialectOptions) -> Dialect:
    """The dialect called `name` (the --upstream-dialect values), with the options."""
    try:
        make = DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown upstream dialect {name!r}; known: {', '.join(DIALECTS)}") from None
    return make(options)
