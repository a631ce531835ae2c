"""Observability against a live server: the /metrics endpoint, per-call timing metadata,
W3C trace context passed upstream, and the call's request id on every log line."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.backends.local import LocalBackend, LocalModelSpec
from rerank_service.backends.local.batcher import BatchLimits
from rerank_service.backends.local.scorer import Scorer
from rerank_service.config import Settings
from rerank_service.config.secret import Secret
from rerank_service.observability.metrics import Metrics
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import CALLER_KEY, UPSTREAM_KEY, ServerFactory
from tests.integration.test_local_backend import WordScorer
from tests.support.logs import LogCapture
from tests.support.process import ServiceProcess
from tests.support.rpc import code_of, expect_error, request, trailing
from tests.support.scrape import Samples, scrape, value
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TIMING_KEYS = ("x-total-time", "x-queue-time", "x-upstream-time")


def metrics_port(server: ServerThread) -> int:
    assert server.server is not None
    assert server.server.metrics_port is not None
    return server.server.metrics_port


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Metrics of a call are recorded as its handler ends, which may be just after the
    client has its answer (an error's status goes out first)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def grew(port: int, before: Samples, expected: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> bool:
    now = scrape(port)
    return all(now.get(key, 0.0) - before.get(key, 0.0) == delta for key, delta in expected.items())


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def milliseconds(metadata: dict[str, str], name: str) -> float:
    text = metadata[name]
    assert text.count(".") == 1
    assert len(text.split(".")[1]) == 3  # milliseconds to the microsecond
    return float(text)


Metadata = tuple[tuple[str, str | bytes], ...]


def rerank_with_metadata(
    server: ServerThread, metadata: Metadata = (), **fields: object
) -> tuple[rerank_pb2.RerankResponse, dict[str, str]]:
    response, call = server.stub.Rerank.with_call(request(**fields), timeout=10, metadata=metadata)
    return response, as_text(call.trailing_metadata())


def as_text(metadata: Metadata | None) -> dict[str, str]:
    return {name: str(value) for name, value in metadata or ()}


@pytest.fixture
def metered(serve: ServerFactory) -> Iterator[ServerThread]:
    """A live server in front of the fake upstream, with /metrics on a free port."""
    with serve(metrics_port=0) as running:
        yield running


def busy_503() -> Fault:
    # No request_id in the body: the error's request id is then the service's own.
    return Fault(status=503, body={"code": "ServiceUnavailable", "message": "busy"})


# --- the /metrics endpoint ---


def test_metrics_count_calls_by_method_and_code(metered: ServerThread) -> None:
    port = metrics_port(metered)
    before = scrape(port)

    rerank_with_metadata(metered)
    expect_error(lambda: metered.stub.Rerank(request(query=" "), timeout=5))
    metered.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5)

    eventually(
        lambda: grew(
            port,
            before,
            {
                key("rerank_calls_total", method="Rerank", code="OK"): 1,
                key("rerank_calls_total", method="Rerank", code="INVALID_ARGUMENT"): 1,
                key("rerank_calls_total", method="ListModels", code="OK"): 1,
                key("rerank_call_latency_seconds_count", method="Rerank"): 2,
                key("rerank_documents_per_call_count"): 2,  # the invalid call had documents too
                key("rerank_tokens_per_call_count"): 1,  # only a successful call used tokens
            },
        )
    )
    assert value(scrape(port), "rerank_calls_in_flight", method="Rerank") == 0


def test_stream_items_are_counted_as_calls_of_their_own(metered: ServerThread) -> None:
    port = metrics_port(metered)
    before = scrape(port)
    items = [rerank_pb2.RerankStreamRequest(id=str(i), request=request()) for i in range(3)]
    bad = rerank_pb2.RerankStreamRequest(id="bad", request=request(documents=[]))

    responses = list(metered.stub.RerankStream(iter([*items, bad]), timeout=10))

    assert len(responses) == 4
    eventually(
        lambda: grew(
            port,
            before,
            {
                key("rerank_calls_total", method="RerankStream/item", code="OK"): 3,
                key("rerank_calls_total", method="RerankStream/item", code="INVALID_ARGUMENT"): 1,
                key("rerank_calls_total", method="RerankStream", code="OK"): 1,
                key("rerank_upstream_requests_total", status="200"): 3,
            },
        )
    )


def test_upstream_requests_are_counted_by_status_and_timed(
    metered: ServerThread, upstream: FakeUpstream
) -> None:
    port = metrics_port(metered)
    upstream.inject(busy_503())  # the first attempt fails and is retried
    before = scrape(port)

    rerank_with_metadata(metered)

    eventually(
        lambda: grew(
            port,
            before,
            {
                key("rerank_upstream_requests_total", status="503"): 1,
                key("rerank_upstream_requests_total", status="200"): 1,
                key("rerank_upstream_latency_seconds_count"): 2,
                key("rerank_upstream_retries_total", reason="503"): 1,
                key("rerank_calls_total", method="Rerank", code="OK"): 1,
            },
        )
    )


def test_an_unreachable_upstream_is_counted_by_the_transport_failure(serve: ServerFactory) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]
    with serve(metrics_port=0, upstream_url=f"http://127.0.0.1:{nobody}", upstream_max_attempts=1) as server:
        port = metrics_port(server)
        before = scrape(port)

        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

        assert code_of(error) == grpc.StatusCode.UNAVAILABLE
        eventually(
            lambda: grew(
                port,
                before,
                {
                    key("rerank_upstream_requests_total", status="connect_error"): 1,
                    key("rerank_calls_total", method="Rerank", code="UNAVAILABLE"): 1,
                },
            )
        )


def test_metrics_are_off_by_default(server: ServerThread, logs: LogCapture) -> None:
    assert server.server is not None
    assert server.server.metrics_port is None
    [serving] = [event for event in logs.events() if event["event"] == "serving"]
    assert serving["metrics_port"] is None
    # No endpoint thread (one stopped by an earlier test may take a moment to end).
    eventually(lambda: not [thread for thread in threading.enumerate() if "serve_forever" in thread.name])


def test_the_metrics_thread_is_what_off_by_default_looks_for(metered: ServerThread) -> None:
    # The counterpart of the test above: with a port, exactly that thread exists.
    assert [thread for thread in threading.enumerate() if "serve_forever" in thread.name]


def test_the_command_line_flag_serves_metrics(upstream: FakeUpstream) -> None:
    with ServiceProcess(
        ["--backend", "upstream", "--upstream-url", upstream.url, "--metrics-port", "0"],
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY},
    ) as service:
        [serving] = [event for event in service.events() if event["event"] == "serving"]
        samples = scrape(int(serving["metrics_port"]))
        service.terminate()

    assert samples[key("rerank_deployment_state", deployment=upstream.url.split("://")[1])] == 0  # healthy
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)


# --- timing metadata ---


def test_a_unary_answer_carries_its_timing_in_milliseconds(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(delay=0.05))

    _, metadata = rerank_with_metadata(server)

    total, queued, upstream_ms = (milliseconds(metadata, name) for name in TIMING_KEYS)
    assert total >= upstream_ms >= 50
    assert queued == 0  # one upstream call: no chunk waited for a slot
    assert "x-inference-time" not in metadata


def test_an_error_answer_carries_its_timing_too(server: ServerThread) -> None:
    error = expect_error(lambda: server.stub.Rerank(request(documents=[]), timeout=5))

    metadata = trailing(error)
    assert milliseconds(metadata, "x-total-time") > 0
    assert milliseconds(metadata, "x-upstream-time") == 0  # refused before any upstream call
    assert metadata["x-request-id"]


def test_a_call_refused_for_its_key_names_its_request_id_but_carries_no_timing(
    serve: ServerFactory, logs: LogCapture
) -> None:
    with serve(api_keys=(Secret(CALLER_KEY),)) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    metadata = trailing(error)
    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert metadata["x-request-id"]
    assert not set(TIMING_KEYS) & set(metadata)
    [line] = [event for event in logs.events() if event.get("event") == "call"]
    assert line["request_id"] == metadata["x-request-id"]
    assert line["documents"] is None  # what was never served is not counted


def test_a_call_that_failed_after_retries_reports_the_time_its_attempts_took(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(status=503, delay=0.05))
    with serve(upstream_max_attempts=3, upstream_retry_backoff=0.01) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    metadata = trailing(error)
    assert code_of(error) == grpc.StatusCode.UNAVAILABLE
    assert len(upstream.requests) == 3
    assert milliseconds(metadata, "x-upstream-time") >= 150  # three 50 ms attempts


def test_list_models_carries_timing_and_its_request_id(server: ServerThread, logs: LogCapture) -> None:
    _, call = server.stub.ListModels.with_call(rerank_pb2.ListModelsRequest(), timeout=5)

    trailers = as_text(call.trailing_metadata())
    assert set(TIMING_KEYS) <= set(trailers)
    wait_until(lambda: any(e.get("event") == "call" for e in logs.events()), what="the call's log line")
    [line] = [e for e in logs.events() if e.get("event") == "call"]
    assert trailers["x-request-id"] == line["request_id"]


def test_parallel_chunks_count_once_in_the_upstream_time(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(delay=1.0), times=4)
    with serve(upstream_documents_per_call=2) as server:
        _, metadata = rerank_with_metadata(server, documents=[f"doc {i}" for i in range(8)])

    total, queued, upstream_ms = (milliseconds(metadata, name) for name in TIMING_KEYS)
    assert len(metadata["x-upstream-request-ids"].split(",")) == 4
    assert upstream.max_in_flight == 4  # the four chunks were at the upstream at once
    # Side by side, the four 1 s chunks took about 1 s of the call: counted once each, they
    # would add up to 4 s or more. (Bounds a loaded machine cannot cross either way.)
    assert 1000 <= upstream_ms < 2500
    assert total >= upstream_ms
    assert queued < 500  # eight slots, four chunks: none waited (a wait would be a whole chunk)


def test_chunks_waiting_for_a_slot_show_as_queue_time(serve: ServerFactory, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(delay=0.1), times=3)
    with serve(upstream_documents_per_call=2, chunk_concurrency=1) as server:
        _, metadata = rerank_with_metadata(server, documents=[f"doc {i}" for i in range(6)])

    total, queued, upstream_ms = (milliseconds(metadata, name) for name in TIMING_KEYS)
    assert queued >= 180  # the last chunk waited for the two before it
    assert upstream_ms >= 300
    assert total >= upstream_ms


# --- trace context ---


def test_a_valid_traceparent_reaches_the_upstream(server: ServerThread, upstream: FakeUpstream) -> None:
    rerank_with_metadata(
        server, metadata=(("traceparent", TRACEPARENT), ("tracestate", "rojo=00f067aa0ba902b7"))
    )

    [sent] = upstream.requests
    assert sent.headers["traceparent"] == TRACEPARENT
    assert sent.headers["tracestate"] == "rojo=00f067aa0ba902b7"


@pytest.mark.parametrize("parser", ["c", "python"])
def test_an_http_callers_trace_context_reaches_the_upstream_whatever_its_headers_case(
    upstream: FakeUpstream, parser: str
) -> None:
    """Go's net/http writes `Traceparent`; HTTP header names are case-insensitive. aiohttp's
    C parser gives that name in lower case, its Python one (no C extensions: PyPy, or
    AIOHTTP_NO_EXTENSIONS) as it came."""
    env = {
        "RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY,
        **({"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else {}),
    }
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    body = json.dumps({"model": "qwen3-rerank", "query": "q", "documents": ["a", "b"]})
    headers = {"Content-Type": "application/json", "Traceparent": TRACEPARENT, "TraceState": "rojo=1"}
    with ServiceProcess(args, env=env) as service:
        serving = next(event for event in service.events() if event.get("event") == "serving")
        connection = http.client.HTTPConnection("127.0.0.1", serving["http_port"], timeout=10)
        try:
            connection.request("POST", "/v1/rerank", body=body, headers=headers)
            status = connection.getresponse().status
        finally:
            connection.close()

    assert status == 200
    [sent] = upstream.requests
    assert sent.headers["traceparent"] == TRACEPARENT
    assert sent.headers["tracestate"] == "rojo=1"


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
        "not a trace",
    ],
)
def test_a_malformed_traceparent_is_not_passed_on(
    server: ServerThread, upstream: FakeUpstream, traceparent: str
) -> None:
    rerank_with_metadata(server, metadata=(("traceparent", traceparent), ("tracestate", "rojo=1")))

    [sent] = upstream.requests
    assert "traceparent" not in sent.headers
    assert "tracestate" not in sent.headers


def test_stream_items_pass_the_stream_s_traceparent_on(server: ServerThread, upstream: FakeUpstream) -> None:
    items = [rerank_pb2.RerankStreamRequest(id=str(i), request=request()) for i in range(2)]

    list(server.stub.RerankStream(iter(items), timeout=10, metadata=(("traceparent", TRACEPARENT),)))

    assert [sent.headers.get("traceparent") for sent in upstream.requests] == [TRACEPARENT, TRACEPARENT]


# --- the request id on every log line of a call ---


def test_lines_logged_inside_a_call_carry_the_request_id_the_caller_got(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    upstream.always(busy_503())
    with serve(upstream_max_attempts=3) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))
        [call] = logs.wait_for_calls(1)

    request_id = trailing(error)["x-request-id"]
    retries = [event for event in logs.events() if event["event"] == "upstream retry"]
    assert len(retries) == 2
    assert {event["request_id"] for event in retries} == {request_id}
    assert call["request_id"] == request_id


def test_an_upstream_named_call_logs_the_service_id_and_the_upstream_id(
    server: ServerThread, upstream: FakeUpstream, logs: LogCapture
) -> None:
    # An unsplit upstream call answers with the upstream's request id (the contract); the
    # lines logged before that id existed carry the service's, and the access line ties them.
    upstream.inject(busy_503())
    response, metadata = rerank_with_metadata(server)
    [call] = logs.wait_for_calls(1)

    [retry] = [event for event in logs.events() if event["event"] == "upstream retry"]
    assert metadata["x-request-id"] == response.request_id
    assert retry["request_id"] == call["request_id"]
    assert call["upstream_request_ids"] == [response.request_id]
    assert call["upstream_ms"] > 0


def test_each_stream_item_logs_under_its_own_request_id(server: ServerThread, logs: LogCapture) -> None:
    items = [rerank_pb2.RerankStreamRequest(id=str(i), request=request(documents=[])) for i in range(2)]

    responses = list(server.stub.RerankStream(iter(items), timeout=10))

    answered = {response.id: response.error.request_id for response in responses}
    eventually(lambda: any(event["event"] == "stream" for event in logs.events()))
    logged = {event["item_id"]: event["request_id"] for event in logs.calls()}
    assert logged == answered
    assert len(set(answered.values())) == 2


# --- the local backend ---


@pytest.fixture
def local(logs: LogCapture) -> Iterator[ServerThread]:
    scorer = WordScorer(delay=0.05)

    def loader(source: str, device: str, dtype: str) -> Scorer:
        return scorer

    metrics = Metrics()  # the server's, which its backend records into too
    backend = LocalBackend(
        [LocalModelSpec("word-model", "fake")],
        device="cpu",
        dtype="auto",
        limits=BatchLimits(max_batch_size=4),
        max_documents=100,
        max_query_tokens=20,
        loader=loader,
        metrics=metrics,
    )
    with ServerThread(Settings(backend="local", metrics_port=0), backend=backend, metrics=metrics) as running:
        yield running


def test_the_local_backend_reports_inference_and_queue_time(local: ServerThread, logs: LogCapture) -> None:
    port = metrics_port(local)
    before = scrape(port)

    response, metadata = rerank_with_metadata(local, model="word-model", documents=["a"] * 6)

    total = milliseconds(metadata, "x-total-time")
    queued = milliseconds(metadata, "x-queue-time")
    inference = milliseconds(metadata, "x-inference-time")
    assert "x-upstream-time" not in metadata
    assert inference >= 100  # two batches of at most four pairs, 50 ms each
    assert total >= queued + inference
    assert metadata["x-request-id"] == response.request_id
    [call] = logs.wait_for_calls(1)
    assert call["request_id"] == response.request_id
    assert call["inference_ms"] >= 100
    eventually(
        lambda: grew(
            port,
            before,
            {
                key("rerank_local_batch_size_count"): 2,
                key("rerank_local_batch_size_sum"): 6,
                key("rerank_local_queue_seconds_count"): 1,
                key("rerank_local_inference_seconds_count"): 2,
                key("rerank_calls_total", method="Rerank", code="OK"): 1,
            },
        )
    )


def test_caller_controlled_strings_are_cut_in_the_access_log(server: ServerThread, logs: LogCapture) -> None:
    huge = "m" * 1_000_000
    expect_error(lambda: server.stub.Rerank(request(model=huge), timeout=10))
    item = rerank_pb2.RerankStreamRequest(id="i" * 1_000_000, request=request())
    list(server.stub.RerankStream(iter([item]), timeout=10))

    lines = [event for event in logs.events() if event.get("event") == "call"]
    assert len(lines) == 2
    assert all(len(str(line)) < 2_000 for line in lines)
    assert lines[0]["model"].startswith("mmmm")
    assert len(lines[0]["model"]) <= 64
    assert len(lines[1]["item_id"]) <= 64
