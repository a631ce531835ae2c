"""The HTTP front door at the edges of the protocol, against a live server on loopback: the
parser's own 400s, `Expect: 100-continue` (a refused media type, HTTP/1.0), a client that
half-closes, and what the answers say of themselves (`Server`, `Retry-After`, Cohere's
billed search units)."""

from __future__ import annotations

import json
import socket
from contextlib import closing

import grpc
import httpx
import pytest

from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import ServerFactory
from tests.integration.test_http_abuse import COHERE, GOOD, connect, http_port, read_response
from tests.integration.test_http_malformed_logs import answer_to
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, expect_error, request, retry_delay
from tests.support.waiting import wait_until

SERVER_NAME = "rerank-service"


def headers_of(answer: bytes) -> dict[str, str]:
    """The header fields of the first answer in `answer`, by lower-case name."""
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:])
    }


def expecting_head(port: int, version: str, content_type: str, length: int) -> bytes:
    """A rerank request's head with `Expect: 100-continue`: its body is to be sent once told to."""
    return (
        f"POST {COHERE} {version}\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",  # over 16 KiB
    ],
    ids=["bad-header-line", "header-too-long"],
)
def test_the_parsers_400_names_the_server_as_a_routed_answer_does(serve: ServerFactory, raw: bytes) -> None:
    """aiohttp's answer to a request it cannot parse said `Server: Python/3.11 aiohttp/3.x`."""
    with serve(http_port=0) as server:
        port = http_port(server)
        refused = answer_to(port, raw)
        routed = httpx.get(f"http://127.0.0.1:{port}/no-such-route", timeout=5)

    assert refused.split(b" ", 2)[1] == b"400", refused[:200]
    assert headers_of(refused)["server"] == SERVER_NAME
    assert routed.headers["server"] == SERVER_NAME


def test_expect_100_continue_with_a_content_type_that_is_refused_is_415_without_100(
    serve: ServerFactory, logs: LogCapture
) -> None:
    """The media type is known from the headers: the client must not upload its body for a
    415 (it got `100 Continue`, then the 415 at once)."""
    body = json.dumps(GOOD).encode()
    with serve(http_port=0) as server:
        port = http_port(server)
        with closing(connect(port, timeout=5)) as sock:
            sock.sendall(expecting_head(port, "HTTP/1.1", "text/plain", len(body)))
            first, answer = read_response(sock)
        [line] = logs.wait_for_calls(1)

    assert first == 415  # not 100
    assert b"text/plain" in answer
    assert line["code"] == "INVALID_ARGUMENT"


def test_expect_100_continue_on_http_1_0_is_ignored(serve: ServerFactory) -> None:
    """RFC 9110 10.1.1: a server MUST ignore it in an HTTP/1.0 request (1.0 has no 1xx). The
    route reads the body once the client stops waiting and sends it."""
    body = json.dumps(GOOD).encode()
    with serve(http_port=0) as server:
        port = http_port(server)
        assert server.server is not None
        admission = server.server.admission
        with closing(connect(port, timeout=5)) as sock:
            sock.sendall(expecting_head(port, "HTTP/1.0", "application/json", len(body)))
            # The route admits the body's bytes after the expect handler has had its say:
            # a `100 Continue` would be on its way by now.
            wait_until(lambda: admission.bytes_in_flight == len(body), what="the route waiting for the body")
            sock.sendall(body)
            first, answer = read_response(sock)

    assert first == 200  # the first answer is the final one, not 100
    assert json.loads(answer)["results"][0]["index"] == 0


def test_a_client_that_half_closes_after_its_request_is_taken_as_gone(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    """Documented (HTTP.md, Limits): TCP tells the server the same of a half-close and of a
    close, so a call whose client shut down its sending side is cancelled like one whose
    client hung up; keeping it would leave every hung-up client's call on its upstream."""
    upstream.always(Fault(delay=NEVER))
    body = json.dumps(GOOD).encode()
    with serve(http_port=0) as server:
        port = http_port(server)
        with closing(connect(port)) as sock:
            head = (
                f"POST {COHERE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            wait_until(lambda: upstream.in_flight == 1, what="the call at the upstream")
            sock.shutdown(socket.SHUT_WR)
            wait_until(lambda: len(upstream.abandoned) == 1, what="the upstream call abandoned")
            [line] = logs.wait_for_calls(1)

    assert line["code"] == "CANCELLED"


@pytest.mark.parametrize("upstream_retry_after", [None, "7"], ids=["no-retry-after", "retry-after"])
def test_an_upstream_429_says_retry_after_over_http_when_grpc_says_retry_info(
    serve: ServerFactory, upstream: FakeUpstream, upstream_retry_after: str | None
) -> None:
    """Both doors say a wait only when the service knows one (HTTP.md's 429 row, ERRORS.md):
    an upstream 429 without `Retry-After` gives neither `Retry-After` nor RetryInfo."""
    headers = {} if upstream_retry_after is None else {"Retry-After": upstream_retry_after}
    upstream.always(Fault(status=429, body={"code": "Throttling", "message": "slow down"}, headers=headers))
    with serve(http_port=0, upstream_max_attempts=1) as server:
        refused = httpx.post(f"http://127.0.0.1:{http_port(server)}{COHERE}", json=GOOD, timeout=10)
        refused_grpc = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert refused.status_code == 429
    assert code_of(refused_grpc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.headers.get("Retry-After") == upstream_retry_after
    assert retry_delay(refused_grpc) == (
        None if upstream_retry_after is None else float(upstream_retry_after)
    )


def test_cohere_billed_search_units_are_one_per_100_documents_and_none_from_the_cache(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """Cohere bills one search unit per query per 100 documents or part of them. It was
    always 1: for a call of 1,000 documents split into several upstream requests, and for
    a call the score cache answered whole, with no backend called."""
    few = {**GOOD, "documents": [f"doc {i} apple" for i in range(150)]}
    many = {**GOOD, "documents": [f"document {i} red apple" for i in range(1000)]}
    with serve(http_port=0, cache_memory_mb=16) as server:
        url = f"http://127.0.0.1:{http_port(server)}/v2/rerank"
        fresh = httpx.post(url, json=few, timeout=30)
        cached = httpx.post(url, json=few, timeout=30)
        split = httpx.post(url, json=many, timeout=30)
    upstream_requests = len(split.headers["x-upstream-request-ids"].split(","))

    assert fresh.json()["meta"]["billed_units"] == {"search_units": 2}
    assert cached.headers["x-cache"] == "hit"
    assert cached.json()["meta"]["billed_units"] == {"search_units": 0}
    assert upstream_requests > 1
    assert split.json()["meta"]["billed_units"] == {"search_units": 10}
