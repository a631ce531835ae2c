"""The supervisor's `process_*` metrics over itself and its workers (observability/process_tree.py),
read from the real /proc of real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rerank_service.observability.metrics_multiprocess import multiprocess_registry
from rerank_service.observability.process_tree import (
    CLOCK_TICKS,
    PAGE_SIZE,
    ProcessTreeCollector,
    WorkerProcess,
    read_stat,
)

# Burns about `seconds` of CPU, then sleeps until killed: a worker with CPU time to count.
BURN = """import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
time.sleep(60)
"""


def _samples(collector: ProcessTreeCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def _burning(seconds: float) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", BURN, str(seconds)])
    deadline = time.monotonic() + 30
    while (stat := read_stat(child.pid)) is None or stat.cpu_seconds < seconds * 0.9:
        assert time.monotonic() < deadline, "the child did not burn its CPU"
        time.sleep(0.05)
    return child


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        child.kill()
        child.wait()


def test_read_stat_counts_from_the_last_parenthesis_of_the_command_name(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    # 52 fields; a command name with a space and a ")" of its own, as /proc writes it
    rest = ["S"] + ["0"] * 49
    rest[11], rest[12], rest[13], rest[14] = "300", "100", "50", "50"  # utime stime cutime cstime
    rest[19], rest[21] = "12345", "256"  # starttime, rss in pages
    (tmp_path / "42" / "stat").write_text(f"42 (rerank) worker) {' '.join(rest)}\n")
    stat = read_stat(42, tmp_path)
    assert stat is not None
    assert stat.cpu_seconds == pytest.approx(500 / CLOCK_TICKS)
    assert stat.resident_bytes == 256 * PAGE_SIZE
    assert stat.start_ticks == 12345


def test_read_stat_of_a_process_that_is_gone_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert read_stat(child.pid) is None
    assert read_stat(os.getpid()) is not None


def test_the_cpu_total_keeps_a_worker_that_exited_and_counts_a_live_one_once(
    children: list[subprocess.Popen[bytes]],
) -> None:
    first, second = _burning(1.0), _burning(0.4)
    children += [first, second]
    workers = [WorkerProcess(0, first.pid, 0), WorkerProcess(1, second.pid, 0)]
    collector = ProcessTreeCollector(lambda: workers)
    before = _samples(collector)
    total = before[("process_cpu_seconds_total", ())]
    own = sum(os.times()[:4])  # this process and what it already reaped
    assert total >= own + 1.3  # both workers' CPU is in it
    assert before[("rerank_worker_cpu_seconds_total", (("worker", "0"),))] >= 0.9
    assert before[("rerank_worker_resident_memory_bytes", (("worker", "1"),))] > 1 << 20

    first.kill()
    first.wait()  # reaped: its CPU is now in RUSAGE_CHILDREN
    workers[0] = WorkerProcess(0, None, 1)  # waiting for its restart
    after = _samples(collector)
    assert after[("process_cpu_seconds_total", ())] >= total  # never goes back
    assert after[("process_cpu_seconds_total", ())] < total + 0.5  # nor counts the dead one (1 s) twice
    assert ("rerank_worker_cpu_seconds_total", (("worker", "0"),)) not in after
    assert after[("rerank_worker_restarts_total", (("worker", "0"),))] == 1
    assert after[("process_resident_memory_bytes", ())] < before[("process_resident_memory_bytes", ())]


def test_the_supervisors_registry_has_the_workers_files_and_the_process_tree() -> None:
    with tempfile.TemporaryDirectory() as directory:
        registry = multiprocess_registry(directory, lambda: [WorkerProcess(0, os.getpid(), 2)])
        names = {
            sample.name
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples
        }
    assert {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "rerank_worker_restarts_total",
    } <= names


def test_the_cpu_total_never_goes_back_even_when_a_read_misses_a_worker(
    children: list[subprocess.Popen[bytes]],
) -> None:
    worker = _burning(0.5)
    children.append(worker)
    workers = [WorkerProcess(0, worker.pid, 0)]
    collector = ProcessTreeCollector(lambda: workers)
    total = _samples(collector)[("process_cpu_seconds_total", ())]
    # As if the worker had been reaped between the two reads: in neither of them.
    workers[0] = WorkerProcess(0, None, 0)
    assert _samples(collector)[("process_cpu_seconds_total", ())] == total
