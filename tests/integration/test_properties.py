"""Property-based abuse of every request field against a live server.

Hypothesis generates RerankRequests (and RerankStream items, and raw bytes that are
not valid protobuf or not valid UTF-8) with text from every Unicode plane, very long
strings, empty and whitespace-only values, any int32 `top_n` and thousands of
documents. Each call must end in the status the validation rules predict (never
INTERNAL or UNKNOWN), a success must be a well-formed ranking, and the server must
answer a valid call right after. Derandomized: CI runs the same examples every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from rerank.v1 import rerank_pb2

from rerank_service.observability.metrics import code_name
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import upstream_settings
from tests.support.rpc import expect_error, request
from tests.support.server import ServerThread

Code = grpc.StatusCode
SERVED = ("qwen3-rerank", "gte-rerank-v2")
MAX_DOCUMENTS = 10_000  # the service's default --max-documents
# The default --max-query-tokens (4,000), estimated for an upstream model at one token per
# 3 bytes of UTF-8: a longer query is refused.
MAX_QUERY_BYTES = 3 * 4000
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
NEVER = {Code.INTERNAL, Code.UNKNOWN}

_REPRODUCIBLE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(count: int) -> settings:
    return settings(_REPRODUCIBLE, max_examples=count)


# Every plane (surrogates cannot be UTF-8, so protobuf strings cannot hold them).
ANY_CHAR = st.characters(codec="utf-8")
ASTRAL_CHAR = st.characters(min_codepoint=0x10000, codec="utf-8")
BLANKS = st.sampled_from(["", " ", "\t\n\r", "\u3000", "\u00a0\u2003\u2009", "\u2028\u2029\x1c", " " * 5000])
TEXT = st.text(ANY_CHAR, max_size=40)
ASTRAL = st.text(ASTRAL_CHAR, min_size=1, max_size=20)
# 1,000 to 120,000 characters (up to 480 KB of UTF-8) without generating each one.
LONG = st.builds(
    lambda piece, times: piece * times, st.text(ANY_CHAR, min_size=1, max_size=3), st.integers(1000, 40_000)
)
STRINGS = st.one_of(TEXT, ASTRAL, BLANKS, LONG)
NON_BLANK = st.one_of(st.text(ANY_CHAR, min_size=1, max_size=40), ASTRAL, LONG).filter(
    lambda text: bool(text.strip())
)
# Long, but within the query limit: at most 3 characters of 4 bytes, 1,000 times.
LONG_QUERY = st.builds(
    lambda piece, times: piece * times, st.text(ANY_CHAR, min_size=1, max_size=3), st.integers(300, 1000)
)
VALID_QUERY = st.one_of(st.text(ANY_CHAR, min_size=1, max_size=40), ASTRAL, LONG_QUERY).filter(
    lambda text: bool(text.strip())
)
TOP_N = st.one_of(
    st.none(), st.sampled_from([INT32_MIN, -1, 0, 1, 2, INT32_MAX]), st.integers(INT32_MIN, INT32_MAX)
)


@pytest.fixture(scope="module")
def live(fake_upstream: FakeUpstream) -> Iterator[ServerThread]:
    """One server for every example (a server per example would be most of the time)."""
    fake_upstream.reset()
    with ServerThread(upstream_settings(fake_upstream)) as server:
        yield server
    fake_upstream.reset()


def blank(text: str) -> bool:
    return not text.strip()


def expected_code(fields: dict[str, Any]) -> grpc.StatusCode:
    """The validation rules: every field checked (INVALID_ARGUMENT), then the model."""
    documents = fields["documents"]
    top_n = fields.get("top_n")
    invalid = (
        blank(fields["model"])
        or blank(fields["query"])
        or not documents
        or any(blank(document) for document in documents)
        or (top_n is not None and top_n < 1)
        or (fields["model"] in SERVED and len(documents) > MAX_DOCUMENTS)
        or (fields["model"] in SERVED and len(fields["query"].encode()) > MAX_QUERY_BYTES)
    )
    if invalid:
        return Code.INVALID_ARGUMENT
    return Code.OK if fields["model"] in SERVED else Code.NOT_FOUND


def describe(fields: dict[str, Any], want: grpc.StatusCode) -> None:
    """Tell Hypothesis's statistics (--hypothesis-show-statistics) what was covered."""
    texts = [value for value in fields.values() if isinstance(value, str)] + list(fields["documents"])
    event(f"expected {want.name}")
    if any(len(text) >= 1000 for text in texts):
        event("a string of 1,000+ characters")
    if any(any(ord(char) >= 0x10000 for char in text) for text in texts):
        event("a character beyond the BMP")
    if any(text and blank(text) for text in texts):
        event("a whitespace-only string")
    if fields.get("top_n") is not None and abs(fields["top_n"]) >= 2**20:
        event("a huge top_n")


