"""Tenants end to end, in real `serve` processes in front of a real HTTP upstream: who
calls, what each may call, what each used, and its limits (per process here;
test_tenant_limits_shared.py holds them across processes in Redis)."""

from __future__ import annotations

import json
import queue
import signal
import ssl
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream, Fault, total_tokens
from tests.conftest import UPSTREAM_KEY
from tests.support.certs import CertificateAuthority, Issued
from tests.support.process import run_cli
from tests.support.rpc import _unpacked, error_info, field_violations, retry_delay
from tests.support.scrape import scrape, value
from tests.support.tenants import (
    ADS_KEY,
    SEARCH_KEY,
    bearer,
    call,
    caller,
    channel,
    http_call,
    rerank_request,
    service,
    serving,
    write_config,
)
from tests.support.waiting import wait_until


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY, models=("qwen3-rerank", "gte-rerank-v2")) as fake:
        yield fake


def quota_failure(error: grpc.RpcError) -> error_details_pb2.QuotaFailure:
    (found,) = _unpacked(error, error_details_pb2.QuotaFailure)
    return found


def test_a_caller_over_its_requests_per_minute_is_refused_with_details_while_another_is_untouched(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [
            caller("search", "SEARCH_KEY", limits={"requests_per_minute": 3}),
            caller("ads", "ADS_KEY"),
        ],
    )
    with service(config) as process:
        served = [call(process.target, SEARCH_KEY) for _ in range(3)]
        refused = call(process.target, SEARCH_KEY)
        others = [call(process.target, ADS_KEY) for _ in range(5)]
        over_http = http_call(serving(process)["http_port"], SEARCH_KEY)

    assert all(isinstance(answer, rerank_pb2.RerankResponse) for answer in served + others)
    assert isinstance(refused, grpc.RpcError)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (violation,) = quota_failure(refused).violations
    assert violation.subject == "caller:search"
    assert violation.description.startswith("requests_per_minute: 3 requests a minute")
    delay = retry_delay(refused)
    assert delay is not None
    assert 15 < delay <= 20  # one request's worth of a 3-a-minute bucket
    info = error_info(refused)
    assert info is not None
    assert info.reason == "CALLER_LIMITED"
    assert dict(info.metadata) == {"caller": "search", "limit": "requests_per_minute"}
    # HTTP: 429, Retry-After, and the same fields in the JSON error.
    assert over_http.status == 429
    assert 15 < int(over_http.headers["Retry-After"]) <= 20
    assert over_http.body["caller"] == "search"
    assert over_http.body["limit"] == "requests_per_minute"
    assert over_http.body["quota_violations"][0]["subject"] == "caller:search"
    assert 15 < over_http.body["retry_after_seconds"] <= 20
    # Refusals cost no upstream call.
    assert len(upstream.requests) == 3 + 5


def test_a_model_outside_a_callers_list_is_permission_denied_and_not_listed(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [caller("search", "SEARCH_KEY", models=["qwen3-rerank"]), caller("ads", "ADS_KEY")],
    )
    with service(config) as process:
        http_port = serving(process)["http_port"]
        denied = call(process.target, SEARCH_KEY, model="gte-rerank-v2")
        denied_http = http_call(
            http_port,
            SEARCH_KEY,
            body={"model": "gte-rerank-v2", "query": "q", "documents": ["a", "b"]},
        )
        with grpc.insecure_channel(process.target) as opened:
            stub = rerank_pb2_grpc.RerankServiceStub(opened)
            listed = stub.ListModels(rerank_pb2.ListModelsRequest(), metadata=bearer(SEARCH_KEY), timeout=5)
            listed_all = stub.ListModels(rerank_pb2.ListModelsRequest(), metadata=bearer(ADS_KEY), timeout=5)
        models_http = http_call(http_port, SEARCH_KEY, path="/v1/models", method="GET")
        allowed = call(process.target, SEARCH_KEY, model="qwen3-rerank")

    assert isinstance(denied, grpc.RpcError)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(denied)
    assert info is not None
    assert info.reason == "MODEL_NOT_ALLOWED"
    assert dict(info.metadata) == {"caller": "search", "model": "gte-rerank-v2"}
    assert denied_http.status == 403
    assert "may not call model 'gte-rerank-v2'" in denied_http.body["message"]
    assert [model.name for model in listed.models] == ["qwen3-rerank"]
    assert {model.name for model in listed_all.models} == {"qwen3-rerank", "gte-rerank-v2"}
    assert [model["id"] for model in models_http.body["data"]] == ["qwen3-rerank"]
    assert isinstance(allowed, rerank_pb2.RerankResponse)
    assert len(upstream.requests) == 1  # the refusals reached no upstream


