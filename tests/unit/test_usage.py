"""What each caller used: metered from the values each call answered with, and the usage
log's lines (one write each; a failing disk loses lines, never calls)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import grpc
import pytest
from prometheus_client import generate_latest

from rerank_service.cache import MemoryTier, ScoreCache
from rerank_service.cache.single_flight import Flight
from rerank_service.config import ConfigError
from rerank_service.config.callers import BucketLimit, CallerLimits
from rerank_service.core.backend import Backend
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    ModelInfo,
    RerankOutcome,
    RerankRequest,
    ScoredDocument,
    ServiceError,
    replaced,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.core.readiness import Readiness
from rerank_service.observability.caller_metrics import MAX_KEY_CALLERS
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.usage_report import read_usage, table
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.call import Pipeline
from rerank_service.pipeline.callers import Caller, CallerDirectory
from rerank_service.pipeline.limits import FAIR_SHARE, fair_share_refusal
from rerank_service.pipeline.usage import UNKNOWN_MODEL, MeteredCall, UsageLog, UsageMeter, open_usage_log
from rerank_service.routing.cached_scores import CachedScores
from tests.support.logs import LogCapture

SEARCH = Caller("search", configured=True)


def answered(tokens: int, documents: int, source: str = "upstream") -> MeteredCall:
    outcome = RerankOutcome([], tokens, ["up-1"], usage_source=source, deployments=["eu"], cached_tokens=7)
    return MeteredCall(
        SEARCH, "qwen3-rerank", True, grpc.StatusCode.OK, documents, outcome, None, "r1", "Rerank", 0.01
    )


def refused(error: ServiceError, model: str | None = "qwen3-rerank", known: bool = True) -> MeteredCall:
    return MeteredCall(
        SEARCH, model, known, error.code, 3 if model else None, None, error, "r2", "Rerank", 0.001
    )


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_the_metrics_and_the_table_add_up_what_the_calls_were_told(tmp_path: Path) -> None:
    metrics = Metrics()
    meter = UsageMeter(metrics.callers, UsageLog(str(tmp_path / "usage.jsonl")))
    limited = fair_share_refusal("search", 2, 4, 0.5)

    meter.record(answered(100, 3))
    meter.record(answered(250, 5, source="estimate"))
    meter.record(refused(limited, model=None))  # refused at admission: only counted as refused
    meter.record(refused(ServiceError(grpc.StatusCode.NOT_FOUND, "no"), model="typo", known=False))
    meter.close()
    usage = read_usage(exposition(metrics))
    lines = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]

    totals = usage.by_model["search", "qwen3-rerank"]
    assert (totals.calls, totals.ok, totals.documents) == (2, 2, 8)
    assert totals.tokens == {"upstream": 100, "estimate": 250}
    assert totals.cached_tokens == 14
    assert usage.by_model["search", UNKNOWN_MODEL].calls == 1  # a model name a caller made up is no label
    assert usage.limited == {"search": {FAIR_SHARE: 1}}
    shown = table(usage)
    assert "search  qwen3-rerank" in shown
    assert f"search: {FAIR_SHARE} 1" in shown
    assert [(line["tokens"], line["documents"], line["code"]) for line in lines] == [
        (100, 3, "OK"),
        (250, 5, "OK"),
        (0, 0, "NOT_FOUND"),
    ]
    assert lines[0]["deployment"] == "eu"
    assert lines[0]["upstream_request_ids"] == ["up-1"]
    assert lines[2]["model"] == UNKNOWN_MODEL


def test_a_call_answered_then_failed_logs_the_tokens_its_answer_cost(tmp_path: Path) -> None:
    """An answer too large to send (ANSWER_TOO_LARGE) was billed upstream and charged to the
    caller's tokens limit, while its usage line said tokens 0."""
    path = tmp_path / "usage.jsonl"
    meter = UsageMeter(Metrics().callers, UsageLog(str(path)))
    outcome = RerankOutcome([], 900, ["up-1", "up-2"], usage_source="upstream", backend_calls=2)
    too_large = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too large", reason="ANSWER_TOO_LARGE")

    meter.record(
        MeteredCall(SEARCH, "qwen3-rerank", True, too_large.code, 4, outcome, too_large, "r", "Rerank", 0.01)
    )
    meter.close()

    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert (line["code"], line["documents"], line["tokens"], line["backend_calls"]) == (
        "RESOURCE_EXHAUSTED", 0, 900, 2,
    )  # fmt: skip


