"""The local backend around its models: closing with calls in flight, the event loop kept
free of the tokenizer's lock, the room a query leaves a document, one model per source.

Where a test holds a tokenization or a batch, the test releases it: it waits on events,
never on the clock (a bound of 10 s only ends a broken run).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from rerank_service.backends.local import LocalBackend, LocalModelSpec
from rerank_service.backends.local import backend as local_backend
from rerank_service.backends.local.backend import ENCODE_SLICE, EngineChoice
from rerank_service.backends.local.batcher import BatchLimits, MicroBatcher
from rerank_service.backends.local.models import load_scorer
from rerank_service.backends.local.scorer import Encoded, Scorer
from rerank_service.backends.local.window import MIN_DOCUMENT_TOKENS
from rerank_service.config import ConfigError
from rerank_service.core.domain import (
    BackendRequest,
    CallContext,
    FailureKind,
    LongDocuments,
    RerankRequest,
    ServiceError,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.core.long_documents import plan
from rerank_service.core.token_window import MAX_CHARACTERS_PER_TOKEN
from tests.support.tiny_models import (
    build_tiny_bi_encoder,
    build_tiny_cross_encoder,
    build_tiny_qwen3_reranker,
)

BOUND = 10.0  # seconds: only a broken run waits this long
MAX_QUERY_TOKENS = 4000


class HeldScorer:
    """A fake model whose tokenizer is one lock, as GuardedTokenizer's, and whose encode of the
    query "hold" (and every batch, when asked) waits until the test releases it."""

    kind = "fake"
    supports_instruct = False
    max_length = 512
    device = "cpu"
    dtype = "float32"
    engine = "torch"

    def __init__(self, hold_batches: bool = False) -> None:
        self.hold_batches = hold_batches
        self.tokenizer = threading.Lock()
        self.encoding = threading.Event()  # a held encode has the tokenizer
        self.scoring = threading.Event()  # a held batch is in the model
        self.release = threading.Event()
        self.waited_out = False  # the test never released a held step

    def _hold(self, started: threading.Event) -> None:
        started.set()
        if not self.release.wait(BOUND):
            self.waited_out = True

    def count_tokens(self, text: str) -> int:
        with self.tokenizer:
            return len(text.split())

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        with self.tokenizer:
            if query == "hold":
                self._hold(self.encoding)
            return [Encoded(input_ids=(1, 2), tokens=2) for _ in documents]

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        if self.hold_batches:
            self._hold(self.scoring)
        return [0.5] * len(batch)


def backend_of(scorer: Scorer, specs: Sequence[tuple[str, str]] = (("m", "fake"),)) -> LocalBackend:
    return LocalBackend(
        [LocalModelSpec(name, source) for name, source in specs],
        device="cpu",
        dtype="float32",
        limits=BatchLimits(max_batch_size=1, window_batches=1, max_wait=0),
        max_documents=100,
        max_query_tokens=MAX_QUERY_TOKENS,
        loader=lambda source, device, dtype: scorer,
    )


def call(model: str, query: str, documents: list[str], instruct: str | None = None) -> BackendRequest:
    return BackendRequest(model, query, documents, instruct, None)


def assert_not_ready(error: ServiceError) -> None:
    # What the router falls back on (docs/ROUTING.md): another deployment may answer.
    assert error.reason == "BACKEND_NOT_READY"
    assert error.kind is FailureKind.DEPLOYMENT


async def test_the_default_loader_is_made_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Making it imports torch and transformers (seconds): on the loop, health went
    unanswered meanwhile, at start and at a reload adding a local model."""
    made_in: list[threading.Thread] = []

    def default_loader(choice: object) -> Any:
        made_in.append(threading.current_thread())
        return lambda source, device, dtype: HeldScorer()

    monkeypatch.setattr(local_backend, "_default_loader", default_loader)
    backend = LocalBackend(
        [LocalModelSpec("m", "fake")],
        device="cpu",
        dtype="float32",
        limits=BatchLimits(max_batch_size=1, window_batches=1, max_wait=0),
        max_documents=100,
        max_query_tokens=MAX_QUERY_TOKENS,
    )
    await backend.start()
    await backend.close()

    assert made_in
    assert made_in[0] is not threading.main_thread()


# --- closing with calls in flight ------------------------------------------------------------