def test_per_caller_metrics_and_the_usage_log_equal_the_usage_each_caller_was_told(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [caller("search", "SEARCH_KEY", limits={"requests_per_minute": 1000}), caller("ads", "ADS_KEY")],
    )
    usage_log = tmp_path / "usage.jsonl"
    told: Counter[tuple[str, str]] = Counter()  # (caller, what) → sum
    with service(config, "--usage-log", str(usage_log)) as process:
        ports = serving(process)
        with grpc.insecure_channel(process.target) as opened:
            stub = rerank_pb2_grpc.RerankServiceStub(opened)
            for documents in (1, 4, 9):  # unary
                response = stub.Rerank(rerank_request(documents=documents), metadata=bearer(SEARCH_KEY))
                told["search", "tokens"] += response.usage.total_tokens
                told["search", "documents"] += documents
                told["search", "calls"] += 1
            items = [
                rerank_pb2.RerankStreamRequest(id=str(index), request=rerank_request(documents=index + 2))
                for index in range(4)
            ]
            for item in stub.RerankStream(iter(items), metadata=bearer(ADS_KEY), timeout=10):
                told["ads", "tokens"] += item.response.usage.total_tokens
                told["ads", "documents"] += len(item.response.output.results)
                told["ads", "calls"] += 1
        for key in (SEARCH_KEY, ADS_KEY):  # HTTP
            answer = http_call(ports["http_port"], key)
            name = "search" if key == SEARCH_KEY else "ads"
            told[name, "tokens"] += answer.body["usage"]["total_tokens"]
            told[name, "documents"] += 2
            told[name, "calls"] += 1
        denied = call(process.target, "sk-not-a-key")
        samples = scrape(ports["metrics_port"])
        table = run_cli("usage", "--metrics", f"http://127.0.0.1:{ports['metrics_port']}/metrics")
        wait_until(lambda: len(usage_log.read_text().splitlines()) >= 9, what="the usage lines")
        lines = [json.loads(line) for line in usage_log.read_text().splitlines()]

    assert isinstance(denied, grpc.RpcError)  # an unknown key is nobody's usage
    for name in ("search", "ads"):
        labels = {"caller": name, "model": "qwen3-rerank"}
        assert value(samples, "rerank_caller_calls_total", code="OK", **labels) == told[name, "calls"]
        assert value(samples, "rerank_caller_documents_total", **labels) == told[name, "documents"]
        tokens = value(samples, "rerank_caller_tokens_total", source="upstream", **labels)
        assert tokens == told[name, "tokens"] > 0
        assert value(samples, "rerank_caller_backend_calls_total", **labels) == told[name, "calls"]
        logged = [line for line in lines if line["caller"] == name]
        assert len(logged) == told[name, "calls"]
        assert sum(line["tokens"] for line in logged) == told[name, "tokens"]
        assert sum(line["documents"] for line in logged) == told[name, "documents"]
    assert {line["usage_source"] for line in lines} == {"upstream"}
    assert {line["code"] for line in lines} == {"OK"}
    assert all(line["deployment"] and line["request_id"] and line["latency_ms"] > 0 for line in lines)
    assert not any("bucket" in json.dumps(line) for line in lines)  # nothing of the query or documents
    assert table.returncode == 0, table.stderr
    rows = {tuple(row.split()[:2]): row.split() for row in table.stdout.splitlines()[1:] if row.strip()}
    assert rows["search", "qwen3-rerank"][2:6] == [
        str(told["search", "calls"]),
        str(told["search", "calls"]),
        str(told["search", "documents"]),
        str(told["search", "tokens"]),
    ]


