"""Abuse report: what one hostile caller can make the server hold, and what a victim sees meanwhile.

    make bench-abuse          # or: .venv/bin/python -m bench.abuse

Each attack runs for `--seconds` against a fresh `rerank-service serve --backend upstream`
process with its default bounds, in front of a fake upstream that answers at once but
holds the attacker's requests (their query carries a marker) for a second, as a slow
upstream would. Meanwhile a well-behaved caller sends ordinary calls from two threads.
Reported per attack: the victim's calls, success share and p50 (and how that compares
with no attack), what the attacker's calls got, and the server's peak RSS (VmHWM). The
attacks on connections come from 127.0.0.2 (the victim calls from 127.0.0.1), so the
cap per address tells them apart. Where the service serves HTTP too, a polite HTTP
caller runs beside the gRPC victim, with its own columns.
Prints the table and rewrites it in docs/RELIABILITY.md between its markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import resource
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench.reliability import machine, publish
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.support import process
from tests.support.fault_scenarios import memory_bytes
from tests.support.process import ServiceProcess

UPSTREAM_KEY = "bench-upstream-key"
CALLER_KEY = "bench-caller-key"
MARKER = "HOSTILE"
ATTACKER_ADDRESS = "127.0.0.2"  # the victim calls from 127.0.0.1
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
    http_codes: Counter[str] = field(default_factory=Counter)
    log_lines: int = 0

    @property
    def http_success(self) -> float | None:
        total = sum(self.http_codes.values())
        return self.http_codes["200"] / total if total else None

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


def _run_together(caller: Callable[[], None], count: int) -> None:
    """`count` threads each running `caller`, until all of them return."""
    threads = [threading.Thread(target=caller) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


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

    _run_together(one_caller, 10)


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


def _hold_calls(
    target: str,
    connections: int,
    open_calls: Callable[[list[grpc.aio.Channel], list[Any]], Awaitable[None]],
    stop: threading.Event,
    result: Result,
) -> None:
    """Open calls on `connections` channels (`open_calls` appends each to the list), hold
    them until `stop`, then count how the server ended each one (or that it is still open)."""

    async def flood() -> None:
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]
        calls: list[Any] = []
        try:
            await open_calls(channels, calls)
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


def silent_streams(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """As many RerankStreams as the server takes, on 64 connections, each sending nothing."""

    async def open_streams(channels: list[grpc.aio.Channel], calls: list[Any]) -> None:
        for index in range(64 * 256):
            stub = rerank_pb2_grpc.RerankServiceStub(channels[index % len(channels)])
            calls.append(stub.RerankStream(metadata=metadata, timeout=60))
            if index % 256 == 255:
                await asyncio.sleep(0.05)  # let them open

    _hold_calls(target, 64, open_streams, stop, result)


def run_http_victim(http_port: int, key: str | None, stop: threading.Event, result: Result) -> None:
    """A polite HTTP caller: Cohere-format calls one after another."""
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    body = {"model": "qwen3-rerank", "query": "what is a reranker", "documents": ["a reranker", "a car"]}
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:
        while not stop.is_set():
            try:
                result.http_codes[str(client.post("/v1/rerank", json=body, headers=headers).status_code)] += 1
            except httpx.HTTPError as error:
                result.http_codes[type(error).__name__] += 1


def side_flood(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """4,096 health Watch and 400 reflection streams without a key, on 16 connections."""

    async def open_side_calls(channels: list[grpc.aio.Channel], calls: list[Any]) -> None:
        for index in range(4096):
            watch: Any = channels[index % 16].unary_stream(
                "/grpc.health.v1.Health/Watch", health_pb2.HealthCheckRequest.SerializeToString
            )
            calls.append(watch(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=60))
        for index in range(400):
            reflection: Any = channels[index % 16].stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                reflection_pb2.ServerReflectionRequest.SerializeToString,
            )
            call = reflection(metadata=metadata, timeout=60)
            calls.append(call)
            with contextlib.suppress(grpc.aio.AioRpcError):  # refused already: counted below
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))

    _hold_calls(target, 16, open_side_calls, stop, result)


def _silent_connections(port: int, count: int, stop: threading.Event, result: Result) -> None:
    """`count` TCP connections from the attacker's address that send nothing, reopened as
    the server closes them, until stopped."""
    held: list[socket.socket | None] = [None] * count
    try:
        while not stop.is_set():
            for index, connection in enumerate(held):
                if connection is not None and _still_open(connection):
                    continue
                if connection is not None:
                    connection.close()
                    result.attacker_codes["closed by the server"] += 1
                try:
                    held[index] = socket.create_connection(
                        ("127.0.0.1", port), timeout=2, source_address=(ATTACKER_ADDRESS, 0)
                    )
                    result.attacker_codes["opened"] += 1
                except OSError:
                    held[index] = None
                    result.attacker_codes["refused"] += 1
                if stop.is_set():
                    break
            stop.wait(0.2)  # the attacker's pace between rounds
        result.attacker_codes["held open"] += sum(1 for c in held if c is not None and _still_open(c))
    finally:
        for connection in held:
            if connection is not None:
                connection.close()


def _still_open(connection: socket.socket) -> bool:
    connection.setblocking(False)
    try:
        while connection.recv(65536):
            pass  # what the server sent (its HTTP/2 SETTINGS) is dropped
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        connection.setblocking(True)


def silent_connections(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """4,200 TCP connections to the gRPC port that send nothing."""
    _silent_connections(int(target.rpartition(":")[2]), 4200, stop, result)


def idle_http_connections(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """1,100 idle connections to the HTTP port (the service runs with 1,024 descriptors)."""
    _silent_connections(int(target.rpartition(":")[2]), 1100, stop, result)


def gzip_bombs(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """Cohere-format calls whose gzipped body inflates 600:1, back to back from 4 threads."""
    document = "x" * (9 * MIB)
    body = gzip.compress(
        json.dumps({"model": "qwen3-rerank", "query": MARKER, "documents": [document]}).encode()
    )
    headers = {"content-type": "application/json", "content-encoding": "gzip", **dict(metadata)}

    def one_caller() -> None:
        with httpx.Client(base_url=f"http://{target}", timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/rerank", content=body, headers=headers)
                    result.attacker_codes[f"HTTP {response.status_code}"] += 1
                except httpx.HTTPError as error:
                    result.attacker_codes[type(error).__name__] += 1

    _run_together(one_caller, 4)


def trickling_streams(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """50 RerankStreams each sending one small item every 2 s (the service takes 50 calls at once)."""

    async def trickle() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = rerank_pb2_grpc.RerankServiceStub(channel)

            async def one_stream() -> None:
                call = stub.RerankStream(metadata=metadata, timeout=120)
                index = 0
                try:
                    while not stop.is_set():
                        item = rerank_pb2.RerankStreamRequest(id=f"item-{index}", request=victim_request())
                        await call.write(item)
                        answer: Any = await call.read()
                        kind = "EOF" if answer is grpc.aio.EOF else answer.WhichOneof("result")
                        result.attacker_codes["OK" if kind == "response" else str(kind)] += 1
                        index += 1
                        await asyncio.to_thread(stop.wait, 2.0)
                except grpc.aio.AioRpcError as error:
                    result.attacker_codes[f"stream {error.code().name}"] += 1
                finally:
                    call.cancel()

            await asyncio.gather(*(one_stream() for _ in range(50)))

    asyncio.run(trickle())


def slow_bodies(
    target: str, metadata: tuple[tuple[str, str], ...], stop: threading.Event, result: Result
) -> None:
    """2,100 HTTP calls from the attacker's address whose bodies trickle in a byte at a time."""
    head = "".join(f"{name}: {value}\r\n" for name, value in metadata)
    host, _, port = target.rpartition(":")
    connections: list[socket.socket] = []
    try:
        for _ in range(2100):
            if stop.is_set():
                break
            try:
                connection = socket.create_connection(
                    (host, int(port)), timeout=2, source_address=(ATTACKER_ADDRESS, 0)
                )
                connection.sendall(
                    f"POST /v1/rerank HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n{head}"
                    "content-length: 100000\r\n\r\n{".encode()
                )
                connections.append(connection)
                result.attacker_codes["opened"] += 1
            except OSError:
                result.attacker_codes["refused"] += 1
        while not stop.wait(1.0):
            for connection in list(connections):
                try:
                    if not _still_open(connection):
                        raise ConnectionResetError
                    connection.sendall(b" ")
                except OSError:
                    connections.remove(connection)
                    connection.close()
                    result.attacker_codes["closed by the server"] += 1
        held = [connection for connection in connections if _still_open(connection)]
        result.attacker_codes["closed by the server"] += len(connections) - len(held)
        result.attacker_codes["held open"] += len(held)
    finally:
        for connection in connections:
            connection.close()


