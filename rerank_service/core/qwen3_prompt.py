"""Qwen3-Reranker's prompt, without torch: the local scorer and the upstream formats share it.

The model card writes the chat template around each (query, document) pair. The local
backend tokenizes `PREFIX + format_pair(...) + SUFFIX` itself; an upstream that serves
the model behind a format with two strings per pair (vLLM's cohere-style /v1/rerank)
is sent the same text split in two, as vLLM's own example does:

    query    = PREFIX + "<Instruct>: {instruction}\\n<Query>: {query}\\n"
    document = "<Document>: {doc}" + SUFFIX

so the concatenation the server scores is exactly the model card's prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from rerank_service.core.domain import DEFAULT_INSTRUCT

# The model card's chat template around each pair, verbatim.
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

# One document's upstream string, as a bound str.format: mapped over a chunk in C.
_DOCUMENT = ("<Document>: {}" + SUFFIX).format


def format_pair(instruction: str, query: str, document: str) -> str:
    """The model card's user message for one pair."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def upstream_query(query: str, instruct: str | None) -> str:
    """The query string an upstream is sent: the template's head, instruction and query.

    `instruct` None (or empty) takes the default instruction, as the local scorer does.
    """
    return f"{PREFIX}<Instruct>: {instruct or DEFAULT_INSTRUCT}\n<Query>: {query}\n"


def upstream_document(document: str) -> str:
    """One document's string: the document and the template's tail."""
    return _DOCUMENT(document)


def upstream_documents(documents: Sequence[str]) -> list[str]:
    """`upstream_document` of each document, in order."""
    return list(map(_DOCUMENT, documents))


def upstream_strings(query: str, documents: Sequence[str], instruct: str | None) -> tuple[str, list[str]]:
    """The query and document strings an upstream serving Qwen3-Reranker without a
    template of its own (vLLM's rerank API) must be sent."""
    return upstream_query(query, instruct), upstream_documents(documents)
