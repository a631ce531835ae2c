"""The local backend: reranking models run in this process, behind a micro-batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from rerank_service.backends.local.batcher import BatchLimits, MicroBatcher
from rerank_service.backends.local.scorer import Encoded, Scorer
from rerank_service.backends.local.window import (
    MIN_DOCUMENT_TOKENS,
    ReadsDocuments,
    ReadsQueryAlone,
    ScorerWindow,
    SharesRoomWithQuery,
    count_within,
)
from rerank_service.config import ConfigError
from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    FieldViolation,
    ModelInfo,
    ScoredDocument,
    ServiceError,
    Timings,
    invalid_argument,
    not_ready,
)
from rerank_service.core.readiness import Readiness
from rerank_service.observability import tracing
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import Metrics

if TYPE_CHECKING:  # both import torch, which this module must not
    from rerank_service.backends.local.models import Engine
    from rerank_service.backends.local.onnx_engine import Quantize

_log = get_logger("rerank_service.local")

ScorerLoader = Callable[[str, str, str], Scorer]


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """What runs the models (see forward.py): --local-engine, --local-quantize, --local-threads."""

    engine: Engine = "torch"
    quantize: Quantize = "none"
    threads: int = 0  # 0: torch's default
    onnx_cache: Path | None = None  # None: the user's cache directory


@dataclass(frozen=True, slots=True)
class LocalModelSpec:
    name: str
    # A local directory, a Hugging Face hub id (from the local cache), or "bundled".
    source: str


class LocalBackend:
    """Serves each configured model from memory; loading happens in `start`."""

    def __init__(
        self,
        specs: list[LocalModelSpec],
        device: str,
        dtype: str,
        limits: BatchLimits,
        max_documents: int,
        max_query_tokens: int,
        loader: ScorerLoader | None = None,
        merge_batches: bool = True,
        engine: EngineChoice | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._specs = specs
        self._device = device
        self._dtype = dtype
        self._limits = limits
        self._max_documents = max_documents
        self._max_query_tokens = max_query_tokens
        self._loader = loader
        self._merge = merge_batches
        self._engine = engine or EngineChoice()
        # Where its batchers record (None: a Metrics of its own, served nowhere: tests).
        self._metrics = metrics if metrics is not None else Metrics()
        self._scorers: dict[str, Scorer] = {}
        self._tokenizing: dict[str, ThreadPoolExecutor] = {}  # each model's own thread
        self._batchers: dict[str, MicroBatcher] = {}
        # The longest query each loaded model takes (max_query_tokens, or less: _query_limit).
        self._query_limits: dict[str, int] = {}
        self._readiness = Readiness()

    @classmethod
    def from_config(cls, config: LocalDeploymentConfig, metrics: Metrics | None = None) -> LocalBackend:
        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"the local backend needs {' and '.join(missing)}: install it with "
                "pip install 'rerank-service[local]', or run with --backend upstream"
            )
        engine, batch = config.engine, config.batch
        return cls(
            specs=[LocalModelSpec(name, source) for name, source in config.models],
            device=engine.device,
            dtype=engine.dtype,
            limits=BatchLimits(
                max_batch_size=batch.max_size,
                max_batch_tokens=batch.max_tokens,
                max_wait=batch.wait_ms / 1000,
            ),
            max_documents=config.max_documents,
            max_query_tokens=config.max_query_tokens,
            merge_batches=batch.merge,
            engine=EngineChoice(
                engine=engine.engine,
                quantize=engine.quantize,
                threads=engine.threads,
                onnx_cache=engine.onnx_cache,
            ),
            metrics=metrics,
        )

    @property
    def readiness(self) -> Readiness:
        return self._readiness

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=spec.name,
                max_documents=self._max_documents,
                # Known once the model is loaded: the setting, or less where the window is smaller.
                max_query_tokens=self._query_limits.get(spec.name, self._max_query_tokens),
                # Known once the model is loaded; until then nothing is promised.
                supports_instruct=spec.name in self._scorers and self._scorers[spec.name].supports_instruct,
                backend="local",
            )
            for spec in self._specs
        ]

    def call_limits(self, model: str) -> CallLimits:
        # No split: the micro-batcher already cuts a large request into model batches.
        # Long documents are cut and chunked by the model's own tokenizer, once it is loaded.
        scorer: object = self._scorers.get(model)  # a test's scorer may not read documents
        if isinstance(scorer, ReadsDocuments):
            return CallLimits(window=ScorerWindow(scorer))
        return CallLimits()

    def batcher(self, model: str) -> MicroBatcher:
        return self._batchers[model]

    async def start(self) -> None:
        # The default loader imports torch and transformers, seconds of work: in a thread, so
        # health is answered (NOT_SERVING) and other routes' calls go on meanwhile.
        loader = (
            self._loader
            if self._loader is not None
            else await asyncio.to_thread(_default_loader, self._engine)
        )
        # Names that share a source share its model and batcher: one copy in memory, and
        # their calls batched together.
        by_source: dict[str, tuple[Scorer, MicroBatcher, ThreadPoolExecutor]] = {}
        for spec in self._specs:
            if spec.source not in by_source:
                scorer = await self._load(loader, spec)
                batcher = MicroBatcher(scorer, self._limits, merge=self._merge, metrics=self._metrics)
                batcher.start()
                # One thread a model tokenizes in: its tokenizer takes one call at a time
                # anyway, and calls queued behind a long encode wait here, each dropped once
                # it gives up, instead of each holding a thread of the loop's shared pool
                # (where they starved other models and every other to_thread).
                tokenizing = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize {spec.name}")
                by_source[spec.source] = (scorer, batcher, tokenizing)
            scorer, batcher, tokenizing = by_source[spec.source]
            self._scorers[spec.name], self._batchers[spec.name] = scorer, batcher
            self._tokenizing[spec.name] = tokenizing
            self._query_limits[spec.name] = _query_limit(scorer, self._max_query_tokens)
        self._readiness.set(True)

    async def _load(self, loader: ScorerLoader, spec: LocalModelSpec) -> Scorer:
        started = time.perf_counter()
        # Loading reads weights from disk and may take seconds: keep the loop free
        # so health checks are answered (NOT_SERVING) meanwhile.
        scorer = await asyncio.to_thread(loader, spec.source, self._device, self._dtype)
        _log.info(
            "model loaded",
            model=spec.name,
            source=spec.source,
            kind=scorer.kind,
            engine=scorer.engine,
            device=scorer.device,
            dtype=scorer.dtype,
            max_length=scorer.max_length,
            seconds=round(time.perf_counter() - started, 2),
        )
        return scorer

    async def close(self) -> None:
        self._readiness.set(False)
        for batcher in {id(batcher): batcher for batcher in self._batchers.values()}.values():
            await batcher.close()
        self._batchers.clear()
        for tokenizing in {id(pool): pool for pool in self._tokenizing.values()}.values():
            tokenizing.shutdown(wait=False, cancel_futures=True)
        self._tokenizing.clear()

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        if not self._readiness.ready:
            raise not_ready("the model is still loading")
        scorer, batcher = self._scorers[request.model], self._batchers[request.model]
        encoder = self._tokenizing[request.model]
        instruct = request.instruct if scorer.supports_instruct else None
        try:
            async with asyncio.timeout(_time_left(context)):
                tokenizing = tracing.child("rerank.tokenize", {"rerank.documents": len(request.documents)})
                abandoned = threading.Event()  # told to the encode once this call gives up
                try:
                    # Counting the query waits on the tokenizer's lock, which an encode holds
                    # for long: in the worker thread with the encode, never on the event loop.
                    encoded = await asyncio.get_running_loop().run_in_executor(
                        encoder, self._encode, scorer, request, instruct, abandoned
                    )
                except asyncio.CancelledError:
                    abandoned.set()
                    if _closed_under(self._readiness):
                        raise _closed_while_queued() from None
                    raise
                except BaseException:
                    abandoned.set()
                    raise
                finally:
                    if tokenizing is not None:
                        tokenizing.end()
                # Closed while tokenizing: the batcher, closed too, refuses it (not ready).
                scored = await batcher.score_timed(encoded)
        except TimeoutError:
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the model did not finish within the call's deadline"
            ) from None
        return BackendResult(
            scores=[ScoredDocument(index, score) for index, score in enumerate(scored.scores)],
            total_tokens=sum(item.tokens for item in encoded),
            timings=Timings(queue_seconds=scored.queue_seconds, inference_seconds=scored.inference_seconds),
            usage_source="model",
        )

    def _encode(
        self, scorer: Scorer, request: BackendRequest, instruct: str | None, abandoned: threading.Event
    ) -> list[Encoded]:
        """The call's pairs, once its query and instruction are known to leave the documents
        room; tokenized ENCODE_SLICE documents at a time, so that a call that gave up (its
        deadline passed: `abandoned`) stops within a slice and frees the model's tokenizer
        for the calls behind it, instead of holding it for seconds for an answer nobody reads."""
        limit = self._query_limits.get(request.model, self._max_query_tokens)
        query_tokens, counted = count_within(scorer.count_tokens, request.query, limit)
        if query_tokens > limit:
            where = "" if counted == len(request.query) else f" in its first {counted} characters alone"
            raise invalid_argument(
                [FieldViolation("query", f"has {query_tokens} tokens{where}; at most {limit} are allowed")]
            )
        _check_document_room(scorer, request.query, instruct)
        documents = request.documents
        encoded: list[Encoded] = []
        for start in range(0, len(documents), ENCODE_SLICE):
            if abandoned.is_set():
                raise _Abandoned  # nobody waits for it: the call has said its own error
            part = scorer.encode(request.query, documents[start : start + ENCODE_SLICE], instruct)
            shared = part[0].query_ids if start and part else None
            if shared is not None:
                # A bi-encoder counts the query, embedded once a call, on the first pair it
                # encodes (bi_encoder.py): a later slice's first pair is counted without it.
                part[0] = dataclasses.replace(part[0], tokens=part[0].tokens - len(shared))
            encoded += part
        return encoded


def _closed_under(readiness: Readiness) -> bool:
    """The backend closed, and what this task awaited was cancelled by it, not the task itself
    (its caller, its deadline): `close` drops the work queued for a model's tokenizing thread."""
    task = asyncio.current_task()
    return not readiness.ready and task is not None and task.cancelling() == 0


