"""`serve --workers N`: N server processes sharing the ports, started and watched by one supervisor.

Each worker is a whole server (server.py `serve`): its own event loop, router, health
service, admission limits and drain. They listen on the same gRPC port (and HTTP port)
with SO_REUSEPORT, so the kernel spreads new connections over them, as grpc's own
multiprocessing example does. The supervisor

- binds each port once itself (SO_REUSEPORT, never listening), so `--port 0` is chosen
  once and shared, and a taken port stops start-up before any worker starts;
- starts the workers (spawned: a fresh interpreter, no grpc state forked), logs one
  `serving` line once the first is serving, and restarts one that dies, with backoff;
- forwards SIGTERM and SIGINT (every worker drains as one server does), and on SIGHUP
  loads the settings once for all (config/snapshot.py) and hands them to every worker,
  which reloads from them; it exits 0 only when every worker drained and exited 0;
- serves --metrics-port: the sum of the workers' metrics, which each records into files
  in a directory the supervisor creates, hands to each worker (its `Metrics` is made for
  it: prometheus-client's multiprocess mode, observability/metrics_multiprocess.py) and
  removes (a supervisor killed with SIGKILL cannot remove its own: the next one to start
  does), and the `process_*` of all of them together (observability/process_tree.py).

Nothing here runs on a call's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import multiprocessing
import os
import queue
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from rerank_service.config import ConfigError, Settings, load_settings
from rerank_service.config.deployments import as_reloaded
from rerank_service.config.file_trust import warnings_said
from rerank_service.config.server import ServerConfig
from rerank_service.config.snapshot import ConfigSnapshot
from rerank_service.observability.logging import configure_logging, get_logger, mask_also
from rerank_service.observability.metrics_endpoint import start_metrics_server, stop_metrics_server
from rerank_service.observability.metrics_multiprocess import multiprocess_registry, worker_exited
from rerank_service.observability.process_limits import cannot_listen
from rerank_service.observability.process_tree import WorkerProcess

_log = get_logger("rerank_service.workers")

FIRST_BACKOFF = 0.5  # seconds before the first restart of a worker that died
MAX_BACKOFF = 30.0  # the longest wait between restarts of a worker that keeps dying
STEADY_AFTER = 60.0  # a worker that ran this long before dying restarts after FIRST_BACKOFF
KILL_AFTER = 10.0  # seconds past --drain-delay + --shutdown-grace before a worker still draining is killed
_POLL = 0.1  # seconds: how often the loop looks at signals and due restarts


def check_workers(settings: Settings) -> None:
    """Refuse workers that would each hold a copy of a local model on one device."""
    if settings.workers <= 1:
        return
    local = (
        settings.backend == "local"
        if not settings.models
        else any(
            deployment.format == "local" for route in settings.models for deployment in route.deployments
        )
    )
    if not local or settings.device == "cpu":
        return
    where = "onto the GPU" if settings.device == "cuda" else "(device auto may pick the GPU)"
    raise ConfigError(
        f"workers {settings.workers} with the local backend on device {settings.device}: each worker "
        f"would load its own copy of every model {where}; run one worker per device (--workers 1), "
        "or set --device cpu"
    )


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, not listening: the port is this
    process's until it closes it, and the workers' listeners (SO_REUSEPORT too) share it.
    Port 0 picks a free one: read it with `getsockname()`."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        # Bound first without SO_REUSEPORT: another process sharing the port with it (a
        # second supervisor, any server that sets it) makes this fail, where the bind
        # below would join it and split the connections.
        with socket.socket(family, kind, proto) as alone:
            alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, as a listener
            alone.bind(address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _reserved(setting: str, host: str, port: int) -> socket.socket:
    """reserve_port, a failure naming its setting (as one process's start does)."""
    try:
        return reserve_port(host, port)
    except OSError as exc:
        raise _taken(setting, host, port, exc) from exc


def _taken(setting: str, host: str, port: int, error: OSError) -> OSError:
    # An OSError still (the CLI's "cannot start"), its text naming the setting.
    return OSError(cannot_listen(setting, host, port, error))


# --- the metrics directory ---

METRICS_PREFIX = "rerank-metrics-"
# A directory a supervisor made: rerank-metrics-<its pid>-<random>.
_METRICS_NAME = re.compile(rf"{METRICS_PREFIX}(\d+)-[a-z0-9_]+")


def make_metrics_directory(root: str | None = None) -> tuple[str, int]:
    """A new directory for the workers' metrics files (in `root`, else the temporary
    directory), named after this process's pid, and an open descriptor that holds its lock
    (flock) while this process lives: a later supervisor takes a directory whose lock is
    free for one a killed supervisor left behind (remove_stale_metrics_directories).

    It is made under a name that no scan looks at and locked before it gets its own, so
    no scan ever sees it unlocked.
    """
    building = tempfile.mkdtemp(prefix=f".{METRICS_PREFIX}", dir=root)
    lock = os.open(building, os.O_RDONLY | os.O_DIRECTORY)  # not inherited: O_CLOEXEC
    with contextlib.suppress(OSError):  # a file system without locks: scans judge by the pid
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    suffix = os.path.basename(building).removeprefix(f".{METRICS_PREFIX}")
    directory = os.path.join(os.path.dirname(building), f"{METRICS_PREFIX}{os.getpid()}-{suffix}")
    os.rename(building, directory)
    return directory, lock


def remove_stale_metrics_directories(root: str | None = None) -> list[str]:
    """Remove the metrics directories of supervisors that are gone (a SIGKILL leaves its
    directory behind); the paths removed.

    Only this user's directories named as make_metrics_directory names them, never a
    symlink, and only one whose lock nobody holds: a live supervisor holds its own.
    """
    root = root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = _METRICS_NAME.fullmatch(name)
        path = os.path.join(root, name)
        if match is not None and _is_own_directory(path) and _abandoned(path, int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_own_directory(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _abandoned(path: str, pid: int) -> bool:
    """Whether no supervisor holds the directory: its lock is free (the kernel releases
    it when the holder dies, whatever its pid now names)."""
    try:
        lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its supervisor holds it
    except OSError:  # no locks on this file system: the pid in its name says
        return pid == os.getpid() or not _alive(pid)  # our own pid: a previous life (pid 1 in a container)
    finally:
        os.close(lock)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


# Put in an outbox after its last message: the connection is closed once they are sent.
_CLOSED = object()


class _Outbox:
    """Messages to one worker, sent in order by a thread of their own: a send waits while
    the pipe is full (settings with many routes or callers are more than it holds) until the
    worker has read them, and the supervisor's loop (signals, restarts) never waits on one."""

    def __init__(self, connection: Connection, name: str) -> None:
        self._connection = connection
        self._messages: queue.SimpleQueue[object] = queue.SimpleQueue()
        threading.Thread(target=self._send_all, name=name, daemon=True).start()

    def send(self, message: object) -> None:
        self._messages.put(message)

    def close(self) -> None:
        """No more messages: the connection closes once those before are sent (or the worker is gone)."""
        self._messages.put(_CLOSED)

    def _send_all(self) -> None:
        try:
            while (message := self._messages.get()) is not _CLOSED:
                self._connection.send(message)
        except OSError:  # the worker is gone: its sentinel says how
            pass
        finally:
            self._connection.close()


@dataclasses.dataclass
class _Worker:
    index: int
    process: BaseProcess | None = None
    ready: Connection | None = None  # the supervisor's end: the worker says when it serves
    reloads: _Outbox | None = None  # what the supervisor sends it: the settings to reload from
    pid: int | None = None
    started_at: float = 0.0
    serving: bool = False
    served_once: bool = False
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    restarts: int = 0
    reload_pending: bool = False  # a SIGHUP came while it was starting: sent once it serves


class Supervisor:
    """Runs `settings.workers` workers until SIGTERM or SIGINT; `run` is the exit code."""

    def __init__(self, settings: Settings, args: Mapping[str, Any]) -> None:
        self.settings = settings
        self.args = dict(args)  # what each worker loads its settings from, as serve does
        self.port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(index) for index in range(settings.workers)]
        self._signals: list[int] = []
        self._stopping = False
        self._stop_deadline = 0.0
        self._exit_code: int | None = None  # set when start-up failed
        self._failed_drain = False
        self._announced = False
        self._directory = ""
        self._directory_lock = -1  # held (flock) while this supervisor lives
        self._config: ConfigSnapshot | None = None  # the file as the workers serve it
        # The settings as the workers started (the file's first copy): a worker restarted
        # after a reload serves what a reload leaves as started from these, as its siblings do.
        self._started = settings
        # The copy as the supervisor last accepted it (what a restarted worker serves), and
        # as it loaded it (what a worker reloads: its own caller keys, named if changed).
        # Workers never load settings themselves: the key files they name (a mounted Secret,
        # updated in place) are read here, at start and on each SIGHUP accepted, so that a
        # worker restarted in between serves its siblings' keys, not the file's of the moment.
        self._accepted = self._loaded = settings
        self._forwarded: set[int] = set()  # the stop signals forwarded to the workers

    def run(self) -> int:
        check_workers(self.settings)
        reserved = [_reserved("port", self.settings.host, self.settings.port)]
        try:
            self.port = reserved[0].getsockname()[1]
            if self.settings.http_port is not None:
                reserved.append(_reserved("http-port", self.settings.host, self.settings.http_port))
                self.http_port = reserved[-1].getsockname()[1]
            for stale in remove_stale_metrics_directories():
                _log.info("stale metrics directory removed", path=stale, why="its supervisor is gone")
            self._directory, self._directory_lock = make_metrics_directory()
            self._config = ConfigSnapshot(self.args, self._directory)
            if self._config.has_file:
                with warnings_said():  # the file and its key files, read (and warned of) to start
                    self._started = self._accepted = self._loaded = self._config.copy()
            server = None
            if self.settings.metrics_port is not None:
                try:
                    server, self.metrics_port = start_metrics_server(
                        self.settings.host,
                        self.settings.metrics_port,
                        multiprocess_registry(self._directory, self._worker_processes),
                    )
                except OSError as exc:
                    raise _taken("metrics-port", self.settings.host, self.settings.metrics_port, exc) from exc
            try:
                return self._run()
            finally:
                if server is not None:
                    stop_metrics_server(server)
        finally:
            for sock in reserved:
                sock.close()
            if self._directory:
                shutil.rmtree(self._directory, ignore_errors=True)
                os.close(self._directory_lock)

    def _drain_seconds(self) -> float:
        """How long workers may drain before they are killed."""
        return self.settings.drain_delay + self.settings.shutdown_grace + KILL_AFTER

    def _worker_processes(self) -> list[WorkerProcess]:
        """The workers now, for /metrics (read from the metrics server's thread)."""
        return [
            WorkerProcess(w.index, w.pid if w.process is not None else None, w.restarts)
            for w in self._workers
        ]

    # --- the loop ---

    def _run(self) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            _log.info(
                "supervisor starting",
                workers=len(self._workers),
                port=self.port,
                http_port=self.http_port,
                metrics_port=self.metrics_port,
                pid=os.getpid(),
            )
            for worker in self._workers:
                self._start(worker)
            while True:
                self._handle_signals()
                now = time.monotonic()
                if not self._stopping:
                    for worker in self._workers:
                        if worker.restart_at is not None and worker.restart_at <= now:
                            self._start(worker)
                alive = [w for w in self._workers if w.process is not None]
                if self._stopping and not alive:
                    break
                if self._stopping and now > self._stop_deadline:
                    self._kill(alive)
                    self._stop_deadline = now + KILL_AFTER
                waitables: list[Any] = [w.process.sentinel for w in alive if w.process is not None]
                waitables += [w.ready for w in alive if w.ready is not None]
                for ready in wait(waitables, timeout=_POLL):
                    self._on_ready(ready)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            # Exiting: a SIGHUP to the process group now (a terminal's hangup, systemd's
            # `kill -s HUP`) must not kill the supervisor past its drain (exit by a signal).
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self._exit_code is not None:
            return self._exit_code
        code = 1 if self._failed_drain else 0
        _log.info("supervisor stopped", exit_code=code)
        return code

    def _kill(self, workers: list[_Worker]) -> None:
        """SIGKILL `workers`, still running past the drain's end. Only one that served can
        have failed a drain: one still starting held no calls (_on_exit says the same)."""
        for worker in workers:
            why = "drain too long" if worker.serving else "start too long"
            _log.error("worker killed", worker=worker.index, pid=worker.pid, why=why)
            self._signal(worker, signal.SIGKILL)
            if worker.serving:
                self._failed_drain = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # handled by the loop, never inside a handler

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            alive = [w for w in self._workers if w.process is not None]
            if signum == signal.SIGHUP:
                if self._stopping:  # as one server does: a drain is no time to reload
                    _log.info("reload ignored", why="the server is stopping")
                    continue
                if not self._copy_config_for_reload():
                    continue
                _log.info("reload", workers=[w.index for w in alive], why="SIGHUP: every worker reloads")
                for worker in alive:
                    if worker.serving:
                        self._send_reload(worker)
                    else:  # still starting: it may have been handed the settings before they changed
                        worker.reload_pending = True
                continue
            if not self._stopping:
                self._stopping = True
                self._stop_deadline = time.monotonic() + self._drain_seconds()
                _log.info(
                    "draining",
                    workers=[w.index for w in alive],
                    signal=signal.Signals(signum).name,
                    grace_s=self.settings.shutdown_grace,
                )
            for worker in alive:
                # One still starting holds no calls: SIGTERM ends it at any point of its
                # start, where a SIGINT before its handlers would be a KeyboardInterrupt.
                forwarded = signum if worker.serving else signal.SIGTERM
                self._forwarded.add(forwarded)
                self._signal(worker, forwarded)

    def _copy_config_for_reload(self) -> bool:
        """Whether the workers are to reload: the settings loaded for them (the file copied,
        and the key files it names read), if they pass a reload's checks (else they keep
        serving the settings they have, and a worker restarted later starts from them too)."""
        # Late: the supervisor serves nothing, and builds routes (to check them) only here.
        from rerank_service.server import check_reload

        def check(settings: Settings) -> None:
            # What a fresh start refuses too: a worker restarted from the copy starts from it.
            check_workers(settings)
            check_reload(settings)

        try:
            if self._config is not None and self._config.has_file:
                accepted = self._config.copy(check=check)
                loaded = self._config.loaded
                assert loaded is not None
            else:  # no file: the flags and variables, and the key files they name
                loaded = load_settings(self.args)
                accepted = as_reloaded(loaded, self._accepted)
                check(accepted)
        except ConfigError as exc:
            _log.error(
                "reload refused", error=str(exc), why="the workers keep serving the configuration as it was"
            )
            return False
        mask_also(loaded.secrets())  # keys it names are masked from now on, here too
        self._accepted, self._loaded = accepted, loaded
        return True

    def _send_reload(self, worker: _Worker) -> None:
        """Ask `worker`, serving, to reload from the settings last accepted."""
        if worker.reloads is not None:
            worker.reloads.send(self._loaded)

    def _on_ready(self, ready: Any) -> None:
        for worker in self._workers:
            if worker.ready is ready:
                self._on_message(worker)
                return
            if worker.process is not None and worker.process.sentinel == ready:
                self._on_exit(worker)
                return

    def _on_message(self, worker: _Worker) -> None:
        assert worker.ready is not None
        try:
            worker.ready.recv()
        except (EOFError, OSError):  # the worker exited; its sentinel says how
            worker.ready.close()
            worker.ready = None
            return
        worker.serving = worker.served_once = True
        _log.info("worker ready", worker=worker.index, pid=worker.pid, restarts=worker.restarts)
        if worker.reload_pending and not self._stopping:
            worker.reload_pending = False
            self._send_reload(worker)
        if not self._announced:
            self._announced = True
            _log.info(
                "serving",
                port=self.port,
                http_port=self.http_port,
                metrics_port=self.metrics_port,
                workers=len(self._workers),
            )

    def _on_exit(self, worker: _Worker) -> None:
        assert worker.process is not None
        worker.process.join(timeout=1)
        code = worker.process.exitcode
        pid = worker.pid
        if worker.ready is not None:
            worker.ready.close()
        if worker.reloads is not None:
            worker.reloads.close()
        worker.process.close()
        worker.process, worker.ready, worker.reloads = None, None, None
        if pid is not None:
            worker_exited(pid, self._directory)  # its calls in flight are over
        served, worker.serving = worker.serving, False
        how = {"exit_code": code} if code is None or code >= 0 else {"signal": signal.Signals(-code).name}
        if self._stopping:
            # Stopped while still starting (before its handlers were set, however it
            # ended): it held no calls, so no drain failed. One that served and ends by a
            # stop signal forwarded to it had drained: serve handles SIGTERM and SIGINT
            # until its loop closes, so only a signal past the end of its drain (a second
            # one: the supervisor's, after the process group's own) finds them at default.
            unstarted = not served
            drained = code is not None and -code in self._forwarded
            if code != 0 and not unstarted and not drained:
                self._failed_drain = True
            (_log.info if code == 0 or drained else _log.error)(
                "worker stopped", worker=worker.index, pid=pid, **how
            )
            return
        if not worker.served_once:  # it never started: the others would fail alike
            _log.error("worker start failed", worker=worker.index, pid=pid, **how)
            self._exit_code = code if code is not None and code > 0 else 1
            self._stopping = True
            self._stop_deadline = time.monotonic() + self._drain_seconds()
            for other in self._workers:
                if other.process is not None:
                    self._signal(other, signal.SIGTERM)
            return
        ran = time.monotonic() - worker.started_at
        if served and ran >= STEADY_AFTER:
            worker.backoff = FIRST_BACKOFF
        delay = worker.backoff
        worker.backoff = min(worker.backoff * 2, MAX_BACKOFF)
        worker.restart_at = time.monotonic() + delay
        _log.error(
            "worker died",
            worker=worker.index,
            pid=pid,
            ran_s=round(ran, 3),
            restart_in_s=delay,
            **how,
        )

    # --- one worker ---

    def _start(self, worker: _Worker) -> None:
        theirs, ours = self._context.Pipe(duplex=False)
        reloads, to_reload = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(
                worker.index,
                # Pickled down the spawn pipe (never on a command line: they hold the keys).
                self._started,
                self._accepted,
                self._loaded,
                self.port,
                self.http_port,
                self._directory,
                ours,
                reloads,
                os.getpid(),
            ),
            name=f"rerank-worker-{worker.index}",
        )
        with _sighup_blocked():
            process.start()
        ours.close()
        reloads.close()
        worker.reloads = _Outbox(to_reload, name=f"rerank-worker-{worker.index}-reloads")
        if worker.restart_at is not None:
            worker.restarts += 1
        # pid before process: /metrics (another thread) reads a worker's pid once it has a process.
        worker.pid = process.pid
        worker.process, worker.ready = process, theirs
        worker.started_at, worker.restart_at = time.monotonic(), None
        worker.reload_pending = False  # it is handed the settings as they are now
        _log.info("worker started", worker=worker.index, pid=process.pid, restarts=worker.restarts)

    def _signal(self, worker: _Worker, signum: int) -> None:
        if worker.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it just exited; its sentinel says so
            os.kill(worker.pid, signum)


@contextlib.contextmanager
def _sighup_blocked() -> Iterator[None]:
    """SIGHUP blocked in this thread meanwhile, and so in a process it starts (a worker, and
    multiprocessing's resource tracker, which the first start launches): the mask is kept
    through fork and exec. A SIGHUP to the whole process group (`systemctl kill -s HUP`, a
    terminal's hangup) would otherwise kill a worker in the second or so before its
    `_worker_main` ignores it (a first start failed, or a restart's backoff doubled), and
    kill the tracker, which unblocks only SIGINT and SIGTERM: started here, it keeps SIGHUP
    blocked. One sent to the supervisor meanwhile is only delayed: pending until the mask
    is set back."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def supervise(settings: Settings, args: Mapping[str, Any]) -> int:
    """Run `serve --workers N` (N >= 2); the supervisor's exit code."""
    return Supervisor(settings, args).run()


# --- in the worker process ---


def _worker_main(
    index: int,
    started: Settings,
    accepted: Settings,
    loaded: Settings,
    port: int,
    http_port: int | None,
    metrics_directory: str,
    ready: Connection,
    reloads: Connection,
    parent: int,
) -> None:
    """One worker: the settings as the workers `started` (the file's first copy), with the
    routes and callers of the copy as the supervisor last `accepted` it, on the supervisor's
    ports, recording its metrics into files in the supervisor's `metrics_directory`. It
    reloads from the settings the supervisor sends on `reloads` (until then, the copy as it
    `loaded` it): it reads no configuration or key file itself."""
    _die_with_parent(parent)
    # Until serve sets its own handlers: a SIGHUP (a reload asked for while this worker
    # starts, or a terminal's hangup) must not kill it, and a SIGINT (Ctrl-C reaches the
    # whole process group) ends it as SIGTERM does, by the signal, not a KeyboardInterrupt
    # traceback and exit code 1.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Started with SIGHUP blocked (_sighup_blocked): ignored now, one that came meanwhile is dropped.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import asyncio

    # The copy as a reload takes it (the caller keys as started, checked with them), as
    # server.py `_reload` does: a worker restarted after a reload serves the routes and
    # callers its siblings reloaded, with the keys the supervisor read for them.
    settings = dataclasses.replace(
        as_restarted(accepted, started), port=port, http_port=http_port, metrics_port=None
    )
    # Every line this worker logs says which worker, and which process, wrote it.
    configure_logging(
        settings.log_format,
        settings.log_level,
        settings.secrets(),
        cache_loggers=True,
        fields={"worker": index, "pid": os.getpid()},
    )
    # A worker serves (the supervisor checks reloads with it).
    from rerank_service.server import ignore_sighup_to_the_end, serve

    def serving(port: int) -> None:
        ready.send(("serving", port))

    asked = _ReloadRequests(reloads, loaded)

    def reload() -> Settings:
        return as_served(asked.settings, started, settings)

    async def run() -> int:
        try:
            return await serve(
                settings,
                reload=reload,
                worker=index,
                on_serving=serving,
                metrics_directory=metrics_directory,
                watch_reloads=asked.watch,
            )
        finally:
            asked.stop()
            # A SIGHUP to the process group as the drained worker exits must not kill it
            # (its supervisor would take that for a failed drain).
            ignore_sighup_to_the_end()

    try:
        code = asyncio.run(run())
        # Drained: its loop, closed, left SIGTERM and SIGINT at their defaults. A second one
        # (the supervisor forwards the process group's: Ctrl-C, systemd's KillMode) must not
        # kill it now, nor a KeyboardInterrupt end it with a traceback and exit code 1.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ConfigError as exc:
        print(f"rerank-service: configuration error: {exc}", file=sys.stderr)
        code = 2
    except RuntimeError as exc:
        print(f"rerank-service: cannot start: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


class _ReloadRequests:
    """What a worker reloads from: the settings its supervisor last sent on `connection`,
    each with the ask to reload (a SIGHUP to the worker itself reloads them again)."""

    def __init__(self, connection: Connection, loaded: Settings) -> None:
        self.settings = loaded
        self._connection = connection
        self._watching = False

    def watch(self, reload_now: Callable[[], None]) -> None:
        """Call `reload_now` on each message once it is read: from the server's loop."""
        import asyncio

        loop = asyncio.get_running_loop()

        def received() -> None:
            try:
                self.settings = self._connection.recv()
            except (EOFError, OSError):  # the supervisor is gone, and drains this worker
                self.stop()
                return
            reload_now()

        loop.add_reader(self._connection.fileno(), received)
        self._watching = True

    def stop(self) -> None:
        """Read no more (the server has stopped): from the server's loop."""
        if self._watching:
            import asyncio

            asyncio.get_running_loop().remove_reader(self._connection.fileno())
            self._watching = False


# What a worker serves in place of what it loads: the supervisor's ports (chosen once, for
# all of them), and no metrics port (the supervisor serves the sum of the workers' metrics).
_SUPERVISORS = ("port", "http_port", "metrics_port")


def as_served(loaded: Settings, started: Settings, served: Settings) -> Settings:
    """`loaded` (a reload's) with what the worker serves in place of what it loaded at
    start (`started`: `served`) where it loads the same again: a reload compares its settings
    with those served, and names each that differs as left as started (it takes a restart).
    A setting the file changes stays changed, and is named."""
    same = {
        name: getattr(served, name)
        for name in _SUPERVISORS
        if getattr(loaded, name) == getattr(started, name)
    }
    return dataclasses.replace(loaded, **same)


def as_restarted(reloaded: Settings, started: Settings) -> Settings:
    """What a worker restarted after reloads serves: `reloaded` (the copy now, as a reload
    takes it) where a running worker's reload applies it (the routes and the callers), and
    `started` in each setting a reload leaves as started (`needs_restart` names it: TLS,
    admission limits, logging, ...), as its siblings still serve them."""
    from rerank_service.server import needs_restart  # late: the worker imports serve with it

    config = ServerConfig.from_settings(started)
    kept = {}
    for field in dataclasses.fields(Settings):
        new = getattr(reloaded, field.name)
        if new == getattr(started, field.name):
            continue
        alone = ServerConfig.from_settings(dataclasses.replace(started, **{field.name: new}))
        # Whether callers' tokens pass through follows the routes' keys too: a route's change
        # is the reload's, not a setting left as started.
        alone = dataclasses.replace(
            alone, callers=dataclasses.replace(alone.callers, pass_through=config.callers.pass_through)
        )
        if needs_restart(config, alone):
            kept[field.name] = getattr(started, field.name)
    return dataclasses.replace(reloaded, **kept)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM (a drain) this worker when the supervisor dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
