"""A RerankStream's answers as the edge writes them (api/grpc/edge.py's _write_answers): each
within --stream-idle-timeout plus a second per MIN_READ_RATE bytes of it. A write completes
only once flow control has let the whole answer through, so a client taking a large answer
steadily over a slow link is reading, and must not be cut as one that does not read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import MIN_READ_RATE, _write_answers
from rerank_service.core.domain import ServiceError

IDLE = 0.05  # --stream-idle-timeout, seconds


class SlowClient:
    """A context whose writes complete after `takes` seconds (None: never: a client that
    does not read)."""

    def __init__(self, takes: float | None) -> None:
        self.takes = takes
        self.written: list[Any] = []

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass

    async def write(self, message: Any) -> None:
        if self.takes is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(self.takes)
        self.written.append(message)


def answer(size: int) -> rerank_pb2.RerankStreamResponse:
    """An answer of about `size` bytes (one document's text echoed)."""
    response = rerank_pb2.RerankStreamResponse(id="a")
    response.response.output.results.add(index=0, relevance_score=0.5).document.text = "x" * size
    return response


async def answers(*messages: rerank_pb2.RerankStreamResponse) -> AsyncIterator[Any]:
    for message in messages:
        yield message


async def test_a_large_answer_taken_slowly_but_within_its_size_bound_is_written() -> None:
    """Taken in 0.3 s, six times the idle timeout: a 1 MB answer has some 16 s more."""
    takes = 0.3
    client = SlowClient(takes)
    large = answer(1_000_000)
    assert IDLE + large.ByteSize() / MIN_READ_RATE > 10 * takes  # far within its bound

    await _write_answers(answers(large), client, IDLE)  # type: ignore[arg-type]

    assert client.written == [large]


async def test_an_answer_never_taken_ends_the_stream_not_read() -> None:
    with pytest.raises(ServiceError) as ended:
        await _write_answers(answers(answer(10)), SlowClient(takes=None), IDLE)  # type: ignore[arg-type]

    assert ended.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ended.value.reason == "STREAM_NOT_READ"
