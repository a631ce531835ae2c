"""deploy/Dockerfile built into an image and run, without a registry or a Docker daemon.

`deploy/build-image.sh` (`make image`) builds localhost/rerank-service:VERSION with buildah:
a Debian base made by mmdebstrap, the wheels downloaded by the host's pip and installed with
no index inside the build. A build whose inputs are unchanged is reused, so only the first
run is slow (under a minute and a half on a clean two-core machine). The tests then read the image itself:
its configuration (`buildah inspect`), what is installed in it, and its ENTRYPOINT run in a
container (`buildah run`, chroot isolation, the host's network) as the image's user, which
serves, answers health and a rerank through the fake upstream, and exits 0 on SIGTERM.
A missing builder fails these tests (the script installs buildah and mmdebstrap with
apt-get when it can); they never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2_grpc

import tests.support.process
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.support.fault_scenarios import health_of
from tests.support.process import ServiceProcess
from tests.support.rpc import request

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "build-image.sh"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CLIENT_PYPROJECT = ROOT / "clients" / "python" / "pyproject.toml"
CLIENT_VERSION = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]["version"]
IMAGE = f"localhost/rerank-service:{VERSION}"  # the script's default name
STORAGE_DRIVER = os.environ.get("STORAGE_DRIVER", "vfs")  # the script's default
BUILD_TIMEOUT = 480

# The first test builds the image (a few minutes from nothing); the others only use it.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 120)


def _buildah(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("buildah")
    if exe is None:
        pytest.fail("buildah is missing: run `make image` (deploy/build-image.sh installs it)", pytrace=False)
    result = subprocess.run(
        [exe, "--storage-driver", STORAGE_DRIVER, *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"buildah {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="session")
def image() -> str:
    """The image, built by deploy/build-image.sh (or found up to date)."""
    # Its own process group: on a timeout mmdebstrap and buildah go too, and with them the
    # script's build lock (they inherit it), so a later build does not wait on it.
    build = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = build.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, signal.SIGKILL)
        output, _ = build.communicate()
        pytest.fail(f"deploy/build-image.sh took over {BUILD_TIMEOUT}s:\n{output[-4000:]}", pytrace=False)
    if build.returncode != 0:
        tail = "\n".join(output.splitlines()[-60:])
        pytest.fail(f"deploy/build-image.sh failed ({build.returncode}):\n{tail}", pytrace=False)
    return IMAGE


@pytest.fixture(scope="module")
def config(image: str) -> dict[str, Any]:
    """The image's OCI configuration."""
    inspected = json.loads(_buildah("inspect", "--type", "image", image).stdout)
    oci: dict[str, Any] = inspected["OCIv1"]["config"]
    return oci


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    """A working container of the image, removed afterwards."""
    name = _buildah("from", "--pull-never", "--quiet", image).stdout.strip()
    try:
        yield name
    finally:
        _buildah("rm", name)


def _run_in(container: str, *command: str) -> str:
    return _buildah("run", "--isolation", "chroot", container, "--", *command).stdout


def test_the_image_runs_rerank_service_serve_as_uid_10001(config: dict[str, Any]) -> None:
    assert config["Entrypoint"] == ["rerank-service", "serve"]
    assert not config.get("Cmd")  # the base's CMD (python3) is cleared: the chart's args follow serve
    assert config["User"] == "10001:10001"
    assert "50051/tcp" in config["ExposedPorts"]


def test_the_image_holds_the_service_and_no_pytorch(container: str) -> None:
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os, shutil, sys; print(json.dumps({"
        "'rerank-service': m.version('rerank-service'), 'client': m.version('rerank-service-client'),"
        "'executable': shutil.which('rerank-service'), 'prefix': sys.prefix,"
        "'present': [n for n in ('torch', 'transformers', 'onnxruntime') if u.find_spec(n)],"
        "'tracing': [n for n in ('opentelemetry.sdk.trace', 'opentelemetry.exporter.otlp.proto.grpc',"
        " 'opentelemetry.exporter.otlp.proto.http') if u.find_spec(n)],"
        "'sources': os.path.exists('/src'),"
        "'pycache': [d for d, _, _ in os.walk('/opt/rerank') if d.endswith('__pycache__')]}))"
    )
    found = json.loads(_run_in(container, "python", "-c", probe))
    assert found == {
        "rerank-service": VERSION,
        "client": CLIENT_VERSION,
        "executable": "/opt/rerank/bin/rerank-service",
        "prefix": "/opt/rerank",
        "present": [],  # the upstream image: no PyTorch, no local backend
        # Tracing works in the image: the `otel` extra (docs/OBSERVABILITY.md#tracing).
        "tracing": [
            "opentelemetry.sdk.trace",
            "opentelemetry.exporter.otlp.proto.grpc",
            "opentelemetry.exporter.otlp.proto.http",
        ],
        "sources": False,  # the build stage stays behind
        "pycache": [],
    }


def test_the_image_trusts_no_certificate_of_the_build_host(container: str) -> None:
    """The build never needed the host's trust store (no index inside it); none is copied in."""
    bundle = _run_in(container, "cat", "/etc/ssl/certs/ca-certificates.crt")
    assert "BEGIN CERTIFICATE" in bundle
    for local in sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt")):
        body = "".join(
            line for line in local.read_text().splitlines() if line and not line.startswith("-----")
        )
        assert body[:200] not in bundle.replace("\n", ""), f"{local} is in the image's CA bundle"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _service_pid(launcher: int) -> int:
    """The ENTRYPOINT's process under `buildah run` (which does not forward SIGTERM itself)."""
    for pid in _descendants(launcher):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"/rerank-service") for arg in argv) and not argv[0].startswith(b"buildah"):
            return pid
    raise AssertionError(f"no rerank-service process under buildah run ({launcher})")


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_the_image_serves_and_exits_0_on_sigterm(
    container: str, config: dict[str, Any], upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`buildah run CONTAINER -- ENTRYPOINT ARGS`, as a runtime starts it: live, ready, a rerank
    through the fake upstream, then SIGTERM to the ENTRYPOINT's process and exit code 0."""
    *launcher, serve = config["Entrypoint"]
    assert serve == "serve"  # ServiceProcess runs `CLI serve ARGS`: CLI is buildah run and the rest
    buildah = shutil.which("buildah")
    assert buildah is not None
    key = f"RERANK_UPSTREAM_API_KEY={UPSTREAM_KEY}"
    run = [buildah, "--storage-driver", STORAGE_DRIVER, "run", "--isolation", "chroot", "--env", key]
    monkeypatch.setattr(tests.support.process, "CLI", [*run, container, "--", *launcher])
    args = ["--backend", "upstream", "--upstream-url", upstream.url]
    with ServiceProcess(args, start_timeout=60) as service:
        assert service.process is not None
        try:
            pid = _service_pid(service.process.pid)
            assert _uid(pid) == 10001  # the image's USER, not root
            with grpc.insecure_channel(service.target) as channel:
                assert health_of(channel, "") == "SERVING"
                assert health_of(channel, "rerank.v1.RerankService") == "SERVING"
                reply = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=10)
            assert [r.index for r in reply.output.results] == [0, 1]
            assert len(upstream.requests) == 1
            os.kill(pid, signal.SIGTERM)
            code = service.process.wait(timeout=40)
            service.read_to_end()
            assert code == 0, service.output
            assert "stopped" in [e.get("event") for e in service.events()], service.output
        finally:  # nothing of the container left running, whatever failed
            for leftover in _descendants(service.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)
