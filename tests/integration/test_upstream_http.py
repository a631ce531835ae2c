"""The upstream transport over real HTTP: proxies, TLS trust, chunked and gzip bodies.

A real forward proxy (tests/support/proxy.py) shows which calls went through it; a
real HTTPS fake upstream, with certificates the test makes, shows which CA is trusted.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson
import pytest
from aiohttp import client_proto, http_parser

from rerank_service.backends.upstream.client import failures
from rerank_service.backends.upstream.client.transport import (
    MAX_RESPONSE_BYTES,
    UpstreamReply,
    UpstreamTransport,
)
from rerank_service.backends.upstream.retry import judge
from rerank_service.config import ConfigError
from rerank_service.config.secret import Secret
from rerank_service.core.domain import ServiceError
from rerank_service.testing.fake_upstream import NATIVE_PATH, FakeUpstream, Fault, expected_ranking
from tests.conftest import UPSTREAM_KEY
from tests.support.certs import CertificateAuthority
from tests.support.proxy import ForwardProxy
from tests.support.raw_http import RawHttpServer

QUERY, DOCUMENTS = "a b", ["a b c", "d", "b"]
BODY = {"model": "qwen3-rerank", "input": {"query": QUERY, "documents": DOCUMENTS}}
EXPECTED = [{"index": index, "relevance_score": score} for index, score in expected_ranking(QUERY, DOCUMENTS)]
KEY = Secret(UPSTREAM_KEY)


# No proxy or CA bundle from the machine running the tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_network_environment")


Transports = Callable[..., UpstreamTransport]


@pytest.fixture
async def transports() -> AsyncIterator[Transports]:
    """`transports(url, proxy=..., ca_file=...)`: a transport, closed after the test."""
    made: list[UpstreamTransport] = []

    def make(url: str, *, proxy: str | None = None, ca_file: Path | None = None) -> UpstreamTransport:
        made.append(UpstreamTransport(url, 5.0, 4, proxy=proxy, ca_file=ca_file))
        return made[-1]

    yield make
    for transport in made:
        await transport.close()


async def call(transport: UpstreamTransport) -> UpstreamReply:
    return await transport.post_json(NATIVE_PATH, BODY, KEY, None)


async def failure_of(transport: UpstreamTransport) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await call(transport)
    return caught.value


def results(reply: UpstreamReply) -> object:
    assert reply.status == 200
    return orjson.loads(reply.content)["output"]["results"]


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as running:
        yield running


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate: what a client must trust
    server: ssl.SSLContext  # the upstream's side, with a certificate the CA signed


def pki_for(
    directory: Path, dns_names: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
) -> Pki:
    ca = CertificateAuthority()
    cert, key = ca.issue_server(dns_names, ips).write(directory, "upstream")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return Pki(ca.write(directory), server)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return pki_for(tmp_path)


@pytest.fixture
def tls_upstream(pki: Pki) -> Iterator[FakeUpstream]:
    """An HTTPS upstream, its certificate signed by the test's own CA (which nobody trusts)."""
    with FakeUpstream(api_key=UPSTREAM_KEY, tls=pki.server) as upstream:
        yield upstream


# --- proxies ------------------------------------------------------------------------------------


async def test_an_explicit_proxy_carries_every_call_to_a_plain_http_upstream(
    transports: Transports, upstream: FakeUpstream, proxy: ForwardProxy
) -> None:
    transport = transports(upstream.url, proxy=proxy.url)

    replies = [await call(transport) for _ in range(2)]

    assert [results(reply) for reply in replies] == [EXPECTED, EXPECTED]
    assert proxy.forwarded == [("POST", upstream.url + NATIVE_PATH)] * 2  # absolute form
    assert [request.headers["authorization"] for request in upstream.requests] == [
        f"Bearer {UPSTREAM_KEY}"
    ] * 2


