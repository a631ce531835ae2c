"""Tiny random models, built offline in milliseconds, saved as real model directories.

They have the architectures, tokenizers and config files of the real rerankers, so the
loading and scoring code runs unchanged against them; only the weights are random
(seeded, so every build is the same model). Word-level tokenizers keep them small.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from rerank_service.core.domain import DEFAULT_INSTRUCT

SEED = 1234

# Words the tests use, on top of the prompt template's and the default instruction's.
_WORDS = """
a an the and or of to in on for with is are was be it this that how what why when where who do does
mix let then most all some
i you we they my your our find answer answers query document documents question questions passage
passages relevant irrelevant about which best retrieve search web given
bread bake baking flour water yeast rise oven recipe dough cake sugar butter
cat cats dog dogs sleep sleeps day night pet pets animal animals
stock market markets fell rose today price prices bank money
python code program programming language function bug computer
weather rain sun sunny cold hot snow sky
long very much many word words text more
capital france paris city river germany berlin country
judge legal court law contract
"""
WORDS = _WORDS.split()

# The Qwen3-Reranker prompt template (as in the model card) and its special tokens.
_TEMPLATE = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no". system user assistant <Instruct>: <Query>: <Document>:'
)
QWEN3_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN3_PAD = "<|endoftext|>"
QWEN3_UNK = "<unk>"
_PUNCTUATION = list(".,;:!?\"'()-<>/")


def _word_list() -> list[str]:
    """Every word (in lower, capitalised and original case) and punctuation mark, once each."""
    words = [*WORDS, *re.findall(r"\w+", _TEMPLATE), *re.findall(r"\w+", DEFAULT_INSTRUCT)]
    seen: dict[str, None] = {}
    for word in words:
        for variant in (word, word.lower(), word.capitalize()):
            seen.setdefault(variant, None)
    return [*seen, *_PUNCTUATION]


def build_tiny_qwen3_reranker(path: Path) -> Path:
    """A 2-layer Qwen3ForCausalLM with a word-level tokenizer carrying the chat special tokens."""
    path.mkdir(parents=True, exist_ok=True)
    vocabulary = [QWEN3_UNK, QWEN3_PAD, "\n", *_word_list()]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocabulary))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=QWEN3_UNK))
    # Drop spaces and tabs, keep each newline, word and punctuation mark as a token: the
    # template's "\n" then survive, as they do in Qwen's byte-level BPE.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="isolated"),
        ]
    )
    # Special tokens are matched before pre-tokenization, so "<|im_start|>" stays whole.
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (*QWEN3_SPECIAL_TOKENS, QWEN3_PAD)]
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # untyped **kwargs
        tokenizer_object=backend, unk_token=QWEN3_UNK, pad_token=QWEN3_PAD, padding_side="left"
    )
    tokenizer.save_pretrained(path)

    torch.manual_seed(SEED)
    config = Qwen3Config(
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        # Wider random weights than the default 0.02, which leaves every P(yes) at 0.49.
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def _write_bert_tokenizer(path: Path) -> BertTokenizer:
    vocabulary = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *dict.fromkeys(w.lower() for w in _word_list()),
    ]
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    # transformers 5 has one BERT tokenizer, backed by `tokenizers`: BertTokenizerFast is an alias.
    tokenizer = BertTokenizer(vocab=str(vocab_file))
    tokenizer.save_pretrained(path)
    return tokenizer


def _tiny_bert_config(vocab_size: int, num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        # Small on purpose: the window (64 tokens) is what truncation tests run into.
        max_position_embeddings=64,
        # Wide random weights so scores and embeddings differ visibly between inputs.
        initializer_range=0.2,
        id2label={i: f"LABEL_{i}" for i in range(num_labels)},
    )


def build_tiny_cross_encoder(path: Path, num_labels: int = 1) -> Path:
    """A 2-layer BertForSequenceClassification (1 or 2 labels) with a BERT word-piece tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_bert_tokenizer(path)
    torch.manual_seed(SEED)
    config = _tiny_bert_config(len(tokenizer), num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def build_tiny_bi_encoder(path: Path) -> Path:
    """A 2-layer BertModel (an embedding model) with a BERT word-piece tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_bert_tokenizer(path)
    torch.manual_seed(SEED)
    BertModel(_tiny_bert_config(len(tokenizer))).save_pretrained(path)
    return path


def build_tiny_roberta_cross_encoder(path: Path) -> Path:
    """A 2-layer RobertaForSequenceClassification whose tokenizer makes no segment ids (as
    XLM-R rerankers such as bge-reranker): the model then reads none, or zeros."""
    path.mkdir(parents=True, exist_ok=True)
    _write_bert_tokenizer(path)
    tokenizer = BertTokenizer(
        vocab=str(path / "vocab.txt"), model_input_names=["input_ids", "attention_mask"], model_max_length=64
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(SEED)
    bert = _tiny_bert_config(len(tokenizer), num_labels=1)
    config = RobertaConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        intermediate_size=bert.intermediate_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        # RoBERTa counts positions from pad id + 1: room for the same 64-token window.
        max_position_embeddings=64 + tokenizer.pad_token_id + 1,
        pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=1,
        initializer_range=0.2,
        id2label={0: "LABEL_0"},
    )
    RobertaForSequenceClassification(config).save_pretrained(path)
    return path
