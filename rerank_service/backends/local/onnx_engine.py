"""The ONNX Runtime engine for cross- and bi-encoders.

A model directory is served by ONNX Runtime on the CPU in one of two ways:
- it holds a ready `model.onnx` (or `onnx/model.onnx`, as Hugging Face repositories lay it
  out): that graph is used as it is (quantized first when int8 is asked for);
- otherwise the transformers model is exported at its first load with torch.onnx, in a
  child process (onnx_build.py).

Whatever is built (export, int8 quantization) is cached on disk under a directory named by
a hash of the source's files, the versions of the tools that built it and the options, with
`source.json` beside the graph saying what it was built from: a restart, another worker or
another replica on the same volume loads it instead of building it again. A changed model,
tool or option is a new hash, so a stale graph is never used.

A graph is code the service runs on every document, so the cache is trusted no further
than it must be: `model.onnx.sha256` beside the graph holds its SHA-256, written after
it, and an entry is loaded only if the digest matches and neither the entry nor its files
are symlinks, writable by others or another user's (config/file_trust.py); anything else
is refused with a warning naming the entry, and built again. A cache directory that fails
the same test is not used at all: the graph is built in a private temporary directory.

ONNX Runtime applies its graph optimizations for the machine it runs on (the transformer
fusions of attention, GELU and layer norms among them) when the session is created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from rerank_service.backends.local.common import ModelLoadError, Output
from rerank_service.config.file_trust import untrusted
from rerank_service.observability.logging import get_logger

if TYPE_CHECKING:
    import onnxruntime

_log = get_logger("rerank_service.onnx")

Quantize = Literal["none", "int8"]

# Bumped whenever what this module writes changes, so older cache entries are not reused.
CACHE_FORMAT = 2
# Where a model directory may hold a graph of its own.
READY_GRAPHS = ("model.onnx", "onnx/model.onnx")
_GRAPH = "model.onnx"
_DIGEST = "model.onnx.sha256"  # the SHA-256 of each file of the graph, as sha256sum writes them
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# The variable that tells a build child (onnx_build.py) the pipe whose end it watches: it
# ends when the server that started it ends, however that ends.
PARENT_PIPE = "RERANK_ONNX_BUILD_PARENT_PIPE"
# Seconds after which a leftover build directory of another host (a replica on a shared
# volume, whose processes this one cannot see) is taken as abandoned: no export runs so long.
ABANDONED_AFTER = 24 * 3600


@dataclass(frozen=True, slots=True)
class OnnxOptions:
    quantize: Quantize = "none"
    # ONNX Runtime's intra-op threads: the same number torch uses in this process.
    threads: int = 1
    # Where exported and quantized graphs are kept between starts: the user's cache
    # directory, never a shared temporary one where anyone may plant a graph.
    cache_dir: Path = dataclasses.field(default_factory=lambda: default_cache_dir())


class OnnxForward:
    """A graph run by ONNX Runtime on the CPU; called as torch's models are (see forward.py)."""

    device = "cpu"
    dtype = "float32"  # the CPU build: float32 activations (int8 weights for onnx-int8)

    def __init__(self, session: onnxruntime.InferenceSession, output: str, engine: str) -> None:
        self._session = session
        self._output = output
        self.engine = engine
        self._inputs = tuple(item.name for item in session.get_inputs())
        self.reads_token_type_ids = "token_type_ids" in self._inputs

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # A graph exported with segment ids gets zeros when the tokenizer makes none
        # (RoBERTa, XLM-R): what the model itself assumes when they are not given.
        feed = {name: inputs[name].numpy() for name in self._inputs if name in inputs}
        if len(feed) < len(self._inputs):
            feed["token_type_ids"] = torch.zeros_like(inputs["input_ids"]).numpy()
        [result] = self._session.run([self._output], feed)
        return torch.from_numpy(result)


def onnx_forward(path: Path, output: Output, options: OnnxOptions) -> OnnxForward:
    """The ONNX engine for the model in `path`, building (and caching) its graph if needed.

    Raises ModelLoadError with one sentence saying why it cannot.
    """
    ort = _onnxruntime()
    ready = next((path / name for name in READY_GRAPHS if (path / name).is_file()), None)
    with _graph(path, ready, output, options) as graph:
        session = _session(ort, graph, options.threads)  # reads the whole graph: it may go after
    engine = "onnx-int8" if options.quantize == "int8" else "onnx"
    forward = OnnxForward(session, _output_name(session, output, graph), engine)
    _check_runs(forward, output, graph)
    return forward


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelLoadError(
            "the onnx engine needs onnxruntime: install it with pip install 'rerank-service[local]'"
        ) from exc
    return onnxruntime


