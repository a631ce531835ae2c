"""RerankStream against a live server: ids, concurrency window, per-item errors, close and cancel."""

from __future__ import annotations

import asyncio
import json
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.api.grpc import edge, servicer
from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config.secret import Secret
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.domain import BackendRequest, BackendResult, CallContext
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault, expected_ranking, total_tokens
from tests.conftest import CALLER_KEY, ServerFactory, upstream_settings
from tests.support.backends import GatedBackend
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

Code = grpc.StatusCode


def item(item_id: str, **fields: object) -> rerank_pb2.RerankStreamRequest:
    return rerank_pb2.RerankStreamRequest(id=item_id, request=request(**fields))


class Outbox:
    """Items the test hands to a stream one by one; None half-closes it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[rerank_pb2.RerankStreamRequest | None] = queue.Queue()

    def put(self, next_item: rerank_pb2.RerankStreamRequest | None) -> None:
        self._queue.put(next_item)

    def items(self) -> Iterator[rerank_pb2.RerankStreamRequest]:
        while (next_item := self._queue.get()) is not None:
            yield next_item


def by_id(responses: list[rerank_pb2.RerankStreamResponse]) -> dict[str, rerank_pb2.RerankStreamResponse]:
    answered = {response.id: response for response in responses}
    assert len(answered) == len(responses)  # no id answered twice
    return answered


def test_every_item_is_answered_under_its_own_id_whatever_the_completion_order(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    rng = random.Random(5)
    for _ in range(30):
        upstream.inject(Fault(delay=rng.uniform(0, 0.1)))
    queries = {f"item-{i}": f"apple {'cherry ' * (i % 3)}doc{i}" for i in range(30)}
    documents = ["apple pie", "cherry cake doc3", "doc7 apple cherry", "plain bread"]

    responses = list(
        server.stub.RerankStream(
            iter([item(key, query=query, documents=documents) for key, query in queries.items()]), timeout=30
        )
    )

    answered = by_id(responses)
    assert set(answered) == set(queries)
    for key, query in queries.items():
        response = answered[key].response
        assert [(r.index, r.relevance_score) for r in response.output.results] == expected_ranking(
            query, documents
        )
        assert response.usage.total_tokens == total_tokens(query, documents)
        assert response.request_id  # each item has the upstream's request id
    assert [r.id for r in responses] != list(queries)  # answered as they finished, not in order


def test_bad_items_get_their_error_and_good_items_still_succeed(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    upstream.always(None)
    items = [
        item("good-1"),
        item("empty-query", query=""),
        item("unknown-model", model="nope"),
        item("good-2", top_n=1),
        item("negative-top-n", top_n=-1),
    ]

    answered = by_id(list(server.stub.RerankStream(iter(items), timeout=30)))

    assert answered["good-1"].WhichOneof("result") == "response"
    assert len(answered["good-2"].response.output.results) == 1
    empty = answered["empty-query"].error
    assert empty.code == Code.INVALID_ARGUMENT.value[0]
    assert [v.field for v in empty.field_violations] == ["query"]
    assert empty.request_id
    assert answered["unknown-model"].error.code == Code.NOT_FOUND.value[0]
    assert answered["negative-top-n"].error.field_violations[0].field == "top_n"


def test_an_upstream_failure_answers_that_item_with_code_and_retry_delay(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.inject(
        Fault(status=429, body={"code": "Throttling", "message": "slow"}, headers={"Retry-After": "2"})
    )
    with serve(stream_concurrency=1, upstream_max_attempts=1) as server:
        answered = by_id(list(server.stub.RerankStream(iter([item("a"), item("b")]), timeout=30)))

    error = answered["a"].error
    assert error.code == Code.RESOURCE_EXHAUSTED.value[0]
    assert error.retry_delay.seconds == 2
    assert error.reason == "UPSTREAM_RATE_LIMITED"
    assert error.metadata["upstream_status"] == "429"
    assert answered["b"].WhichOneof("result") == "response"


def test_a_duplicate_id_in_flight_is_an_error_for_that_item_logged_with_its_request_id(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture, tmp_path: Path
) -> None:
    upstream.inject(Fault(delay=0.3))
    usage_log = tmp_path / "usage.jsonl"
    with serve(usage_log=str(usage_log)) as server:
        answered = list(
            server.stub.RerankStream(iter([item("same"), item("same"), item("other")]), timeout=30)
        )
        # Metered too, as every item whose request was read is: it had no usage line.
        wait_until(lambda: len(usage_log.read_text().splitlines()) == 3, what="an item's usage line each")

    errors = [r for r in answered if r.WhichOneof("result") == "error"]
    assert len(answered) == 3
    assert [(r.id, r.error.field_violations[0].field) for r in errors] == [("same", "id")]
    # The request id the refusal names is the one its log line says, as for any item.
    wait_until(lambda: any(e["event"] == "stream" for e in logs.events()), what="the stream's log line")
    lines = {e["request_id"]: e for e in logs.events() if e["event"] == "call"}
    refused = lines[errors[0].error.request_id]
    assert (refused["item_id"], refused["code"]) == ("same", "INVALID_ARGUMENT")
    assert len(lines) == 3


def test_the_window_bounds_upstream_calls_in_flight_against_a_fast_client(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=0.05))
    sent = 0

    def generate() -> Iterator[rerank_pb2.RerankStreamRequest]:
        nonlocal sent
        for i in range(60):
            sent += 1
            yield item(f"i{i}")

    with serve(stream_concurrency=4) as server:
        responses = list(server.stub.RerankStream(generate(), timeout=60))

    assert sent == 60
    assert len(by_id(responses)) == 60
    assert upstream.max_in_flight == 4


def test_a_fast_client_is_held_back_by_flow_control_while_the_window_is_full(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=0.5))
    big_document = "apple " * 40_000  # 240 kB an item: gRPC's buffers hold only a few
    pulled = 0

    def generate() -> Iterator[rerank_pb2.RerankStreamRequest]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield item(f"i{i}", documents=[big_document])

    with serve(stream_concurrency=2) as server:
        stream = server.stub.RerankStream(generate(), timeout=60)
        # Counted in items the server takes, not in seconds: six taken (three rounds of two,
        # 0.5 s each) leave the transport's windows ample time to fill...
        wait_until(lambda: len(upstream.requests) >= 6, what="six items reaching the upstream")
        pulled_when_full = pulled
        taken_when_full = len(upstream.requests)
        # ...then four more taken free room for about four: that is all the client may pull.
        wait_until(
            lambda: len(upstream.requests) >= taken_when_full + 4,
            what="four more items reaching the upstream",
        )
        pulled_after_four_more = pulled
        stream.cancel()

    # How much the windows hold depends on grpc's flow-control estimate (it grows them on a
    # fast link), so the proof is that pulling stops: without back-pressure the client
    # pushes hundreds of items a second until all 1,000 (240 MB) are gone.
    assert pulled_after_four_more < 1000
    assert pulled_after_four_more - pulled_when_full <= 20
    assert pulled_when_full * len(big_document) < 100_000_000
    assert upstream.max_in_flight <= 2


def test_after_the_client_half_closes_the_items_in_flight_are_finished(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=0.3))
    outgoing = Outbox()

    for i in range(5):
        outgoing.put(item(f"i{i}"))
    outgoing.put(None)  # half-close at once, while all five wait on the upstream
    stream = server.stub.RerankStream(outgoing.items(), timeout=30)
    responses = list(stream)

    assert sorted(r.id for r in responses) == [f"i{i}" for i in range(5)]
    assert all(r.WhichOneof("result") == "response" for r in responses)
    assert stream.code() == Code.OK


def test_cancelling_the_stream_cancels_the_upstream_calls_in_flight(
    server: ServerThread, upstream: FakeUpstream, logs: LogCapture
) -> None:
    upstream.always(Fault(delay=10))
    outgoing = Outbox()

    for i in range(3):
        outgoing.put(item(f"i{i}"))
    stream = server.stub.RerankStream(outgoing.items(), timeout=30)
    wait_until(lambda: len(upstream.requests) == 3, what="the three items reaching the upstream")
    stream.cancel()
    outgoing.put(None)
    wait_until(lambda: len(upstream.abandoned) == 3, what="the upstream calls abandoned")

    assert len(upstream.abandoned) == 3  # no work left running upstream
    streams = [e for e in logs.events() if e["event"] == "stream"]
    assert streams
    assert streams[-1]["code"] == "CANCELLED"


def test_the_streams_deadline_ends_the_whole_stream(server: ServerThread, upstream: FakeUpstream) -> None:
    upstream.always(Fault(delay=10))

    error = expect_error(lambda: list(server.stub.RerankStream(iter([item("a"), item("b")]), timeout=0.5)))

    assert code_of(error) == Code.DEADLINE_EXCEEDED


def test_a_stream_without_an_accepted_key_is_unauthenticated(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        error = expect_error(lambda: list(server.stub.RerankStream(iter([item("a")]), timeout=10)))
        accepted = list(
            server.stub.RerankStream(
                iter([item("a")]), metadata=(("authorization", f"Bearer {CALLER_KEY}"),), timeout=10
            )
        )

    assert code_of(error) == Code.UNAUTHENTICATED
    assert accepted[0].WhichOneof("result") == "response"
    assert len(upstream.requests) == 1


def test_each_item_and_the_stream_are_logged(
    server: ServerThread, upstream: FakeUpstream, logs: LogCapture
) -> None:
    stream_call = server.stub.RerankStream(iter([item("a"), item("b", query="")]), timeout=10)
    list(stream_call)

    wait_until(lambda: any(e["event"] == "stream" for e in logs.events()), what="the stream's log line")
    items = {e["item_id"]: e for e in logs.events() if e["event"] == "call"}
    [stream] = [e for e in logs.events() if e["event"] == "stream"]
    assert items["a"]["code"] == "OK"
    assert items["a"]["total_tokens"] > 0
    assert items["b"]["code"] == "INVALID_ARGUMENT"
    assert stream["code"] == "OK"
    assert stream["items"] == 2
    assert stream["method"] == "/rerank.v1.RerankService/RerankStream"
    # The stream's own request id, as its log line names it, in its trailers.
    assert dict(stream_call.trailing_metadata())["x-request-id"] == stream["request_id"]


def test_an_items_logged_latency_runs_from_when_the_edge_read_it(
    server: ServerThread, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item's call is timed from when the edge read it (`_StreamItems.arrived`), so its
    waits for a slot or for room in the byte budget count: here every item reads as read
    an hour ago, which its log line must show."""
    hour = 3600.0
    monkeypatch.setattr(
        edge._StreamItems, "arrived", lambda self, item: time.perf_counter() - hour, raising=True
    )
    list(server.stub.RerankStream(iter([item("a")]), timeout=10))

    wait_until(lambda: any(e["event"] == "stream" for e in logs.events()), what="the stream's log line")
    [line] = [e for e in logs.events() if e["event"] == "call" and e.get("item_id") == "a"]
    assert line["code"] == "OK"
    assert line["latency_ms"] >= hour * 1000


