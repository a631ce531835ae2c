"""A log line that cannot be written (a full disk, a closed pipe) is lost, never the call
that wrote it: the call ends as it would have, its caller's limits are settled, and the
lines lost are said once the log can be written again."""

from __future__ import annotations

import asyncio
import errno
import io
from typing import TextIO, cast

import orjson

from rerank_service.config.callers import CallerLimits
from rerank_service.core.domain import CallContext, RerankRequest
from rerank_service.core.engine import RerankEngine
from rerank_service.observability.logging import configure_logging, get_logger
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.call import Pipeline
from rerank_service.pipeline.callers import Caller, CallerDirectory
from tests.unit.test_callers import _AnsweringEngine


class FullDisk(io.StringIO):
    """A stream that refuses every write while `full` (ENOSPC), and keeps what it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def write(self, text: str) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)

    def lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.getvalue().splitlines()]


def test_a_call_whose_log_line_cannot_be_written_ends_and_gives_its_callers_slot_back() -> None:
    stream = FullDisk()
    configure_logging("json", "info", stream=cast(TextIO, stream))
    caller = Caller("search", limits=CallerLimits(concurrent=1), configured=True)
    pipeline = Pipeline(cast(RerankEngine, _AnsweringEngine(7)), Admission(4), CallerDirectory())
    measured = pipeline.metrics.for_method("/rerank.v1.RerankService/Rerank")
    request = RerankRequest("qwen3-rerank", "what is a bucket", ["a token bucket"])

    def one_call() -> None:
        call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", measured)
        call.caller = caller
        call.admit(0)
        asyncio.run(call.rerank(request, CallContext()))
        call.succeeded()
        call.finish()

    stream.full = True
    one_call()  # its line is lost; nothing raises
    one_call()  # its caller's one concurrent call was given back: admitted again
    stream.full = False
    get_logger("tests").info("written again")

    events = [line["event"] for line in stream.lines()]
    assert events == ["written again", "log: lines were lost, the stream could not be written"]
    assert stream.lines()[1]["lost"] == 2
    assert pipeline.limiter.local.in_flight("search") == 0
