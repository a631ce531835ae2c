"""Every private piece of httpcore (and httpx) that the upstream HTTP layer relies on.

rerank_service/backends/upstream/client/pool.py and network.py replace httpcore's pool
and network backend (pool.py says why), which httpx offers no public way to do, and
proxies.py reads the environment with httpx's own helpers. pyproject.toml pins
httpcore to a minor version; when a new httpcore (or httpx) is tried, these tests say
exactly which piece moved, instead of the service failing on its first upstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterable, Iterator
from typing import Any

import httpcore
import httpx
import pytest

# Nothing of the service is imported up here: its modules import the private pieces,
# and a piece that is gone must fail one test with a message, not the whole collection.

_FIX = (
    "rerank_service/backends/upstream/client/pool.py and network.py rely on it: adapt them to "
    "this version (or, if its own pool is now O(1) per call, drop them: see the comment atop "
    "pool.py), or keep httpcore's (or httpx's) pin in pyproject.toml below this version"
)


def broken(piece: str, found: str) -> None:
    pytest.fail(
        f"httpcore {httpcore.__version__} / httpx {httpx.__version__}: {piece}: {found}. {_FIX}.",
        pytrace=False,
    )


@contextlib.contextmanager
def relied_on(piece: str) -> Iterator[None]:
    """Any error inside is reported as `piece` having changed."""
    try:
        yield
    except pytest.fail.Exception:
        raise
    except Exception as exc:
        broken(piece, f"{type(exc).__name__}: {exc}")


def the_layer() -> tuple[Any, Any]:
    """The service's pool and network modules (importing them imports the private pieces)."""
    with relied_on("importing rerank_service.backends.upstream.client (pool.py, network.py, proxies.py)"):
        from rerank_service.backends.upstream.client import network, pool
    return pool, network


def parameters(function: Any) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def require_parameters(piece: str, function: Any, expected: list[str]) -> None:
    found = parameters(function)
    if found[: len(expected)] != expected:
        broken(piece, f"takes {found}, expected {expected} first")


# --- the pool: httpcore's HTTP/1.1 connection and request interface ----------------------------


def test_the_http11_connection_class_and_request_interface_are_where_pool_py_imports_them() -> None:
    with relied_on("httpcore._async.http11.AsyncHTTP11Connection"):
        from httpcore._async.http11 import AsyncHTTP11Connection
    with relied_on("httpcore._async.interfaces.AsyncRequestInterface"):
        from httpcore._async.interfaces import AsyncRequestInterface
    pool, _ = the_layer()
    if not issubclass(pool.LeanConnectionPool, AsyncRequestInterface):
        broken("AsyncRequestInterface", "LeanConnectionPool no longer subclasses it")
    if not inspect.iscoroutinefunction(getattr(AsyncRequestInterface, "handle_async_request", None)):
        broken("AsyncRequestInterface.handle_async_request", "is no longer a coroutine function")
    require_parameters(
        "AsyncHTTP11Connection(origin, stream, keepalive_expiry)",
        AsyncHTTP11Connection.__init__,
        ["origin", "stream", "keepalive_expiry"],
    )
    for method, coroutine in [
        ("handle_async_request", True),
        ("aclose", True),
        ("is_idle", False),
        ("has_expired", False),
        ("can_handle_request", False),
    ]:
        found = getattr(AsyncHTTP11Connection, method, None)
        if found is None or inspect.iscoroutinefunction(found) is not coroutine:
            kind = "a coroutine function" if coroutine else "a plain method"
            broken(f"AsyncHTTP11Connection.{method}", f"is missing or no longer {kind}")


class ScriptedStream(httpcore.AsyncNetworkStream):
    """A network stream that answers one canned HTTP response and records the probes."""

    def __init__(self, answer: bytes) -> None:
        self.incoming = [answer]
        self.written = b""
        self.readable = False  # what the is_readable probe answers
        self.probed: list[str] = []

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return self.incoming.pop(0) if self.incoming else b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.written += buffer

    async def aclose(self) -> None:
        pass

    def get_extra_info(self, info: str) -> Any:
        self.probed.append(info)
        return self.readable if info == "is_readable" else None


ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
ORIGIN = httpcore.Origin(b"http", b"upstream.test", 80)