async def test_an_explicit_proxy_tunnels_an_https_upstream_with_connect(
    transports: Transports, tls_upstream: FakeUpstream, proxy: ForwardProxy, pki: Pki
) -> None:
    transport = transports(tls_upstream.url, proxy=proxy.url, ca_file=pki.ca)

    reply = await call(transport)

    assert results(reply) == EXPECTED
    host, port = tls_upstream.address
    assert proxy.tunnels == [f"{host}:{port}"]
    # Only the CONNECT passed in the clear, and it carried no key: the key went inside TLS.
    assert "authorization" not in proxy.passed[0].headers
    assert tls_upstream.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_https_proxy_from_the_environment_carries_an_https_upstream(
    transports: Transports,
    tls_upstream: FakeUpstream,
    proxy: ForwardProxy,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)

    reply = await call(transports(tls_upstream.url, ca_file=pki.ca))

    assert results(reply) == EXPECTED
    assert proxy.tunnels == ["{}:{}".format(*tls_upstream.address)]


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY", "http_proxy"])
async def test_an_http_or_all_proxy_from_the_environment_carries_a_plain_http_upstream(
    transports: Transports,
    upstream: FakeUpstream,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, proxy.url)

    reply = await call(transports(upstream.url))

    assert results(reply) == EXPECTED
    assert proxy.forwarded == [("POST", upstream.url + NATIVE_PATH)]


async def test_https_proxy_alone_leaves_a_plain_http_upstream_direct(
    transports: Transports, upstream: FakeUpstream, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)

    assert results(await call(transports(upstream.url))) == EXPECTED
    assert proxy.passed == []


@pytest.mark.parametrize("exempt", ["127.0.0.1", "*", "localhost,127.0.0.1"])
async def test_no_proxy_exempts_the_upstream_from_the_environments_proxy(
    transports: Transports,
    upstream: FakeUpstream,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
    exempt: str,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", exempt)

    assert results(await call(transports(upstream.url))) == EXPECTED
    assert proxy.passed == []
    assert len(upstream.requests) == 1


async def test_proxy_credentials_go_to_the_proxy(
    transports: Transports, upstream: FakeUpstream, proxy: ForwardProxy
) -> None:
    with_credentials = proxy.url.replace("http://", "http://someone:pa55word@")

    assert results(await call(transports(upstream.url, proxy=with_credentials))) == EXPECTED
    assert proxy.passed[0].headers["proxy-authorization"] == "Basic c29tZW9uZTpwYTU1d29yZA=="


class RefusingProxy:
    """A proxy that answers every CONNECT with `status_line` (its own reason text in it)."""

    def __init__(self, status_line: bytes) -> None:
        self.status_line = status_line
        self.connects = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.connects += 1
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-length: 6\r\nproxy-authenticate: Basic\r\n\r\ndenied"
                % self.status_line
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("status", [403, 407, 502])
async def test_a_proxy_refusing_the_tunnel_is_an_unreachable_upstream_saying_what_it_answered(
    transports: Transports, status: int
) -> None:
    """No tunnel, no connection to the upstream: unreachable (the deployment goes down as for a
    refused connection). The message has the proxy's status, never its reason text nor the
    proxy URL's credentials."""
    proxy = RefusingProxy(b"%d someone:pa55word is refused" % status)
    url = (await proxy.start()).replace("http://", "http://someone:pa55word@")
    try:
        error = await failure_of(transports("https://upstream.test", proxy=url))
    finally:
        proxy.server.close()

    assert proxy.connects == 1
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"
    assert error.unreachable
    phrase = {403: "Forbidden", 407: "Proxy Authentication Required", 502: "Bad Gateway"}[status]
    assert str(error) == f"UNAVAILABLE: upstream unreachable: the proxy refused the tunnel: {status} {phrase}"
    assert "pa55word" not in str(error)


@pytest.mark.parametrize(
    "bad", ["socks5://someone:pa55word@127.0.0.1:1080", "ftp://someone:pa55word@proxy.test", "http://"]
)
def test_an_unusable_proxy_url_is_a_config_error_naming_the_setting_not_the_password(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        UpstreamTransport("https://upstream.test", 5.0, 4, proxy=bad)

    message = str(caught.value)
    assert message.startswith("upstream-proxy")
    assert "pa55word" not in message
    assert "\n" not in message


def test_an_unusable_proxy_in_the_environment_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")

    with pytest.raises(ConfigError, match=r"^HTTPS_PROXY"):
        UpstreamTransport("https://upstream.test", 5.0, 4)


# --- which certificates are trusted -------------------------------------------------------------


async def test_ca_file_makes_the_upstreams_certificate_trusted(
    transports: Transports, tls_upstream: FakeUpstream, pki: Pki
) -> None:
    transport = transports(tls_upstream.url, ca_file=pki.ca)

    replies = [await call(transport) for _ in range(2)]

    assert [results(reply) for reply in replies] == [EXPECTED, EXPECTED]
    assert tls_upstream.connections_accepted == 1  # the TLS connection is kept and reused


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "through a proxy"])
async def test_a_certificate_from_an_untrusted_ca_is_rejected_as_unavailable_saying_why(
    transports: Transports, tls_upstream: FakeUpstream, proxy: ForwardProxy, through_proxy: bool
) -> None:
    transport = transports(tls_upstream.url, proxy=proxy.url if through_proxy else None)

    error = await failure_of(transport)

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"
    assert "certificate" in error.message
    assert "unable to get local issuer certificate" in error.message
    assert UPSTREAM_KEY not in str(error)
    assert tls_upstream.requests == []  # nothing was sent to an upstream that is not trusted


