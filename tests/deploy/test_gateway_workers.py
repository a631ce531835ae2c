"""The gateway values leave room in the memory limit for the workers `--workers=auto`
starts (docs/DEPLOY.md): one per core of the CPU limit, or of the node without one."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from rerank_service.config.settings import options

# Read from the values file, not rendered: the chart gives `resources` to the container as is.
GATEWAY_VALUES = Path(__file__).resolve().parents[2] / "deploy" / "values-upstream-gateway.yaml"

# What docs/DEPLOY.md says a process takes, rounded up: a worker idle (measured: 85 MiB) and
# the supervisor (~67 MB); a worker's score cache, once calls fill it, adds a little more
# than its --cache-memory-mb (measured: 64 MiB counted, +67 MiB of RSS).
WORKER_IDLE_BYTES = 90 * 10**6
CACHE_OVERHEAD = 1.1
SUPERVISOR_BYTES = 70 * 10**6
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def _bytes(quantity: str) -> int:
    for unit, factor in _UNITS.items():
        if quantity.endswith(unit):
            return int(quantity[: -len(unit)]) * factor
    return int(quantity)


def _cores(quantity: str) -> int:
    """A CPU quantity ("2", "1500m") as `--workers auto` counts it: rounded up."""
    return math.ceil(int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity))


def _cache_bytes(extra_args: list[str]) -> int:
    """A worker's score cache when full: `--cache-memory-mb=N` in extraArgs, else the default."""
    megabytes: int = next(option.default for option in options() if option.name == "cache_memory_mb")
    for arg in extra_args:
        if arg.startswith("--cache-memory-mb="):
            megabytes = int(arg.split("=", 1)[1])
    return int(megabytes * 2**20 * CACHE_OVERHEAD)


def test_the_gateway_s_memory_limit_holds_the_workers_of_its_cpu_limit() -> None:
    values = yaml.safe_load(GATEWAY_VALUES.read_text())
    limits = values["resources"]["limits"]
    # Without a CPU limit `auto` counts the node's cores: 7 or more, warm, pass 1Gi.
    assert "cpu" in limits, "no CPU limit: --workers=auto would start one worker per node core"
    workers = _cores(str(limits["cpu"]))
    worker_bytes = WORKER_IDLE_BYTES + _cache_bytes([str(a) for a in values.get("extraArgs") or []])
    assert SUPERVISOR_BYTES + workers * worker_bytes <= _bytes(str(limits["memory"]))


def test_a_warm_worker_is_sized_with_its_default_score_cache() -> None:
    """The figures DEPLOY.md gives: about 160 MB a worker once its cache is full, so 7 workers
    and the supervisor pass 1Gi, 6 do not."""
    worker_bytes = WORKER_IDLE_BYTES + _cache_bytes([])
    assert 155 * 10**6 <= worker_bytes <= 165 * 10**6
    assert SUPERVISOR_BYTES + 6 * worker_bytes <= 2**30 < SUPERVISOR_BYTES + 7 * worker_bytes
