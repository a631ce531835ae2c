"""Real models served end to end: tiny Qwen3 and cross-encoder models, and the bundled one.

The tiny models are built by the test and loaded through the production path
(`--local-models NAME=DIRECTORY`); the bundled model is what `rerank-service serve`
answers with out of the box, offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.backends.local.models import load_scorer
from rerank_service.config import load_settings
from tests.support.logs import LogCapture
from tests.support.process import ServiceProcess, run_cli
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread
from tests.support.tiny_models import build_tiny_cross_encoder, build_tiny_qwen3_reranker

OFFLINE = {"HF_HUB_OFFLINE": "1"}
DOCUMENTS = ["what is a rerank model", "a rerank model sorts documents", "yes no", "documents"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny-qwen3": build_tiny_qwen3_reranker(root / "qwen3"),
        "tiny-cross": build_tiny_cross_encoder(root / "cross"),
    }


@pytest.fixture
def served(tiny_models: dict[str, Path], logs: LogCapture) -> Iterator[ServerThread]:
    spec = ",".join(f"{name}={path}" for name, path in tiny_models.items())
    settings = load_settings({"backend": "local", "local_models": spec, "device": "cpu"}, env={})
    with ServerThread(settings) as server:
        yield server


@pytest.mark.parametrize("instruct", [None, "Retrieve semantically similar text."])
def test_a_served_qwen3_reranker_scores_as_the_model_does(
    served: ServerThread, tiny_models: dict[str, Path], instruct: str | None
) -> None:
    fields = {} if instruct is None else {"instruct": instruct}
    response = served.stub.Rerank(
        request(model="tiny-qwen3", query="what is a rerank model", documents=DOCUMENTS, **fields), timeout=60
    )

    scorer = load_scorer(str(tiny_models["tiny-qwen3"]), "cpu", "float32")
    direct = [scorer.score(scorer.encode("what is a rerank model", [d], instruct))[0] for d in DOCUMENTS]
    got = {r.index: r.relevance_score for r in response.output.results}
    assert got == pytest.approx(dict(enumerate(direct)), abs=1e-5)
    assert [r.index for r in response.output.results] == sorted(range(4), key=lambda i: (-direct[i], i))
    expected_tokens = sum(e.tokens for e in scorer.encode("what is a rerank model", DOCUMENTS, instruct))
    assert response.usage.total_tokens == expected_tokens


def test_list_models_tells_which_models_honour_instruct(served: ServerThread) -> None:
    models = served.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=10).models

    assert {m.name: m.supports_instruct for m in models} == {"tiny-qwen3": True, "tiny-cross": False}


def test_a_served_cross_encoder_answers_with_scores_in_range(served: ServerThread) -> None:
    response = served.stub.Rerank(request(model="tiny-cross", documents=DOCUMENTS, top_n=2), timeout=60)

    assert len(response.output.results) == 2
    assert all(0.0 <= r.relevance_score <= 1.0 for r in response.output.results)


def test_a_long_document_is_truncated_not_rejected(served: ServerThread) -> None:
    long_document = " ".join(["documents"] * 20_000)
    response = served.stub.Rerank(request(model="tiny-qwen3", documents=[long_document, "yes"]), timeout=60)

    assert len(response.output.results) == 2


def test_a_query_over_4000_tokens_is_invalid_argument(served: ServerThread) -> None:
    error = expect_error(
        lambda: served.stub.Rerank(request(model="tiny-qwen3", query="rerank " * 4001), timeout=60)
    )

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT


def test_serve_with_no_settings_answers_offline_with_the_bundled_model() -> None:
    with ServiceProcess([], env=OFFLINE) as service:
        ranked = run_cli(
            "rerank", "--target", service.target, "--query", "How do I bake bread?",
            "-d", "The stock market fell sharply today.",
            "-d", "Mix flour, water and yeast, let the dough rise, then bake it.",
            "-d", "Cats sleep for most of the day.",
            "--json",
        )  # fmt: skip
        models = run_cli("models", "--target", service.target)
        exit_code = service.terminate()

    assert ranked.returncode == 0, ranked.stderr
    results = json.loads(ranked.stdout)["output"]["results"]
    assert results[0]["index"] == 1
    assert all(0.0 <= r["relevance_score"] <= 1.0 for r in results)
    assert "all-minilm-l6-v2  backend=local" in models.stdout
    assert "ignores instruct" in models.stdout
    assert exit_code == 0
    loaded = [e for e in service.events() if e["event"] == "model loaded"]
    assert (loaded[0]["kind"], loaded[0]["device"], loaded[0]["dtype"]) == ("bi-encoder", "cpu", "float32")
    # Start to exit, the server writes its log lines and nothing else: no report at
    # interpreter exit of objects frozen at start-up (gc.freeze) as leaked.
    assert len(service.events()) == len(service.lines), service.output


def test_a_model_that_fails_to_load_stops_the_server_with_a_clear_message(tmp_path: Path) -> None:
    process = ServiceProcess(["--local-models", f"broken={tmp_path / 'nowhere'}"], env=OFFLINE)
    with pytest.raises(RuntimeError, match="exited with code 1"), process:
        pass

    [failure] = [e for e in process.events() if e["event"] == "start failed"]
    assert "nowhere" in failure["error"]
    assert "does not exist" in failure["error"]


def test_the_onnx_engine_serves_as_torch_does_and_a_restart_reuses_its_graph(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "onnx-cache"
    model = tiny_models["tiny-cross"]
    args = ["--local-models", f"tiny-cross={model}", "--device", "cpu"]
    args += ["--local-engine", "onnx", "--local-onnx-cache", str(cache)]
    runs = []
    for _ in range(2):
        with ServiceProcess(args, env=OFFLINE) as service:
            stub = rerank_pb2_grpc.RerankServiceStub(grpc.insecure_channel(service.target))
            call = request(model="tiny-cross", query="what is a rerank model", documents=DOCUMENTS)
            response = stub.Rerank(call, timeout=60)
            assert service.terminate() == 0
        runs.append((service, {r.index: r.relevance_score for r in response.output.results}))

    scorer = load_scorer(str(model), "cpu", "float32")
    direct = scorer.score(scorer.encode("what is a rerank model", DOCUMENTS, None))
    for service, scores in runs:
        assert scores == pytest.approx(dict(enumerate(direct)), abs=1e-4)
        [loaded] = [e for e in service.events() if e["event"] == "model loaded"]
        assert (loaded["engine"], loaded["kind"], loaded["dtype"]) == ("onnx", "cross-encoder", "float32")
        # The exporter's progress and warnings stay in its own process, out of the log.
        assert not [line for line in service.lines if "torch.onnx" in line or "onnxscript" in line]
    built = [[e for e in service.events() if e["event"] == "onnx graph built"] for service, _ in runs]
    assert [len(events) for events in built] == [1, 0]  # the restart loaded the cached graph
    assert Path(built[0][0]["cache"]).parent == cache
