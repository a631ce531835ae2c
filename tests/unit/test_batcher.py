"""The micro-batcher merges concurrent requests, bounds batches, and routes scores back."""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
import weakref
from collections.abc import Sequence

import grpc
import pytest

from rerank_service.backends.local.batcher import BatchLimits, MicroBatcher
from rerank_service.backends.local.scorer import Encoded
from rerank_service.core.domain import FailureKind, ServiceError
from tests.support.waiting import wait_until_async


class RecordingScorer:
    """Scores a pair as sum(ids) / 1000 and records each batch it is given."""

    kind = "fake"
    supports_instruct = False
    max_length = 512
    device = "cpu"
    dtype = "float32"
    engine = "torch"

    def __init__(self, delay: float = 0.0, fail_on: int | None = None, nan_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.nan_on = nan_on  # pairs whose first id is this score NaN (a float16 overflow)
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
            time.sleep(self.delay)  # the model's work, not synchronisation
        if self.fail_on is not None and any(item.input_ids[0] == self.fail_on for item in batch):
            raise RuntimeError("CUDA out of memory (pretend)")
        return [math.nan if item.input_ids[0] == self.nan_on else expected(item) for item in batch]


def pair(length: int, first: int = 1) -> Encoded:
    return Encoded(input_ids=(first, *([1] * (length - 1))), tokens=length)


def expected(item: Encoded) -> float:
    return sum(item.input_ids) / 1000


class GatedScorer(RecordingScorer):
    """A RecordingScorer that holds each batch until the test lets it through.

    So the test, not the clock, decides what is queued while the model is busy.
    """

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()
        self._allowed = 0  # batches the test has let through
        self._open = False

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        with self._changed:
            self.batches.append(list(batch))
            number = len(self.batches)
            self._changed.notify_all()
            if not self._changed.wait_for(lambda: self._open or self._allowed >= number, timeout=5):
                raise TimeoutError(f"batch {number} was never let through")
        return [expected(item) for item in batch]

    async def holding(self, count: int) -> None:
        """Wait until the model has been handed `count` batches (the last one is held)."""

        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: len(self.batches) >= count, timeout=5)

        assert await asyncio.to_thread(wait), f"the model never got batch {count}"

    def let_through(self) -> None:
        with self._changed:
            self._allowed += 1
            self._changed.notify_all()

    def open(self) -> None:
        """Let every batch through from now on."""
        with self._changed:
            self._open = True
            self._changed.notify_all()


def firsts(scorer: RecordingScorer) -> list[list[int]]:
    """Each batch the model got, as the first id of its pairs (the tests' request tags)."""
    return [[item.input_ids[0] for item in batch] for batch in scorer.batches]


def lengths(scorer: RecordingScorer) -> list[list[int]]:
    return [[item.length for item in batch] for batch in scorer.batches]


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
    await wait_until_async(lambda: bool(scorer.batches), what="the first batch running")
    doomed = asyncio.create_task(batcher.score([pair(7, first=99) for _ in range(6)]))  # noqa: RUF006 - kept, and cancelled below
    await asyncio.sleep(0)
    doomed.cancel()

    assert await first == [expected(pair(5))]
    # Queued after the doomed pairs and longer, so scored after any of them that were kept:
    # once it is answered, every pair that would have been scored has been.
    assert await batcher.score([pair(50)]) == [expected(pair(50))]
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
    assert caught.value.kind is FailureKind.DEPLOYMENT  # another deployment's model may answer
    assert "out of memory" not in caught.value.message  # the exception type, not its text

    assert await batcher.score([pair(3)]) == [expected(pair(3))]
    await batcher.close()


