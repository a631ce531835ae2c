"""A micro-batcher: merges the pairs of concurrent requests into model batches.

Requests put their encoded pairs on one queue. A single worker takes a window of
pairs from it in arrival order (oldest request first, a request's pairs by index;
after waiting `max_wait` for company when the queue is short), sorts the window by
length so similar lengths share a batch (less padding), cuts it into batches bounded
by a pair count and a padded-token budget, and runs each batch on one inference
thread, off the event loop, so the server keeps answering while the model works.
Then it takes the next window; whatever arrived meanwhile queues behind the rest.

Fairness bound. A window holds at most W = window_batches x max_batch_size pairs
(a request larger than that is split over consecutive windows), and windows are
cut from the queue strictly in arrival order. So length sorting reorders pairs only
inside one window: a request is done when the window holding its last pair has run,
and the only pairs of later requests that can run before it are in that window, at
most W - 1 of them (window_batches full batches; more, smaller batches only where the
token budget cuts them). Sorting everything queued instead, as this module once did,
let any number of later short pairs run ahead of a long request, and made a round
(hence the tail latency) grow with the queue.

With `merge=False` every request is batched on its own, whole (still sorted and
bounded), in arrival order: the one-request-at-a-time baseline the benchmark
compares against.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc

from rerank_service.backends.local.scorer import Encoded, Scorer
from rerank_service.core.domain import FailureKind, ServiceError, not_ready
from rerank_service.observability import tracing
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.tracing import SpanHandle

_log = get_logger("rerank_service.batcher")


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int = 32
    # Padded tokens per batch: pairs x longest pair. Bounds activation memory.
    max_batch_tokens: int = 16384
    # How long the worker waits for more requests when the queue is short.
    max_wait: float = 0.002
    # Pairs taken from the queue at once, in full batches: sorting by length (less
    # padding) happens only within such a window, which bounds how many later pairs
    # can overtake a request (see the module docstring). A wider window pads less and
    # overtakes more: with lengths spread evenly, 4 batches padded tokens to 1.20x
    # the real ones, 8 to 1.10x, sorting everything queued to 1.05x.
    window_batches: int = 8


@dataclass(eq=False)
class _Job:
    """One request's pairs and where their scores go."""

    items: Sequence[Encoded]
    future: asyncio.Future[list[float]]
    scores: list[float] = field(default_factory=list)
    remaining: int = 0
    # The next pair not yet taken into a window (a large request spans several).
    taken: int = 0
    enqueued_at: float = 0.0
    started: bool = False
    # This request's own timing, handed back with its scores.
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    # The span of the call it came from (tracing on and sampled): its queue wait and the
    # forward passes that served it are recorded under it.
    span: SpanHandle | None = None

    def __post_init__(self) -> None:
        self.scores = [0.0] * len(self.items)
        self.remaining = len(self.items)


@dataclass(frozen=True, slots=True)
class _Pair:
    job: _Job
    index: int

    @property
    def item(self) -> Encoded:
        return self.job.items[self.index]


class TimedScores(NamedTuple):
    """One request's scores, in order, and where its time went."""

    scores: list[float]
    queue_seconds: float  # from arrival to its first batch
    inference_seconds: float  # the batches that held its pairs ran this long


@dataclass
class BatchStats:
    """Counters for tests and benchmarks (the Prometheus metrics are the `Metrics` given)."""

    batches: int = 0
    pairs: int = 0
    largest_batch: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0


