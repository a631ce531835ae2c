"""Hostile input and overload on the HTTP front door: the server answers each with a 4xx
(never a 500 or a stack trace), holds its memory, and goes on serving everyone else.

Raw sockets play the callers no HTTP library would be: a body a byte a second, a
Content-Length that never comes, a thousand connections that say nothing.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from typing import Any

import grpc
import httpx
import pytest

from rerank_service.config.secret import Secret
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import CALLER_KEY, UPSTREAM_KEY, ServerFactory
from tests.support.fault_scenarios import rss_bytes
from tests.support.logs import LogCapture
from tests.support.process import ServiceProcess
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

NATIVE = "/api/v1/services/rerank/text-rerank/text-rerank"
COHERE = "/v1/rerank"
GOOD = {"model": "qwen3-rerank", "query": "red apple", "documents": ["a red apple", "a car"]}
MIB = 1024 * 1024


def http_port(server: ServerThread) -> int:
    assert server.server is not None
    assert server.server.http is not None
    assert server.server.http.port is not None
    return server.server.http.port


def post(
    port: int, path: str, body: Any = None, content: bytes | None = None, timeout: float = 10
) -> httpx.Response:
    raw = json.dumps(body if body is not None else GOOD).encode() if content is None else content
    return httpx.post(
        f"http://127.0.0.1:{port}{path}",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


def assert_refused_cleanly(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    body: dict[str, Any] = response.json()
    return body


def request_head(port: int, path: str, length: int | str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


def answered(sock: socket.socket) -> bool:
    """Whether the server has written to (or closed) `sock`: it can be read without waiting."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def connect(port: int, timeout: float = 10, source: str | None = None) -> socket.socket:
    bind = None if source is None else (source, 0)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=bind)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@pytest.fixture
def live(serve: ServerFactory) -> Iterator[ServerThread]:
    with serve(http_port=0) as running:
        yield running


# --- oversized and huge ------------------------------------------------------------------------


def test_an_oversized_body_is_413_and_the_server_goes_on(serve: ServerFactory) -> None:
    with serve(http_port=0, max_message_bytes=MIB) as server:
        port = http_port(server)
        huge = json.dumps({**GOOD, "documents": ["apple " * 1000] * 400}).encode()  # 2.4 MB
        started = time.monotonic()
        refused = post(port, COHERE, content=huge)
        took = time.monotonic() - started
        after = post(port, COHERE)
        over_grpc = server.stub.Rerank(request(), timeout=5)

    assert len(huge) > 2 * MIB
    body = assert_refused_cleanly(refused, 413)
    assert str(MIB) in body["message"]
    assert took < 5
    assert after.status_code == 200
    assert len(over_grpc.output.results) == 2


def test_a_content_length_past_the_limit_is_413_at_once_and_blocks_nobody(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """A caller announces a terabyte and sends nothing: it must be refused from its
    headers, not admitted for the whole byte budget while its body never comes."""
    with serve(http_port=0, max_message_bytes=MIB) as server, closing(connect(http_port(server))) as liar:
        port = http_port(server)
        liar.sendall(request_head(port, COHERE, 10**12))
        # The server has read its headers once it answers them: the others come after that.
        wait_until(lambda: answered(liar), timeout=3, what="an answer to the liar's headers alone")
        others = [post(port, COHERE, timeout=5).status_code for _ in range(3)]
        try:  # one admission for both doors
            server.stub.Rerank(request(), timeout=5)
            over_grpc = "OK"
        except grpc.RpcError as error:
            over_grpc = code_of(error).name
        liar.settimeout(3)
        try:
            status, _ = read_response(liar)
        except (TimeoutError, ConnectionError):
            status = 0  # no answer in 3 s: it holds the budget until the 30 s body timeout

    assert (others, over_grpc, status) == ([200, 200, 200], "OK", 413)


@pytest.mark.parametrize(
    ("key", "length", "status"),
    [(None, 1000, 401), ("wrong-key", 1000, 401), (CALLER_KEY, 2 * MIB, 413)],
    ids=["no-key", "wrong-key", "over-the-limit"],
)
def test_expect_100_continue_is_not_answered_for_a_body_that_will_be_refused(
    serve: ServerFactory, key: str | None, length: int, status: int
) -> None:
    """curl sends `Expect: 100-continue` for large bodies and waits: the refusal must come
    from the headers, instead of `100 Continue` and the whole body uploaded for nothing."""
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),), max_message_bytes=MIB) as server:
        port = http_port(server)
        auth = "" if key is None else f"Authorization: Bearer {key}\r\n"
        with closing(connect(port, timeout=3)) as sock:
            sock.sendall(request_head(port, COHERE, length, auth + "Expect: 100-continue\r\n"))
            first, _ = read_response(sock)

    assert first == status  # not 100


