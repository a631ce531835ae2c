"""`process_*` metrics of the whole service under `serve --workers N`: the supervisor and
its workers as one, plus each worker's own.

prometheus-client's process collector reads the process it runs in, and its multiprocess
mode (how the workers' metrics reach the supervisor) has no `process_*` at all. The
supervisor serves /metrics, so it reads them itself, from Linux's /proc, at each scrape:

- `process_cpu_seconds_total`: the supervisor's CPU, that of every worker that has
  exited (the kernel adds a child's CPU to its parent's once the parent has reaped it:
  `RUSAGE_CHILDREN`), and that of every live worker and what it has reaped. So a worker
  that dies and restarts neither takes its CPU away from the total nor counts it twice.
- `process_resident_memory_bytes`, `process_open_fds`: summed over the live processes.
- `process_start_time_seconds`, `process_max_fds`: the supervisor's.
- `rerank_worker_*{worker}`: each worker slot's CPU (since its current process started),
  resident memory and restarts, to spot one worker hotter or larger than the others.
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class WorkerProcess:
    """One worker slot as the supervisor sees it now."""

    index: int
    pid: int | None  # None while it waits to be restarted
    restarts: int


@dataclass(frozen=True)
class ProcessStat:
    cpu_seconds: float  # its own and its reaped children's, user and system
    resident_bytes: int
    start_ticks: int  # since boot


def read_stat(pid: int, proc: Path = Path("/proc")) -> ProcessStat | None:
    """/proc/PID/stat, or None when the process is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count from the last ")".
    fields = text[text.rfind(")") + 2 :].split()  # fields[0] is field 3, state
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return ProcessStat(
        cpu_seconds=(utime + stime + cutime + cstime) / CLOCK_TICKS,
        resident_bytes=int(fields[21]) * PAGE_SIZE,
        start_ticks=int(fields[19]),
    )


def open_fds(pid: int, proc: Path = Path("/proc")) -> int:
    try:
        return len(os.listdir(proc / str(pid) / "fd"))
    except OSError:
        return 0


def boot_time(proc: Path = Path("/proc")) -> float:
    for line in (proc / "stat").read_text(encoding="ascii").splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


class ProcessTreeCollector(Collector):
    """Collects the supervisor's and its workers' `process_*` metrics at each scrape."""

    def __init__(self, workers: Callable[[], Sequence[WorkerProcess]], proc: Path = Path("/proc")) -> None:
        self._workers = workers
        self._proc = proc
        self._pid = os.getpid()
        # A worker reaped between reading RUSAGE_CHILDREN and its /proc is in neither: that
        # scrape would undercount, and a counter that goes back reads as a reset. So the
        # total never goes below the last one given (scrapes may run on several threads).
        self._cpu_given = 0.0
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers that exited, and theirs
        cpu = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
        supervisor = read_stat(self._pid, self._proc)
        resident = supervisor.resident_bytes if supervisor else 0
        fds = open_fds(self._pid, self._proc)

        worker_cpu = CounterMetricFamily(
            "rerank_worker_cpu_seconds",
            "CPU seconds of a worker's current process (user and system; restarts from 0 with it)",
            labels=["worker"],
        )
        worker_memory = GaugeMetricFamily(
            "rerank_worker_resident_memory_bytes", "resident memory of a worker's process", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "rerank_worker_restarts", "times a worker was restarted after it died", labels=["worker"]
        )
        for worker in self._workers():
            restarts.add_metric([str(worker.index)], worker.restarts)
            stat = read_stat(worker.pid, self._proc) if worker.pid is not None else None
            if stat is None or worker.pid is None:
                continue
            cpu += stat.cpu_seconds
            resident += stat.resident_bytes
            fds += open_fds(worker.pid, self._proc)
            worker_cpu.add_metric([str(worker.index)], stat.cpu_seconds)
            worker_memory.add_metric([str(worker.index)], stat.resident_bytes)

        with self._lock:
            cpu = self._cpu_given = max(cpu, self._cpu_given)
        yield CounterMetricFamily(
            "process_cpu_seconds", "CPU seconds of the supervisor and every worker, live or exited", value=cpu
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "resident memory of the supervisor and live workers", resident
        )
        yield GaugeMetricFamily("process_open_fds", "open file descriptors, supervisor and workers", fds)
        yield GaugeMetricFamily(
            "process_max_fds",
            "the supervisor's limit of open file descriptors (each worker has its own)",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        if supervisor is not None:
            started = boot_time(self._proc) + supervisor.start_ticks / CLOCK_TICKS
            yield GaugeMetricFamily(
                "process_start_time_seconds", "the supervisor's start, in seconds since the epoch", started
            )
        yield worker_cpu
        yield worker_memory
        yield restarts