def _closed_while_queued() -> ServiceError:
    # As a call the closed batcher refuses: not ready, which the router falls back on (a bare
    # CancelledError was no answer: the client waited for its deadline).
    return not_ready("the model was closed (a reload or shutdown) before it tokenized the call")


class _Abandoned(Exception):
    """The call an encode worked for gave up: the encode stops."""


# Documents tokenized per hold of a model's tokenizer: large enough that a fast tokenizer
# works in bulk, small enough that a call that gave up lets go of it within milliseconds.
ENCODE_SLICE = 256


def _query_limit(scorer: Scorer, setting: int) -> int:
    """The longest query the model takes: the setting, or less where query and document share a
    window too small for it (a 512-token cross-encoder), so that a document keeps some room,
    or where the query's own window is (a bi-encoder's: 254 tokens for all-MiniLM-L6-v2)."""
    if isinstance(scorer, SharesRoomWithQuery):
        return max(0, min(setting, scorer.query_room() - MIN_DOCUMENT_TOKENS))
    if isinstance(scorer, ReadsQueryAlone):  # a bi-encoder: the query has a window of its own
        return min(setting, scorer.query_window())
    return setting


def _check_document_room(scorer: Scorer, query: str, instruct: str | None) -> None:
    """Refuse a pair template that leaves a document almost no room: the model would truncate
    every document to nothing and score the query alone."""
    if not isinstance(scorer, ReadsDocuments):
        return
    room = scorer.document_room(query, instruct)
    if room >= MIN_DOCUMENT_TOKENS:
        return
    field = "instruct" if instruct else "query"
    raise invalid_argument(
        [
            FieldViolation(
                field,
                f"leaves {max(room, 0)} tokens of the model's {scorer.max_length}-token window for a "
                f"document; at least {MIN_DOCUMENT_TOKENS} are needed: send a shorter {field}",
            )
        ]
    )


def _time_left(context: CallContext) -> float | None:
    return None if context.deadline is None else max(0.0, context.deadline - time.monotonic())


def _default_loader(choice: EngineChoice) -> ScorerLoader:
    # Imports torch: only when real models are loaded.
    from rerank_service.backends.local.models import OnnxOptions, load_scorer, set_threads
    from rerank_service.backends.local.onnx_engine import default_cache_dir

    threads = set_threads(choice.threads)
    # Only ONNX keeps a cache: torch runs where no home directory is known (an arbitrary UID
    # with no passwd entry and no HOME, as OpenShift's), so its default is asked of ONNX alone.
    onnx = None
    if choice.engine == "onnx":
        cache = choice.onnx_cache
        if cache is None:
            try:
                cache = default_cache_dir()
            except RuntimeError:  # Path.home(): no HOME, and no passwd entry for the user
                raise ConfigError(
                    "the onnx engine's cache has no default here (no home directory, no "
                    "XDG_CACHE_HOME): set --local-onnx-cache"
                ) from None
        onnx = OnnxOptions(choice.quantize, threads, cache)

    def load(source: str, device: str, dtype: str) -> Scorer:
        return load_scorer(source, device, dtype, engine=choice.engine, onnx=onnx)

    return load
