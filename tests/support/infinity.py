"""A real Infinity server (infinity-emb) serving a tiny random cross-encoder on CPU.

Infinity serves a cross-encoder's scores in the Cohere rerank format at `POST /rerank`
(no `/v1` prefix unless started with `--url-prefix`). It runs from its own virtualenv,
.venv-infinity, which `make infinity` installs from tests/support/infinity/requirements.txt,
so its pins (numpy<2, transformers 4) never meet the service's.

The model is built here, offline (tests/support/tiny_models.py), and Infinity loads it from
its directory with the hub switched off. It is served under two names: an Infinity with a
single model answers to any model name, so only a second one makes an unknown name an error.

`infinity` is a module-scoped fixture: one server for a whole test module, always stopped.
A test module takes it with `from tests.support.infinity import infinity as infinity`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.tiny_models import build_tiny_cross_encoder

ROOT = Path(__file__).resolve().parents[2]
INFINITY_VENV = ROOT / ".venv-infinity"
INFINITY_CLI = INFINITY_VENV / "bin" / "infinity_emb"

MODEL = "tiny-cross-encoder"
OTHER_MODEL = "tiny-cross-encoder-copy"
# The tiny BERT's position window: Infinity truncates to the tokenizer's model_max_length.
MAX_TOKENS = 64
# Importing torch and loading two tiny models takes about 10 s on 2 idle cores.
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
# How much of the server's output a failure message carries.
OUTPUT_TAIL = 6000


@dataclass(frozen=True)
class Infinity:
    """A running Infinity: its base URL and the names its models are served under."""

    url: str
    model: str
    models: tuple[str, ...]
    log: Path

    def rerank(self, query: str, documents: list[str], top_n: int | None = None) -> dict[str, Any]:
        """Infinity's own answer to a rerank request, called directly (no service between)."""
        body: dict[str, Any] = {
            "model": self.model,
            "query": query,
            "documents": documents,
            "return_documents": False,
        }
        if top_n is not None:
            body["top_n"] = top_n
        response = httpx.post(f"{self.url}/rerank", json=body, timeout=30)
        assert response.status_code == 200, f"Infinity answered {response.status_code}: {response.text}"
        answer: dict[str, Any] = response.json()
        return answer

    def output(self) -> str:
        return _tail(self.log)


def build_model(directory: Path) -> Path:
    """The tiny cross-encoder (one label: Infinity scores it as a reranker), saved to load offline."""
    build_tiny_cross_encoder(directory, num_labels=1)
    # Saved unbounded; Infinity truncates to it, so cap it at what the positions allow.
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["model_max_length"] = MAX_TOKENS
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(home: Path) -> dict[str, str]:
    # Nothing from the caller's INFINITY_* settings (an API key, a URL prefix) leaks in.
    env = {key: value for key, value in os.environ.items() if not key.startswith("INFINITY_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",  # the model is a local directory: never ask the hub
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(home / "hf"),  # and write no cache outside the test's directory
            "INFINITY_HOME": str(home),
            "DO_NOT_TRACK": "1",  # Infinity's telemetry (posthog) off, both ways it reads
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _command(model_dir: Path, port: int) -> list[str]:
    return [
        str(INFINITY_CLI),
        "v2",
        *("--model-id", str(model_dir), "--model-id", str(model_dir)),
        *("--served-model-name", MODEL, "--served-model-name", OTHER_MODEL),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--engine", "torch", "--device", "cpu"),
        # No warm-up batches, no torch.compile (slow on CPU, wants a compiler), no
        # BetterTransformer (needs optimum), no SQLite cache of past answers.
        "--no-model-warmup",
        "--no-compile",
        "--no-bettertransformer",
        "--no-vector-disk-cache",
        *("--log-level", "info"),
    ]


def _tail(log: Path) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return text[-OUTPUT_TAIL:]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to its process group (it is a session leader), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


class InfinityStartError(RuntimeError):
    """Infinity exited or did not answer before it served; the message ends with its log's tail."""


def _wait_until_serving(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise InfinityStartError(f"Infinity exited with code {code} before serving:\n{_tail(log)}")
        with suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise InfinityStartError(
                f"Infinity did not answer at {url} within {timeout:.0f} s:\n{_tail(log)}"
            )
        time.sleep(0.2)


@contextmanager
def infinity_process(
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    port: int,
    log: Path,
    timeout: float = START_TIMEOUT,
) -> Iterator[str]:
    """Run `command` (an Infinity server on `port`, its output to `log`) until it answers
    /health; its URL. Stopped, its whole process group, on the way out; InfinityStartError
    when it does not start."""
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stopping it reaches all of it
        )
    try:
        _wait_until_serving(process, url, log, timeout)
        yield url
    finally:
        _stop(process)


@contextmanager
def running_infinity(directory: Path) -> Iterator[Infinity]:
    """Start Infinity on a free loopback port with the tiny model; stop it on the way out."""
    if not INFINITY_CLI.exists():
        pytest.fail(
            f"{INFINITY_CLI.relative_to(ROOT)} is missing: run `make infinity` to install the real "
            "Infinity server these tests run against (tests/support/infinity/requirements.txt)",
            pytrace=False,
        )
    model_dir = build_model(directory / "model")
    port = free_port()
    log = directory / "infinity.log"
    with ExitStack() as stack:
        try:
            url = stack.enter_context(
                infinity_process(
                    _command(model_dir, port), cwd=directory, env=_environment(directory), port=port, log=log
                )
            )
        except InfinityStartError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield Infinity(url=url, model=MODEL, models=(MODEL, OTHER_MODEL), log=log)


@pytest.fixture(scope="module")
def infinity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infinity]:
    """One real Infinity server for the test module that asks for it."""
    with running_infinity(tmp_path_factory.mktemp("infinity")) as server:
        yield server