def test_a_usage_log_that_cannot_be_written_loses_lines_not_calls(logs: LogCapture) -> None:
    log = UsageLog("/dev/full")  # every write: no space left on the device
    meter = UsageMeter(Metrics().callers, log)

    meter.record(answered(1, 1))
    meter.record(answered(1, 1))
    meter.close()

    assert log.lost == 2
    errors = [event for event in logs.events() if event["event"].startswith("usage log")]
    assert len(errors) == 1  # logged once, not per line


# Writes four lines to the usage log at argv[1] with the disk filling 100 bytes into the
# second (RLIMIT_FSIZE, in a process of its own: os.write writes what fits and says how much,
# the next write fails) and room again before the fourth; its last line: `lost` after each.
FULL_DISK = """
import os, resource, sys
from rerank_service.pipeline.usage import UsageLog
log, lost = UsageLog(sys.argv[1]), []
def write(number):
    log.write({"line": number, "pad": "p" * 200})
    lost.append(log.lost)
write(1)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1]) + 100, hard))
write(2)
write(3)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
write(4)
print(*lost)
"""


def test_a_line_a_full_disk_cuts_short_is_lost_and_the_next_one_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, check=True
    )

    lost = child.stdout.splitlines()[-1]
    assert lost == "0 1 2 0"  # the cut line and the one refused whole are lost; counted until room again
    first, torn, last = path.read_text().splitlines()
    assert json.loads(first)["line"] == 1
    assert torn.startswith('{"line":2')  # one bad line, and nothing glued on to it
    assert not torn.endswith("}")
    assert json.loads(last)["line"] == 4


def test_a_usage_log_that_cannot_be_opened_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"usage-log .*: cannot open it"):
        open_usage_log(str(tmp_path / "missing" / "usage.jsonl"))
    assert open_usage_log(None) is None


def test_tokens_nobody_accepted_never_take_the_labels_of_keys_in_use() -> None:
    """Pass-through: a flood of calls with junk tokens (each refused upstream) shares `other`,
    and a key in use still gets a label of its own with its first answered call."""
    metrics = Metrics()
    meter = UsageMeter(metrics.callers)
    refusal = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "upstream refused the key")
    for number in range(MAX_KEY_CALLERS + 10):
        junk = Caller(f"key-{number:08x}", per_token=True)
        meter.record(
            MeteredCall(junk, "qwen3-rerank", True, refusal.code, 1, None, refusal, "r", "Rerank", 0.01)
        )
    real = Caller("key-feedbeef", per_token=True)
    outcome = RerankOutcome([], 5, ["up-1"], usage_source="upstream", deployments=["eu"])
    meter.record(
        MeteredCall(real, "qwen3-rerank", True, grpc.StatusCode.OK, 1, outcome, None, "r", "Rerank", 0.01)
    )

    text = exposition(metrics)
    assert 'caller="key-feedbeef"' in text
    assert 'caller="key-00000000"' not in text
    assert (
        'rerank_caller_calls_total{caller="other",code="UNAUTHENTICATED",model="qwen3-rerank"} 266.0' in text
    )


def test_calls_no_backend_answered_never_take_the_labels_of_keys_in_use() -> None:
    """Pass-through: ListModels, GET /v1/models and an empty stream's own call end OK without
    the token ever reaching the upstream; junk tokens calling them took all the labels, and
    a real key's answered calls were counted under `other`."""
    metrics = Metrics()
    meter = UsageMeter(metrics.callers)
    for number in range(MAX_KEY_CALLERS + 10):
        junk = Caller(f"key-{number:08x}", per_token=True)
        meter.record(
            MeteredCall(junk, None, False, grpc.StatusCode.OK, None, None, None, "r", "ListModels", 0.01)
        )
    real = Caller("key-feedbeef", per_token=True)
    outcome = RerankOutcome([], 5, ["up-1"], usage_source="upstream", deployments=["eu"])
    meter.record(
        MeteredCall(real, "qwen3-rerank", True, grpc.StatusCode.OK, 1, outcome, None, "r", "Rerank", 0.01)
    )

    text = exposition(metrics)
    assert (
        'rerank_caller_tokens_total{caller="key-feedbeef",model="qwen3-rerank",source="upstream"} 5.0' in text
    )
    assert 'caller="key-00000000"' not in text


