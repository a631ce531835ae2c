"""Performance benchmark: the upstream service against baselines built from the same parts.

    make bench-perf                  # or: .venv/bin/python -m bench.perf
    BENCH_QUICK=1 make bench-perf    # a short smoke run (writes bench/results/perf/ only)

Everything runs on loopback, side by side in one run, and is quoted as ratios; the
absolute figures are context. ghz (Go, `--cpus 1`) drives every gRPC server with the
same serialized request; an httpx.AsyncClient loop in Python calls the upstream
directly. Runs, each started and stopped in turn:

- canned: a grpc.aio servicer returning a fixed RerankResponse of the same size;
- minimal proxy: a grpc.aio servicer doing one httpx POST, JSON parse, response build;
- minimal proxy on aiohttp: the same on the service's own client (aiohttp, orjson): the
  floor under the service, one upstream call on its stack with none of its features;
- direct: the upstream called over HTTP by httpx at the same concurrency;
- service: `rerank-service serve --backend upstream` with its defaults (access log on) but the score
  cache, which ServiceProcess leaves off (the load repeats one request: bench/cache.py measures the cache).

Scenarios:

1. Fast upstream (nginx, a static answer), 20 and 500 documents, concurrency 1, 16, 64.
2. Slow upstream (a fake answering after 2 s), concurrency 256 and 1,024, against
   Little's-law limit (concurrency / latency).
3. Memory: the service's RSS after 1,000 and after 100,000 calls (fast upstream).
4. The gRPC stack at the service's rate: canned again, held by ghz (`--rps`) to the
   requests/s the service reached at c=16 and c=64. grpc.aio's cost per call grows as its
   rate falls (fewer completions share each wake-up of its poller thread and the event
   loop), so this, not canned at full speed, is what the gRPC stack costs the service.
5. Profile: py-spy samples the service at concurrency 64; CPU time per call is read
   from /proc/PID/stat (utime + stime of the whole process, every thread).

The generated part of docs/PERFORMANCE.md (between its bench-perf markers) is
rewritten; raw ghz reports and the py-spy profile land in bench/results/perf/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
from rerank.v1 import rerank_pb2_grpc

from bench.perf_payloads import (
    COHERE_PATH,
    RERANK_PATH,
    UPSTREAM_KEY,
    cohere_answer,
    request,
    upstream_answer,
)
from tests.support.process import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "perf"
DOC = ROOT / "docs" / "PERFORMANCE.md"
GHZ = Path(os.environ.get("GHZ", ROOT / ".ci" / "tools" / "go" / "bin" / "ghz"))
# ghz's cores: one, so it leaves the other core of a 2-core machine to the server; more
# where the machine has cores to spare and the server would outrun one (GHZ_CPUS=4).
GHZ_CPUS = os.environ.get("GHZ_CPUS", "1")
PROTO = "proto/rerank/v1/rerank.proto"
CALL = "rerank.v1.RerankService/Rerank"
BEGIN, END = "<!-- bench-perf:begin -->", "<!-- bench-perf:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")

DIRECT, CANNED, PROXY, SERVICE = "direct (httpx → upstream)", "canned", "minimal proxy", "service"
AIOHTTP_PROXY = "minimal proxy on aiohttp"
PACED = "canned at the service's req/s"
# Concurrencies at which canned is also run at the service's rate (PACED), and issue 27's goal there.
PACED_CONCURRENCY = (16, 64)
CANNED_GOAL = 0.4
SLEEPER = "canned, 2 s asyncio.sleep"
FAST_DOCUMENTS = (20, 500)
FAST_CONCURRENCY = (1, 16, 64)
# Upstream wire formats compared in the formats scenario; the first is the reference.
FORMATS = ("dashscope", "cohere")
FORMATS_ROUNDS = 3
SLOW_CONCURRENCY = (256, 1024)
SLOW_LATENCY = 2.0
SLOW_DOCUMENTS = 20
# Each slow call's deadline: a target that cannot keep up fails calls instead of stalling the run.
SLOW_TIMEOUT = 3 * SLOW_LATENCY
PROFILE_CONCURRENCY = 64


@dataclass(frozen=True)
class Plan:
    """How long each part runs."""

    seconds: float  # measured seconds per fast point
    warmup: float  # warm-up seconds before each fast point
    slow_rounds: int  # measured rounds of `concurrency` calls per slow point (one warm-up round first)
    memory_first: int  # RSS is read after this many calls...
    memory_total: int  # ...and after this many
    profile_seconds: float
    quick: bool


FULL = Plan(
    seconds=10,
    warmup=2,
    slow_rounds=5,
    memory_first=1_000,
    memory_total=100_000,
    profile_seconds=10,
    quick=False,
)
QUICK = Plan(
    seconds=2, warmup=1, slow_rounds=2, memory_first=1_000, memory_total=5_000, profile_seconds=3, quick=True
)


@dataclass
class Point:
    """One measured run: a target at one document count and one concurrency."""

    scenario: str  # "fast" or "slow"
    documents: int
    concurrency: int
    run: str
    rps: float
    p50: float  # seconds
    p99: float
    count: int
    errors: int
    cpu_us: float | None = None  # server CPU time per call (whole process)
    rss_mib: float | None = None  # server resident memory after the run


@dataclass
class Results:
    plan: Plan
    points: list[Point] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    profiles: dict[int, Profile] = field(default_factory=dict)  # by document count
    seconds: float = 0.0

    def get(self, scenario: str, documents: int, concurrency: int, run: str) -> Point | None:
        for point in self.points:
            if (point.scenario, point.documents, point.concurrency, point.run) == (
                scenario,
                documents,
                concurrency,
                run,
            ):
                return point
        return None


# --- processes --------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the servers bind: connections of an earlier run in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_frees_up(port: int, timeout: float = 60) -> bool:
    """Whether `port` is free, or frees up within `timeout`: after a run with a thousand
    failed calls, the sockets of the server just stopped can take a while to go."""
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before serving")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} in {timeout:.0f} s")


@contextlib.contextmanager
def background(command: list[str], port: int, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` until the block ends; wait until it accepts connections on `port`."""
    if not port_frees_up(port):
        raise RuntimeError(f"port {port} ({what}) is taken: pass another --base-port")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, what)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def find_nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def nginx_binary() -> str:
    found = find_nginx()
    if found is None:
        raise RuntimeError("nginx is missing: run bench/install-nginx.sh (make bench-perf does)")
    return found


