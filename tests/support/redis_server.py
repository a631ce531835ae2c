"""A real Redis server for the tests: `redis-server` on a free loopback port, no persistence.

Installed by `make redis` (tests/support/install-redis.sh). Each server has its own
directory (its log); `kill` and `start` again keep its port, for the tests of what the
service does while Redis is gone and when it comes back; `pause` and `resume` make it a
Redis that accepts connections and never answers (a slow one). With `tls`, it speaks
TLS only (rediss://), with the certificate given.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from tests.support.waiting import wait_until

MISSING = "redis-server is missing: run `make redis` (tests/support/install-redis.sh) or install Redis 7"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class RedisTls:
    """The server's certificate and key, and the CA that signed it (for the clients)."""

    cert: Path
    key: Path
    ca: Path


class RedisServer:
    """`with RedisServer() as server:` a started server; `server.url` for the clients."""

    def __init__(self, start_timeout: float = 10.0, tls: RedisTls | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        self._binary = binary
        self.start_timeout = start_timeout
        self.tls = tls
        self.port = free_port()
        self._directory = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "redis" if self.tls is None else "rediss"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        path = self._directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self) -> redis.Redis:
        """A blocking client, for the tests' own checks."""
        if self.tls is None:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=2,
            socket_connect_timeout=2,
            ssl=True,
            ssl_ca_certs=str(self.tls.ca),
        )

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.process = subprocess.Popen(
            [
                self._binary,
                *listen,
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self._directory),
                "--logfile", str(self._directory / "redis.log"),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._answers, timeout=self.start_timeout, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {self.process.returncode}:\n{self.log}")
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """Gone at once, as a crash: SIGKILL, and wait for the process to end."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def pause(self) -> None:
        """Connections are still accepted (by the kernel) but nothing answers: SIGSTOP."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a paused server ignores SIGTERM until it runs again
        self.stop()
        shutil.rmtree(self._directory, ignore_errors=True)
