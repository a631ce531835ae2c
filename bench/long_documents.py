"""Long documents: how well CHUNK ranks them next to TRUNCATE, and what CHUNK costs on short ones.

    .venv/bin/python -m bench.long_documents [--queries 50] [--candidates 5] [--seed 7]

Quality. The corpus is generated, offline and the same on every run (`--seed`): made-up
entities (names of random syllables) each with made-up facts ("The harbour of Velmora is
Tasquin."). A query asks one fact ("What is the harbour of Velmora?"); its candidates are
long documents (900 to 1,500 words of filler sentences built from bench/corpus.py's word
list, several windows of the bundled model) each with one fact planted at a random
position: one candidate holds the asked fact, the others hard negatives (the same
attribute of another entity, or another attribute of the same entity). The bundled
model (all-minilm-l6-v2, a 256-token bi-encoder) ranks each query's candidates with
long_documents TRUNCATE and CHUNK through the engine (`RerankEngine`, the local backend,
its batcher), and with CHUNK to 64-token chunks; MRR and NDCG@10 (one relevant document
a query) are printed and written into docs/LOCAL_MODELS.md's table between its markers.

Cost. On documents within the window both modes take the same path (a bound on the
documents' lengths, in C, finds nothing to cut): CPU time per call through the engine
with an in-memory backend, CHUNK over TRUNCATE, best of several rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from bench.corpus import WORDS
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    LongDocuments,
    ModelInfo,
    RerankRequest,
    ScoredDocument,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.core.readiness import Readiness
from rerank_service.core.token_window import EstimatedWindow

DOC = Path(__file__).resolve().parent.parent / "docs" / "LOCAL_MODELS.md"
BEGIN, END = "<!-- long-documents:begin -->", "<!-- long-documents:end -->"
MODEL = "all-minilm-l6-v2"

SYLLABLES = ("ka", "vel", "mo", "ra", "tas", "quin", "dor", "li", "sen", "bro", "ta", "mi", "zu", "an", "or")
ATTRIBUTES = ("harbour", "founder", "oldest bridge", "river", "national dish", "first mayor", "main export")
OPENERS = ("In practice", "Most of the time", "For a long while", "Over the years", "By and large")


def name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def filler_sentence(rng: random.Random) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))
    return f"{rng.choice(OPENERS)} the {words}."


@dataclass(frozen=True)
class Query:
    text: str
    documents: list[str]
    relevant: int  # the index of the document that answers


def long_document(rng: random.Random, fact: str) -> str:
    """900 to 1,500 words of filler with `fact` planted at a random sentence."""
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < rng.randint(900, 1500):
        sentences.append(filler_sentence(rng))
    sentences.insert(rng.randint(0, len(sentences)), fact)
    return " ".join(sentences)


def corpus(queries: int, candidates: int, seed: int) -> list[Query]:
    rng = random.Random(seed)
    entities = list(dict.fromkeys(name(rng) for _ in range(queries * 3)))
    values = {(entity, attribute): name(rng) for entity in entities for attribute in ATTRIBUTES}
    built = []
    for number in range(queries):
        entity, attribute = entities[number], rng.choice(ATTRIBUTES)
        facts = [f"The {attribute} of {entity} is {values[entity, attribute]}."]
        while len(facts) < candidates:
            if rng.random() < 0.5:  # the same question about another entity
                other = rng.choice(entities)
                if other != entity:
                    facts.append(f"The {attribute} of {other} is {values[other, attribute]}.")
            else:  # another question about the same entity
                other_attribute = rng.choice(ATTRIBUTES)
                if other_attribute != attribute:
                    facts.append(f"The {other_attribute} of {entity} is {values[entity, other_attribute]}.")
        documents = [long_document(rng, fact) for fact in facts]
        order = list(range(candidates))
        rng.shuffle(order)
        built.append(
            Query(f"What is the {attribute} of {entity}?", [documents[i] for i in order], order.index(0))
        )
    return built


def reciprocal_rank(ranking: list[int], relevant: int) -> float:
    return 1.0 / (ranking.index(relevant) + 1)


def ndcg_at_10(ranking: list[int], relevant: int) -> float:
    position = ranking.index(relevant)
    return 1.0 / math.log2(position + 2) if position < 10 else 0.0


# The modes compared: (label, long_documents, max_tokens_per_doc).
MODES = (
    ("TRUNCATE", LongDocuments.TRUNCATE, None),
    ("CHUNK", LongDocuments.CHUNK, None),
    ("CHUNK, max_tokens_per_doc 64", LongDocuments.CHUNK, 64),
)


async def quality(queries: list[Query]) -> dict[str, tuple[float, float, int]]:
    from rerank_service.backends.local.backend import LocalBackend, LocalModelSpec
    from rerank_service.backends.local.batcher import BatchLimits

    backend = LocalBackend(
        [LocalModelSpec(MODEL, "bundled")],
        device="cpu",
        dtype="float32",
        limits=BatchLimits(max_batch_size=32, max_batch_tokens=16384, max_wait=0.002),
        max_documents=1000,
        max_query_tokens=512,
    )
    await backend.start()
    engine = RerankEngine(backend, chunk_concurrency=8, max_fanout_factor=100, max_chunks_per_call=1000)
    figures = {}
    try:
        for label, mode, window in MODES:
            rr, ndcg, tokens = 0.0, 0.0, 0
            for query in queries:
                request = RerankRequest(
                    MODEL, query.text, query.documents, long_documents=mode, max_tokens_per_doc=window
                )
                outcome = await engine.rerank(request, CallContext())
                ranking = [result.index for result in outcome.results]
                rr += reciprocal_rank(ranking, query.relevant)
                ndcg += ndcg_at_10(ranking, query.relevant)
                tokens += outcome.total_tokens
            figures[label] = (rr / len(queries), ndcg / len(queries), tokens)
    finally:
        await backend.close()
    return figures


class ShortAnswers:
    """An in-memory backend with an upstream's window: every document scored at once."""

    readiness = Readiness(True)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("m", 10_000, 4000, False, "bench")]

    def call_limits(self, model: str) -> CallLimits:
        return CallLimits(max_documents=500, max_tokens=120_000, window=EstimatedWindow(4000))

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        count = len(request.documents)
        return BackendResult([ScoredDocument(i, (i * 7919 % count) / count) for i in range(count)], count)