async def test_a_nan_score_fails_its_own_request_and_not_the_others_in_its_batch() -> None:
    scorer = RecordingScorer(delay=0.2, nan_on=13)
    batcher = await started(scorer)
    first = asyncio.ensure_future(batcher.score([pair(5)]))
    await wait_until_async(lambda: bool(scorer.batches), what="the first batch running")
    # Both queue behind the running batch, so the next one holds both.
    overflowed = asyncio.ensure_future(batcher.score([pair(3), pair(3, first=13)]))
    fine = asyncio.ensure_future(batcher.score([pair(4)]))

    assert await first == [expected(pair(5))]
    assert await fine == [expected(pair(4))]
    with pytest.raises(ServiceError) as caught:
        await overflowed
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert caught.value.reason == "MODEL_FAILED"
    assert caught.value.kind is FailureKind.DEPLOYMENT
    assert "nan" in caught.value.message
    assert [len(batch) for batch in scorer.batches] == [1, 3]
    await batcher.close()


async def test_the_model_runs_off_the_event_loop() -> None:
    scorer = RecordingScorer(delay=0.3)
    batcher = await started(scorer)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)  # the ticker's pace, not synchronisation
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


# --- fairness: pairs are sorted by length only within a window taken in arrival order ---


async def test_a_long_request_is_not_overtaken_indefinitely_by_later_short_ones() -> None:
    # Windows of W = 2 batches x 2 pairs = 4 pairs. Twenty short pairs (tag 7) are
    # queued first and the model holds their first batch; then the long request L
    # (two pairs of 50 tokens, tag 5) arrives, and for every batch the model runs two
    # more short requests (2 pairs each, tag 3) arrive: the queue keeps growing.
    # Bound: later pairs run before L only inside L's window, so at most W - 2 = 2
    # short pairs. Sorting everything queued (the old batcher) ran the 20 short
    # requests that arrived during the first round, 40 pairs, ahead of L, and that
    # number grows with the load: L was overtaken without bound.
    scorer = GatedScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=2, window_batches=2, max_wait=0))
    window = 4
    earlier = asyncio.ensure_future(batcher.score([pair(1, first=7) for _ in range(20)]))  # noqa: RUF006 - kept, awaited below
    await scorer.holding(1)
    long = [pair(50, first=5), pair(50, first=5)]
    long_request = asyncio.ensure_future(batcher.score(long))
    shorts: list[asyncio.Future[list[float]]] = []
    for number in range(1, 80):
        shorts += [asyncio.ensure_future(batcher.score([pair(1, first=3)] * 2)) for _ in range(2)]
        await asyncio.sleep(0)  # they are queued
        scorer.let_through()
        await scorer.holding(number + 1)  # batch `number` is done and its scores were handed out
        if long_request.done():
            break

    assert long_request.done(), f"the long request was still waiting after {len(scorer.batches)} batches"
    assert long_request.result() == [expected(item) for item in long]
    done_at = max(index for index, batch in enumerate(firsts(scorer)) if 5 in batch)
    overtaking = sum(batch.count(3) for batch in firsts(scorer)[: done_at + 1])
    assert overtaking <= window - len(long)
    # What arrived before L still ran first: all 20 earlier pairs, in 10 batches.
    assert sum(batch.count(7) for batch in firsts(scorer)[:done_at]) == 20
    scorer.open()
    assert await earlier == [expected(pair(1, first=7))] * 20
    for short in shorts:
        short.cancel()
    await asyncio.gather(*shorts, return_exceptions=True)
    await batcher.close()


async def test_within_a_window_pairs_are_sorted_by_length_and_not_across_windows() -> None:
    scorer = GatedScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=3, window_batches=2, max_wait=0))
    busy = asyncio.ensure_future(batcher.score([pair(9)]))
    await scorer.holding(1)
    # Three requests fill one window of 6 pairs; their pairs share batches by length,
    # so padding stays low. The fourth arrived last: it waits for the next window,
    # although its pairs are the shortest.
    requests = [[pair(50), pair(2)], [pair(49), pair(3)], [pair(48), pair(1)], [pair(1), pair(1)]]
    calls = [asyncio.ensure_future(batcher.score(items)) for items in requests]
    await asyncio.sleep(0)
    scorer.open()

    assert await asyncio.gather(*calls) == [[expected(item) for item in items] for items in requests]
    assert lengths(scorer) == [[9], [1, 2, 3], [48, 49, 50], [1, 1]]
    await busy
    await batcher.close()