def check_ranking(response: rerank_pb2.RerankResponse, fields: dict[str, Any]) -> None:
    documents = fields["documents"]
    top_n = fields.get("top_n")
    results = response.output.results
    assert len(results) == min(top_n or len(documents), len(documents))
    indexes = [result.index for result in results]
    assert len(set(indexes)) == len(indexes)
    assert all(0 <= index < len(documents) for index in indexes)
    scores = [result.relevance_score for result in results]
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert scores == sorted(scores, reverse=True)
    for result in results:
        if fields["return_documents"]:
            assert result.document.text == documents[result.index]
        else:
            assert not result.HasField("document")
    assert response.request_id


def rerank_and_check(server: ServerThread, fields: dict[str, Any]) -> None:
    message = rerank_pb2.RerankRequest(**{key: value for key, value in fields.items() if value is not None})
    want = expected_code(fields)
    describe(fields, want)
    if want == Code.OK:
        check_ranking(server.stub.Rerank(message, timeout=30), fields)
    else:
        error = expect_error(lambda: server.stub.Rerank(message, timeout=30))
        assert error.code() not in NEVER, error.details()
        assert error.code() == want, error.details()
    assert_still_serving(server)


def assert_still_serving(server: ServerThread) -> None:
    response = server.stub.Rerank(request(), timeout=10)
    assert [result.index for result in response.output.results] == [0, 1]


def with_model(model: Any) -> Any:
    return st.one_of(st.sampled_from(SERVED), model)


@examples(200)
@example("qwen3-rerank", "red apple", ["a red apple", "a car"], INT32_MAX, None, True)
@example("qwen3-rerank", "red apple", ["a red apple"], INT32_MIN, None, False)
@example(
    "qwen3-rerank", "\U0001f34e \U00020000 \U000e0041", ["\U0001f34e", "\U0010fffd"], None, "\U0001f600", True
)
@example("qwen3-rerank", "apple " * 30_000, ["apple " * 30_000, "x"], 1, "y" * 100_000, True)
@example("qwen3-rerank", "\u3000", ["\u00a0", " ", ""], 0, " ", False)
@example(" ", "", [], -1, "", False)
@example("qwen3-rerank\x00", "q", ["d"], None, None, False)
@example("m" * 100_000, "q", ["d"], None, None, False)  # echoed in NOT_FOUND: must stay a status
@given(
    model=with_model(STRINGS),
    query=STRINGS,
    documents=st.lists(STRINGS, max_size=6),
    top_n=TOP_N,
    instruct=st.one_of(st.none(), STRINGS),
    return_documents=st.booleans(),
)
def test_any_request_gets_its_validation_status_or_a_well_formed_ranking(
    live: ServerThread,
    model: str,
    query: str,
    documents: list[str],
    top_n: int | None,
    instruct: str | None,
    return_documents: bool,
) -> None:
    fields = {
        "model": model,
        "query": query,
        "documents": documents,
        "top_n": top_n,
        "instruct": instruct,
        "return_documents": return_documents,
    }
    rerank_and_check(live, fields)


@examples(80)
@given(
    model=st.sampled_from(SERVED),
    query=VALID_QUERY,
    documents=st.lists(NON_BLANK, min_size=1, max_size=6),
    top_n=st.one_of(st.none(), st.integers(1, INT32_MAX)),
    instruct=st.one_of(st.none(), STRINGS),
    return_documents=st.booleans(),
)
def test_any_valid_request_gets_a_well_formed_ranking(
    live: ServerThread,
    model: str,
    query: str,
    documents: list[str],
    top_n: int | None,
    instruct: str | None,
    return_documents: bool,
) -> None:
    fields = {
        "model": model,
        "query": query,
        "documents": documents,
        "top_n": top_n,
        "instruct": instruct,
        "return_documents": return_documents,
    }
    assert expected_code(fields) == Code.OK
    rerank_and_check(live, fields)


