"""File descriptors through the HTTP port: connection caps, the open-file limit, and what
the server logs when descriptors run out.

An attacker on 127.0.0.2 opens idle connections by the thousand; polite callers come
from 127.0.0.1. The server closes the attacker's connections past the per-peer cap as
soon as they are accepted, so its descriptors stay for everyone else.
"""

from __future__ import annotations

import resource
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import grpc
import httpx
import pytest
from rerank.v1 import rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.integration.test_http_abuse import COHERE, GOOD, connect, http_port, is_open, read_response
from tests.support import process
from tests.support.certs import CertificateAuthority
from tests.support.fault_scenarios import open_fds
from tests.support.process import ServiceProcess, json_object
from tests.support.rpc import request
from tests.support.waiting import wait_until

ATTACKER = "127.0.0.2"


@pytest.fixture(autouse=True)
def enough_descriptors_for_the_attacker() -> None:
    """The test process itself opens over a thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connect_from(source: str, port: int, timeout: float = 5) -> socket.socket:
    return connect(port, timeout=timeout, source=source)


def start_connecting(source: str, port: int) -> socket.socket:
    """A connection under way, not waited for: once the server's listen queue is full, the
    kernel goes on retrying it while the test moves on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ConnectionResetError, ConnectionAbortedError, ssl.SSLEOFError):
        return True


