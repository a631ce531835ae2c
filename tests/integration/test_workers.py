"""`serve --workers 2`: a supervisor and two real worker processes on one port.

Real processes (ServiceProcess) with `--backend upstream` in front of a FakeUpstream.
Calls go over distinct connections (a local subchannel pool per channel), so the
kernel's SO_REUSEPORT spreads them over the workers; each worker's log lines name it
(`worker`, `pid`), and a call's request id finds the worker that answered it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import CALLER_KEY, UPSTREAM_KEY
from tests.support.process import ServiceProcess, run_cli
from tests.support.redis_server import RedisServer, free_port
from tests.support.rpc import request
from tests.support.scrape import scrape, value
from tests.support.waiting import wait_until

ENV = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}
KEY_ENV = "WORKERS_TEST_UPSTREAM_KEY"  # a deployment's own key (api_key_env)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


def _args(upstream: FakeUpstream, *more: str) -> list[str]:
    return ["--backend", "upstream", "--upstream-url", upstream.url, "--workers", "2", *more]


def _channel(target: str) -> grpc.Channel:
    # Its own connection: channels would otherwise share one subchannel (one worker).
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _eventually(check: Callable[[], bool], timeout: float = 15.0, what: str = "the condition") -> None:
    wait_until(check, timeout, interval=0.05, what=what)


def _all_serving(service: ServiceProcess, workers: int = 2) -> bool:
    return len({e["worker"] for e in service.events() if e.get("event") == "worker ready"}) >= workers


def _worker_of_calls(service: ServiceProcess) -> dict[str, int]:
    """A response's request id (the upstream's, passed through) → the worker whose
    access-log line says it answered the call."""
    return {
        upstream_id: e["worker"]
        for e in service.events()
        if e.get("event") == "call" and "worker" in e
        for upstream_id in e.get("upstream_request_ids", ())
    }


def _pids(service: ServiceProcess) -> dict[int, int]:
    """worker → its current pid (the latest `worker started`)."""
    return {e["worker"]: e["pid"] for e in service.events() if e.get("event") == "worker started"}


def test_two_workers_answer_on_one_port_metrics_sum_both_and_sighup_reaches_each(
    upstream: FakeUpstream,
) -> None:
    with ServiceProcess(_args(upstream, "--http-port", "0", "--metrics-port", "0"), env=ENV) as service:
        serving = [e for e in service.events() if e.get("event") == "serving"]
        assert len(serving) == 1  # the supervisor's, not one per worker
        assert serving[0]["workers"] == 2
        assert serving[0]["port"] == service.port
        _eventually(lambda: _all_serving(service))
        # Port 0 was chosen once: both workers listen on the same gRPC and HTTP ports.
        listening = {e["port"] for e in service.events() if e.get("event") == "listening"}
        http = {e["port"] for e in service.events() if e.get("event") == "http listening"}
        assert listening == {service.port}
        assert http == {serving[0]["http_port"]}

        answered: dict[str, Any] = {}
        for _ in range(24):
            with _channel(service.target) as channel:
                response = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=10)
                answered[response.request_id] = response
        body = json.dumps({"model": "qwen3-rerank", "query": "q", "documents": ["a", "b"]}).encode()
        http_call = urllib.request.Request(
            f"http://127.0.0.1:{serving[0]['http_port']}/v1/rerank",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(http_call, timeout=10) as reply:  # noqa: S310 - http:// only
            assert reply.status == 200

        _eventually(lambda: set(answered) <= set(_worker_of_calls(service)))
        by_worker = Counter(_worker_of_calls(service)[rid] for rid in answered)
        assert set(by_worker) == {0, 1}, by_worker  # 24 connections: both workers took some

        samples = scrape(serving[0]["metrics_port"])
        assert value(samples, "rerank_calls_total", method="Rerank", code="OK") == 24
        assert value(samples, "rerank_calls_total", method="HTTP /v1/rerank", code="OK") == 1
        assert value(samples, "rerank_calls_in_flight", method="Rerank") == 0

        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        reloads = ("reloaded", "reload refused")
        _eventually(
            lambda: {e.get("worker") for e in service.events() if e.get("event") in reloads} == {0, 1}
        )
        assert service.terminate() == 0
    # Nothing changed: the ports each worker serves (the supervisor's: chosen once, and no
    # metrics port of its own) are not settings a reload left as started. (Read once the
    # output is all in: each worker logs it after its `reloaded`.)
    assert [e for e in service.events() if e.get("event") == "reload left settings as started"] == []


def _load(target: str, stop: threading.Event, outcomes: list[tuple[float, str]]) -> None:
    with _channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        while not stop.is_set():
            try:
                # A call made while its connection is being re-made waits for it (as a
                # client that retries would) rather than failing fast: what fails is only
                # what was in flight on the dead worker.
                stub.Rerank(request(), timeout=10, wait_for_ready=True)
                outcomes.append((time.monotonic(), "OK"))
            except grpc.RpcError as exc:
                outcomes.append((time.monotonic(), exc.code().name))


def test_a_worker_killed_under_load_is_restarted_and_its_counts_survive() -> None:
    clients = 8
    with (
        FakeUpstream(api_key=UPSTREAM_KEY, latency=0.05) as upstream,
        ServiceProcess(_args(upstream, "--metrics-port", "0"), env=ENV) as service,
    ):
        _eventually(lambda: _all_serving(service))
        metrics_port = next(e for e in service.events() if e.get("event") == "serving")["metrics_port"]
        stop = threading.Event()
        outcomes: list[tuple[float, str]] = []
        threads = [
            threading.Thread(target=_load, args=(service.target, stop, outcomes)) for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        _eventually(lambda: len(outcomes) >= 2 * clients, what="the load's calls answered")
        cpu_before = value(scrape(metrics_port), "process_cpu_seconds_total")
        victim = _pids(service)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _eventually(lambda: _pids(service)[0] != victim)  # restarted, as a new process
        _eventually(
            lambda: any(
                e.get("event") == "worker ready" and e["worker"] == 0 and e["restarts"] == 1
                for e in service.events()
            )
        )
        # The load goes on until the calls answered after the restart are the ones counted below.
        _eventually(
            lambda: sum(1 for at, code in outcomes if at > killed_at + 0.5 and code == "OK") > 10,
            what="calls answered after the restart",
        )
        stop.set()
        for thread in threads:
            thread.join(timeout=15)

        died = [e for e in service.events() if e.get("event") == "worker died"]
        assert [(e["worker"], e["pid"], e["signal"]) for e in died] == [(0, victim, "SIGKILL")]
        assert died[0]["restart_in_s"] > 0
        codes = Counter(code for _, code in outcomes)
        failed = codes.total() - codes["OK"]
        # Only calls in flight on the dead worker fail: at most one per client.
        assert failed <= clients, codes
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert sum(1 for at, code in outcomes if at > killed_at + 0.5 and code == "OK") > 10
        # The dead worker's counts stay in the sum; nothing is counted twice. A call it
        # counted as answered just before SIGKILL may not have reached its client: at
        # most the failed ones are counted on top.
        samples = scrape(metrics_port)
        counted = value(samples, "rerank_calls_total", method="Rerank", code="OK")
        assert codes["OK"] <= counted <= codes["OK"] + failed, (counted, codes)
        assert value(samples, "rerank_calls_in_flight", method="Rerank") == 0
        # The process tree's CPU keeps the dead worker's (the supervisor reaped it) and
        # adds its successor's; each worker slot shows its restarts and its memory.
        assert value(samples, "process_cpu_seconds_total") > cpu_before > 0
        assert value(samples, "rerank_worker_restarts_total", worker="0") == 1
        assert value(samples, "rerank_worker_restarts_total", worker="1") == 0
        for worker in ("0", "1"):
            assert value(samples, "rerank_worker_resident_memory_bytes", worker=worker) > 10 << 20
        assert service.terminate() == 0, service.output[-5000:]


def test_sigterm_with_calls_in_flight_on_both_workers_lets_them_finish_then_exits_zero() -> None:
    calls = 16
    with (
        FakeUpstream(api_key=UPSTREAM_KEY, latency=1.5) as upstream,
        ServiceProcess(_args(upstream, "--shutdown-grace", "20"), env=ENV) as service,
    ):
        _eventually(lambda: _all_serving(service))
        results: list[str] = []

        def call() -> None:
            with _channel(service.target) as channel:
                try:
                    response = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=15)
                    results.append(response.request_id)
                except grpc.RpcError as exc:
                    results.append(f"failed: {exc.code().name}")

        threads = [threading.Thread(target=call) for _ in range(calls)]
        for thread in threads:
            thread.start()
        _eventually(lambda: upstream.in_flight == calls)
        code = service.terminate()
        for thread in threads:
            thread.join(timeout=15)

        assert not [r for r in results if r.startswith("failed")], results
        assert len(results) == calls
        workers = _worker_of_calls(service)
        assert {workers[rid] for rid in results} == {0, 1}  # in flight on both
        assert code == 0
        stopped = [e for e in service.events() if e.get("event") == "worker stopped"]
        assert sorted((e["worker"], e["exit_code"]) for e in stopped) == [(0, 0), (1, 0)]


def test_workers_with_the_local_backend_on_cuda_are_refused_with_one_line() -> None:
    result = run_cli("serve", "--workers", "2", "--device", "cuda", "--port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "configuration error" in lines[0]
    assert "workers 2" in lines[0]
    assert "cuda" in lines[0]
    assert "--workers 1" in lines[0]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_metrics_directory_of_a_supervisor_killed_with_sigkill_is_removed_at_the_next_start(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = {**ENV, "TMPDIR": str(tmp_path)}  # where the supervisor makes its directory
    with ServiceProcess(_args(upstream), env=env) as first:
        _eventually(lambda: _all_serving(first))
        [left] = tmp_path.glob("rerank-metrics-*")
        first.terminate(signal.SIGKILL)  # no clean-up runs
        workers = _pids(first).values()
        _eventually(lambda: all(_gone(pid) for pid in workers))  # they drain and exit with it
    assert left.is_dir()

    with ServiceProcess(_args(upstream), env=env) as second:
        [removed] = [e for e in second.events() if e.get("event") == "stale metrics directory removed"]
        [own] = tmp_path.glob("rerank-metrics-*")
        assert second.terminate() == 0

    assert removed["path"] == str(left)
    assert not left.exists()
    assert own.name.startswith(f"rerank-metrics-{second.process.pid}-")  # type: ignore[union-attr]
    assert list(tmp_path.glob("rerank-metrics-*")) == []  # the clean stop removed its own


def _route_file(path: Path, upstream: FakeUpstream, route: str, **deployment_fields: str) -> None:
    deployment = {"format": "dashscope", "url": upstream.url, "model": "qwen3-rerank", **deployment_fields}
    path.write_text(json.dumps({"models": [{"name": route, "deployments": [deployment]}]}), encoding="utf-8")


def _killed_and_restarted(service: ServiceProcess, worker: int, restarts: int) -> None:
    """SIGKILL `worker`, then wait until it is ready again, its `restarts`th time."""
    os.kill(_pids(service)[worker], signal.SIGKILL)
    _eventually(
        lambda: any(
            e.get("event") == "worker ready" and e["worker"] == worker and e["restarts"] == restarts
            for e in service.events()
        ),
        what=f"worker {worker} restarted",
    )


def _served_routes(service: ServiceProcess, connections: int = 16) -> set[tuple[str, ...]]:
    """The routes each of `connections` new connections is served (several workers answer)."""
    served = set()
    for _ in range(connections):
        with _channel(service.target) as channel:
            listed = rerank_pb2_grpc.RerankServiceStub(channel).ListModels(
                rerank_pb2.ListModelsRequest(), timeout=10
            )
            served.add(tuple(model.name for model in listed.models))
    return served


def _workers_ready(service: ServiceProcess, restarts: int) -> bool:
    return {
        e["worker"]
        for e in service.events()
        if e.get("event") == "worker ready" and e["restarts"] == restarts
    } == {0, 1}


def test_workers_serve_the_file_as_the_supervisor_read_it_until_a_sighup_it_accepts(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "rerank.yaml"
    _route_file(config, upstream, "first")
    args = ["--workers", "2", "--config", str(config)]
    with ServiceProcess(args, env=ENV) as service:
        _eventually(lambda: _all_serving(service))
        assert _served_routes(service) == {("first",)}

        # Edited, no SIGHUP yet; then both workers die and are restarted: they serve what
        # they served before, not the edit (each would have read the file on its own).
        _route_file(config, upstream, "edited")
        for pid in _pids(service).values():
            os.kill(pid, signal.SIGKILL)
        _eventually(lambda: _workers_ready(service, restarts=1), what="both workers restarted")
        assert _served_routes(service) == {("first",)}

        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: {e.get("worker") for e in service.events() if e.get("event") == "reloaded"} == {0, 1}
        )
        assert _served_routes(service) == {("edited",)}

        # A file a reload refuses (its models section gone) is refused by the supervisor
        # once; the workers, and one restarted after it, serve the last file it accepted.
        config.write_text("log_level: info\n", encoding="utf-8")
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: any(e.get("event") == "reload refused" and "worker" not in e for e in service.events()),
            what="the supervisor's refusal",
        )
        _killed_and_restarted(service, worker=0, restarts=2)
        assert _served_routes(service) == {("edited",)}
        refused = [e for e in service.events() if e.get("event") == "reload refused"]
        assert [e.get("worker") for e in refused] == [None]  # the workers were never asked
        assert "has no models: section any more" in refused[0]["error"]
        assert str(config) in refused[0]["error"]

        # A file that loads but whose routes cannot be built (a CA file that is no PEM) is
        # refused by the supervisor too: made the copy, every restarted worker exited 2.
        not_pem = tmp_path / "ca.pem"
        not_pem.write_text("not a certificate\n", encoding="utf-8")
        _route_file(config, upstream, "unbuilt", ca_file=str(not_pem))
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: sum(e.get("event") == "reload refused" for e in service.events()) == 2,
            what="the supervisor's second refusal",
        )
        _killed_and_restarted(service, worker=1, restarts=2)
        assert _served_routes(service) == {("edited",)}
        refused = [e for e in service.events() if e.get("event") == "reload refused"]
        assert [e.get("worker") for e in refused] == [None, None]
        assert "ca_file" in refused[1]["error"]
        assert service.terminate() == 0, service.output[-5000:]


def _keyed_file(path: Path, upstream: FakeUpstream, keys: Path | None, *, keyless: bool = False) -> None:
    """One route, `qwen3-rerank`: its deployment keyed by KEY_ENV (or `keyless`), and the
    caller keys of `keys` (`api_keys_file`), if any."""
    deployment = {"format": "dashscope", "url": upstream.url, "model": "qwen3-rerank"}
    if not keyless:
        deployment["api_key_env"] = KEY_ENV
    document: dict[str, Any] = {"models": [{"name": "qwen3-rerank", "deployments": [deployment]}]}
    if keys is not None:
        document["api_keys_file"] = str(keys)
    path.write_text(json.dumps(document), encoding="utf-8")


def _codes(service: ServiceProcess, key: str | None, connections: int = 16) -> Counter[str]:
    """The codes of one call on each of `connections` new connections (several workers answer)."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    codes: Counter[str] = Counter()
    for _ in range(connections):
        with _channel(service.target) as channel:
            try:
                rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), metadata=metadata, timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    return codes


