"""What bounds the server's memory: bytes of work in flight, open calls, connections."""

from __future__ import annotations

import concurrent.futures
import gc
import queue
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.config.sources import load_settings
from rerank_service.core.domain import RankedDocument
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, ServerFactory, upstream_settings
from tests.support.fault_scenarios import memory_bytes, rss_bytes
from tests.support.process import ServiceProcess
from tests.support.rpc import code_of, details_of, expect_error, request
from tests.support.server import ServerThread
from tests.support.tenants import KEYS, SEARCH_KEY, bearer, caller, write_config
from tests.support.waiting import wait_until

Code = grpc.StatusCode
BIG_DOCUMENT = "apple " * 40_000  # 240 kB
BUDGET = 600_000  # room for two such calls, not three
MIB = 1024 * 1024


def big_request() -> rerank_pb2.RerankRequest:
    return request(documents=[BIG_DOCUMENT])


def outcome(call: Any) -> str:
    try:
        call.result()
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    return "OK"


def test_unary_calls_past_the_byte_budget_are_refused_and_the_next_one_is_served(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=2.0))  # the first two still hold their bytes when the others arrive
    with serve(max_inflight_bytes=BUDGET) as server:
        calls = [server.stub.Rerank.future(big_request(), timeout=10) for _ in range(4)]
        outcomes = [outcome(call) for call in calls]
        upstream.always(None)
        after = server.stub.Rerank(big_request(), timeout=10)

    assert outcomes.count("OK") == 2
    refused = [text for text in outcomes if text != "OK"]
    assert len(refused) == 2
    assert all(text.startswith("RESOURCE_EXHAUSTED") and "--max-inflight-bytes" in text for text in refused)
    assert len(after.output.results) == 1
    assert upstream.max_in_flight == 2


def test_a_stream_past_the_byte_budget_waits_for_room_and_every_item_is_answered(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=0.2))
    items = [rerank_pb2.RerankStreamRequest(id=f"i{i}", request=big_request()) for i in range(8)]
    with serve(max_inflight_bytes=BUDGET, stream_concurrency=32) as server:
        answers = list(server.stub.RerankStream(iter(items), timeout=30))

    assert sorted(answer.id for answer in answers) == sorted(item.id for item in items)
    assert all(answer.WhichOneof("result") == "response" for answer in answers)
    # The window would let 8 run at once; the budget lets two.
    assert upstream.max_in_flight == 2


def open_silent_streams(server: ServerThread, count: int) -> list[Any]:
    """`count` RerankStreams that are opened and then send nothing (until cancelled)."""
    silence: queue.Queue[rerank_pb2.RerankStreamRequest] = queue.Queue()

    def never() -> Iterator[rerank_pb2.RerankStreamRequest]:
        yield silence.get()  # blocks: the stream stays open without an item

    return [server.stub.RerankStream(never(), timeout=30) for _ in range(count)]


def health(channel: grpc.Channel) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as error:
        return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_calls_past_max_open_calls_are_refused_while_health_checks_still_answer(
    serve: ServerFactory,
) -> None:
    with serve(max_open_calls=4, max_concurrent_requests=2) as server:
        assert server.channel is not None
        assert server.server is not None
        admission = server.server.admission
        silent = open_silent_streams(server, 4)
        try:
            wait_until(lambda: admission.open == 4, what="4 silent streams open on the server")
            refused = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
            health_while_full = health(server.channel)
        finally:
            for call in silent:
                call.cancel()
        wait_until(lambda: admission.open == 0, what="the cancellations reaching the server")
        health_after = health(server.channel)
        answer = server.stub.Rerank(request(), timeout=5)

    assert code_of(refused) == Code.RESOURCE_EXHAUSTED
    assert "--max-open-calls" in details_of(refused)
    # Health checks have a bound of their own (--max-health-checks): probes still answer.
    assert health_while_full == "SERVING"
    assert health_after == "SERVING"
    assert len(answer.output.results) == len(request().documents)


def server_ends_open(target: str) -> int:
    """Connections to `target` whose server end is open (established, or closed by the client
    only), from the kernel's TCP tables: grpc closes its end once it has seen the client's."""
    port = int(target.rpartition(":")[2])
    still_open = {"01", "08"}  # ESTABLISHED, CLOSE_WAIT
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():  # no IPv6
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] in still_open:
                count += 1
    return count


def test_connections_past_max_connections_are_closed(serve: ServerFactory) -> None:
    def call_on_a_new_connection(target: str) -> tuple[grpc.Channel, str]:
        # A channel of its own (no subchannel sharing): one more TCP connection.
        channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=3)
        except grpc.RpcError as error:
            return channel, str(error.code().name)
        return channel, "OK"

    with serve(max_connections=2) as server, concurrent.futures.ThreadPoolExecutor(1) as pool:
        first, first_code = call_on_a_new_connection(server.target)
        second, second_code = call_on_a_new_connection(server.target)
        third, third_code = pool.submit(call_on_a_new_connection, server.target).result()
        third.close()
        first.close()
        wait_until(
            lambda: server_ends_open(server.target) == 1, what="the server closing its end of the first"
        )
        fourth, fourth_code = call_on_a_new_connection(server.target)
        second.close()
        fourth.close()

    assert (first_code, second_code) == ("OK", "OK")
    assert third_code == "UNAVAILABLE"
    assert fourth_code == "OK"