def healthz_on(sock: socket.socket) -> int:
    """GET /healthz on an open keep-alive connection: its status."""
    sock.settimeout(5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _ = read_response(sock)
    return status


class IdleFlood:
    """`count` idle connections from `source`, reopened as the server closes them, until stopped."""

    def __init__(self, port: int, source: str, count: int) -> None:
        self._port = port
        self._source = source
        self._sockets: list[socket.socket | None] = [None] * count
        self._stop = threading.Event()
        self.rounds = 0
        self.connects = 0
        self._thread = threading.Thread(target=self._run, name="idle-flood", daemon=True)

    def __enter__(self) -> IdleFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        for sock in self._sockets:
            if sock is not None:
                sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, sock in enumerate(self._sockets):
                if self._stop.is_set():
                    return
                if sock is not None and is_open(sock):
                    continue
                if sock is not None:
                    sock.close()
                try:
                    self._sockets[i] = connect_from(self._source, self._port, timeout=2)
                    self.connects += 1
                except OSError:
                    self._sockets[i] = None
            self.rounds += 1
            self._stop.wait(0.2)  # pacing the attacker's rounds, not synchronisation


def test_1100_idle_connections_under_1024_descriptors_leave_polite_callers_served(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemd's default: a soft and hard limit of 1024 (soft = hard, so raising changes nothing).
    monkeypatch.setattr(process, "CLI", ["prlimit", "--nofile=1024:1024", *process.CLI])
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        assert service.process is not None
        pid = service.process.pid
        events = service.events()
        limit = next(event for event in events if event["event"] == "listening")["file_limit"]
        port = int(next(event for event in events if event["event"] == "serving")["http_port"])
        with IdleFlood(port, ATTACKER, 1100) as flood:
            assert wait_until(lambda: flood.rounds >= 1, timeout=120)
            peak_fds = open_fds(pid)
            connects_before = flood.connects
            http_ok = sum(_polite_http(port) for _ in range(100))
            with grpc.insecure_channel(service.target) as channel:  # a new connection, mid-flood
                stub = rerank_pb2_grpc.RerankServiceStub(channel)
                grpc_ok = sum(_polite_grpc(stub) for _ in range(100))
            connects_during = flood.connects - connects_before
            peak_fds = max(peak_fds, open_fds(pid))
        code = service.terminate()

    lines = service.lines
    parsed = [json_object(line) for line in lines]
    not_calls = [event for event in parsed if event is None or event.get("event") != "call"]
    assert (limit["soft"], limit["hard"]) == (1024, 1024)
    assert connects_during > 100, connects_during  # the flood went on meanwhile
    assert http_ok >= 99, http_ok
    assert grpc_ok >= 99, grpc_ok
    assert peak_fds < 512, peak_fds  # the attacker held at most its 64
    assert all(event is not None for event in parsed), [line for line in lines if not json_object(line)][:5]
    assert len(not_calls) < 100, len(not_calls)
    refusals = [event for event in not_calls if event and event["event"] == "http connection refused"]
    assert refusals
    assert "--max-connections-per-peer" in refusals[0]["why"]
    assert code == 0


def _polite_http(port: int) -> bool:
    try:  # a new connection per call: each must be accepted during the flood
        response = httpx.post(f"http://127.0.0.1:{port}{COHERE}", json=GOOD, timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _polite_grpc(stub: rerank_pb2_grpc.RerankServiceStub) -> bool:
    try:
        stub.Rerank(request(), timeout=5)
    except grpc.RpcError:
        return False
    return True


def test_the_65th_connection_from_one_address_is_closed_at_once_while_another_address_connects(
    serve: ServerFactory,
) -> None:
    with serve(http_port=0, max_connections_per_peer=64) as server, ExitStack() as stack:
        port = http_port(server)
        held = [stack.enter_context(closing(connect_from(ATTACKER, port))) for _ in range(64)]
        statuses = [healthz_on(sock) for sock in held]  # each was let in: it is answered
        extra = stack.enter_context(closing(connect_from(ATTACKER, port)))
        extra_closed = closed_within(extra, 5)  # at once, not after the 15 s keep-alive timeout
        other = stack.enter_context(closing(connect_from("127.0.0.3", port)))
        other_status = healthz_on(other)
        still_open = sum(is_open(sock) for sock in held)

    assert statuses == [200] * 64
    assert extra_closed
    assert other_status == 200
    assert still_open == 64


def test_the_connection_cap_closes_one_more_and_a_freed_place_is_taken_again(serve: ServerFactory) -> None:
    with serve(http_port=0, http_max_connections=8) as server, ExitStack() as stack:
        port = http_port(server)
        assert server.server is not None
        assert server.server.http is not None
        gate = server.server.http.gate
        assert gate is not None
        held = [stack.enter_context(closing(connect_from(f"127.0.0.{2 + i}", port))) for i in range(8)]
        statuses = [healthz_on(sock) for sock in held]
        over = stack.enter_context(closing(connect_from("127.0.0.20", port)))
        over_closed = closed_within(over, 5)
        held.pop().close()
        freed = wait_until(lambda: gate.open == 7)
        again = stack.enter_context(closing(connect_from("127.0.0.21", port)))
        again_status = healthz_on(again)

    assert statuses == [200] * 8
    assert over_closed
    assert freed
    assert again_status == 200


@pytest.fixture
def small_service(upstream: FakeUpstream) -> Iterator[ServiceProcess]:
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        yield service


def test_accept_failures_when_descriptors_run_out_are_one_json_line_and_the_server_recovers(
    small_service: ServiceProcess,
) -> None:
    """The connection caps keep HTTP connections alone from using up the descriptors; here
    the limit is lowered under the running server so that accept() itself fails."""
    service = small_service
    assert service.process is not None
    pid = service.process.pid
    port = int(next(event for event in service.events() if event["event"] == "serving")["http_port"])
    limit = open_fds(pid) + 40
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    with ExitStack() as stack:
        for source in range(2, 12):  # 300 connections from 10 addresses, each under its cap
            for _ in range(30):
                stack.enter_context(closing(start_connecting(f"127.0.0.{source}", port)))
        failed = wait_until(lambda: any(e["event"] == "accept failed" for e in service.events()))
    after = httpx.post(f"http://127.0.0.1:{port}{COHERE}", json=GOOD, timeout=30)
    service.terminate()

    parsed = [json_object(line) for line in service.lines]
    accept_failed = [event for event in parsed if event and event["event"] == "accept failed"]
    assert failed
    assert all(event is not None for event in parsed), [
        line for line in service.lines if not json_object(line)
    ][:5]
    assert len(accept_failed) == 1, accept_failed  # one per 10 s, however many attempts failed
    assert "Too many open files" in accept_failed[0]["error"]
    assert len(parsed) < 50, len(parsed)
    assert after.status_code == 200


def test_https_connections_count_from_their_accept_so_silent_handshakes_hold_no_more_than_the_cap(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Counted only once their handshake was done, connections that never start one held a
    descriptor each for the whole handshake timeout, past every cap."""
    ca = CertificateAuthority()
    cert, key = ca.issue_server().write(tmp_path, "server")
    client = ssl.create_default_context(cafile=str(ca.write(tmp_path)))
    with (
        serve(http_port=0, tls_cert=cert, tls_key=key, max_connections_per_peer=2) as server,
        ExitStack() as stack,
    ):
        port = http_port(server)
        assert server.server is not None
        assert server.server.http is not None
        gate = server.server.http.gate
        assert gate is not None
        silent = [connect_from(ATTACKER, port) for _ in range(2)]  # never send a ClientHello
        counted = wait_until(lambda: gate.open == 2, what="the silent connections counted")
        over = stack.enter_context(closing(connect_from(ATTACKER, port)))
        over_closed = closed_within(over, 5)  # at once, not after the handshake timeout
        for sock in silent:
            sock.close()
        freed = wait_until(lambda: gate.open == 0, what="their places given back")
        secured = stack.enter_context(
            client.wrap_socket(connect_from(ATTACKER, port), server_hostname="127.0.0.1")
        )
        status = healthz_on(secured)

    assert counted
    assert over_closed
    assert freed
    assert status == 200


def test_the_per_peer_cap_closes_an_https_connection_over_it_before_its_handshake(
    serve: ServerFactory, tmp_path: Path
) -> None:
    ca = CertificateAuthority()
    cert, key = ca.issue_server().write(tmp_path, "server")
    client = ssl.create_default_context(cafile=str(ca.write(tmp_path)))
    with (
        serve(http_port=0, tls_cert=cert, tls_key=key, max_connections_per_peer=2) as server,
        ExitStack() as stack,
    ):
        port = http_port(server)

        def https_from(source: str) -> ssl.SSLSocket:
            return stack.enter_context(
                client.wrap_socket(connect_from(source, port), server_hostname="127.0.0.1")
            )

        held = [https_from(ATTACKER) for _ in range(2)]
        statuses = [healthz_on(sock) for sock in held]
        with pytest.raises((ConnectionError, ssl.SSLError)):  # reset at its accept: no handshake
            https_from(ATTACKER)
        other_status = healthz_on(https_from("127.0.0.3"))

    assert statuses == [200, 200]
    assert other_status == 200
