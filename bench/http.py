"""HTTP front door benchmark: against gRPC, against another HTTP library, against LiteLLM's proxy.

    make bench-http                  # or: .venv/bin/python -m bench.http
    BENCH_QUICK=1 make bench-http    # a short smoke run (writes bench/results/http/ only)
    .venv/bin/python -m bench.http --only litellm    # some comparisons (grpc-http, library, litellm)

Three comparisons, each at concurrency 64 with 20 and with 500 documents, every server in
front of the canned upstream of `bench.perf` (nginx answering a static body):

1. grpc-http: one `rerank-service serve --backend upstream --http-port 0` process, the
   same request over gRPC (ghz) and over HTTP, POST /v1/rerank in Cohere's format (hey).
2. library: one minimal rerank handler (parse the Cohere body, one httpx POST to the
   upstream, JSON parse, answer) on aiohttp's server and on uvicorn + Starlette (uvicorn's
   C parser, httptools), both on the stdlib asyncio loop (the front door runs on the gRPC
   server's), one process each; and the same handler with the upstream's answer canned
   (fetched once at start), which leaves the two servers' own work alone.
3. litellm: LiteLLM's proxy (`litellm --config bench/litellm/config.yaml --num_workers 1`,
   its Cohere rerank provider, its defaults: uvicorn on uvloop) against the front door
   (`--upstream-dialect cohere`), both posting to nginx's Cohere path, both checking the
   same caller key.

The compared servers run side by side and their measured runs alternate round after
round, the order reversed every other round: load that comes and goes on a shared
machine falls on each alike. A figure is the mean of the rounds, with their range; a
ratio is taken round by round (the two runs of a round are seconds apart), then averaged.

ghz and hey (Go, each held to one core: `--cpus 1`, `-cpus 1`) drive the load; ghz opens
one HTTP/2 connection for the 64 calls in flight, hey 64 HTTP/1.1 keep-alive connections.
Server CPU per call: utime + stime of the server's processes over the measured run
(/proc), divided by the calls it served. The generated part of docs/PERFORMANCE.md
(between its bench-http markers) is rewritten; the raw ghz and hey reports, the points
as JSON and LiteLLM's log land in bench/results/http/.

The minimal servers of comparison 2 are modules of their own, which the benchmark starts:
`bench.http_aiohttp` in .venv, `bench.http_starlette` in .venv-litellm (`make litellm`: uvicorn
and Starlette, apart from the service's pins), both over `bench.http_minimal`. Before any
run the benchmark imports `bench.http_starlette` in .venv-litellm: a missing package fails
there at once, with its import error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import perf
from bench.http_minimal import CANNED_PATH, FRONT_DOOR_PATH

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "http"
DOC = ROOT / "docs" / "PERFORMANCE.md"
HEY = Path(os.environ.get("HEY", ROOT / ".ci" / "tools" / "go" / "bin" / "hey"))
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_CONFIG = ROOT / "bench" / "litellm" / "config.yaml"
BEGIN, END = "<!-- bench-http:start -->", "<!-- bench-http:end -->"

DOCUMENTS = (20, 500)
CONCURRENCY = 64

# Comparison names, and the runs of each (the first is the reference of its ratios).
GRPC_HTTP, LIBRARY, LIBRARY_CANNED, LITELLM = "grpc-http", "library", "library-canned", "litellm"
GRPC, HTTP = "service over gRPC (ghz)", "service over HTTP (hey)"
AIOHTTP, STARLETTE = "aiohttp", "uvicorn + Starlette"
PROXY, FRONT_DOOR = "LiteLLM proxy", "front door (HTTP)"
RUNS = {
    GRPC_HTTP: (GRPC, HTTP),
    LIBRARY_CANNED: (AIOHTTP, STARLETTE),
    LIBRARY: (AIOHTTP, STARLETTE),
    LITELLM: (FRONT_DOOR, PROXY),
}
# The minimal servers: the run's name -> the module that serves it.
MINIMAL = {AIOHTTP: "bench.http_aiohttp", STARLETTE: "bench.http_starlette"}
# Where each runs (module -> venv; tests/unit/test_bench_entry_points.py checks its imports there).
ENTRY_POINTS = {"bench.http_aiohttp": ".venv", "bench.http_starlette": ".venv-litellm"}
HTTP_GOAL = 0.8  # the goal: HTTP requests/s at least this share of gRPC's


@dataclass(frozen=True)
class Plan:
    seconds: float  # measured seconds per run
    warmup: float  # one warm-up run per server, before its first round
    rounds: int
    quick: bool


FULL = Plan(seconds=4, warmup=1, rounds=3, quick=False)
QUICK = Plan(seconds=1.5, warmup=0.5, rounds=2, quick=True)


@dataclass
class Measured:
    """One measured run of one server."""

    comparison: str
    documents: int
    run: str
    round: int
    rps: float  # answered (2xx / OK) calls per second
    p50: float  # seconds
    p99: float
    count: int  # answered calls
    errors: int  # failed calls and non-2xx answers
    cpu_us: float  # server CPU time per call (every process of the server)


@dataclass
class Results:
    plan: Plan
    runs: list[Measured] = field(default_factory=list)
    seconds: float = 0.0

    def rounds(self, comparison: str, documents: int, run: str) -> list[Measured]:
        return [
            item
            for item in self.runs
            if (item.comparison, item.documents, item.run) == (comparison, documents, run)
        ]


# --- processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def front_door(
    port: int,
    upstream_url: str,
    dialect: str,
    caller_key: str | None,
    *,
    http_port: int = 0,
    peer_cap_flag: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, int]]:
    """`rerank-service serve --backend upstream --http-port HTTP_PORT` (0: any free one): (pid, the
    HTTP port it took). `peer_cap_flag` False leaves out --max-connections-per-peer, for a revision
    older than the flag; `env` is added to the service's environment."""
    flags = ["--http-port", str(http_port)]
    if peer_cap_flag:
        # hey's 64 connections all come from 127.0.0.1: above the cap per address they would be refused.
        flags += ["--max-connections-per-peer", "1024"]
    environment = dict(env or {})
    if caller_key is not None:
        environment["RERANK_API_KEYS"] = caller_key
    with perf.service_process(port, upstream_url, dialect, flags=flags, env=environment) as process:
        assert process.process is not None
        serving = [event for event in process.events() if event.get("event") == "serving"]
        taken = serving[-1].get("http_port") if serving else None
        if not isinstance(taken, int) or taken <= 0:
            raise RuntimeError(f"the serving line names no HTTP port: {serving}")
        yield process.process.pid, taken


