"""Real `rerank-service serve` processes with a `callers:` section, for the tenant tests:
the config file, the keys in the environment, and the calls each caller makes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.support.process import ServiceProcess

SEARCH_KEY = "sk-search-tenant-0123456789"
ADS_KEY = "sk-ads-tenant-0123456789"
KEYS = {"SEARCH_KEY": SEARCH_KEY, "ADS_KEY": ADS_KEY}
MODELS = ("qwen3-rerank", "gte-rerank-v2")


def caller(name: str, key_env: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "credentials": [{"key_env": key_env}], **fields}


def write_config(
    path: Path, upstream: FakeUpstream, callers: Sequence[Mapping[str, Any]], **settings: Any
) -> Path:
    """A config file: the fake upstream serving MODELS, and these callers."""
    config = {
        "backend": "upstream",
        "upstream_url": upstream.url,
        "upstream_models": list(MODELS),
        "upstream_timeout": 10,
        "cache_memory_mb": 0,  # every call reaches the upstream: the tests count them there
        "callers": [dict(entry) for entry in callers],
        **settings,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def service(config: Path, *flags: str, env: Mapping[str, str] | None = None) -> ServiceProcess:
    """`serve --config FILE` with an HTTP and a metrics port; the keys in its environment."""
    return ServiceProcess(
        ["--config", str(config), "--http-port", "0", "--metrics-port", "0", *flags],
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, **KEYS, **(env or {})},
    )


def serving(process: ServiceProcess) -> dict[str, Any]:
    """The `serving` line: its http_port and metrics_port."""
    return next(event for event in process.events() if event.get("event") == "serving")


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def rerank_request(model: str = "qwen3-rerank", documents: int = 3) -> rerank_pb2.RerankRequest:
    return rerank_pb2.RerankRequest(
        model=model,
        query="which bucket holds the tokens",
        documents=[f"document {index} about token buckets" for index in range(documents)],
    )


def channel(target: str) -> grpc.Channel:
    # A connection of its own: with workers the kernel spreads connections over them.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def call(
    target: str, key: str, model: str = "qwen3-rerank", documents: int = 3
) -> rerank_pb2.RerankResponse | grpc.RpcError:
    """One Rerank call on a connection of its own: the response, or the error."""
    with channel(target) as opened:
        try:
            response: rerank_pb2.RerankResponse = rerank_pb2_grpc.RerankServiceStub(opened).Rerank(
                rerank_request(model, documents), metadata=bearer(key), timeout=10
            )
            return response
        except grpc.RpcError as error:
            return error


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def http_call(
    port: int, key: str, path: str = "/v1/rerank", body: Mapping[str, Any] | None = None, method: str = "POST"
) -> HttpAnswer:
    data = None
    if method == "POST":
        data = json.dumps(
            dict(body)
            if body is not None
            else {"model": "qwen3-rerank", "query": "which bucket", "documents": ["a bucket", "a token"]}
        ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - http:// only
            return HttpAnswer(reply.status, dict(reply.headers), json.loads(reply.read()))
    except urllib.error.HTTPError as error:
        return HttpAnswer(error.code, dict(error.headers), json.loads(error.read()))