async def test_a_certificate_for_another_name_is_rejected_saying_so(
    transports: Transports, tmp_path: Path
) -> None:
    elsewhere = pki_for(tmp_path, dns_names=("elsewhere.test",), ips=())
    with FakeUpstream(tls=elsewhere.server) as upstream:
        error = await failure_of(transports(upstream.url, ca_file=elsewhere.ca))

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "certificate" in error.message
    assert "mismatch" in error.message


async def test_ssl_cert_file_in_the_environment_is_trusted(
    transports: Transports, tls_upstream: FakeUpstream, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))

    assert results(await call(transports(tls_upstream.url))) == EXPECTED


async def test_ca_file_wins_over_ssl_cert_file(
    transports: Transports,
    tls_upstream: FakeUpstream,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(CertificateAuthority("another CA").write(tmp_path, "other")))

    assert results(await call(transports(tls_upstream.url, ca_file=pki.ca))) == EXPECTED


def not_pem(directory: Path) -> Path:
    path = directory / "not-pem.crt"
    path.write_bytes(b"this is not a certificate\n")
    return path


def key_only(directory: Path) -> Path:
    _, key = CertificateAuthority().issue_server().write(directory, "server")
    return key


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda directory: directory / "missing.pem", "cannot read it"),
        (lambda directory: directory, "cannot read it"),
        (not_pem, "holds no valid PEM certificate"),
        (key_only, "holds no valid PEM certificate"),
    ],
    ids=["missing", "a directory", "not PEM", "a key, no certificate"],
)
def test_a_bad_ca_file_stops_construction_with_one_line_naming_the_setting(
    tmp_path: Path, make: Callable[[Path], Path], says: str
) -> None:
    path = make(tmp_path)

    with pytest.raises(ConfigError) as caught:
        UpstreamTransport("https://upstream.test", 5.0, 4, ca_file=path)

    message = str(caught.value)
    assert message.startswith(f"upstream-ca-file {path}: ")
    assert says in message
    assert "\n" not in message


def test_a_bad_ssl_cert_file_stops_construction_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(not_pem(tmp_path)))

    with pytest.raises(ConfigError, match=r"^SSL_CERT_FILE"):
        UpstreamTransport("https://upstream.test", 5.0, 4)