def _nginx_literal(text: str) -> str:
    if any(character in text for character in "'\\$"):
        raise ValueError("the static answer must need no escaping in nginx's config")
    return f"'{text}'"


def nginx_config(workdir: Path, ports: dict[int, int]) -> str:
    """A foreground nginx answering the rerank path with a static body per port.

    nginx refuses a config token over 4 KiB, so each answer is split over several `map`
    constants and `return` concatenates them (no file read, no upstream, no scripting).
    """
    maps, servers = [], []
    nl = "\n"
    for documents, port in ports.items():
        locations = []
        # The same results in each format the benchmark calls: DashScope native, Cohere.
        for format_name, path, answer in (
            ("native", RERANK_PATH, upstream_answer(documents).decode()),
            ("cohere", COHERE_PATH, cohere_answer(documents).decode()),
        ):
            parts = [answer[i : i + 3000] for i in range(0, len(answer), 3000)]
            names = []
            for number, part in enumerate(parts):
                name = f"$answer_{format_name}_{documents}_{number}"
                names.append(name)
                maps.append(f'    map "" {name} {{ default {_nginx_literal(part)}; }}')
            locations.append(
                f"""        location = {path} {{
            default_type application/json;
            return 200 "{"".join(names)}";
        }}"""
            )
        servers.append(
            f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
{nl.join(locations)}
    }}"""
        )
    temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{nl.join(maps)}
{nl.join(servers)}
}}
"""


@contextlib.contextmanager
def nginx(ports: dict[int, int]) -> Iterator[subprocess.Popen[bytes]]:
    """nginx serving the static answer of `documents` results on `ports[documents]`."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory:
        workdir = Path(directory)
        config = workdir / "nginx.conf"
        config.write_text(nginx_config(workdir, ports))
        command = [nginx_binary(), "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(config)]
        with background(command, min(ports.values()), "nginx") as process:
            for port in ports.values():
                wait_for_port(port, process, "nginx")
            yield process


@contextlib.contextmanager
def baseline(kind: str, port: int, documents: int, upstream_url: str, delay: float = 0.0) -> Iterator[int]:
    command = [
        sys.executable,
        "-m",
        "bench.perf_servers",
        kind,
        "--port",
        str(port),
        "--documents",
        str(documents),
        "--upstream-url",
        upstream_url,
        "--delay",
        str(delay),
    ]
    with background(command, port, kind) as process:
        yield process.pid


@contextlib.contextmanager
def service_process(
    port: int,
    upstream_url: str,
    dialect: str = "dashscope",
    *,
    flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[ServiceProcess]:
    """`rerank-service serve --backend upstream` with its defaults, an upstream key, no caller keys;
    `flags` added to its command line, `env` to its environment."""
    if not port_frees_up(port):
        raise RuntimeError(f"port {port} (service) is taken: pass another --base-port")
    args = [
        "--backend",
        "upstream",
        "--upstream-url",
        upstream_url,
        "--upstream-dialect",
        dialect,
        "--port",
        str(port),
        *flags,
    ]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, **(env or {})}) as process:
        try:
            yield process
        finally:
            process.terminate()


@contextlib.contextmanager
def service(
    port: int, upstream_url: str, dialect: str = "dashscope", *, env: Mapping[str, str] | None = None
) -> Iterator[int]:
    """service_process, as its pid."""
    with service_process(port, upstream_url, dialect, env=env) as process:
        assert process.process is not None
        yield process.process.pid


# --- measuring --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (a server's workers, nginx's worker)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue.extend(int(child) for child in children)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime so far of every process in `pid`'s tree (those alive now)."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(member)
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def connections(concurrency: int) -> int:
    """ghz connections: one per 64 calls in flight (1 up to 64, 16 for 1,024)."""
    return max(1, math.ceil(concurrency / 64))


def check_answer(port: int, documents: int) -> None:
    """One call before any load: the target answers this request correctly."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        response = stub.Rerank(request(documents), timeout=30)
    if len(response.output.results) != documents:
        raise RuntimeError(f"port {port}: {len(response.output.results)} results, expected {documents}")


