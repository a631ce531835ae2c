"""W3C trace context: a well-formed traceparent and tracestate go upstream, anything
malformed is dropped (a stray CR/LF would be a header-injection vector)."""

from __future__ import annotations

from typing import Any

import pytest

from rerank_service.observability.trace_context import trace_context, valid_tracestate

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "traceparent", [TRACEPARENT, f"00-{TRACE_ID}-{PARENT_ID}-00", f"00-{TRACE_ID}-{PARENT_ID}-ff"]
)
def test_a_well_formed_traceparent_is_kept(traceparent: str) -> None:
    assert trace_context([("traceparent", traceparent)]) == (traceparent, None)


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # uppercase hex
        f"01-{TRACE_ID}-{PARENT_ID}-01",  # a version this service does not know
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # the forbidden version
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",  # short trace id
        f"00-{TRACE_ID}-{PARENT_ID}-1",  # short flags
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
        f"{TRACEPARENT}\n",  # a trailing newline: `$` would accept it, fullmatch does not
        f"{TRACEPARENT}\r\nx-injected: 1",
        f" {TRACEPARENT}",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
    ],
)
def test_a_malformed_traceparent_is_dropped_with_its_tracestate(traceparent: str) -> None:
    assert trace_context([("traceparent", traceparent), ("tracestate", "a=1")]) == (None, None)


def test_two_traceparents_are_malformed() -> None:
    assert trace_context([("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)]) == (None, None)


def test_no_trace_metadata_costs_nothing_and_gives_nothing() -> None:
    assert trace_context([("authorization", "Bearer k"), ("user-agent", "grpc-python")]) == (None, None)
    assert trace_context(None) == (None, None)


def test_tracestates_are_joined_into_one_list() -> None:
    metadata: list[tuple[str, Any]] = [
        ("traceparent", TRACEPARENT),
        ("tracestate", "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"),
        ("tracestate", "tenant@vendor=x"),
    ]
    assert trace_context(metadata) == (TRACEPARENT, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,tenant@vendor=x")


@pytest.mark.parametrize(
    "tracestate",
    [
        "Rojo=1",  # keys are lowercase
        "rojo",  # no value
        "rojo=a,b",  # a member without '='
        "rojo=1\r\nx-injected: 1",
        "rojo=a=b",  # '=' in a value
        "rojo=a\tb",  # a tab in a value
        "rojo=caf\u00e9",  # not ASCII
        ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
        "k=" + "v" * 600,  # longer than 512 characters
    ],
)
def test_a_malformed_tracestate_is_dropped_but_the_traceparent_kept(tracestate: str) -> None:
    assert valid_tracestate(tracestate) is None
    assert trace_context([("traceparent", TRACEPARENT), ("tracestate", tracestate)]) == (TRACEPARENT, None)