def test_a_split_call_failed_by_one_chunk_is_metered_for_the_chunks_answered_before(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The upstream billed those chunks and the cache keeps their scores: metered as nothing,
    the retry without the refused document was then answered from the cache for free."""
    config = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [caller("search", "SEARCH_KEY")],
        upstream_documents_per_call=2,
        chunk_concurrency=1,  # the chunks in turn: the first two are answered, the third refused
        upstream_max_attempts=1,
    )
    usage_log = tmp_path / "usage.jsonl"
    request = rerank_request(documents=6)
    refused = Fault(status=400, body={"code": "DataInspectionFailed", "message": "inappropriate"})
    upstream.inject(Fault(), times=2)
    upstream.inject(refused)
    with service(config, "--usage-log", str(usage_log), env={"RERANK_CACHE_MEMORY_MB": "16"}) as process:
        failed = call(process.target, SEARCH_KEY, documents=6)
        sent = [request.body["input"] for request in upstream.requests]
        billed = sum(total_tokens(chunk["query"], chunk["documents"]) for chunk in sent[:2])
        retried = call(process.target, SEARCH_KEY, documents=4)  # what the answered chunks held
        wait_until(lambda: len(usage_log.read_text().splitlines()) >= 2, what="the usage lines")
        failed_line, retried_line = (json.loads(line) for line in usage_log.read_text().splitlines())

    assert isinstance(failed, grpc.RpcError)
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(sent) == 3  # two chunks answered, the third refused
    assert (failed_line["code"], failed_line["tokens"], failed_line["backend_calls"]) == (
        "INVALID_ARGUMENT",
        billed,
        2,
    )
    assert isinstance(retried, rerank_pb2.RerankResponse)
    assert (retried.usage.total_tokens, retried.usage.cached_tokens) == (0, billed)
    assert (retried_line["tokens"], retried_line["cached_tokens"]) == (0, billed)
    assert request.documents[:4] == rerank_request(documents=4).documents


def test_a_request_read_but_not_valid_is_metered_for_its_caller_over_either_door(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "rerank.yaml", upstream, [caller("search", "SEARCH_KEY"), caller("ads", "ADS_KEY")]
    )
    with service(config) as process:
        ports = serving(process)
        over_grpc = call(process.target, SEARCH_KEY, documents=0)  # no documents
        over_http = http_call(ports["http_port"], ADS_KEY, body={"model": "qwen3-rerank", "query": "q"})
        samples = scrape(ports["metrics_port"])

    assert isinstance(over_grpc, grpc.RpcError)
    assert over_grpc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert over_http.status == 400
    for name in ("search", "ads"):
        labels = {"caller": name, "model": "qwen3-rerank", "code": "INVALID_ARGUMENT"}
        assert value(samples, "rerank_caller_calls_total", **labels) == 1, name


def test_a_reload_lowers_a_limit_and_removes_a_key_without_a_restart(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    path = tmp_path / "rerank.yaml"
    callers = [caller("search", "SEARCH_KEY", limits={"requests_per_minute": 100}), caller("ads", "ADS_KEY")]
    config = write_config(path, upstream, callers)
    with service(config) as process:
        before = [call(process.target, SEARCH_KEY) for _ in range(5)]
        write_config(path, upstream, [caller("search", "SEARCH_KEY", limits={"requests_per_minute": 2})])
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: any(event.get("event") == "reloaded" for event in process.events()), what="the reload"
        )
        after = [call(process.target, SEARCH_KEY) for _ in range(3)]
        removed = call(process.target, ADS_KEY)

    assert all(isinstance(answer, rerank_pb2.RerankResponse) for answer in before)
    # The bucket held 95; a burst of 2 now holds 2 at most.
    assert [isinstance(answer, rerank_pb2.RerankResponse) for answer in after] == [True, True, False]
    assert isinstance(after[2], grpc.RpcError)
    assert after[2].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(removed, grpc.RpcError)
    assert removed.code() == grpc.StatusCode.UNAUTHENTICATED
    reloaded = next(event for event in process.events() if event.get("event") == "reloaded")
    assert reloaded["callers"] == ["search"]


def test_a_stream_opened_before_a_reload_has_each_later_item_identified_as_callers_are_now(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Every item is a call: a key the reload removed is refused on the open stream's next
    item, and a lowered limit holds there at once, as on a new call."""
    path = tmp_path / "rerank.yaml"
    callers = [caller("search", "SEARCH_KEY", limits={"requests_per_minute": 100}), caller("ads", "ADS_KEY")]
    config = write_config(path, upstream, callers)
    with service(config) as process, channel(process.target) as opened:
        stub = rerank_pb2_grpc.RerankServiceStub(opened)
        streams = {name: queue.Queue[rerank_pb2.RerankStreamRequest | None]() for name in ("search", "ads")}

        def items(name: str) -> Iterator[rerank_pb2.RerankStreamRequest]:
            while (item := streams[name].get()) is not None:
                yield item

        answers = {
            name: stub.RerankStream(items(name), metadata=bearer(key), timeout=60)
            for name, key in (("search", SEARCH_KEY), ("ads", ADS_KEY))
        }

        def send(name: str, item_id: str) -> rerank_pb2.RerankStreamResponse:
            streams[name].put(rerank_pb2.RerankStreamRequest(id=item_id, request=rerank_request()))
            return next(answers[name])

        try:
            before = [send("search", "s0"), send("ads", "a0")]
            write_config(path, upstream, [caller("search", "SEARCH_KEY", limits={"requests_per_minute": 2})])
            assert process.process is not None
            process.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda: any(event.get("event") == "reloaded" for event in process.events()), what="the reload"
            )
            after = [send("search", f"s{index}") for index in range(1, 4)]
            removed = send("ads", "a1")
        finally:
            for pending in streams.values():
                pending.put(None)

    assert [answer.HasField("response") for answer in before] == [True, True]
    # The bucket held 99; a burst of 2 now holds 2 at most.
    assert [answer.HasField("response") for answer in after] == [True, True, False]
    assert after[2].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert removed.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]