def ghz(
    port: int,
    documents: int,
    concurrency: int,
    out: Path,
    *,
    seconds: float | None = None,
    requests: int | None = None,
    timeout: float = 20,
    metadata: Mapping[str, str] | None = None,
    rps: float | None = None,
) -> dict[str, Any]:
    """One ghz run, for `seconds` or for `requests` calls, sending `metadata` with each, at most
    `rps` calls a second (None: as fast as the target answers); its JSON report (also kept in `out`)."""
    request_file = RESULTS / f"request-{documents}.bin"
    if not request_file.exists():
        request_file.write_bytes(request(documents).SerializeToString())
    command = [
        str(GHZ),
        "--insecure",
        "--proto",
        PROTO,
        "--import-paths",
        "proto",
        "--call",
        CALL,
        "--binary-file",
        str(request_file),
        "--concurrency",
        str(concurrency),
        "--connections",
        str(connections(concurrency)),
        "--cpus",
        GHZ_CPUS,
        "--timeout",
        f"{timeout:g}s",
        "--format",
        "json",
        "--output",
        str(out),
    ]
    if metadata:
        command += ["--metadata", json.dumps(dict(metadata))]
    if rps is not None:
        command += ["--rps", str(max(1, round(rps)))]
    if seconds is not None:
        command += ["--duration", f"{seconds:g}s", "--duration-stop", "ignore"]
    else:
        command += ["--total", str(requests)]
    command.append(f"127.0.0.1:{port}")
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if completed.returncode != 0 or not out.exists():
        raise RuntimeError(f"ghz failed ({completed.returncode}): {completed.stderr.strip()}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def from_ghz(scenario: str, documents: int, concurrency: int, run: str, report: dict[str, Any]) -> Point:
    percentiles = {
        item["percentage"]: item["latency"] / 1e9 for item in report.get("latencyDistribution") or []
    }
    errors = sum((report.get("errorDistribution") or {}).values())
    # ghz's own rps counts failed calls too; only answered calls count here.
    return Point(
        scenario,
        documents,
        concurrency,
        run,
        rps=(report["count"] - errors) / (report["total"] / 1e9),
        p50=percentiles.get(50, math.nan),
        p99=percentiles.get(99, math.nan),
        count=report["count"] - errors,
        errors=errors,
    )


def measure_grpc(
    scenario: str,
    run: str,
    pid: int,
    port: int,
    documents: int,
    concurrency: int,
    plan: Plan,
    *,
    slow: bool,
    rps: float | None = None,
) -> Point:
    """Warm up, then one measured ghz run (at most `rps` calls a second, fast runs only) with the
    server's CPU time and RSS around it."""
    tag = f"{scenario}-{documents}-c{concurrency}-{re.sub(r'[^a-z0-9]+', '-', run.lower()).strip('-')}"
    if slow:
        ghz(
            port,
            documents,
            concurrency,
            RESULTS / f"{tag}-warmup.json",
            requests=concurrency,
            timeout=SLOW_TIMEOUT,
        )
    else:
        ghz(port, documents, concurrency, RESULTS / f"{tag}-warmup.json", seconds=plan.warmup, rps=rps)
    before = cpu_seconds(pid)
    if slow:
        report = ghz(
            port,
            documents,
            concurrency,
            RESULTS / f"{tag}.json",
            requests=concurrency * plan.slow_rounds,
            timeout=SLOW_TIMEOUT,
        )
    else:
        report = ghz(port, documents, concurrency, RESULTS / f"{tag}.json", seconds=plan.seconds, rps=rps)
    used = cpu_seconds(pid) - before
    point = from_ghz(scenario, documents, concurrency, run, report)
    point.cpu_us = used / max(point.count + point.errors, 1) * 1e6
    point.rss_mib = rss_mib(pid)
    return point


def measure_direct(
    scenario: str, url: str, documents: int, concurrency: int, plan: Plan, *, slow: bool
) -> Point:
    command = [
        sys.executable,
        "-m",
        "bench.direct_client",
        "--url",
        url,
        "--documents",
        str(documents),
        "--concurrency",
        str(concurrency),
    ]
    if slow:
        command += [
            "--requests",
            str(concurrency * plan.slow_rounds),
            "--warmup",
            "1",
            "--timeout",
            str(SLOW_TIMEOUT),
            "--max-seconds",  # a client that cannot keep up still ends, counting what it finished
            str(plan.slow_rounds * SLOW_TIMEOUT),
        ]
    else:
        command += ["--seconds", str(plan.seconds), "--warmup", str(plan.warmup)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"direct client failed: {completed.stderr.strip()}")
    result = json.loads(completed.stdout)
    return Point(
        scenario,
        documents,
        concurrency,
        DIRECT,
        rps=result["rps"],
        p50=result["p50"],
        p99=result["p99"],
        count=result["count"],
        errors=result["failures"],
    )


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def show(point: Point) -> None:
    cpu = f", {point.cpu_us:.0f} CPU-µs/call" if point.cpu_us is not None else ""
    errors = f", {point.errors} ERRORS" if point.errors else ""
    say(
        f"  {point.run:<26} c={point.concurrency:<5} {point.rps:9.1f} req/s  p50 {point.p50 * 1e3:8.2f} ms  "
        f"p99 {point.p99 * 1e3:8.2f} ms{cpu}{errors}"
    )


# --- scenarios --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    base: int

    def upstream(self, documents: int) -> int:
        return self.base + FAST_DOCUMENTS.index(documents)

    @property
    def slow(self) -> int:
        return self.base + 5

    @property
    def canned(self) -> int:
        return self.base + 10

    @property
    def proxy(self) -> int:
        return self.base + 11

    @property
    def service(self) -> int:
        return self.base + 12

    @property
    def aiohttp_proxy(self) -> int:
        return self.base + 9

    def formats(self, index: int) -> int:
        """One service per wire format, side by side."""
        return self.base + 13 + index


def fast_scenario(results: Results, ports: Ports) -> None:
    plan = results.plan
    upstream_ports = {documents: ports.upstream(documents) for documents in FAST_DOCUMENTS}
    with nginx(upstream_ports):
        for documents in FAST_DOCUMENTS:
            url = f"http://127.0.0.1:{upstream_ports[documents]}"
            say(f"fast upstream, {documents} documents")
            for concurrency in FAST_CONCURRENCY:
                point = measure_direct("fast", url, documents, concurrency, plan, slow=False)
                results.points.append(point)
                show(point)
            targets = (
                (CANNED, ports.canned),
                (PROXY, ports.proxy),
                (AIOHTTP_PROXY, ports.aiohttp_proxy),
                (SERVICE, ports.service),
            )
            for run, port in targets:
                with _target(run, port, documents, url) as pid:
                    check_answer(port, documents)
                    for concurrency in FAST_CONCURRENCY:
                        point = measure_grpc("fast", run, pid, port, documents, concurrency, plan, slow=False)
                        results.points.append(point)
                        show(point)
                    if run == SERVICE:
                        profile(results, pid, port, documents)
            paced_canned(results, ports, documents, url)


def paced_canned(results: Results, ports: Ports, documents: int, url: str) -> None:
    """Canned held to the service's requests/s at each of PACED_CONCURRENCY: the gRPC stack's
    cost per call at the rate the service runs at."""
    with _target(CANNED, ports.canned, documents, url) as pid:
        for concurrency in PACED_CONCURRENCY:
            served = results.get("fast", documents, concurrency, SERVICE)
            if served is None:
                continue
            plan, port = results.plan, ports.canned
            point = measure_grpc(
                "fast", PACED, pid, port, documents, concurrency, plan, slow=False, rps=served.rps
            )
            results.points.append(point)
            show(point)


@contextlib.contextmanager
def _target(run: str, port: int, documents: int, url: str) -> Iterator[int]:
    if run == SERVICE:
        with service(port, url) as pid:
            yield pid
    elif run == SLEEPER:
        with baseline("canned", port, documents, url, delay=SLOW_LATENCY) as pid:
            yield pid
    else:
        kind = {CANNED: "canned", PROXY: "proxy", AIOHTTP_PROXY: "proxy-aiohttp"}[run]
        with baseline(kind, port, documents, url) as pid:
            yield pid


def formats_scenario(results: Results, ports: Ports) -> None:
    """The service in front of the same answers in each wire format, c=64.

    One service per format runs at once and the measured runs alternate between them,
    round after round: on a shared machine, load that comes and goes then falls on every
    format alike (run one after the other, the same code has differed by 20%). Each
    point is the mean of the rounds.
    """
    plan = results.plan
    upstream_ports = {documents: ports.upstream(documents) for documents in FAST_DOCUMENTS}
    with nginx(upstream_ports):
        for documents in FAST_DOCUMENTS:
            url = f"http://127.0.0.1:{upstream_ports[documents]}"
            say(f"upstream formats, {documents} documents ({FORMATS_ROUNDS} alternating rounds)")
            with contextlib.ExitStack() as stack:
                pids = {}
                for index, dialect in enumerate(FORMATS):
                    pids[dialect] = stack.enter_context(service(ports.formats(index), url, dialect))
                    check_answer(ports.formats(index), documents)
                rounds: dict[str, list[Point]] = {dialect: [] for dialect in FORMATS}
                for _ in range(FORMATS_ROUNDS):
                    for index, dialect in enumerate(FORMATS):
                        run = f"service ({dialect})"
                        port = ports.formats(index)
                        rounds[dialect].append(
                            measure_grpc("formats", run, pids[dialect], port, documents, 64, plan, slow=False)
                        )
                for dialect in FORMATS:
                    point = mean_point(rounds[dialect])
                    results.points.append(point)
                    show(point)


def mean_point(points: list[Point]) -> Point:
    """One point from several measured rounds of the same run: the means."""
    first = points[0]
    cpu = [point.cpu_us for point in points if point.cpu_us is not None]
    return Point(
        scenario=first.scenario,
        documents=first.documents,
        concurrency=first.concurrency,
        run=first.run,
        rps=sum(point.rps for point in points) / len(points),
        p50=sum(point.p50 for point in points) / len(points),
        p99=sum(point.p99 for point in points) / len(points),
        count=sum(point.count for point in points),
        errors=sum(point.errors for point in points),
        cpu_us=sum(cpu) / len(cpu) if cpu else None,
    )


def formats_table(results: Results) -> list[str]:
    rows = [
        "| documents | format | requests/s | p50 ms | p99 ms | server CPU µs/call | server CPU cores busy "
        "| CPU vs dashscope |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for documents in FAST_DOCUMENTS:
        base = results.get("formats", documents, 64, f"service ({FORMATS[0]})")
        for dialect in FORMATS:
            point = results.get("formats", documents, 64, f"service ({dialect})")
            if point is None:
                continue
            versus = f"{point.cpu_us / base.cpu_us:.2f}x" if base and base.cpu_us and point.cpu_us else "-"
            rows.append(
                f"| {documents} | {dialect} | {point.rps:,.0f} | {_ms(point.p50)} | {_ms(point.p99)} | "
                f"{_cpu(point)} | {versus} |"
            )
    return rows


def slow_scenario(results: Results, ports: Ports) -> None:
    plan = results.plan
    url = f"http://127.0.0.1:{ports.slow}"
    command = [
        sys.executable,
        "-m",
        "bench.slow_upstream",
        "--port",
        str(ports.slow),
        "--latency",
        str(SLOW_LATENCY),
        "--documents",
        str(SLOW_DOCUMENTS),
    ]
    say(f"slow upstream ({SLOW_LATENCY:g} s), {SLOW_DOCUMENTS} documents")
    with background(command, ports.slow, "slow upstream"):
        for concurrency in SLOW_CONCURRENCY:
            point = measure_direct("slow", url, SLOW_DOCUMENTS, concurrency, plan, slow=True)
            results.points.append(point)
            show(point)
        for run, port in ((SLEEPER, ports.canned), (PROXY, ports.proxy), (SERVICE, ports.service)):
            with _target(run, port, SLOW_DOCUMENTS, url) as pid:
                check_answer(port, SLOW_DOCUMENTS)
                for concurrency in SLOW_CONCURRENCY:
                    point = measure_grpc("slow", run, pid, port, SLOW_DOCUMENTS, concurrency, plan, slow=True)
                    results.points.append(point)
                    show(point)


def memory_scenario(results: Results, ports: Ports) -> None:
    plan = results.plan
    documents, concurrency = 20, 64
    port = ports.upstream(documents)
    say(
        f"memory: {plan.memory_total:,} calls through a fresh service, {documents} documents, c={concurrency}"
    )
    with nginx({documents: port}), service(ports.service, f"http://127.0.0.1:{port}") as pid:
        started = rss_mib(pid)
        ghz(ports.service, documents, concurrency, RESULTS / "memory-first.json", requests=plan.memory_first)
        first = rss_mib(pid)
        before = cpu_seconds(pid)
        report = ghz(
            ports.service,
            documents,
            concurrency,
            RESULTS / "memory-rest.json",
            requests=plan.memory_total - plan.memory_first,
        )
        cpu_us = (cpu_seconds(pid) - before) / (plan.memory_total - plan.memory_first) * 1e6
        last = rss_mib(pid)
    errors = sum((report.get("errorDistribution") or {}).values())
    results.memory = {
        "start": started,
        "first": first,
        "last": last,
        "cpu_us": cpu_us,
        "rps": report["rps"],
        "errors": errors,
    }
    say(
        f"  RSS {started:.1f} MiB at start, {first:.1f} after {plan.memory_first:,}, {last:.1f} after "
        f"{plan.memory_total:,} calls ({last / first:.3f}x); {cpu_us:.0f} CPU-µs/call; {errors} errors"
    )


# --- profile ----------------------------------------------------------------------------

# Buckets for py-spy's stacks, deepest layer first: a stack goes to the first bucket with a
# frame anywhere on it (so json.dumps under structlog is the log's, not the JSON's, and the
# engine's work is the engine's although the servicer is further up the same stack).
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "access log (structlog: render JSON, write the line)",
        ("structlog/", "rerank_service/observability/logging.py", "log_call ("),
    ),
    ("metrics (prometheus_client)", ("prometheus_client/", "rerank_service/observability/metrics.py")),
    ("upstream body: json.dumps / json.loads", ("json/",)),
    (
        "upstream HTTP client (aiohttp's client, yarl)",
        (
            # aiohttp's client modules only: its server side is the HTTP front door's.
            "aiohttp/client",
            "aiohttp/connector.py",
            "yarl/",
            "rerank_service/backends/upstream/client/",
        ),
    ),
    (
        "upstream answer checks (dialect parse)",
        ("rerank_service/backends/upstream/dialect.py", "rerank_service/backends/upstream/dashscope.py"),
    ),
    ("upstream backend (deadline, retries, breaker, errors)", ("rerank_service/backends/upstream/",)),
    (
        "engine: validate, split, merge, rank",
        ("rerank_service/core/", "uuid.py"),
    ),
    (
        "servicer: proto ⇄ domain, metadata",
        ("rerank_service/api/grpc/servicer.py", "rerank_service/api/grpc/status.py"),
    ),
    (
        "edge (request id, admission, auth, log, metrics)",
        ("rerank_service/api/grpc/",),
    ),
    ("grpc.aio (Python parts of the server)", ("grpc/",)),
)
# What is left: the event loop's own Python, and C code it calls back (grpc's cygrpc:
# HTTP/2 framing, (de)serialisation, the completion queue), which py-spy cannot see into.
CALLBACK_BUCKET = "event loop: grpc C-core callbacks (cygrpc, protobuf) run by Handle._run"
LOOP_BUCKET = "event loop: asyncio scheduling and epoll"
POLLER_BUCKET = "grpc poller thread (C-core completion queue)"
OTHER_BUCKET = "other"


