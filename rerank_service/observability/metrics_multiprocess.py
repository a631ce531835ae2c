"""prometheus-client's multiprocess mode (`serve --workers N`): where a process keeps its
metric values, chosen when its `Metrics` is made, and the supervisor's sum of its workers'.

prometheus-client stores every metric child's value in an instance of one class,
`prometheus_client.values.ValueClass`: a module global it sets when it is first imported
(files when PROMETHEUS_MULTIPROC_DIR is set, memory otherwise) and reads each time a child
is made, at a metric's `.labels()`. Files are named from that environment variable whenever
a value is made. Left as is, the mode would depend on the environment at import time, an
import-order rule. `use_value_storage` sets both explicitly instead, when the process's
`Metrics` is made: the mode is an argument. It stays a property of the whole process (the
library has no other), so a process keeps its values one way only, and saying otherwise
later is an error rather than metrics silently missing from the sum.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, multiprocess, values
from prometheus_client.platform_collector import PlatformCollector

from rerank_service.observability.process_tree import ProcessTreeCollector, WorkerProcess

_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class _ValueStorage:
    """What this process chose: None (not yet), "" (memory) or the files' directory."""

    chosen: str | None = None


def use_value_storage(directory: str | None) -> None:
    """Keep this process's metric values in files in `directory` (a worker), or in memory
    (None). Chosen once per process: a different choice later raises RuntimeError."""
    wanted = directory or ""
    chosen = _ValueStorage.chosen
    if chosen is not None:
        if chosen != wanted:
            raise RuntimeError(
                f"this process keeps its metric values {_where(chosen)} already; "
                f"it cannot keep them {_where(wanted)} too"
            )
        return
    if directory is None:
        values.ValueClass = values.MutexValue
    else:
        os.environ[_DIRECTORY_VARIABLE] = directory  # what each value's file is named from
        # One per process: each holds its own open files, and two would write the same ones.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _ValueStorage.chosen = wanted


def _where(chosen: str) -> str:
    return f"in files in {chosen}" if chosen else "in memory"


def multiprocess_registry(
    directory: str, workers: Callable[[], Sequence[WorkerProcess]] = tuple
) -> CollectorRegistry:
    """The workers' metrics summed from their files in `directory` (the supervisor's /metrics),
    with the `process_*` of the supervisor and its `workers` together and `python_info`.

    Counters and histograms keep a dead worker's counts (its files stay); gauges count
    only live workers once `worker_exited` has been told. Reading files needs no choice
    of storage: the supervisor records nothing itself."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(ProcessTreeCollector(workers))
    PlatformCollector(registry=registry)
    return registry


def worker_exited(pid: int, directory: str) -> None:
    """A worker process is gone: drop its live gauges (calls in flight, deployment state)."""
    multiprocess.mark_process_dead(pid, path=directory)  # type: ignore[no-untyped-call]