def test_an_mtls_client_is_the_caller_its_certificate_names(tmp_path: Path, upstream: FakeUpstream) -> None:
    ca = CertificateAuthority()
    ca_path = ca.write(tmp_path)
    server_cert, server_key = ca.issue_server().write(tmp_path, "server")
    indexer = ca.issue_client("indexer-cn", uris=["spiffe://mesh/ns/search/sa/indexer"])
    stranger = ca.issue_client("stranger")
    client_cert, client_key = indexer.write(tmp_path, "indexer")
    config = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [
            {
                "name": "indexer",
                "credentials": [{"tls_identity": "spiffe://mesh/ns/search/sa/indexer"}],
                "models": ["qwen3-rerank"],
            },
            caller("search", "SEARCH_KEY"),
        ],
        tls_cert=str(server_cert),
        tls_key=str(server_key),
        tls_client_ca=str(ca_path),
    )

    def channel_as(issued_cert: bytes, issued_key: bytes, target: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(ca.cert_pem, issued_key, issued_cert)
        return grpc.secure_channel(target.replace("127.0.0.1", "localhost"), credentials)

    with service(config) as process:
        with channel_as(indexer.cert_pem, indexer.key_pem, process.target) as opened:
            stub = rerank_pb2_grpc.RerankServiceStub(opened)
            answered = stub.Rerank(rerank_request(), timeout=10)
            listed = stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=10)
        with channel_as(stranger.cert_pem, stranger.key_pem, process.target) as opened:
            stub = rerank_pb2_grpc.RerankServiceStub(opened)
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Rerank(rerank_request(), timeout=10)
            by_key = stub.Rerank(rerank_request(), metadata=bearer(SEARCH_KEY), timeout=10)
        https = run_cli(
            "rerank", "--target", process.target.replace("127.0.0.1", "localhost"), "--tls-ca", str(ca_path),
            "--tls-cert", str(client_cert), "--tls-key", str(client_key), "--model", "qwen3-rerank",
            "--query", "q", "-d", "a", "-d", "b",
        )  # fmt: skip
        http_port = serving(process)["http_port"]
        context = ssl.create_default_context(cafile=str(ca_path))
        context.load_cert_chain(client_cert, client_key)
        models_request = urllib.request.Request(f"https://localhost:{http_port}/v1/models")
        with urllib.request.urlopen(models_request, context=context, timeout=10) as reply:  # noqa: S310
            models_http = json.loads(reply.read())
        calls = [event for event in process.events() if event.get("event") == "call"]

    assert len(answered.output.results) == 3
    assert [model.name for model in listed.models] == ["qwen3-rerank"]
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Not "the bearer key is not accepted": it sent none; its certificate names nobody.
    assert "client certificate's identity 'stranger' is no caller's" in (unknown.value.details() or "")
    assert len(by_key.output.results) == 3  # a key still works over mTLS
    assert https.returncode == 0, https.stderr
    assert [model["id"] for model in models_http["data"]] == ["qwen3-rerank"]
    callers = Counter(event.get("caller") for event in calls if event.get("method", "").endswith("/Rerank"))
    assert callers == {"indexer": 2, "search": 1, None: 1}