def test_a_key_file_others_may_read_is_warned_of_once_at_start(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The supervisor reads the file again to copy it for its workers: its key files were
    warned of twice (and once more by each worker before they were handed the settings)."""
    keys = tmp_path / "keys"
    keys.write_text(f"{CALLER_KEY}\n", encoding="utf-8")
    keys.chmod(0o644)
    config = tmp_path / "rerank.yaml"
    _keyed_file(config, upstream, keys)
    with ServiceProcess(["--workers", "2", "--config", str(config)], env={KEY_ENV: UPSTREAM_KEY}) as service:
        _eventually(lambda: _all_serving(service))
        assert _codes(service, key=CALLER_KEY) == {"OK": 16}  # the workers logged what they would
        warned = [e for e in service.events() if e.get("event") == "key file readable by others"]
        assert [e.get("path") for e in warned] == [str(keys)]
        assert service.terminate() == 0, service.output[-5000:]


def test_a_worker_restarted_after_a_reload_serves_the_caller_keys_as_started(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A reload leaves the caller keys as started, in every worker: one restarted after it
    loaded them from the file's copy, and served calls with no key (the file dropped its
    api_keys_file), or passed callers' tokens upstream (it also dropped a deployment's key:
    a file every worker refuses, made the copy all the same)."""
    keys = tmp_path / "keys"
    keys.write_text(f"{CALLER_KEY}\n", encoding="utf-8")
    keys.chmod(0o600)
    config = tmp_path / "rerank.yaml"
    _keyed_file(config, upstream, keys)
    with ServiceProcess(["--workers", "2", "--config", str(config)], env={KEY_ENV: UPSTREAM_KEY}) as service:
        _eventually(lambda: _all_serving(service))

        _keyed_file(config, upstream, keys=None)  # the caller keys gone from the file
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: {e.get("worker") for e in service.events() if e.get("event") == "reloaded"} == {0, 1},
            what="both workers reloaded",
        )
        _killed_and_restarted(service, worker=0, restarts=1)
        assert _codes(service, key=None) == {"UNAUTHENTICATED": 16}
        assert _codes(service, key=CALLER_KEY) == {"OK": 16}

        # No caller keys and a deployment with no key: every worker would refuse it (their
        # keys stay as started), so the supervisor does, and a restarted worker serves on.
        _keyed_file(config, upstream, keys=None, keyless=True)
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: any(e.get("event") == "reload refused" and "worker" not in e for e in service.events()),
            what="the supervisor's refusal",
        )
        _killed_and_restarted(service, worker=1, restarts=1)
        seen = len(upstream.requests)
        assert _codes(service, key=None) == {"UNAUTHENTICATED": 16}
        assert _codes(service, key=CALLER_KEY) == {"OK": 16}
        sent = {r.headers.get("authorization") for r in upstream.requests[seen:]}
        assert sent == {f"Bearer {UPSTREAM_KEY}"}  # the service's key, never a caller's
        refused = [e for e in service.events() if e.get("event") == "reload refused"]
        assert [e.get("worker") for e in refused] == [None]  # the workers were never asked
        assert "has no key while RERANK_API_KEYS is set" in refused[0]["error"]
        listening = [e["auth"] for e in service.events() if e.get("event") == "listening"]
        assert listening == ["api-keys"] * 4  # two started, two restarted
        assert service.terminate() == 0, service.output[-5000:]