# --- chunked and gzip bodies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "transfer_encoding", "content_encoding"),
    [
        (Fault(chunked=True), "chunked", None),
        (Fault(gzip=True), None, "gzip"),
        (Fault(chunked=True, gzip=True), "chunked", "gzip"),
        (Fault(chunked=True, gzip=True, trickle=(7, 0.0)), "chunked", "gzip"),  # many small chunks
    ],
    ids=["chunked", "gzip", "chunked gzip", "chunked gzip in 7-byte chunks"],
)
async def test_chunked_and_gzip_answers_are_read_and_decoded(
    transports: Transports,
    upstream: FakeUpstream,
    fault: Fault,
    transfer_encoding: str | None,
    content_encoding: str | None,
) -> None:
    upstream.always(fault)

    reply = await call(transports(upstream.url))

    assert results(reply) == EXPECTED
    assert reply.headers.get("transfer-encoding") == transfer_encoding  # it came as the fault says
    assert reply.headers.get("content-encoding") == content_encoding


async def test_a_large_gzip_answer_decodes_whole(transports: Transports, upstream: FakeUpstream) -> None:
    upstream.always(Fault(gzip=True, chunked=True, pad_to=5 * 1024 * 1024))

    reply = await call(transports(upstream.url))

    assert len(reply.content) == 5 * 1024 * 1024
    assert results(reply) == EXPECTED
    assert upstream.requests[0].body_bytes_sent < 64 * 1024  # whitespace compresses a thousandfold


async def test_a_gzip_body_of_several_members_decodes_as_their_concatenation(
    transports: Transports, upstream: FakeUpstream
) -> None:
    document = orjson.dumps({"output": {"results": EXPECTED}})
    members = gzip.compress(document[:10]) + gzip.compress(document[10:])
    upstream.always(Fault(body=members, headers={"content-encoding": "gzip"}))

    assert results(await call(transports(upstream.url))) == EXPECTED


async def test_a_gzip_bomb_is_refused_without_inflating_it(
    transports: Transports, upstream: FakeUpstream
) -> None:
    """64 MiB of JSON whitespace in ~64 KiB of gzip: refused at the 16 MiB bound, and the
    transport never holds much more than the bound (a whole inflate would need 64 MiB)."""
    upstream.always(Fault(gzip=True, pad_to=64 * 1024 * 1024))
    transport = transports(upstream.url)
    tracemalloc.start()
    try:
        error = await failure_of(transport)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in error.message
    assert upstream.requests[0].body_bytes_sent < 256 * 1024
    assert peak < MAX_RESPONSE_BYTES + 8 * 1024 * 1024


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=503, gzip=True, pad_to=64 * 1024 * 1024),
        Fault(status=503, pad_to=MAX_RESPONSE_BYTES + 1),
        Fault(status=503, body=b"\x1f\x8b not gzip", headers={"content-encoding": "gzip"}),
    ],
    ids=["gzip bomb", "too large", "corrupt gzip"],
)
async def test_a_failures_status_comes_through_whatever_its_body(
    transports: Transports, upstream: FakeUpstream, fault: Fault
) -> None:
    """A 503 is worth a retry however broken its body: it was a body error, not retried."""
    upstream.always(fault)

    reply = await call(transports(upstream.url))

    assert (reply.status, reply.content) == (503, b"")


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=400, body={"code": "InvalidParameter", "message": "bad"}, reset_after_bytes=5),
        Fault(
            status=422, body={"code": "InvalidParameter", "message": "bad"}, reset_after_bytes=5, chunked=True
        ),
        Fault(status=503, gzip=True, chunked=True, reset_after_bytes=20),
    ],
    ids=["400 content-length", "422 chunked", "503 chunked gzip"],
)
async def test_a_failures_status_comes_through_when_the_connection_resets_mid_body(
    transports: Transports, upstream: FakeUpstream, fault: Fault
) -> None:
    """ERRORS.md: for an error status, its status decides, whatever its body; a body cut
    short is no unreachable upstream (that would be retried, and fall back)."""
    upstream.always(fault)

    reply = await call(transports(upstream.url))

    assert (reply.status, reply.content) == (fault.status, b"")
    assert len(upstream.requests) == 1