def bucket(stack: str) -> str:
    for name, patterns in BUCKETS:
        if any(pattern in stack for pattern in patterns):
            return name
    leaf = stack.rsplit(";", 1)[-1]
    if leaf.startswith("Handle._run (asyncio/events.py"):
        return CALLBACK_BUCKET
    if "asyncio/" in stack or "selectors.py" in stack:
        return LOOP_BUCKET
    if "threading.py" in stack:
        return POLLER_BUCKET
    return OTHER_BUCKET


@dataclass
class Profile:
    documents: int
    samples: int
    shares: dict[str, float]  # bucket: share of the samples
    cpu_us: float  # the service's CPU-µs per call at this point, from /proc


def pyspy_binary() -> Path:
    found = Path(sys.executable).parent / "py-spy"
    if found.exists():
        return found
    which = shutil.which("py-spy")
    if which is None:
        raise RuntimeError("py-spy is missing: pip install py-spy (make bench-perf does)")
    return Path(which)


def read_profile(raw: Path) -> tuple[int, dict[str, float]]:
    """(samples, share of each bucket) of a py-spy raw (collapsed stacks) file."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            counts[bucket(stack)] += int(number)
    total = sum(counts.values())
    return total, {name: count / total for name, count in counts.most_common()} if total else {}


def profile(results: Results, pid: int, port: int, documents: int) -> None:
    """py-spy (raw collapsed stacks, non-blocking) on the service under c=64 load."""
    plan = results.plan
    say(f"profile: py-spy on the service, {documents} documents, c={PROFILE_CONCURRENCY}")
    raw = RESULTS / f"profile-service-{documents}.txt"
    raw.unlink(missing_ok=True)
    command = [str(pyspy_binary()), "record", "--pid", str(pid), "--rate", str(PYSPY_RATE), "--nonblocking"]
    command += ["--duration", f"{plan.profile_seconds:g}", "--format", "raw", "--output", str(raw)]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    ghz(
        port,
        documents,
        PROFILE_CONCURRENCY,
        RESULTS / f"profile-{documents}-ghz.json",
        seconds=plan.profile_seconds + 1,
    )
    _, errors = recorder.communicate(timeout=60)
    if recorder.returncode != 0 or not raw.exists():
        say(f"  py-spy failed ({recorder.returncode}): {errors.strip()[-500:]}")
        return
    samples, shares = read_profile(raw)
    measured = results.get("fast", documents, PROFILE_CONCURRENCY, SERVICE)
    cpu_us = measured.cpu_us if measured and measured.cpu_us else 0.0
    results.profiles[documents] = Profile(documents, samples, shares, cpu_us)
    for name, share in shares.items():
        say(f"  {share * 100:5.1f}%  {share * cpu_us:6.0f} µs/call  {name}")


# --- the report -------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1e3:.2f}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def _cpu(point: Point) -> str:
    """Two cells: server CPU-µs per call, and server CPU cores busy (CPU-µs x calls/s)."""
    if point.cpu_us is None:
        return "- | -"
    return f"{point.cpu_us:.0f} | {point.cpu_us * point.rps / 1e6:.2f}"


def fast_table(results: Results, documents: int) -> list[str]:
    lines = [
        f"**Fast upstream (nginx, static answer), {documents} documents**",
        "",
        "| concurrency | run | requests/s | p50 ms | p99 ms | server CPU µs/call | server CPU cores busy | "
        "req/s vs minimal proxy | req/s vs canned | p50 over direct, ms |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency in FAST_CONCURRENCY:
        proxy = results.get("fast", documents, concurrency, PROXY)
        canned = results.get("fast", documents, concurrency, CANNED)
        direct = results.get("fast", documents, concurrency, DIRECT)
        for run in (DIRECT, CANNED, PROXY, AIOHTTP_PROXY, SERVICE, PACED):
            point = results.get("fast", documents, concurrency, run)
            if point is None:
                continue
            vs_proxy = point.rps / proxy.rps if proxy and run not in (DIRECT, PACED) else None
            vs_canned = point.rps / canned.rps if canned and run not in (DIRECT, PACED) else None
            over = f"{(point.p50 - direct.p50) * 1e3:+.2f}" if direct and run != DIRECT else "-"
            name = f"**{run}**" if run == SERVICE else run
            errors = f" ({point.errors} errors)" if point.errors else ""
            lines.append(
                f"| {concurrency} | {name}{errors} | {point.rps:,.0f} | {_ms(point.p50)} | "
                f"{_ms(point.p99)} | {_cpu(point)} | {_ratio(vs_proxy)} | {_ratio(vs_canned)} | {over} |"
            )
    return lines


def slow_table(results: Results) -> list[str]:
    lines = [
        f"**Slow upstream ({SLOW_LATENCY:g} s per call), {SLOW_DOCUMENTS} documents, "
        f"{results.plan.slow_rounds} rounds of `concurrency` calls after one warm-up round**",
        "",
        "| concurrency | run | requests/s | Little's-law limit | ratio | p50 ms | p99 ms "
        "| server CPU µs/call | server CPU cores busy | server RSS MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency in SLOW_CONCURRENCY:
        limit = concurrency / SLOW_LATENCY
        for run in (DIRECT, SLEEPER, PROXY, SERVICE):
            point = results.get("slow", SLOW_DOCUMENTS, concurrency, run)
            if point is None:
                continue
            rss = f"{point.rss_mib:.0f}" if point.rss_mib is not None else "-"
            name = f"**{run}**" if run == SERVICE else run
            errors = f" ({point.errors} errors)" if point.errors else ""
            lines.append(
                f"| {concurrency:,} | {name}{errors} | {point.rps:,.1f} | {limit:,.0f} | "
                f"{_ratio(point.rps / limit)} | {_ms(point.p50)} | {_ms(point.p99)} | {_cpu(point)} | {rss} |"
            )
    return lines


def goals(results: Results) -> list[str]:
    """Each goal of issue 7, met or not, with what the baselines reach on the same run."""
    rows = ["| goal | service | met | baselines, same run |", "| --- | ---: | --- | --- |"]

    def row(goal: str, measured: str, met: bool, context: str) -> None:
        rows.append(f"| {goal} | {measured} | {'met' if met else '**not met**'} | {context} |")

    for documents in FAST_DOCUMENTS:
        service_point = results.get("fast", documents, 64, SERVICE)
        proxy = results.get("fast", documents, 64, PROXY)
        canned = results.get("fast", documents, 64, CANNED)
        if service_point and proxy:
            ratio = service_point.rps / proxy.rps
            context = f"canned {canned.rps / proxy.rps:.2f}x the minimal proxy" if canned else ""
            row(
                f"fast upstream, {documents} documents, c=64: ≥ 1.0x the minimal proxy's req/s",
                f"{ratio:.2f}x",
                ratio >= 1.0,
                context,
            )
    for concurrency in PACED_CONCURRENCY:
        service_point = results.get("fast", 20, concurrency, SERVICE)
        canned = results.get("fast", 20, concurrency, CANNED)
        if service_point and canned:
            ratio = service_point.rps / canned.rps
            row(
                f"fast upstream, 20 documents, c={concurrency}: ≥ {CANNED_GOAL}x canned's req/s",
                f"{ratio:.2f}x",
                ratio >= CANNED_GOAL,
                _floor_context(results, concurrency),
            )
    for documents in FAST_DOCUMENTS:
        service_point = results.get("fast", documents, 1, SERVICE)
        direct = results.get("fast", documents, 1, DIRECT)
        proxy = results.get("fast", documents, 1, PROXY)
        canned = results.get("fast", documents, 1, CANNED)
        if service_point and direct:
            added = (service_point.p50 - direct.p50) * 1e3
            context = ", ".join(
                f"{name} {point.p50 * 1e3:.2f} ms"
                for name, point in (
                    ("p50 of direct", direct),
                    ("canned (no upstream)", canned),
                    ("minimal proxy", proxy),
                    ("service", service_point),
                )
                if point
            )
            row(
                f"fast upstream, {documents} documents, c=1: ≤ 1 ms added at p50 over the direct call",
                f"{added:+.2f} ms",
                added <= 1.0,
                context,
            )
    for concurrency, goal in ((256, 0.95), (1024, 0.9)):
        limit = concurrency / SLOW_LATENCY
        point = results.get("slow", SLOW_DOCUMENTS, concurrency, SERVICE)
        others = [(run, results.get("slow", SLOW_DOCUMENTS, concurrency, run)) for run in (SLEEPER, PROXY)]
        if point:
            ratio = point.rps / limit
            context = ", ".join(f"{run} {other.rps / limit:.3f}x" for run, other in others if other)
            row(
                f"{SLOW_LATENCY:g} s upstream, c={concurrency:,}: ≥ {goal}x Little's-law limit "
                f"({limit:.0f}/s)",
                f"{ratio:.3f}x",
                ratio >= goal,
                context,
            )
    if results.memory:
        ratio = results.memory["last"] / results.memory["first"]
        plan = results.plan
        row(
            f"RSS after {plan.memory_total:,} calls within 10% of after {plan.memory_first:,}",
            f"{ratio:.3f}x",
            ratio <= 1.10,
            "",
        )
    return rows


def _floor_context(results: Results, concurrency: int) -> str:
    """What the same run says of the canned ratio: where the floor under the service is (the
    minimal proxy on aiohttp), and the service's CPU per call against the gRPC stack's at the
    service's own rate."""
    canned = results.get("fast", 20, concurrency, CANNED)
    floor = results.get("fast", 20, concurrency, AIOHTTP_PROXY)
    paced = results.get("fast", 20, concurrency, PACED)
    served = results.get("fast", 20, concurrency, SERVICE)
    parts = []
    if canned and floor:
        parts.append(f"minimal proxy on aiohttp {floor.rps / canned.rps:.2f}x canned")
    if served and paced and served.cpu_us and paced.cpu_us:
        parts.append(
            f"service CPU per call {served.cpu_us / paced.cpu_us:.2f}x canned's at the service's req/s "
            f"({paced.cpu_us:.0f} µs; {canned.cpu_us:.0f} µs at full speed)"
            if canned and canned.cpu_us
            else f"service CPU per call {served.cpu_us / paced.cpu_us:.2f}x canned's at the service's req/s"
        )
    return "; ".join(parts)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = find_nginx()
    nginx_version = subprocess.run(
        [nginx, "-v"] if nginx else ["true"], capture_output=True, text=True, check=False
    )
    ghz_pin = re.search(r"ghz@(v[\d.]+)", (ROOT / "bench/install-ghz.sh").read_text())
    # aiohttp: the service's upstream client; httpx (or BENCH_HTTPX): the comparison clients'.
    names = ["grpcio", "protobuf", "aiohttp", http_library()]
    packages = ", ".join(f"{name} {version(name)}" for name in names)
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {packages}, "
        f"{nginx_version.stderr.strip().removeprefix('nginx version: ') or 'no nginx'}, "
        f"ghz {ghz_pin.group(1) if ghz_pin else '?'} (`--cpus {GHZ_CPUS}`)"
    )


