"""Every upstream failure reaches the caller as the right gRPC status, with the upstream's words."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from rerank_service.config.secret import Secret
from rerank_service.config.sources import load_settings
from rerank_service.core.domain import DeploymentState
from rerank_service.routing import Router
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, details_of, error_info, expect_error, request, retry_delay, trailing
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

Code = grpc.StatusCode
# Where the routes' deployments of a config file take their key from.
KEY_ENV = "UPSTREAM_ERRORS_TEST_KEY"


def upstream_error(code: str, message: str = "something went wrong") -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": "req-upstream-42"}


@pytest.mark.parametrize(
    ("status", "expected", "reason"),
    [
        (400, Code.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
        (413, Code.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
        (422, Code.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
        (498, Code.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),  # Cohere: a deny-listed token
        (401, Code.INTERNAL, "UPSTREAM_AUTH_FAILED"),
        (403, Code.INTERNAL, "UPSTREAM_AUTH_FAILED"),
        (404, Code.NOT_FOUND, "UPSTREAM_NOT_FOUND"),
        (429, Code.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
        (424, Code.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),  # TEI: inference failed
        (500, Code.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        (502, Code.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        (503, Code.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        (504, Code.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    ],
)
def test_upstream_http_status_maps_to_grpc_code_with_upstream_details(
    server: ServerThread, upstream: FakeUpstream, status: int, expected: grpc.StatusCode, reason: str
) -> None:
    upstream.always(Fault(status=status, body=upstream_error("SomeUpstreamCode", "the upstream says no")))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == expected
    # 429 and 502/503/504 are retried (3 attempts by default); the rest fail at once.
    assert len(upstream.requests) == (3 if status in (429, 502, 503, 504) else 1)
    assert "SomeUpstreamCode" in details_of(error)
    assert "the upstream says no" in details_of(error)
    assert "req-upstream-42" in details_of(error)
    info = error_info(error)
    assert info is not None
    assert info.reason == reason
    assert info.metadata["upstream_status"] == str(status)
    assert info.metadata["upstream_request_id"] == "req-upstream-42"
    assert trailing(error)["x-request-id"] == "req-upstream-42"


@pytest.mark.parametrize("pass_through", [False, True])
@pytest.mark.parametrize(
    ("status", "state"), [(424, DeploymentState.EJECTED), (498, DeploymentState.HEALTHY)]
)
def test_a_failed_inference_counts_against_the_deployment_and_a_deny_listed_token_does_not(
    serve: ServerFactory, upstream: FakeUpstream, status: int, state: DeploymentState, pass_through: bool
) -> None:
    """TEI's 424 is the upstream failing (whoever's token); Cohere's 498 is the caller's content."""
    upstream.always(Fault(status=status, body=upstream_error("SomeUpstreamCode")))
    settings: dict[str, Any] = {"upstream_breaker_failures": 2, "upstream_breaker_cooldown": 30}
    if pass_through:
        settings["upstream_api_key"] = None  # the caller's own token goes upstream
    token = (("authorization", "Bearer caller-token"),) if pass_through else ()
    with serve(**settings) as server:
        assert server.server is not None
        router = server.server.backend
        assert isinstance(router, Router)
        health = router.deployments[0].health
        assert health is not None
        for _ in range(2):
            expect_error(lambda: server.stub.Rerank(request(), metadata=token, timeout=5))

        assert health.state is state
    assert len(upstream.requests) == 2  # neither is retried


@pytest.mark.parametrize("pass_through", [False, True])
def test_a_404_never_ejects_the_deployment_whoever_s_key_went_upstream(
    serve: ServerFactory, upstream: FakeUpstream, pass_through: bool
) -> None:
    """With the deployment's own key a 404 says the model or URL it was given is wrong (its
    route's calls fall over: tests/integration/test_routes.py), with the caller's token it
    may be that caller's account alone; either way it is about one model, and the deployment
    may serve others: it stays healthy."""
    upstream.always(Fault(status=404, body=upstream_error("ModelNotFound", "Model not exist")))
    settings: dict[str, Any] = {"upstream_breaker_failures": 2, "upstream_breaker_cooldown": 30}
    if pass_through:
        settings["upstream_api_key"] = None
    token = (("authorization", "Bearer caller-token"),) if pass_through else ()
    with serve(**settings) as server:
        assert server.server is not None
        router = server.server.backend
        assert isinstance(router, Router)
        health = router.deployments[0].health
        assert health is not None
        for _ in range(2):
            error = expect_error(lambda: server.stub.Rerank(request(), metadata=token, timeout=5))
            assert code_of(error) == Code.NOT_FOUND  # its only deployment: the upstream's answer
            assert "Model not exist" in details_of(error)

        assert health.state is DeploymentState.HEALTHY
    assert len(upstream.requests) == 2  # neither is retried


@pytest.mark.parametrize(("status", "falls_over"), [(424, True), (498, False)])
def test_a_failed_inference_falls_over_to_the_routes_next_deployment_and_a_deny_listed_token_does_not(
    tmp_path: Path, upstream: FakeUpstream, status: int, falls_over: bool
) -> None:
    with FakeUpstream(api_key=UPSTREAM_KEY) as fallback:
        deployments: list[dict[str, Any]] = [
            {"format": "dashscope", "url": url, "name": name, "model": "qwen3-rerank", "api_key_env": KEY_ENV}
            for name, url in (("first", upstream.url), ("fallback", fallback.url))
        ]
        deployments[0]["priority"], deployments[1]["priority"] = 0, 1  # the fallback only when it fails
        config = tmp_path / "routes.yaml"
        config.write_text(
            yaml.safe_dump({"models": [{"name": "qwen3-rerank", "deployments": deployments}]}),
            encoding="utf-8",
        )
        upstream.always(Fault(status=status, body=upstream_error("SomeUpstreamCode")))
        with ServerThread(load_settings({"config": str(config)}, env={KEY_ENV: UPSTREAM_KEY})) as server:
            if falls_over:
                assert len(server.stub.Rerank(request(), timeout=5).output.results) == 2
            else:
                error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
                assert code_of(error) == Code.INVALID_ARGUMENT

        assert len(upstream.requests) == 1
        assert len(fallback.requests) == (1 if falls_over else 0)


def test_rate_limit_carries_retry_info_from_retry_after(server: ServerThread, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(status=429, body=upstream_error("Throttling"), headers={"Retry-After": "7"}))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == Code.RESOURCE_EXHAUSTED
    assert retry_delay(error) == 7.0


@pytest.mark.parametrize(("status", "expected"), [(401, Code.UNAUTHENTICATED), (403, Code.PERMISSION_DENIED)])
def test_upstream_auth_failure_is_the_callers_in_pass_through_mode(
    serve: ServerFactory, upstream: FakeUpstream, status: int, expected: grpc.StatusCode
) -> None:
    upstream.inject(Fault(status=status, body=upstream_error("InvalidApiKey")))
    with serve(upstream_api_key=None) as server:
        error = expect_error(
            lambda: server.stub.Rerank(
                request(), metadata=(("authorization", "Bearer caller-token"),), timeout=5
            )
        )

    assert code_of(error) == expected


def test_upstream_rejecting_the_services_own_key_is_internal(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.api_key = "a-different-key"  # the real 401 path of the fake, not an injected one
    with serve() as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == Code.INTERNAL
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_AUTH_FAILED"
    assert "InvalidApiKey" in details_of(error)


def test_model_unknown_to_the_upstream_is_not_found(serve: ServerFactory, upstream: FakeUpstream) -> None:
    # The service is configured to serve a name the upstream does not know.
    with serve(upstream_models=("qwen3-rerank", "retired-model")) as server:
        error = expect_error(lambda: server.stub.Rerank(request(model="retired-model"), timeout=5))

    assert code_of(error) == Code.NOT_FOUND
    assert "ModelNotFound" in details_of(error)


def test_connection_reset_is_unavailable_after_retries(server: ServerThread, upstream: FakeUpstream) -> None:
    upstream.always(Fault(reset=True))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == Code.UNAVAILABLE
    assert len(upstream.requests) == 3


def test_nothing_listening_upstream_is_unavailable(serve: ServerFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with serve(upstream_url=f"http://127.0.0.1:{closed_port}") as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == Code.UNAVAILABLE
    assert "unreachable" in details_of(error)


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, b"<html>bad gateway page</html>", "text/html"),
        (200, b'{"output": {"results": [', "application/json"),
        (502, b"<html>502 Bad Gateway</html>", "text/html"),
    ],
    ids=["html-200", "truncated-json", "html-502"],
)
def test_a_body_that_is_not_json_is_unavailable(
    server: ServerThread, upstream: FakeUpstream, status: int, body: bytes, content_type: str
) -> None:
    upstream.always(Fault(status=status, body=body, content_type=content_type))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == Code.UNAVAILABLE
    # A gateway's 502 page is retried; a broken 200 body would only break again.
    assert len(upstream.requests) == (3 if status == 502 else 1)


def _set_first(field: str, value: Any) -> Any:
    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        body["output"]["results"][0][field] = value
        return body

    return mutate


def _drop(path: tuple[str, ...]) -> Any:
    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        target = body
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return body

    return mutate


def _truncate_results(body: dict[str, Any]) -> dict[str, Any]:
    body["output"]["results"] = body["output"]["results"][:1]
    return body


def _duplicate_index(body: dict[str, Any]) -> dict[str, Any]:
    body["output"]["results"][1]["index"] = body["output"]["results"][0]["index"]
    return body


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (_set_first("index", 2), "out of range"),
        (_set_first("index", -1), "out of range"),
        (_set_first("index", "0"), "not an integer"),
        (_set_first("relevance_score", 1.5), "outside [0, 1]"),
        (_set_first("relevance_score", -0.1), "outside [0, 1]"),
        (_set_first("relevance_score", None), "not a number"),
        (_duplicate_index, "appears twice"),
        (_truncate_results, "expected 2 results"),
        (_drop(("output",)), "'output'"),
        (_drop(("output", "results")), "'results'"),
        (_drop(("usage",)), "usage.total_tokens"),
    ],
    ids=[
        "index-too-big",
        "index-negative",
        "index-string",
        "score-above-1",
        "score-below-0",
        "score-missing",
        "duplicate-index",
        "missing-result",
        "no-output",
        "no-results",
        "no-usage",
    ],
)
def test_a_malformed_upstream_answer_is_internal_never_a_wrong_ranking(
    server: ServerThread, upstream: FakeUpstream, mutate: Any, words: str
) -> None:
    upstream.inject(Fault(mutate=mutate))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == Code.INTERNAL
    assert "malformed" in details_of(error)
    assert words in details_of(error)
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_BAD_RESPONSE"


def test_an_upstream_error_echoing_the_key_does_not_leak_it(
    server: ServerThread, upstream: FakeUpstream, logs: LogCapture
) -> None:
    upstream.inject(Fault(status=400, body=upstream_error("BadKey", f"key {UPSTREAM_KEY} is malformed")))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert code_of(error) == Code.INVALID_ARGUMENT
    assert UPSTREAM_KEY not in details_of(error)
    assert "is malformed" in details_of(error)
    assert UPSTREAM_KEY not in str(trailing(error))
    [call] = logs.wait_for_calls(1)
    assert call["code"] == "INVALID_ARGUMENT"
    assert "is malformed" in call["details"]
    assert UPSTREAM_KEY not in logs.text


def test_a_five_character_pass_through_token_echoed_in_an_error_reaches_neither_caller_nor_log(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    token = "pt-05"
    upstream.api_key = token
    upstream.inject(Fault(status=400, body=upstream_error("BadToken", f"token {token} is not allowed")))
    with serve(upstream_api_key=None) as server:  # no keys at all: callers' tokens go upstream
        error = expect_error(
            lambda: server.stub.Rerank(request(), metadata=(("authorization", f"Bearer {token}"),), timeout=5)
        )
        [call] = logs.wait_for_calls(1)

    assert code_of(error) == Code.INVALID_ARGUMENT
    assert "is not allowed" in details_of(error)
    assert token not in details_of(error) + str(trailing(error))
    assert "is not allowed" in call["details"]
    assert token not in logs.text


def test_a_six_character_upstream_key_reflected_by_the_upstream_never_reaches_the_caller(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    key = "k6-abc"
    upstream.api_key = key
    upstream.inject(Fault(status=503, body=upstream_error("Down", f"key {key} is overloaded")), times=3)
    with serve(upstream_api_key=Secret(key)) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        logs.wait_for_calls(1)

    assert code_of(error) == Code.UNAVAILABLE
    assert "is overloaded" in details_of(error)
    assert key not in details_of(error) + str(trailing(error))
    assert key not in logs.text


def test_a_long_upstream_message_is_truncated(server: ServerThread, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(status=400, body=upstream_error("TooLong", "x" * 5000)))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

    assert len(details_of(error)) <= 300


def test_failing_answers_never_refuse_the_next_good_call(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(status=503, body=upstream_error("Overloaded")))
    with serve(upstream_breaker_cooldown=30) as server:
        for _ in range(3):  # 9 failed attempts: an answering upstream is ejected, never refused
            expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        upstream.always(None)
        response = server.stub.Rerank(request(), timeout=5)

    assert [r.index for r in response.output.results] == [0, 1]
    assert len(upstream.requests) == 10


def test_an_unreachable_upstream_is_refused_at_once_then_probed_back(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    # A cool-down long enough that the refused call lands inside it on a loaded machine too.
    with serve(upstream_breaker_cooldown=1.0, upstream_retry_backoff=0.01) as server:
        upstream.go_down()
        for _ in range(2):  # the fifth refused connection makes it down
            expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        upstream.come_back()
        started = time.monotonic()
        refused = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        refused_in = time.monotonic() - started
        time.sleep(1.05)  # the cool-down (no event to wait for: it is a span of time)
        response = server.stub.Rerank(request(), timeout=5)

    assert error_info(refused) is not None
    assert error_info(refused).reason == "UPSTREAM_CIRCUIT_OPEN"  # type: ignore[union-attr]
    assert retry_delay(refused) is not None
    assert refused_in < 0.5  # at once, without reaching the upstream
    assert [r.index for r in response.output.results] == [0, 1]
    assert len(upstream.requests) == 1  # only the probe reached it


def test_a_probe_answered_with_a_body_it_cannot_use_ends_the_down_state(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(upstream_breaker_cooldown=1.0, upstream_retry_backoff=0.01) as server:
        assert server.server is not None
        router = server.server.backend
        assert isinstance(router, Router)
        health = router.deployments[0].health
        assert health is not None
        upstream.go_down()
        for _ in range(2):  # the fifth refused connection makes it down
            expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        assert health.state is DeploymentState.DOWN
        upstream.come_back()
        upstream.always(Fault(body=b"<html>maintenance</html>", content_type="text/html"))
        wait_until(lambda: health.probe_due, what="the cool-down's end")

        probed = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

        # An answer, however unusable, proves the deployment reachable.
        assert error_info(probed).reason == "UPSTREAM_BAD_RESPONSE"  # type: ignore[union-attr]
        assert health.state is not DeploymentState.DOWN


def test_an_upstream_redirect_is_not_followed_but_an_unexpected_status(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    with FakeUpstream() as elsewhere:
        upstream.always(Fault(status=307, body=b"", headers={"location": elsewhere.url + "/v1/rerank"}))

        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))

        assert code_of(error) == Code.INTERNAL
        assert error_info(error).reason == "UPSTREAM_UNEXPECTED_STATUS"  # type: ignore[union-attr]
        assert elsewhere.requests == []  # the query and documents stayed where they were sent
        assert len(upstream.requests) == 1


def test_a_failure_that_makes_the_upstream_down_is_not_retried_into_a_refusal(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    with serve(
        upstream_breaker_failures=2, upstream_breaker_cooldown=30, upstream_retry_backoff=0.5
    ) as server:
        upstream.go_down()
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))
        upstream.come_back()

    # The 2nd refused connection in a row makes it down: the call ends there with what
    # happened, instead of waiting a backoff to be refused by its own breaker.
    assert error_info(error).reason == "UPSTREAM_UNAVAILABLE"  # type: ignore[union-attr]
    assert [line["event"] for line in logs.events()].count("upstream retry") == 1  # one backoff, not two


def test_retried_failures_echoing_the_key_leak_it_nowhere(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    """The key in an upstream's 503 body, retried: not in the error, a log line or a metric."""
    upstream.always(Fault(status=503, body=upstream_error("Down", f"key {UPSTREAM_KEY} is overloaded")))
    with serve(metrics_port=0) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        assert server.server is not None
        assert server.server.metrics_port is not None
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            exposition = response.read().decode()

    assert code_of(error) == Code.UNAVAILABLE
    assert len(upstream.requests) == 3
    assert "is overloaded" in details_of(error)
    assert UPSTREAM_KEY not in details_of(error) + str(trailing(error))
    assert [line["event"] for line in logs.events()].count("upstream retry") == 2
    assert UPSTREAM_KEY not in logs.text
    assert 'rerank_upstream_retries_total{reason="503"} ' in exposition
    assert UPSTREAM_KEY not in exposition


def test_an_upstream_failure_after_the_services_own_retries_is_not_retried_by_the_callers_grpc(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """The service tried the upstream 3 times; a client whose gRPC retries UNAVAILABLE (as
    rerank_client's service config does, 4 attempts) must not make that 12."""
    from rerank_client import RerankClient

    upstream.always(Fault(status=503))
    with (
        serve(upstream_max_attempts=3, upstream_retry_backoff=0.01) as server,
        RerankClient(server.target) as client,
        pytest.raises(grpc.RpcError) as caught,
    ):
        client.rerank("red apple", ["a red apple", "a car"])

    assert code_of(caught.value) == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "UPSTREAM_UNAVAILABLE"
    assert len(upstream.requests) == 3
