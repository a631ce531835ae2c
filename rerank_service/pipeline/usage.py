"""What each caller used, metered once per call from the values it was answered with.

The pipeline (call.py) hands every finished call of a known caller here: its metrics
(observability/caller_metrics.py) and, with `--usage-log`, one JSON line a call, what a
platform team loads into its billing table: caller, model, deployment, request id,
documents, tokens, where the token count came from, latency, code. Nothing of the query
or the documents is ever written.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import grpc
import orjson

from rerank_service.config import ConfigError
from rerank_service.core.domain import RerankOutcome, ServiceError, Spent
from rerank_service.observability.caller_metrics import CallerMetrics
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import code_name
from rerank_service.pipeline.callers import Caller
from rerank_service.pipeline.limits import CALLER_LIMITED
from rerank_service.pipeline.record import failed_on

_log = get_logger("rerank_service.usage")

STDOUT = "stdout"
# The label of a model a caller named that no route serves (it must not become a label).
UNKNOWN_MODEL = "-"
_NEWLINE = ord("\n")


@dataclass(slots=True)  # not frozen: made once per call, and a frozen __init__ costs more
class MeteredCall:
    """One finished call of a caller, as it is metered (treat it as a value)."""

    caller: Caller
    model: str | None  # None: the request was never read
    model_known: bool  # a model a route serves (else labelled UNKNOWN_MODEL)
    code: grpc.StatusCode
    documents: int | None
    outcome: RerankOutcome | None
    failure: ServiceError | None
    request_id: str
    method: str
    seconds: float
    # What backends answered it that its outcome does not carry (a split call's chunks answered
    # before it failed or was cancelled, an answer whose scores were being stored then).
    spent: Spent | None = None
    attempted: str | None = None  # the deployment the router last sent it to


class UsageLog:
    """One JSON line per call, appended to a file (one write each, O_APPEND: lines of
    several workers never interleave) or written to stdout."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.lost = 0  # lines lost since the writes started failing
        self._torn = False  # a full disk cut the last line short: the file ends mid-line
        if target == STDOUT:
            self._fd, self._owned = 1, False
        else:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._owned = True

    def write(self, record: dict[str, object]) -> None:
        """Write one line; a failure (a full disk) loses it, never the call: logged when the
        writes start failing and when they work again."""
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if self._torn:  # end the line cut short, so that it stays one bad line and this one is whole
            line = b"\n" + line
        written, error = self._write_all(line)
        if written:
            self._torn = line[written - 1] != _NEWLINE
        if written < len(line):
            self.lost += 1
            if self.lost == 1:
                problem = str(error) if error else f"wrote {written} of {len(line)} bytes"
                _log.error("usage log: cannot write, lines are lost", target=self.target, error=problem)
            return
        if self.lost:
            _log.warning("usage log: writing again", target=self.target, lost=self.lost)
            self.lost = 0

    def _write_all(self, data: bytes) -> tuple[int, OSError | None]:
        """Write `data` while os.write makes progress: how much it wrote, and the error that
        stopped it short. A disk that fills mid-line writes what fits without an error, so
        the rest takes a second write (the only case where a line is not written at once)."""
        written = 0
        try:
            while written < len(data):
                count = os.write(self._fd, data[written:])
                if count == 0:
                    break
                written += count
        except OSError as exc:
            return written, exc
        return written, None

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)
            self._owned = False


def open_usage_log(target: str | None) -> UsageLog | None:
    """`--usage-log`: None for off; a file that cannot be opened is a ConfigError."""
    if target is None:
        return None
    try:
        return UsageLog(target)
    except OSError as exc:
        raise ConfigError(f"usage-log {target}: cannot open it ({exc.strerror or exc})") from None


