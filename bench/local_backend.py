"""Local backend benchmark: the service against the model called directly, and
micro-batching on against off.

    make bench-local          # or: .venv/bin/python -m bench.local_backend

1. Throughput: 16 concurrent clients send requests of 32 documents to a real
   `rerank-service serve` process (loopback, bundled model, batch size 32), against
   the same model called directly in one process on the same requests, batch size 32.
   Goal: the service >= 0.9x the direct model in documents/s.
2. Micro-batching: 64 concurrent clients send requests of one document each, with
   --micro-batching on and off. Goal: on >= 2x off in requests/s.

Each side is measured in the same run, one after the other (never at the same time,
so they do not share the CPU), after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from dataclasses import dataclass

import grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench.corpus import documents, queries
from tests.support.process import ServiceProcess

MODEL = "all-minilm-l6-v2"


@dataclass
class Run:
    name: str
    requests: int
    documents: int
    seconds: float

    @property
    def docs_per_second(self) -> float:
        return self.documents / self.seconds

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds


async def drive(target: str, workload: list[tuple[str, list[str]]], concurrency: int) -> float:
    """Send every (query, documents) request with `concurrency` in flight; seconds taken."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        queue = list(reversed(workload))

        async def client() -> None:
            while queue:
                query, docs = queue.pop()
                request = rerank_pb2.RerankRequest(model=MODEL, query=query, documents=docs)
                response = await stub.Rerank(request, timeout=120)
                assert len(response.output.results) == len(docs)

        warm = [rerank_pb2.RerankRequest(model=MODEL, query="warm up", documents=["a b c"] * 8)]
        for request in warm * 3:
            await stub.Rerank(request, timeout=120)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - started


def serve_and_drive(
    name: str, workload: list[tuple[str, list[str]]], concurrency: int, extra: list[str]
) -> Run:
    args = ["--backend", "local", "--local-models", f"{MODEL}=bundled", *extra]
    env = {"HF_HUB_OFFLINE": "1"}
    with ServiceProcess(args, env=env) as service:
        seconds = asyncio.run(drive(service.target, workload, concurrency))
        service.terminate()
    return Run(name, len(workload), sum(len(docs) for _, docs in workload), seconds)


def direct(workload: list[tuple[str, list[str]]], batch_size: int) -> Run:
    """The same requests through the same model in this process: encode, batch, score."""
    from rerank_service.backends.local.models import load_scorer

    scorer = load_scorer("bundled", "auto", "auto")
    scorer.score(scorer.encode("warm up", ["a b c"] * 8, None))
    started = time.perf_counter()
    for query, docs in workload:
        encoded = scorer.encode(query, docs, None)
        for start in range(0, len(encoded), batch_size):
            scorer.score(encoded[start : start + batch_size])
    seconds = time.perf_counter() - started
    return Run("model called directly, batch 32", len(workload), sum(len(d) for _, d in workload), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--throughput-requests", type=int, default=160, help="requests of 32 documents")
    parser.add_argument("--small-requests", type=int, default=1500, help="requests of 1 document")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    docs = documents(4096)
    qs = queries(args.throughput_requests + args.small_requests)
    big = [(qs[i], docs[(i * 32) % 4064 : (i * 32) % 4064 + 32]) for i in range(args.throughput_requests)]
    small = [(qs[i], [docs[i % len(docs)]]) for i in range(args.small_requests)]

    service = serve_and_drive("service, 16 clients, batch 32", big, 16, ["--max-batch-size", "32"])
    baseline = direct(big, 32)
    batched = serve_and_drive("micro-batching on, 64 clients", small, 64, ["--micro-batching", "on"])
    unbatched = serve_and_drive("micro-batching off, 64 clients", small, 64, ["--micro-batching", "off"])

    import torch

    print(
        f"\nLocal backend, bundled all-MiniLM-L6-v2, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| run | requests | documents | seconds | documents/s | requests/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in (service, baseline, batched, unbatched):
        print(
            f"| {run.name} | {run.requests} | {run.documents} | {run.seconds:.2f} | "
            f"{run.docs_per_second:.0f} | {run.requests_per_second:.1f} |"
        )
    service_ratio = service.docs_per_second / baseline.docs_per_second
    batching_ratio = batched.requests_per_second / unbatched.requests_per_second
    print(f"\nservice / direct model: {service_ratio:.2f}x (goal >= 0.9x)")
    print(f"micro-batching on / off: {batching_ratio:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
