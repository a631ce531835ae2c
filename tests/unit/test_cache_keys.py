"""The pair key: everything that changes a score changes the key, and nothing else does."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from rerank_service.cache.keys import KEY_SIZE, PairKeys, deployment_fingerprint

MODEL = {
    "model": "qwen3-rerank",
    "format": "dashscope",
    "score_transform": "none",
    "prompt_template": "",
    "engine": "upstream",
    "quantization": None,
}


def key(
    instruct: str | None = "Given a web search query, retrieve relevant passages",
    query: str = "what is a reranker",
    document: str = "A reranker scores documents against a query.",
    fingerprint: bytes | None = None,
) -> bytes:
    keys = PairKeys(fingerprint if fingerprint is not None else deployment_fingerprint(MODEL))
    return keys.keys(instruct, query, [document])[0]


def test_equal_inputs_give_equal_keys_in_another_process() -> None:
    """The key is stable across processes (no per-process hash seed): replicas share Redis."""
    here = key()
    program = (
        "from rerank_service.cache.keys import PairKeys, deployment_fingerprint\n"
        "import sys, json\n"
        "model = json.loads(sys.argv[1])\n"
        "keys = PairKeys(deployment_fingerprint(model))\n"
        "print(keys.keys('Given a web search query, retrieve relevant passages', 'what is a reranker',"
        " ['A reranker scores documents against a query.'])[0].hex())\n"
    )
    there = subprocess.run(
        [sys.executable, "-c", program, json.dumps(MODEL)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == here.hex()


def test_the_key_is_blake2b_over_the_length_prefixed_fields() -> None:
    """The encoding, written out: a change of it must be deliberate (a new personalization),
    or entries written by the previous version would be read with another meaning."""
    fingerprint = deployment_fingerprint(b"pinned")
    assert fingerprint == hashlib.blake2b(b"pinned", digest_size=32, person=b"rerank-deploy-v1").digest()

    def field(text: bytes) -> bytes:
        return b"\1" + len(text).to_bytes(8, "big") + text

    encoded = len(fingerprint).to_bytes(8, "big") + fingerprint + field(b"i") + field(b"q") + field(b"d")
    expected = hashlib.blake2b(encoded, digest_size=32, person=b"rerank-pair-v1").digest()
    assert key("i", "q", "d", fingerprint) == expected
    assert expected.hex() == "bc14f97e6b093e87e0699d5ed25e0208c787a291613fe1c256cc52eabea109c5"


def test_each_input_changes_the_key() -> None:
    base = key()
    other_model = deployment_fingerprint({**MODEL, "model": "gte-rerank-v2"})
    variants = {
        "model": key(fingerprint=other_model),
        "transform": key(fingerprint=deployment_fingerprint({**MODEL, "score_transform": "sigmoid"})),
        "quantization": key(fingerprint=deployment_fingerprint({**MODEL, "quantization": "int8"})),
        "instruct": key(instruct="Retrieve semantically similar text."),
        "no instruct": key(instruct=None),
        "query": key(query="what is a re-ranker"),
        "document": key(document="A reranker scores documents against a query!"),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_the_fingerprint_ignores_the_order_of_the_settings() -> None:
    """Two deployments of one model, their settings written in another order, share entries."""
    assert deployment_fingerprint(MODEL) == deployment_fingerprint(dict(reversed(MODEL.items())))


def test_fields_are_length_prefixed_so_no_two_splits_collide() -> None:
    keys = PairKeys(deployment_fingerprint(MODEL))
    assert keys.keys("ab", "c", ["d"]) != keys.keys("a", "bc", ["d"])
    assert keys.keys(None, "ab", ["c"]) != keys.keys(None, "a", ["bc"])
    assert keys.keys("", "q", ["d"]) != keys.keys(None, "q", ["d"])


def test_a_key_holds_no_text_and_a_huge_document_is_hashed() -> None:
    document = "x" * (20 * 1024 * 1024)
    found = key(document=document)
    assert len(found) == KEY_SIZE
    assert b"xxxx" not in found
    assert found != key(document=document + "x")


def test_keys_of_a_call_are_in_document_order_and_repeat_for_a_repeated_document() -> None:
    keys = PairKeys(deployment_fingerprint(MODEL)).keys(None, "q", ["a", "b", "a"])
    assert keys[0] == keys[2] != keys[1]
    assert keys[1] == PairKeys(deployment_fingerprint(MODEL)).keys(None, "q", ["b"])[0]


def test_text_python_cannot_encode_strictly_still_has_a_key() -> None:
    """A lone surrogate (JSON may carry one) is hashed, not an error."""
    assert len(key(document="\ud800 lone")) == KEY_SIZE
