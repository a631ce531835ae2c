"""A primary that answers 429 (rate limited), 408 or a status no rerank API answers does not
starve its fallback: the call falls over at once, and after a few such answers the primary
is avoided, as an ejected one is, so the route's calls go to the fallback first."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2_grpc

from rerank_service.pipeline.record import DEPLOYMENT_KEY
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.integration.test_routes import (
    UPSTREAM_MODEL,
    call,
    deployment,
    metrics_port,
    service,
    write_config,
)
from tests.support.process import ServiceProcess
from tests.support.rpc import error_info, request
from tests.support.scrape import scrape, value

CALLS = 20
FAILURES = 3  # the primary's breaker_failures
RATE_LIMITED = {"code": "Throttling.RateQuota", "message": "Requests rate limit exceeded"}


@pytest.mark.parametrize(
    ("fault", "answers", "reason"),
    [
        # Without Retry-After, or one of 0 (asking for nothing): avoided once FAILURES come in a row.
        (Fault(status=429, body=RATE_LIMITED), FAILURES, "rate_limited"),
        (Fault(status=429, body=RATE_LIMITED, headers={"Retry-After": "0"}), FAILURES, "rate_limited"),
        # A Retry-After: avoided from the first, for that long (capped at the cool-down).
        (Fault(status=429, body=RATE_LIMITED, headers={"Retry-After": "30"}), 1, "rate_limited"),
        # Failing answers the call falls over on: ejected once FAILURES come in a row.
        (Fault(status=408, body={"code": "RequestTimeout", "message": "gave up"}), FAILURES, "ejected"),
        (
            Fault(status=301, body=b"", headers={"Location": "https://elsewhere.example/"}),
            FAILURES,
            "ejected",
        ),
    ],
    ids=["429", "429 Retry-After 0", "429 Retry-After 30", "408", "301"],
)
def test_a_primary_that_answers_so_falls_over_at_once_and_is_then_avoided_for_the_fallback(
    tmp_path: Path, fault: Fault, answers: int, reason: str
) -> None:
    with (
        FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,)) as primary,
        FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,)) as fallback,
    ):
        primary.always(fault)
        overrides: dict[str, Any] = {
            "breaker_failures": FAILURES,
            "breaker_cooldown": 60,
            "retry_backoff": 0.01,
        }
        config = write_config(
            tmp_path / "routes.yaml",
            {
                "search": [
                    deployment(primary, "primary", **overrides),
                    deployment(fallback, "fallback", priority=1),
                ]
            },
        )
        with (
            service(config, "--metrics-port", "0") as process,
            grpc.insecure_channel(process.target) as channel,
        ):
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            answered = Counter(call(stub, "search")[1] for _ in range(CALLS))
            samples = scrape(metrics_port(process))

    # Every call answered, by the fallback: none failed for the route's retry budget.
    assert answered == {"fallback": CALLS}
    # One attempt a call on the primary (a 429 is not retried there while the fallback
    # could take the call), and only until it was avoided.
    assert len(primary.requests) == answers
    assert value(samples, "rerank_upstream_retries_total", reason="429") == 0
    assert value(samples, "rerank_route_retry_budget_exhausted_total", route="search") == 0
    assert value(samples, "rerank_deployment_state", deployment="primary") == 1
    assert value(samples, "rerank_deployment_ejections_total", deployment="primary", state=reason) == 1


def test_a_lone_deployment_that_answers_429_is_still_retried_there_and_its_caller_told(
    tmp_path: Path,
) -> None:
    """No other deployment to fall over to: each call retries the 429 as before, and once the
    deployment is avoided for its 429s it is still called (nothing else is left)."""
    with FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,)) as lone:
        lone.always(Fault(status=429, body=RATE_LIMITED))
        config = write_config(
            tmp_path / "routes.yaml",
            {
                "search": [
                    deployment(lone, "lone", breaker_failures=FAILURES, max_attempts=3, retry_backoff=0.01)
                ]
            },
        )
        with service(config) as process, grpc.insecure_channel(process.target) as channel:
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            refusals = []
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Rerank(request(model="search"), timeout=10)
                info = error_info(caught.value)
                refusals.append((caught.value.code(), info.reason if info is not None else None))

    assert refusals == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED")] * 2
    assert len(lone.requests) == 2 * 3  # every attempt of both calls


OWN_ACCOUNT = "own-account"  # in the query of the caller whose account the upstream refuses


def without_key(settings: dict[str, Any]) -> dict[str, Any]:
    """A deployment's settings without a key of its own: callers' tokens go upstream."""
    return {name: setting for name, setting in settings.items() if name != "api_key_env"}


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=429, body=RATE_LIMITED, headers={"Retry-After": "30"}),
        Fault(status=429, body=RATE_LIMITED),
        Fault(status=402, body={"code": "Arrearage", "message": "your account is overdue"}),
    ],
    ids=["429 Retry-After 30", "429", "402"],
)
def test_in_pass_through_mode_one_callers_own_429s_or_402s_move_no_other_caller_off_the_deployment(
    tmp_path: Path, fault: Fault
) -> None:
    """Each caller's own token goes upstream: a 429 (its quota) or a 402 (its unpaid account)
    is that caller's, not the deployment's, so the others' calls stay where they were."""
    with (
        FakeUpstream(models=(UPSTREAM_MODEL,)) as primary,
        FakeUpstream(models=(UPSTREAM_MODEL,)) as fallback,
    ):
        # The refused caller's requests, told apart by their query (the fake does not read tokens).
        primary.poison(OWN_ACCOUNT, fault)
        overrides: dict[str, Any] = {"breaker_failures": FAILURES, "breaker_cooldown": 60}
        config = write_config(
            tmp_path / "routes.yaml",
            {
                "search": [
                    # No key of their own and no caller keys: pass-through.
                    without_key(deployment(primary, "primary", **overrides)),
                    without_key(deployment(fallback, "fallback", priority=1)),
                ]
            },
        )
        with (
            ServiceProcess(["--config", str(config), "--metrics-port", "0"]) as process,
            grpc.insecure_channel(process.target) as channel,
        ):
            stub = rerank_pb2_grpc.RerankServiceStub(channel)

            def answered_by(token: str, query: str) -> str:
                _, rpc = stub.Rerank.with_call(
                    request(model="search", query=query),
                    timeout=10,
                    metadata=(("authorization", f"Bearer {token}"),),
                )
                return {name: str(value) for name, value in rpc.trailing_metadata() or ()}[DEPLOYMENT_KEY]

            # Each falls over to the fallback (that call's own business), more than enough
            # in a row to avoid or eject the primary were they its fault.
            refused = [answered_by("refused", f"{OWN_ACCOUNT} red apple") for _ in range(FAILURES + 1)]
            others = [answered_by("paying", "red apple") for _ in range(CALLS)]
            samples = scrape(metrics_port(process))

    assert refused == ["fallback"] * (FAILURES + 1)
    assert others == ["primary"] * CALLS
    assert value(samples, "rerank_deployment_state", deployment="primary") == 0
    for state in ("rate_limited", "ejected"):
        assert value(samples, "rerank_deployment_ejections_total", deployment="primary", state=state) == 0
