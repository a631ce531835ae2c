"""The Grafana dashboard (deploy/grafana/rerank-service.json) and the alert rules
(deploy/prometheus/alerts.yaml) name only metrics the service really exports.

Every PromQL expression of every panel, of the dashboard's variables and of every rule is
read, the metric names in it are taken out, and each must be a series name a live
`rerank-service serve --workers 2` exports on /metrics: a real process with two routes
(an upstream that fails with a local tiny model behind it; an unreachable upstream with a
working one behind it), callers with a limit, the score cache, and tracing to an OTLP
endpoint that is down (so spans are dropped and counted), called so that every family the
dashboard shows has a series. The dashboard is
also checked to be importable: a datasource variable that every panel and query uses.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.api.http.app import MODELS_PATH, RERANK_ROUTES
from rerank_service.observability.metrics import Metrics
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.process import ServiceProcess
from tests.support.scrape import scrape
from tests.support.tiny_models import build_tiny_cross_encoder
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "rerank-service.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

SEARCH_KEY = "sk-dashboard-search-0123456789"
BATCH_KEY = "sk-dashboard-batch-0123456789"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# --- reading PromQL ------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
     "group_right", "inf", "nan", "Inf", "NaN"}
)  # fmt: skip
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions, aggregations,
    keywords, numbers, durations and Grafana's $variables left out)."""
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _NAME.findall(text) if name not in _KEYWORDS}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            matched = _LABEL_VALUES.match(text)
            assert matched, f"variable {variable['name']}: not a label_values() query: {text}"
            found.append((f"variable {variable['name']!r}", matched.group(1)))
    return found


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (f"rule {rule.get('alert') or rule.get('record')!r}", str(rule["expr"]))
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _named() -> dict[str, set[str]]:
    """metric name → where it is used (panels, variables, rules)."""
    used: dict[str, set[str]] = {}
    for where, expr in [*dashboard_exprs(_dashboard()), *alert_exprs()]:
        names = metric_names(expr)
        assert names, f"{where}: no metric name read from {expr!r}"
        for name in names:
            used.setdefault(name, set()).add(where)
    return used


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (route, le) (rate(rerank_deployment_latency_seconds_bucket"
        '{job=~"$job", code!="OK", le="+Inf"}[$__rate_interval] offset 5m))) > 2.5e3'
        " and on (job) group_left () rerank_deployment_state{deployment=~'a|b'} == bool 2"
        " or sum without (instance) (increase(rerank_calls_total[1h:5m])) / ${factor}"
    )
    assert metric_names(expr) == {
        "rerank_deployment_latency_seconds_bucket",
        "rerank_deployment_state",
        "rerank_calls_total",
    }
    assert metric_names("up") == {"up"}


def test_the_docs_reranks_per_second_query_selects_every_rerank_however_it_arrives() -> None:
    """OBSERVABILITY.md's query for reranks per second, "however they arrive", selected gRPC
    Rerank and stream items only: the HTTP front door's reranks were left out."""
    text = (ROOT / "docs" / "OBSERVABILITY.md").read_text(encoding="utf-8")
    matched = re.search(
        r"reranks per second, however they arrive.*?"
        r'`sum\(rate\(rerank_calls_total\{method(=~|!~)"([^"]*)"\}\[5m\]\)\)`',
        text,
        flags=re.DOTALL,
    )
    assert matched, "the reranks per second query is not in docs/OBSERVABILITY.md"
    operator, pattern = matched.groups()

    def selected(method: str) -> bool:
        return (re.fullmatch(pattern, method) is not None) == (operator == "=~")  # PromQL anchors it

    metrics = Metrics()  # the method labels as the service names them
    grpc_method = "/rerank.v1.RerankService/{}".format
    reranks = {
        metrics.for_method(grpc_method("Rerank")).name,
        metrics.stream_items.name,
        *(metrics.for_http_route(path).name for path in RERANK_ROUTES),
    }
    not_reranks = {
        metrics.for_method(grpc_method("RerankStream")).name,  # the whole stream: its items count
        metrics.for_method(grpc_method("ListModels")).name,
        metrics.for_http_route(MODELS_PATH).name,
    }
    assert len(reranks) == 2 + len(RERANK_ROUTES)
    assert {method for method in reranks if not selected(method)} == set()
    assert {method for method in not_reranks if selected(method)} == set()


# --- the dashboard is importable ------------------------------------------------------


def test_the_dashboard_is_importable_with_the_datasource_as_a_variable() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "rerank-service"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert "__inputs" not in dashboard  # nothing asked at import: the variable picks the source
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    # No data source is named anywhere but through the variable.
    text = DASHBOARD.read_text()
    assert set(re.findall(r'"uid": "([^"]*)"', text)) <= {"${datasource}", "-- Grafana --", "rerank-service"}


def test_the_dashboard_has_the_panels_an_operator_opens_first() -> None:
    rows = {panel["title"] for panel in _dashboard()["panels"] if panel["type"] == "row"}
    assert rows >= {
        "Calls", "Latency", "Routes and deployments", "Admission", "Callers", "Score cache",
        "Local model", "Processes", "Tracing",
    }  # fmt: skip
    used = _named()
    for name in (
        "rerank_calls_total", "rerank_caller_calls_total", "rerank_call_latency_seconds_bucket",
        "rerank_deployment_latency_seconds_bucket", "rerank_deployment_state",
        "rerank_deployment_ejections_total", "rerank_route_fallbacks_total",
        "rerank_route_retry_budget_exhausted_total", "rerank_calls_in_flight",
        "rerank_caller_limited_total", "rerank_cache_pairs_total", "rerank_local_queue_seconds_bucket",
        "rerank_local_batch_size_bucket", "process_cpu_seconds_total", "rerank_worker_cpu_seconds_total",
        "process_resident_memory_bytes", "rerank_worker_resident_memory_bytes",
        "rerank_trace_spans_exported_total", "rerank_trace_spans_dropped_total",
    ):  # fmt: skip
        assert any(where.startswith("panel") for where in used.get(name, ())), name


# --- every name against a live server ---------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, int]]:
    directory = tmp_path_factory.mktemp("dashboard")
    model = build_tiny_cross_encoder(directory / "tiny-cross")
    with (
        FakeUpstream(api_key=UPSTREAM_KEY, models=("qwen3-rerank",)) as flaky,
        FakeUpstream(api_key=UPSTREAM_KEY, models=("gte-rerank-v2",)) as steady,
    ):
        flaky.always(Fault(status=503))
        fast_retries = {"max_attempts": 3, "retry_backoff": 0.001, "retry_max_backoff": 0.001}
        config = {
            "device": "cpu",
            "retry_budget": 0,  # the floor alone (10 in 10 s): a burst of fallbacks spends it
            "models": [
                {
                    "name": "qwen3-rerank",
                    "deployments": [
                        # answers 503 and is never ejected for it: every call retries, falls back
                        {"format": "dashscope", "url": flaky.url, "name": "flaky", "breaker_failures": 0,
                         **fast_retries},
                        {"format": "local", "source": str(model), "name": "tiny", "priority": 1},
                    ],
                },
                {
                    "name": "gte-rerank-v2",
                    "deployments": [
                        # unreachable: down at its first refused connection
                        {"format": "dashscope", "url": f"http://127.0.0.1:{_closed_port()}", "name": "gone",
                         "breaker_failures": 1, "max_attempts": 1},
                        {"format": "dashscope", "url": steady.url, "name": "steady", "priority": 1},
                    ],
                },
            ],
            "callers": [
                {"name": "search", "credentials": [{"key_env": "DASHBOARD_SEARCH_KEY"}]},
                {"name": "batch", "credentials": [{"key_env": "DASHBOARD_BATCH_KEY"}],
                 "limits": {"requests_per_minute": 1}},
            ],
        }  # fmt: skip
        path = directory / "rerank.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        env = {
            "RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "DASHBOARD_SEARCH_KEY": SEARCH_KEY,
            "DASHBOARD_BATCH_KEY": BATCH_KEY,
            "HF_HUB_OFFLINE": "1",
            # A collector that is down: spans are dropped, and counted.
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_SERVICE_NAME": "rerank-dashboard-test",
        }
        flags = ["--config", str(path), "--workers", "2", "--metrics-port", "0"]
        with ServiceProcess(flags, env=env, score_cache=True) as service:
            serving = next(event for event in service.events() if event.get("event") == "serving")
            _exercise(service)
            yield service, int(serving["metrics_port"])


