"""An HTTP call takes its admission slot only once its body has arrived: bodies trickling
in hold their bytes (charged as soon as the headers are read) but no call slot, so they
cannot keep a polite caller out."""

from __future__ import annotations

import json
import socket
from collections import Counter
from contextlib import ExitStack, closing

import httpx

from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import ServerFactory
from tests.integration.test_http_abuse import COHERE, GOOD, connect, http_port, read_response, request_head
from tests.support.logs import LogCapture
from tests.support.waiting import wait_until

SLOTS = 4
SLOW = 12  # three times the slots


def test_bodies_trickling_in_hold_no_call_slot_and_each_is_answered_once_complete(
    serve: ServerFactory,
) -> None:
    body = json.dumps(GOOD).encode()
    with serve(http_port=0, max_concurrent_requests=SLOTS) as server, ExitStack() as stack:
        port = http_port(server)
        assert server.server is not None
        admission = server.server.admission
        slow: list[socket.socket] = []
        for _ in range(SLOW):  # the headers and all of the body but its last byte
            sock = stack.enter_context(closing(connect(port)))
            sock.sendall(request_head(port, COHERE, len(body)) + body[:-1])
            slow.append(sock)
        all_read = wait_until(lambda: admission.bytes_in_flight == SLOW * len(body), timeout=5)
        slots_held = admission.in_flight
        polite = Counter(
            httpx.post(f"http://127.0.0.1:{port}{COHERE}", json=GOOD, timeout=10).status_code
            for _ in range(20)
        )
        finished = []
        for sock in slow:  # one at a time: each then finds a slot
            sock.sendall(body[-1:])
            finished.append(read_response(sock)[0])
        drained = wait_until(lambda: admission.bytes_in_flight == 0 and admission.in_flight == 0)

    assert all_read  # every slow body was let in for its bytes, none refused for a slot
    assert slots_held == 0
    assert polite == Counter({200: 20})
    assert finished == [200] * SLOW
    assert drained


def test_a_client_gone_before_its_body_arrived_is_a_cancelled_call_not_an_internal_error(
    serve: ServerFactory, logs: LogCapture
) -> None:
    body = json.dumps(GOOD).encode()
    with serve(http_port=0) as server:
        port = http_port(server)
        assert server.server is not None
        admission = server.server.admission
        sock = connect(port)
        sock.sendall(request_head(port, COHERE, len(body)) + body[:-1])
        wait_until(lambda: admission.bytes_in_flight == len(body), what="the headers read")
        sock.close()
        [line] = logs.wait_for_calls(1)
        wait_until(lambda: admission.bytes_in_flight == 0, what="the body's bytes given back")

    assert line["code"] == "CANCELLED"
    assert not [event for event in logs.events() if event.get("event") == "unexpected error"]


def test_a_client_that_hangs_up_while_its_call_runs_cancels_it_as_over_grpc(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    """Its upstream call stops and its slot comes back at once, not when an answer nobody
    reads arrives (aiohttp runs a handler to its end unless told otherwise)."""
    upstream.always(Fault(delay=NEVER))
    body = json.dumps(GOOD).encode()
    with serve(http_port=0) as server:
        port = http_port(server)
        assert server.server is not None
        admission = server.server.admission
        sock = connect(port)
        sock.sendall(request_head(port, COHERE, len(body)) + body)
        wait_until(lambda: upstream.in_flight == 1, what="the call at the upstream")
        sock.close()
        wait_until(lambda: len(upstream.abandoned) == 1, what="the upstream call abandoned")
        [line] = logs.wait_for_calls(1)
        wait_until(lambda: admission.in_flight == 0, what="the slot given back")

    assert line["code"] == "CANCELLED"
