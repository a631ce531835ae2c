"""The Redis client both the score cache's tier and the callers' limits use, against a real
Redis through a TCP proxy that records what each connection sends: a new connection costs
no round trip the URL does not ask for, so one opens within a call's short timeout even
when Redis is a few milliseconds away."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import OutOfMemoryError, ReadOnlyError

from rerank_service.redis_client import reconnect_if_read_only, redis_client
from tests.support.certs import CertificateAuthority
from tests.support.redis_proxy import RedisProxy, fail_over
from tests.support.redis_server import RedisServer, RedisTls

HANG = 10.0  # guards against a hang only


@pytest.fixture
async def proxy(redis_empty: RedisServer) -> AsyncIterator[RedisProxy]:
    async with RedisProxy(redis_empty.port) as started:
        yield started


async def test_a_new_connection_sends_nothing_before_the_first_command(proxy: RedisProxy) -> None:
    """No HELLO, CLIENT SETNAME, CLIENT SETINFO or CLIENT MAINT_NOTIFICATIONS: each would be
    a round trip more, within the call's timeout, before the first answer of a connection."""
    client = redis_client(proxy.url(), timeout=HANG)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()

    assert [bytes(sent) for sent in proxy.sent] == [b"*1\r\n$4\r\nPING\r\n"]


async def test_a_database_in_the_url_is_the_one_thing_sent_first(proxy: RedisProxy) -> None:
    client = redis_client(proxy.url(db=1), timeout=HANG)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()

    assert [bytes(sent) for sent in proxy.sent] == [b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n*1\r\n$4\r\nPING\r\n"]


async def test_a_client_answered_readonly_connects_again_through_its_address(redis_own: RedisServer) -> None:
    """A failover behind one address (a VIP, a Kubernetes Service): the demoted primary keeps
    the client's connection open and refuses its writes, READONLY, on it for good. Once that
    answer is seen, the next command connects afresh, to the new primary; any other error
    leaves the connections be."""
    with RedisServer() as new_primary:
        async with RedisProxy(redis_own.port) as proxy:
            client = redis_client(proxy.url(), timeout=HANG)
            try:
                assert await client.set("before", 1)
                fail_over(proxy, redis_own, new_primary)
                with pytest.raises(ReadOnlyError) as refused:
                    await client.set("after", 1)
                assert not await reconnect_if_read_only(client, OutOfMemoryError("command not allowed"), [1])
                with pytest.raises(ReadOnlyError):  # still the old primary's connection
                    await client.set("after", 1)

                assert await reconnect_if_read_only(client, [1], refused.value)
                assert await client.set("after", 1)
            finally:
                await client.aclose()
        with new_primary.client() as check:
            assert check.get("after") == b"1"
        assert len(proxy.sent) == 2  # one connection to each


async def test_replies_are_parsed_by_hiredis(redis_empty: RedisServer) -> None:
    """The install brings hiredis (a dependency) and the client reads Redis's replies with it:
    redis-py falls back to its Python parser without a word when hiredis is missing."""
    from redis._parsers import _AsyncHiredisParser

    client = redis_client(redis_empty.url)
    try:
        assert await client.ping()
        connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            assert isinstance(connection._parser, _AsyncHiredisParser)
        finally:
            await client.connection_pool.release(connection)
    finally:
        await client.aclose()


async def test_a_rediss_client_builds_its_tls_context_when_made_not_in_its_first_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the CAs (the system's store, then the CA file) takes 25-50 ms: built in the
    first round trip, as redis-py builds it, it took most of the 50 ms timeout, and the
    first limits check after each start was refused (`--limits-store-failure closed`).
    Every TLS context made is counted: one, with the client, and none in its round trips,
    on its first connection or the next."""
    authority = CertificateAuthority()
    cert, key = authority.issue_server().write(tmp_path, "redis")
    ca = authority.write(tmp_path)  # its own file: no context of an earlier test is shared
    with RedisServer(tls=RedisTls(cert, key, ca)) as server:
        built: list[ssl.SSLContext] = []
        create = ssl.create_default_context

        def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
            built.append(context := create(*args, **kwargs))
            return context

        monkeypatch.setattr(ssl, "create_default_context", counted)
        client = redis_client(server.url, timeout=HANG, ca_file=str(ca))
        with_the_client = len(built)
        try:
            answers = await asyncio.gather(client.ping(), client.ping())  # two connections
            opened = len(client.connection_pool._available_connections)
        finally:
            await client.aclose()

    assert list(answers) == [True, True]
    assert opened == 2
    assert (with_the_client, len(built)) == (1, 1)


async def test_a_rediss_clients_new_connections_trust_a_ca_file_rotated_on_disk(tmp_path: Path) -> None:
    """The context built with the client is not pinned on its connections: a CA file
    replaced on disk (cert-manager, a rotated bundle) is read by the next new connection,
    as redis-py does, not only after a restart."""
    authority, other = CertificateAuthority(), CertificateAuthority()
    cert, key = authority.issue_server().write(tmp_path, "redis")
    ca_file = other.write(tmp_path, "trusted")  # the wrong CA at first: the server's is not trusted
    with RedisServer(tls=RedisTls(cert, key, authority.write(tmp_path, "server-ca"))) as server:
        client = redis_client(server.url, timeout=HANG, ca_file=str(ca_file))
        try:
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                await client.ping()
            ca_file.write_bytes(authority.cert_pem)  # rotated: the server's CA now
            answered = await client.ping()  # a new connection
        finally:
            await client.aclose()

    assert answered is True


def test_a_rediss_client_whose_tls_context_cannot_be_built_is_a_value_error(tmp_path: Path) -> None:
    """Built with the client now, a TLS file the URL names that no longer loads (settings.py
    checked it at start) is said at once, as a bad URL is, not as a traceback."""
    garbage = tmp_path / "client.pem"
    garbage.write_text("not PEM\n")

    with pytest.raises(ValueError, match=r"^its TLS context cannot be built \("):
        redis_client(f"rediss://127.0.0.1:1/0?ssl_certfile={garbage}")
