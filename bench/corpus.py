"""A deterministic synthetic corpus: queries and documents of realistic length."""

from __future__ import annotations

import random

WORDS = (
    "search",
    "engine",
    "ranking",
    "model",
    "document",
    "query",
    "relevance",
    "retrieval",
    "passage",
    "answer",
    "question",
    "neural",
    "network",
    "training",
    "data",
    "language",
    "text",
    "semantic",
    "similarity",
    "vector",
    "index",
    "latency",
    "throughput",
    "cache",
    "server",
    "client",
    "request",
    "response",
    "batch",
    "token",
    "budget",
    "memory",
    "device",
    "apple",
    "bread",
    "river",
    "mountain",
    "weather",
    "market",
    "energy",
    "history",
    "music",
    "garden",
    "travel",
    "health",
    "protein",
    "climate",
    "ocean",
    "planet",
    "galaxy",
    "engine",
    "bridge",
    "camera",
    "window",
    "coffee",
    "paper",
    "school",
)


def documents(count: int, words: tuple[int, int] = (20, 40), seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) + "." for _ in range(count)]


def queries(count: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 10))) + "?" for _ in range(count)]
