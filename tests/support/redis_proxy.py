"""A loopback TCP proxy in front of a Redis server, run on the test's event loop: what each
client connection sent is kept, and `fail_over` makes it the one address of a replicated
primary (a VIP, a Kubernetes Service) across a failover: new connections go to the new
primary, established ones stay with the old one, now a replica that refuses writes.

    async with RedisProxy(server.port) as proxy:
        client = redis_client(proxy.url())
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.redis_server import RedisServer


class RedisProxy:
    """Loopback TCP in front of the Redis on `port` (changed: new connections go elsewhere),
    keeping what each client connection sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: list[bytearray] = []  # per connection, in the order they opened
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, db: int = 0) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/{db}"

    async def __aenter__(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accepted(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        sent = bytearray()
        self.sent.append(sent)
        task = asyncio.get_running_loop().create_task(
            self._serve(self.port, sent, client_reader, client_writer)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self,
        port: int,
        sent: bytearray,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.gather(
                _pipe(client_reader, redis_writer, sent), _pipe(redis_reader, client_writer, None)
            )
        finally:
            for writer in (client_writer, redis_writer):
                writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: bytearray | None) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            if sent is not None:
                sent += data
            writer.write(data)
            await writer.drain()
    writer.close()


def fail_over(proxy: RedisProxy, old: RedisServer, new: RedisServer) -> None:
    """`old`, the primary behind `proxy`, demoted to a replica of `new` (REPLICAOF: Redis keeps
    its clients' connections open, and refuses their writes, READONLY); new connections
    through `proxy` go to `new`."""
    with new.client() as client:  # its stop waits for no replica to catch up (up to 10 s)
        client.config_set("shutdown-timeout", 0)
    with old.client() as client:
        client.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
    proxy.port = new.port