@contextlib.contextmanager
def minimal_server(run: str, port: int, upstream_url: str) -> Iterator[int]:
    from bench.perf_payloads import COHERE_PATH

    module = MINIMAL[run]
    venv = ENTRY_POINTS[module]
    python = sys.executable if venv == ".venv" else str(ROOT / venv / "bin" / "python")
    command = [python, "-m", module, "--port", str(port)]
    command += ["--upstream-url", upstream_url, "--upstream-path", COHERE_PATH]
    with perf.background(command, port, run) as process:
        yield process.pid


@contextlib.contextmanager
def litellm_proxy(port: int, upstream_url: str, master_key: str) -> Iterator[int]:
    """LiteLLM's proxy, one worker, its output to bench/results/http/litellm-PORT.log."""
    from bench.perf_payloads import COHERE_PATH, UPSTREAM_KEY

    if not perf.port_frees_up(port):
        raise RuntimeError(f"port {port} (LiteLLM) is taken: pass another --base-port")
    command = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(LITELLM_CONFIG)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": master_key,
        "BENCH_LITELLM_API_BASE": upstream_url + COHERE_PATH,
        "BENCH_LITELLM_UPSTREAM_KEY": UPSTREAM_KEY,
        # Offline: the cost map bundled with the package (else it tries GitHub first, and again
        # in the background); the proxy serves either way.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    log = RESULTS / f"litellm-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=RESULTS, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            perf.wait_for_port(port, process, f"LiteLLM (log: {log})", timeout=120)
            yield process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- measuring ---------------------------------------------------------------------------


