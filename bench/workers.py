"""`serve --workers 2` against one process, side by side in one run, on loopback.

    make bench-workers                  # or: .venv/bin/python -m bench.workers
    BENCH_QUICK=1 make bench-workers    # a short smoke run (writes bench/results/workers/ only)

Two services run at once, `rerank-service serve --backend upstream --workers 1` and
`--workers 2`, in front of the same upstream; measured runs alternate between them
(interleaved rounds), so both see the same machine. Scenarios:

1. Slow upstream (bench/slow_upstream.py, every answer after 2 s), ghz at 256 and 1,024
   callers: requests/s against Little's-law limit (callers / 2 s), as bench/perf.py's
   slow scenario measures it (a warm-up round, then rounds of `callers` calls, each
   with a 6 s deadline).
2. Fast upstream (nginx, a static answer), ghz at 64 callers: requests/s and CPU time
   per call of the whole process tree (supervisor and workers), of ghz and of nginx.

The measuring parts (ghz, nginx, the slow upstream, ports) are bench/perf.py's. The
generated part of docs/PERFORMANCE.md (between its bench-workers markers) is rewritten;
raw ghz reports land in bench/results/workers/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import perf
from bench.perf_payloads import UPSTREAM_KEY
from rerank_service.config.cores import usable_cores
from tests.support.process import ServiceProcess

RESULTS = perf.ROOT / "bench" / "results" / "workers"
BEGIN, END = "<!-- bench-workers:start -->", "<!-- bench-workers:end -->"
WORKERS: tuple[int, ...] = (1, 2)  # --workers: the processes of each service compared
SLOW_CONCURRENCY = perf.SLOW_CONCURRENCY  # (256, 1024)
SLOW_LATENCY = perf.SLOW_LATENCY  # 2 s
DOCUMENTS = perf.SLOW_DOCUMENTS  # 20, in both scenarios
FAST_CONCURRENCY = 64
CONNECTIONS = 8  # the least ghz connections: SO_REUSEPORT spreads connections, not calls
GOALS = {256: 0.95, 1024: 0.9}  # with --workers 2, of Little's-law limit
ONE_PROCESS_BEFORE = {256: 0.91, 1024: 0.76}  # one process, docs/PERFORMANCE.md's bench-perf run


@dataclass(frozen=True)
class Plan:
    slow_repeats: int  # interleaved measured runs per slow point and run
    slow_rounds: int  # rounds of `callers` calls per measured slow run
    fast_repeats: int  # interleaved measured runs per fast point and run
    seconds: float  # measured seconds per fast run
    warmup: float  # warm-up seconds before each fast run
    quick: bool


FULL = Plan(slow_repeats=2, slow_rounds=4, fast_repeats=3, seconds=10, warmup=2, quick=False)
QUICK = Plan(slow_repeats=1, slow_rounds=2, fast_repeats=1, seconds=3, warmup=1, quick=True)


@dataclass
class Run:
    """Every measured run of one service at one point."""

    scenario: str  # "slow" or "fast"
    concurrency: int
    workers: int
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    errors: int = 0
    calls: int = 0
    cpu: float = 0.0  # CPU seconds of the service's whole process tree over the measured runs
    ghz_cpu: float = 0.0
    upstream_cpu: float = 0.0  # nginx (fast) or bench/slow_upstream.py (slow)

    @property
    def mean_rps(self) -> float:
        return statistics.fmean(self.rps)

    def per_call(self, seconds: float) -> float:
        """CPU-µs per call (answered or failed)."""
        return seconds / max(self.calls + self.errors, 1) * 1e6


def connections(concurrency: int) -> int:
    """ghz connections: bench/perf.py's one per 64 callers, but at least CONNECTIONS, so the
    kernel has connections to spread over the workers (at c=64 perf.py opens one, which
    would put every call on one worker)."""
    return max(CONNECTIONS, _perf_connections(concurrency))


_perf_connections = perf.connections


# --- processes -----------------------------------------------------------------------------


def children_cpu() -> float:
    """CPU seconds of this process's children waited for so far: the ghz runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def service(port: int, upstream_url: str, workers: int) -> Iterator[int]:
    """`serve --backend upstream --workers N` with its defaults, once every worker serves."""
    if not perf.port_frees_up(port):
        raise RuntimeError(f"port {port} (service) is taken: pass another --base-port")
    args = ["--backend", "upstream", "--upstream-url", upstream_url, "--port", str(port)]
    args += ["--workers", str(workers)]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as process:
        assert process.process is not None
        deadline = time.monotonic() + 60
        while workers > 1 and (
            len({e["worker"] for e in process.events() if e.get("event") == "worker ready"}) < workers
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"--workers {workers}: not every worker serving in 60 s")
            time.sleep(0.05)
        try:
            yield process.process.pid
        finally:
            process.terminate()


