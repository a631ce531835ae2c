"""A compressed HTTP body is refused (415) from its headers, never inflated: admission
charges the bytes on the wire, and a 600:1 gzip body would hold 600 times more."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx
import pytest

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.integration.test_http_abuse import COHERE, GOOD, MIB, NATIVE, connect, http_port, read_response
from tests.support.fault_scenarios import rss_bytes
from tests.support.process import ServiceProcess

# 12 MB of JSON (under the 16 MiB message bound) in about 12 KB of gzip.
INFLATED = json.dumps({**GOOD, "documents": ["a" * 2_000_000] * 6}).encode()
BOMB = gzip.compress(INFLATED, compresslevel=9)


def post_gzip(port: int, path: str, encoding: str = "gzip") -> httpx.Response:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    return httpx.post(f"http://127.0.0.1:{port}{path}", content=BOMB, headers=headers, timeout=30)


def test_the_bomb_is_600_to_1() -> None:
    assert len(INFLATED) / len(BOMB) >= 600


@pytest.mark.parametrize(("path", "encoding"), [(COHERE, "gzip"), (NATIVE, "deflate"), (COHERE, "GZIP, br")])
def test_a_compressed_body_is_415_in_the_routes_format_and_the_server_goes_on(
    serve: ServerFactory, upstream: FakeUpstream, path: str, encoding: str
) -> None:
    with serve(http_port=0) as server:
        port = http_port(server)
        refused = post_gzip(port, path, encoding)
        sent_upstream = list(upstream.requests)
        after = httpx.post(f"http://127.0.0.1:{port}{COHERE}", json=GOOD, timeout=10)

    assert refused.status_code == 415, refused.text[:300]
    body = refused.json()
    assert "Content-Encoding" in body["message"]
    assert encoding.lower() in body["message"]
    if path == NATIVE:
        assert body["code"] == "UnsupportedMediaType"
        assert body["request_id"] == refused.headers["x-request-id"]
    assert sent_upstream == []
    assert after.status_code == 200


def test_identity_encoding_is_accepted(serve: ServerFactory) -> None:
    with serve(http_port=0) as server:
        answer = httpx.post(
            f"http://127.0.0.1:{http_port(server)}{COHERE}",
            json=GOOD,
            headers={"Content-Encoding": "identity"},
            timeout=10,
        )

    assert answer.status_code == 200


def test_expect_100_continue_with_a_compressed_body_is_refused_before_it_is_sent(
    serve: ServerFactory,
) -> None:
    with serve(http_port=0) as server:
        port = http_port(server)
        head = (
            f"POST {COHERE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(BOMB)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        with closing(connect(port, timeout=5)) as sock:
            sock.sendall(head)
            status, _ = read_response(sock)

    assert status == 415  # not 100 Continue


def test_40_gzip_bombs_at_once_leave_memory_flat(upstream: FakeUpstream) -> None:
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        assert service.process is not None
        serving = next(event for event in service.events() if event["event"] == "serving")
        port = int(serving["http_port"])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(20):  # warm: the first calls allocate what every call reuses
                client.post(COHERE, json=GOOD)
        before = rss_bytes(service.process.pid)
        with ThreadPoolExecutor(40) as pool:
            statuses = Counter(pool.map(lambda _: post_gzip(port, COHERE).status_code, range(40)))
        after = rss_bytes(service.process.pid)

    assert statuses == Counter({415: 40})
    assert after - before < 20 * MIB, f"RSS grew {(after - before) / MIB:.1f} MiB"  # inflated: ~40 x 12 MB
