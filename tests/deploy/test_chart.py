"""The Helm chart (deploy/helm/rerank-service) and the images, checked offline.

`helm lint` and `helm template` for the defaults and every values file, each rendered
object validated by kubeconform against the Kubernetes JSON schemas (from the
kubernetes-validate wheel: `make chart-tools`), and the wiring that matters asserted on
the rendered objects: probe ports and the Services' targetPort equal `--port`, the
readiness probe names rerank.v1.RerankService, the grace period covers the drain and
the preStop sleep, keys are Secret files, the ConfigMap is the `--config` file, the GPU
values ask for one GPU a pod. The rendered arguments are then given to the real
`rerank-service serve` (the images' ENTRYPOINT): `check-config` accepts every
values file's configuration, and the default values serve and answer both health names.
A missing tool fails the tests (never skips them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "rerank-service"
DEPLOY = ROOT / "deploy"
BIN = ROOT / ".ci" / "tools" / "go" / "bin"
HELM = BIN / "helm"
KUBECONFORM = BIN / "kubeconform"
SCHEMAS = ROOT / ".ci" / "tools" / "kubernetes-json-schema"
LOCAL_SCHEMAS = Path(__file__).parent / "schemas"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
# kubeconform's template: <version>-standalone[-strict]/<kind>-<group>-<version>.json
K8S_SCHEMA_LOCATION = (
    f"{SCHEMAS}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}"
    "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
)
K8S_VERSION = "1.34.0"
NAMESPACE = "rerank"
RELEASE = "rerank"

KEY_VARIABLES = {"RERANK_API_KEYS", "RERANK_UPSTREAM_API_KEY", "DASHSCOPE_API_KEY"}

# name -> helm arguments; every values file under deploy/ must be here (test_every_values_file_is_checked)
VALUES: dict[str, list[str]] = {
    "defaults": [],
    "upstream-gateway": ["-f", str(DEPLOY / "values-upstream-gateway.yaml")],
    "local-gpu": ["-f", str(DEPLOY / "values-local-gpu.yaml")],
    # the optional parts switched on: TLS with client certificates, keys, HTTP, ServiceMonitor,
    # PrometheusRule
    "all-options": [
        "--set",
        "tls.enabled=true",
        "--set",
        "tls.secretName=rerank-tls",
        "--set",
        "tls.clientCA=true",
        "--set",
        "auth.apiKeys.existingSecret=caller-keys",
        "--set",
        "auth.upstreamApiKey.existingSecret=upstream-key",
        "--set",
        "http.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "autoscaling.enabled=true",
    ],
}


def _tool(path: Path) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{path.relative_to(ROOT)} is missing: run `make chart-tools` (deploy/install-chart-tools.sh)",
            pytrace=False,
        )
    return path


def _run(cmd: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60, **kwargs)


@cache
def helm_template(*settings: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with each of `settings` (`key=value`) given as --set."""
    sets = [argument for setting in settings for argument in ("--set", setting)]
    return _run([_tool(HELM), "template", RELEASE, CHART, "--kube-version", K8S_VERSION, *sets])


def kubeconform(manifests: str, *flags: str, crds: bool = True) -> subprocess.CompletedProcess[str]:
    """`kubeconform -strict` of `manifests` against the Kubernetes schemas and, with `crds`,
    the custom resources' own (tests/deploy/schemas)."""
    locations = ["-schema-location", K8S_SCHEMA_LOCATION]
    if crds:
        locations += [
            "-schema-location",
            f"{LOCAL_SCHEMAS}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        ]
    command: list[str | Path] = [_tool(KUBECONFORM), "-strict", *flags, "-kubernetes-version", K8S_VERSION]
    command += [*locations, "-"]
    return _run(command, input=manifests)


def rendered_text(name: str) -> str:
    result = _run(
        [
            _tool(HELM),
            "template",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            K8S_VERSION,
            *VALUES[name],
        ]
    )
    assert result.returncode == 0, f"helm template ({name}) failed:\n{result.stderr}"
    return result.stdout


def rendered(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(name)) if doc]


def objects(name: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(name) if doc["kind"] == kind]


def one(name: str, kind: str) -> dict[str, Any]:
    found = objects(name, kind)
    assert len(found) == 1, f"{name}: expected one {kind}, got {len(found)}"
    return found[0]


