"""The OpenAPI document of the HTTP front door against what the server really accepts and answers.

- the served /openapi.json is rerank_service.api.http.openapi.document() and docs/openapi.json;
- the document is valid OpenAPI 3.1 (openapi-spec-validator);
- for each rerank route, requests built from the document's request schema are answered
  200, and the answers fit the declared 200 schema and headers;
- every error the server answers (401, 400, 404, 411, 413, 415, 429, 503, 504) has its
  status declared for the route, and its body fits the schema declared for that status;
- /v1/models, /healthz and /readyz answers fit theirs;
- what the server refuses as a field error, the request schema refuses too, and what it
  answers 200 (null options, any case), the request schema accepts.

Instances are checked with jsonschema (2020-12, OpenAPI 3.1's dialect), each against the
document's own schema at its JSON pointer, so `#/components/schemas` references resolve
inside the document.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from rerank_service.api.http import openapi
from rerank_service.api.http.app import RERANK_ROUTES
from rerank_service.api.http.formats import NATIVE_OPTIONS
from rerank_service.config.secret import Secret
from rerank_service.testing.fake_upstream import FakeUpstream, Fault, expected_ranking, total_tokens
from tests.conftest import CALLER_KEY, ServerFactory, upstream_settings
from tests.support.server import ServerThread

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = openapi.document()
DOCUMENT_URI = "urn:rerank-service:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    DOCUMENT_URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
)
JSON = "application/json"
MAX_MESSAGE_BYTES = 64 * 1024  # the server's --max-message-bytes here: a 413 is cheap to send
UPSTREAM_TIMEOUT = 1.0  # seconds: a 504 is quick to provoke

MODEL = "qwen3-rerank"
QUERY = "red apple"
DOCUMENTS = ["a red apple", "a car", "apple pie"]
INSTRUCT = "Given a grocery query, rank the products that match it"
TOP_N = 2
# The value of each string or integer field the document's request schemas name: a field
# the test does not know fails loudly below (add it here, with a value the server accepts).
# truncate: the documents here fit any window, so the answer is the plain ranking.
STRINGS = {"model": MODEL, "query": QUERY, "instruct": INSTRUCT, "long_documents": "truncate"}
INTEGERS = {"top_n": TOP_N, "max_tokens_per_doc": 512, "chunk_overlap_tokens": 16}

NATIVE = "/api/v1/services/rerank/text-rerank/text-rerank"
COMPATIBLE = "/compatible-api/v1/reranks"
COHERE = ("/v1/rerank", "/v2/rerank")
ROUTES = list(RERANK_ROUTES)


# --- the document and its schemas --------------------------------------------------------------


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def pointer(*parts: str) -> str:
    return "/" + "/".join(escape(part) for part in parts)


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a local `$ref` (`#/components/schemas/...`) names, or the schema itself."""
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), f"only local references are expected: {ref}"
        node: Any = DOCUMENT
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        schema = node
    return schema


