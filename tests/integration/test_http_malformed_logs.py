"""Malformed HTTP requests are refused by aiohttp's parser before any route runs; what it
logs of them goes through the service's log: JSON, one short line, rate-limited."""

from __future__ import annotations

import json
import socket
from contextlib import closing

import httpx

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.integration.test_http_abuse import COHERE, GOOD
from tests.support.process import ServiceProcess, json_object

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40),  # a TLS hello on the plain port
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 preface
    b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


def send_raw(port: int, raw: bytes) -> None:
    with closing(socket.create_connection(("127.0.0.1", port), timeout=5)) as sock:
        sock.sendall(raw)
        try:
            while sock.recv(65536):  # until the server answers and closes
                pass
        except (ConnectionResetError, TimeoutError):
            pass


def test_300_malformed_requests_write_a_few_json_lines(upstream: FakeUpstream) -> None:
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        serving = next(event for event in service.events() if event["event"] == "serving")
        port = int(serving["http_port"])
        for i in range(300):
            send_raw(port, MALFORMED[i % len(MALFORMED)])
        after = httpx.post(f"http://127.0.0.1:{port}{COHERE}", json=GOOD, timeout=10)
        service.terminate()

    not_json = [line for line in service.lines if json_object(line) is None]
    library = [
        event
        for event in map(json_object, service.lines)
        if event is not None and str(event.get("logger_name", "")).startswith("aiohttp")
    ]
    assert not_json == [], not_json[:10]
    assert len(service.lines) < 50, len(service.lines)
    assert library  # what aiohttp says of them is kept, as JSON
    assert all("\n" not in json.dumps(event["event"]) for event in library)
    assert after.status_code == 200


def answer_to(port: int, raw: bytes) -> bytes:
    """What the server sends back to `raw`, to its close."""
    received = b""
    with closing(socket.create_connection(("127.0.0.1", port), timeout=5)) as sock:
        sock.sendall(raw)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return received


def test_a_malformed_request_is_answered_400_without_repeating_its_lines(upstream: FakeUpstream) -> None:
    """aiohttp's parser quoted the offending line in its answer: the Authorization header,
    key and all, to the sender and to any proxy that logs answers."""
    key = "sk-live-SECRETKEY-0123456789"
    requests = [
        b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\x01\r\n\r\n",
        b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer " + key.encode() + b"\r\n\r\n",
    ]
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        serving = next(event for event in service.events() if event["event"] == "serving")
        answers = [answer_to(int(serving["http_port"]), raw) for raw in requests]
        service.terminate()

    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400", answer[:200]
        assert body == b"400 Bad Request"
        assert key.encode() not in answer
