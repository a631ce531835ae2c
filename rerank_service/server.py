"""The process: one server built from the settings (engine, router, call pipeline, the gRPC
port, the HTTP front door, metrics), started, kept healthy while the backend is, reloaded on
SIGHUP and drained on SIGTERM. It sits above both front doors, which never build each
other."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from rerank_service.api.grpc.server import RERANK_SERVICE, GrpcServer
from rerank_service.api.grpc.tls import server_credentials
from rerank_service.api.http.app import FrontDoor
from rerank_service.api.http.server import HttpServer
from rerank_service.cache.build import build_score_cache
from rerank_service.config import ConfigError, Settings
from rerank_service.config.deployments import as_reloaded
from rerank_service.config.server import CallersConfig, ServerConfig
from rerank_service.core.backend import Backend
from rerank_service.core.engine import RerankEngine
from rerank_service.observability.logging import get_logger, mask_also
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.metrics_endpoint import start_metrics_server, stop_metrics_server
from rerank_service.observability.process_limits import FileLimit, cannot_listen, raise_file_limit
from rerank_service.observability.tracing import CallTracer, tracing_wanted
from rerank_service.pipeline.admission import BOUNDS, Admission
from rerank_service.pipeline.call import Pipeline
from rerank_service.pipeline.callers import CallerDirectory
from rerank_service.pipeline.limits import build_limiter
from rerank_service.pipeline.record import INFERENCE_TIME_KEY, UPSTREAM_TIME_KEY
from rerank_service.pipeline.usage import UsageMeter, open_usage_log
from rerank_service.routing import Router
from rerank_service.routing.build import build_router, build_routes, checked_routes
from rerank_service.routing.cached_scores import refresh_cache_metrics_while_running

# "" is the whole server's status, as probes ask for it by default.
HEALTH_SERVICES = ("", RERANK_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_log = get_logger("rerank_service.server")
_T = TypeVar("_T")


class BackendStartError(RuntimeError):
    """The backend could not be started; the message says why."""


class ListenError(RuntimeError):
    """A port could not be opened; the message names its setting and why."""


class RerankServer:
    """The whole server: the gRPC port and, with --http-port, the HTTP front door, over one
    engine and call pipeline."""

    # The Prometheus endpoint (--metrics-port), and its port once started.
    metrics_port: int | None = None
    _metrics_server: WSGIServer | None = None
    # The open-file limit `serve` raised, for the `listening` line.
    file_limit: FileLimit | None = None

    def __init__(
        self,
        settings: Settings,
        backend: Backend | None = None,
        *,
        worker: int | None = None,
        metrics: Metrics | None = None,
        tracer: CallTracer | None = None,
    ) -> None:
        self.settings = settings
        # Where everything this server does is recorded (None: in memory, a Metrics of its own).
        self.metrics = metrics if metrics is not None else Metrics()
        self.config = config = ServerConfig.from_settings(settings)
        # One of `serve --workers N`'s processes (workers.py): the ports are shared
        # (SO_REUSEPORT) and the supervisor logs the one `serving` line.
        self.worker = worker
        # Before anything else: a bad certificate or key stops start-up with a ConfigError.
        self._credentials = server_credentials(config.tls)
        # One score cache for the process, kept across reloads (a changed deployment's keys change).
        self.cache = build_score_cache(config.cache, self.metrics.cache)
        self.backend = backend or build_router(settings, self.metrics, self.cache)
        self.engine = RerankEngine.from_config(self.backend, config.calls)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        limits = config.admission
        self.admission = Admission(
            limits.max_concurrent_requests,
            limits.max_inflight_bytes,
            limits.max_open_calls,
            caller_max_share=config.callers.max_share,
            on_refusal=self.metrics.admission.refused,
        )
        self.metrics.admission.watch(self.admission, BOUNDS)
        local = all(model.backend == "local" for model in self.engine.models())
        # The one pipeline every call of both front doors goes through: same engine, limits, keys.
        self.pipeline = Pipeline(
            self.engine,
            self.admission,
            CallerDirectory.from_config(config.callers),
            self.metrics,
            limiter=build_limiter(config.callers.limits_store, self.metrics.callers),
            usage=UsageMeter(self.metrics.callers, open_usage_log(config.callers.usage_log)),
            tracer=tracer,
        )
        self.grpc = GrpcServer(
            config.grpc,
            self.pipeline,
            self.health,
            self._credentials,
            # A local backend's time is the model's; any other backend's is the upstream's.
            INFERENCE_TIME_KEY if local else UPSTREAM_TIME_KEY,
            reuse_port=worker is not None,
        )
        self.side_calls = self.grpc.side_calls
        self.http: HttpServer | None = None
        if config.http.port is not None:  # the HTTP front door
            front_door = FrontDoor(
                self.pipeline,
                ready=lambda: self._serving and not self._draining,
                live=lambda: not self._draining,
                max_body_bytes=config.http.max_body_bytes,
                body_timeout=config.http.body_timeout,
                call_timeout=config.http.call_timeout,
            )
            self.http = HttpServer(
                front_door,
                config.http,
                config.tls,
                shutdown_grace=config.process.shutdown_grace,
                reuse_port=worker is not None,
            )
        self._health_watch: asyncio.Task[None] | None = None
        self._admission_publisher: asyncio.Task[None] | None = None
        self._cache_metrics: asyncio.Task[None] | None = None
        self._draining = False
        self._serving = False
        self._started = False  # start() got to the end: health said SERVING, calls were taken
        self._reloading = asyncio.Lock()
        self._backend_started = asyncio.Event()

    async def start(self) -> int:
        """Open the ports (health NOT_SERVING), start the backend, then report SERVING; a
        ListenError or BackendStartError, or a cancellation (SIGTERM while starting), closes
        again whatever had opened.

        A worker of `serve --workers N` starts its backend first and opens its ports once it
        is serving: they are shared with its siblings (SO_REUSEPORT), and a worker listening
        while its model loads would take its share of new connections only to refuse their
        calls (the kernel hands each new connection to any listener). Until the first worker
        listens, nothing does: a connection is refused, never accepted and dropped."""
        for service in HEALTH_SERVICES:
            await self.health.set(service, _NOT_SERVING)
        async with contextlib.AsyncExitStack() as opened:
            if self.worker is None:
                # Cancelled half way, grpc's start leaves a server its stop fails on
                # (InvalidStateError): the ports are opened to the end, then closed.
                self.port = port = await _to_its_end(self._open_ports(opened))
                self._log_listening()
                await self._start_backend()
                await self._report_started()
            else:
                await self._start_backend()
                await self._report_started()  # its first connection is answered SERVING
                self.port = port = await _to_its_end(self._open_ports(opened))
                self._log_listening()
            self._backend_started.set()
            opened.pop_all()  # serving: from now on stop() closes them
        self._health_watch = asyncio.create_task(self._follow_backend_readiness(), name="health-watch")
        if self.metrics.multiprocess:  # a worker: its admission gauges live in files
            self._admission_publisher = asyncio.create_task(
                self.metrics.admission.publish_while_running(), name="admission-metrics"
            )
        if self.cache is not None:  # its state as it is now, not as the last call left it
            self._cache_metrics = asyncio.create_task(
                refresh_cache_metrics_while_running(self.cache, self.metrics.cache), name="cache-metrics"
            )
        http_port = None if self.http is None else self.http.port
        self._started = True
        _log.info(
            "serving" if self.worker is None else "worker serving",
            port=self.port,
            http_port=http_port,
            metrics_port=self.metrics_port,
        )
        return port

    async def _report_started(self) -> None:
        # "" is the process's liveness: up, started, not draining. The service's own
        # status also follows the backend (an open upstream circuit), so readiness probes
        # move traffic away while restarting the process would not help.
        await self.health.set("", _SERVING)
        await self._sync_health()

    async def _open_ports(self, opened: contextlib.AsyncExitStack) -> int:
        """Listen on each port, the gRPC one's number returned; each one's closing goes on
        `opened`, so that a later step's failure leaves no server half started (a grpc server
        left running warns at exit, once the loop is closed)."""
        grpc_config, http_config = self.config.grpc, self.config.http
        metrics_port = self.config.process.metrics_port
        if metrics_port is not None:
            with _listening("metrics-port", grpc_config.host, metrics_port):
                self._metrics_server, self.metrics_port = start_metrics_server(
                    grpc_config.host, metrics_port, self.metrics.registry
                )
            opened.push_async_callback(_each, ("metrics endpoint", self._stop_metrics_server))
        # Each closing is pushed before its start: a start that fails half way (aiohttp's
        # runner set up, its site not) still has something to close.
        opened.push_async_callback(_each, ("grpc server", lambda: self.grpc.stop(0)))
        with _listening("port", grpc_config.host, grpc_config.port):
            port = await self.grpc.start()
        if self.http is not None and http_config.port is not None:
            opened.push_async_callback(_each, ("http server", self.http.stop))
            with _listening("http-port", http_config.host, http_config.port):
                await self.http.start()
        return port

    def _log_listening(self) -> None:
        _log.info(
            "listening",
            host=self.config.grpc.host,
            port=self.port,
            backend="+".join(sorted({model.backend for model in self.engine.models()})),
            auth=_auth_mode(self.config.callers),
            tls=self.config.tls.mode,
            models=[model.name for model in self.engine.models()],
            **({} if self.file_limit is None else {"file_limit": self.file_limit.fields()}),
        )

    async def _start_backend(self) -> None:
        try:
            await self.backend.start()
        except Exception as exc:
            raise BackendStartError(f"a backend failed to start: {exc}") from exc

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, go on taking calls for --drain-delay, then refuse new calls and
        let calls in flight finish within `grace`."""
        process = self.config.process
        grace = process.shutdown_grace if grace is None else grace
        _log.info("draining", grace_s=grace)
        self._draining = True
        if self._health_watch is not None:
            self._health_watch.cancel()
        await self.health.enter_graceful_shutdown()
        # A server stopped while starting never said SERVING: no client has to move away.
        if process.drain_delay > 0 and self._started:
            # Health says NOT_SERVING already; calls are still taken while clients move away.
            _log.info("drain delay", delay_s=process.drain_delay)
            await asyncio.sleep(process.drain_delay)
        # grpc's stop waits for every call, a health Watch (client-side health checking) or
        # an idle reflection stream too, which would hold the drain for the whole grace: they
        # end now, each Watch once it has sent the NOT_SERVING above. A RerankStream ends once
        # its items in flight are answered (the gRPC server's stop drains them).
        self.side_calls.end_streams()
        doors = [("grpc server", self.grpc.stop(grace))]
        if self.http is not None:
            doors.append(("http server", self.http.stop(grace)))
        outcomes = await asyncio.gather(*(stop for _, stop in doors), return_exceptions=True)
        for (step, _), outcome in zip(doors, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _step_failed(step, outcome)
        # Each resource is let go even when one before it fails: a backend whose close raises
        # must not leave the usage log unclosed or pending limit settlements unsent.
        await _each(
            ("backend", self.backend.close),
            ("limits store", self.pipeline.limiter.close),
            ("usage log", self.pipeline.usage.close),
            ("score cache metrics", self._stop_cache_metrics),
            ("score cache", self.cache.aclose if self.cache is not None else None),
            ("admission metrics", self._stop_admission_publisher),
            # Last: scrapes still answer while calls drain.
            ("metrics endpoint", self._stop_metrics_server),
        )
        _log.info("stopped")

    def _stop_admission_publisher(self) -> None:
        if self._admission_publisher is not None:
            self._admission_publisher.cancel()
            self._admission_publisher = None
            self.metrics.admission.publish()  # drained: what is held now is 0

    async def _stop_cache_metrics(self) -> None:
        if self._cache_metrics is not None:
            self._cache_metrics.cancel()
            await asyncio.wait((self._cache_metrics,))  # its Redis round trip ended before Redis closes
            self._cache_metrics = None

    async def _stop_metrics_server(self) -> None:
        if self._metrics_server is not None:
            await asyncio.to_thread(stop_metrics_server, self._metrics_server)
            self._metrics_server = None

    # The settings the routes were last loaded from (None: as started), for `reload`.
    _routes_from: Settings | None = None

    async def reload(self, load: Callable[[], Settings]) -> bool:
        """Serve the routes of freshly loaded settings (SIGHUP); False, and the old routes
        stay, when they are invalid. Calls in flight finish where they started."""
        if not isinstance(self.backend, Router):
            _log.warning("reload ignored", why="this server's backend was given, not built from settings")
            return False
        # One at a time, each reading the file when its turn comes: a reload that overtook
        # an earlier one still starting a deployment would be undone by it, with deployments
        # the later one had retired back in the routes, closed.
        # A SIGHUP while the deployments start waits for them: it would close one still
        # loading its model, which then loads into a closed backend (and holds SERVING back).
        await self._backend_started.wait()
        async with self._reloading:
            return await self._reload(load)

    async def _reload(self, load: Callable[[], Settings]) -> bool:
        assert isinstance(self.backend, Router)
        try:
            # Caller keys stay as started (the edge checks them): deployments must agree on
            # whether callers' tokens pass through.
            loaded = load()
            mask_also(loaded.secrets())  # keys this file names are masked from now on
            # With the caller keys as started, checked with them; a file truncated or caught
            # mid-write must not swap every route for the demo model; the callers may change
            # (keys added or removed, limits), but never switch authentication on or off.
            settings = as_reloaded(loaded, self._routes_from or self.settings)
            callers = CallersConfig.from_settings(settings)
            routes = build_routes(
                settings, reuse=self.backend.deployments, metrics=self.metrics, cache=self.cache
            )
            await self.backend.replace(routes, grace=self.config.process.shutdown_grace)
        except Exception as exc:  # a bad file, or a new deployment that does not start
            _log.error("reload refused", error=str(exc), why="the configuration stays as it was")
            return False
        self._routes_from = settings  # what the next reload is compared with
        self.pipeline.callers.update(callers.callers)  # from the next call on
        # Only the routes and the callers change: listening, --api-keys, admission limits and
        # logging stay as started.
        _log.info(
            "reloaded",
            routes={route.name: [member.deployment.name for member in route.members] for route in routes},
            callers=[caller.name for caller in callers.callers],
        )
        # The file's own caller keys (--api-keys-file), which stay as started, are named too.
        kept = needs_restart(self.config, ServerConfig.from_settings(loaded))
        if kept:  # changed in the file, but served as started: said, not silently ignored
            _log.warning("reload left settings as started", settings=kept, why="they take a restart")
        return True

    async def _follow_backend_readiness(self) -> None:
        """Keep health equal to the backend's readiness until the server drains."""
        readiness = self.backend.readiness
        while not self._draining:
            await self._sync_health()
            # Re-read after the await above: a change during it must not be waited past.
            if readiness.ready == self._serving:
                await readiness.changed()

    async def _sync_health(self) -> None:
        ready = self.backend.readiness.ready
        if ready == self._serving or self._draining:
            return
        self._serving = ready
        await self.health.set(RERANK_SERVICE, _SERVING if ready else _NOT_SERVING)
        if ready is False:
            _log.warning("health", status="NOT_SERVING", why="the backend is not ready")


async def _to_its_end(opening: Coroutine[Any, Any, _T]) -> _T:
    """`opening`'s result. Cancelled meanwhile, this waits for `opening` to end before the
    cancellation goes on (what it returned or raised is dropped)."""
    task = asyncio.ensure_future(opening)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # retrieved: what goes on is the cancellation
        raise


# A step of the shutdown: its name (for the log), and what to call (None: nothing to do).
ShutdownStep = tuple[str, Callable[[], Awaitable[None] | None] | None]


async def _each(*steps: ShutdownStep) -> None:
    """Run every step in order; one that fails is logged, and the next ones still run."""
    for name, step in steps:
        if step is None:
            continue
        try:
            result = step()
            if result is not None:
                await result
        except Exception as exc:
            _step_failed(name, exc)


# What a reload applies of the callers' section: the callers themselves (keys, models,
# limits); the caller keys of RERANK_API_KEYS / --api-keys-file stay as started, by design
# (the edge checks them), and a change of them is named.
_RELOADED_CALLERS_FIELDS = frozenset({"callers"})


def needs_restart(started: ServerConfig, reloaded: ServerConfig) -> list[str]:
    """The settings `reloaded` changes that a reload leaves as started (it applies the
    routes and the callers only): each as `section.field` of the typed config."""
    changed = []
    for section in dataclasses.fields(started):
        old, new = getattr(started, section.name), getattr(reloaded, section.name)
        if old == new:
            continue
        for field in dataclasses.fields(old):
            if section.name == "callers" and field.name in _RELOADED_CALLERS_FIELDS:
                continue
            if getattr(old, field.name) != getattr(new, field.name):
                changed.append(f"{section.name}.{field.name}")
    return changed


def check_reload(settings: Settings) -> None:
    """What a reload builds from `settings`, short of starting it: every route and
    deployment (their CA files, proxies, keys), every local model's files found. The
    supervisor of --workers asks it before it hands a file to its workers, who would
    refuse it (config/snapshot.py). A ConfigError says what fails."""
    try:
        checked_routes(settings)
    except ConfigError:
        raise
    except Exception as exc:  # what a worker's reload would refuse the file for
        raise ConfigError(str(exc)) from None


def _step_failed(step: str, error: BaseException) -> None:
    _log.error("shutdown step failed", step=step, error=type(error).__name__, detail=str(error)[:200])


@contextlib.contextmanager
def _listening(setting: str, host: str, port: int) -> Iterator[None]:
    """A port that cannot be opened (taken, or not this machine's address) as a ListenError
    naming its setting: grpc raises RuntimeError, asyncio and the metrics server OSError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise ListenError(cannot_listen(setting, host, port, exc)) from exc


def _auth_mode(callers: CallersConfig) -> str:
    if callers.callers:
        return "callers+api-keys" if callers.api_keys else "callers"
    if callers.api_keys:
        return "api-keys"
    if callers.pass_through:
        return "pass-through"
    return "open"


@contextlib.contextmanager
def _start_up_frozen() -> Iterator[None]:
    """Each call allocates many short-lived objects that reference counting frees; the
    cycle collector, run every 700 allocations by default, mostly rescans what start-up
    built (modules, a model). Freeze that and run it less often: ~7% less CPU per call
    at 500 documents (docs/perf-history.md). On the way out start-up's objects go back to
    the collector, so that interpreter exit frees them: extensions that count their live
    objects at exit (triton's, under transformers) would otherwise report every frozen
    one as leaked on stderr."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        yield
    finally:
        gc.unfreeze()


async def serve(
    settings: Settings,
    reload: Callable[[], Settings] | None = None,
    *,
    worker: int | None = None,
    on_serving: Callable[[int], None] | None = None,
    metrics_directory: str | None = None,
    watch_reloads: Callable[[Callable[[], None]], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain; the process's exit code.

    SIGHUP loads the settings again with `reload` and serves their routes. `worker`: this
    process is that worker of a supervisor (workers.py), which sums the metrics each
    worker keeps in files in `metrics_directory` (None: in memory, served at
    --metrics-port); `on_serving(port)` is called once the server is serving.
    `watch_reloads(reload_now)`, with `reload`, is called once on the server's loop with
    what a SIGHUP calls: a worker reloads when its supervisor's message asks it to.
    """
    # Every connection holds a file descriptor: systemd's default soft limit is 1024.
    file_limit = raise_file_limit()
    # The process's one Metrics, where it keeps its values chosen here (not at import).
    metrics = Metrics(multiprocess_directory=metrics_directory)
    tracer = start_call_tracer(settings.otlp_endpoint, metrics, worker)
    server = RerankServer(settings, worker=worker, metrics=metrics, tracer=tracer)
    server.file_limit = file_limit
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[bool]] = set()
    if reload is not None:

        def on_hangup() -> None:
            if stop.is_set():  # draining: a reload would start what the exit then waits for
                _log.info("reload ignored", why="the server is stopping")
                return
            task = loop.create_task(server.reload(reload), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        if watch_reloads is not None:
            watch_reloads(on_hangup)
    starting = asyncio.create_task(server.start(), name="start")
    stopping = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # SIGTERM or SIGINT while starting (a model may load for minutes): the server
            # has said SERVING to nobody, so it stops now, not once it would be serving.
            _log.info("stopping while starting", why="SIGTERM or SIGINT before the server was serving")
            starting.cancel()  # start closes the ports it had opened
            await asyncio.wait((starting,))
        if not starting.cancelled():
            starting.result()
    except BaseException as exc:
        for task in (stopping, *reloads):  # each reload waits for a start that will not come
            task.cancel()
        if not isinstance(exc, BackendStartError):
            raise
        _log.error("start failed", error=str(exc))
        return 1
    if starting.cancelled():
        for task in reloads:
            task.cancel()
        await server.stop()  # the backend and the rest: closed as after a drain
        if tracer is not None:
            tracer.shutdown(TRACES_FLUSH_TIMEOUT)
        _exit_leaving_loads(0)
        return 0
    with _start_up_frozen():
        if on_serving is not None:
            on_serving(server.port or 0)
        await stopping
        # A reload still under way is dropped: its routes would be served by nothing. One
        # starting a local model leaves the load in a thread nothing interrupts, which would
        # hold the exit until the model is loaded (left, below, as a start's load is).
        reloading = bool(reloads)
        for task in reloads:
            task.cancel()
        await server.stop()
    if tracer is not None:  # the spans of the calls that drained, sent before the process goes
        tracer.shutdown(TRACES_FLUSH_TIMEOUT)
    if reloading:
        _exit_leaving_loads(0)
    return 0


def ignore_sighup_to_the_end() -> None:
    """From now until the process exits, SIGHUP is ignored, in every thread. The last step on
    the loop of what runs `serve` (the CLI, a worker): the loop, closing, would put SIGHUP
    back to its default action, which kills, and a terminal's hangup or `systemctl kill -s
    HUP` just after a clean drain would end the process by a signal. Ignored first, then the
    loop forgets its handler, so that its close leaves it ignored: asyncio keeps its handlers
    in `_signal_handlers` (were that to change, the close would reset SIGHUP again, and
    tests/integration/test_workers_hangup.py would fail)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    handlers = getattr(asyncio.get_running_loop(), "_signal_handlers", None)
    if isinstance(handlers, dict):
        handlers.pop(signal.SIGHUP, None)


def _exit_leaving_loads(code: int) -> None:
    """End the process now with `code` if a thread would hold its exit; else return.

    A model load runs in a thread of the loop's executor (asyncio.to_thread) that nothing
    can interrupt: a start cut short by SIGTERM leaves it loading, and asyncio.run, then the
    interpreter, would wait for it (minutes for a large model) before the process exits,
    to be killed at the end of its grace instead. Such threads are not daemons; any one
    still there (an idle one too: which one loads cannot be told) ends the process here.
    Everything is closed by now and each log line written: os._exit loses nothing.
    """
    current = threading.current_thread()
    if not any(thread is not current and not thread.daemon for thread in threading.enumerate()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# How long a stopping process waits for the collector to take its last spans.
TRACES_FLUSH_TIMEOUT = 5.0


def tracing_sdk() -> Callable[..., CallTracer]:
    """What starts the tracer (observability/tracing_export.py), or a ConfigError when
    tracing is configured and OpenTelemetry's SDK, an extra, is not installed."""
    try:
        from rerank_service.observability.tracing_export import start_tracing
    except ImportError as exc:
        raise ConfigError(
            "tracing is configured (otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT or "
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) but OpenTelemetry's SDK is not installed "
            f"({exc.name}): install the otel extra (pip install '.[otel]' in the repository)"
        ) from None
    return start_tracing


def start_call_tracer(otlp_endpoint: str | None, metrics: Metrics, worker: int | None) -> CallTracer | None:
    """The process's tracer when tracing is configured (docs/OBSERVABILITY.md#tracing), else
    None; a ConfigError when it is configured and OpenTelemetry's SDK is not installed."""
    if not tracing_wanted(otlp_endpoint, os.environ):
        return None
    start_tracing = tracing_sdk()
    try:
        tracer = start_tracing(otlp_endpoint, metrics, worker=worker)
    except ValueError as exc:  # a protocol it does not speak
        raise ConfigError(str(exc)) from None
    environ = os.environ
    _log.info(
        "tracing on",
        protocol=environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc",
        sampler=tracer.sampler,  # the one built, its ratio included (e.g. TraceIdRatioBased{0.01})
    )
    return tracer