def post() -> httpcore.Request:
    timeouts = {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0}
    headers = [(b"host", b"upstream.test"), (b"content-length", b"2")]  # httpx adds these
    return httpcore.Request(
        "POST", "http://upstream.test/x", headers=headers, content=b"{}", extensions={"timeout": timeouts}
    )


async def exchange_on(stream: ScriptedStream, read_body: bool = True) -> Any:
    from httpcore._async.http11 import AsyncHTTP11Connection

    connection = AsyncHTTP11Connection(ORIGIN, stream, keepalive_expiry=30.0)
    if not hasattr(connection, "_state_lock"):
        broken("AsyncHTTP11Connection._state_lock", "the attribute is gone (pool.py swaps in asyncio.Lock)")
    connection._state_lock = asyncio.Lock()  # type: ignore[assignment]  # as pool.py does
    response = await connection.handle_async_request(post())
    stream_out: object = response.stream
    if not isinstance(stream_out, AsyncIterable) or not hasattr(stream_out, "aclose"):
        broken("AsyncHTTP11Connection's response.stream", "is no longer an async iterable with aclose()")
    assert isinstance(stream_out, AsyncIterable)
    if read_body:
        body = b"".join([chunk async for chunk in stream_out])
        if body != b"ok":
            broken("AsyncHTTP11Connection's response.stream", f"yielded {body!r}, expected b'ok'")
    await response.aclose()
    return connection


async def test_a_connection_runs_a_request_under_an_asyncio_lock_and_is_idle_after_it() -> None:
    stream = ScriptedStream(ANSWER)
    with relied_on("AsyncHTTP11Connection driven as pool.py drives it"):
        connection = await exchange_on(stream)
    if not stream.written.startswith(b"POST /x HTTP/1.1\r\n"):
        broken("AsyncHTTP11Connection.handle_async_request", f"wrote {stream.written[:40]!r}")
    if not connection.is_idle() or not connection.can_handle_request(ORIGIN):
        broken("AsyncHTTP11Connection.is_idle/can_handle_request", "a finished exchange is not reusable")


async def test_an_idle_connection_asks_its_stream_is_readable_to_know_the_server_closed_it() -> None:
    """network.py answers that probe from its buffer, cheaply; pool.py relies on has_expired
    asking it, to drop connections the server closed while they sat idle."""
    stream = ScriptedStream(ANSWER)
    with relied_on("AsyncHTTP11Connection.has_expired"):
        connection = await exchange_on(stream)
        fresh = connection.has_expired()
        stream.readable = True
        closed_by_server = connection.has_expired()
    if fresh or not closed_by_server or "is_readable" not in stream.probed:
        broken(
            "AsyncHTTP11Connection.has_expired",
            "no longer consults the stream's get_extra_info('is_readable') on an idle connection",
        )


async def test_a_response_closed_unread_leaves_its_connection_not_idle() -> None:
    """pool.py returns a connection to its idle stack only if is_idle() after the response closes."""
    with relied_on("AsyncHTTP11Connection closing an unread response"):
        connection = await exchange_on(ScriptedStream(ANSWER), read_body=False)
    if connection.is_idle():
        broken("AsyncHTTP11Connection.is_idle", "a connection with an unread body counts as idle")


# --- httpx's transport: the pool swapped in, and its proxy helpers -----------------------------


class RecordingPool:
    def __init__(self, fail: Exception | None = None) -> None:
        self.requests: list[httpcore.Request] = []
        self.fail = fail

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return httpcore.Response(200, headers=[(b"content-length", b"2")], content=b"ok")

    async def aclose(self) -> None:
        pass


