"""A raw HTTP/1.1 server on loopback, for answers no well-behaved server library sends."""

from __future__ import annotations

import asyncio


class RawHttpServer:
    """Reads each request of a kept-alive connection whole (its headers and Content-Length
    body) and writes what `answer` returns for it; counts requests and connections."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen on a free port; the server's base URL."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def answer(self, number: int) -> bytes:
        """The bytes that answer request `number` (1 for the first)."""
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
                self.requests += 1
                writer.write(await self.answer(self.requests))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