# --- measuring ------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure(run: Run, pid: int, port: int, tag: str, *, plan: Plan, upstream_pid: int) -> None:
    """One warm-up, then one measured ghz run, added to `run`."""
    slow = run.scenario == "slow"
    c = run.concurrency
    if slow:
        perf.ghz(port, DOCUMENTS, c, RESULTS / f"{tag}-warmup.json", requests=c, timeout=perf.SLOW_TIMEOUT)
    else:
        perf.ghz(port, DOCUMENTS, c, RESULTS / f"{tag}-warmup.json", seconds=plan.warmup)
    cpu, ghz_cpu = perf.tree_cpu_seconds(pid), children_cpu()
    upstream_cpu = perf.tree_cpu_seconds(upstream_pid)  # nginx: master and worker
    if slow:
        report = perf.ghz(
            port,
            DOCUMENTS,
            c,
            RESULTS / f"{tag}.json",
            requests=c * plan.slow_rounds,
            timeout=perf.SLOW_TIMEOUT,
        )
    else:
        report = perf.ghz(port, DOCUMENTS, c, RESULTS / f"{tag}.json", seconds=plan.seconds)
    run.cpu += perf.tree_cpu_seconds(pid) - cpu
    run.ghz_cpu += children_cpu() - ghz_cpu
    run.upstream_cpu += perf.tree_cpu_seconds(upstream_pid) - upstream_cpu
    point = perf.from_ghz(run.scenario, DOCUMENTS, c, f"workers {run.workers}", report)
    run.rps.append(point.rps)
    run.p50.append(point.p50)
    run.p99.append(point.p99)
    run.calls += point.count
    run.errors += point.errors
    errors = f", {point.errors} ERRORS" if point.errors else ""
    limit = f" ({point.rps / (c / SLOW_LATENCY):.3f}x Little)" if slow else ""
    cpu_note = "" if slow else f", {run.per_call(run.cpu):.0f} CPU-µs/call so far"
    say(
        f"  {run.scenario} c={c:<5} workers {run.workers}: {point.rps:9.1f} req/s{limit}  "
        f"p50 {point.p50 * 1e3:8.2f} ms  p99 {point.p99 * 1e3:8.2f} ms{cpu_note}{errors}"
    )


def slow_scenario(runs: list[Run], plan: Plan, base: int) -> None:
    upstream_port = base
    command = [
        sys.executable,
        "-m",
        "bench.slow_upstream",
        "--port",
        str(upstream_port),
        "--latency",
        str(SLOW_LATENCY),
        "--documents",
        str(DOCUMENTS),
    ]
    url = f"http://127.0.0.1:{upstream_port}"
    say(f"slow upstream ({SLOW_LATENCY:g} s), {DOCUMENTS} documents, workers {WORKERS} interleaved")
    slow_upstream = perf.background(command, upstream_port, "slow upstream")
    with slow_upstream as upstream, contextlib.ExitStack() as stack:
        targets = {
            workers: (stack.enter_context(service(base + 10 + i, url, workers)), base + 10 + i)
            for i, workers in enumerate(WORKERS)
        }
        for _, port in targets.values():
            perf.check_answer(port, DOCUMENTS)
        for concurrency in SLOW_CONCURRENCY:
            points = {workers: Run("slow", concurrency, workers) for workers in WORKERS}
            runs.extend(points.values())
            for repeat in range(plan.slow_repeats):
                order = WORKERS if repeat % 2 == 0 else WORKERS[::-1]
                for workers in order:
                    pid, port = targets[workers]
                    tag = f"slow-c{concurrency}-w{workers}-{repeat}"
                    measure(points[workers], pid, port, tag, plan=plan, upstream_pid=upstream.pid)


