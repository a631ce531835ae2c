"""core/domain.py's `replaced`: what dataclasses.replace gives, for the call path's value objects."""

from __future__ import annotations

import dataclasses

import pytest

from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CacheMode,
    CacheOutcome,
    CallContext,
    ScoredDocument,
    replaced,
)
from rerank_service.core.retry_budget import RetryBudget

RESULT = BackendResult(
    scores=[ScoredDocument(1, 0.5), ScoredDocument(0, 0.25)],
    total_tokens=40,
    upstream_request_id="upstream-1",
    usage_source="estimate",
    cache=CacheOutcome.PARTIAL,
    cached_tokens=7,
)


@pytest.mark.parametrize(
    ("value", "changes"),
    [
        (RESULT, {"deployment": "primary", "cached_tokens": 9}),
        (RESULT, {"scores": [ScoredDocument(0, 1.0)], "cache": CacheOutcome.MISS}),
        (CallContext(deadline=12.5, traceparent="00-trace"), {"retry_budget": RetryBudget()}),
        (CallContext(), {"cache_mode": CacheMode.OFF}),
        (BackendRequest(model="a", query="q", documents=["d"], instruct=None, top_n=3), {"model": "b"}),
        (BackendRequest(model="a", query="q", documents=["d"], instruct="i", top_n=3), {}),
    ],
)
def test_replaced_gives_what_dataclasses_replace_gives(value: object, changes: dict[str, object]) -> None:
    copy = replaced(value, **changes)

    assert copy == dataclasses.replace(value, **changes)  # type: ignore[type-var]
    assert copy is not value
    assert type(copy) is type(value)


def test_the_original_is_left_as_it_was() -> None:
    before = dataclasses.replace(RESULT)

    replaced(RESULT, total_tokens=1, deployment="other")

    assert before == RESULT


def test_a_field_the_dataclass_does_not_have_is_refused() -> None:
    with pytest.raises(TypeError, match="no_such_field"):
        replaced(RESULT, no_such_field=1)
