"""A slow rerank upstream: answers every POST after a fixed delay, as a loaded hosted API can.

    python -m bench.slow_upstream --port 8090 --latency 2.0 --documents 20

One asyncio task per connection, HTTP/1.1 keep-alive with Content-Length bodies, no
thread per connection: a thousand connections waiting out their delay cost almost
nothing, so the upstream is never what limits the benchmark. Every request gets the
same static DashScope-native answer (`bench.perf_payloads.upstream_answer`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from bench.perf_payloads import upstream_answer

MAX_HEADER_BYTES = 64 * 1024


def _response(body: bytes) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class SlowUpstream:
    def __init__(self, latency: float, answer: bytes) -> None:
        self.latency = latency
        self.response = _response(answer)
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                await asyncio.sleep(self.latency)
                writer.write(self.response)
                await writer.drain()
                self.answered += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def serve(host: str, port: int, latency: float, documents: int) -> None:
    upstream = SlowUpstream(latency, upstream_answer(documents))
    server = await asyncio.start_server(
        upstream.handle, host, port, backlog=4096, limit=MAX_HEADER_BYTES, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"serving on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds before each answer")
    parser.add_argument("--documents", type=int, default=20, help="results in the static answer")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.latency, args.documents))


if __name__ == "__main__":
    main()