def fast_scenario(runs: list[Run], plan: Plan, base: int) -> None:
    upstream_port = base + 1
    url = f"http://127.0.0.1:{upstream_port}"
    say(f"fast upstream (nginx), {DOCUMENTS} documents, c={FAST_CONCURRENCY}, workers {WORKERS} interleaved")
    with perf.nginx({DOCUMENTS: upstream_port}) as nginx, contextlib.ExitStack() as stack:
        targets = {
            workers: (stack.enter_context(service(base + 20 + i, url, workers)), base + 20 + i)
            for i, workers in enumerate(WORKERS)
        }
        for _, port in targets.values():
            perf.check_answer(port, DOCUMENTS)
        points = {workers: Run("fast", FAST_CONCURRENCY, workers) for workers in WORKERS}
        runs.extend(points.values())
        for repeat in range(plan.fast_repeats):
            order = WORKERS if repeat % 2 == 0 else WORKERS[::-1]
            for workers in order:
                pid, port = targets[workers]
                tag = f"fast-c{FAST_CONCURRENCY}-w{workers}-{repeat}"
                measure(points[workers], pid, port, tag, plan=plan, upstream_pid=nginx.pid)


# --- the report -----------------------------------------------------------------------------


def get(runs: list[Run], scenario: str, concurrency: int, workers: int) -> Run | None:
    for run in runs:
        if (run.scenario, run.concurrency, run.workers) == (scenario, concurrency, workers):
            return run
    return None


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f" ({min(values):,.0f} to {max(values):,.0f})"


def queueing_model(concurrency: int, workers: int, run: Run) -> float:
    """Little's-law ratio when a round's CPU queues and an average call waits half of it on top of
    the upstream's latency. Two limits, the longer wait wins: the service's CPU (callers x its CPU
    per call) on `workers` event loops, and everything's CPU (the service's, ghz's and the
    upstream's) on the machine's cores, which they share."""
    on_loops = concurrency * run.per_call(run.cpu) / 1e6 / (2 * workers)
    everything = run.per_call(run.cpu + run.ghz_cpu + run.upstream_cpu)
    on_cores = concurrency * everything / 1e6 / (2 * usable_cores())
    return SLOW_LATENCY / (SLOW_LATENCY + max(on_loops, on_cores))


def needs(runs: list[Run]) -> str:
    """What each goal takes by the queueing estimate, with this run's CPU per call: the free
    cores (workers) at that CPU, or the CPU per call with two workers; and what the machine's
    own cores leave the service once ghz and the upstream have had theirs."""
    slow = [run for run in runs if run.scenario == "slow" and run.calls]
    if not slow:
        return ""
    t = statistics.fmean(run.per_call(run.cpu) for run in slow) / 1e6  # seconds of CPU a call
    others = statistics.fmean(run.per_call(run.ghz_cpu + run.upstream_cpu) for run in slow) / 1e6
    cores = usable_cores()
    said, budgets = [], []
    for concurrency, goal in GOALS.items():
        wait = SLOW_LATENCY / goal - SLOW_LATENCY  # the longest average wait the goal allows
        workers = math.ceil(concurrency * t / (2 * wait))
        most = 2 * wait * 2 / concurrency  # CPU per call two workers may spend
        said.append(
            f"{goal:.2f}x at {concurrency:,} callers takes {workers} worker{'s' * (workers > 1)} on free "
            f"cores, or two at under {most * 1e6:,.0f} µs a call"
        )
        everything = 2 * wait * cores / concurrency  # CPU per call all processes may spend
        left = everything - others
        share = f"the service {left * 1e6:,.0f} µs" if left > 0 else "nothing for the service"
        budgets.append(
            f"{goal:.2f}x at {concurrency:,} callers allows the three {everything * 1e6:,.0f} µs a call, "
            f"which leaves {share}"
        )
    return (
        f"With this run's {t * 1e6:,.0f} CPU-µs a call, " + "; ".join(said) + ". "
        f"On these {cores} cores the service shares the CPUs with ghz and the slow upstream, which took "
        f"{others * 1e6:,.0f} µs a call between them: by the same estimate over all three, "
        + "; ".join(budgets)
        + "."
    )


