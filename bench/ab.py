"""A/B: the service's CPU per call and requests/s, this tree against another revision.

    .venv/bin/python -m bench.ab --base REV            # e.g. --base main~5
    .venv/bin/python -m bench.ab --base REV --rounds 6 --documents 20 --concurrency 64

Both services run at once, `rerank-service serve --backend upstream` in front of the same
nginx fast upstream (bench/perf.py's), the base one from a git worktree of REV (same
virtualenv, its package first on PYTHONPATH). ghz drives them in alternating rounds, so
load that comes and goes on a shared machine falls on both alike; each figure is the mean
of the rounds, CPU per call read from /proc (the whole process). Prints a table; writes
nothing into docs/ (quote its figures where a change claims a speed).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import perf
from tests.support.process import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """A detached checkout of `revision`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="rerank-ab-") as scratch:
        path = Path(scratch) / "base"
        add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision]
        subprocess.run(add, check=True)
        try:
            yield path
        finally:
            remove = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)]
            subprocess.run(remove, check=False)


@contextlib.contextmanager
def service_from(source: Path | None, port: int, url: str) -> Iterator[int]:
    """perf.service, from `source` (a checkout) instead of this tree when given."""
    if source is None:
        with perf.service(port, url) as pid:
            yield pid
        return
    original = ServiceProcess

    def from_source(args: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
        return original(args, env={**(env or {}), "PYTHONPATH": str(source)})

    perf.ServiceProcess = from_source  # type: ignore[assignment,attr-defined]
    try:
        with perf.service(port, url) as pid:
            yield pid
    finally:
        perf.ServiceProcess = original  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (git rev)")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds of each service")
    parser.add_argument("--documents", type=int, default=20, choices=perf.FAST_DOCUMENTS)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--base-port", type=int, default=27600)
    args = parser.parse_args()
    plan = perf.FULL
    perf.RESULTS.mkdir(parents=True, exist_ok=True)  # ghz's request and report files
    upstream_port, base_port, this_port = args.base_port, args.base_port + 1, args.base_port + 2
    with worktree(args.base) as source, perf.nginx({args.documents: upstream_port}):
        url = f"http://127.0.0.1:{upstream_port}"
        with service_from(source, base_port, url) as base_pid, service_from(None, this_port, url) as this_pid:
            perf.check_answer(base_port, args.documents)
            perf.check_answer(this_port, args.documents)
            runs = {"base": (base_pid, base_port), "this tree": (this_pid, this_port)}
            points: dict[str, list[perf.Point]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, (pid, port) in runs.items():
                    points[name].append(
                        perf.measure_grpc(
                            "ab", name, pid, port, args.documents, args.concurrency, plan, slow=False
                        )
                    )
    rounds = f"{args.rounds} alternating rounds"
    print(f"\n{args.documents} documents, c={args.concurrency}, {rounds} (base {args.base})")
    print("| service | requests/s | CPU per call (µs) | each round's CPU per call |")
    print("| --- | ---: | ---: | --- |")
    cpu: dict[str, float] = {}
    for name, measured in points.items():
        rates = [point.rps for point in measured]
        cpus = [point.cpu_us for point in measured if point.cpu_us is not None]
        cpu[name] = statistics.mean(cpus)
        rounds = ", ".join(f"{value:.0f}" for value in cpus)
        print(f"| {name} | {statistics.mean(rates):.0f} | {cpu[name]:.0f} | {rounds} |")
    print(f"\nthis tree / base, CPU per call: {cpu['this tree'] / cpu['base']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
