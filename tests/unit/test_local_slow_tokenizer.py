"""A local model whose tokenizer is Python-only ("slow") is refused at load, not on its first
long document."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers.models.bert_japanese import BertJapaneseTokenizer

from rerank_service.backends.local.models import ModelLoadError, load_scorer
from tests.support.tiny_models import (
    build_tiny_bi_encoder,
    build_tiny_cross_encoder,
    build_tiny_qwen3_reranker,
)

BUILDERS = {
    "cross-encoder": build_tiny_cross_encoder,
    "bi-encoder": build_tiny_bi_encoder,
    "qwen3 reranker": build_tiny_qwen3_reranker,
}


def with_slow_tokenizer(model: Path, vocabulary: Path) -> Path:
    """`model` with a BertJapaneseTokenizer (no fast version exists) in place of its tokenizer."""
    for file in model.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            file.unlink()
    shutil.copy(vocabulary, model / "vocab.txt")
    tokenizer = BertJapaneseTokenizer(  # type: ignore[no-untyped-call]  # untyped **kwargs
        vocab_file=str(model / "vocab.txt"), word_tokenizer_type="basic", subword_tokenizer_type="wordpiece"
    )
    tokenizer.save_pretrained(model)
    return model


@pytest.mark.parametrize("what", list(BUILDERS))
def test_a_model_with_a_python_only_tokenizer_is_a_load_error(
    what: str, tmp_path: Path, offline: None
) -> None:
    """It loaded, then every document over its window failed INTERNAL (no backend_tokenizer to
    measure it with), in TRUNCATE, CHUNK and REJECT alike."""
    vocabulary = build_tiny_cross_encoder(tmp_path / "vocabulary") / "vocab.txt"
    model = with_slow_tokenizer(BUILDERS[what](tmp_path / "model"), vocabulary)

    with pytest.raises(ModelLoadError) as refused:
        load_scorer(str(model), "cpu", "float32")

    assert str(refused.value).startswith(
        f"cannot load the {what} from {model}: it needs a fast (tokenizers) tokenizer "
        "to measure long documents"
    )