async def test_a_request_larger_than_the_window_is_split_over_windows_in_order() -> None:
    scorer = RecordingScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=2, window_batches=2, max_wait=0))
    items = [pair(n) for n in range(10, 0, -1)]

    scores = await batcher.score(items)

    assert scores == [expected(item) for item in items]
    # Windows of 4 pairs in request order, each sorted by length: 10..7, 6..3, 2..1.
    assert lengths(scorer) == [[7, 8], [9, 10], [3, 4], [5, 6], [1, 2]]
    assert batcher.stats.pairs == 10
    await batcher.close()


async def test_windows_follow_arrival_order_across_requests() -> None:
    scorer = GatedScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=2, window_batches=1, max_wait=0))
    busy = asyncio.ensure_future(batcher.score([pair(5, first=9)]))
    await scorer.holding(1)
    # Queued while the model is busy, longest first: sorting everything queued would
    # run C (shortest) first and A last.
    a = asyncio.ensure_future(batcher.score([pair(30, first=1)] * 2))
    b = asyncio.ensure_future(batcher.score([pair(20, first=2)] * 2))
    c = asyncio.ensure_future(batcher.score([pair(10, first=3)] * 2))
    await asyncio.sleep(0)
    scorer.open()

    await asyncio.gather(busy, a, b, c)
    assert firsts(scorer) == [[9], [1, 1], [2, 2], [3, 3]]
    await batcher.close()


async def test_a_cancelled_callers_pairs_not_yet_run_are_never_scored() -> None:
    scorer = GatedScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=2, window_batches=2, max_wait=0))
    # Eight pairs: two windows of 4. The model holds the first batch when the caller leaves:
    # the rest of its window (planned already) and its next window are dropped.
    doomed = asyncio.ensure_future(batcher.score([pair(3, first=99) for _ in range(8)]))  # noqa: RUF006 - kept, cancelled below
    await scorer.holding(1)
    after = asyncio.ensure_future(batcher.score([pair(4), pair(2)]))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.sleep(0)
    scorer.open()

    assert await after == [expected(pair(4)), expected(pair(2))]
    assert doomed.cancelled()
    assert firsts(scorer) == [[99, 99], [1, 1]]
    assert batcher.stats.pairs == 4
    await batcher.close()


async def test_a_failed_request_split_over_windows_is_not_scored_further() -> None:
    scorer = RecordingScorer(fail_on=42)
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=2, window_batches=1, max_wait=0))

    with pytest.raises(ServiceError):
        await batcher.score([pair(1, first=42), *(pair(2) for _ in range(5))])
    assert await batcher.score([pair(3)]) == [expected(pair(3))]
    assert firsts(scorer) == [[42, 1], [1]]  # the failed request's next two windows were dropped
    await batcher.close()


async def test_close_ends_the_callers_of_the_window_being_run() -> None:
    scorer = GatedScorer()
    batcher = await started(scorer, limits=BatchLimits(max_batch_size=1, window_batches=4, max_wait=0))
    # The whole request is in the running window (taken off the queue) when the batcher closes.
    call = asyncio.ensure_future(batcher.score([pair(3), pair(4)]))
    await scorer.holding(1)

    await batcher.close()
    scorer.open()
    with pytest.raises(ServiceError) as raised:
        await asyncio.wait_for(call, timeout=2)
    assert raised.value.reason == "BACKEND_NOT_READY"  # the router falls back on it


class _Traced(Encoded):
    """A pair a weak reference can follow (Encoded has slots and none)."""


async def test_an_idle_batcher_keeps_nothing_of_the_last_call() -> None:
    """The last batch led to its call's every tokenized pair: megabytes for a large call,
    held until the next call came."""
    scorer = RecordingScorer()
    batcher = await started(scorer)
    items = [_Traced(input_ids=(1, 2), tokens=2) for _ in range(50)]
    references = [weakref.ref(item) for item in items]
    await batcher.score(items)
    scorer.batches.clear()  # the test's own record of them
    del items
    gc.collect()

    alive = sum(reference() is not None for reference in references)
    await batcher.close()
    assert alive == 0