def report(runs: list[Run], plan: Plan, seconds: float) -> str:
    lines = [
        BEGIN,
        "<!-- Generated by `make bench-workers` (bench/workers.py): edits between the markers are lost. -->",
        "",
        "## Several workers",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.1f} minutes"
        + (" — **BENCH_QUICK=1 smoke run, not a record**" if plan.quick else "")
        + f". Machine: {perf.machine()}.",
        "",
        f"`rerank-service serve --backend upstream --workers N` for N in {', '.join(map(str, WORKERS))} "
        "(a supervisor and N worker processes sharing the port with SO_REUSEPORT), all running, their "
        "measured runs alternating (interleaved rounds, the order flipped each round); "
        f"ghz (`--cpus {perf.GHZ_CPUS}`) opens one "
        f"HTTP/2 connection per 64 callers but at least {CONNECTIONS}, for both runs, so the kernel has "
        "connections to spread over the workers. "
        "Requests/s are the mean of the measured runs (range in brackets).",
        "",
    ]
    slow_rows = [
        f"**Slow upstream ({SLOW_LATENCY:g} s per call, bench/slow_upstream.py), {DOCUMENTS} documents: "
        f"per measured run one warm-up round, then {plan.slow_rounds} rounds of `callers` calls "
        f"({perf.SLOW_TIMEOUT:g} s deadline), {plan.slow_repeats} measured runs each**",
        "",
        "| callers | workers | requests/s | Little's-law limit | ratio | goal | model | p50 ms | p99 ms "
        "| service CPU-µs/call | ghz CPU-µs/call | upstream CPU-µs/call | errors |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for concurrency in SLOW_CONCURRENCY:
        limit = concurrency / SLOW_LATENCY
        for workers in WORKERS:
            run = get(runs, "slow", concurrency, workers)
            if run is None:
                continue
            ratio = run.mean_rps / limit
            goal = "-"
            if workers == 2:
                met = ratio >= GOALS[concurrency]
                goal = f"≥ {GOALS[concurrency]:.2f}x: **{'met' if met else 'NOT met'}**"
                verdicts.append((concurrency, ratio, met))
            slow_rows.append(
                f"| {concurrency:,} | {workers} | {run.mean_rps:,.1f}{_spread(run.rps)} | {limit:,.0f} | "
                f"**{ratio:.3f}x** | {goal} | {queueing_model(concurrency, workers, run):.2f}x | "
                f"{statistics.fmean(run.p50) * 1e3:,.0f} | "
                f"{max(run.p99) * 1e3:,.0f} | {run.per_call(run.cpu):,.0f} | "
                f"{run.per_call(run.ghz_cpu):,.0f} | {run.per_call(run.upstream_cpu):,.0f} | {run.errors} |"
            )
    if verdicts:
        lines += [*slow_rows, ""]
    fast = {workers: get(runs, "fast", FAST_CONCURRENCY, workers) for workers in WORKERS}
    one, two = fast[1], fast[2]
    if one is not None and two is not None:
        lines += [
            f"**Fast upstream (nginx, `worker_processes 1`), {DOCUMENTS} documents, c={FAST_CONCURRENCY}: "
            f"{plan.warmup:g} s warm-up, then {plan.seconds:g} s measured, {plan.fast_repeats} measured "
            "runs each.** CPU per call: utime + stime over the measured runs divided by the calls: the "
            "service's whole process tree (supervisor and workers), ghz's and nginx's.",
            "",
            "| workers | requests/s | p50 ms | p99 ms | service CPU-µs/call | ghz CPU-µs/call "
            "| nginx CPU-µs/call | all three | errors |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for workers, run in ((w, r) for w, r in fast.items() if r is not None):
            total = run.per_call(run.cpu + run.ghz_cpu + run.upstream_cpu)
            lines.append(
                f"| {workers} | {run.mean_rps:,.0f}{_spread(run.rps)} | "
                f"{statistics.fmean(run.p50) * 1e3:.2f} | {max(run.p99) * 1e3:.2f} | "
                f"**{run.per_call(run.cpu):.0f}** | {run.per_call(run.ghz_cpu):.0f} | "
                f"{run.per_call(run.upstream_cpu):.0f} | {total:.0f} | {run.errors} |"
            )
        lines.append("")
    lines += [*summary(runs, verdicts, one, two), "", END]
    return "\n".join(lines)


def summary(
    runs: list[Run], verdicts: list[tuple[int, float, bool]], one: Run | None, two: Run | None
) -> list[str]:
    text = []
    if verdicts:
        said = []
        for concurrency, ratio, met in verdicts:
            single = get(runs, "slow", concurrency, 1)
            versus = ""
            if single is not None:
                versus = f" (one process: {single.mean_rps / (concurrency / SLOW_LATENCY):.2f}x)"
            said.append(
                f"{ratio:.2f}x at {concurrency:,} callers{versus}, goal {GOALS[concurrency]:.2f}x "
                f"{'met' if met else 'not met'}"
            )
        before = ", ".join(f"{ratio:.2f}x at {c:,}" for c, ratio in ONE_PROCESS_BEFORE.items())
        text.append(
            f"**Slow upstream.** With `--workers 2` the service reaches {'; '.join(said)} of Little's-law "
            f"limit (one process in the bench-perf run above: {before}). Against a 2 s upstream a call "
            "costs the server CPU only at its start and its end, but the callers of a round arrive "
            "together, so their calls queue: a round of c calls costs c x t of the service's CPU "
            "(t, its CPU per call, in the table) on W event loops, and an average call waits about half "
            "of it, c·t/(2W), on top of the 2 s. The cores are a second limit: the same round also costs "
            "ghz and the slow upstream their CPU per call, and all three share the machine's N cores, "
            "a wait of c·(t + ghz + upstream)/(2N). The column `model` is 2 s / (2 s + the longer of "
            f"the two waits) with each run's own figures. {needs(runs)}"
        )
    if one is not None and two is not None:
        cores = usable_cores()
        fast = [r for w in WORKERS if w > 1 and (r := get(runs, "fast", FAST_CONCURRENCY, w)) is not None]
        scaling = "; ".join(
            f"`--workers {r.workers}` {r.mean_rps / one.mean_rps:.2f}x at "
            f"{r.per_call(r.cpu) / one.per_call(one.cpu):.2f}x its CPU per call "
            f"({r.per_call(r.cpu):.0f} µs)"
            for r in fast
        )
        service_share = two.per_call(two.cpu) / two.per_call(two.cpu + two.ghz_cpu + two.upstream_cpu)
        head = (
            f"**Fast upstream.** Against one process ({one.per_call(one.cpu):.0f} CPU-µs per call, whole "
            f"process tree): {scaling}."
        )
        if cores < 2 * max(WORKERS) + 2:
            text += [
                "",
                head + f" On this {cores}-core machine the gain is bounded by the machine, not the "
                f"service: ghz and nginx run on the same {cores} cores and take {1 - service_share:.0%} of "
                "all the CPU a call costs, so once one worker is busy there is little core left for "
                "another. With cores to spare each worker is one event loop on its own core and the "
                "workers share nothing on a call's path, so requests/s grow with the workers until the "
                "upstream, the load generator or the network is the limit.",
            ]
        else:
            text += [
                "",
                head + f" With cores to spare ({cores} here), requests/s grow with the workers. Less "
                "than linearly: the same callers spread over more event loops, so each loop turn "
                "serves fewer calls and its fixed cost is shared by fewer, and the CPU per call rises.",
            ]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=27200,
        help="first of the loopback ports used (below the ephemeral range)",
    )
    parser.add_argument("--doc", type=Path, default=None, help="the document to write the tables into")
    parser.add_argument("--only", choices=("slow", "fast"), action="append", help="run only these")
    parser.add_argument(
        "--workers",
        default="1,2",
        help="comma-separated --workers of the services compared, 1 and 2 among them (default 1,2)",
    )
    args = parser.parse_args()
    global WORKERS
    WORKERS = tuple(int(n) for n in args.workers.split(","))
    if not {1, 2} <= set(WORKERS):
        parser.error("--workers must include 1 and 2 (the goals compare them)")
    plan = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    doc = args.doc or (RESULTS / "PERFORMANCE-quick.md" if plan.quick else perf.DOC)
    if not perf.GHZ.exists():
        raise SystemExit(f"ghz is missing at {perf.GHZ}: run bash bench/install-ghz.sh")
    RESULTS.mkdir(parents=True, exist_ok=True)
    perf.connections = connections  # perf.ghz opens this many connections
    perf.RESULTS.mkdir(parents=True, exist_ok=True)  # perf.ghz keeps its request files there
    runs: list[Run] = []
    started = time.monotonic()
    scenarios = args.only or ["slow", "fast"]
    if "slow" in scenarios:
        slow_scenario(runs, plan, args.base_port)
    if "fast" in scenarios:
        fast_scenario(runs, plan, args.base_port)
    block = report(runs, plan, time.monotonic() - started)
    perf.write_section(doc, BEGIN, END, block)
    (RESULTS / "runs.json").write_text(json.dumps([asdict(run) for run in runs], indent=1))
    print("\n" + block)
    say(f"wrote {doc.relative_to(perf.ROOT) if doc.is_relative_to(perf.ROOT) else doc}")


if __name__ == "__main__":
    main()