@pytest.mark.parametrize("name", ["key-ed80cb23", "anonymous"], ids=["--api-keys", "no keys"])
def test_a_caller_of_the_configuration_is_its_own_label_from_its_first_failed_call(name: str) -> None:
    """--api-keys' callers and `anonymous` are a bounded set: only pass-through's callers,
    made per token, wait for an answered call. A replica started during an upstream outage
    counted its known callers' failures as `other`."""
    metrics = Metrics()
    meter = UsageMeter(metrics.callers)
    failure = ServiceError(grpc.StatusCode.UNAVAILABLE, "upstream unavailable")

    meter.record(
        MeteredCall(Caller(name), "qwen3-rerank", True, failure.code, 1, None, failure, "r", "Rerank", 0.01)
    )

    text = exposition(metrics)
    assert f'rerank_caller_calls_total{{caller="{name}",code="UNAVAILABLE",model="qwen3-rerank"}} 1.0' in text
    assert 'caller="other"' not in text


class _SecondChunkHangs:
    """A backend of one document a call: the first chunk answers (7 tokens), the second
    waits until the call is cancelled."""

    def __init__(self) -> None:
        self.answered = asyncio.Event()

    @property
    def readiness(self) -> Readiness:
        return Readiness(True)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("qwen3-rerank", 100, 100, supports_instruct=True, backend="upstream")]

    def call_limits(self, model: str) -> CallLimits:
        return CallLimits(max_documents=1)

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        if self.answered.is_set():
            await asyncio.Event().wait()
        self.answered.set()
        return BackendResult([ScoredDocument(0, 0.5)], total_tokens=7)


def test_a_split_call_cancelled_logs_what_its_answered_chunks_cost(tmp_path: Path) -> None:
    """Its caller hung up (or its deadline passed) after one chunk was answered: billed
    upstream, it was logged tokens 0."""
    path = tmp_path / "usage.jsonl"
    backend = _SecondChunkHangs()
    engine = RerankEngine(cast(Backend, backend), chunk_concurrency=1, max_fanout_factor=100)
    pipeline = Pipeline(
        engine, Admission(4), CallerDirectory(), usage=UsageMeter(Metrics().callers, UsageLog(str(path)))
    )
    call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", pipeline.metrics.for_method("m"))
    call.caller = SEARCH
    call.admit(0)

    async def cancelled_after_a_chunk() -> None:
        running = asyncio.create_task(
            call.rerank(RerankRequest("qwen3-rerank", "q", ["a", "b"]), CallContext())
        )
        await backend.answered.wait()
        await asyncio.sleep(0)  # the second chunk starts
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(cancelled_after_a_chunk())
    call.finish()
    pipeline.usage.close()

    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert (line["code"], line["tokens"], line["backend_calls"]) == ("CANCELLED", 7, 1)


class _StoreHangs(ScoreCache):
    """A score cache whose writes of new scores never end (a Redis answering them slowly,
    within --cache-store-timeout); `storing` is set once `expected` calls are writing."""

    def __init__(self, expected: int) -> None:
        super().__init__(MemoryTier(1 << 20, 60.0))
        self.expected = expected
        self.writing = 0
        self.storing = asyncio.Event()

    async def store_columns(
        self,
        keys: Sequence[bytes],
        scores: Sequence[float],
        tokens: Sequence[int | None],
        flight: Flight | None = None,
    ) -> None:
        await super().store_columns(keys, scores, tokens, flight)
        self.writing += 1
        if self.writing == self.expected:
            self.storing.set()
        await asyncio.Event().wait()


