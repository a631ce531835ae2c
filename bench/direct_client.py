"""The direct baseline: the upstream called over HTTP by an httpx.AsyncClient load loop.

    python -m bench.direct_client --url http://127.0.0.1:8080 --documents 20 \
        --concurrency 16 --seconds 10 --warmup 2

`concurrency` tasks share one httpx.AsyncClient (a pool of 1,024 connections by
default, as the service's and the minimal proxy's) and POST the body the service
would send upstream, back to back. Like ghz in `bench.perf`, a run is bounded either
by time (`--seconds`: calls still in flight at the end are ignored; requests/s =
calls completed / seconds) or by count (`--requests`: requests/s = calls / time
taken; cut short at `--max-seconds`), and the percentiles are ghz's: the latency at
rank int(p/100 x n), minus one when that is a whole number, of the sorted latencies.
Prints one JSON object.

The HTTP client library is httpx, or the one BENCH_HTTPX names (httpx2, say).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.perf_payloads import RERANK_PATH, UPSTREAM_KEY, http_client_library, upstream_body


def percentile(sorted_latencies: list[float], p: float) -> float:
    """ghz's percentile (runner/reporter.go `latencies`) of already sorted values."""
    if not sorted_latencies:
        return 0.0
    rank = p / 100 * len(sorted_latencies)
    index = int(rank)
    if rank == index:
        index -= 1
    return sorted_latencies[max(index, 0)]


async def _run(
    client: Any, body: bytes, concurrency: int, seconds: float, requests: int | None
) -> tuple[list[float], float, int]:
    """(latencies of the counted calls, elapsed seconds, failures).

    Stops after `requests` calls, or at `seconds` (calls in flight then are ignored).
    """
    latencies: list[float] = []
    failures = 0
    started = time.perf_counter()
    stop_at = started + seconds
    left = requests

    async def worker() -> None:
        nonlocal left, failures
        while time.perf_counter() < stop_at:
            if left is not None:
                if left <= 0:
                    return
                left -= 1
            sent = time.perf_counter()
            try:
                reply = await client.post(RERANK_PATH, content=body)
                answered = reply.status_code == 200 and bool(reply.content)
            except Exception:  # httpx's (or BENCH_HTTPX's) errors: timeouts, pool timeouts
                answered = False
            done = time.perf_counter()
            if done > stop_at:
                return  # in flight at the end: ignored, as ghz --duration-stop ignore
            if answered:
                latencies.append(done - sent)
            else:
                failures += 1

    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    _, late = await asyncio.wait(workers, timeout=seconds + 1)
    for task in late:
        task.cancel()
    elapsed = min(time.perf_counter() - started, seconds)
    return latencies, elapsed, failures


async def measure(
    url: str,
    documents: int,
    concurrency: int,
    seconds: float | None,
    requests: int | None,
    warmup: float,
    max_connections: int,
    max_seconds: float,
    call_timeout: float,
) -> dict[str, float]:
    body = upstream_body(documents)
    httpx = http_client_library()
    async with httpx.AsyncClient(
        base_url=url,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        timeout=httpx.Timeout(call_timeout),
        headers={"authorization": f"Bearer {UPSTREAM_KEY}", "content-type": "application/json"},
        trust_env=False,
    ) as client:
        if warmup > 0:
            if requests is not None:
                await _run(client, body, concurrency, min(max_seconds, 2 * call_timeout), concurrency)
            else:
                await _run(client, body, concurrency, warmup, None)
        if seconds is not None:
            latencies, elapsed, failures = await _run(client, body, concurrency, seconds, None)
        else:
            latencies, elapsed, failures = await _run(client, body, concurrency, max_seconds, requests)
    latencies.sort()
    # Answered calls only, as in bench.perf's reading of ghz.
    return {
        "count": len(latencies),
        "failures": failures,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="upstream base URL")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    bound = parser.add_mutually_exclusive_group(required=True)
    bound.add_argument("--seconds", type=float, help="measure for this long")
    bound.add_argument("--requests", type=int, help="measure this many calls")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of warm-up first (with --requests: one call per task when > 0)",
    )
    parser.add_argument("--max-connections", type=int, default=1024, help="httpx pool size")
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="seconds one call may take (a slower one fails)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="with --requests: give up (and count what finished) after this",
    )
    args = parser.parse_args()
    result = asyncio.run(
        measure(
            args.url,
            args.documents,
            args.concurrency,
            args.seconds,
            args.requests,
            args.warmup,
            max(args.max_connections, args.concurrency),
            args.max_seconds,
            args.timeout,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