def body(documents: int) -> bytes:
    """The Cohere body of bench.perf's request: the same query and documents, no top_n."""
    from bench.perf_payloads import request

    message = request(documents)
    content = {"model": message.model, "query": message.query, "documents": list(message.documents)}
    return json.dumps(content, ensure_ascii=False).encode()


def body_file(documents: int) -> Path:
    path = RESULTS / f"body-{documents}.json"
    if not path.exists():
        path.write_bytes(body(documents))
    return path


def check_http(url: str, documents: int, headers: dict[str, str]) -> None:
    """One call before any load: the server answers this request, with every result."""
    import httpx

    reply = httpx.post(
        url,
        content=body(documents),
        headers={"content-type": "application/json", **headers},
        timeout=60,
        trust_env=False,
    )
    if reply.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {reply.status_code}: {reply.text[:500]}")
    results = reply.json().get("results")
    if not isinstance(results, list) or len(results) != documents:
        raise RuntimeError(f"{url}: {reply.text[:500]}: expected {documents} results")


def hey(url: str, documents: int, seconds: float, out: Path, headers: dict[str, str]) -> dict[str, Any]:
    """One hey run for `seconds`; its report parsed (the text is kept in `out`)."""
    command = [str(HEY), "-z", f"{seconds:g}s", "-c", str(CONCURRENCY), "-cpus", "1", "-t", "30"]
    command += ["-m", "POST", "-T", "application/json", "-D", str(body_file(documents))]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(url)
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    out.write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"hey failed ({completed.returncode}): {completed.stderr.strip()}")
    return parse_hey(completed.stdout)


def parse_hey(text: str) -> dict[str, Any]:
    """Total seconds, percentiles (seconds), answers by status, transport errors."""
    total = re.search(r"Total:\s+([\d.]+) secs", text)
    if total is None:
        raise RuntimeError(f"hey printed no summary:\n{text[-2000:]}")
    percentiles = {int(p): float(s) for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", text)}
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    errors = 0
    if "Error distribution:" in text:
        tail = text.split("Error distribution:", 1)[1]
        errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]\s", tail, flags=re.MULTILINE))
    return {
        "total": float(total.group(1)),
        "percentiles": percentiles,
        "statuses": statuses,
        "errors": errors,
    }


@dataclass(frozen=True)
class Target:
    """A server under load: gRPC (ghz on `port`) or HTTP (hey on `url`)."""

    run: str
    pid: int
    port: int = 0  # gRPC
    url: str = ""  # HTTP
    headers: dict[str, str] = field(default_factory=dict)


def measure(
    target: Target, comparison: str, documents: int, seconds: float, number: int, *, warmup: bool = False
) -> Measured:
    """One run of `seconds` against `target`, with the server's CPU time around it."""

    tag = f"{comparison}-{documents}-{re.sub(r'[^a-z0-9]+', '-', target.run.lower()).strip('-')}"
    tag += "-warmup" if warmup else f"-round{number}"
    before = perf.tree_cpu_seconds(target.pid)
    if target.url:
        report = hey(target.url, documents, seconds, RESULTS / f"{tag}.txt", target.headers)
        answered = sum(n for code, n in report["statuses"].items() if 200 <= code < 300)
        errors = sum(report["statuses"].values()) - answered + report["errors"]
        percentiles = report["percentiles"]
        rps, count = answered / report["total"], answered
        p50, p99 = percentiles.get(50, float("nan")), percentiles.get(99, float("nan"))
    else:
        point = perf.from_ghz(
            comparison,
            documents,
            CONCURRENCY,
            target.run,
            perf.ghz(target.port, documents, CONCURRENCY, RESULTS / f"{tag}.json", seconds=seconds),
        )
        rps, count, errors, p50, p99 = point.rps, point.count, point.errors, point.p50, point.p99
    used = perf.tree_cpu_seconds(target.pid) - before
    if count == 0:
        raise RuntimeError(f"{target.run}: no call answered ({errors} errors); see {RESULTS / tag}.*")
    return Measured(
        comparison, documents, target.run, number, rps, p50, p99, count, errors, used / (count + errors) * 1e6
    )


