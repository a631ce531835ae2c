"""How many cores this process may use: what `--workers auto` counts.

The CPU affinity names the cores the process may run on; a CPU quota in its cgroup (a
Kubernetes CPU limit, systemd's `CPUQuota=`, `docker run --cpus`) lowers that. The quota may
be set on the process's own cgroup or on any above it (a systemd slice, a pod's cgroup above
its container's), and the cgroup is named by /proc/self/cgroup: only inside a cgroup
namespace (most containers) is it the root of /sys/fs/cgroup.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def usable_cores(cgroup: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, lowered to
    the tightest CPU quota of its cgroup and the cgroups above it."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup, proc_cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: str, proc_cgroup: str = PROC_CGROUP) -> float | None:
    """The CPUs the tightest quota over this process's cgroup allows (quota / period), None
    without one. cgroup v2's `cpu.max` ("max 100000" is none) of the process's cgroup and each
    above it, up to `root`; else v1's `cpu.cfs_quota_us` (-1 is none) the same way under
    `root`/cpu."""
    v2, v1 = _own_cgroups(proc_cgroup)
    cpu_max = [Path(root, *parts, "cpu.max") for parts in _upwards(v2)]
    if any(path.exists() for path in cpu_max):
        quotas = [_v2_quota(path) for path in cpu_max]
    else:
        quotas = [_v1_quota(Path(root, "cpu", *parts)) for parts in _upwards(v1)]
    allowed = [quota for quota in quotas if quota is not None]
    return min(allowed) if allowed else None


def _own_cgroups(proc_cgroup: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The process's cgroup path under the v2 hierarchy and under v1's cpu controller, as
    parts ((): the root, also where /proc/self/cgroup cannot be read)."""
    v2: tuple[str, ...] = ()
    v1: tuple[str, ...] = ()
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        parts = tuple(part for part in PurePosixPath(path or "/").parts if part not in ("/", "..", "."))
        if number == "0" and controllers == "":
            v2 = parts
        elif "cpu" in controllers.split(","):
            v1 = parts
    return v2, v1


def _upwards(parts: tuple[str, ...]) -> list[tuple[str, ...]]:
    """`parts` and each cgroup above it, the root last."""
    return [parts[:length] for length in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = directory.joinpath("cpu.cfs_quota_us").read_text().strip()
        period = directory.joinpath("cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        allowed, every = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return allowed / every if allowed > 0 and every > 0 else None
