"""Local engines benchmark: the service's torch, ONNX fp32 and ONNX int8 engines against
Infinity's torch and optimum (ONNX Runtime) engines and transformers called directly.

    make bench-local                       # or: .venv/bin/python -m bench.local_engines
    .venv/bin/python -m bench.local_engines --requests 20 --engines service-torch,transformers

Model: a random-weight cross-encoder of the ms-marco-MiniLM-L6-v2 shape (BERT, hidden 384,
6 layers, 12 heads, intermediate 1536, 1 label), seeded, with the bundled all-MiniLM-L6-v2
tokenizer; built once and cached under $TMPDIR/rerank-bench-local-engines. Workload:
`--requests` requests (200) of a query and 32 distinct documents of 60 words (bench.corpus).

Every contender is measured alone, one after the other (never two at once: they would
share the 2 cores), after a warm-up, with 2 threads:

1. throughput: the requests sent by `--concurrency` (16) callers: pairs scored per second;
2. latency: the same requests sent by `--latency-concurrency` (32) callers, equal-sized:
   p50 and p99 of the request latency. transformers called directly is no server: it
   scores the requests one after the other (batches of 32) and has no latency pass.

Contenders (`--engines`, comma-separated keys):

- service-torch, service-onnx, service-onnx-int8: `rerank-service serve --backend local`
  over gRPC, one process per engine (--local-engine, --local-quantize, --local-threads:
  an engine whose flags `serve --help` lacks is skipped). The ONNX engine exports (and
  quantizes) the model at its first load, before the server says it is serving, so no
  measurement includes it.
- infinity-torch, infinity-optimum, infinity-optimum-int8: Infinity (.venv-infinity, `make
  infinity`; the optimum ones need `make infinity-optimum` too) over HTTP `POST /rerank`.
  Infinity's optimum engine does not export: it needs an ONNX file in the model directory,
  so one is made here with the exporter it expects (`optimum-cli export onnx`), and for the
  int8 one `optimum-cli onnxruntime quantize` (dynamic, weights int8), which Infinity
  prefers on CPU when the directory has a `*quantize*` file. Infinity sets no thread count:
  torch reads OMP_NUM_THREADS and ONNX Runtime uses one thread per physical core (2 here).
  With optimum 2 (the one that takes transformers 4.57) Infinity's own graph optimization
  at load fails and it serves the exported graph (ONNX Runtime still applies its default
  optimizations), and its optimum cross-encoder drops token_type_ids (scores shift).
- transformers: AutoModelForSequenceClassification in this process, batches of 32.

Scores are checked against transformers on one request ("max diff"). The CPU time of
everything but the contender and this process during each pass is reported ("other CPU"):
a figure above a few percent means something else ran and the numbers are not clean.

Goals (issue 17): ONNX fp32 >= 1.3x the service's torch engine in pairs/s, int8 >= 2x, the
service's best engine ahead of Infinity's best; at 32 callers the service's p99 <= 1.3x its
p50 and no worse than Infinity's. Results: a table here and bench/results/local_engines.json.

On a GPU (`--device cuda --dtypes float32,float16,bfloat16`): the service's torch engine
(`--device cuda --dtype D`) and transformers called directly, once per dtype; the ONNX
engine is CPU-only and Infinity's venv is a CPU build, so both are left out. The CPU goals
above do not apply there. `--tokenizer DIR` takes the tokenizer files from DIR instead of
the bundled model's package (a machine without the `local` extra's model package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import grpc
import httpx
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench.corpus import documents, queries
from bench.direct_client import percentile
from bench.perf import CLK_TCK, tree_cpu_seconds
from tests.support.infinity import INFINITY_CLI, INFINITY_VENV, _environment, free_port, infinity_process
from tests.support.process import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "local_engines.json"
# Bump when what is built changes: a new directory, nothing stale reused.
CACHE = Path(tempfile.gettempdir()) / "rerank-bench-local-engines" / "v1"
OPTIMUM_CLI = INFINITY_VENV / "bin" / "optimum-cli"

MODEL = "minilm-l6-cross-encoder"
SEED = 1234
THREADS = 2  # --threads
DOCUMENTS_PER_REQUEST = 32
MAX_BATCH_SIZE = DOCUMENTS_PER_REQUEST  # --max-batch-size: the service's
WORDS_PER_DOCUMENT = 60
WARMUP_REQUESTS = 4
REQUEST_TIMEOUT = 300.0
# The service's first ONNX load exports and quantizes the model: minutes on 2 busy cores.
SERVICE_START_TIMEOUT = 900.0
INFINITY_START_TIMEOUT = 300.0
# Before each contender the machine must be this quiet (other processes' share of the cores).
QUIET_SHARE = 0.05

Workload = list[tuple[str, list[str]]]
Score = Callable[[str, list[str]], Awaitable[list[float]]]
ModelKind = Literal["torch", "onnx", "onnx-int8"]


# --- contenders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: Literal["service", "infinity", "transformers"]
    # service: the serve flags that pick the engine; dropped for torch when serve lacks them
    engine_args: tuple[str, ...] = ()
    # infinity: --engine, and which model directory it serves
    infinity_engine: str = ""
    model: ModelKind = "torch"
    dtype: str = "float32"  # service-torch and transformers on a GPU: one contender per dtype

    @property
    def engine(self) -> str:
        """The engine the service's "model loaded" line must name: torch, onnx or onnx-int8."""
        if "onnx" not in self.engine_args:
            return "torch"
        return "onnx-int8" if "int8" in self.engine_args else "onnx"

    def with_dtype(self, dtype: str) -> Contender:
        return replace(self, key=f"{self.key}-{dtype}", label=f"{self.label} {dtype}", dtype=dtype)