class _Route:
    """A route's deployments as the router sends them a call, one document a chunk: document
    `d` goes to `where[d]`, named as it is sent (the router's `Attempted`), whose backend
    answers it 7 tokens under the upstream id `up-d`, through the score cache where there is
    one; but the document `refused` is refused by its deployment once `refuse_after` is set,
    and every document waits for its cancellation where `hangs`."""

    def __init__(
        self,
        where: dict[str, str],
        cache: ScoreCache | None = None,
        refused: str | None = None,
        refuse_after: asyncio.Event | None = None,
        hangs: bool = False,
    ) -> None:
        self.readiness = Readiness(True)
        self.where = where
        self.cached = None
        if cache is not None:
            self.cached = CachedScores(cache, lambda model: {"model": model}, Metrics().cache)
        self.refused, self.refuse_after, self.hangs = refused, refuse_after, hangs
        self.sent = asyncio.Event()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("qwen3-rerank", 100, 100, supports_instruct=True, backend="upstream")]

    def call_limits(self, model: str) -> CallLimits:
        return CallLimits(max_documents=1)

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        (document,) = request.documents
        deployment = self.where[document]
        if context.attempted is not None:
            context.attempted.deployment = deployment

        async def score(request: BackendRequest, context: CallContext) -> BackendResult:
            self.sent.set()
            if document == self.refused:
                if self.refuse_after is not None:
                    await self.refuse_after.wait()
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "refused").at_deployment(deployment)
            if self.hangs:
                await asyncio.Event().wait()
            return BackendResult([ScoredDocument(0, 0.5)], 7, upstream_request_id=f"up-{document}")

        if self.cached is None:
            result = await score(request, context)
        else:
            result = await self.cached.rerank("route", request, context, score)
        return replaced(result, deployment=deployment)


_TOKENS = BucketLimit("tokens_per_minute", 0.001, 1000)  # no refill within a test


def _metered(
    tmp_path: Path,
    route: _Route,
    documents: list[str],
    cancel_once: asyncio.Event | None = None,
    chunk_concurrency: int = 3,
) -> tuple[dict[str, object], float]:
    """The usage line of a call of `documents` to `route`, cancelled once `cancel_once` is
    set (where given), and what its caller's tokens bucket (1,000) holds after it."""
    path = tmp_path / "usage.jsonl"
    engine = RerankEngine(cast(Backend, route), chunk_concurrency=chunk_concurrency, max_fanout_factor=100)
    pipeline = Pipeline(
        engine, Admission(4), CallerDirectory(), usage=UsageMeter(Metrics().callers, UsageLog(str(path)))
    )
    call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", pipeline.metrics.for_method("m"))
    call.caller = Caller("search", limits=CallerLimits(tokens=_TOKENS), configured=True)
    call.admit(0)

    async def run() -> None:
        running = asyncio.create_task(
            call.rerank(RerankRequest("qwen3-rerank", "q", documents), CallContext(attempted=call.attempted))
        )
        if cancel_once is not None:
            await cancel_once.wait()
            running.cancel()
        try:
            await running
        except ServiceError as error:
            call.failed(error)
        except asyncio.CancelledError:
            assert cancel_once is not None

    asyncio.run(run())
    call.finish()
    pipeline.usage.close()
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    return line, pipeline.limiter.local.level("search", _TOKENS)


def test_a_call_cancelled_while_its_scores_are_stored_logs_what_its_answer_cost(tmp_path: Path) -> None:
    """Its deadline passed (or its caller went away) while a slow Redis took its new scores:
    billed upstream, and its scores then served as cached_tokens, it was logged tokens 0."""
    cache = _StoreHangs(expected=1)
    route = _Route({"a": "eu"}, cache)

    line, _ = _metered(tmp_path, route, ["a"], cancel_once=cache.storing)

    assert (line["code"], line["tokens"], line["backend_calls"]) == ("CANCELLED", 7, 1)
    assert (line["deployment"], line["upstream_request_ids"]) == ("eu", ["up-a"])