def cost(rounds: int = 7, calls: int = 300) -> tuple[float, float]:
    """CPU µs per call on 100 documents of 20 to 40 words (within the window), per mode."""
    rng = random.Random(1)
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(100)]
    engine = RerankEngine(ShortAnswers(), chunk_concurrency=8, max_fanout_factor=10)
    best = {}
    for mode in (LongDocuments.TRUNCATE, LongDocuments.CHUNK):
        request = RerankRequest("m", "search ranking model", documents, long_documents=mode)

        async def many(request: RerankRequest = request) -> None:
            for _ in range(calls):
                await engine.rerank(request, CallContext())

        samples = []
        for _ in range(rounds):
            started = time.process_time()
            asyncio.run(many())
            samples.append((time.process_time() - started) / calls * 1e6)
        best[mode] = min(samples)
    return best[LongDocuments.TRUNCATE], best[LongDocuments.CHUNK]


def write_figures(table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} markers")
    DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print the figures only")
    args = parser.parse_args()

    queries = corpus(args.queries, args.candidates, args.seed)
    pairs = sum(len(query.documents) for query in queries)
    started = time.perf_counter()
    figures = asyncio.run(quality(queries))
    seconds = time.perf_counter() - started
    truncate_us, chunk_us = cost()
    rows = [
        "| long_documents | MRR | NDCG@10 | tokens scored |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {mrr:.3f} | {ndcg:.3f} | {tokens:,} |"
            for label, (mrr, ndcg, tokens) in figures.items()
        ),
        "",
        f"{args.queries} queries, {pairs:,} (query, long document) pairs ({args.candidates} candidates a "
        f"query, seed {args.seed}), {MODEL} on the CPU; {seconds:.0f} s in all. Random order: MRR "
        f"{sum(1 / k for k in range(1, args.candidates + 1)) / args.candidates:.3f}. Cost on documents "
        f"within the window (100 documents a call, CPU per call through the engine): TRUNCATE "
        f"{truncate_us:.0f} µs, CHUNK {chunk_us:.0f} µs ({chunk_us / truncate_us:.2f}x).",
    ]
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        write_figures(table)


if __name__ == "__main__":
    main()