def check_usage_log(target: str | None) -> None:
    """Whether `open_usage_log` would open `target`, without creating it (check-config): a
    ConfigError saying why not."""
    if target is None or target == STDOUT:
        return
    path = os.path.abspath(target)
    if os.path.isdir(path):
        problem = "Is a directory"
    elif os.path.exists(path):
        problem = "" if os.access(path, os.W_OK) else "Permission denied"
    elif not os.path.isdir(os.path.dirname(path)):
        problem = "No such file or directory"
    else:
        problem = "" if os.access(os.path.dirname(path), os.W_OK) else "Permission denied"
    if problem:
        raise ConfigError(f"usage-log {target}: cannot open it ({problem})")


class UsageMeter:
    def __init__(self, metrics: CallerMetrics, log: UsageLog | None = None) -> None:
        self.metrics = metrics
        self.log = log

    def record(self, call: MeteredCall) -> None:
        caller = call.caller
        metrics = self.metrics
        outcome = call.outcome
        answered = outcome is not None and call.code == grpc.StatusCode.OK
        # A caller named after its token takes a label only once a backend answered it (the
        # upstream took the token): ListModels, GET /v1/models and a stream's own call end OK
        # without the token leaving the service, so junk tokens would take the labels.
        label = metrics.label(caller.name, caller.per_token, answered)
        failure = call.failure
        if failure is not None and failure.reason == CALLER_LIMITED:
            metrics.refused(label, failure.metadata.get("limit", ""))
        if call.model is None:
            # Refused before its request was read or parsed (admission, no model to label it
            # with): a fair-share refusal is counted above only, so the alert on a caller's
            # refusals adds those to its calls (deploy/prometheus/alerts.yaml).
            return
        model = call.model if call.model_known else UNKNOWN_MODEL
        metrics.call(label, model, call.code)
        if outcome is not None and call.code == grpc.StatusCode.OK:
            metrics.answered(
                label, model, call.documents or 0, outcome.total_tokens, outcome.usage_source,
                outcome.cached_tokens, outcome.backend_calls,
            )  # fmt: skip
        if self.log is not None:
            self.log.write(_record(call, model))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _record(call: MeteredCall, model: str) -> dict[str, object]:
    outcome, failure, spent = call.outcome, call.failure, call.spent
    answered = outcome is not None and call.code == grpc.StatusCode.OK
    # Not answered, yet billed upstream: a call the backend answered that failed after (its
    # answer too large to send, its deadline passed as it went out), or what backends answered
    # a call that failed or was cancelled before its outcome (a split call's chunks, an answer
    # whose scores were being stored). The tokens limit is charged as much (call.py).
    if outcome is not None:
        spent_tokens, spent_calls = outcome.total_tokens, outcome.backend_calls
    elif spent is not None:
        spent_tokens, spent_calls = spent.tokens, spent.backend_calls
    else:
        spent_tokens, spent_calls = 0, 0
    deployment = None
    upstream_ids: list[str] = []
    if outcome is not None:
        upstream_ids = list(outcome.upstream_request_ids)
        if outcome.deployments:
            deployment = ",".join(outcome.deployments)
    elif spent is not None and spent_calls:
        # What was billed is named after the deployments that answered it, not the one that
        # failed the call (another chunk's), with the ids the upstreams billed it under.
        deployment = ",".join(spent.deployments) or None
        upstream_ids = spent.upstream_request_ids
    if deployment is None:
        deployment = failed_on(failure, call.attempted)
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "caller": call.caller.name,
        "model": model,
        "deployment": deployment,
        "request_id": call.request_id,
        "upstream_request_ids": upstream_ids,
        "method": call.method,
        "code": code_name(call.code),
        "documents": call.documents if answered else 0,
        "tokens": outcome.total_tokens if answered and outcome is not None else spent_tokens,
        "cached_tokens": outcome.cached_tokens if answered and outcome is not None else 0,
        "usage_source": outcome.usage_source if answered and outcome is not None else None,
        "backend_calls": outcome.backend_calls if answered and outcome is not None else spent_calls,
        "latency_ms": round(call.seconds * 1000, 3),
    }