async def test_httpx_transport_drives_whatever_pool_sits_in_its_pool_attribute() -> None:
    transport = httpx.AsyncHTTPTransport()
    if not hasattr(transport, "_pool"):
        broken("httpx.AsyncHTTPTransport._pool", "the attribute connections.py replaces is gone")
    recording = RecordingPool()
    transport._pool = recording  # type: ignore[assignment]
    timeouts = {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 0.5}
    with relied_on("httpx.AsyncHTTPTransport.handle_async_request over _pool"):
        request = httpx.Request(
            "POST", "http://upstream.test/x", content=b"{}", extensions={"timeout": timeouts}
        )
        response = await transport.handle_async_request(request)
        await response.aclose()
    if response.status_code != 200 or len(recording.requests) != 1:
        broken("httpx.AsyncHTTPTransport._pool", "httpx no longer sends requests through it")
    if recording.requests[0].extensions.get("timeout", {}).get("pool") != 0.5:
        broken(
            "request.extensions['timeout']", "the pool and connect timeouts pool.py reads are not passed on"
        )


async def test_httpx_maps_the_pools_httpcore_errors_to_its_own() -> None:
    transport = httpx.AsyncHTTPTransport()
    transport._pool = RecordingPool(fail=httpcore.PoolTimeout("full"))  # type: ignore[assignment]
    with pytest.raises(httpx.PoolTimeout):
        await transport.handle_async_request(httpx.Request("POST", "http://upstream.test/x"))


def test_httpx_environment_proxy_helpers_are_where_proxies_py_imports_them() -> None:
    with relied_on("httpx._utils.get_environment_proxies / URLPattern"):
        from httpx._utils import URLPattern, get_environment_proxies

        rules: object = get_environment_proxies()
        specific, general = URLPattern("all://127.0.0.1"), URLPattern("https://")
        ordered = sorted([general, specific])
    if not isinstance(rules, dict):
        broken("httpx._utils.get_environment_proxies", f"returns {type(rules).__name__}, expected a dict")
    if ordered != [specific, general] or not specific.matches(httpx.URL("https://127.0.0.1:8443")):
        broken("httpx._utils.URLPattern", "no longer sorts most specific first, or matches differently")


# --- network.py: httpcore's network interface it implements --------------------------------------


@pytest.mark.parametrize(
    ("piece", "expected"),
    [
        ("AsyncNetworkStream.read", ["max_bytes", "timeout"]),
        ("AsyncNetworkStream.write", ["buffer", "timeout"]),
        ("AsyncNetworkStream.start_tls", ["ssl_context", "server_hostname", "timeout"]),
        ("AsyncNetworkStream.get_extra_info", ["info"]),
        ("AsyncNetworkBackend.connect_tcp", ["host", "port", "timeout", "local_address", "socket_options"]),
        ("AsyncNetworkBackend.connect_unix_socket", ["path", "timeout", "socket_options"]),
        ("AsyncNetworkBackend.sleep", ["seconds"]),
    ],
)
def test_the_network_interface_network_py_implements_has_the_same_shape(
    piece: str, expected: list[str]
) -> None:
    interface, method = piece.split(".")
    function = getattr(getattr(httpcore, interface, None), method, None)
    if function is None:
        broken(f"httpcore.{piece}", "is gone")
    require_parameters(f"httpcore.{piece}", function, expected)


def test_the_httpcore_names_network_py_and_pool_py_raise_and_take_exist() -> None:
    for name in [
        "AsyncNetworkStream",
        "AsyncNetworkBackend",
        "SOCKET_OPTION",
        "Origin",
        "Request",
        "Response",
        "ConnectError",
        "ConnectTimeout",
        "ReadError",
        "ReadTimeout",
        "WriteError",
        "WriteTimeout",
        "PoolTimeout",
    ]:
        if not hasattr(httpcore, name):
            broken(f"httpcore.{name}", "is gone")


@pytest.mark.parametrize(
    ("interface", "implementation"),
    [("AsyncNetworkStream", "_Stream"), ("AsyncNetworkBackend", "AsyncioBackend")],
)
def test_network_py_implements_every_method_of_httpcores_network_interface(
    interface: str, implementation: str
) -> None:
    """httpcore's interface methods raise NotImplementedError: a method added to it would
    only fail at the first upstream call that uses it."""
    _, network = the_layer()
    functions = inspect.getmembers(getattr(httpcore, interface), inspect.isfunction)
    ours = vars(getattr(network, implementation))
    missing = sorted(name for name, _ in functions if not name.startswith("_") and name not in ours)
    if missing:
        broken(f"httpcore.{interface}", f"has methods network.py does not implement: {missing}")