def _bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def _exercise(service: ServiceProcess) -> None:
    """Calls that give every family a series: fallbacks until the retry budget is spent, a
    deployment down, a cache hit, a caller refused for its limit."""

    def count(event: str) -> int:
        return sum(1 for line in service.events() if line.get("event") == event)

    # Each worker loads the tiny model after it starts serving (the route has the flaky
    # upstream meanwhile): the fallbacks below need it loaded in whichever worker answers.
    wait_until(
        lambda: count("worker ready") >= 2 and count("model loaded") >= 2,
        timeout=120,
        interval=0.05,
        what="both workers ready, each with the tiny model loaded",
    )
    # One channel, one connection: every call reaches the same worker, so one budget is spent.
    with grpc.insecure_channel(service.target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)

        def rerank(model: str, key: str) -> grpc.StatusCode:
            request = rerank_pb2.RerankRequest(
                model=model, query="red apple", documents=["a red apple", "a blue car", "apple pie"]
            )
            try:
                stub.Rerank(request, metadata=_bearer(key), timeout=30)
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        # flaky: 2 retries and a fallback a call, past the budget's 10 within a few calls.
        codes = [rerank("qwen3-rerank", SEARCH_KEY) for _ in range(8)]
        assert codes[0] == grpc.StatusCode.OK  # the tiny local model answered the first
        assert grpc.StatusCode.UNAVAILABLE in codes, codes  # a fallback the budget refused
        # gone goes down, steady answers; the same call again is a cache hit.
        assert rerank("gte-rerank-v2", SEARCH_KEY) == grpc.StatusCode.OK
        assert rerank("gte-rerank-v2", SEARCH_KEY) == grpc.StatusCode.OK
        # batch: one call a minute.
        assert rerank("gte-rerank-v2", BATCH_KEY) == grpc.StatusCode.OK
        assert rerank("gte-rerank-v2", BATCH_KEY) == grpc.StatusCode.RESOURCE_EXHAUSTED