def check(instance: Any, at: str, what: str) -> None:
    """`instance` fits the document's schema at JSON pointer `at` (references resolved in it)."""
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{DOCUMENT_URI}#{at}"},
        registry=REGISTRY,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    errors = [
        f"  at {'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]
    assert not errors, (
        f"{what} does not fit the document's schema ({at}):\n"
        + "\n".join(errors)
        + (f"\n{json.dumps(instance)[:2000]}")
    )


def operation(path: str, method: str) -> dict[str, Any]:
    paths = DOCUMENT["paths"]
    assert path in paths, f"{path} is not in the OpenAPI document"
    assert method in paths[path], f"{method.upper()} {path} is not in the OpenAPI document"
    found: dict[str, Any] = paths[path][method]
    return found


def check_answer(path: str, method: str, answer: httpx.Response) -> Any:
    """The status is declared for the operation, the body fits that status's schema."""
    responses = operation(path, method)["responses"]
    status = str(answer.status_code)
    assert status in responses, (
        f"{method.upper()} {path} answered {status}, which the document does not declare "
        f"(declared: {', '.join(responses)}): {answer.text[:500]}"
    )
    content = responses[status].get("content")
    media_type = answer.headers.get("content-type", "").split(";")[0].strip()
    assert content is not None, (
        f"{method.upper()} {path} answered {status} with a {media_type or 'typeless'} body the document "
        f"does not describe (responses/{status} has no content): {answer.text[:500]}"
    )
    assert media_type in content, (
        f"{method.upper()} {path} answered {status} as {media_type!r}; declared: {', '.join(content)}"
    )
    body = answer.json()
    check(
        body,
        pointer("paths", path, method, "responses", status, "content", media_type, "schema"),
        f"the {status} answer of {method.upper()} {path}",
    )
    return body


def request_pointer(path: str) -> str:
    return pointer("paths", path, "post", "requestBody", "content", JSON, "schema")


def request_schema(path: str) -> dict[str, Any]:
    return resolve(operation(path, "post")["requestBody"]["content"][JSON]["schema"])


def build(schema: dict[str, Any], name: str, full: bool, branch: int, text: str | None = None) -> Any:
    """An instance of `schema`: the required properties only, or (`full`) all of them;
    `branch` picks the alternative of a `oneOf`; documents are DOCUMENTS."""
    schema = resolve(schema)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "oneOf" in schema:
        options = schema["oneOf"]
        return build(options[branch % len(options)], name, full, branch, text)
    kind = schema.get("type")
    if isinstance(kind, list):  # ["integer", "null"]: an optional field that may be null; not null here
        (kind,) = (one for one in kind if one != "null")
    if kind == "object":
        required = set(schema.get("required", ()))
        return {
            field: build(sub, field, full, branch, text)
            for field, sub in schema.get("properties", {}).items()
            if full or field in required
        }
    if kind == "array":
        assert name == "documents", f"an array field the test does not know: {name}"
        return [build(schema["items"], name, full, branch, document) for document in DOCUMENTS]
    if kind == "string":
        if text is not None:
            return text
        assert name in STRINGS, f"a string field the test does not know: {name!r} (add it to STRINGS)"
        return STRINGS[name]
    if kind == "integer":
        assert name in INTEGERS, f"an integer field the test does not know: {name!r} (add it to INTEGERS)"
        value = INTEGERS[name]
        assert value >= schema.get("minimum", value), f"{name}={value} is below the document's minimum"
        return value
    if kind == "boolean":
        return True if full else bool(schema.get("default", False))
    raise AssertionError(f"a schema the test cannot build an instance of: {name}: {schema}")


def one_of_branches(schema: dict[str, Any]) -> int:
    """The most alternatives any `oneOf` in the schema offers (1: none)."""
    schema = resolve(schema)
    found = len(schema.get("oneOf", ())) or 1
    for sub in [*schema.get("properties", {}).values(), *([schema["items"]] if "items" in schema else [])]:
        found = max(found, one_of_branches(sub))
    return found


def request_variants() -> Iterator[Any]:
    for path in ROUTES:
        for full in (False, True):
            for branch in range(one_of_branches(request_schema(path))):
                label = ("all fields" if full else "required fields") + (
                    f", oneOf {branch}" if branch else ""
                )
                yield pytest.param(path, full, branch, id=f"{path} {label}")


def valid_request(path: str, full: bool = False, branch: int = 0) -> dict[str, Any]:
    body = build(request_schema(path), "body", full, branch)
    assert isinstance(body, dict)
    check(body, request_pointer(path), f"the request built for {path}")
    return body


def with_query(path: str, body: dict[str, Any], query: Any) -> dict[str, Any]:
    if path == NATIVE:
        return {**body, "input": {**body["input"], "query": query}}
    return {**body, "query": query}


def with_documents(path: str, body: dict[str, Any], documents: Any) -> dict[str, Any]:
    if path == NATIVE:
        return {**body, "input": {**body["input"], "documents": documents}}
    return {**body, "documents": documents}


def with_parameter(path: str, body: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    if path == NATIVE:
        return {**body, "parameters": {**body.get("parameters", {}), name: value}}
    return {**body, name: value}


def request_id_of(path: str, body: Any) -> Any:
    """The id an answer's body carries: DashScope's `request_id` (but in the compatible
    format's answer: `id`), Cohere's `id`."""
    return body["request_id"] if "request_id" in body and path in (NATIVE, COMPATIBLE) else body["id"]


# --- the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(fake_upstream: FakeUpstream) -> Iterator[ServerThread]:
    settings = upstream_settings(
        fake_upstream,
        http_port=0,
        api_keys=(Secret(CALLER_KEY),),
        max_message_bytes=MAX_MESSAGE_BYTES,
        upstream_timeout=UPSTREAM_TIMEOUT,
    )
    with ServerThread(settings) as running:
        yield running


def client_of(server: ServerThread) -> httpx.Client:
    """A client of the server's HTTP port, with the caller key."""
    assert server.server is not None
    assert server.server.http is not None
    return httpx.Client(
        base_url=f"http://127.0.0.1:{server.server.http.port}",
        headers={"Authorization": f"Bearer {CALLER_KEY}"},
        timeout=30,
        trust_env=False,
    )


@pytest.fixture
def http(server: ServerThread, upstream: FakeUpstream) -> Iterator[httpx.Client]:
    """A client of the shared server; the fake upstream's faults are cleared around each test."""
    with client_of(server) as client:
        yield client


# --- the document itself -----------------------------------------------------------------------


def test_the_served_document_is_the_code_and_the_docs_file(http: httpx.Client) -> None:
    served = http.get("/openapi.json")

    assert served.status_code == 200
    assert served.headers["content-type"].startswith(JSON)
    assert served.json() == openapi.document()
    on_disk = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))
    assert on_disk == openapi.document(), "docs/openapi.json is stale: run `make docs` and commit it"


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate(DOCUMENT, cls=OpenAPIV31SpecValidator)
    for name, schema in DOCUMENT["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert name


def test_every_route_is_in_the_document_and_every_operation_is_served(http: httpx.Client) -> None:
    declared = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    served = {(path, "post") for path in RERANK_ROUTES} | {
        (path, "get") for path in ("/v1/models", "/healthz", "/readyz", "/openapi.json")
    }
    assert served <= declared, f"served but not in the document: {sorted(served - declared)}"
    for path, method in sorted(declared):
        answer = http.request(method, path, json={} if method == "post" else None)
        # aiohttp's own plain-text 404 or 405: no route of ours answered.
        unrouted = answer.status_code in (404, 405) and "x-request-id" not in answer.headers
        assert not unrouted, f"{method.upper()} {path} is in the document but not served: {answer.text[:200]}"


# --- the rerank routes: 200 --------------------------------------------------------------------


@pytest.mark.parametrize(("path", "full", "branch"), list(request_variants()))
def test_a_request_built_from_the_schema_is_answered_as_declared(
    http: httpx.Client, path: str, full: bool, branch: int
) -> None:
    request = valid_request(path, full, branch)

    answer = http.post(path, json=request)

    assert answer.status_code == 200, answer.text
    body = check_answer(path, "post", answer)
    results = body["output"]["results"] if path == NATIVE else body["results"]
    ranking = expected_ranking(QUERY, DOCUMENTS)[: TOP_N if full else None]
    assert [(r["index"], r["relevance_score"]) for r in results] == ranking
    assert [r.get("document") for r in results] == [
        {"text": DOCUMENTS[index]} if full else None for index, _ in ranking
    ]
    assert body["usage"]["total_tokens"] == total_tokens(QUERY, DOCUMENTS)
    # The headers the document declares for a 200: those it says are always sent, and the
    # upstream's ids (an upstream answered); x-cache only when the score cache is on (off here).
    declared = operation(path, "post")["responses"]["200"].get("headers", {})
    sent = {header for header, spec in declared.items() if spec.get("required")} | {"x-upstream-request-ids"}
    assert sent <= set(declared)
    for header in sent:
        assert answer.headers.get(header), f"the 200 of {path} lacks its declared header {header}"
    assert "x-cache" in declared
    assert "x-cache" not in answer.headers
    assert answer.headers["x-request-id"] == request_id_of(path, body)


# --- the rerank routes: errors -----------------------------------------------------------------


def send(http: httpx.Client, path: str, case: str) -> httpx.Response:
    """One request the server refuses, by the failure it is meant to provoke."""
    valid = valid_request(path)
    if case == "401 no key":
        return http.post(path, json=valid, headers={"Authorization": ""})
    if case == "401 wrong key":
        return http.post(path, json=valid, headers={"Authorization": "Bearer not-a-key"})
    if case == "400 not JSON":
        return http.post(path, content=b"{not json", headers={"content-type": JSON})
    if case == "400 not UTF-8":
        return http.post(path, content=b'{"model": "\xff"}', headers={"content-type": JSON})
    if case == "400 not an object":
        return http.post(path, json=[valid])
    if case == "400 wrong type":
        return http.post(path, json={**valid, "model": 7})
    if case == "400 missing field":
        return http.post(path, json={key: value for key, value in valid.items() if key != "model"})
    if case == "400 rule broken":
        return http.post(path, json=with_parameter(path, with_query(path, valid, "  "), "top_n", 0))
    if case == "404 unknown model":
        return http.post(path, json={**valid, "model": "no-such-model"})
    if case == "411 no length":
        chunks = iter([json.dumps(valid).encode()])  # a generator: sent chunked, without Content-Length
        return http.post(path, content=chunks, headers={"content-type": JSON})
    if case == "413 too large":
        padded = with_documents(path, valid, ["x" * MAX_MESSAGE_BYTES])
        return http.post(path, json=padded)
    if case == "415 wrong media type":
        return http.post(path, content=json.dumps(valid), headers={"content-type": "text/plain"})
    raise AssertionError(case)


REFUSALS = [
    "401 no key",
    "401 wrong key",
    "400 not JSON",
    "400 not UTF-8",
    "400 not an object",
    "400 wrong type",
    "400 missing field",
    "400 rule broken",
    "404 unknown model",
    "411 no length",
    "413 too large",
    "415 wrong media type",
]


@pytest.mark.parametrize("case", REFUSALS)
@pytest.mark.parametrize("path", ROUTES)
def test_every_refusal_is_declared_and_fits_its_schema(http: httpx.Client, path: str, case: str) -> None:
    answer = send(http, path, case)

    assert answer.status_code == int(case[:3]), answer.text
    body = check_answer(path, "post", answer)
    assert answer.headers["x-request-id"] == request_id_of(path, body)
    assert body["message"]


UPSTREAM_FAILURES = {
    "429 upstream throttles": Fault(
        status=429,
        body={"code": "Throttling", "message": "slow down", "request_id": "upstream-429"},
        headers={"Retry-After": "2"},
    ),
    "503 upstream unavailable": Fault(
        status=503, body={"code": "ServiceUnavailable", "message": "down", "request_id": "upstream-503"}
    ),
    "504 upstream too slow": Fault(delay=UPSTREAM_TIMEOUT * 3),
}


@pytest.mark.parametrize("case", list(UPSTREAM_FAILURES))
@pytest.mark.parametrize("path", ROUTES)
def test_every_upstream_failure_is_declared_and_fits_its_schema(
    serve: ServerFactory, upstream: FakeUpstream, path: str, case: str
) -> None:
    upstream.always(UPSTREAM_FAILURES[case])
    # A server of its own: the failures must not open the shared server's upstream circuit.
    settings = {"http_port": 0, "api_keys": (Secret(CALLER_KEY),), "upstream_timeout": UPSTREAM_TIMEOUT}
    with serve(**settings) as server, client_of(server) as http:
        answer = http.post(path, json=valid_request(path))

    assert answer.status_code == int(case[:3]), answer.text
    body = check_answer(path, "post", answer)
    assert body["message"]
    if answer.status_code == 429:
        assert answer.headers.get("retry-after") == "2"


# --- what the server refuses, the schema refuses ---------------------------------------------


Change = Callable[[str, dict[str, Any]], dict[str, Any]]
FIELD_ERRORS: dict[str, Change] = {
    "missing model": lambda path, body: {k: v for k, v in body.items() if k != "model"},
    "model not a string": lambda path, body: {**body, "model": 7},
    "query not a string": lambda path, body: with_query(path, body, 7),
    "documents not a list": lambda path, body: with_documents(path, body, "a red apple"),
    "no documents": lambda path, body: with_documents(path, body, []),
    "a document not a string": lambda path, body: with_documents(path, body, [7]),
    "top_n 0": lambda path, body: with_parameter(path, body, "top_n", 0),
    "top_n not an integer": lambda path, body: with_parameter(path, body, "top_n", "2"),
    "return_documents not a boolean": lambda path, body: with_parameter(
        path, body, "return_documents", "yes"
    ),
    "instruct not a string": lambda path, body: with_parameter(path, body, "instruct", 7),
    "empty model": lambda path, body: {**body, "model": ""},
    "empty query": lambda path, body: with_query(path, body, ""),
    "an empty document": lambda path, body: with_documents(path, body, ["a red apple", ""]),
    "top_n past 2**31": lambda path, body: with_parameter(path, body, "top_n", 2**31),
    "long_documents unknown": lambda path, body: with_parameter(path, body, "long_documents", "chunks"),
}


def option(name: str, value: Any) -> Change:
    """The change setting the option `name` to `value`, where the route keeps its options."""
    return lambda path, body: with_parameter(path, body, name, value)


def beside_input(name: str) -> Change:
    """The change setting the option `name` at the top level (where the flat formats keep it)."""
    value = {**STRINGS, **INTEGERS, "return_documents": True}[name]  # a value the server takes
    return lambda path, body: {**body, name: value}


# Refused by some formats only: each case with the routes it is refused on.
FORMAT_FIELD_ERRORS: dict[str, tuple[tuple[str, ...], Change]] = {
    # The native format keeps every option in `parameters`: one beside `input` is refused.
    **{f"{name} beside input": ((NATIVE,), beside_input(name)) for name in NATIVE_OPTIONS},
    # Cohere's documents are ranked on their text alone.
    "rank_fields other than text": (
        COHERE,
        lambda path, body: {
            **body,
            "documents": [{"text": text, "title": "t"} for text in DOCUMENTS],
            "rank_fields": ["title"],
        },
    ),
}


def field_errors(path: str) -> dict[str, Change]:
    return {
        **FIELD_ERRORS,
        **{case: change for case, (paths, change) in FORMAT_FIELD_ERRORS.items() if path in paths},
    }


@pytest.mark.parametrize("path", ROUTES)
def test_a_request_the_server_refuses_as_invalid_the_schema_refuses(http: httpx.Client, path: str) -> None:
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{DOCUMENT_URI}#{request_pointer(path)}"}, registry=REGISTRY
    )
    accepted = []
    for case, change in field_errors(path).items():
        request = change(path, valid_request(path))
        answer = http.post(path, json=request)
        assert answer.status_code == 400, f"{case}: {answer.status_code} {answer.text}"
        if validator.is_valid(request):
            accepted.append(f"  {case}: {json.dumps(request)[:200]} -> 400 {answer.json()['message']}")

    assert not accepted, (
        f"{path} refuses these requests, but the document's request schema accepts them "
        "(it should say so: minLength, maximum...):\n" + "\n".join(accepted)
    )