# --- streams that send nothing ---


def _open_silent_streams(server: ServerThread, count: int) -> list[Any]:
    """`count` RerankStreams that are opened and then send nothing (until cancelled)."""
    silence: queue.Queue[rerank_pb2.RerankStreamRequest] = queue.Queue()

    def never() -> Iterator[rerank_pb2.RerankStreamRequest]:
        yield silence.get()  # blocks: the stream stays open without an item

    # Each is a grpc.Call as well as an iterator of answers.
    return [server.stub.RerankStream(never(), timeout=30) for _ in range(count)]


def test_streams_that_send_nothing_hold_no_admission_slot(serve: ServerFactory) -> None:
    with serve(max_concurrent_requests=2) as server:
        assert server.server is not None
        admission = server.server.admission
        silent = _open_silent_streams(server, 3)
        wait_until(lambda: admission.open == 3, what="the streams open on the server")
        try:
            answer = server.stub.Rerank(request(), timeout=10)
        finally:
            for call in silent:
                call.cancel()

    assert len(answer.output.results) == len(request().documents)


def test_streams_whose_items_are_answered_give_their_slot_back_until_their_next_item(
    serve: ServerFactory,
) -> None:
    # Two streams that each had an item answered and stay open, sending nothing more, at
    # --max-concurrent-requests 2: another caller is still let in (before, each held its
    # slot until --stream-idle-timeout, renewed by every item).
    with serve(max_concurrent_requests=2) as server:
        assert server.server is not None
        admission = server.server.admission
        outboxes = [Outbox(), Outbox()]
        streams = [server.stub.RerankStream(outbox.items(), timeout=30) for outbox in outboxes]
        for number, (outbox, stream) in enumerate(zip(outboxes, streams, strict=True)):
            outbox.put(item(f"first-{number}"))
            assert next(stream).id == f"first-{number}"
        wait_until(lambda: admission.in_flight == 0, what="the answered streams giving their slots back")
        answer = server.stub.Rerank(request(), timeout=10)
        # The next item takes a slot again, and is answered.
        outboxes[0].put(item("second"))
        second = next(streams[0])
        for outbox in outboxes:
            outbox.put(None)
        rest = [list(stream) for stream in streams]

    assert len(answer.output.results) == len(request().documents)
    assert second.id == "second"
    assert rest == [[], []]