async def test_closing_the_batcher_ends_its_running_and_queued_callers_with_not_ready() -> None:
    scorer = HeldScorer(hold_batches=True)
    batcher = MicroBatcher(scorer, BatchLimits(max_batch_size=1, window_batches=1, max_wait=0))
    batcher.start()
    pairs = [Encoded(input_ids=(1, 2), tokens=2)] * 2
    running = asyncio.ensure_future(batcher.score(pairs))
    await asyncio.to_thread(scorer.scoring.wait, BOUND)  # its first pair is in the model
    queued = asyncio.ensure_future(batcher.score(pairs))
    await asyncio.sleep(0)  # score() queues its pairs before it first waits

    await batcher.close()
    scorer.release.set()

    for caller in (running, queued):
        with pytest.raises(ServiceError) as raised:
            await asyncio.wait_for(caller, BOUND)
        assert_not_ready(raised.value)


async def test_a_closed_batcher_refuses_a_new_call_at_once() -> None:
    batcher = MicroBatcher(HeldScorer())
    batcher.start()
    await batcher.close()

    with pytest.raises(ServiceError) as raised:
        await asyncio.wait_for(batcher.score([Encoded(input_ids=(1,), tokens=1)]), BOUND)
    assert_not_ready(raised.value)


async def test_a_call_tokenizing_when_the_backend_closes_gets_not_ready() -> None:
    scorer = HeldScorer()
    backend = backend_of(scorer)
    await backend.start()
    tokenizing = asyncio.ensure_future(backend.rerank(call("m", "hold", ["a", "b"]), CallContext()))
    await asyncio.to_thread(scorer.encoding.wait, BOUND)

    await backend.close()
    scorer.release.set()

    with pytest.raises(ServiceError) as raised:
        await asyncio.wait_for(tokenizing, BOUND)  # it once queued on the closed batcher, forever
    assert_not_ready(raised.value)


async def test_a_call_queued_for_the_tokenizer_when_the_backend_closes_gets_not_ready() -> None:
    """Closing drops the work queued for the model's tokenizing thread: the call waiting on
    it once ended in a bare CancelledError (no fallback; its client waited for its deadline)."""
    scorer = HeldScorer()
    backend = backend_of(scorer)
    await backend.start()
    tokenizing = asyncio.ensure_future(backend.rerank(call("m", "hold", ["a"]), CallContext()))
    await asyncio.to_thread(scorer.encoding.wait, BOUND)
    queued = asyncio.ensure_future(backend.rerank(call("m", "weather", ["sunny"]), CallContext()))
    await asyncio.sleep(0)  # one step of `queued`: it hands its encode to the busy thread

    await backend.close()
    scorer.release.set()
    await asyncio.wait([tokenizing, queued], timeout=BOUND)

    assert not queued.cancelled()
    error = queued.exception()
    assert isinstance(error, ServiceError)
    assert_not_ready(error)
    assert isinstance(tokenizing.exception(), ServiceError)


async def test_a_call_cancelled_while_queued_for_the_tokenizer_stays_cancelled() -> None:
    """Its own cancellation (its caller gone) is not turned into an answer, closed or not."""
    scorer = HeldScorer()
    backend = backend_of(scorer)
    await backend.start()
    tokenizing = asyncio.ensure_future(backend.rerank(call("m", "hold", ["a"]), CallContext()))
    await asyncio.to_thread(scorer.encoding.wait, BOUND)
    queued = asyncio.ensure_future(backend.rerank(call("m", "weather", ["sunny"]), CallContext()))
    await asyncio.sleep(0)  # one step of `queued`: it hands its encode to the busy thread

    await backend.close()
    queued.cancel()
    scorer.release.set()
    await asyncio.wait([tokenizing, queued], timeout=BOUND)

    assert queued.cancelled()
    assert isinstance(tokenizing.exception(), ServiceError)


# --- the event loop never waits on the tokenizer's lock ----------------------------------------


async def test_another_call_is_taken_while_a_long_encode_holds_the_tokenizer() -> None:
    scorer = HeldScorer()
    backend = backend_of(scorer)
    await backend.start()
    long = asyncio.ensure_future(backend.rerank(call("m", "hold", ["a"]), CallContext()))
    await asyncio.to_thread(scorer.encoding.wait, BOUND)

    short = asyncio.ensure_future(backend.rerank(call("m", "weather", ["sunny"]), CallContext()))
    await asyncio.sleep(0)  # its first step ran: it counts its query off the loop, or blocks it here
    # The loop went on while the long encode still holds the tokenizer: it answers.
    answered_while_held = not scorer.release.is_set() and not scorer.waited_out
    models = backend.models()
    scorer.release.set()
    await asyncio.wait_for(asyncio.gather(long, short), BOUND)

    assert answered_while_held
    assert backend.readiness.ready
    assert [model.name for model in models] == ["m"]
    await backend.close()