# --- what the server accepts, the schema accepts -----------------------------------------------


# The server reads a null option as absent, and long_documents in any case (around spaces).
ACCEPTED: dict[str, Change] = {
    **{f"{name} null": option(name, None) for name in NATIVE_OPTIONS},
    **{
        f"long_documents {value!r}": option("long_documents", value)
        for value in ("CHUNK", "Truncate", " reject\t", "chun\u212a")  # U+212A KELVIN SIGN: lowered, k
    },
}
# Accepted by some formats only (the others ignore these fields, or have none).
FORMAT_ACCEPTED: dict[str, tuple[tuple[str, ...], Change]] = {
    "parameters null": ((NATIVE,), lambda path, body: {**body, "parameters": None}),
    "rank_fields null": (COHERE, lambda path, body: {**body, "rank_fields": None}),
}


@pytest.mark.parametrize("path", ROUTES)
def test_a_request_the_server_answers_the_schema_accepts(http: httpx.Client, path: str) -> None:
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{DOCUMENT_URI}#{request_pointer(path)}"}, registry=REGISTRY
    )
    cases = {
        **ACCEPTED,
        **{case: change for case, (paths, change) in FORMAT_ACCEPTED.items() if path in paths},
    }
    refused = []
    for case, change in cases.items():
        request = change(path, valid_request(path, full=True))
        answer = http.post(path, json=request)
        assert answer.status_code == 200, f"{case}: {answer.status_code} {answer.text}"
        check_answer(path, "post", answer)
        if not validator.is_valid(request):
            refused.append(f"  {case}: {json.dumps(request)[:200]}")

    assert not refused, (
        f"{path} answers these requests 200, but the document's request schema refuses them:\n"
        + "\n".join(refused)
    )