@pytest.mark.parametrize("expect", [False, True], ids=["body", "expect-100-continue"])
def test_a_bearer_token_of_bytes_that_are_not_utf8_is_a_key_not_accepted_not_a_bug(
    serve: ServerFactory, logs: LogCapture, expect: bool
) -> None:
    """aiohttp hands such bytes on as surrogates, which hashing the token failed on: a 500
    and a traceback per request, for anyone without a key to send."""
    body = json.dumps(GOOD).encode()
    auth = b"Authorization: Bearer \xff\xfe-not-utf8\r\n" + (b"Expect: 100-continue\r\n" if expect else b"")
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),)) as server:
        port = http_port(server)
        head = request_head(port, COHERE, len(body)).removesuffix(b"\r\n") + auth + b"\r\n"
        with closing(connect(port, timeout=5)) as sock:
            sock.sendall(head if expect else head + body)
            status, answer = read_response(sock)
        [line] = logs.wait_for_calls(1)

    assert status == 401
    assert b"not accepted" in answer
    assert line["code"] == "UNAUTHENTICATED"
    assert not [event for event in logs.events() if event.get("event") == "unexpected error"]


def test_expect_100_continue_while_every_slot_is_held_is_refused_at_once_and_counted(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """A caller waiting to send its body must not wait for a slot it will not get: 429 from
    the headers, counted as admission's refusal for slots, like any call past the bound."""
    upstream.always(Fault(delay=NEVER))
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),), max_concurrent_requests=1) as server:
        assert server.server is not None
        port = http_port(server)
        held = server.stub.Rerank.future(
            request(), timeout=30, metadata=(("authorization", f"Bearer {CALLER_KEY}"),)
        )
        assert upstream.wait_for(lambda fake: fake.in_flight == 1, timeout=10)
        auth = f"Authorization: Bearer {CALLER_KEY}\r\nExpect: 100-continue\r\n"
        with closing(connect(port, timeout=5)) as sock:
            sock.sendall(request_head(port, COHERE, len(json.dumps(GOOD)), auth))
            first, _ = read_response(sock)
        refusals = server.server.metrics.registry.get_sample_value(
            "rerank_admission_refusals_total", {"bound": "slots"}
        )
        held.cancel()

    assert first == 429  # not 100, and not a wait for a body that will not come
    assert refusals == 1


def test_expect_100_continue_is_answered_for_an_accepted_call(serve: ServerFactory) -> None:
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),)) as server:
        port = http_port(server)
        body = json.dumps(GOOD).encode()
        auth = f"Authorization: Bearer {CALLER_KEY}\r\nExpect: 100-continue\r\n"
        with closing(connect(port, timeout=3)) as sock:
            sock.sendall(request_head(port, COHERE, len(body), auth))
            go_on, _ = read_response(sock)
            sock.sendall(body)
            final, answer = read_response(sock)

    assert go_on == 100
    assert final == 200
    assert json.loads(answer)["results"][0]["index"] == 0