@contextlib.contextmanager
def _graph(path: Path, ready: Path | None, output: Output, options: OnnxOptions) -> Iterator[Path]:
    """The graph to load, for as long as the session is being made.

    The model's own ready graph is the model's file, used as it is. What is built comes
    from the cache, unless the cache directory itself is one this process must not trust
    (a symlink, writable by others, another user's): then it is built in a private
    temporary directory, loaded from there and removed, and the warning says so.
    """
    if ready is not None and options.quantize == "none":
        yield ready
        return
    try:
        options.cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot write the onnx cache {options.cache_dir}: {exc.strerror}") from exc
    problem = untrusted(options.cache_dir)
    if problem is None:
        _remove_abandoned(options.cache_dir)
        yield _cached_graph(path, ready, output, options)
        return
    _log.warning(
        "onnx cache refused",
        cache=str(options.cache_dir),
        why=f"the directory {problem}",
        instead="built in a private temporary directory at each start",
        fix="give --local-onnx-cache a directory of this user's that only it may write",
    )
    with tempfile.TemporaryDirectory(prefix="rerank-onnx-") as private:
        yield _cached_graph(path, ready, output, dataclasses.replace(options, cache_dir=Path(private)))


def _cached_graph(path: Path, ready: Path | None, output: Output, options: OnnxOptions) -> Path:
    """The graph for these options from the cache, built into it first when missing.

    float32 is the export (or the ready graph); int8 is built from the float32 graph, which
    is cached on the way, so switching between the two never exports twice. An entry is
    loaded only if it passes _check_entry; one that does not is replaced.
    """
    key, description = _cache_key(path, ready, output, options.quantize)
    entry = options.cache_dir / key
    if _check_entry(entry):
        return entry / _GRAPH
    source = ready
    if options.quantize == "int8" and source is None:
        source = _cached_graph(path, None, output, dataclasses.replace(options, quantize="none"))
    try:
        building = Path(tempfile.mkdtemp(prefix=f".building-{_builder()}-", dir=options.cache_dir))
    except OSError as exc:
        raise ModelLoadError(f"cannot write the onnx cache {options.cache_dir}: {exc.strerror}") from exc
    try:
        started = time.perf_counter()
        if options.quantize == "int8":
            assert source is not None
            _quantize_int8(source, building / _GRAPH)
        else:
            _export(path, output, building / _GRAPH)
        (building / "source.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        _seal(building)
        building.chmod(0o755)  # mkdtemp's 0700: other users sharing the cache may read it
        _publish(building, entry)
        _log.info(
            "onnx graph built",
            source=str(path),
            cache=str(entry),
            quantize=options.quantize,
            seconds=round(time.perf_counter() - started, 2),
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot build an onnx graph of the model in {path}: {reason}") from exc
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return entry / _GRAPH


def _cache_key(
    path: Path, ready: Path | None, output: Output, quantize: Quantize
) -> tuple[str, dict[str, Any]]:
    """A hash of what the graph is built from and how, and the same in words for source.json."""
    import onnxruntime
    import transformers

    digest = hashlib.sha256()
    files = []
    for file in _source_files(path, ready):
        file_digest = _file_sha256(file)
        files.append({"file": str(file.relative_to(path)), "sha256": file_digest})
        digest.update(f"{file.relative_to(path)}\0{file_digest}\0".encode())
    versions = {
        "cache_format": CACHE_FORMAT,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    built = {"output": output, "quantize": quantize, "from": "model.onnx" if ready else "export"}
    digest.update(json.dumps([versions, built], sort_keys=True).encode())
    key = digest.hexdigest()[:40]
    return key, {"source": str(path), "sha256": key, "files": files, "versions": versions, **built}


def _source_files(path: Path, ready: Path | None) -> list[Path]:
    """What the graph is made from: the ready graph and its external data, or the config and weights."""
    if ready is not None:
        patterns, folder = (ready.name, f"{ready.name}_data", f"{ready.name}.data"), ready.parent
    else:
        patterns, folder = ("config.json", "*.safetensors", "*.bin"), path
    return sorted({file for pattern in patterns for file in folder.glob(pattern) if file.is_file()})


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _seal(building: Path) -> None:
    """Make the built files read-only to others and write their SHA-256s beside them
    (`model.onnx.sha256`, as sha256sum writes them), last and atomically: a digest file
    only ever describes a finished graph."""
    lines = []
    for file in sorted(building.iterdir()):
        file.chmod(0o644)  # whatever the umask: a file others may write is refused at load
        if file.name not in (_DIGEST, "source.json"):
            lines.append(f"{_file_sha256(file)}  {file.name}\n")
    partial = building / f".{_DIGEST}.partial"
    partial.write_text("".join(lines), encoding="utf-8")
    partial.chmod(0o644)
    partial.replace(building / _DIGEST)


def _check_entry(entry: Path) -> bool:
    """Whether the cache entry may be loaded: False if there is none, or if it is refused
    (a warning names the entry and why; it is moved out of the way to be built again)."""
    if not os.path.lexists(entry):
        return False
    problem = _entry_problem(entry)
    if problem is None:
        return True
    _log.warning("onnx cache entry refused", entry=str(entry), why=problem, instead="built again")
    _discard(entry)
    return False


def _entry_problem(entry: Path) -> str | None:
    """Why the entry must not be loaded, or None: the entry, its graph and its digest file
    must each pass untrusted() (no symlink, no one else may write, this user's or root's),
    and every file the digest file names must have its SHA-256."""
    problem = untrusted(entry)
    if problem is not None:
        return f"the entry {problem}"
    digests = entry / _DIGEST
    if not os.path.lexists(digests):
        return f"it has no {_DIGEST}"
    listed = _listed_digests(digests)
    if listed is None or _GRAPH not in listed:
        return f"{_DIGEST} does not name {_GRAPH}"
    for name in (_DIGEST, *listed):
        problem = untrusted(entry / name)
        if problem is not None:
            return f"{name} {problem}"
        if not (entry / name).is_file():  # no link by now: the entry's own file, or not one
            return f"{name} is not a file"
    for name, expected in listed.items():
        try:
            if _file_sha256(entry / name) != expected:
                return f"the SHA-256 of {name} is not the one in {_DIGEST}"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
    return None


def _listed_digests(digests: Path) -> dict[str, str] | None:
    """file name → SHA-256 from a digest file, or None if it is not one this module wrote."""
    listed: dict[str, str] = {}
    try:
        text = digests.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        # A plain file name of the entry: never a path that leads out of it.
        if len(digest) != 64 or not name or name != Path(name).name or name in (".", ".."):
            return None
        listed[name] = digest
    return listed


def _discard(entry: Path) -> None:
    """Move a refused entry out of the way (a hidden name in the cache, then removed):
    what cannot be removed (another user's files) stays there, never loaded."""
    aside = entry.with_name(f".refused-{entry.name}-{_builder()}-{time.monotonic_ns()}")
    try:
        entry.rename(aside)  # the link itself, if it is one: never what it points to
    except FileNotFoundError:
        return  # another process moved it first
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ModelLoadError(f"cannot move the refused onnx cache entry {entry} aside: {why}") from exc
    if aside.is_symlink():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _builder() -> str:
    """Who builds (or discards) in the cache, in the name of its working directory: this
    process's pid and where it runs (_place), so that another process can tell when it has gone."""
    return f"{os.getpid()}@{_place()}"


def _place() -> str:
    """Where a pid names one process: this host and, on Linux, its PID namespace (two
    containers sharing the host's name and a volume see different processes)."""
    place = socket.gethostname()
    with contextlib.suppress(OSError):
        place += "." + os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    return place


# A working directory's name: .building-PID@HOST-RANDOM, .refused-ENTRY-PID@HOST-NS.
_WORKING = re.compile(r"\.(?:building|refused)-(?:.*-)?(\d+)@(.+)-[^-]+")


def _remove_abandoned(cache: Path) -> None:
    """Remove the working directories (.building-*, .refused-*) that the process they name
    left behind when it ended mid-build (a SIGTERM during an export at start): one of this
    place (_place) whose process is gone, or one older than ABANDONED_AFTER (another host's,
    or of a version that did not name its process). A live process's build is never touched."""
    try:
        names = [name for name in os.listdir(cache) if name.startswith((".building-", ".refused-"))]
    except OSError:
        return
    place = _place()
    for name in names:
        working = cache / name
        named = _WORKING.fullmatch(name)
        if named is not None and named[2] == place:
            abandoned = not _running(int(named[1]))
        else:
            try:
                abandoned = time.time() - working.lstat().st_mtime > ABANDONED_AFTER
            except OSError:
                continue  # removed meanwhile
        if not abandoned:
            continue
        if working.is_symlink():
            with contextlib.suppress(OSError):
                working.unlink()
        else:
            shutil.rmtree(working, ignore_errors=True)  # another user's stays: never loaded


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this host (another user's too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # not ours to signal: it exists
        return True
    return True


def _publish(building: Path, entry: Path) -> None:
    """Move a finished build into place; another process may have published it first
    (then its entry is checked as any other, and replaced by this one if refused)."""
    for _ in range(2):
        try:
            building.rename(entry)
            return
        except OSError:
            if _check_entry(entry):
                return
    building.rename(entry)


def _export(path: Path, output: Output, target: Path) -> None:
    """Export the model in `path` to `target` (float32) with the torch.export-based exporter."""
    _build("export", str(path), output, str(target))


def _quantize_int8(source: Path, target: Path) -> None:
    """Quantize the float32 graph `source` to int8 weights in `target`."""
    _build("quantize", str(source), str(target))
    if not target.is_file():
        raise RuntimeError(f"the int8 quantizer wrote no graph from {source}")


def _build(*arguments: str) -> None:
    """Run onnx_build.py in a child process.

    The exporter pulls in torch.export, dynamo and onnxscript (hundreds of MB the server
    never needs again), the exporter and the quantizer print progress and warnings, and
    either may crash on an operator it cannot convert: a child keeps all of that out of
    the serving process and its one-JSON-object-a-line log.
    """
    command = [sys.executable, "-m", "rerank_service.backends.local.onnx_build", *arguments]
    # The child ends with this process: it watches the read end of a pipe whose write end only
    # this process holds, and reads its end (EOF) once this process is gone, however it ended
    # (a SIGTERM at start ends it by os._exit: the exporter ran on, orphaned, for minutes).
    watched, held = os.pipe()  # neither inherited by other children (PEP 446)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        PARENT_PIPE: str(watched),
    }
    try:
        with subprocess.Popen(  # noqa: S603 - our own module, with paths we chose
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            pass_fds=(watched,),
            # Out of the server's process group: a SIGHUP to the group (a reload by systemd's
            # `kill -s HUP`, a terminal's hangup) would kill it, and fail the model's load; it
            # ends with this process anyway (PARENT_PIPE).
            start_new_session=True,
        ) as child:
            os.close(watched)
            watched = -1
            try:
                _, errors = child.communicate()
            except BaseException:
                child.kill()
                raise
    finally:
        for end in (watched, held):
            if end >= 0:
                os.close(end)
    if child.returncode != 0:
        lines = [line for line in errors.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"{arguments[0]} exited with code {child.returncode}")


def _session(ort: Any, graph: Path, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one batch at a time: parallelism is inside operators
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT writes its own lines to stderr
    # Idle threads must not spin: the event loop and the gRPC threads share these cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            str(graph),
            options,
            providers=["CPUExecutionProvider"],
            # ORT's fused SkipLayerNormalization runs slower on the CPU than the Add and
            # LayerNormalization it replaces: without it a batch of 32 BERT pairs took 15%
            # less time in int8 and 7% less in float32 (docs/perf-history.md).
            disabled_optimizers=["SkipLayerNormFusion"],
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load {graph}: {reason}") from exc


def _output_name(session: Any, output: Output, graph: Path) -> str:
    """The graph's output the scorer reads: by name, else the first one of the right rank."""
    outputs = session.get_outputs()
    names = [item.name for item in outputs]
    wanted = {"logits": ("logits",), "last_hidden_state": ("last_hidden_state", "token_embeddings")}[output]
    for name in wanted:
        if name in names:
            return name
    rank = 2 if output == "logits" else 3
    for item in outputs:
        if len(item.shape) == rank:
            return str(item.name)
    raise ModelLoadError(f"{graph} has no {output} output (its outputs: {', '.join(names)})")


def _check_runs(forward: OnnxForward, output: Output, graph: Path) -> None:
    """Run one tiny batch so a graph that cannot serve fails at load, not on a caller's request."""
    missing = [name for name in INPUTS[:2] if name not in forward._inputs]
    unknown = [name for name in forward._inputs if name not in INPUTS]
    if missing or unknown:
        raise ModelLoadError(
            f"{graph} takes inputs {', '.join(forward._inputs)}; the service feeds input_ids, "
            "attention_mask and token_type_ids"
        )
    ids = torch.tensor([[1, 5, 2], [1, 2, 0]], dtype=torch.long)
    sample = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}
    try:
        result = forward(sample)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{graph} fails on a sample batch: {reason}") from exc
    rank = 2 if output == "logits" else 3
    if result.dim() != rank or result.shape[0] != 2:
        raise ModelLoadError(
            f"{graph} answers a batch of 2 with shape {tuple(result.shape)}; a "
            f"{'cross-encoder' if output == 'logits' else 'bi-encoder'} needs {rank} dimensions"
        )


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/rerank-service/onnx, else ~/.cache/rerank-service/onnx."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rerank-service" / "onnx"