def test_a_split_call_failed_while_its_answered_chunks_are_stored_is_metered_for_them(
    tmp_path: Path,
) -> None:
    """A chunk refused while the two answered ones wrote their scores to a slow Redis: they
    were cancelled as not answered, and the call logged tokens 0 and gave its caller's whole
    estimate back, named after the deployment that refused it."""
    cache = _StoreHangs(expected=2)
    route = _Route({"a": "eu", "b": "eu", "c": "us"}, cache, refused="c", refuse_after=cache.storing)

    line, left = _metered(tmp_path, route, ["a", "b", "c"])

    assert (line["code"], line["tokens"], line["backend_calls"]) == ("INVALID_ARGUMENT", 14, 2)
    assert line["deployment"] == "eu"
    assert sorted(cast(list[str], line["upstream_request_ids"])) == ["up-a", "up-b"]
    assert left == pytest.approx(1000 - 14, abs=0.01)


def test_a_split_call_cancelled_while_its_chunks_are_stored_logs_what_they_cost(tmp_path: Path) -> None:
    cache = _StoreHangs(expected=3)
    route = _Route({"a": "eu", "b": "eu", "c": "us"}, cache)

    line, _ = _metered(tmp_path, route, ["a", "b", "c"], cancel_once=cache.storing)

    assert (line["code"], line["tokens"], line["backend_calls"]) == ("CANCELLED", 21, 3)
    # Each once, in the order the cancelled chunks kept their answers: the TaskGroup cancels
    # its tasks in the order of a set, so that order is not the chunks'.
    assert sorted(str(line["deployment"]).split(",")) == ["eu", "us"]


def test_a_failed_split_call_names_the_deployment_that_answered_what_it_was_billed(tmp_path: Path) -> None:
    """One deployment answered a chunk, another refused the next: the line said the refusing
    deployment used the tokens, and listed no upstream id to reconcile them with."""
    route = _Route({"a": "d1", "b": "d2"}, refused="b")

    line, left = _metered(tmp_path, route, ["a", "b"], chunk_concurrency=1)

    assert (line["code"], line["tokens"], line["backend_calls"]) == ("INVALID_ARGUMENT", 7, 1)
    assert (line["deployment"], line["upstream_request_ids"]) == ("d1", ["up-a"])
    assert left == pytest.approx(1000 - 7, abs=0.01)


def test_a_call_cancelled_on_its_deployment_names_it(tmp_path: Path) -> None:
    """Its caller went away while the deployment worked on it: the access log named the
    deployment, the usage line none."""
    route = _Route({"a": "eu"}, hangs=True)

    line, _ = _metered(tmp_path, route, ["a"], cancel_once=route.sent)

    assert (line["code"], line["tokens"], line["deployment"]) == ("CANCELLED", 0, "eu")


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "ANSWER_TOO_LARGE"),  # over --max-message-bytes
        (grpc.StatusCode.CANCELLED, None),  # a RerankStream item whose answer was never sent
    ],
)
def test_tokens_per_call_counts_successful_calls_only(code: grpc.StatusCode, reason: str | None) -> None:
    """A call answered by its backend that failed after observed its tokens in
    rerank_tokens_per_call, whose help and docs say successful calls only."""
    engine = RerankEngine(
        cast(Backend, _Route({"a": "eu", "b": "eu"})), chunk_concurrency=1, max_fanout_factor=100
    )
    pipeline = Pipeline(engine, Admission(4), CallerDirectory())
    measured = pipeline.metrics.for_method("/rerank.v1.RerankService/Rerank")

    def sample(name: str) -> float | None:
        return pipeline.metrics.registry.get_sample_value(name)

    for failed in (False, True):
        call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", measured)
        call.admit(0)
        asyncio.run(call.rerank(RerankRequest("qwen3-rerank", "q", ["a", "b"]), CallContext()))
        if failed:
            call.failed(ServiceError(code, "it failed after", reason=reason))
        else:
            call.succeeded()
        call.finish()

    assert (sample("rerank_tokens_per_call_count"), sample("rerank_tokens_per_call_sum")) == (1, 14)
    assert sample("rerank_documents_per_call_count") == 2  # documents: every call let through