def _exported(port: int) -> set[str]:
    return {name for name, _ in scrape(port)}


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(
    live_metrics: tuple[ServiceProcess, int],
) -> None:
    _, port = live_metrics
    used = _named()
    wanted = set(used)
    exported: set[str] = set()

    def all_exported() -> bool:
        nonlocal exported
        exported = _exported(port)
        return wanted <= exported

    # Bounds a broken server; a span is dropped once the exporter gives up on the endpoint.
    wait_until(all_exported, timeout=60, interval=0.1)
    missing = {name: sorted(used[name]) for name in sorted(wanted - exported)}
    assert not missing, f"named in the dashboard or the alerts, not exported by the service: {missing}"
    assert len(wanted) >= 30  # the check is not vacuous: the dashboard names most families


def test_the_dashboards_job_and_instance_lists_name_a_service_that_has_served_no_call() -> None:
    """Its variables list a metric exported from start, so a fresh replica is on the list."""
    variables = [expr for where, expr in dashboard_exprs(_dashboard()) if where.startswith("variable")]
    with FakeUpstream(api_key=UPSTREAM_KEY) as upstream:
        flags = ["--backend", "upstream", "--upstream-url", upstream.url, "--metrics-port", "0"]
        with ServiceProcess(flags, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
            serving = next(event for event in service.events() if event.get("event") == "serving")
            exported = _exported(int(serving["metrics_port"]))

    assert len(variables) == 2
    assert set(variables) <= exported, set(variables) - exported


def test_a_name_the_service_does_not_export_is_caught(live_metrics: tuple[ServiceProcess, int]) -> None:
    _, port = live_metrics
    exported = _exported(port)
    expr = dict(dashboard_exprs(_dashboard()))["panel 'Calls per second by method and code'"]
    assert metric_names(expr) <= exported
    misspelt = expr.replace("rerank_calls_total", "rerank_call_total")
    assert metric_names(misspelt) - exported == {"rerank_call_total"}