def interleave(results: Results, comparison: str, documents: int, targets: list[Target]) -> None:
    """A warm-up run of each target, then `rounds` rounds, alternating between the targets."""
    plan = results.plan
    for target in targets:
        measure(target, comparison, documents, plan.warmup, 0, warmup=True)
    for number in range(1, plan.rounds + 1):
        for target in targets if number % 2 else targets[::-1]:
            item = measure(target, comparison, documents, plan.seconds, number)
            results.runs.append(item)
            show(item)


def show(item: Measured) -> None:
    errors = f", {item.errors} ERRORS" if item.errors else ""
    perf.say(
        f"  round {item.round} {item.run:<32} {item.rps:9.1f} req/s  p50 {item.p50 * 1e3:8.2f} ms  "
        f"p99 {item.p99 * 1e3:8.2f} ms  {item.cpu_us:7.0f} CPU-µs/call{errors}"
    )


# --- the comparisons ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    base: int

    def upstream(self, documents: int) -> int:
        return self.base + DOCUMENTS.index(documents)

    @property
    def service(self) -> int:
        return self.base + 10

    def minimal(self, run: str) -> int:
        return self.base + 20 + list(MINIMAL).index(run)

    @property
    def litellm(self) -> int:
        return self.base + 30


def grpc_http(results: Results, ports: Ports) -> None:

    for documents in DOCUMENTS:
        perf.say(f"{GRPC_HTTP}: one service, gRPC against HTTP, {documents} documents, c={CONCURRENCY}")
        upstream = f"http://127.0.0.1:{ports.upstream(documents)}"
        with front_door(ports.service, upstream, "dashscope", None) as (pid, http_port):
            url = f"http://127.0.0.1:{http_port}{FRONT_DOOR_PATH}"
            perf.check_answer(ports.service, documents)
            check_http(url, documents, {})
            targets = [Target(GRPC, pid, port=ports.service), Target(HTTP, pid, url=url)]
            interleave(results, GRPC_HTTP, documents, targets)


def library(results: Results, ports: Ports) -> None:
    for documents in DOCUMENTS:
        upstream = f"http://127.0.0.1:{ports.upstream(documents)}"
        with contextlib.ExitStack() as stack:
            pids = {
                run: stack.enter_context(minimal_server(run, ports.minimal(run), upstream)) for run in MINIMAL
            }
            for comparison, path, what in (
                (LIBRARY_CANNED, CANNED_PATH, "the upstream's answer canned"),
                (LIBRARY, FRONT_DOOR_PATH, "one httpx POST upstream"),
            ):
                perf.say(f"{comparison}: a minimal handler, {what}, {documents} documents, c={CONCURRENCY}")
                targets = []
                for run in RUNS[comparison]:
                    url = f"http://127.0.0.1:{ports.minimal(run)}{path}"
                    check_http(url, documents, {})
                    targets.append(Target(run, pids[run], url=url))
                interleave(results, comparison, documents, targets)


def litellm(results: Results, ports: Ports) -> None:
    key = "sk-bench-" + secrets.token_hex(24)  # LiteLLM refuses weak master keys
    headers = {"authorization": f"Bearer {key}"}
    for documents in DOCUMENTS:
        perf.say(f"{LITELLM}: LiteLLM's proxy against the front door, {documents} documents, c={CONCURRENCY}")
        upstream = f"http://127.0.0.1:{ports.upstream(documents)}"
        with (
            front_door(ports.service, upstream, "cohere", key) as (pid, http_port),
            litellm_proxy(ports.litellm, upstream, key) as proxy_pid,
        ):
            ours = f"http://127.0.0.1:{http_port}{FRONT_DOOR_PATH}"
            theirs = f"http://127.0.0.1:{ports.litellm}{FRONT_DOOR_PATH}"
            check_http(ours, documents, headers)
            check_http(theirs, documents, headers)
            targets = [
                Target(FRONT_DOOR, pid, url=ours, headers=headers),
                Target(PROXY, proxy_pid, url=theirs, headers=headers),
            ]
            interleave(results, LITELLM, documents, targets)


# --- the report --------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float], digits: int = 0, suffix: str = "") -> str:
    """`mean (min-max)` of the rounds."""
    form = f"{{:,.{digits}f}}{suffix}"
    if len(values) == 1:
        return form.format(values[0])
    return f"{form.format(mean(values))} ({form.format(min(values))}-{form.format(max(values))})"


