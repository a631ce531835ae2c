"""The micro-batcher merges concurrent requests, bounds batches, and routes scores back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import grpc
import pytest

from rerank_service.backends.local.batcher import BatchLimits, MicroBatcher
from rerank_service.backends.local.scorer import Encoded
from rerank_service.core.domain import ServiceError


class RecordingScorer:
    """Scores a pair as sum(ids) / 1000 and records each batch it is given."""

    kind = "fake"
    supports_instruct = False
    max_length = 512
    device = "cpu"

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list[Encoded]] = []
        self.threads: set[str] = set()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        return [pair(len(document)) for document in documents]

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(batch))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and any(item.input_ids[0] == self.fail_on for item in batch):
            raise RuntimeError("CUDA out of memory (pretend)")
        return [expected(item) for item in batch]


def pair(length: int, first: int = 1) -> Encoded:
    return Encoded(input_ids=(first, *([1] * (length - 1))), tokens=length)


def expected(item: Encoded) -> float:
    return sum(item.input_ids) / 1000


async def started(scorer: RecordingScorer, **kwargs: object) -> MicroBatcher:
    batcher = MicroBatcher(scorer, **kwargs)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_scores_come_back_in_request_order() -> None:
    scorer = RecordingScorer()
    batcher = await started(scorer)
    items = [pair(n) for n in (9, 3, 7, 1, 5)]

    scores = await batcher.score(items)

    assert scores == [expected(item) for item in items]
    await batcher.close()


async def test_concurrent_requests_share_batches() -> None:
    scorer = RecordingScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=64, max_wait=0.02))
    requests = [[pair(n + i) for n in range(1, 5)] for i in range(8)]

    results = await asyncio.gather(*(batcher.score(items) for items in requests))

    assert results == [[expected(item) for item in items] for items in requests]
    assert len(scorer.batches) == 1  # 8 requests x 4 pairs merged into one model call
    assert batcher.stats.largest_batch == 32
    await batcher.close()


async def test_without_merging_each_request_is_batched_alone() -> None:
    scorer = RecordingScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=64, max_wait=0.02), merge=False)
    requests = [[pair(n + i) for n in range(1, 5)] for i in range(8)]

    results = await asyncio.gather(*(batcher.score(items) for items in requests))

    assert results == [[expected(item) for item in items] for items in requests]
    assert [len(batch) for batch in scorer.batches] == [4] * 8
    await batcher.close()


async def test_batches_respect_the_pair_count_and_padded_token_budget() -> None:
    scorer = RecordingScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=4, max_batch_tokens=100))
    items = [pair(n) for n in (10, 10, 10, 10, 10, 30, 30, 30, 60, 120)]

    scores = await batcher.score(items)

    assert scores == [expected(item) for item in items]
    for batch in scorer.batches:
        assert len(batch) <= 4
        longest = max(item.length for item in batch)
        assert len(batch) * longest <= 100 or len(batch) == 1  # a lone over-long pair still runs
    assert sorted(len(batch) for batch in scorer.batches) == [1, 1, 1, 3, 4]
    await batcher.close()


async def test_pairs_are_sorted_by_length_so_batches_hold_similar_lengths() -> None:
    scorer = RecordingScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=3))
    lengths = [50, 2, 49, 3, 48, 1]

    await batcher.score([pair(n) for n in lengths])

    assert [[item.length for item in batch] for batch in scorer.batches] == [[1, 2, 3], [48, 49, 50]]
    await batcher.close()


async def test_a_cancelled_request_is_dropped_from_the_queue() -> None:
    scorer = RecordingScorer(delay=0.2)
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=2, max_wait=0))
    first = asyncio.ensure_future(batcher.score([pair(5)]))
    await asyncio.sleep(0.05)  # the first batch is now running
    doomed = asyncio.create_task(batcher.score([pair(7, first=99) for _ in range(6)]))  # noqa: RUF006 - kept, and cancelled below
    await asyncio.sleep(0)
    doomed.cancel()

    assert await first == [expected(pair(5))]
    await asyncio.sleep(0.3)
    assert doomed.cancelled()
    assert all(item.input_ids[0] != 99 for batch in scorer.batches for item in batch)
    await batcher.close()


async def test_a_failing_batch_fails_its_requests_with_internal_and_the_next_one_works() -> None:
    scorer = RecordingScorer(fail_on=42)
    batcher = await started(scorer)

    with pytest.raises(ServiceError) as caught:
        await batcher.score([pair(3, first=42)])
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert caught.value.reason == "MODEL_FAILED"
    assert "out of memory" not in caught.value.message  # the exception type, not its text

    assert await batcher.score([pair(3)]) == [expected(pair(3))]
    await batcher.close()


async def test_the_model_runs_off_the_event_loop() -> None:
    scorer = RecordingScorer(delay=0.3)
    batcher = await started(scorer)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    await batcher.score([pair(4)])
    ticker.cancel()

    assert ticks >= 15  # the loop kept running while the 0.3 s batch ran
    assert scorer.threads == {"rerank-model_0"}
    await batcher.close()


async def test_an_empty_request_needs_no_batch() -> None:
    scorer = RecordingScorer()
    batcher = await started(scorer)

    assert await batcher.score([]) == []
    assert scorer.batches == []
    await batcher.close()
