"""A RerankStream opened before a reload: every later item is identified as the callers are
now, the one refused at once for an id already in flight included (TENANTS.md § Reloading)."""

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
from tests.support.tenants import KEYS, SEARCH_KEY, bearer, caller, rerank_request, write_config
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