class CutBodyServer:
    """A raw HTTP/1.1 server that answers each request with `head` and the first bytes of
    its body, then closes the connection (a FIN, not a reset): a body cut short."""

    def __init__(self, head: bytes, sent: bytes) -> None:
        self.answer = head + sent
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
            self.requests += 1
            writer.write(self.answer)
            await writer.drain()
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("head", "sent"),
    [
        (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 60\r\n\r\n",
            b'{"co',
        ),
        (b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n", b'3c\r\n{"co'),
        (b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 60\r\nretry-after: 7\r\n\r\n", b""),
    ],
    ids=["content-length", "chunked", "no byte of the body"],
)
async def test_a_failures_status_comes_through_when_the_connection_closes_mid_body(
    transports: Transports, head: bytes, sent: bytes
) -> None:
    server = CutBodyServer(head, sent)
    try:
        reply = await call(transports(await server.start()))

        assert (reply.status, reply.content) == (int(head[9:12]), b"")
        assert server.requests == 1
    finally:
        assert server.server is not None
        server.server.close()


@pytest.mark.parametrize(
    "fault",
    [Fault(chunked=True, reset_after_bytes=20), Fault(chunked=True, gzip=True, reset_after_bytes=20)],
    ids=["chunked", "chunked gzip"],
)
async def test_a_chunked_body_cut_short_is_unavailable_and_worth_a_retry(
    transports: Transports, upstream: FakeUpstream, fault: Fault
) -> None:
    upstream.always(fault)

    error = await failure_of(transports(upstream.url))

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"  # the retry policy retries this reason
    assert UPSTREAM_KEY not in str(error)


class FixedAnswerServer(RawHttpServer):
    """Answers every request with the same bytes."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.bytes = answer

    async def answer(self, number: int) -> bytes:
        return self.bytes


WHOLE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (WHOLE_HEAD + b"\r\n{}stray bytes", "bad status line"),
        (WHOLE_HEAD + b"content-length: 2\r\n\r\n{}", "malformed head or framing"),
        (WHOLE_HEAD + b"x-big: " + UPSTREAM_KEY.encode() + b"a" * 9000 + b"\r\n\r\n{}", "line too long"),
        (
            WHOLE_HEAD + b"".join(b"x-%d: 1\r\n" % n for n in range(129)) + b"\r\n{}",
            "malformed head or framing",
        ),
    ],
    ids=[
        "stray bytes after a whole answer",
        "two content-lengths",
        "a header over 8190 bytes",
        "129 headers",
    ],
)
async def test_an_answer_the_http_parser_refuses_is_a_bad_response_not_retried(
    transports: Transports, answer: bytes, says: str
) -> None:
    """An answer came: the upstream is reachable, and no retry would parse the same
    answer. What the parser refused is named, never with the bytes it quotes (the
    upstream's)."""
    server = FixedAnswerServer(answer)
    try:
        error = await failure_of(transports(await server.start()))
    finally:
        server.close()

    assert server.requests == 1
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert not judge(error, caller_deadline_passed=False).retryable
    assert not error.unreachable
    assert str(error) == f"UNAVAILABLE: upstream answer is not valid HTTP/1.1: {says}"


@pytest.fixture(params=["C", "pure Python"])
def response_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of aiohttp's HTTP parsers in turn: its C one, and the pure-Python one it falls
    back to (AIOHTTP_NO_EXTENSIONS, PyPy, no wheel), whose errors quote bytes otherwise."""
    parser = getattr(
        http_parser, "HttpResponseParserC" if request.param == "C" else "HttpResponseParserPy", None
    )
    if parser is None:
        pytest.skip("aiohttp's C parser is not built here")
    monkeypatch.setattr(client_proto, "HttpResponseParser", parser)


@pytest.mark.usefixtures("response_parser")
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 " + UPSTREAM_KEY.encode() + b"\r\ncontent-length: 2\r\n\r\n{}",
        UPSTREAM_KEY.encode() + b" hello\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx(" + UPSTREAM_KEY.encode() + b"): 1\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + UPSTREAM_KEY.encode() + b"\r\n",
        WHOLE_HEAD + b"x-big: " + UPSTREAM_KEY.encode() + b"a" * 9000 + b"\r\n\r\n{}",
    ],
    ids=["a bad status code", "no status line", "a bad header name", "a bad chunk size", "a header too long"],
)
async def test_an_answer_the_http_parser_refuses_never_shows_its_bytes_whichever_parser(
    transports: Transports, answer: bytes
) -> None:
    """The upstream's bytes may reflect the deployment's key: the status message names
    what was refused in a fixed phrase, never with what the parser quoted."""
    server = FixedAnswerServer(answer)
    try:
        error = await failure_of(transports(await server.start()))
    finally:
        server.close()

    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert UPSTREAM_KEY not in str(error)
    prefix = "UNAVAILABLE: upstream answer is not valid HTTP/1.1: "
    assert str(error).removeprefix(prefix) in {phrase for _, phrase in failures._REFUSALS} | {
        failures._MALFORMED
    }


def complete_gzip() -> bytes:
    return gzip.compress(orjson.dumps({"output": {"results": EXPECTED}}))


@pytest.mark.parametrize(
    ("body", "encoding", "says"),
    [
        (complete_gzip()[:-12], "gzip", "ends before its end of stream"),
        (gzip.compress(b"")[:10] + b"\xff" * 20, "gzip", "corrupt"),  # a header, then no deflate
        (b'{"output": {}}', "br", "content-encoding 'br', which was not asked for"),
    ],
    ids=["gzip cut short", "corrupt gzip", "an encoding not asked for"],
)
async def test_a_body_its_content_encoding_does_not_describe_is_a_bad_response(
    transports: Transports, upstream: FakeUpstream, body: bytes, encoding: str, says: str
) -> None:
    upstream.always(Fault(body=body, headers={"content-encoding": encoding}))

    error = await failure_of(transports(upstream.url))

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert says in error.message


async def test_gzip_and_chunked_work_through_a_proxy_and_tls_together(
    transports: Transports, tls_upstream: FakeUpstream, proxy: ForwardProxy, pki: Pki
) -> None:
    tls_upstream.always(Fault(gzip=True, chunked=True))

    reply = await call(transports(tls_upstream.url, proxy=proxy.url, ca_file=pki.ca))

    assert results(reply) == EXPECTED
    assert len(proxy.tunnels) == 1


async def test_a_cookie_the_upstream_sets_is_never_sent_back(
    transports: Transports, upstream: FakeUpstream
) -> None:
    """One session carries every caller's calls to a deployment: a cookie one answer sets
    must not ride along on the next call, which may be another caller's."""
    upstream.inject(Fault(headers={"set-cookie": "session=first-caller; Path=/"}))
    # By name: aiohttp's default jar already ignores cookies of a bare IP address.
    transport = transports(upstream.url.replace("127.0.0.1", "localhost"))

    await call(transport)
    await call(transport)

    assert [request.headers.get("cookie") for request in upstream.requests] == [None, None]


# --- answers without a body -----------------------------------------------------------------


class NoBodyServer(RawHttpServer):
    """Answers every request with `status` and a Content-Length but, as RFC 9110 says of a
    204 or 304, no body."""

    def __init__(self, status: bytes) -> None:
        super().__init__()
        self.status = status

    async def answer(self, number: int) -> bytes:
        # A 304 may give the length of the body it stands for.
        return b"HTTP/1.1 %s\r\ncontent-length: 77\r\n\r\n" % self.status


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_a_204_or_304_with_a_content_length_is_its_own_status_with_no_body(
    transports: Transports, status: bytes
) -> None:
    server = NoBodyServer(status)
    transport = transports(await server.start())
    try:
        replies = [await call(transport) for _ in range(2)]

        assert [(reply.status, reply.content) for reply in replies] == [(int(status[:3]), b"")] * 2
        assert server.connections == 1  # nothing left unread: the connection was reused
    finally:
        server.close()