INDEXER = "spiffe://mesh/ns/search/sa/indexer"
ADS = "spiffe://mesh/ns/ads/sa/ads"


def test_a_certificate_whose_identity_is_cut_or_names_two_callers_is_refused_on_both_ports(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """grpc's auth context gives a certificate's URI SANs and CN as C strings, cut at a NUL:
    `indexer\\0.evil` was taken as `indexer`, CN `batch\\0evil` as `batch` (the HTTP port
    refused them). A certificate naming two callers was its first SAN's. Both ports now
    refuse each the same way, and a certificate naming one caller among unknown names is
    still that caller."""
    ca = CertificateAuthority()
    ca_path = ca.write(tmp_path)
    server_cert, server_key = ca.issue_server().write(tmp_path, "server")
    config = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [
            {"name": "indexer", "credentials": [{"tls_identity": INDEXER}], "models": ["qwen3-rerank"]},
            {"name": "batch", "credentials": [{"tls_identity": "batch"}], "models": ["gte-rerank-v2"]},
            {"name": "ads", "credentials": [{"tls_identity": ADS}]},
        ],
        tls_cert=str(server_cert),
        tls_key=str(server_key),
        tls_client_ca=str(ca_path),
    )
    certificates = {
        "uri cut at a NUL": ca.issue_client("x", uris=[INDEXER + "\x00.evil"]),
        "cn cut at a NUL": ca.issue_client("batch\x00evil"),
        "two callers": ca.issue_client("x", uris=[ADS, INDEXER]),
        "one caller, second": ca.issue_client("x", uris=["spiffe://mesh/ns/other/sa/unknown", INDEXER]),
    }

    def over_grpc(target: str, issued: Issued) -> str:
        credentials = grpc.ssl_channel_credentials(ca.cert_pem, issued.key_pem, issued.cert_pem)
        with grpc.secure_channel(target.replace("127.0.0.1", "localhost"), credentials) as opened:
            try:
                listed = rerank_pb2_grpc.RerankServiceStub(opened).ListModels(
                    rerank_pb2.ListModelsRequest(), timeout=10
                )
            except grpc.RpcError as error:
                return f"{error.code().name} {error.details()}"
            return "OK " + ",".join(model.name for model in listed.models)

    def over_http(port: int, issued: Issued, name: str) -> str:
        context = ssl.create_default_context(cafile=str(ca_path))
        context.load_cert_chain(*issued.write(tmp_path, name.replace(" ", "-").replace(",", "")))
        models = urllib.request.Request(f"https://localhost:{port}/v1/models")
        try:
            with urllib.request.urlopen(models, context=context, timeout=10) as reply:  # noqa: S310
                return "OK " + ",".join(model["id"] for model in json.loads(reply.read())["data"])
        except urllib.error.HTTPError as refused:
            return f"{refused.code} {json.loads(refused.read())['message']}"

    with service(config) as process:
        http_port = serving(process)["http_port"]
        answers = {
            name: (over_grpc(process.target, issued), over_http(http_port, issued, name))
            for name, issued in certificates.items()
        }

    cut = "the client certificate's identity ({}) holds a control character: it names no caller"
    two = (
        f"the client certificate names more than one caller ({ADS!r} and {INDEXER!r} are two callers' "
        "identities): a certificate must name one"
    )
    assert answers == {
        "uri cut at a NUL": (f"UNAUTHENTICATED {cut.format('a URI SAN')}", f"401 {cut.format('a URI SAN')}"),
        "cn cut at a NUL": (
            f"UNAUTHENTICATED {cut.format('its subject CN')}",
            f"401 {cut.format('its subject CN')}",
        ),
        "two callers": (f"UNAUTHENTICATED {two}", f"401 {two}"),
        "one caller, second": ("OK qwen3-rerank", "OK qwen3-rerank"),
    }