def test_a_sighup_while_a_worker_starts_again_is_sent_to_it_once_it_serves(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "rerank.yaml"
    _route_file(config, upstream, "first")
    with ServiceProcess(["--workers", "2", "--config", str(config)], env=ENV) as service:
        _eventually(lambda: _all_serving(service))
        victim = _pids(service)[0]
        os.kill(victim, signal.SIGKILL)
        _eventually(lambda: _pids(service)[0] != victim, what="worker 0 started again")
        # Worker 0 is importing, loading its settings: a SIGHUP now must not kill it.
        _route_file(config, upstream, "second")
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: {e.get("worker") for e in service.events() if e.get("event") == "reloaded"} == {0, 1},
            what="both workers reloaded",
        )
        assert _served_routes(service) == {("second",)}
        died = [e for e in service.events() if e.get("event") == "worker died"]
        assert [(e["worker"], e.get("signal")) for e in died] == [(0, "SIGKILL")]
        assert service.terminate() == 0, service.output[-5000:]


def test_sigint_while_a_worker_starts_again_drains_and_exits_zero(upstream: FakeUpstream) -> None:
    """Ctrl-C reaches every process of the group; a worker still starting ends by the
    signal (it held no calls), not with a KeyboardInterrupt traceback and exit code 1."""
    with ServiceProcess(_args(upstream), env=ENV) as service:
        _eventually(lambda: _all_serving(service))
        victim = _pids(service)[0]
        os.kill(victim, signal.SIGKILL)
        _eventually(lambda: _pids(service)[0] != victim, what="worker 0 started again")
        assert service.process is not None
        service.process.send_signal(signal.SIGINT)
        code = service.process.wait(timeout=60)

    assert code == 0, service.output[-5000:]
    assert "KeyboardInterrupt" not in service.output