CONTENDERS = (
    Contender("service-torch", "service, torch", "service", ("--local-engine", "torch")),
    Contender(
        "service-onnx",
        "service, ONNX fp32",
        "service",
        ("--local-engine", "onnx", "--local-quantize", "none"),
    ),
    Contender(
        "service-onnx-int8",
        "service, ONNX int8",
        "service",
        ("--local-engine", "onnx", "--local-quantize", "int8"),
    ),
    Contender("infinity-torch", "Infinity, torch", "infinity", infinity_engine="torch"),
    Contender(
        "infinity-optimum", "Infinity, optimum fp32", "infinity", infinity_engine="optimum", model="onnx"
    ),
    Contender(
        "infinity-optimum-int8",
        "Infinity, optimum int8",
        "infinity",
        infinity_engine="optimum",
        model="onnx-int8",
    ),
    Contender("transformers", "transformers, direct", "transformers"),
)
BY_KEY = {contender.key: contender for contender in CONTENDERS}


@dataclass
class Result:
    key: str
    label: str
    pairs: int
    seconds: float
    callers: int
    p50: float | None = None
    p99: float | None = None
    latency_callers: int | None = None
    max_score_diff: float | None = None  # against transformers, same inputs
    max_score_diff_no_token_types: float | None = None  # against transformers, token_type_ids all 0
    startup_seconds: float | None = None
    other_cpu_share: float = 0.0  # of all cores, the worse of the two passes
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: list[str] = field(default_factory=list)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds


# --- workload and models --------------------------------------------------------------------


def build_workload(requests: int) -> Workload:
    """`requests` queries, each with its own 32 documents of exactly 60 words: equal-sized."""
    words = (WORDS_PER_DOCUMENT, WORDS_PER_DOCUMENT)
    docs = documents(requests * DOCUMENTS_PER_REQUEST, words=words, seed=SEED)
    return [
        (query, docs[i * DOCUMENTS_PER_REQUEST : (i + 1) * DOCUMENTS_PER_REQUEST])
        for i, query in enumerate(queries(requests, seed=SEED))
    ]