@dataclass(frozen=True)
class Attack:
    what: str
    attacker: Callable[..., None] | None
    keyed: bool  # whether the attacker holds a valid key
    on_http: bool = False  # the attacker aims at the HTTP port
    server_args: tuple[str, ...] = ()
    fd_limit: int | None = None  # the service's open-file limit (soft = hard), as systemd sets it


ATTACKS: dict[str, Attack] = {
    "idle": Attack("no attack", None, True),
    "big-unary": Attack("10 callers sending 15 MB calls back to back", big_unary_calls, True),
    "big-stream": Attack("streams of 32 items of 15 MB", big_stream, True),
    "silent-keyless": Attack(
        "16,384 RerankStreams without a valid key, sending nothing", silent_streams, False
    ),
    "side-flood": Attack("4,096 health Watch and 400 reflection streams without a key", side_flood, False),
    "silent-connections": Attack(
        "4,200 TCP connections to the gRPC port sending nothing", silent_connections, False
    ),
    "idle-http": Attack(
        "1,100 idle HTTP connections, the service at 1,024 file descriptors",
        idle_http_connections,
        False,
        on_http=True,
        fd_limit=1024,
    ),
    "gzip-bombs": Attack("4 callers sending HTTP bodies gzipped 600:1", gzip_bombs, True, on_http=True),
    "slow-bodies": Attack("2,100 HTTP calls whose bodies trickle in", slow_bodies, True, on_http=True),
    "trickling-streams": Attack(
        "50 RerankStreams sending an item every 2 s (`--max-concurrent-requests 50`)",
        trickling_streams,
        True,
        server_args=("--max-concurrent-requests", "50"),
    ),
}