@pytest.mark.parametrize("second", [["--workers", "2"], []], ids=["workers", "one-process"])
def test_a_port_another_service_serves_stops_start_up_rather_than_being_shared(
    upstream: FakeUpstream, second: list[str]
) -> None:
    """SO_REUSEPORT would let a second service join a port a first one serves and split its
    connections silently; neither a supervisor nor one process may join another's port."""
    for first in (["--workers", "2"], []):
        with ServiceProcess(_args(upstream)[:4] + first, env=ENV) as service:
            result = run_cli("serve", *_args(upstream)[:4], *second, "--port", str(service.port), env=ENV)
            assert result.returncode == 1, (first, second, result.stderr[-2000:])
            # One line naming the setting, whichever started second.
            assert f"cannot start: port {service.port}: cannot listen on" in result.stderr
            assert "Address already in use" in result.stderr
            assert "Traceback" not in result.stderr
            assert service.terminate() == 0


def _tuned_file(path: Path, upstream: FakeUpstream, route: str, slots: int, log_level: str) -> None:
    """One route, and two settings a reload leaves as started: an admission limit, the log level."""
    deployment = {"format": "dashscope", "url": upstream.url, "model": "qwen3-rerank"}
    document = {
        "models": [{"name": route, "deployments": [deployment]}],
        "max_concurrent_requests": slots,
        "log_level": log_level,
    }
    path.write_text(json.dumps(document), encoding="utf-8")


