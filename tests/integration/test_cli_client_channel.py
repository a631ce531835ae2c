"""The client commands' channel: no receive limit of its own below the server's
--max-message-bytes, and no HTTP proxy between them and this machine's own server (an exec
probe of a pod whose environment has https_proxy for its upstream)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rerank_service.cli import main
from tests.conftest import ServerFactory
from tests.support.certs import CertificateAuthority
from tests.support.process import run_cli
from tests.support.proxy import ForwardProxy
from tests.support.rpc import request
from tests.support.server import ServerThread

# What a pod set up for an upstream behind a proxy has; no no_proxy naming localhost.
NO_PROXY_ENV = {"no_proxy": "", "NO_PROXY": "", "no_grpc_proxy": "", "RERANK_API_KEY": ""}


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_rerank_prints_an_answer_larger_than_grpcs_4_mib_default_that_the_server_sent(
    serve: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str], tls: bool
) -> None:
    """--return-documents over ~4.5 MB of documents: within the server's 16 MiB, served and
    billed, and once printed `error: RESOURCE_EXHAUSTED: Received message larger than max`."""
    documents = [f"{'a' * 90_000} w{i}" for i in range(50)]
    flags: list[str] = []
    overrides: dict[str, Any] = {}
    if tls:
        ca = CertificateAuthority()
        cert, key = ca.issue_server().write(tmp_path, "server")
        overrides = {"tls_cert": cert, "tls_key": key}
        flags = ["--tls-ca", str(ca.write(tmp_path))]
    with serve(**overrides) as server:
        # The certificate names localhost (and 127.0.0.1).
        code = main(
            ["rerank", "--target", server.target, *flags, "--query", "w7", "--return-documents"]
            + [arg for document in documents for arg in ("-d", document)]
            + ["--timeout", "60"]
        )

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "RESOURCE_EXHAUSTED" not in err
    ranked = out.splitlines()[1:]
    assert len(ranked) == len(documents)
    assert sum(len(line) for line in ranked) > 4 * 2**20  # the texts came back


@pytest.mark.parametrize(
    "target", ["localhost:{port}", "127.0.0.1:{port}", "ipv4:127.0.0.1:{port}", "dns:///localhost:{port}"]
)
@pytest.mark.parametrize("variable", ["https_proxy", "grpc_proxy"])
def test_a_client_command_to_a_loopback_target_goes_around_the_proxy(
    server: ServerThread, target: str, variable: str
) -> None:
    """The Helm chart's exec probes run `health --target localhost:PORT`: through the proxy
    (which cannot reach the pod's loopback) every probe failed, the server SERVING."""
    with ForwardProxy() as proxy:
        result = run_cli(
            "health",
            "--target",
            target.format(port=server.target.rpartition(":")[2]),
            "--timeout",
            "10",
            env={**NO_PROXY_ENV, variable: proxy.url},
        )

    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr
    assert proxy.tunnels == []


def test_a_client_command_to_another_host_still_goes_through_the_proxy() -> None:
    """Proxies stay for any other target: the proxy is asked for the tunnel (to a name that
    never resolves, so the call then fails)."""
    with ForwardProxy() as proxy:
        result = run_cli(
            "health",
            "--target",
            "rerank.invalid:50051",
            "--timeout",
            "5",
            env={**NO_PROXY_ENV, "https_proxy": proxy.url},
        )

    assert result.returncode == 1, result.stderr
    assert "rerank.invalid:50051" in proxy.tunnels


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_usage_reads_this_machines_metrics_around_the_proxy(
    serve: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host: str,
) -> None:
    """urllib takes http_proxy for a loopback URL too (unless no_proxy names it): `usage
    --metrics` then failed through a proxy meant for the upstream, or read elsewhere."""
    for name, value in NO_PROXY_ENV.items():
        monkeypatch.setenv(name, value)
    with serve(metrics_port=0) as server, ForwardProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        assert server.server is not None
        port = server.server.metrics_port
        server.stub.Rerank(request(), timeout=30)  # a call, so there is usage to show
        code = main(["usage", "--metrics", f"http://{host}:{port}/metrics"])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "anonymous" in out
    assert proxy.forwarded == []