# --- a blank text, as ECMA-262 reads the pattern ------------------------------------------------

# Every code point ECMA-262's `\s` matches (`u` flag), and which of `codes` each pattern
# matches, read with each set of flags: a client's validator (OpenAPI's patterns are
# ECMA-262's) reads the pattern so, not as Python's `re` does.
ECMA_SCRIPT = """
const [patterns, codes] = JSON.parse(process.argv[1]);
const space = [];
for (let code = 0; code <= 0x10ffff; code++) {
    if (code < 0xd800 || code > 0xdfff) {
        if (/\\s/u.test(String.fromCodePoint(code))) space.push(code);
    }
}
const matched = {};
for (const pattern of patterns) {
    for (const flags of ["", "u"]) {
        const regex = new RegExp(pattern, flags);
        matched[pattern + " /" + flags] = [...new Set([...codes, ...space])].filter(
            (code) => regex.test(String.fromCodePoint(code))
        );
    }
}
console.log(JSON.stringify({space, matched}));
"""


def text_patterns(schema: Any, name: str = "") -> set[str]:
    """The patterns of the document's text fields (model, query, documents: not long_documents)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        if schema.get("type") == "string" and "pattern" in schema and name != "long_documents":
            found.add(schema["pattern"])
        for key, sub in schema.items():
            found |= text_patterns(sub, name if key in ("items", "oneOf") else key)
    elif isinstance(schema, list):
        for sub in schema:
            found |= text_patterns(sub, name)
    return found


def test_the_blank_text_pattern_reads_in_ecma_262_as_the_server_checks(http: httpx.Client) -> None:
    """The server refuses a text with no character but whitespace as str.strip() reads it. The
    pattern was `\\S`, which ECMA-262 reads otherwise: a query of U+001C passed the schema but
    was refused (400), one of U+FEFF failed it but was answered. Each code point either side
    takes for whitespace (and a few that neither does) is checked with node's engine."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to read the document's patterns as ECMA-262 does; install it")
    patterns = text_patterns(DOCUMENT)
    python_space = [code for code in range(sys.maxunicode + 1) if chr(code).isspace()]
    others = [ord("a"), 0, 0x200B, 0x180E, 0xFFFE, 0x1F34E]  # ZWSP, MONGOLIAN VOWEL SEPARATOR, an apple
    ran = subprocess.run(
        [node, "-e", ECMA_SCRIPT, json.dumps([sorted(patterns), python_space + others])],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    ecma = json.loads(ran.stdout)
    codes = sorted({*python_space, *ecma["space"], *others})
    kept = {code for code in codes if chr(code).strip()}  # the server's rule (core/engine.py)
    # The server does so: the code points the two sets disagree on, sent as a query.
    disagree = sorted(set(python_space) ^ set(ecma["space"]))
    answered = {
        code: http.post(
            COHERE[0], json={"model": MODEL, "query": chr(code), "documents": DOCUMENTS}
        ).status_code
        for code in disagree
    }

    assert len(patterns) == 1, patterns  # one rule for every text field
    assert {0x1C, 0xFEFF} <= set(disagree)  # what the test is for: \s differs
    assert answered == {code: 200 if code in kept else 400 for code in disagree}
    for read_as, matched in ecma["matched"].items():
        wrong = sorted(set(matched) ^ kept)
        assert not wrong, f"{read_as} reads these code points otherwise: {[hex(code) for code in wrong]}"
    for pattern in patterns:
        python_matched = {code for code in codes if re.search(pattern, chr(code))}
        assert python_matched == kept, sorted(python_matched ^ kept)


# --- the other routes --------------------------------------------------------------------------


def test_models_answer_fits_its_schema(http: httpx.Client) -> None:
    body = check_answer("/v1/models", "get", http.get("/v1/models"))

    assert [model["id"] for model in body["data"]] == [MODEL, "gte-rerank-v2"]


@pytest.mark.parametrize("key", ["", "Bearer not-a-key"], ids=["no key", "wrong key"])
def test_models_refusal_is_declared_and_fits_its_schema(http: httpx.Client, key: str) -> None:
    answer = http.get("/v1/models", headers={"Authorization": key})

    assert answer.status_code == 401
    check_answer("/v1/models", "get", answer)


@pytest.mark.parametrize(("path", "status"), [("/healthz", "ok"), ("/readyz", "ready")])
def test_probe_answers_fit_their_schema(http: httpx.Client, path: str, status: str) -> None:
    answer = http.get(path, headers={"Authorization": ""})  # probes take no key

    assert answer.status_code == 200
    assert check_answer(path, "get", answer) == {"status": status}