def test_a_worker_restarted_after_a_reload_serves_its_routes_and_the_settings_left_as_started(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A reload applies the routes and callers; a setting that takes a restart stays as
    started in the running workers, and in one restarted after the reload too: not the
    copy's (two workers on one port with different limits, or TLS beside plaintext)."""
    config = tmp_path / "rerank.yaml"
    _tuned_file(config, upstream, "first", slots=50, log_level="info")
    args = ["--workers", "2", "--config", str(config), "--metrics-port", "0"]
    with ServiceProcess(args, env=ENV) as service:
        _eventually(lambda: _all_serving(service))
        metrics_port = next(e for e in service.events() if e.get("event") == "serving")["metrics_port"]

        _tuned_file(config, upstream, "second", slots=5, log_level="warning")
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: {e.get("worker") for e in service.events() if e.get("event") == "reloaded"} == {0, 1},
            what="both workers reloaded",
        )
        kept = [
            e["settings"] for e in service.events() if e.get("event") == "reload left settings as started"
        ]
        assert [sorted(k) for k in kept] == [["admission.max_concurrent_requests", "logging.level"]] * 2

        _killed_and_restarted(service, worker=0, restarts=1)
        assert _served_routes(service) == {("second",)}  # the reload's routes
        restarted = _pids(service)[0]
        # Its log level as started (info): its own `listening` line, which warning would drop.
        assert any(e.get("event") == "listening" and e.get("pid") == restarted for e in service.events())
        # Its admission limit as started: 50 slots in each worker, not 5 in the restarted one.
        _eventually(
            lambda: value(scrape(metrics_port), "rerank_admission_slots_max") == 100,
            what="both workers' slots as started",
        )
        assert service.terminate() == 0, service.output[-5000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_stop_signal_to_the_whole_process_group_drains_and_exits_zero(
    upstream: FakeUpstream, signum: int
) -> None:
    """Ctrl-C (SIGINT) and systemd's KillMode=control-group (SIGTERM) reach the supervisor
    and every worker at once; the supervisor forwards its own, which may reach a worker
    that has drained and is exiting: still a clean stop, exit code 0. A race: a few rounds."""
    for _ in range(3):
        with ServiceProcess(_args(upstream), env=ENV) as service:
            _eventually(lambda: _all_serving(service))
            assert service.process is not None
            # As the kernel signals a process group: every member, the supervisor last.
            for pid in (*_pids(service).values(), service.process.pid):
                os.kill(pid, signum)
            code = service.process.wait(timeout=60)
            service.read_to_end()

        assert code == 0, service.output[-5000:]
        stopped = [e for e in service.events() if e.get("event") == "worker stopped"]
        assert sorted((e["worker"], e["level"]) for e in stopped) == [(0, "info"), (1, "info")], stopped
        assert "KeyboardInterrupt" not in service.output


def _keys_file(path: Path, upstream: FakeUpstream, caller_keys: Path, deployment_key: Path) -> None:
    """One route, its deployment keyed by `deployment_key` (api_key_file), and one caller
    whose keys are in `caller_keys` (key_file): files a mounted Secret updates in place."""
    deployment = {
        "format": "dashscope",
        "url": upstream.url,
        "model": "qwen3-rerank",
        "api_key_file": str(deployment_key),
    }
    document = {
        "models": [{"name": "qwen3-rerank", "deployments": [deployment]}],
        "callers": [{"name": "search", "credentials": [{"key_file": str(caller_keys)}]}],
    }
    path.write_text(json.dumps(document), encoding="utf-8")


def _secret(path: Path, key: str) -> Path:
    path.write_text(f"{key}\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def test_a_worker_restarted_after_its_key_files_changed_serves_the_keys_its_siblings_serve(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The key files a config names are read by the supervisor, at start and on each SIGHUP
    it accepts: a worker restarted in between is handed those keys, and does not read the
    files (rotated, or moved away) as they are at its restart."""
    old, new = "sk-old-caller-key-0123456789", "sk-new-caller-key-0123456789"
    caller_keys = _secret(tmp_path / "search.keys", old)
    deployment_key = _secret(tmp_path / "upstream.key", UPSTREAM_KEY)
    config = tmp_path / "rerank.yaml"
    _keys_file(config, upstream, caller_keys, deployment_key)
    with ServiceProcess(["--workers", "2", "--config", str(config)]) as service:
        _eventually(lambda: _all_serving(service))

        # Rotated in place, no SIGHUP: a worker restarted now still takes the old caller key
        # (not the new one), and sends the upstream the service's key (not the file's new one).
        _secret(caller_keys, new)
        _secret(deployment_key, "sk-upstream-key-that-is-refused-01")
        _killed_and_restarted(service, worker=1, restarts=1)
        assert _codes(service, key=old) == {"OK": 16}
        assert _codes(service, key=new) == {"UNAUTHENTICATED": 16}

        # Moved away: a worker restarted now starts all the same (it read no file), rather
        # than exit 2 at each restart; a SIGHUP is refused by the supervisor alone.
        caller_keys.rename(tmp_path / "search.keys.moved")
        _killed_and_restarted(service, worker=0, restarts=1)
        assert _codes(service, key=old) == {"OK": 16}
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: any(e.get("event") == "reload refused" for e in service.events()),
            what="the supervisor's refusal",
        )
        refused = [e for e in service.events() if e.get("event") == "reload refused"]
        assert [e.get("worker") for e in refused] == [None]
        assert "key_file" in refused[0]["error"]

        # Back, and a SIGHUP: every worker serves the keys the supervisor read.
        _secret(caller_keys, new)
        _secret(deployment_key, UPSTREAM_KEY)
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _eventually(
            lambda: {e.get("worker") for e in service.events() if e.get("event") == "reloaded"} == {0, 1},
            what="both workers reloaded",
        )
        assert _codes(service, key=new) == {"OK": 16}
        assert _codes(service, key=old) == {"UNAUTHENTICATED": 16}
        died = [e for e in service.events() if e.get("event") == "worker died"]
        assert [e.get("signal") for e in died] == ["SIGKILL", "SIGKILL"]  # none exited 2
        assert service.terminate() == 0, service.output[-5000:]


def _channel_to_each_worker(service: ServiceProcess, workers: int = 2) -> dict[int, grpc.Channel]:
    """worker → a channel (one connection) the kernel gave to it: new ones are made until
    each worker has answered one, the others closed."""
    channels: dict[int, grpc.Channel] = {}
    for attempt in range(200):
        if len(channels) == workers:
            return channels
        channel = _channel(service.target)
        # A query of its own: never a cached answer, so the upstream's request id says who answered.
        answer = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(
            request(query=f"which worker {attempt}"), timeout=10
        )
        answered_by = answer.request_id
        _eventually(lambda: answered_by in _worker_of_calls(service), what="the call's log line")  # noqa: B023 - used at once
        worker = _worker_of_calls(service)[answered_by]
        if worker in channels:
            channel.close()
        else:
            channels[worker] = channel
    raise AssertionError(f"only workers {sorted(channels)} took a connection")


def _outcome(channel: grpc.Channel, query: str) -> str:
    """OK, or the gRPC code and details of one call on `channel`."""
    try:
        rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(query=query), timeout=10)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def _refused_at_once(channel: grpc.Channel) -> Callable[[], bool]:
    """A check that calls on `channel` until one is refused for its deployment being down."""
    calls = iter(range(10_000))
    return lambda: "not calling it for another" in _outcome(channel, f"down {next(calls)}")


def _answered(channel: grpc.Channel) -> Callable[[], bool]:
    calls = iter(range(10_000))
    return lambda: _outcome(channel, f"back {next(calls)}") == "OK"


def _gauge(port: int, name: str) -> float | None:
    """The one sample of the gauge `name` (whatever its labels), None while there is none."""
    found = [sample for (metric, _), sample in scrape(port).items() if metric == name]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_the_deployment_state_is_what_the_latest_calls_of_any_worker_found(upstream: FakeUpstream) -> None:
    """A worker that takes no call keeps what its last calls found (a deployment down): its
    siblings' later calls, which find the deployment back, are what /metrics says, not the
    worst state of any worker (RerankRouteDown would fire for a route that answers)."""
    breaker = ["--upstream-max-attempts", "1", "--upstream-breaker-failures", "2"]
    args = _args(upstream, "--metrics-port", "0", *breaker, "--upstream-breaker-cooldown", "1")
    with ServiceProcess(args, env=ENV) as service:
        _eventually(lambda: _all_serving(service))
        metrics_port = next(e for e in service.events() if e.get("event") == "serving")["metrics_port"]
        channels = _channel_to_each_worker(service)
        assert _gauge(metrics_port, "rerank_deployment_state") == 0

        # Down for worker 1's calls; worker 0 takes none meanwhile.
        upstream.go_down()
        _eventually(_refused_at_once(channels[1]), what="worker 1 finding the deployment down")
        _eventually(lambda: _gauge(metrics_port, "rerank_deployment_state") == 2, what="state 2")
        # Back: worker 0's calls find it healthy (its own state never changed), worker 1 takes none.
        upstream.come_back()
        _eventually(_answered(channels[0]), what="worker 0 answering")
        _eventually(lambda: _gauge(metrics_port, "rerank_deployment_state") == 0, what="state 0")

        # Down for worker 0's calls this time, then back for worker 1's, whose probe finds it.
        upstream.go_down()
        _eventually(_refused_at_once(channels[0]), what="worker 0 finding the deployment down")
        _eventually(lambda: _gauge(metrics_port, "rerank_deployment_state") == 2, what="state 2 again")
        upstream.come_back()
        _eventually(_answered(channels[1]), what="worker 1 answering")
        _eventually(lambda: _gauge(metrics_port, "rerank_deployment_state") == 0, what="state 0 again")
        for channel in channels.values():
            channel.close()
        assert service.terminate() == 0, service.output[-5000:]


def test_a_worker_without_calls_finds_the_score_caches_redis_back(
    upstream: FakeUpstream, redis_own: RedisServer
) -> None:
    """Each worker tries its Redis again once it is due, calls or none: rerank_cache_store_up
    (the lowest of the workers') is 1 again once Redis is back, with no call made since."""
    args = _args(upstream, "--metrics-port", "0", "--cache-store", redis_own.url)
    with ServiceProcess(args, env=ENV, score_cache=True) as service:
        _eventually(lambda: _all_serving(service))
        metrics_port = next(e for e in service.events() if e.get("event") == "serving")["metrics_port"]
        channels = _channel_to_each_worker(service)
        assert _gauge(metrics_port, "rerank_cache_store_up") == 1

        redis_own.kill()
        for worker, channel in channels.items():  # each worker's call finds Redis gone
            assert _outcome(channel, f"redis gone {worker}") == "OK"  # a miss, answered
        _eventually(lambda: _gauge(metrics_port, "rerank_cache_store_up") == 0, what="store down")
        redis_own.start()
        _eventually(lambda: _gauge(metrics_port, "rerank_cache_store_up") == 1, what="store up again")
        for channel in channels.values():
            channel.close()
        assert service.terminate() == 0, service.output[-5000:]


def test_every_route_member_has_a_state_from_the_start_and_a_route_with_one_up_is_not_down(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Each worker exports every deployment's state before any call, as one process does: a
    route's healthy member never called ('steady', behind 'gone') had no series, so
    RerankRouteDown's join of members to states dropped it and fired on 'gone' alone."""
    gone = {"format": "dashscope", "url": f"http://127.0.0.1:{free_port()}", "name": "gone",
            "breaker_failures": 1, "max_attempts": 1}  # fmt: skip
    steady = {"format": "dashscope", "url": upstream.url, "name": "steady", "priority": 1}
    config = tmp_path / "rerank.yaml"
    config.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "lonely", "deployments": [gone]},
                    {"name": "backed", "deployments": [gone, steady]},
                ]
            }
        ),
        encoding="utf-8",
    )
    args = ["--workers", "2", "--config", str(config), "--metrics-port", "0"]
    with ServiceProcess(args, env=ENV) as service:
        _eventually(lambda: _all_serving(service))
        metrics_port = next(e for e in service.events() if e.get("event") == "serving")["metrics_port"]

        def states() -> dict[str, float]:
            return {
                dict(labels)["deployment"]: sample
                for (name, labels), sample in scrape(metrics_port).items()
                if name == "rerank_deployment_state"
            }

        assert states() == {"gone": 0, "steady": 0}  # no call yet

        # 'lonely' calls find 'gone' down; 'steady' is never called.
        with _channel(service.target) as channel:
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            for attempt in range(2):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Rerank(request(model="lonely", query=f"gone {attempt}"), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        _eventually(lambda: states().get("gone") == 2, what="gone down")
        assert states() == {"gone": 2, "steady": 0}  # backed still has one up
        assert service.terminate() == 0, service.output[-5000:]