def http_library() -> str:
    return os.environ.get("BENCH_HTTPX") or "httpx"


def report(results: Results) -> str:
    plan = results.plan
    lines = [
        BEGIN,
        "<!-- Generated by `make bench-perf` (bench/perf.py): edits between the markers are lost. -->",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {results.seconds / 60:.1f} minutes"
        + (" — **BENCH_QUICK=1 smoke run, not a record**" if plan.quick else "")
        + f". Machine: {machine()}.",
        "",
        f"Each fast point: {plan.warmup:g} s warm-up, then {plan.seconds:g} s measured (calls in flight "
        "at the end are ignored). ghz opens one HTTP/2 connection per 64 calls in flight. Latencies are "
        "ghz's percentiles; the direct client computes the same percentile the same way. The "
        f"minimal proxy and the direct client use **{http_library()}**, the minimal proxy on aiohttp "
        "uses aiohttp and orjson as the service does (each a pool of 1,024 connections, as the "
        "service's).",
        "",
        "### Goals",
        "",
        *goals(results),
        "",
        "### Fast upstream",
        "",
    ]
    for documents in FAST_DOCUMENTS:
        lines += [*fast_table(results, documents), ""]
    if any(point.scenario == "formats" for point in results.points):
        lines += [
            "### Upstream formats",
            "",
            "The service at c=64 in front of nginx answering the same results in each wire format "
            f"(the Cohere answer as vLLM sends it, with usage); one service per format, measured runs "
            f"alternating between them, the mean of {FORMATS_ROUNDS} rounds.",
            "",
            *formats_table(results),
            "",
        ]
    lines += ["### Slow upstream, many callers", "", *slow_table(results), ""]
    if results.memory:
        memory = results.memory
        lines += [
            "### Memory",
            "",
            f"A fresh service (fast upstream, 20 documents, c=64): RSS {memory['start']:.1f} MiB serving, "
            f"**{memory['first']:.1f} MiB after {plan.memory_first:,} calls, {memory['last']:.1f} MiB after "
            f"{plan.memory_total:,}** ({memory['last'] / memory['first']:.3f}x); those "
            f"{plan.memory_total - plan.memory_first:,} calls ran at {memory['rps']:,.0f} requests/s and "
            f"{memory['cpu_us']:.0f} CPU-µs per call, {memory['errors']:.0f} errors.",
            "",
        ]
    cpu_lines = []
    for documents in FAST_DOCUMENTS:
        service_point = results.get("fast", documents, 64, SERVICE)
        proxy = results.get("fast", documents, 64, PROXY)
        canned = results.get("fast", documents, 64, CANNED)
        floor = results.get("fast", documents, 64, AIOHTTP_PROXY)
        paced = results.get("fast", documents, 64, PACED)
        if service_point and proxy and canned and service_point.cpu_us and proxy.cpu_us and canned.cpu_us:
            line = (
                f"- {documents} documents, c=64: canned **{canned.cpu_us:.0f}**, minimal proxy "
                f"**{proxy.cpu_us:.0f}**, service **{service_point.cpu_us:.0f}** CPU-µs per call "
                f"(service {service_point.cpu_us / proxy.cpu_us:.2f}x the minimal proxy; the service's own "
                f"work over the proxy: {service_point.cpu_us - proxy.cpu_us:+.0f} µs)."
            )
            if floor and floor.cpu_us:
                line += (
                    f" On the service's own client, the minimal proxy on aiohttp: **{floor.cpu_us:.0f}** µs; "
                    f"the service's features cost {service_point.cpu_us - floor.cpu_us:+.0f} µs over it."
                )
            if paced and paced.cpu_us:
                times = service_point.cpu_us / paced.cpu_us
                line += (
                    f" Canned held to the service's {service_point.rps:,.0f} req/s: "
                    f"**{paced.cpu_us:.0f}** µs a call, the gRPC stack's cost at that rate "
                    f"(service {times:.2f}x)."
                )
            cpu_lines.append(line)
    if cpu_lines:
        lines += [
            "### CPU time per call",
            "",
            "utime + stime of the whole server process (every thread) over the measured run, divided "
            "by the calls it served: the steadiest figure on a shared machine.",
            "",
            *cpu_lines,
            "",
        ]
    if results.profiles:
        profiles = [results.profiles[documents] for documents in sorted(results.profiles)]
        names = sorted(
            {name for item in profiles for name in item.shares},
            key=lambda name: -profiles[0].shares.get(name, 0.0),
        )
        samples = ", ".join(f"{item.samples:,} ({item.documents} documents)" for item in profiles)
        lines += [
            "### Where the service's time goes (py-spy)",
            "",
            f"py-spy at {PYSPY_RATE} Hz, non-blocking, {plan.profile_seconds:g} s on the service at "
            f"c={PROFILE_CONCURRENCY} after each fast scenario's runs; non-idle samples: {samples}. A sample "
            "goes to the first bucket with a frame anywhere on its stack (C work in grpc and protobuf "
            "counts for the Python frame that called it); µs per call = share x the service's CPU-µs per "
            "call measured at that point. Raw stacks: `bench/results/perf/profile-service-*.txt` "
            "(collapsed-stack format: speedscope or flamegraph.pl draw them).",
            "",
            "| where | " + " | ".join(f"{item.documents} docs: share | µs/call" for item in profiles) + " |",
            "| --- | " + " | ".join("---: | ---:" for _ in profiles) + " |",
        ]
        for name in names:
            cells = " | ".join(
                f"{item.shares.get(name, 0.0) * 100:.1f}% | {item.shares.get(name, 0.0) * item.cpu_us:.0f}"
                for item in profiles
            )
            lines.append(f"| {name} | {cells} |")
        totals = " | ".join(f"100% | **{item.cpu_us:.0f}**" for item in profiles)
        lines += [f"| **all (CPU-µs per call, /proc)** | {totals} |", ""]
    lines.append(END)
    return "\n".join(lines)