def test_check_config_refuses_a_bad_callers_section_in_one_line_with_exit_2(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "rerank.yaml", upstream, [caller("search", "SEARCH_KEY"), caller("ads", "SEARCH_KEY")]
    )

    checked = run_cli(
        "check-config", str(config), env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, "SEARCH_KEY": SEARCH_KEY}
    )
    served = run_cli(
        "serve",
        "--config",
        str(config),
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, "SEARCH_KEY": SEARCH_KEY},
    )

    for completed in (checked, served):
        assert completed.returncode == 2
        (line,) = completed.stderr.strip().splitlines()
        assert "callers[1].credentials[0] holds the same key as callers[0].credentials[0]" in line
        assert SEARCH_KEY not in line


def test_a_bad_request_is_invalid_argument_whoever_sends_it_and_costs_the_caller_no_limit(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [caller("search", "SEARCH_KEY", models=["qwen3-rerank"], limits={"requests_per_minute": 2})],
        upstream_documents_per_call=2,
    )
    blank_model = rerank_request(model="")
    # Refused by the engine once split (each of its 20 requests would carry the long query).
    fans_out = rerank_pb2.RerankRequest(
        model="qwen3-rerank", query="q" * 3000, documents=[f"d{index}" for index in range(40)]
    )
    bad_top_n = rerank_request()
    bad_top_n.top_n = 0
    other_model_blank_query = rerank_request(model="gte-rerank-v2")
    other_model_blank_query.query = " "
    with service(config) as process, channel(process.target) as opened:
        stub = rerank_pb2_grpc.RerankServiceStub(opened)

        def rerank(request: rerank_pb2.RerankRequest) -> rerank_pb2.RerankResponse | grpc.RpcError:
            try:
                answer: rerank_pb2.RerankResponse = stub.Rerank(
                    request, metadata=bearer(SEARCH_KEY), timeout=10
                )
                return answer
            except grpc.RpcError as error:
                return error

        refused = [
            rerank(bad)
            for bad in (blank_model, bad_top_n, bad_top_n, other_model_blank_query, fans_out, fans_out)
        ]
        served = [rerank(rerank_request()) for _ in range(2)]  # the caller's whole minute is left

    for error, field in zip(refused, ("model", "top_n", "top_n", "query", "query", "query"), strict=True):
        assert isinstance(error, grpc.RpcError)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert field in field_violations(error)
    assert all(isinstance(answer, rerank_pb2.RerankResponse) for answer in served)