def cached(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build` into a staging directory first unless a complete one exists."""
    if (target / ".complete").exists():
        return target
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    build(staging)
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def write_cross_encoder(directory: Path, tokenizer: Path | None = None) -> None:
    """The MiniLM-L6-shaped cross-encoder, random (seeded) weights, the bundled tokenizer's files
    (or those in `tokenizer`)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from rerank_service.backends.local.models import bundled_model_path

    bundled = tokenizer or bundled_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled / name, directory / name)
    config = BertConfig(
        vocab_size=len((bundled / "vocab.txt").read_text(encoding="utf-8").splitlines()),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        id2label={0: "LABEL_0"},  # one label: a relevance logit
    )
    torch.manual_seed(SEED)
    BertForSequenceClassification(config).save_pretrained(directory)


def infinity_env(home: Path) -> dict[str, str]:
    """Infinity's offline environment (tests/support/infinity.py) with 2 threads for torch."""
    threads = str(THREADS)
    return {**_environment(home), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _run_tool(command: list[str], home: Path) -> None:
    done = subprocess.run(command, env=infinity_env(home), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{(done.stdout + done.stderr)[-4000:]}")


def export_onnx(model_dir: Path, directory: Path) -> None:
    """model.onnx (and config, tokenizer) by optimum's exporter, as Infinity's optimum engine wants."""
    command = [str(OPTIMUM_CLI), "export", "onnx", "--model", str(model_dir), "--task", "text-classification"]
    _run_tool([*command, str(directory)], directory.parent / "optimum-home")


def quantize_onnx(onnx_dir: Path, directory: Path) -> None:
    """model_quantized.onnx: dynamic int8 by optimum's quantizer for this CPU's instructions."""
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
    target = "--avx512_vnni" if "avx512_vnni" in flags else "--avx512" if "avx512f" in flags else "--avx2"
    command = [str(OPTIMUM_CLI), "onnxruntime", "quantize", "--onnx_model", str(onnx_dir), target]
    _run_tool([*command, "-o", str(directory)], directory.parent / "optimum-home")


TOKENIZER: Path | None = None  # --tokenizer: where write_cross_encoder takes the tokenizer from


def model_directory(kind: ModelKind) -> Path:
    """The model directory a contender serves, built (and cached) on first use."""
    torch_dir = cached(CACHE / "model", lambda d: write_cross_encoder(d, TOKENIZER))
    if kind == "torch":
        return torch_dir
    onnx_dir = cached(CACHE / "infinity-onnx", lambda d: export_onnx(torch_dir, d))
    if kind == "onnx":
        return onnx_dir
    return cached(CACHE / "infinity-onnx-int8", lambda d: quantize_onnx(onnx_dir, d))


# --- measuring ------------------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    """CPU time spent on all cores so far, not idle (/proc/stat: user to steal)."""
    fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@contextlib.contextmanager
def other_cpu(into: list[float]) -> Iterator[None]:
    """Append the share of all cores used meanwhile by processes other than this one and its
    children (the contender's server is one)."""
    started = time.perf_counter()
    busy, ours = busy_cpu_seconds(), tree_cpu_seconds(os.getpid())
    yield
    wall = time.perf_counter() - started
    others = busy_cpu_seconds() - busy - (tree_cpu_seconds(os.getpid()) - ours)
    into.append(max(0.0, others) / (wall * (os.cpu_count() or 1)))


def wait_until_quiet(limit: float) -> float:
    """Wait (up to `limit` s) until other processes use under 5% of the cores; their share last seen."""
    deadline, shares = time.monotonic() + limit, [1.0]
    while shares[-1] >= QUIET_SHARE and time.monotonic() < deadline:
        with other_cpu(shares):
            time.sleep(3)
        if shares[-1] >= QUIET_SHARE:
            print(f"   waiting: other processes use {shares[-1]:.0%} of the CPUs", flush=True)
    return shares[-1]


async def drive(score: Score, workload: Workload, callers: int) -> tuple[float, list[float]]:
    """Every request sent with `callers` in flight: (seconds taken, each request's latency)."""
    queue = list(reversed(workload))
    latencies: list[float] = []

    async def caller() -> None:
        while queue:
            query, docs = queue.pop()
            sent = time.perf_counter()
            scores = await score(query, docs)
            latencies.append(time.perf_counter() - sent)
            if len(scores) != len(docs):
                raise RuntimeError(f"{len(scores)} scores for {len(docs)} documents")

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return time.perf_counter() - started, sorted(latencies)


def in_order(pairs: list[tuple[int, float]], count: int) -> list[float]:
    """Scores by document index, from (index, score) pairs in any order."""
    scores = [math.nan] * count
    for index, value in pairs:
        scores[index] = value
    return scores


@dataclass
class Plan:
    workload: Workload
    callers: int
    latency_callers: int
    reference: list[float]  # transformers' float32 scores of workload[0], on the device
    reference_no_token_types: list[float]
    device: str = "cpu"


async def measure(score: Score, plan: Plan, result: Result, concurrent: bool) -> None:
    """Warm up, check the scores, then the throughput and (for servers) the latency pass."""
    for query, docs in plan.workload[:WARMUP_REQUESTS]:
        await score(query, docs)
    if concurrent:  # and once as concurrent callers: merged batches, every connection open
        await drive(score, plan.workload[: plan.callers], plan.callers)
    probe = await score(*plan.workload[0])
    result.max_score_diff = max(abs(a - b) for a, b in zip(probe, plan.reference, strict=True))
    result.max_score_diff_no_token_types = max(
        abs(a - b) for a, b in zip(probe, plan.reference_no_token_types, strict=True)
    )
    shares: list[float] = []
    result.callers = plan.callers if concurrent else 1
    with other_cpu(shares):
        result.seconds, _ = await drive(score, plan.workload, result.callers)
    if concurrent:
        with other_cpu(shares):
            _, latencies = await drive(score, plan.workload, plan.latency_callers)
        result.latency_callers = plan.latency_callers
        result.p50, result.p99 = percentile(latencies, 50), percentile(latencies, 99)
    result.other_cpu_share = max(shares)


# --- the service ------------------------------------------------------------------------------


def serve_flags() -> set[str]:
    """The flags `rerank-service serve --help` lists now (other engineers add engine flags)."""
    done = subprocess.run(
        [sys.executable, "-m", "rerank_service", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))


def service_args(contender: Contender, flags: set[str], device: str = "cpu") -> list[str] | None:
    """The engine's serve flags, or None when this serve cannot run that engine."""
    wanted = [arg for arg in contender.engine_args if arg.startswith("--")]
    if all(flag in flags for flag in wanted):
        args = list(contender.engine_args)
    elif contender.engine_args[:2] == ("--local-engine", "torch"):
        args = []  # a serve without engine flags runs torch
    else:
        return None
    if "--local-threads" in flags:
        args += ["--local-threads", str(THREADS)]
    if device != "cpu":
        args += ["--device", device, "--dtype", contender.dtype]
    if "--local-onnx-cache" in flags and "onnx" in contender.engine_args:
        # Its exported and quantized graphs beside our model, not in ~/.cache.
        args += ["--local-onnx-cache", str(CACHE / "service-onnx")]
    return args


def check_service_engine(contender: Contender, events: list[dict[str, Any]]) -> str:
    """The "model loaded" log line, checked: the engine asked for is the engine that runs."""
    loaded = next(event for event in events if event.get("event") == "model loaded")
    expected = contender.engine
    if loaded.get("engine", "torch") != expected:
        raise RuntimeError(f"{contender.key}: the service loaded engine {loaded.get('engine')!r}")
    if loaded.get("dtype", contender.dtype) != contender.dtype:  # older services do not log it
        raise RuntimeError(f"{contender.key}: the service loaded dtype {loaded.get('dtype')!r}")
    fields = ("engine", "device", "dtype", "max_length", "seconds")
    return "model loaded: " + ", ".join(f"{name}={loaded[name]}" for name in fields if name in loaded)


@contextlib.asynccontextmanager
async def grpc_scorer(target: str) -> AsyncIterator[Score]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)

        async def score(query: str, docs: list[str]) -> list[float]:
            request = rerank_pb2.RerankRequest(model=MODEL, query=query, documents=docs)
            response = await stub.Rerank(request, timeout=REQUEST_TIMEOUT)
            pairs = [(item.index, item.relevance_score) for item in response.output.results]
            return in_order(pairs, len(docs))

        yield score


def run_service(contender: Contender, args: list[str], plan: Plan, result: Result) -> None:
    model_dir = model_directory("torch")  # the service exports its own ONNX graph from it
    serve = [
        *("--backend", "local", "--local-models", f"{MODEL}={model_dir}"),
        *("--max-batch-size", str(MAX_BATCH_SIZE), *args),
    ]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    result.notes.append(f"serve flags: {' '.join(args) or '(defaults)'}")
    started = time.perf_counter()
    with ServiceProcess(serve, env=env, start_timeout=SERVICE_START_TIMEOUT) as service:
        result.startup_seconds = time.perf_counter() - started
        result.notes.append(check_service_engine(contender, service.events()))

        async def go() -> None:
            async with grpc_scorer(service.target) as score:
                await measure(score, plan, result, concurrent=True)

        asyncio.run(go())
        service.terminate()


# --- Infinity ---------------------------------------------------------------------------------


def infinity_command(engine: str, port: int) -> list[str]:
    # --model-id ".", run from the model directory: Infinity 0.0.78 hands optimum the ONNX
    # file's path as it globbed it (directory included), and optimum 2 looks it up by the
    # file's name only, so any other model id fails to load ("Could not find any ONNX files").
    return [
        str(INFINITY_CLI),
        "v2",
        *("--model-id", ".", "--served-model-name", MODEL),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--engine", engine, "--device", "cpu", "--batch-size", str(DOCUMENTS_PER_REQUEST)),
        # The warm-up is ours; torch.compile and BetterTransformer are off as in the tests
        # (BetterTransformer needs optimum < 2); no disk cache of past answers.
        *("--no-model-warmup", "--no-compile", "--no-bettertransformer", "--no-vector-disk-cache"),
        *("--log-level", "info"),
    ]


@contextlib.contextmanager
def infinity_server(engine: str, model_dir: Path, workdir: Path) -> Iterator[tuple[str, Path]]:
    """Infinity on a free loopback port: (its URL, its log); stopped on the way out."""
    port, log = free_port(), workdir / f"infinity-{engine}.log"
    home = workdir / "home"  # a fresh one: Infinity keeps optimized graphs under it
    shutil.rmtree(home, ignore_errors=True)
    command, env = infinity_command(engine, port), infinity_env(home)
    timeout = INFINITY_START_TIMEOUT
    with infinity_process(command, cwd=model_dir, env=env, port=port, log=log, timeout=timeout) as url:
        yield url, log


@contextlib.asynccontextmanager
async def infinity_scorer(url: str) -> AsyncIterator[Score]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def score(query: str, docs: list[str]) -> list[float]:
            body = {"model": MODEL, "query": query, "documents": docs, "return_documents": False}
            response = await client.post("/rerank", json=body)
            response.raise_for_status()
            pairs = [(item["index"], item["relevance_score"]) for item in response.json()["results"]]
            return in_order(pairs, len(docs))

        yield score


def infinity_log_notes(engine: str, text: str) -> list[str]:
    """What Infinity's log says about the engine it really runs (it has no silent fallback)."""
    flat = " ".join(text.split())  # rich wraps its log lines
    notes = []
    chosen = re.search(r"using engine=`(\w+)`", flat)
    if chosen is None or chosen.group(1) != engine:
        raise RuntimeError(f"Infinity did not report engine={engine}:\n{text[-3000:]}")
    notes.append(f"Infinity log: engine={chosen.group(1)}")
    if "Optimization failed" in flat:
        notes.append(
            "Infinity's own ORTOptimizer pass failed (optimum 2 dropped an argument it passes): it "
            "serves the exported graph, which ONNX Runtime optimizes when it loads it"
        )
    return notes


def run_infinity(contender: Contender, plan: Plan, result: Result, workdir: Path) -> None:
    model_dir = model_directory(contender.model)
    result.notes.append(
        f"model files: {', '.join(sorted(p.name for p in model_dir.glob('*.onnx'))) or 'torch'}"
    )
    started = time.perf_counter()
    with infinity_server(contender.infinity_engine, model_dir, workdir) as (url, log):
        result.startup_seconds = time.perf_counter() - started

        async def go() -> None:
            async with infinity_scorer(url) as score:
                await measure(score, plan, result, concurrent=True)

        asyncio.run(go())
        result.notes += infinity_log_notes(contender.infinity_engine, log.read_text(errors="replace"))


# --- transformers, directly -------------------------------------------------------------------


class DirectModel:
    """The cross-encoder called in this process: tokenize, forward, sigmoid of the logit."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(THREADS)
        self._torch = torch
        self._device = device
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        self._model = model.to(device=device, dtype=getattr(torch, dtype)).eval()

    def describe(self) -> str:
        where = self._device if self._device == "cpu" else self._torch.cuda.get_device_name(self._device)
        dtype = str(self._model.dtype).removeprefix("torch.")
        return f"torch {self._torch.__version__}, {self._torch.get_num_threads()} threads, {where}, {dtype}"

    def score(self, query: str, docs: list[str], token_types: bool = True) -> list[float]:
        inputs = self._tokenizer(
            [query] * len(docs), docs, padding=True, truncation=True, return_tensors="pt"
        )
        if not token_types:  # what Infinity's optimum cross-encoder feeds the graph
            inputs["token_type_ids"] = self._torch.zeros_like(inputs["input_ids"])
        inputs = inputs.to(self._device)
        with self._torch.inference_mode():
            logits = self._model(**inputs).logits[:, 0].float()
        scores: list[float] = self._torch.sigmoid(logits).tolist()
        return scores


def run_direct(direct: DirectModel, plan: Plan, result: Result) -> None:
    async def score(query: str, docs: list[str]) -> list[float]:
        return direct.score(query, docs)  # blocks: one request at a time, as a batch of 32

    result.notes.append(direct.describe())
    asyncio.run(measure(score, plan, result, concurrent=False))


# --- running and reporting --------------------------------------------------------------------


def skip_reason(contender: Contender, flags: set[str], device: str) -> str | None:
    if device != "cpu" and contender.engine != "torch" and contender.kind == "service":
        return "the ONNX engine runs on the CPU only (onnxruntime's CPU build)"
    if device != "cpu" and contender.kind == "infinity":
        return "Infinity's venv (.venv-infinity) is a CPU build"
    if contender.kind == "service" and service_args(contender, flags) is None:
        return "serve has no " + " / ".join(a for a in contender.engine_args if a.startswith("--"))
    if contender.kind == "infinity" and not INFINITY_CLI.exists():
        return f"{INFINITY_CLI.relative_to(ROOT)} is missing: make infinity"
    if contender.infinity_engine == "optimum" and not OPTIMUM_CLI.exists():
        return "optimum is not in .venv-infinity: make infinity-optimum"
    return None


def run_one(contender: Contender, plan: Plan, direct: DirectModel, flags: set[str], workdir: Path) -> Result:
    result = Result(contender.key, contender.label, 0, math.nan, plan.callers, load_before=os.getloadavg())
    result.pairs = sum(len(docs) for _, docs in plan.workload)
    if contender.kind == "service":
        args = service_args(contender, flags, plan.device)
        assert args is not None
        run_service(contender, args, plan, result)
    elif contender.kind == "infinity":
        run_infinity(contender, plan, result, workdir)
    elif contender.dtype == "float32":
        run_direct(direct, plan, result)
    else:
        run_direct(DirectModel(model_directory("torch"), plan.device, contender.dtype), plan, result)
    result.notes += score_notes(result)
    return result


def score_notes(result: Result) -> list[str]:
    """Say so when the scores match transformers only with every token_type_ids set to 0."""
    typed, untyped = result.max_score_diff, result.max_score_diff_no_token_types
    if typed is None or untyped is None or untyped >= typed / 5:
        return []
    return [
        f"scores match transformers fed token_type_ids of 0 (max diff {untyped:.1e}), not the "
        f"tokenizer's segment ids (max diff {typed:.1e}): the engine does not pass them to the model"
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def print_table(results: list[Result], plan: Plan) -> None:
    base = next((r for r in results if r.key.startswith("service-torch")), None)
    print(
        f"\n| contender | pairs/s ({plan.callers} callers) | vs service torch | p50 ms "
        f"({plan.latency_callers} callers) | p99 ms | p99/p50 | max diff | other CPU | load before |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r.pairs_per_second / base.pairs_per_second:.2f}x" if base else "-"
        tail = f"{r.p99 / r.p50:.2f}" if r.p50 and r.p99 else "-"
        diff = "-" if r.max_score_diff is None else f"{r.max_score_diff:.1e}"
        print(
            f"| {r.label} | {r.pairs_per_second:.0f} | {ratio} | {_ms(r.p50)} | {_ms(r.p99)} | {tail} | "
            f"{diff} | {r.other_cpu_share:.0%} | {r.load_before[0]:.2f} |"
        )


@dataclass(frozen=True)
class Goal:
    goal: str
    value: str
    met: bool


def goals(results: list[Result]) -> list[Goal]:
    """Issue 17's goals, for those whose contenders ran."""
    by = {r.key: r for r in results}
    found: list[Goal] = []
    torch_rate = by["service-torch"].pairs_per_second if "service-torch" in by else None
    for key, target in (("service-onnx", 1.3), ("service-onnx-int8", 2.0)):
        if torch_rate and key in by:
            ratio = by[key].pairs_per_second / torch_rate
            found.append(
                Goal(f"{key} >= {target}x service-torch (pairs/s)", f"{ratio:.2f}x", ratio >= target)
            )
    ours = [r for r in results if r.key.startswith("service-")]
    theirs = [r for r in results if r.key.startswith("infinity-")]
    if ours and theirs:
        best = max(ours, key=lambda r: r.pairs_per_second)
        rival = max(theirs, key=lambda r: r.pairs_per_second)
        found.append(
            Goal(
                f"best service engine ({best.key}) ahead of Infinity's best ({rival.key})",
                f"{best.pairs_per_second:.0f} vs {rival.pairs_per_second:.0f} pairs/s",
                best.pairs_per_second > rival.pairs_per_second,
            )
        )
        rival_p99 = min(r.p99 for r in theirs if r.p99 is not None)
        if best.p99 is not None and best.p50 is not None:
            found.append(
                Goal(f"{best.key} p99 <= 1.3x p50", f"{best.p99 / best.p50:.2f}x", best.p99 <= 1.3 * best.p50)
            )
            found.append(
                Goal(
                    f"{best.key} p99 no worse than Infinity's best p99",
                    f"{best.p99 * 1000:.0f} vs {rival_p99 * 1000:.0f} ms",
                    best.p99 <= rival_p99,
                )
            )
    return found


def infinity_versions() -> dict[str, str]:
    """Package versions inside .venv-infinity, read from its dist-info directory names."""
    found: dict[str, str] = {}
    for info in INFINITY_VENV.glob("lib/python*/site-packages/*.dist-info"):
        name, _, rest = info.name.removesuffix(".dist-info").partition("-")
        if name.lower() in {
            "infinity_emb",
            "torch",
            "transformers",
            "optimum",
            "optimum_onnx",
            "onnxruntime",
        }:
            found[name.lower()] = rest
    return found


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def gpu_name(device: str) -> str | None:
    if device == "cpu":
        return None
    import torch

    return str(torch.cuda.get_device_name(device))


def machine(device: str = "cpu") -> dict[str, Any]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_name(device),
        "service": {name: installed(name) for name in ("torch", "transformers", "onnxruntime", "grpcio")},
        "infinity": infinity_versions(),
    }


def write_results(path: Path, plan: Plan, results: list[Result], skipped: dict[str, str]) -> None:
    report = {
        "machine": machine(plan.device),
        "workload": {
            "device": plan.device,
            "requests": len(plan.workload),
            "documents_per_request": DOCUMENTS_PER_REQUEST,
            "words_per_document": WORDS_PER_DOCUMENT,
            "throughput_callers": plan.callers,
            "latency_callers": plan.latency_callers,
            "threads": THREADS,
            "service_max_batch_size": MAX_BATCH_SIZE,
            "model": "random BertForSequenceClassification, hidden 384, 6 layers, 12 heads, "
            f"intermediate 1536, 1 label, seed {SEED}, bundled all-MiniLM-L6-v2 tokenizer",
        },
        "results": [{**asdict(r), "pairs_per_second": r.pairs_per_second} for r in results],
        "skipped": skipped,
        "goals": [asdict(goal) for goal in goals(results)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="requests of 32 documents (default 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="callers in the throughput pass (16)")
    parser.add_argument(
        "--latency-concurrency", type=int, default=32, help="callers in the latency pass (32)"
    )
    parser.add_argument(
        "--engines",
        default=",".join(BY_KEY),
        help=f"comma-separated contenders, in this order (default all: {','.join(BY_KEY)})",
    )
    parser.add_argument("--skip-infinity", action="store_true", help="leave out every Infinity contender")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=600,
        help="before each contender, wait up to this many seconds for other processes to use "
        f"under {QUIET_SHARE * 100:.0f}%% of the CPUs (default 600; 0: do not wait)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or a CUDA device: cuda, cuda:1 (the GPU figures)"
    )
    parser.add_argument(
        "--dtypes",
        default="float32",
        help="comma-separated torch dtypes of the service's torch engine and transformers, one "
        "contender each (default float32; on a GPU e.g. float32,float16,bfloat16)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a directory with vocab.txt and tokenizer.json (default: the bundled model's)",
    )
    parser.add_argument(
        "--threads", type=int, default=THREADS, help=f"every contender's threads (default {THREADS})"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=MAX_BATCH_SIZE,
        help=f"the service's --max-batch-size (default {MAX_BATCH_SIZE}, a request's documents)",
    )
    args = parser.parse_args()
    args.dtypes = args.dtypes.split(",")
    wrong = [d for d in args.dtypes if d not in ("float32", "float16", "bfloat16")]
    if wrong:
        parser.error(f"unknown dtypes {wrong}; known: float32, float16, bfloat16")
    if args.device == "cpu" and args.dtypes != ["float32"]:
        parser.error("--dtypes other than float32 need --device cuda")
    unknown = [key for key in args.engines.split(",") if key not in BY_KEY]
    if unknown:
        parser.error(f"unknown engines {unknown}; known: {', '.join(BY_KEY)}")
    if args.requests < WARMUP_REQUESTS:
        parser.error(f"--requests must be at least {WARMUP_REQUESTS}")
    return args


def contenders(keys: list[str], device: str, dtypes: list[str]) -> list[Contender]:
    """The contenders asked for: on a GPU the torch ones once per dtype."""
    chosen = [BY_KEY[key] for key in keys]
    if device == "cpu":
        return chosen
    return [
        variant
        for contender in chosen
        for variant in (
            [contender.with_dtype(dtype) for dtype in dtypes]
            if contender.kind in ("service", "transformers") and contender.engine == "torch"
            else [contender]
        )
    ]


def main() -> None:
    global TOKENIZER, THREADS, MAX_BATCH_SIZE
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    TOKENIZER, THREADS, MAX_BATCH_SIZE = args.tokenizer, args.threads, args.max_batch_size
    chosen = contenders(args.engines.split(","), args.device, args.dtypes)
    if args.skip_infinity:
        chosen = [c for c in chosen if c.kind != "infinity"]
    flags = serve_flags()
    skipped = {c.key: reason for c in chosen if (reason := skip_reason(c, flags, args.device)) is not None}
    for key, reason in skipped.items():
        print(f"skipping {key}: {reason}", flush=True)

    workload = build_workload(args.requests)
    direct = DirectModel(model_directory("torch"), args.device)
    query, docs = workload[0]
    plan = Plan(
        workload,
        args.concurrency,
        args.latency_concurrency,
        direct.score(query, docs),
        direct.score(query, docs, False),
        args.device,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-local-engines-") as tmp:
        for contender in chosen:
            if contender.key in skipped:
                continue
            # Each starts only after the previous one's server is gone.
            print(f"== {contender.label} (load {os.getloadavg()[0]:.2f})", flush=True)
            if args.quiet_wait > 0:
                wait_until_quiet(args.quiet_wait)
            result = run_one(contender, plan, direct, flags, Path(tmp))
            rate, p50, p99 = result.pairs_per_second, _ms(result.p50), _ms(result.p99)
            print(f"   {rate:.0f} pairs/s, p50 {p50} ms, p99 {p99} ms", flush=True)
            results.append(result)

    where = machine(args.device)
    print(
        f"\nLocal engines: {len(workload)} requests x {DOCUMENTS_PER_REQUEST} documents of "
        f"{WORDS_PER_DOCUMENT} words, {THREADS} threads, {where['cpu']}, {os.cpu_count()} CPUs"
        + (f", {where['gpu']}" if where["gpu"] else "")
    )
    print_table(results, plan)
    for goal in goals(results):
        print(f"{'met' if goal.met else 'NOT met'}: {goal.goal}: {goal.value}")
    for r in results:
        for note in r.notes:
            print(f"  {r.key}: {note}")
    write_results(args.output, plan, results, skipped)
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    # A SIGTERM (a timeout, make being stopped) unwinds like Ctrl-C, so the servers are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