def _ms(seconds: list[float]) -> str:
    return f"{mean(seconds) * 1e3:.2f}"


def ratios(results: Results, comparison: str, documents: int, run: str, base: str, key: str) -> list[float]:
    """`run` over `base`, round by round, for one figure (rps or cpu_us)."""
    ours = {item.round: getattr(item, key) for item in results.rounds(comparison, documents, run)}
    theirs = {item.round: getattr(item, key) for item in results.rounds(comparison, documents, base)}
    return [ours[number] / theirs[number] for number in sorted(ours) if theirs.get(number)]


def table(results: Results, comparison: str, base: str, *, vs: str) -> list[str]:
    rows = [
        f"| documents | run | requests/s | p50 ms | p99 ms | server CPU µs/call | req/s vs {vs} "
        f"| CPU/call vs {vs} |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for documents in DOCUMENTS:
        for run in RUNS[comparison]:
            rounds = results.rounds(comparison, documents, run)
            if not rounds:
                continue
            errors = sum(item.errors for item in rounds)
            name = f"{run} ({errors} errors)" if errors else run
            if run == base:
                versus = ["1", "1"]
            else:
                versus = [
                    spread(ratios(results, comparison, documents, run, base, key), 2, "x")
                    for key in ("rps", "cpu_us")
                ]
            rows.append(
                f"| {documents} | {name} | {spread([item.rps for item in rounds])} | "
                f"{_ms([item.p50 for item in rounds])} | {_ms([item.p99 for item in rounds])} | "
                f"{spread([item.cpu_us for item in rounds])} | {versus[0]} | {versus[1]} |"
            )
    return rows


def summary(results: Results, comparison: str, run: str, base: str) -> dict[int, tuple[float, float]]:
    """By document count: the mean per-round ratio of `run` over `base`, (req/s, CPU per call)."""
    found: dict[int, tuple[float, float]] = {}
    for documents in DOCUMENTS:
        rps = ratios(results, comparison, documents, run, base, "rps")
        cpu = ratios(results, comparison, documents, run, base, "cpu_us")
        if rps and cpu:
            found[documents] = (mean(rps), mean(cpu))
    return found


def _pair(found: dict[int, tuple[float, float]], index: int) -> str:
    """`1.22x and 1.53x`: one figure per document count, in DOCUMENTS order."""
    return " and ".join(f"{found[documents][index]:.2f}x" for documents in sorted(found))


def _sizes(found: dict[int, tuple[float, float]]) -> str:
    return " and ".join(str(documents) for documents in sorted(found)) + " documents"


def prose_grpc_http(results: Results) -> str:
    found = summary(results, GRPC_HTTP, HTTP, GRPC)
    if not found:
        return ""
    met = all(rps >= HTTP_GOAL for rps, _ in found.values())
    return (
        f"**HTTP against gRPC, one process.** Over HTTP the same service answers {_pair(found, 0)} the "
        f"requests/s it answers over gRPC ({_sizes(found)}), for {_pair(found, 1)} the CPU per call: the "
        f"goal of ≥ {HTTP_GOAL}x is {'met' if met else '**not met**'}. Both paths share the engine, the "
        "upstream client and the access log; what differs is the stack in front (aiohttp's HTTP/1.1 "
        "parser and JSON over 64 connections, against grpcio's C core and protobuf over one HTTP/2 "
        "connection) and the load generator (hey against ghz, each held to one of the two cores)."
    )


def prose_library(results: Results) -> str:
    alone = summary(results, LIBRARY_CANNED, AIOHTTP, STARLETTE)
    upstream = summary(results, LIBRARY, AIOHTTP, STARLETTE)
    if not alone:
        return ""
    cheaper = [cpu <= 1.05 for _, cpu in alone.values()]  # aiohttp's CPU per call over Starlette's
    kept = (
        "aiohttp is kept because it runs on the gRPC server's own loop, with no second server, thread "
        "or event loop"
    )
    if all(cheaper):
        verdict = f"aiohttp costs no more CPU per call than the usual ASGI stack at either size, and {kept}"
    elif not any(cheaper):
        verdict = (
            f"uvicorn + Starlette is the cheaper server at both sizes; {kept}, and this is what that costs"
        )
    else:
        verdict = f"neither server is the cheaper one at both sizes, so the library does not decide; {kept}"
    text = (
        "**HTTP library.** With the upstream's answer canned, which leaves each server's own work (HTTP "
        f"parsing, routing, reading the body, writing the answer), aiohttp serves {_pair(alone, 0)} the "
        f"requests/s of uvicorn + Starlette ({_sizes(alone)}), for {_pair(alone, 1)} its CPU per call, both "
        f"on the stdlib asyncio loop as the front door is: {verdict}."
    )
    if upstream:
        text += (
            f" With the httpx call upstream the ratios are {_pair(upstream, 0)} (requests/s) and "
            f"{_pair(upstream, 1)} (CPU per call), and they swing widely from round to round: httpx's pool "
            "then takes most of the CPU (httpcore 1.0 re-examines every pooled connection, and for each idle "
            "one every connection again, each time a request starts or an answer ends), so its cost grows "
            "with the square of the connections the pool happens to hold, whichever server is in front. The "
            "service's own upstream calls ride on aiohttp's client instead "
            "(`rerank_service/backends/upstream/client/`)."
        )
    return text


def prose_litellm(results: Results) -> str:
    found = summary(results, LITELLM, FRONT_DOOR, PROXY)
    if not found:
        return ""
    return (
        f"**LiteLLM's proxy.** In front of the same canned Cohere upstream, with the same caller key "
        f"checked, the front door serves {_pair(found, 0)} LiteLLM's requests/s ({_sizes(found)}) for "
        f"{_pair(found, 1)} its CPU per call. LiteLLM runs as installed and started by default with one "
        "worker (uvicorn on uvloop, its router, auth, cost and logging hooks), the front door with its "
        "defaults (access log on). CPU per call is the figure that carries over to a deployment: it is "
        "how many calls one core serves."
    )


def machine() -> str:

    hey_pin = re.search(r"hey@(v[\d.]+)", (ROOT / "bench" / "install-hey.sh").read_text())
    names = ("litellm", "uvicorn", "starlette", "httptools", "uvloop", "httpx")
    script = "from importlib.metadata import version\n" + "".join(
        f"print('{name}', version('{name}'))\n" for name in names
    )
    found = subprocess.run(
        [str(LITELLM_VENV / "bin" / "python"), "-c", script], capture_output=True, text=True, check=False
    )
    venv = ", ".join(found.stdout.split("\n")[:-1]) if found.returncode == 0 else "?"
    # perf.machine() names aiohttp already.
    return (
        f"{perf.machine()}, hey {hey_pin.group(1) if hey_pin else '?'} (`-cpus 1`), "
        f"orjson {version('orjson')}; in .venv-litellm: {venv}"
    )


def report(results: Results) -> str:
    plan = results.plan
    lines = [
        BEGIN,
        "<!-- Generated by `make bench-http` (bench/http.py): edits between the markers are lost. -->",
        "",
        "## HTTP front door",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {results.seconds / 60:.1f} minutes"
        + (" — **BENCH_QUICK=1 smoke run, not a record**" if plan.quick else "")
        + f". Machine: {machine()}.",
        "",
        f"`make bench-http` (`bench/http.py`): every server in front of nginx answering a static body "
        f"(as in `make bench-perf`), c={CONCURRENCY}, the request of `make bench-perf` (one query, 20 or "
        f"500 documents; over HTTP the Cohere body, no `top_n`). The compared servers run side by side "
        f"and their measured runs alternate: a warm-up run each, then {plan.rounds} rounds of "
        f"{plan.seconds:g} s per server, the order reversed every other round. Figures: mean of the "
        "rounds (min-max); ratios are taken round by round, then averaged. hey (HTTP/1.1, 64 "
        "keep-alive connections) and ghz (one HTTP/2 connection) each run on one core (`-cpus 1`, "
        "`--cpus 1`); server CPU per call is utime + stime of the server's processes (/proc) over the "
        "run, divided by its calls. Raw reports: `bench/results/http/`.",
        "",
    ]
    for comparison, base, vs, title, prose in (
        (GRPC_HTTP, GRPC, "gRPC", "HTTP against gRPC, same process", prose_grpc_http),
        (
            LIBRARY_CANNED,
            STARLETTE,
            "Starlette",
            "HTTP library: aiohttp against uvicorn + Starlette, the upstream's answer canned",
            None,
        ),
        (LIBRARY, STARLETTE, "Starlette", "The same, with one httpx POST upstream per call", prose_library),
        (LITELLM, PROXY, "LiteLLM", "LiteLLM's proxy against the front door", prose_litellm),
    ):
        if not any(item.comparison == comparison for item in results.runs):
            continue
        lines += [f"### {title}", "", *table(results, comparison, base, vs=vs), ""]
        if prose is not None:
            lines += [prose(results), ""]
    if any(item.comparison == LITELLM for item in results.runs):
        lines += [
            "LiteLLM's setup (`bench/litellm/`, `make litellm`): its own venv, `.venv-litellm`, with "
            "`litellm[proxy]` pinned in `requirements.txt`; started as `litellm --config "
            "bench/litellm/config.yaml --num_workers 1`. Offline, `LITELLM_LOCAL_MODEL_COST_MAP=True` makes "
            "it load the cost map bundled with the package instead of fetching it from GitHub (without it, "
            "it starts all the same once the fetch fails, and keeps retrying in the background). It refuses "
            "to start without a master key (`general_settings.master_key`, here a random one the benchmark "
            "also gives the front door as its caller key). Its Cohere provider posts to `api_base` as given "
            "only when that ends in `/v1/rerank`; otherwise it takes Cohere's v2 client and appends "
            "`/v2/rerank`.",
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------

COMPARISONS: dict[str, Callable[[Results, Ports], None]] = {
    GRPC_HTTP: grpc_http,
    "library": library,
    LITELLM: litellm,
}


def check_litellm_venv() -> None:
    """Import the minimal server's module in .venv-litellm, as the run will: a package its
    requirements lack fails here, with the import's error, not as a server that never serves."""
    module = MINIMAL[STARLETTE]
    found = subprocess.run(
        [str(LITELLM_VENV / "bin" / "python"), "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        raise SystemExit(
            f"{module} does not import in {LITELLM_VENV.name} (bench/litellm/requirements.txt):\n"
            + found.stderr.strip()
        )


def run(args: argparse.Namespace) -> None:

    plan = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    doc = args.doc or (RESULTS / "PERFORMANCE-quick.md" if plan.quick else DOC)
    missing = [
        f"{what} ({how})"
        for what, path, how in (
            (f"ghz at {perf.GHZ}", perf.GHZ, "bash bench/install-ghz.sh"),
            (f"hey at {HEY}", HEY, "bash bench/install-hey.sh"),
            (f"{LITELLM_VENV.name}", LITELLM_VENV / "bin" / "litellm", "make litellm"),
        )
        if not path.exists()
    ]
    if missing:
        raise SystemExit("missing: " + ", ".join(missing) + "; `make bench-http` installs them all")
    check_litellm_venv()
    RESULTS.mkdir(parents=True, exist_ok=True)
    perf.RESULTS.mkdir(parents=True, exist_ok=True)  # ghz keeps its request files there
    ports = Ports(args.base_port)
    results = Results(plan)
    started = time.monotonic()
    with perf.nginx({documents: ports.upstream(documents) for documents in DOCUMENTS}):
        for name in args.only or list(COMPARISONS):
            COMPARISONS[name](results, ports)
    results.seconds = time.monotonic() - started
    block = report(results)
    perf.write_section(doc, BEGIN, END, block)
    (RESULTS / "runs.json").write_text(json.dumps([asdict(item) for item in results.runs], indent=1))
    print("\n" + block)
    perf.say(f"wrote {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=27400,
        help="first of the loopback ports used (below the ephemeral range)",
    )
    parser.add_argument("--doc", type=Path, default=None, help="the document to write the tables into")
    parser.add_argument(
        "--only", choices=list(COMPARISONS), action="append", help="run only these comparisons"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
