"""A/B: the service's CPU per call and requests/s, this tree against another revision.

    .venv/bin/python -m bench.ab --base REV            # e.g. --base main~5
    .venv/bin/python -m bench.ab --base REV --rounds 6 --documents 20 --concurrency 64
    .venv/bin/python -m bench.ab --base REV --door http    # the HTTP front door instead
    .venv/bin/python -m bench.ab --base REV --env RERANK_CACHE_MEMORY_MB=0   # both services

Both services run at once, `rerank-service serve --backend upstream` in front of the same
nginx fast upstream (bench/perf.py's), the base one from a git worktree of REV (same
virtualenv, its package first on the import path). The load alternates between them
round after round, so load that comes and goes on a shared machine falls on both alike;
each figure is the mean of the rounds, CPU per call read from /proc (the whole process).

- `--door grpc` (the default): ghz, as bench/perf.py drives the service (a warm-up run
  before each measured one).
- `--door http`: both services also serve HTTP (`--http-port`), hey at c=64 posts the
  Cohere body of bench/http.py to `/v1/rerank`, as `make bench-http` does (a warm-up run
  each, then the rounds, the order reversed every other round).

Prints a table; writes nothing into docs/ (quote its figures where a change claims a speed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import http, perf
from bench.http_minimal import FRONT_DOOR_PATH
from tests.support.process import CLI

ROOT = Path(__file__).resolve().parent.parent
PEER_CAP_FLAG = "--max-connections-per-peer"
BASE, THIS = "base", "this tree"


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


def checkout_env(source: Path) -> dict[str, str]:
    """The environment that runs `python -m rerank_service` from `source`. PYTHONSAFEPATH: `-m`
    otherwise puts the working directory (this tree) ahead of PYTHONPATH."""
    return {"PYTHONPATH": str(source), "PYTHONSAFEPATH": "1"}


def _python(env: dict[str, str], *args: str) -> str:
    """`python ARGS` with `env` added to this environment: its output."""
    completed = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return completed.stdout


def check_source(source: Path, env: dict[str, str]) -> None:
    """The base service imports its package from the checkout, not from this tree."""
    found = _python(env, "-c", "import rerank_service; print(rerank_service.__file__)").strip()
    if not Path(found).resolve().is_relative_to(source.resolve()):
        raise RuntimeError(f"the base service would import {found}, not the checkout at {source}")


def takes_flag(env: dict[str, str], flag: str) -> bool:
    """Whether `rerank-service serve --help`, of the package `env` runs, lists `flag`."""
    return flag in _python(env, *CLI[1:], "serve", "--help")


# A service's rounds: (requests/s, CPU per call in µs) each.
Rounds = dict[str, list[tuple[float, float]]]


def compare_grpc(args: argparse.Namespace, env: dict[str, str], url: str, ports: dict[str, int]) -> Rounds:
    """ghz rounds, alternating between the services."""
    with (
        perf.service(ports[BASE], url, env={**args.env, **env}) as base_pid,
        perf.service(ports[THIS], url, env=args.env) as this_pid,
    ):
        pids = {BASE: base_pid, THIS: this_pid}
        for port in ports.values():
            perf.check_answer(port, args.documents)
        rounds: Rounds = {name: [] for name in pids}
        for _ in range(args.rounds):
            for name, pid in pids.items():
                point = perf.measure_grpc(
                    "ab", name, pid, ports[name], args.documents, args.concurrency, perf.FULL, slow=False
                )
                assert point.cpu_us is not None
                rounds[name].append((point.rps, point.cpu_us))
    return rounds


def compare_http(
    args: argparse.Namespace, env: dict[str, str], url: str, ports: dict[str, int], http_ports: dict[str, int]
) -> Rounds:
    """hey rounds, alternating between the services (bench/http.py's interleave)."""
    with (
        http.front_door(
            ports[BASE],
            url,
            "dashscope",
            None,
            http_port=http_ports[BASE],
            # A base older than the cap per peer has no cap to raise.
            peer_cap_flag=takes_flag(env, PEER_CAP_FLAG),
            env={**args.env, **env},
        ) as (base_pid, _),
        http.front_door(ports[THIS], url, "dashscope", None, http_port=http_ports[THIS], env=args.env) as (
            this_pid,
            _,
        ),
    ):
        targets = []
        for name, pid in ((BASE, base_pid), (THIS, this_pid)):
            door = f"http://127.0.0.1:{http_ports[name]}{FRONT_DOOR_PATH}"
            http.check_http(door, args.documents, {})
            targets.append(http.Target(name, pid, url=door))
        plan = http.Plan(seconds=perf.FULL.seconds, warmup=perf.FULL.warmup, rounds=args.rounds, quick=False)
        results = http.Results(plan)
        http.interleave(results, "ab", args.documents, targets)
    return {
        name: [(item.rps, item.cpu_us) for item in results.rounds("ab", args.documents, name)]
        for name in (BASE, THIS)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (git rev)")
    parser.add_argument("--door", choices=("grpc", "http"), default="grpc", help="the front door loaded")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds of each service")
    parser.add_argument("--documents", type=int, default=20, choices=perf.FAST_DOCUMENTS)
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (gRPC; HTTP is c=64)")
    parser.add_argument("--base-port", type=int, default=27600)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for both services (a setting the base lacks is ignored by it)",
    )
    args = parser.parse_args()
    args.env = dict(item.split("=", 1) for item in args.env)
    if args.door == "http" and args.concurrency != http.CONCURRENCY:
        parser.error(f"--door http runs hey at c={http.CONCURRENCY}, as `make bench-http` does")
    tools = {"grpc": perf.GHZ, "http": http.HEY}
    if not tools[args.door].exists():
        raise SystemExit(f"missing {tools[args.door]}: bash bench/install-{tools[args.door].name}.sh")
    perf.RESULTS.mkdir(parents=True, exist_ok=True)  # ghz's request and report files
    http.RESULTS.mkdir(parents=True, exist_ok=True)  # hey's body and report files
    first = args.base_port
    ports = {BASE: first + 1, THIS: first + 2}
    with worktree(args.base) as source, perf.nginx({args.documents: first}):
        env = checkout_env(source)
        check_source(source, env)
        url = f"http://127.0.0.1:{first}"
        if args.door == "grpc":
            rounds = compare_grpc(args, env, url, ports)
            load = f"c={args.concurrency}, gRPC (ghz)"
        else:
            rounds = compare_http(args, env, url, ports, {BASE: first + 3, THIS: first + 4})
            load = f"c={http.CONCURRENCY}, HTTP {FRONT_DOOR_PATH} (hey)"
    print(f"\n{args.documents} documents, {load}, {args.rounds} alternating rounds (base {args.base})")
    print("| service | requests/s | CPU per call (µs) | each round's CPU per call |")
    print("| --- | ---: | ---: | --- |")
    cpu: dict[str, float] = {}
    for name, measured in rounds.items():
        cpu[name] = statistics.mean(cpu_us for _, cpu_us in measured)
        each = ", ".join(f"{cpu_us:.0f}" for _, cpu_us in measured)
        print(f"| {name} | {statistics.mean(rps for rps, _ in measured):.0f} | {cpu[name]:.0f} | {each} |")
    print(f"\nthis tree / base, CPU per call: {cpu[THIS] / cpu[BASE]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