def test_refused_large_calls_give_their_memory_back_at_once() -> None:
    """A refused call's request is freed when it is answered, not when the cycle collector
    (tuned by `serve` to run rarely) gets to it: big calls refused over and over must not
    pile up in the server's memory."""
    document = "x" * 10_000
    big = request(query="HOSTILE query", documents=[document] * 400)  # 4 MB
    flags = ["--max-inflight-bytes", str(8 * MIB), "--max-message-bytes", str(8 * MIB)]
    with FakeUpstream(api_key=UPSTREAM_KEY, record=False) as upstream:
        upstream.poison("HOSTILE", Fault(delay=1.0))  # admitted calls hold their bytes a second
        args = ["--backend", "upstream", "--upstream-url", upstream.url, *flags]
        with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
            assert service.process is not None
            before = rss_bytes(service.process.pid)
            codes: Counter[str] = Counter()
            stop = time.monotonic() + 3

            def caller() -> None:
                options = [("grpc.max_send_message_length", 16 * MIB), ("grpc.use_local_subchannel_pool", 1)]
                with grpc.insecure_channel(service.target, options=options) as channel:
                    stub = rerank_pb2_grpc.RerankServiceStub(channel)
                    while time.monotonic() < stop:
                        try:
                            stub.Rerank(big, timeout=10)
                            codes["OK"] += 1
                        except grpc.RpcError as error:
                            codes[error.code().name] += 1

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                for running in [pool.submit(caller) for _ in range(6)]:
                    running.result()
            peak = memory_bytes(service.process.pid, "VmHWM")

    assert codes["RESOURCE_EXHAUSTED"] >= 50  # the refusals really happened, again and again
    assert codes["OK"] >= 2
    # Two admitted calls hold 8 MB (about 40 MiB with what the work makes of them);
    # refused ones kept alive would add 4 MB each, hundreds of MiB over 3 s.
    assert peak - before < 160 * MIB, f"grew by {(peak - before) / MIB:.0f} MiB"


# The documents of the refused calls below, each made out by the text it starts with.
MARKED = "held by a refused call %d"
LIMITED_KEY = bearer(SEARCH_KEY)


def _alive_holding(first: str) -> int:
    """Lists alive that hold a request's documents: the documents themselves (the request as
    the engine reads it), or a ranking of them (the outcome of a call that ran)."""
    held = 0
    for found in gc.get_objects():
        if type(found) is list and found:
            head = found[0]
            text = head.text if type(head) is RankedDocument else head
            held += type(text) is str and text == first
    return held


def _refusing_server(
    refusal: str, upstream: FakeUpstream, tmp_path: Path, request_bytes: int
) -> ServerThread:
    if refusal == "caller-limit":  # one call a minute
        limited = caller("search", "SEARCH_KEY", limits={"requests_per_minute": 1})
        config = write_config(tmp_path / "rerank.yaml", upstream, [limited])
        return ServerThread(
            load_settings({"config": str(config)}, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, **KEYS})
        )
    if refusal == "invalid":  # more documents than a call may carry
        return ServerThread(upstream_settings(upstream, max_documents=100))
    # The answer (every document's text, and its score) larger than a message may be; the
    # request is not.
    return ServerThread(upstream_settings(upstream, max_message_bytes=request_bytes + 1000))


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        ("invalid", Code.INVALID_ARGUMENT),
        ("caller-limit", Code.RESOURCE_EXHAUSTED),
        ("answer-too-large", Code.RESOURCE_EXHAUSTED),
    ],
)
def test_a_refused_call_holds_nothing_of_its_request_once_answered(
    refusal: str, code: grpc.StatusCode, tmp_path: Path
) -> None:
    """grpc keeps the AbortError that answers a failed call in the call's state, a reference
    cycle that only a full collection frees (the server has them run rarely): raised while
    the error was handled, it held the error, whose traceback held the frames that refused
    the request, with its documents (30 refused 4 MB calls: 3 GiB). Collection is off here,
    as between two full collections: nothing of a refused request may be left."""
    first = MARKED % 0
    marked = request(documents=[MARKED % index for index in range(200)], return_documents=True)
    gc.collect()
    gc.disable()
    try:
        # An upstream that keeps no record of the requests it gets: only the server's would count.
        with (
            FakeUpstream(api_key=UPSTREAM_KEY, record=False) as upstream,
            _refusing_server(refusal, upstream, tmp_path, marked.ByteSize()) as server,
        ):
            server.stub.Rerank(request(), metadata=LIMITED_KEY, timeout=10)  # its one call a minute
            codes = [
                code_of(expect_error(lambda: server.stub.Rerank(marked, metadata=LIMITED_KEY, timeout=10)))
                for _ in range(10)
            ]
            # Each call's own `finally` frees it, as its answer is sent: by now or in a moment.
            freed = wait_until(lambda: _alive_holding(first) == 0, timeout=5, interval=0.1)
            left = _alive_holding(first)
    finally:
        gc.enable()

    assert codes == [code] * 10
    assert freed, f"{left} lists of refused requests' documents alive after 10 calls"