PYSPY_RATE = 200

TEMPLATE = f"""# Performance

How the upstream service compares with what its parts can do. Run it with `make bench-perf`.

{BEGIN}
{END}
"""


def write_section(path: Path, begin: str, end: str, block: str) -> None:
    """Replace the block between `begin` and `end` in a document, or append it at its end
    (the sections other benchmarks write into docs/PERFORMANCE.md)."""
    text = path.read_text() if path.exists() else "# Performance\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else TEMPLATE
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + block + tail)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=27100,
        help="first of the loopback ports used (below the ephemeral range)",
    )
    parser.add_argument("--doc", type=Path, default=None, help="the document to write the tables into")
    parser.add_argument(
        "--only",
        choices=("fast", "formats", "slow", "memory"),
        action="append",
        help="run only these scenarios",
    )
    args = parser.parse_args()
    plan = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    doc = args.doc or (RESULTS / "PERFORMANCE-quick.md" if plan.quick else DOC)
    if not GHZ.exists():
        raise SystemExit(f"ghz is missing at {GHZ}: run bash bench/install-ghz.sh (make bench-perf does)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    ports = Ports(args.base_port)
    results = Results(plan)
    started = time.monotonic()
    scenarios = args.only or ["fast", "formats", "slow", "memory"]
    if "fast" in scenarios:
        fast_scenario(results, ports)
    if "formats" in scenarios:
        formats_scenario(results, ports)
    if "slow" in scenarios:
        slow_scenario(results, ports)
    if "memory" in scenarios:
        memory_scenario(results, ports)
    results.seconds = time.monotonic() - started
    block = report(results)
    write_doc(doc, block)
    (RESULTS / "points.json").write_text(json.dumps([point.__dict__ for point in results.points], indent=1))
    print("\n" + block)
    say(f"wrote {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}")


if __name__ == "__main__":
    main()