def test_an_item_that_finds_no_slot_is_refused_alone_and_the_stream_goes_on(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """Every slot is held by a unary call: the stream's item gets RESOURCE_EXHAUSTED as its
    own RerankError, and once the slot is free its next item is answered."""
    with serve(max_concurrent_requests=1) as server:
        assert server.server is not None
        admission = server.server.admission
        upstream.inject(Fault(delay=NEVER))
        held = server.stub.Rerank.future(request(), timeout=30)
        wait_until(lambda: upstream.in_flight == 1, what="the unary call holding the only slot")
        outbox = Outbox()
        stream = server.stub.RerankStream(outbox.items(), timeout=30)
        outbox.put(item("refused"))
        refused = next(stream)
        held.cancel()
        wait_until(lambda: admission.in_flight == 0, what="the slot given back")
        outbox.put(item("later"))
        later = next(stream)
        outbox.put(None)
        rest = list(stream)

    assert (refused.id, refused.WhichOneof("result")) == ("refused", "error")
    assert refused.error.code == Code.RESOURCE_EXHAUSTED.value[0]
    assert (later.id, later.WhichOneof("result")) == ("later", "response")
    assert rest == []


def test_an_item_whose_answer_is_over_max_message_bytes_fails_alone_and_the_stream_goes_on(
    serve: ServerFactory, logs: LogCapture
) -> None:
    """grpc refuses to send such an answer, which ended the whole stream (the item logged OK)."""
    limit = 65536
    documents = [f"document {number:04d} " + "x" * 45 for number in range(1000)]
    big = item("big", documents=documents, return_documents=True)
    assert big.ByteSize() < limit
    with serve(max_message_bytes=limit) as server:
        answers = by_id(list(server.stub.RerankStream(iter([big, item("small")]), timeout=30)))

    assert answers["big"].WhichOneof("result") == "error"
    assert answers["big"].error.code == Code.RESOURCE_EXHAUSTED.value[0]
    assert answers["big"].error.reason == "ANSWER_TOO_LARGE"
    assert answers["small"].WhichOneof("result") == "response"
    wait_until(lambda: any(e["event"] == "stream" for e in logs.events()), what="the stream's log line")
    items = {e["item_id"]: e for e in logs.events() if e["event"] == "call"}
    assert items["big"]["code"] == "RESOURCE_EXHAUSTED"
    assert items["small"]["code"] == "OK"


def test_a_stream_ended_while_its_next_item_waits_for_byte_budget_gives_every_byte_back(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """A client that reads no answer, then cancels: the item waiting for room took the bytes
    the stream's end had just given back, and held them for good (--max-inflight-bytes
    shrank with each such stream, until calls were refused for room nobody held)."""
    document = "apple " * 10_000  # 60 kB; ten of them make an item of 600 kB
    with serve(max_message_bytes=1 << 20, max_inflight_bytes=1 << 20, stream_concurrency=4) as server:
        assert server.server is not None
        admission = server.server.admission
        outbox = Outbox()
        for index in range(4):
            outbox.put(item(f"i{index}", documents=[document] * 10, return_documents=True))
        stream = server.stub.RerankStream(outbox.items(), timeout=60)  # its answers never read
        # The second item waits for room while the first's answer waits for the client.
        waiting = wait_until(
            lambda: admission._freed is not None and admission.bytes_in_flight > 0,
            what="the next item waiting for byte budget",
        )
        stream.cancel()
        outbox.put(None)
        drained = wait_until(
            lambda: admission.bytes_in_flight == 0 and admission.open == 0, what="all given back"
        )
        after = server.stub.Rerank(request(documents=[document] * 10), timeout=30)

    assert waiting
    assert drained
    assert len(after.output.results) == 10


def test_a_stream_ended_by_its_deadline_is_logged_deadline_exceeded(
    serve: ServerFactory, logs: LogCapture
) -> None:
    """grpc cancels the handler at the deadline: it was logged and counted CANCELLED, as a
    caller that hung up, while the caller was told DEADLINE_EXCEEDED."""
    with serve() as server:
        outbox = Outbox()  # never half-closed: the stream stays open, one item answered
        outbox.put(item("answered"))
        stream = server.stub.RerankStream(outbox.items(), timeout=3)
        answered = next(stream)
        error = expect_error(lambda: next(stream))  # nothing more comes: the deadline ends it
        outbox.put(None)
        wait_until(lambda: any(e["event"] == "stream" for e in logs.events()), what="the stream's log line")

    [logged] = [e for e in logs.events() if e["event"] == "stream"]
    assert answered.WhichOneof("result") == "response"
    assert code_of(error) == Code.DEADLINE_EXCEEDED
    assert logged["code"] == "DEADLINE_EXCEEDED"


def test_items_sharing_an_id_give_back_their_own_bytes(serve: ServerFactory, upstream: FakeUpstream) -> None:
    """A small item in flight, then a large one under the same id (answered at once, a
    duplicate): the large one's answer gives back its own bytes, the small one's stay held
    while it runs, and the stream's end gives those back (none is lost to the other's)."""
    with serve(stream_concurrency=2) as server:
        assert server.server is not None
        admission = server.server.admission
        upstream.inject(Fault(delay=NEVER))  # the small item: still running when measured
        outbox = Outbox()
        stream = server.stub.RerankStream(outbox.items(), timeout=60)
        outbox.put(item("x"))
        wait_until(lambda: upstream.in_flight == 1, what="the small item at the upstream")
        small_bytes = admission.bytes_in_flight
        outbox.put(item("x", documents=["a large document " * 2_000] * 20))
        duplicate = next(stream)
        after_duplicate = wait_until(lambda: admission.bytes_in_flight == small_bytes)
        stream.cancel()
        outbox.put(None)
        drained = wait_until(lambda: admission.bytes_in_flight == 0 and admission.open == 0)

    assert small_bytes > 0
    assert duplicate.id == "x"
    assert [v.field for v in duplicate.error.field_violations] == ["id"]
    assert after_duplicate  # the small item's own bytes, still held
    assert drained


def test_a_stream_idle_past_the_timeout_ends_with_stream_idle(serve: ServerFactory) -> None:
    with serve(stream_idle_timeout=0.5) as server:
        started = time.monotonic()
        [stream] = _open_silent_streams(server, 1)
        error = expect_error(lambda: list(stream))
        waited = time.monotonic() - started

    assert code_of(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream-idle-timeout" in (error.details() or "")
    assert 0.4 < waited < 5


def test_a_stream_whose_item_runs_longer_than_the_idle_timeout_is_not_idle(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(delay=1.2))
    with serve(stream_idle_timeout=0.5) as server:
        answers = list(server.stub.RerankStream(iter([item("slow")]), timeout=10))

    assert [answer.id for answer in answers] == ["slow"]
    assert answers[0].WhichOneof("result") == "response"


def test_answers_never_sent_are_logged_and_metered_as_cancelled_not_answered(
    serve: ServerFactory,
    logs: LogCapture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that reads one answer, then cancels: each item whose answer was ready but
    never sent was logged and metered OK, as answered (the client resends it, and was
    billed twice). Now it is CANCELLED, 0 documents, its tokens kept as spent."""
    usage = tmp_path / "usage.jsonl"
    built: list[str] = []
    to_proto = servicer.to_proto

    def counted(*args: Any) -> rerank_pb2.RerankResponse:
        built.append("answer")
        return to_proto(*args)

    # The answers are ready when they are built: nothing awaits between that and the queue.
    monkeypatch.setattr(servicer, "to_proto", counted)
    document = "apple " * 200_000  # 1.2 MB, each answer carrying it: few fit grpc's windows
    count = 8
    with serve(usage_log=str(usage), api_keys=(Secret(CALLER_KEY),), stream_concurrency=count) as server:
        outbox = Outbox()
        for index in range(count):
            outbox.put(item(f"i{index}", documents=[document], return_documents=True))
        # Without BDP probing the client's window stays small while it reads nothing.
        with grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            stream = rerank_pb2_grpc.RerankServiceStub(channel).RerankStream(
                outbox.items(), timeout=60, metadata=(("authorization", f"Bearer {CALLER_KEY}"),)
            )
            wait_until(lambda: len(built) == count, timeout=30, what="every item's answer built")
            received = next(stream).id  # one read, the others not
            stream.cancel()
            outbox.put(None)
            wait_until(
                lambda: any(e["event"] == "stream" for e in logs.events()), what="the stream's log line"
            )
        wait_until(lambda: len(usage.read_text().splitlines()) == count, what="an item's usage line each")

    [stream_line] = [e for e in logs.events() if e["event"] == "stream"]
    sent = stream_line["items"]
    assert sent < count  # some answers were never sent: what this test is about
    calls = logs.calls()
    assert sorted(e["code"] for e in calls) == ["CANCELLED"] * (count - sent) + ["OK"] * sent
    assert {e["item_id"]: e["code"] for e in calls}[received] == "OK"
    tokens = calls[0]["total_tokens"]  # what the upstream counted (each item the same)
    assert tokens > 0
    metered = sorted(
        (line["code"], line["documents"], line["tokens"])
        for line in map(json.loads, usage.read_text().splitlines())
    )
    assert metered == [("CANCELLED", 0, tokens)] * (count - sent) + [("OK", 1, tokens)] * sent


def _refuses_new_calls(target: str) -> bool:
    """Whether the server at `target` refuses a new call (its gRPC server is stopping)."""
    with grpc.insecure_channel(target) as channel:
        try:
            rerank_pb2_grpc.RerankServiceStub(channel).ListModels(rerank_pb2.ListModelsRequest(), timeout=5)
        except grpc.RpcError as error:
            return code_of(error) == Code.UNAVAILABLE
    return False


def test_a_draining_server_ends_an_idle_stream_at_once_unavailable(
    serve: ServerFactory, logs: LogCapture
) -> None:
    """An open stream with nothing in flight held the drain for the whole grace, then was
    cut ("Cancelling all calls") and logged CANCELLED."""
    grace = 120.0  # a drain that waited for the stream would take all of it
    with serve(shutdown_grace=grace) as server:
        assert server.server is not None
        outbox = Outbox()
        stream = server.stub.RerankStream(outbox.items(), timeout=300)
        outbox.put(item("first"))
        first = next(stream)
        stopping = server.begin(server.server.stop())
        stopping.result(timeout=grace / 4)  # not held by the stream
        server.server.port = None  # stopped: the fixture need not stop it again
        error = expect_error(lambda: next(stream))
        outbox.put(None)

    assert first.WhichOneof("result") == "response"
    assert code_of(error) == Code.UNAVAILABLE
    assert "shutting down" in (error.details() or "")
    [logged] = [e for e in logs.events() if e["event"] == "stream"]
    assert (logged["code"], logged["items"]) == ("UNAVAILABLE", 1)


class HeldBackend(GatedBackend):
    """An upstream backend that holds every rerank until the test releases them."""

    def __init__(self, inner: UpstreamBackend) -> None:
        super().__init__(inner)
        self.gate.set()  # it starts at once
        self.release = threading.Event()
        self.arrived = 0

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        self.arrived += 1
        await asyncio.to_thread(self.release.wait, 60)
        return await self.inner.rerank(request, context)


@pytest.fixture(params=[32], ids=["window-32"])
def held(
    request: pytest.FixtureRequest, upstream: FakeUpstream, logs: LogCapture
) -> Iterator[tuple[ServerThread, HeldBackend]]:
    """A server whose backend holds every call, with a stream window of `request.param`."""
    settings = upstream_settings(upstream, shutdown_grace=120.0, stream_concurrency=request.param)
    backend = HeldBackend(UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings)))
    with ServerThread(settings, backend=backend) as running:
        yield running, backend
        backend.release.set()


def test_a_draining_server_answers_the_items_in_flight_refuses_new_ones_then_ends_the_stream(
    held: tuple[ServerThread, HeldBackend], logs: LogCapture
) -> None:
    """A busy stream went on taking items during the drain, starting work the grace then
    cut; now an item read once the drain began is answered UNAVAILABLE without running,
    the one in flight is finished and sent, and the stream then ends UNAVAILABLE."""
    server, backend = held
    assert server.server is not None
    outbox = Outbox()
    stream = server.stub.RerankStream(outbox.items(), timeout=30)  # a broken drain fails at it
    outbox.put(item("in-flight"))
    wait_until(lambda: backend.arrived == 1, what="the first item at the backend")
    stopping = server.begin(server.server.stop())
    wait_until(lambda: _refuses_new_calls(server.target), what="the server refusing new calls")
    outbox.put(item("late"))
    late = next(stream)  # answered while the item in flight is still held
    backend.release.set()
    answered = next(stream)
    error = expect_error(lambda: next(stream))
    outbox.put(None)
    stopping.result(timeout=30)
    server.server.port = None  # stopped: the fixture need not stop it again

    assert (late.id, late.WhichOneof("result")) == ("late", "error")
    assert late.error.code == Code.UNAVAILABLE.value[0]
    assert backend.arrived == 1  # the late item never ran
    assert (answered.id, answered.WhichOneof("result")) == ("in-flight", "response")
    assert code_of(error) == Code.UNAVAILABLE
    items = {e["item_id"]: e["code"] for e in logs.calls() if "item_id" in e}  # not the probes
    assert items == {"in-flight": "OK", "late": "UNAVAILABLE"}
    [logged] = [e for e in logs.events() if e["event"] == "stream"]
    assert (logged["code"], logged["items"]) == ("UNAVAILABLE", 2)


@pytest.mark.parametrize("half_closed", ["before the drain", "during the drain"])
@pytest.mark.parametrize("held", [32, 1], ids=["window-32", "window-1"], indirect=True)
def test_a_stream_half_closed_while_the_server_drains_ends_ok_once_answered(
    held: tuple[ServerThread, HeldBackend], half_closed: str, logs: LogCapture
) -> None:
    """With its window full (`--stream-concurrency 1`, one item in flight) the stream did
    not read on at the drain, so it never saw the half-close and ended UNAVAILABLE."""
    server, backend = held
    assert server.server is not None
    outbox = Outbox()
    stream = server.stub.RerankStream(outbox.items(), timeout=300)
    outbox.put(item("in-flight"))
    wait_until(lambda: backend.arrived == 1, what="the item at the backend")
    if half_closed == "before the drain":
        outbox.put(None)
    stopping = server.begin(server.server.stop())
    wait_until(lambda: _refuses_new_calls(server.target), what="the server refusing new calls")
    if half_closed == "during the drain":
        outbox.put(None)  # nothing more to send
    backend.release.set()
    answers = list(stream)
    stopping.result(timeout=30)
    server.server.port = None  # stopped: the fixture need not stop it again

    assert [(a.id, a.WhichOneof("result")) for a in answers] == [("in-flight", "response")]
    assert stream.code() == Code.OK


def test_an_item_id_over_the_bound_is_refused_alone_with_its_id_cut(
    serve: ServerFactory, logs: LogCapture
) -> None:
    """An item's error answer echoed its id whole: an id near --max-message-bytes made an
    answer grpc refused to send, and the whole stream ended RESOURCE_EXHAUSTED."""
    limit = 65536
    long_id = "k" * (limit - 100)
    bad = rerank_pb2.RerankStreamRequest(id=long_id, request=request(model="no-such-model"))
    at_bound = "b" * servicer.MAX_ITEM_ID_CHARS
    with serve(max_message_bytes=limit) as server:
        stream = server.stub.RerankStream(iter([item("good"), bad, item(at_bound)]), timeout=30)
        answers = list(stream)

    assert stream.code() == Code.OK
    assert len(answers) == 3
    answered = by_id(answers)
    assert answered["good"].WhichOneof("result") == "response"
    assert answered[at_bound].WhichOneof("result") == "response"
    [refused] = [a for a in answers if a.id not in ("good", at_bound)]
    assert long_id.startswith(refused.id.rstrip("…"))
    assert len(refused.id) < 100
    assert refused.error.code == Code.INVALID_ARGUMENT.value[0]
    assert [v.field for v in refused.error.field_violations] == ["id"]
    assert str(servicer.MAX_ITEM_ID_CHARS) in refused.error.field_violations[0].description
    assert len([e for e in logs.calls() if e["code"] == "INVALID_ARGUMENT"]) == 1


def test_an_item_id_over_the_bound_is_metered_as_any_item_whose_request_was_read(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """It had no usage line and no rerank_caller_calls_total (refused before its model and
    documents were known), while a duplicate id, refused the same way, had both."""
    usage_log = tmp_path / "usage.jsonl"
    long_id = "k" * (servicer.MAX_ITEM_ID_CHARS + 1)
    with serve(usage_log=str(usage_log)) as server:
        answers = list(server.stub.RerankStream(iter([item("good"), item(long_id)]), timeout=30))
        wait_until(lambda: len(usage_log.read_text().splitlines()) == 2, what="an item's usage line each")

    lines = sorted(
        (line["code"], line["model"]) for line in map(json.loads, usage_log.read_text().splitlines())
    )
    assert len(answers) == 2
    assert lines == [("INVALID_ARGUMENT", "qwen3-rerank"), ("OK", "qwen3-rerank")]


def test_a_window_as_large_as_the_callers_share_runs_its_items_in_turn_without_refusals(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """The item after a full window was read, and counted against its caller's fair share,
    before a window slot was free: with a window as large as the share, it was refused
    CALLER_LIMITED (fair_share) while another caller called, the window alone never
    running past the share."""
    other_key = "caller-key-other-0123"
    with serve(
        stream_concurrency=2, max_concurrent_requests=4, caller_max_share=0.5,
        api_keys=(Secret(CALLER_KEY), Secret(other_key)),
    ) as server:  # fmt: skip
        upstream.inject(Fault(delay=NEVER))  # the other caller's call, holding its slot
        other = server.stub.Rerank.future(
            request(), timeout=30, metadata=(("authorization", f"Bearer {other_key}"),)
        )
        wait_until(lambda: upstream.in_flight == 1, what="the other caller's call at the upstream")
        upstream.always(Fault(delay=0.3))  # the stream's items: work that takes a while
        try:
            answers = list(
                server.stub.RerankStream(
                    iter([item(f"i{number}") for number in range(3)]),
                    timeout=30,
                    metadata=(("authorization", f"Bearer {CALLER_KEY}"),),
                )
            )
        finally:
            other.cancel()

    assert sorted((a.id, a.WhichOneof("result"), a.error.reason) for a in answers) == [
        (f"i{number}", "response", "") for number in range(3)
    ]
    assert upstream.max_in_flight <= 3  # the other caller's call, and at most the window's 2