class MicroBatcher:
    def __init__(
        self,
        scorer: Scorer,
        limits: BatchLimits | None = None,
        merge: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self._scorer = scorer
        # Batches and queue time (None: a Metrics of its own, served nowhere: tests).
        self._metrics = metrics if metrics is not None else Metrics()
        self._limits = limits or BatchLimits()
        self._merge = merge
        self._queue: deque[_Job] = deque()
        # Pairs per window; at least one batch, so every window makes progress.
        self._window = max(1, self._limits.window_batches) * max(1, self._limits.max_batch_size)
        # The window being run: its requests may have left the queue, and close() ends them too.
        self._running: list[_Pair] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # One inference thread: the model is not re-entrant, and torch parallelises inside.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")
        # Set by close(): nothing queues behind a worker that is gone.
        self._closed = False
        self.stats = BatchStats()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def close(self) -> None:
        """Stop the worker; every caller still waiting gets BACKEND_NOT_READY, so the router
        may fall back (a bare cancellation would reach the caller as no status at all)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for job in [*self._queue, *(pair.job for pair in self._running)]:
            if not job.future.done():
                job.future.set_exception(_closed_error())
        self._queue.clear()
        self._running = []
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, items: Sequence[Encoded]) -> list[float]:
        """Scores for `items`, in order, computed in batches shared with other requests."""
        return (await self.score_timed(items)).scores

    async def score_timed(self, items: Sequence[Encoded]) -> TimedScores:
        """`score`, with the time the request waited and the time its batches ran."""
        if self._closed:
            raise _closed_error()
        if not items:
            return TimedScores([], 0.0, 0.0)
        job = _Job(
            items,
            asyncio.get_running_loop().create_future(),
            enqueued_at=time.perf_counter(),
            span=tracing.current(),
        )
        self._queue.append(job)
        self._wake.set()
        scores = await job.future
        return TimedScores(scores, job.queue_seconds, job.inference_seconds)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._merge and self._queued_pairs() < self._limits.max_batch_size:
                await asyncio.sleep(self._limits.max_wait)  # let concurrent requests join
            while self._queue:
                self._running = self._take()
                for batch in self._plan(self._running):
                    await self._run_batch(batch)
                self._running = []
                # Not kept while idle: the last batch leads to its call's every tokenized
                # pair (megabytes for a large call), held until the next call otherwise.
                batch = []

    def _queued_pairs(self) -> int:
        return sum(len(job.items) - job.taken for job in self._queue)

    def _take(self) -> list[_Pair]:
        """The next window: the oldest pairs not yet taken, in arrival order.

        Up to `self._window` pairs, a request split where the window ends; without
        merging, the oldest request alone and whole. The untaken pairs of callers that
        left (or whose request already failed) are dropped, never scored.
        """
        pairs: list[_Pair] = []
        while self._queue and len(pairs) < self._window:
            job = self._queue[0]
            if job.future.done():
                self._queue.popleft()
                continue
            end = len(job.items)
            if self._merge:
                end = min(end, job.taken + self._window - len(pairs))
            pairs.extend(_Pair(job, index) for index in range(job.taken, end))
            job.taken = end
            if end == len(job.items):
                self._queue.popleft()
            if not self._merge:
                break
        return pairs

    def _plan(self, window: list[_Pair]) -> list[list[_Pair]]:
        """Sort the window's pairs by length and cut them into bounded batches."""
        # A stable sort: pairs of equal length keep their arrival order.
        pairs = sorted(window, key=lambda pair: pair.item.length)
        batches: list[list[_Pair]] = []
        current: list[_Pair] = []
        for pair in pairs:
            # Sorted ascending, so the newcomer is the longest: the padded cost is count x its length.
            padded = (len(current) + 1) * pair.item.length
            if current and (
                len(current) >= self._limits.max_batch_size or padded > self._limits.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(pair)
        if current:
            batches.append(current)
        return batches

    async def _run_batch(self, batch: list[_Pair]) -> None:
        batch = [pair for pair in batch if not pair.job.future.done()]
        if not batch:
            return
        jobs = {pair.job for pair in batch}
        started = time.perf_counter()
        for job in jobs:
            if not job.started:  # queue time: from arrival to the first batch that serves it
                job.started = True
                waited = started - job.enqueued_at
                self.stats.queue_seconds += waited
                self._metrics.observe_queue(waited)
                job.queue_seconds = waited
                if job.span is not None:
                    job.span.record_child(
                        "rerank.queue", job.enqueued_at, started, {"rerank.pairs": len(job.items)}
                    )
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._executor, self._scorer.score, [p.item for p in batch])
        except Exception as exc:  # the model failed: fail every request in the batch
            self._ran(jobs, len(batch), time.perf_counter() - started)
            _log.exception("batch failed", pairs=len(batch))
            error = _model_failed(f"the model failed on a batch: {type(exc).__name__}")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        self._ran(jobs, len(batch), seconds)
        self.stats.inference_seconds += seconds
        self.stats.batches += 1
        self.stats.pairs += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for pair, score in zip(batch, scores, strict=True):
            job = pair.job
            if not 0.0 <= score <= 1.0:  # NaN too (a float16 overflow on a GPU): no score to give
                if not job.future.done():
                    _log.error("batch scored out of range", score=repr(score), pairs=len(batch))
                    job.future.set_exception(_out_of_range_error(score))
                continue
            job.scores[pair.index] = score
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(job.scores)

    def _ran(self, jobs: set[_Job], pairs: int, seconds: float) -> None:
        """Record a batch that ran (failed or not): the model was busy for every call in it."""
        self._metrics.observe_batch(pairs, seconds)
        ended = time.perf_counter()
        for job in jobs:
            job.inference_seconds += seconds
            if job.span is not None:  # each call's trace shows the forward pass that served it
                job.span.record_child(
                    "rerank.forward",
                    ended - seconds,
                    ended,
                    {"rerank.batch.pairs": pairs, "rerank.batch.calls": len(jobs)},
                )


def _out_of_range_error(score: float) -> ServiceError:
    # Never an answer, nor a cached score: a relevance is in [0, 1], and NaN sorts nowhere.
    return _model_failed(f"the model scored a pair {score!r}, outside [0, 1]")


def _model_failed(message: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INTERNAL,
        message,
        reason="MODEL_FAILED",
        kind=FailureKind.DEPLOYMENT,  # another deployment's model may well answer
    )


def _closed_error() -> ServiceError:
    # A new error per caller: one exception raised in many tasks would share its traceback.
    return not_ready("the model was closed (a reload or shutdown) before it scored the call")