@examples(15)
@example(MAX_DOCUMENTS, ["apple"], INT32_MAX, False)
@example(MAX_DOCUMENTS + 1, ["apple"], None, False)
@example(1234, ["\U0001f34e"], 3, True)
@given(
    count=st.one_of(st.integers(1000, 12_000), st.sampled_from([MAX_DOCUMENTS, MAX_DOCUMENTS + 1])),
    words=st.lists(
        st.one_of(st.text(ANY_CHAR, min_size=1, max_size=40), ASTRAL).filter(str.strip),
        min_size=1,
        max_size=5,
    ),
    top_n=TOP_N,
    return_documents=st.booleans(),
)
def test_thousands_of_documents_are_ranked_whole_or_refused_past_the_limit(
    live: ServerThread, count: int, words: list[str], top_n: int | None, return_documents: bool
) -> None:
    documents = [f"{words[index % len(words)]} {index}" for index in range(count)]
    fields = {
        "model": "qwen3-rerank",
        "query": f"{words[0]} 7",
        "documents": documents,
        "top_n": top_n,
        "instruct": None,
        "return_documents": return_documents,
    }
    rerank_and_check(live, fields)


@examples(60)
@given(
    items=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(["", "a", "a"]), TEXT),
            with_model(st.one_of(TEXT, BLANKS)),
            STRINGS,
            st.lists(st.one_of(TEXT, ASTRAL, BLANKS), max_size=4),
            TOP_N,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_a_stream_of_any_items_answers_each_and_ends_ok(
    live: ServerThread, items: list[tuple[str, str, str, list[str], int | None]]
) -> None:
    messages = [
        rerank_pb2.RerankStreamRequest(
            id=item_id,
            request=rerank_pb2.RerankRequest(model=model, query=query, documents=documents, top_n=top_n),
        )
        for item_id, model, query, documents, top_n in items
    ]
    answers = list(live.stub.RerankStream(iter(messages), timeout=30))

    # Every item is answered once (an id sent while the same id is in flight is answered
    # with an error for that item: still one answer per item sent).
    assert len(answers) == len(items)
    for answer in answers:
        if answer.WhichOneof("result") == "error":
            code = Code.__members__[code_name(answer.error.code)]
            assert code not in NEVER, answer.error.message
            assert code in {Code.INVALID_ARGUMENT, Code.NOT_FOUND}, answer.error.message
    assert_still_serving(live)


# --- bytes that are not a valid RerankRequest --------------------------------------

FIELD_NUMBERS = {"model": 1, "query": 2, "documents": 3, "instruct": 5}


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def string_field(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


def not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def raw_rerank(server: ServerThread, payload: bytes) -> grpc.StatusCode:
    assert server.channel is not None
    method = server.channel.unary_unary(
        "/rerank.v1.RerankService/Rerank",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    try:
        method(payload, timeout=10)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
    else:
        return Code.OK
    assert code not in NEVER, details
    return code


@examples(30)
@given(field=st.sampled_from(sorted(FIELD_NUMBERS)), bad=st.binary(min_size=1, max_size=64).filter(not_utf8))
def test_invalid_utf8_in_any_string_field_is_invalid_argument(
    live: ServerThread, field: str, bad: bytes
) -> None:
    good = {"model": b"qwen3-rerank", "query": b"red apple", "documents": b"a red apple"}
    payload = b"".join(
        string_field(FIELD_NUMBERS[name], bad if name == field else good[name])
        for name in ("model", "query", "documents", "instruct")
        if name in good or name == field
    )

    assert raw_rerank(live, payload) == Code.INVALID_ARGUMENT
    assert_still_serving(live)


@examples(40)
@given(payload=st.binary(max_size=256))
def test_arbitrary_bytes_as_a_request_are_never_internal_or_unknown(
    live: ServerThread, payload: bytes
) -> None:
    raw_rerank(live, payload)  # asserts the code is neither INTERNAL nor UNKNOWN

    assert_still_serving(live)
