"""Upstream HTTP clients compared: the client-side CPU of one upstream call, side by side.

    make bench-transports                  # or: .venv/bin/python -m bench.transports
    BENCH_QUICK=1 make bench-transports    # a short smoke run (writes bench/results/transports/ only)

Each candidate POSTs the upstream body of `make bench-perf`'s request (DashScope native, 20
documents, serialized per call) and parses the JSON answer, to nginx answering a static body
in a process of its own, at concurrency 16 and 64:

- today: the service's transport (rerank_service/backends/upstream/client/transport.py) as the
  backend calls it: post_json on aiohttp's ClientSession;
- httpx-aiohttp, httpx's client: httpx.AsyncClient over httpx-aiohttp's transport (aiohttp's
  pool and C parser beneath httpx's request and response types);
- aiohttp: aiohttp's ClientSession directly;
- httpx2: httpx2.AsyncClient (its own httpcore2 pool, h11 beneath);
- httpx: httpx.AsyncClient on httpcore's own pool.

Every pool holds up to 1,024 connections, idle ones kept 30 s (the service's settings). The
clients run in .venv-transports (bench/transports/requirements.txt, installed with the service
by `make bench-transports`), one process each, alive for the whole run; the benchmark drives
them over stdin. Their measured runs alternate round after round, the order reversed every
other round, so load that comes and goes on a shared machine falls on each alike. Client CPU per
call: time.process_time of the client's process (every thread) over the run, divided by its
calls. The transports section of docs/PERFORMANCE.md is rewritten; the points as JSON land in
bench/results/transports/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import perf
from bench.perf_payloads import RERANK_PATH, UPSTREAM_KEY, upstream_body
from bench.transports_candidates import (
    AIOHTTP,
    HTTPX,
    HTTPX2,
    HTTPX_AIOHTTP_CLIENT,
    TODAY,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "transports"
DOC = ROOT / "docs" / "PERFORMANCE.md"
VENV = ROOT / ".venv-transports"
CLIENT = "bench.transports_client"
# Where the clients run (module -> venv; tests/unit/test_bench_entry_points.py checks its imports there).
ENTRY_POINTS = {CLIENT: ".venv-transports"}
BEGIN, END = "<!-- bench-transports:start -->", "<!-- bench-transports:end -->"

DOCUMENTS = 20
CONCURRENCY = (16, 64)
# The candidates, in the tables' order, and how each is named there.
NAMES = {
    TODAY: "today: transport.py on aiohttp",
    HTTPX_AIOHTTP_CLIENT: "httpx.AsyncClient over httpx-aiohttp",
    AIOHTTP: "aiohttp ClientSession",
    HTTPX2: "httpx2.AsyncClient",
    HTTPX: "httpx.AsyncClient, httpcore's pool",
}
# httpx's API (what the backend is written against) is left only for more than this gain in CPU per call.
API_CHANGE_GAIN = 0.20


@dataclass(frozen=True)
class Plan:
    seconds: float  # measured seconds per run
    warmup: float  # one warm-up run per client and concurrency, before the first round
    rounds: int
    quick: bool


FULL = Plan(seconds=3, warmup=1, rounds=5, quick=False)
QUICK = Plan(seconds=1, warmup=0.5, rounds=2, quick=True)


@dataclass
class Measured:
    candidate: str
    concurrency: int
    round: int
    rps: float
    cpu_us: float  # client CPU per answered call
    calls: int
    errors: int


@dataclass
class Results:
    plan: Plan
    runs: list[Measured] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    load: str = ""  # the load average when the run started

    def rounds(self, candidate: str, concurrency: int) -> list[Measured]:
        return [item for item in self.runs if (item.candidate, item.concurrency) == (candidate, concurrency)]


class Client:
    """One candidate's client process, driven over its stdin."""

    def __init__(self, candidate: str, process: subprocess.Popen[str]) -> None:
        self.candidate = candidate
        self._process = process
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.candidate}: the client exited ({self._process.wait()})")
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    def run(self, concurrency: int, seconds: float) -> dict[str, Any]:
        stdin: IO[str] | None = self._process.stdin
        assert stdin is not None
        stdin.write(f"{concurrency} {seconds}\n")
        stdin.flush()
        return self._answer()


