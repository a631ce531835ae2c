"""A RerankStream opened before a reload: every later item is identified as the callers are
now, the one refused at once for an id already in flight included, and held to the
caller's limits and fair share as they are now (TENANTS.md § Reloading)."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
from rerank.v1 import rerank_pb2

from rerank_service.config.sources import load_settings
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.server import ServerThread
from tests.support.tenants import ADS_KEY, KEYS, SEARCH_KEY, bearer, caller, rerank_request, write_config
from tests.support.waiting import wait_until

ENV = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, **KEYS}


def test_a_duplicate_id_after_a_reload_removed_the_key_is_refused_unauthenticated_and_not_billed(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """It was answered INVALID_ARGUMENT ("already in flight") with a usage line billed to the
    removed caller, while a new id at the same moment was refused UNAUTHENTICATED."""
    path = tmp_path / "rerank.yaml"
    usage_log = tmp_path / "usage.jsonl"
    write_config(
        path, upstream, [caller("search", "SEARCH_KEY"), caller("ads", "ADS_KEY")], usage_log=str(usage_log)
    )
    upstream.inject(Fault(delay=NEVER))  # item "a" stays in flight
    pending = queue.Queue[rerank_pb2.RerankStreamRequest | None]()

    def items() -> Iterator[rerank_pb2.RerankStreamRequest]:
        while (item := pending.get()) is not None:
            yield item

    with ServerThread(load_settings({"config": str(path)}, env=ENV)) as server:
        assert server.server is not None
        answers = server.stub.RerankStream(items(), metadata=bearer(SEARCH_KEY), timeout=30)
        try:
            pending.put(rerank_pb2.RerankStreamRequest(id="a", request=rerank_request()))
            wait_until(lambda: len(upstream.requests) == 1, what="item a at the upstream")
            write_config(path, upstream, [caller("ads", "ADS_KEY")], usage_log=str(usage_log))
            assert server.run(server.server.reload(lambda: load_settings({"config": str(path)}, env=ENV)))
            pending.put(rerank_pb2.RerankStreamRequest(id="a", request=rerank_request()))
            duplicate = next(answers)
            pending.put(rerank_pb2.RerankStreamRequest(id="b", request=rerank_request()))
            new_id = next(answers)
        finally:
            answers.cancel()
            pending.put(None)

    assert (duplicate.id, new_id.id) == ("a", "b")
    assert duplicate.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert new_id.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # Refused before its request was read, as the new id was: no usage line of its own.
    lines = [json.loads(line) for line in usage_log.read_text().splitlines()]
    assert all(line["code"] != "INVALID_ARGUMENT" for line in lines)


def test_a_reload_that_removed_the_callers_concurrent_limit_holds_the_open_streams_items_to_the_fair_share(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The stream's items kept the caller's settings from the stream's start: its
    `concurrent` limit gone, they were held neither to it nor to the fair share, and ran
    past the share while another caller called."""
    path = tmp_path / "rerank.yaml"
    shares = {"max_concurrent_requests": 4, "caller_max_share": 0.5, "stream_concurrency": 8}
    limited = caller("search", "SEARCH_KEY", limits={"concurrent": 50})
    write_config(path, upstream, [limited, caller("ads", "ADS_KEY")], **shares)
    pending = queue.Queue[rerank_pb2.RerankStreamRequest | None]()

    def items() -> Iterator[rerank_pb2.RerankStreamRequest]:
        while (item := pending.get()) is not None:
            yield item

    with ServerThread(load_settings({"config": str(path)}, env=ENV)) as server:
        assert server.server is not None
        answers = server.stub.RerankStream(items(), metadata=bearer(SEARCH_KEY), timeout=30)
        ads = None
        try:
            pending.put(rerank_pb2.RerankStreamRequest(id="opened", request=rerank_request()))
            opened = next(answers)  # the stream is open, and answered, before the reload
            write_config(path, upstream, [caller("search", "SEARCH_KEY"), caller("ads", "ADS_KEY")], **shares)
            assert server.run(server.server.reload(lambda: load_settings({"config": str(path)}, env=ENV)))
            upstream.inject(Fault(delay=NEVER), times=3)  # ads' call, then the stream's next two items
            ads = server.stub.Rerank.future(rerank_request(), metadata=bearer(ADS_KEY), timeout=30)
            wait_until(lambda: upstream.in_flight == 1, what="ads' call at the upstream")
            for item_id in ("a", "b", "c"):
                pending.put(rerank_pb2.RerankStreamRequest(id=item_id, request=rerank_request()))
            first = next(answers)  # a and b run until cancelled: c is answered first
            wait_until(lambda: upstream.in_flight == 3, what="a and b at the upstream beside ads' call")
        finally:
            answers.cancel()
            pending.put(None)
            if ads is not None:
                ads.cancel()

    assert opened.WhichOneof("result") == "response"
    assert (first.id, first.error.reason, first.error.metadata["limit"]) == (
        "c",
        "CALLER_LIMITED",
        "fair_share",
    )
    assert len(upstream.requests) == 4  # the first item, ads' call, a and b: c never ran