@pytest.mark.parametrize("path", [COHERE, NATIVE])
def test_100000_tiny_documents_are_400_naming_documents(
    live: ServerThread, upstream: FakeUpstream, path: str
) -> None:
    documents = ["a"] * 100_000
    body: dict[str, Any] = (
        {"model": "qwen3-rerank", "input": {"query": "q", "documents": documents}}
        if path == NATIVE
        else {**GOOD, "documents": documents}
    )
    started = time.monotonic()
    refused = post(http_port(live), path, body)
    took = time.monotonic() - started

    error = assert_refused_cleanly(refused, 400)
    assert "documents" in error["message"]
    assert "100000" in error["message"]
    assert took < 5
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("documents", "field"),
    [([7] * 100_000, "documents[0]"), ([" "] * 100_000, "documents[0]")],
    ids=["100000-numbers", "100000-blank"],
)
def test_100000_bad_documents_get_a_short_400(live: ServerThread, documents: list[Any], field: str) -> None:
    refused = post(http_port(live), COHERE, {**GOOD, "documents": documents})

    error = assert_refused_cleanly(refused, 400)
    assert field in error["message"]
    assert len(refused.content) < 4096  # not 100,000 violations echoed back


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "qwen3-rerank", "query": "\xc3\x28 \xa0\xa1", "documents": ["a"]}',
        b'{"model": "qwen3-rerank", "query": "q", "documents": ["\xed\xa0\x80"]}',
        b"\xff\xfe{\x00}\x00",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_n": 1e400}',
        b'{"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_n": NaN}',
        b'{"model": "qwen3-rerank", "query": "q", "documents": ["a"], "query": "again"}x',
    ],
    ids=[
        "invalid-utf8",
        "encoded-surrogate",
        "utf16-bom",
        "deep-nesting",
        "infinite-number",
        "nan",
        "trailing",
    ],
)
def test_hostile_json_is_400_and_never_a_500(live: ServerThread, content: bytes) -> None:
    refused = post(http_port(live), COHERE, content=content)
    after = post(http_port(live), COHERE)

    error = assert_refused_cleanly(refused, 400)
    assert "JSON" in error["message"]
    assert after.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {**GOOD, "top_n": 1e30},
        {**GOOD, "top_n": -(2**63)},
        {**GOOD, "top_n": True},
        {**GOOD, "model": "m" * 100_000},
        {**GOOD, "return_documents": None, "instruct": {"a": 1}},
        {**GOOD, "documents": [{"text": 5}, {"no-text": "a"}, None]},
    ],
    ids=[
        "top_n-huge",
        "top_n-negative-huge",
        "top_n-bool",
        "model-100k",
        "instruct-object",
        "documents-objects",
    ],
)
def test_hostile_fields_are_4xx_and_never_a_500(live: ServerThread, body: dict[str, Any]) -> None:
    refused = post(http_port(live), COHERE, body)

    assert 400 <= refused.status_code < 500, refused.text[:300]
    assert "Traceback" not in refused.text
    assert len(refused.content) < 4096  # a 100 kB model name is not echoed whole


@pytest.mark.parametrize(
    "head",
    [
        "Content-Length: 10\r\nContent-Length: 12\r\n",
        "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: abc\r\n",
        "X-Big: " + "a" * 20_000 + "\r\nContent-Length: 2\r\n",
    ],
    ids=["two-lengths", "length-and-chunked", "negative-length", "text-length", "huge-header"],
)
def test_malformed_framing_is_4xx_and_the_server_goes_on(live: ServerThread, head: str) -> None:
    port = http_port(live)
    raw = (
        f"POST {COHERE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{head}\r\n{{}}"
    ).encode()
    with closing(connect(port, timeout=5)) as sock:
        sock.sendall(raw)
        try:
            status, body = read_response(sock)
        except ConnectionError:  # closing the connection is also a refusal
            status, body = 400, b""

    assert 400 <= status < 500
    assert b"Traceback" not in body
    assert post(port, COHERE).status_code == 200


# --- slow and silent callers -------------------------------------------------------------------


def test_a_body_sent_a_byte_a_second_is_408_within_the_body_timeout(serve: ServerFactory) -> None:
    with (
        serve(http_port=0, max_concurrent_requests=1, http_body_timeout=1.0) as server,
        closing(connect(http_port(server))) as slow,
    ):
        port = http_port(server)
        body = json.dumps(GOOD).encode()
        slow.sendall(request_head(port, COHERE, len(body)))
        slow.settimeout(0.05)
        started = time.monotonic()
        answer = b""
        for byte in body:  # one byte a second until the server answers
            slow.sendall(bytes([byte]))
            try:
                answer = slow.recv(65536)
            except TimeoutError:
                time.sleep(0.95)  # the slow caller's pace, not synchronisation
                if time.monotonic() - started > 5:
                    break
                continue
            break
        took = time.monotonic() - started
        after = post(port, COHERE)  # the one call slot is free again

    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive" in answer
    assert took < 4.0  # the 1 s timeout, not the 5 s the test would wait (a bound, not a timing)
    assert after.status_code == 200


