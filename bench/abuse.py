"""Abuse report: what one hostile caller can make the server hold, and what a victim sees meanwhile.

    make bench-abuse          # or: .venv/bin/python -m bench.abuse

Each attack runs for `--seconds` against a fresh `rerank-service serve --backend upstream`
process with its default bounds, in front of a fake upstream that answers at once but
holds the attacker's requests (their query carries a marker) for a second, as a slow
upstream would. Meanwhile a well-behaved caller sends ordinary calls from two threads.
Reported per attack: the victim's calls, success share and p50 (and how that compares
with no attack), what the attacker's calls got, and the server's peak RSS (VmHWM).
Prints the table and rewrites it in docs/RELIABILITY.md between its markers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench.reliability import machine, publish
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.support.fault_scenarios import memory_bytes
from tests.support.process import ServiceProcess

UPSTREAM_KEY = "bench-upstream-key"
CALLER_KEY = "bench-caller-key"
MARKER = "HOSTILE"
DOC = Path(__file__).resolve().parent.parent / "docs" / "RELIABILITY.md"
MIB = 1024 * 1024


def victim_request() -> rerank_pb2.RerankRequest:
    return rerank_pb2.RerankRequest(
        model="qwen3-rerank",
        query="what is a reranker",
        documents=[f"document {i} about rerankers" for i in range(20)],
    )


def hostile_request(megabytes: int) -> rerank_pb2.RerankRequest:
    document = "x" * 10_000  # 10 kB a document: 100 a megabyte
    return rerank_pb2.RerankRequest(
        model="qwen3-rerank", query=f"{MARKER} query", documents=[document] * (100 * megabytes)
    )


@dataclass
class Result:
    attack: str
    victim_codes: Counter[str] = field(default_factory=Counter)
    victim_latencies: list[float] = field(default_factory=list)
    attacker_codes: Counter[str] = field(default_factory=Counter)
    peak_rss: int = 0

    @property
    def victim_success(self) -> float:
        total = sum(self.victim_codes.values())
        return self.victim_codes["OK"] / total if total else 0.0

    @property
    def victim_p50(self) -> float:
        return statistics.median(self.victim_latencies) if self.victim_latencies else float("nan")


def code_of(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as error:
        return str(error.code().name)
    return "OK"


def run_victim(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        while not stop.is_set():
            started = time.perf_counter()
            code = code_of(lambda: stub.Rerank(victim_request(), metadata=metadata, timeout=10))
            result.victim_codes[code] += 1
            if code == "OK":
                result.victim_latencies.append(time.perf_counter() - started)


def big_unary_calls(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """Ten callers each sending 15 MB calls back to back."""
    request = hostile_request(15)
    options = [("grpc.max_send_message_length", 64 * MIB)]

    def one_caller() -> None:
        with grpc.insecure_channel(target, options=options) as channel:
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            while not stop.is_set():
                result.attacker_codes[
                    code_of(lambda: stub.Rerank(request, metadata=metadata, timeout=10))
                ] += 1

    callers = [threading.Thread(target=one_caller) for _ in range(10)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()


def big_stream(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """Streams of 32 items of 15 MB each, one after another."""
    item = rerank_pb2.RerankStreamRequest(request=hostile_request(15))
    options = [("grpc.max_send_message_length", 64 * MIB)]

    def items() -> Iterator[rerank_pb2.RerankStreamRequest]:
        for index in range(32):
            item.id = f"item-{index}"
            yield item

    with grpc.insecure_channel(target, options=options) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        while not stop.is_set():
            try:
                for answer in stub.RerankStream(items(), metadata=metadata, timeout=30):
                    kind = answer.WhichOneof("result")
                    result.attacker_codes["OK" if kind == "response" else str(answer.error.code)] += 1
            except grpc.RpcError as error:
                result.attacker_codes[f"stream {error.code().name}"] += 1


def silent_streams(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """As many RerankStreams as the server takes, on 64 connections, each sending nothing."""

    async def flood() -> None:
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(64)
        ]
        calls = []
        try:
            for index in range(64 * 256):
                stub = rerank_pb2_grpc.RerankServiceStub(channels[index % len(channels)])
                calls.append(stub.RerankStream(metadata=metadata, timeout=60))
                if index % 256 == 255:
                    await asyncio.sleep(0.05)  # let them open
            await asyncio.to_thread(stop.wait)
            done = [call for call in calls if call.done()]
            for call in done:
                result.attacker_codes[(await call.code()).name] += 1
            result.attacker_codes["held open"] += len(calls) - len(done)
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()

    asyncio.run(flood())


ATTACKS: dict[str, tuple[str, Callable[..., None] | None, bool]] = {
    # name: (what it is, the attacker, whether the attacker holds a valid key)
    "idle": ("no attack", None, True),
    "big-unary": ("10 callers sending 15 MB calls back to back", big_unary_calls, True),
    "big-stream": ("streams of 32 items of 15 MB", big_stream, True),
    "silent-keyless": ("16,384 RerankStreams without a valid key, sending nothing", silent_streams, False),
}


def run_attack(name: str, seconds: float, open_mode: bool = False) -> Result:
    _, attacker, keyed = ATTACKS[name]
    result = Result(name if not open_mode else f"{name} (no caller keys)")
    env = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}
    if not open_mode:
        env["RERANK_API_KEYS"] = CALLER_KEY
    victim_metadata = () if open_mode else (("authorization", f"Bearer {CALLER_KEY}"),)
    attacker_metadata = victim_metadata if keyed else (("authorization", "Bearer not-a-key"),)
    with FakeUpstream(api_key=UPSTREAM_KEY, record=False) as upstream:
        upstream.poison(MARKER, Fault(delay=1.0))
        args = ["--backend", "upstream", "--upstream-url", upstream.url]
        with ServiceProcess(args, env=env) as service:
            assert service.process is not None
            stop = threading.Event()
            threads = [
                threading.Thread(target=run_victim, args=(service.target, victim_metadata, stop, result))
                for _ in range(2)
            ]
            if attacker is not None:
                threads.append(
                    threading.Thread(target=attacker, args=(service.target, attacker_metadata, stop, result))
                )
            for thread in threads:
                thread.start()
            time.sleep(seconds)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            result.peak_rss = memory_bytes(service.process.pid, "VmHWM")
    return result


def table(results: list[Result]) -> str:
    idle = next(result for result in results if result.attack == "idle")
    rows = [
        "| attack | the victim's calls | succeeded | failed with | p50 | p50 / idle "
        "| the attacker's calls got | server peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        got = ", ".join(f"{code} {count}" for code, count in result.attacker_codes.most_common()) or "-"
        failed = ", ".join(
            f"{code} {count}" for code, count in result.victim_codes.most_common() if code != "OK"
        )
        name = result.attack.split(" ")[0]
        what = ATTACKS[name][0] + result.attack[len(name) :]
        rows.append(
            f"| {what} | {sum(result.victim_codes.values())} | {result.victim_success:.1%} | {failed or '-'} "
            f"| {result.victim_p50 * 1000:.1f} ms | {result.victim_p50 / idle.victim_p50:.2f}x | {got} "
            f"| {result.peak_rss / MIB:.0f} MiB |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="how long each attack runs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RELIABILITY.md")
    args = parser.parse_args()
    results = [run_attack(name, args.seconds) for name in ATTACKS]
    results.append(run_attack("silent-keyless", args.seconds, open_mode=True))
    setup = (
        "loopback, a real `rerank-service serve` process with its defaults, the fake upstream, the "
        f"victim and the attacker in the benchmark's process; {args.seconds:g} s per attack."
    )
    publish({"abuse": f"{machine(setup)}\n\n{table(results)}"}, not args.no_write, [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