def run_attack(name: str, seconds: float, open_mode: bool = False) -> Result:
    attack = ATTACKS[name]
    result = Result(name if not open_mode else f"{name} (no caller keys)")
    env = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}
    if not open_mode:
        env["RERANK_API_KEYS"] = CALLER_KEY
    victim_metadata = () if open_mode else (("authorization", f"Bearer {CALLER_KEY}"),)
    attacker_metadata = victim_metadata if attack.keyed else (("authorization", "Bearer not-a-key"),)
    cli = process.CLI
    if attack.fd_limit is not None:
        process.CLI = ["prlimit", f"--nofile={attack.fd_limit}:{attack.fd_limit}", *cli]
    try:
        with FakeUpstream(api_key=UPSTREAM_KEY, record=False) as upstream:
            upstream.poison(MARKER, Fault(delay=1.0))
            args = [
                "--backend",
                "upstream",
                "--upstream-url",
                upstream.url,
                "--http-port",
                "0",
                *attack.server_args,
            ]
            with ServiceProcess(args, env=env) as service:
                assert service.process is not None
                http_port = next(int(e["http_port"]) for e in service.events() if e.get("event") == "serving")
                stop = threading.Event()
                threads = [
                    threading.Thread(target=run_victim, args=(service.target, victim_metadata, stop, result))
                    for _ in range(2)
                ]
                key = None if open_mode else CALLER_KEY
                threads.append(threading.Thread(target=run_http_victim, args=(http_port, key, stop, result)))
                if attack.attacker is not None:
                    target = f"127.0.0.1:{http_port}" if attack.on_http else service.target
                    threads.append(
                        threading.Thread(
                            target=attack.attacker, args=(target, attacker_metadata, stop, result)
                        )
                    )
                lines_before = len(service.lines)
                for thread in threads:
                    thread.start()
                time.sleep(seconds)
                stop.set()
                for thread in threads:
                    thread.join(timeout=60)
                result.peak_rss = memory_bytes(service.process.pid, "VmHWM")
                # What the service wrote meanwhile, the access log of the victims' calls aside.
                written = service.lines[lines_before:]
                result.log_lines = sum(1 for line in written if _event(line) not in ("call", "stream"))
    finally:
        process.CLI = cli
    return result


def _event(line: str) -> str | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None  # not JSON: counted
    return event.get("event") if isinstance(event, dict) else None


def table(results: list[Result]) -> str:
    idle = next(result for result in results if result.attack == "idle")
    rows = [
        "| attack | the victim's calls | succeeded | failed with | p50 | p50 / idle "
        "| polite HTTP calls succeeded | the attacker's calls got | server peak RSS | other log lines |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        got = ", ".join(f"{code} {count}" for code, count in result.attacker_codes.most_common()) or "-"
        failed = ", ".join(
            f"{code} {count}" for code, count in result.victim_codes.most_common() if code != "OK"
        )
        name = result.attack.split(" ")[0]
        what = ATTACKS[name].what + result.attack[len(name) :]
        http = result.http_success
        http_cell = "-" if http is None else f"{http:.1%} of {sum(result.http_codes.values())}"
        rows.append(
            f"| {what} | {sum(result.victim_codes.values())} | {result.victim_success:.1%} | {failed or '-'} "
            f"| {result.victim_p50 * 1000:.1f} ms | {result.victim_p50 / idle.victim_p50:.2f}x | {http_cell} "
            f"| {got} | {result.peak_rss / MIB:.0f} MiB | {result.log_lines} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="how long each attack runs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RELIABILITY.md")
    parser.add_argument("--only", nargs="*", choices=list(ATTACKS), help="run these attacks only (with idle)")
    args = parser.parse_args()
    # The attacks on connections open thousands of sockets from this process.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = [name for name in ATTACKS if not args.only or name == "idle" or name in args.only]
    results = [run_attack(name, args.seconds) for name in names]
    if "silent-keyless" in names:
        results.append(run_attack("silent-keyless", args.seconds, open_mode=True))
    setup = (
        "loopback, a real `rerank-service serve` process with its defaults (and `--http-port`), the "
        "fake upstream, the victims and the attacker in the benchmark's process; "
        f"{args.seconds:g} s per attack."
    )
    publish({"abuse": f"{machine(setup)}\n\n{table(results)}"}, not args.no_write, [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
