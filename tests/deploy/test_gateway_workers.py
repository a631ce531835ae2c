"""The gateway values leave room in the memory limit for the workers `--workers=auto`
starts (docs/DEPLOY.md): one per core of the CPU limit, or of the node without one."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

# Read from the values file, not rendered: the chart gives `resources` to the container as is.
GATEWAY_VALUES = Path(__file__).resolve().parents[2] / "deploy" / "values-upstream-gateway.yaml"

# What docs/DEPLOY.md says a process takes (measured idle: ~85 MB a worker, ~67 MB the
# supervisor), rounded up.
WORKER_BYTES = 90 * 10**6
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


def test_the_gateway_s_memory_limit_holds_the_workers_of_its_cpu_limit() -> None:
    limits = yaml.safe_load(GATEWAY_VALUES.read_text())["resources"]["limits"]
    # Without a CPU limit `auto` counts the node's cores: 12 or more pass 1Gi.
    assert "cpu" in limits, "no CPU limit: --workers=auto would start one worker per node core"
    workers = _cores(str(limits["cpu"]))
    assert SUPERVISOR_BYTES + workers * WORKER_BYTES <= _bytes(str(limits["memory"]))