class HeldTokenizer:
    """A real tokenizer whose call on a text holding "hold" waits until the test releases it:
    the encode of a call too large to tokenize quickly."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.holding = threading.Event()
        self.release = threading.Event()
        self.waited_out = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.holding.is_set() and any("hold" in str(arg) for arg in args):  # once
            self.holding.set()
            self.waited_out = not self.release.wait(BOUND)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def cross_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "cross")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("models") / "qwen3")


@pytest.fixture(scope="module")
def bi_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_bi_encoder(tmp_path_factory.mktemp("models") / "bi")


async def test_the_engine_plans_long_documents_while_an_encode_holds_the_tokenizer(cross_dir: Path) -> None:
    scorer: Any = load_scorer(str(cross_dir), "cpu", "float32")
    held = scorer._tokenizer.tokenizer = HeldTokenizer(scorer._tokenizer.tokenizer)
    backend = backend_of(scorer)
    await backend.start()
    encoding = asyncio.ensure_future(backend.rerank(call("m", "hold", ["bread"]), CallContext()))
    await asyncio.to_thread(held.holding.wait, BOUND)

    # What the engine does on the loop for a small call: the room beside the query, the
    # document's tokens, its cut.
    long_document = " ".join(["bread flour water yeast oven dough"] * 30)
    request = RerankRequest("m", "bread", [long_document], long_documents=LongDocuments.TRUNCATE)
    planned = plan(request, backend.call_limits("m"), 100)
    planned_while_held = not held.release.is_set() and not held.waited_out
    held.release.set()
    await asyncio.wait_for(encoding, BOUND)

    assert planned_while_held
    assert planned is not None
    assert planned.truncated == [True]
    await backend.close()


# --- a query or instruction that leaves a document no room ---------------------------------------


def words(count: int) -> str:
    return " ".join(["bread"] * count)  # one token each, in every tiny tokenizer


async def started(scorer: Scorer, specs: Sequence[tuple[str, str]] = (("m", "fake"),)) -> LocalBackend:
    backend = backend_of(scorer, specs)
    await backend.start()
    return backend


async def test_a_long_instruct_is_refused_naming_it_not_scored_without_the_documents(qwen3_dir: Path) -> None:
    backend = await started(load_scorer(str(qwen3_dir), "cpu", "float32"))
    documents = ["Mix flour and water, then bake.", "The stock market fell today."]

    fine = await backend.rerank(call("m", "bake bread", documents, instruct="Find recipes."), CallContext())
    with pytest.raises(ServiceError) as raised:
        await backend.rerank(call("m", "bake bread", documents, instruct=words(600)), CallContext())

    assert len(fine.scores) == 2
    assert [violation.field for violation in raised.value.violations] == ["instruct"]
    assert f"at least {MIN_DOCUMENT_TOKENS}" in raised.value.violations[0].description
    await backend.close()


async def test_chunking_under_a_long_instruct_is_refused_naming_the_instruct(qwen3_dir: Path) -> None:
    backend = await started(load_scorer(str(qwen3_dir), "cpu", "float32"))
    engine = RerankEngine(backend, chunk_concurrency=4, max_fanout_factor=10)
    request = RerankRequest(
        "m", "bake bread", ["Mix flour and water."], instruct=words(600), long_documents=LongDocuments.CHUNK
    )

    with pytest.raises(ServiceError) as raised:
        await engine.rerank(request, CallContext())

    assert [violation.field for violation in raised.value.violations] == ["instruct"]
    await backend.close()


@pytest.mark.parametrize("model", ["qwen3", "cross"])
async def test_the_longest_query_advertised_leaves_a_document_room_and_one_more_token_is_refused(
    model: str, qwen3_dir: Path, cross_dir: Path
) -> None:
    scorer: Any = load_scorer(str(qwen3_dir if model == "qwen3" else cross_dir), "cpu", "float32")
    backend = await started(scorer)
    [info] = backend.models()
    longest = info.max_query_tokens

    answered = await backend.rerank(call("m", words(longest), ["bread flour"] * 2), CallContext())
    with pytest.raises(ServiceError) as raised:
        await backend.rerank(call("m", words(longest + 1), ["bread flour"] * 2), CallContext())

    assert longest < scorer.max_length < MAX_QUERY_TOKENS  # the window's, not the setting's 4,000
    assert scorer.document_room(words(longest), None) >= MIN_DOCUMENT_TOKENS
    assert len(answered.scores) == 2
    assert [violation.field for violation in raised.value.violations] == ["query"]
    await backend.close()


async def test_a_bi_encoder_takes_a_query_its_own_window_holds_and_refuses_a_longer_one(bi_dir: Path) -> None:
    """It reads the query apart, in a window of its own: a longer query was cut to it and
    scored on its start alone, while ListModels advertised the setting (4,000)."""
    scorer: Any = load_scorer(str(bi_dir), "cpu", "float32")
    backend = await started(scorer)
    [info] = backend.models()
    longest = info.max_query_tokens

    answered = await backend.rerank(call("m", words(longest), ["bread flour"] * 2), CallContext())
    with pytest.raises(ServiceError) as raised:
        await backend.rerank(call("m", words(longest + 1), ["bread flour"] * 2), CallContext())

    assert longest == scorer.query_window() < scorer.max_length < MAX_QUERY_TOKENS
    assert len(answered.scores) == 2
    assert [violation.field for violation in raised.value.violations] == ["query"]
    await backend.close()


async def test_a_bi_encoder_counts_the_query_once_a_call_however_many_slices_it_encodes(bi_dir: Path) -> None:
    """It embeds the query once a call (docs/LOCAL_MODELS.md): counted once per slice of
    ENCODE_SLICE documents, a call of 257 paid for it twice."""
    scorer: Any = load_scorer(str(bi_dir), "cpu", "float32")
    backend = await started(scorer)
    query, documents = "bread and flour", [f"rye bread {index % 7}" for index in range(ENCODE_SLICE + 1)]
    pairs = scorer.encode(query, documents, None)
    expected = sum(len(pair.input_ids) for pair in pairs) + len(pairs[0].query_ids)

    answered = await backend.rerank(call("m", query, documents), CallContext())
    await backend.close()

    assert answered.total_tokens == expected


class RecordingTokenizer:
    """A real tokenizer that records, for each call, its thread and the longest text it tokenized."""

    def __init__(self, tokenizer: Any, calls: list[tuple[threading.Thread, int]]) -> None:
        self._tokenizer = tokenizer
        self.calls = calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        texts = [text for arg in args for text in ([arg] if isinstance(arg, str) else arg)]
        self.calls.append((threading.current_thread(), max(map(len, texts), default=0)))
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize(("model", "field"), [("qwen3", "query"), ("qwen3", "instruct"), ("cross", "query")])
async def test_a_huge_query_or_instruct_is_refused_without_tokenizing_it_whole_or_on_the_loop(
    model: str, field: str, qwen3_dir: Path, cross_dir: Path
) -> None:
    """A 12 MB query with short documents: tokenized whole on the event loop (the engine's plan),
    then again under the model's lock, for seconds each, to be refused for its first words."""
    scorer: Any = load_scorer(str(qwen3_dir if model == "qwen3" else cross_dir), "cpu", "float32")
    calls: list[tuple[threading.Thread, int]] = []
    guarded = scorer._tokenizer
    guarded.tokenizer = RecordingTokenizer(guarded.tokenizer, calls)
    guarded._loop_tokenizer = RecordingTokenizer(guarded._loop_tokenizer, calls)
    backend = await started(scorer)
    calls.clear()  # what the start counted (the room beside no query)
    engine = RerankEngine(backend, chunk_concurrency=4, max_fanout_factor=10)
    huge = words(2_000_000)  # 12 MB
    request = RerankRequest(
        "m",
        huge if field == "query" else "bread",
        ["flour", "oven"],
        instruct=huge if field == "instruct" else None,
    )

    with pytest.raises(ServiceError) as raised:
        await engine.rerank(request, CallContext())
    await backend.close()

    assert [violation.field for violation in raised.value.violations] == [field]
    assert calls
    assert threading.current_thread() not in {thread for thread, _ in calls}  # never on the loop
    assert max(length for _, length in calls) <= (scorer.max_length + 1) * MAX_CHARACTERS_PER_TOKEN


def _no_home(cls: type[Path]) -> Path:
    raise RuntimeError("Could not determine home directory.")  # as Path.home() says it


async def test_the_torch_engine_loads_where_no_home_directory_is_known(
    cross_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An arbitrary UID with no passwd entry and no HOME (OpenShift's): the ONNX cache's default
    is under the home directory, and torch has no use for it; ONNX is told to set its own."""
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(_no_home))

    load = local_backend._default_loader(EngineChoice(engine="torch"))
    scorer = load(str(cross_dir), "cpu", "float32")
    with pytest.raises(ConfigError, match="--local-onnx-cache"):
        local_backend._default_loader(EngineChoice(engine="onnx"))

    assert scorer.engine == "torch"


# --- calls that gave up let go of the model's tokenizer ------------------------------------------


def _soon() -> CallContext:
    """A call whose deadline passes while the model's tokenizer is busy."""
    return CallContext(deadline=time.monotonic() + 0.05)


async def test_calls_that_gave_up_waiting_for_a_busy_tokenizer_never_hold_up_another_model() -> None:
    """Each once held a thread of the loop's shared pool, waiting on the busy model's
    tokenizer: enough of them, and calls to every other model waited too."""
    busy, idle = HeldScorer(), HeldScorer()
    backend = LocalBackend(
        [LocalModelSpec("busy", "one"), LocalModelSpec("idle", "two")],
        device="cpu",
        dtype="float32",
        limits=BatchLimits(),
        max_documents=100,
        max_query_tokens=MAX_QUERY_TOKENS,
        loader=lambda source, device, dtype: busy if source == "one" else idle,
    )
    await backend.start()
    long = asyncio.ensure_future(backend.rerank(call("busy", "hold", ["a"]), CallContext()))
    await asyncio.to_thread(busy.encoding.wait, BOUND)
    given_up = await asyncio.gather(
        *(backend.rerank(call("busy", "q", ["d"]), _soon()) for _ in range(40)), return_exceptions=True
    )

    # Within half the bound the held encode waits before it gives up by itself.
    other = await asyncio.wait_for(backend.rerank(call("idle", "q", ["d"]), CallContext()), BOUND / 2)
    answered_while_busy = not busy.release.is_set() and not busy.waited_out
    busy.release.set()
    await asyncio.wait_for(long, BOUND)
    await backend.close()

    assert all(
        isinstance(error, ServiceError) and error.code.name == "DEADLINE_EXCEEDED" for error in given_up
    )
    assert answered_while_busy
    assert len(other.scores) == 1


class SlicedScorer(HeldScorer):
    """A fake model whose first encode waits until released, counting what it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        with self.tokenizer:
            if not self.encoded:
                self._hold(self.encoding)
            self.encoded += len(documents)
            return [Encoded(input_ids=(1, 2), tokens=2) for _ in documents]


async def test_a_call_that_gave_up_stops_tokenizing_within_a_slice() -> None:
    """It went on for seconds for an answer nobody would read, the calls behind it waiting."""
    scorer = SlicedScorer()
    backend = backend_of(scorer)
    await backend.start()
    documents = ["d"] * (3 * ENCODE_SLICE)
    gave_up = asyncio.ensure_future(backend.rerank(call("m", "q", documents), _soon()))
    await asyncio.to_thread(scorer.encoding.wait, BOUND)  # its first slice has the tokenizer
    with pytest.raises(ServiceError) as raised:
        await asyncio.wait_for(gave_up, BOUND)
    scorer.release.set()
    after = await asyncio.wait_for(backend.rerank(call("m", "q", ["d"]), CallContext()), BOUND)
    await backend.close()

    assert raised.value.code.name == "DEADLINE_EXCEEDED"
    assert scorer.encoded == ENCODE_SLICE + 1  # its first slice, then the next call's document
    assert len(after.scores) == 1


# --- names that share a source share one model ---------------------------------------------------


async def test_names_on_one_source_load_it_once_and_share_its_batcher() -> None:
    loaded: list[str] = []

    def loader(source: str, device: str, dtype: str) -> Scorer:
        loaded.append(source)
        return HeldScorer()

    backend = LocalBackend(
        [LocalModelSpec("a", "one"), LocalModelSpec("b", "one"), LocalModelSpec("c", "two")],
        device="cpu",
        dtype="float32",
        limits=BatchLimits(),
        max_documents=100,
        max_query_tokens=MAX_QUERY_TOKENS,
        loader=loader,
    )
    await backend.start()
    answers = [await backend.rerank(call(name, "q", ["d"]), CallContext()) for name in "abc"]
    batchers = [backend.batcher(name) for name in "abc"]
    await backend.close()

    assert loaded == ["one", "two"]
    assert batchers[0] is batchers[1]
    assert batchers[1] is not batchers[2]
    assert all(len(answer.scores) == 1 for answer in answers)