def container(name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = one(name, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in args (the last one wins, as argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def dockerfile_entrypoint(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.startswith(("ENTRYPOINT", "CMD"))]
    entry = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert len(entry) == 1, f"{path.name}: one ENTRYPOINT expected"
    assert not [line for line in lines if line.startswith("CMD")], f"{path.name}: no CMD expected"
    return [str(word) for word in json.loads(entry[0].removeprefix("ENTRYPOINT").strip())]


# --- the tools and the schemas -------------------------------------------------------


def test_every_values_file_is_checked() -> None:
    files = {p.name for p in DEPLOY.glob("values-*.yaml")}
    checked = {Path(a).name for args in VALUES.values() for a in args if a.endswith(".yaml")}
    assert files == checked


@pytest.mark.parametrize("name", list(VALUES))
def test_helm_lint(name: str) -> None:
    result = _run([_tool(HELM), "lint", "--strict", CHART, "--kube-version", K8S_VERSION, *VALUES[name]])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(VALUES))
def test_every_object_is_valid_kubernetes(name: str) -> None:
    if not (SCHEMAS / f"v{K8S_VERSION}-standalone-strict" / "deployment-apps-v1.json").is_file():
        pytest.fail(f"{SCHEMAS.relative_to(ROOT)} is missing: run `make chart-tools`", pytrace=False)
    result = kubeconform(rendered_text(name), "-summary", "-output", "json")
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert result.returncode == 0, result.stdout
    assert summary["invalid"] == 0, result.stdout
    assert summary["errors"] == 0, result.stdout
    assert summary["skipped"] == 0, f"objects without a schema: {result.stdout}"
    assert summary["valid"] == len(rendered(name)) >= 5


def test_kubeconform_rejects_a_broken_object() -> None:
    """The validation is real: a misspelt field and a wrong type fail."""
    broken = rendered_text("defaults").replace("containerPort:", "containerPorts:", 1)
    broken = broken.replace("terminationGracePeriodSeconds: ", "terminationGracePeriodSeconds: x", 1)
    result = kubeconform(broken, crds=False)
    assert result.returncode != 0
    assert "containerPorts" in result.stdout


# --- the wiring ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUES))
def test_probes_and_services_use_the_grpc_port(name: str) -> None:
    c = container(name)
    port = int(flag(c["args"], "port") or "")
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"] == [port]
    tls = flag(c["args"], "tls-cert") is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if tls:  # the native grpc probe speaks plaintext only
            command = c[probe]["exec"]["command"]
            assert command[:2] == ["rerank-service", "health"]
            assert flag(command, "target") == f"localhost:{port}"
            assert flag(command, "tls-ca") is not None
        else:
            assert c[probe]["grpc"]["port"] == port
    services = {s["metadata"]["name"]: s for s in objects(name, "Service")}
    for svc_name in (RELEASE + "-rerank-service", RELEASE + "-rerank-service-headless"):
        grpc_ports = [p for p in services[svc_name]["spec"]["ports"] if p["name"] == "grpc"]
        assert [p["targetPort"] for p in grpc_ports] == [port], svc_name
    headless = services[RELEASE + "-rerank-service-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == one(name, "Deployment")["spec"]["selector"]["matchLabels"]
    assert services[RELEASE + "-rerank-service"]["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("name", list(VALUES))
def test_health_service_names(name: str) -> None:
    c = container(name)

    def service(probe: str) -> str:
        if "grpc" in c[probe]:
            return str(c[probe]["grpc"].get("service", ""))
        return flag(c[probe]["exec"]["command"], "service") or ""

    assert service("readinessProbe") == "rerank.v1.RerankService"
    assert service("livenessProbe") == ""
    assert service("startupProbe") == ""


@pytest.mark.parametrize("name", list(VALUES))
def test_grace_period_covers_the_drain_and_the_prestop_sleep(name: str) -> None:
    pod = one(name, "Deployment")["spec"]["template"]["spec"]
    c = container(name)
    grace = float(flag(c["args"], "shutdown-grace") or "30")  # the service's default
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > grace + float(sleep[1])
    assert float(sleep[1]) > 0


def test_a_too_short_grace_period_is_refused() -> None:
    result = helm_template("terminationGracePeriodSeconds=20", "shutdownGrace=30")
    assert result.returncode != 0
    assert "must exceed shutdownGrace + preStopSleepSeconds" in result.stderr


@pytest.mark.parametrize("name", list(VALUES))
def test_keys_are_secret_files_never_env_values(name: str) -> None:
    pod = one(name, "Deployment")["spec"]["template"]["spec"]
    c = container(name)
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    secret_volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    for env in c.get("env", []):
        assert env["name"] not in KEY_VARIABLES, f"a key in the environment: {env}"
        assert "secretKeyRef" not in env.get("valueFrom", {}), f"a secret in the environment: {env}"
    # every *_FILE key variable names a file inside a mounted Secret
    secret_paths = [
        (m["mountPath"], secret_volumes[m["name"]]) for m in mounts.values() if m["name"] in secret_volumes
    ]

    def in_secret(path: str) -> bool:
        return any(
            path == f"{mount}/{item['path']}"
            for mount, secret in secret_paths
            for item in secret.get("items", [])
        )

    for env in c.get("env", []):
        if env["name"] in {"RERANK_API_KEYS_FILE", "RERANK_UPSTREAM_API_KEY_FILE"}:
            assert in_secret(env["value"]), env
    for m in mounts.values():
        if m["name"] in secret_volumes:
            assert m.get("readOnly") is True
    # and so does every deployment's api_key_file in the configuration
    config = yaml.safe_load(one(name, "ConfigMap")["data"]["rerank.yaml"])
    for route in config.get("models", []):
        for deployment in route["deployments"]:
            assert "api_key" not in deployment
            if "api_key_file" in deployment:
                assert in_secret(deployment["api_key_file"]), deployment


def test_gateway_values_mount_the_caller_and_deployment_keys() -> None:
    env = {e["name"]: e.get("value") for e in container("upstream-gateway")["env"]}
    assert env["RERANK_API_KEYS_FILE"].startswith("/etc/rerank/secrets/")
    config = yaml.safe_load(one("upstream-gateway", "ConfigMap")["data"]["rerank.yaml"])
    assert {d["api_key_file"] for r in config["models"] for d in r["deployments"]} == {
        "/etc/rerank/keys/dashscope/api-key"
    }
    env_all = {e["name"] for e in container("all-options")["env"]}
    assert {"RERANK_API_KEYS_FILE", "RERANK_UPSTREAM_API_KEY_FILE"} <= env_all


@pytest.mark.parametrize("name", list(VALUES))
def test_the_configmap_is_the_config_file(name: str) -> None:
    c = container(name)
    cm = one(name, "ConfigMap")
    path = flag(c["args"], "config")
    assert path is not None
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(
        v
        for v in one(name, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mount["name"]
    )
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert Path(path).name in cm["data"]
    annotations = one(name, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


def test_gpu_values_ask_one_gpu_a_pod_and_no_autoscaling() -> None:
    c = container("local-gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    pod = one("local-gpu", "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert objects("local-gpu", "HorizontalPodAutoscaler") == []
    assert one("local-gpu", "Deployment")["spec"]["replicas"] >= 1
    config = yaml.safe_load(one("local-gpu", "ConfigMap")["data"]["rerank.yaml"])
    assert config["backend"] == "local"
    assert config["device"] == "cuda"
    assert one("local-gpu", "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "rerank-service-local:0.1.0"
    )
    # An upgrade frees a GPU before it starts a pod: a surge pod would wait for a spare one.
    assert one("local-gpu", "Deployment")["spec"]["strategy"]["rollingUpdate"] == {
        "maxUnavailable": 1,
        "maxSurge": 0,
    }
    # one process a pod: a --workers flag, if any, must not share the GPU
    workers = flag(c["args"], "workers")
    assert workers in (None, "1")
    for name in ("defaults", "upstream-gateway"):
        assert "nvidia.com/gpu" not in json.dumps(container(name)["resources"])


def test_gateway_values_autoscale_several_replicas() -> None:
    hpa = one("upstream-gateway", "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"]["name"] == one("upstream-gateway", "Deployment")["metadata"]["name"]
    assert "replicas" not in one("upstream-gateway", "Deployment")["spec"]  # the HPA owns it
    pdb = one("upstream-gateway", "PodDisruptionBudget")
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == one("upstream-gateway", "Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert one("upstream-gateway", "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize("name", list(VALUES))
def test_metrics_and_http_ports(name: str) -> None:
    c = container(name)
    annotations = one(name, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    metrics_port = flag(c["args"], "metrics-port")
    assert metrics_port is not None
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == metrics_port
    http_port = flag(c["args"], "http-port")
    if http_port is not None:
        svc = next(
            s for s in objects(name, "Service") if s["metadata"]["name"] == RELEASE + "-rerank-service"
        )
        assert [p["targetPort"] for p in svc["spec"]["ports"] if p["name"] == "http"] == [int(http_port)]


def test_the_prometheus_rule_is_deploy_prometheus_alerts() -> None:
    """The chart's PrometheusRule holds the rules of deploy/prometheus/alerts.yaml, exactly (the
    file promtool checks and tests: tests/deploy/test_alerts.py); off unless asked for."""
    alerts = yaml.safe_load(ALERTS.read_text())
    rule = one("all-options", "PrometheusRule")
    assert rule["spec"] == alerts
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]} >= {
        "RerankModelErrorRatioHigh",
        "RerankRouteDown",
        "RerankLatencyP99High",
        "RerankAdmissionSaturated",
    }
    for name in ("defaults", "upstream-gateway", "local-gpu"):
        assert objects(name, "PrometheusRule") == []


def test_the_prometheus_rule_takes_the_labels_a_prometheus_selects() -> None:
    result = helm_template(
        "metrics.prometheusRule.enabled=true", "metrics.prometheusRule.labels.release=kube-prometheus"
    )
    assert result.returncode == 0, result.stderr
    (rule,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"


def test_kubeconform_checks_the_prometheus_rule_against_its_crd() -> None:
    """The PrometheusRule's schema (tests/deploy/schemas, from prometheus-operator's CRD) is
    real: a misspelt rule field and a malformed `for` fail."""
    text = rendered_text("all-options")
    for broken in (
        text.replace("      for: 1m", "      for: one minute", 1),
        text.replace("    - alert: RerankRouteDown", "    - alarm: RerankRouteDown", 1),
    ):
        assert broken != text
        result = kubeconform(broken)
        assert result.returncode != 0, broken
        assert "PrometheusRule" in result.stdout


# --- the images ----------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.local"])
def test_images_run_rerank_service_serve_as_a_non_root_user(dockerfile: str) -> None:
    path = DEPLOY / dockerfile
    assert dockerfile_entrypoint(path) == ["rerank-service", "serve"]
    text = path.read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001:10001$", final_stage, re.M)
    assert "COPY --from=build /opt/rerank /opt/rerank" in final_stage
    # The local image has the local backend; both can trace (docs/OBSERVABILITY.md#tracing).
    extras = "'.[local,otel]'" if dockerfile == "Dockerfile.local" else "'.[otel]'"
    assert extras in text
    # the chart's pod user is the image's
    assert yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"] == 10001


def _serve_command(name: str, tmp_path: Path, port: int, metrics_port: int) -> tuple[list[str], Path]:
    """The container's command: the ENTRYPOINT, then the chart's args, with its files made here."""
    c = container(name)
    config = tmp_path / "rerank.yaml"
    config.write_text(one(name, "ConfigMap")["data"]["rerank.yaml"])
    args = []
    for arg in c["args"]:
        if arg.startswith("--config="):
            arg = f"--config={config}"
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        elif arg.startswith("--metrics-port="):
            arg = f"--metrics-port={metrics_port}"
        elif arg.startswith("--host="):
            arg = "--host=127.0.0.1"
        args.append(arg)
    entry = dockerfile_entrypoint(DEPLOY / "Dockerfile")
    exe = Path(sys.executable).parent / entry[0]
    return [str(exe), *entry[1:], *args], config


@pytest.mark.parametrize("name", ["defaults", "upstream-gateway"])
def test_check_config_accepts_the_rendered_configuration(name: str, tmp_path: Path) -> None:
    """`rerank-service check-config` on the ConfigMap, with the Secrets' files made here."""
    text = one(name, "ConfigMap")["data"]["rerank.yaml"]
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES and not k.startswith("RERANK_")}
    for e in container(name)["env"]:
        if e["name"].endswith("_FILE"):
            local = tmp_path / e["value"].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("test-key\n")
            env[e["name"]] = str(local)
    for path in sorted(set(re.findall(r"/etc/rerank/keys/\S+", text))):
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("test-key\n")
        text = text.replace(path, str(local))
    config = tmp_path / "rerank.yaml"
    config.write_text(text)
    exe = Path(sys.executable).parent / "rerank-service"
    result = _run([exe, "check-config", config], env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_default_values_serve_and_answer_both_health_names(tmp_path: Path) -> None:
    """The rendered container command, run: serving, with readiness on rerank.v1.RerankService."""
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    port, metrics_port = free_port(), free_port()
    command, _ = _serve_command("defaults", tmp_path, port, metrics_port)
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES and not k.startswith("RERANK_")}
    env["RERANK_UPSTREAM_API_KEY"] = "test-key"  # the container gets it as a file; any source will do here
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            statuses: dict[str, int] = {}
            for service in ("", "rerank.v1.RerankService"):
                for _ in range(200):
                    try:
                        statuses[service] = stub.Check(
                            health_pb2.HealthCheckRequest(service=service), timeout=1
                        ).status
                        if statuses[service] == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    assert process.poll() is None, f"{shlex.join(command)} exited:\n{process.stdout.read()}"  # type: ignore[union-attr]
                    import time

                    time.sleep(0.05)
            assert statuses == {
                "": health_pb2.HealthCheckResponse.SERVING,
                "rerank.v1.RerankService": health_pb2.HealthCheckResponse.SERVING,
            }
    finally:
        process.terminate()
        code = process.wait(timeout=40)
    assert code == 0