@contextlib.contextmanager
def clients(candidates: list[str], url: str, body: Path) -> Iterator[list[Client]]:
    with contextlib.ExitStack() as stack:
        started = []
        for candidate in candidates:
            command = [str(VENV / "bin" / "python"), "-m", CLIENT, candidate, "--url", url]
            command += ["--path", RERANK_PATH, "--body", str(body), "--key", UPSTREAM_KEY]
            command += ["--documents", str(DOCUMENTS)]
            process = stack.enter_context(
                subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
            stack.callback(process.wait, 30)
            stack.callback(_close, process)
            started.append(Client(candidate, process))
        yield started


def _close(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()  # the client closes its pool and exits


def measure(client: Client, concurrency: int, seconds: float, number: int) -> Measured:
    found = client.run(concurrency, seconds)
    if not found["calls"]:
        raise RuntimeError(f"{client.candidate}: no call answered ({found['errors']} errors)")
    return Measured(
        client.candidate,
        concurrency,
        number,
        rps=found["calls"] / found["wall"],
        cpu_us=found["cpu"] / found["calls"] * 1e6,
        calls=found["calls"],
        errors=found["errors"],
    )


def interleave(results: Results, started: list[Client]) -> None:
    plan = results.plan
    for concurrency in CONCURRENCY:
        for client in started:
            measure(client, concurrency, plan.warmup, 0)
    for number in range(1, plan.rounds + 1):
        for concurrency in CONCURRENCY:
            for client in started if number % 2 else started[::-1]:
                item = measure(client, concurrency, plan.seconds, number)
                results.runs.append(item)
                errors = f", {item.errors} ERRORS" if item.errors else ""
                perf.say(
                    f"  round {number} c={concurrency:<3} {NAMES[item.candidate]:<44} {item.rps:9.1f} req/s "
                    f"{item.cpu_us:7.0f} client CPU-µs/call{errors}"
                )


# --- the report --------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float], digits: int = 0, suffix: str = "") -> str:
    """`mean (min-max)` of the rounds."""
    form = f"{{:,.{digits}f}}{suffix}"
    if len(values) == 1:
        return form.format(values[0])
    return f"{form.format(mean(values))} ({form.format(min(values))}-{form.format(max(values))})"


def ratios(results: Results, candidate: str, concurrency: int, key: str) -> list[float]:
    """`candidate` over today's, round by round (the two runs of a round are seconds apart)."""
    ours = {item.round: getattr(item, key) for item in results.rounds(candidate, concurrency)}
    base = {item.round: getattr(item, key) for item in results.rounds(TODAY, concurrency)}
    return [ours[number] / base[number] for number in sorted(ours) if base.get(number)]


def table(results: Results, concurrency: int) -> list[str]:
    rows = [
        "| client | requests/s | client CPU µs/call | req/s vs today | CPU/call vs today |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for candidate, name in NAMES.items():
        rounds = results.rounds(candidate, concurrency)
        if not rounds:
            continue
        errors = sum(item.errors for item in rounds)
        label = f"{name} ({errors} errors)" if errors else name
        versus = (
            ["1", "1"]
            if candidate == TODAY
            else [spread(ratios(results, candidate, concurrency, key), 2, "x") for key in ("rps", "cpu_us")]
        )
        rows.append(
            f"| {label} | {spread([item.rps for item in rounds])} | "
            f"{spread([item.cpu_us for item in rounds])} | {versus[0]} | {versus[1]} |"
        )
    return rows


def cpu_ratio(results: Results, candidate: str) -> dict[int, float]:
    """By concurrency: the mean per-round CPU-per-call ratio of `candidate` over today's."""
    found = {}
    for concurrency in CONCURRENCY:
        values = ratios(results, candidate, concurrency, "cpu_us")
        if values:
            found[concurrency] = mean(values)
    return found


def _pair(found: dict[int, float]) -> str:
    return " and ".join(f"{found[concurrency]:.2f}x" for concurrency in sorted(found))


def prose(results: Results) -> list[str]:
    """What the figures say: today's stack against each, and the bar for leaving httpx's API."""
    concurrencies = " and ".join(f"c={concurrency}" for concurrency in CONCURRENCY)
    lines = []
    for candidate in NAMES:
        found = cpu_ratio(results, candidate)
        if candidate != TODAY and found:
            lines.append(f"- {NAMES[candidate]}: {_pair(found)} today's CPU per call ({concurrencies}).")
    httpx_api = [HTTPX_AIOHTTP_CLIENT, HTTPX2, HTTPX]
    best = {
        concurrency: min(
            (mean([item.cpu_us for item in results.rounds(candidate, concurrency)]), candidate)
            for candidate in httpx_api
            if results.rounds(candidate, concurrency)
        )
        for concurrency in CONCURRENCY
        if results.rounds(AIOHTTP, concurrency)
    }
    if best:
        gains = {
            concurrency: 1 - mean([item.cpu_us for item in results.rounds(AIOHTTP, concurrency)]) / cpu
            for concurrency, (cpu, _) in best.items()
        }
        over = all(gain > API_CHANGE_GAIN for gain in gains.values())
        described = " and ".join(
            f"{gains[concurrency] * 100:.0f}% less at c={concurrency} (against {NAMES[best[concurrency][1]]})"
            for concurrency in sorted(gains)
        )
        lines += [
            "",
            f"aiohttp's own client against the cheapest client that keeps httpx's API: {described}. "
            f"httpx's API is left only for a gain of more than {API_CHANGE_GAIN * 100:.0f}% CPU per call: "
            f"{'passed' if over else '**not passed**'} here. aiohttp's client is called bare, while "
            "transport.py also does the backend's own per-attempt work (budget, headers, attempt metric, "
            "bounded body), so part of that gap is work the backend would keep on any client.",
        ]
    return lines


def report(results: Results) -> str:
    plan = results.plan
    versions = ", ".join(f"{name} {value}" for name, value in results.versions.items())
    lines = [
        BEGIN,
        "<!-- Generated by `make bench-transports` (bench/transports.py): edits between the markers are "
        "lost. -->",
        "",
        "## Upstream HTTP clients",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {results.seconds / 60:.1f} minutes"
        + (" — **BENCH_QUICK=1 smoke run, not a record**" if plan.quick else "")
        + f", load average at its start {results.load}. Machine: {perf.machine()}; in .venv-transports: "
        f"{versions}.",
        "",
        "`make bench-transports` (`bench/transports.py`): one client process per candidate POSTs the "
        f"upstream body of `make bench-perf`'s request ({DOCUMENTS} documents, DashScope native, "
        "serialized per call) and parses the JSON answer, against nginx answering a static body in a "
        "process of its own. Pools of up to 1,024 connections, idle ones kept 30 s. The candidates' "
        f"measured runs alternate: a warm-up run each, then {plan.rounds} rounds of {plan.seconds:g} s "
        "per candidate and concurrency, the order reversed every other round. Figures: mean of the rounds "
        "(min-max); ratios are taken round by round, then averaged. Client CPU per call: "
        "`time.process_time()` of the client's process over the run, divided by its calls: the upstream "
        "client's whole cost (request, pool, parser, body, JSON, the event loop's turns), nothing of a "
        "server.",
        "",
        "*today* is `rerank_service/backends/upstream/client/transport.py` as the backend calls it "
        "(`post_json` on aiohttp's ClientSession: budget, headers, attempt metric, bounded gzip-aware "
        "body); the others are each library's client called directly.",
        "",
    ]
    for concurrency in CONCURRENCY:
        if any(item.concurrency == concurrency for item in results.runs):
            lines += [f"### c={concurrency}", "", *table(results, concurrency), ""]
    text = prose(results)
    if text:
        lines += [*text, ""]
    lines.append(END)
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------


def check_venv() -> None:
    """Import the client's module in .venv-transports, as each run will."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{VENV.name} is missing: `make bench-transports` makes it")
    found = subprocess.run(
        [str(python), "-c", f"import {CLIENT}, httpx_aiohttp, httpx2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        raise SystemExit(f"{CLIENT} does not import in {VENV.name}:\n{found.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--port", type=int, default=27500, help="nginx's loopback port (below the ephemeral range)"
    )
    parser.add_argument("--doc", type=Path, default=None, help="the document to write the tables into")
    parser.add_argument(
        "--only", choices=list(NAMES), action="append", help="these candidates only (today's is always run)"
    )
    args = parser.parse_args()
    plan = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    doc = args.doc or (RESULTS / "PERFORMANCE-quick.md" if plan.quick else DOC)
    check_venv()
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = RESULTS / f"body-{DOCUMENTS}.json"
    body.write_bytes(upstream_body(DOCUMENTS))
    candidates = [name for name in NAMES if not args.only or name == TODAY or name in args.only]
    results = Results(plan, load=", ".join(f"{value:.2f}" for value in os.getloadavg()))
    started = time.monotonic()
    with (
        perf.nginx({DOCUMENTS: args.port}),
        clients(candidates, f"http://127.0.0.1:{args.port}", body) as started_clients,
    ):
        results.versions = started_clients[0].ready["versions"]
        perf.say(
            f"{len(candidates)} clients, c={'/'.join(map(str, CONCURRENCY))}, load average {results.load}"
        )
        interleave(results, started_clients)
    results.seconds = time.monotonic() - started
    block = report(results)
    perf.write_section(doc, BEGIN, END, block)
    (RESULTS / "runs.json").write_text(json.dumps([asdict(item) for item in results.runs], indent=1))
    print("\n" + block)
    perf.say(f"wrote {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}")


if __name__ == "__main__":
    main()