def test_a_silent_connection_is_closed_after_the_keep_alive_timeout(serve: ServerFactory) -> None:
    with (
        serve(http_port=0, http_keepalive_timeout=1.0) as server,
        closing(connect(http_port(server))) as silent,
    ):
        silent.settimeout(5)
        started = time.monotonic()
        try:
            closed = silent.recv(1) == b""
        except ConnectionResetError:
            closed = True
        took = time.monotonic() - started

    assert closed
    assert took < 4.0  # the 1 s timeout, not the 5 s the test would wait (a bound, not a timing)


def test_1000_idle_connections_leave_a_caller_served_and_memory_bounded(upstream: FakeUpstream) -> None:
    # A keep-alive far past the test's length: on a loaded machine the 1000 connections and
    # 200 calls can take longer than the default 15 s (the keep-alive has its own test).
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    args += ["--http-keepalive-timeout", "600"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service, ExitStack() as stack:
        assert service.process is not None
        pid = service.process.pid
        serving = next(event for event in service.events() if event["event"] == "serving")
        port = int(serving["http_port"])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(20):  # warm: the first calls allocate what every call reuses
                client.post(COHERE, json=GOOD)
            before = rss_bytes(pid)
            # From 16 addresses: one address may hold only --max-connections-per-peer (64).
            idle = [
                stack.enter_context(closing(connect(port, source=f"127.0.0.{2 + i % 16}")))
                for i in range(1000)
            ]
            statuses = Counter(client.post(COHERE, json=GOOD).status_code for _ in range(200))
            health = client.get("/healthz").status_code
            during = rss_bytes(pid)
        still_open = sum(1 for sock in idle if is_open(sock))

    assert statuses == Counter({200: 200})
    assert health == 200
    assert still_open == 1000  # within the keep-alive timeout they are kept, not dropped
    assert during - before < 100 * MIB, f"RSS grew {(during - before) / MIB:.1f} MiB"


def is_open(sock: socket.socket) -> bool:
    """Still connected: nothing to read yet (a closed one reads b'' or fails)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# --- overload ------------------------------------------------------------------------------------


def test_a_flood_past_the_admission_limit_is_429_and_health_stays_200(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    # The four admitted calls hold their slots at the upstream until the health checks and
    # the gRPC call below have run (released then: no clock decides it).
    held = threading.Event()
    upstream.always(Fault(until=held))
    with serve(http_port=0, max_concurrent_requests=4) as server, ThreadPoolExecutor(64) as pool:
        port = http_port(server)
        flood = [
            pool.submit(post, port, COHERE if i % 2 else NATIVE, GOOD if i % 2 else _native(GOOD))
            for i in range(64)
        ]
        try:
            assert upstream.wait_for(lambda fake: fake.in_flight == 4)
            health = [
                httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code
                for path in ("/healthz", "/readyz")
            ]
            refused_grpc = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        finally:
            held.set()
        answers = [future.result(timeout=20) for future in flood]
        upstream.always(None)
        after = post(port, COHERE)

    statuses = Counter(answer.status_code for answer in answers)
    assert set(statuses) == {200, 429}, statuses
    assert 4 <= statuses[200] < 64
    refused = [answer for answer in answers if answer.status_code == 429]
    assert all(int(answer.headers["Retry-After"]) >= 1 for answer in refused)
    assert all("overloaded" in answer.json()["message"] for answer in refused)
    assert health == [200, 200]
    assert code_of(refused_grpc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after.status_code == 200
    assert upstream.max_in_flight <= 4


def _native(flat: dict[str, Any]) -> dict[str, Any]:
    return {"model": flat["model"], "input": {"query": flat["query"], "documents": flat["documents"]}}
