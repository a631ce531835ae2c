#!/usr/bin/env bash
# The chart's offline checks' tools, pinned, for tests/deploy (make chart-tools):
#   helm and kubeconform, built from the Go module proxy into .ci/tools/go/bin;
#   the Kubernetes JSON schemas kubeconform validates against, taken from the PyPI
#   wheel kubernetes-validate (it ships kubernetes-json-schema), hash-pinned, into
#   .ci/tools/kubernetes-json-schema/ (kubeconform's own default fetches them from
#   GitHub, which is not reachable from CI). All ignored by git. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.ci/tools"
bin="$tools/go/bin"
mkdir -p "$bin"
export GOBIN="$bin" GOFLAGS=-mod=mod

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
K8S_SCHEMA_VERSION=v1.34.0           # the Kubernetes version the manifests are checked against
KV_WHEEL=kubernetes_validate-1.37.0-py3-none-any.whl
KV_SHA256=85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9

stamp() { [[ -f "$1.version" && "$(cat "$1.version")" == "$2" ]]; }

if ! stamp "$bin/helm" "$HELM_VERSION" || [[ ! -x "$bin/helm" ]]; then
  go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" > "$bin/helm.version"
fi
if ! stamp "$bin/kubeconform" "$KUBECONFORM_VERSION" || [[ ! -x "$bin/kubeconform" ]]; then
  go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  echo "$KUBECONFORM_VERSION" > "$bin/kubeconform.version"
fi

schemas="$tools/kubernetes-json-schema"
want="$KV_WHEEL $K8S_SCHEMA_VERSION standalone"
if [[ ! -f "$schemas/.installed" || "$(cat "$schemas/.installed")" != "$want" ]]; then
  python=${PYTHON:-python3}
  [[ -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "kubernetes-validate==${KV_WHEEL#kubernetes_validate-} --hash=sha256:$KV_SHA256" \
    | sed 's/-py3-none-any.whl//' > "$tmp/req.txt"
  "$python" -m pip download --quiet --no-deps --require-hashes -r "$tmp/req.txt" -d "$tmp"
  rm -rf "$schemas"
  mkdir -p "$schemas"
  "$python" - "$tmp/$KV_WHEEL" "$schemas" "$K8S_SCHEMA_VERSION" <<'PY'
# The wheel's schemas ("<version>-local[-strict]/<kind>-<group>-<version>.json") point
# into a shared _definitions.json by absolute "$ref"s ("/api/_definitions.json#/$defs/X")
# that only kubernetes-validate resolves. kubeconform needs standalone files: each kind's
# schema gets the definitions it reaches (transitively) inlined, its "$ref"s made local.
import json, os, re, sys, zipfile
wheel, dest, version = sys.argv[1:]
prefix = "kubernetes_validate/kubernetes-json-schema/"
REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")

def refs(node, out):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                m = REF.match(value)
                if not m:
                    sys.exit(f"unexpected $ref {value!r}")
                node[key] = f"#/$defs/{m.group(1)}"
                out.add(m.group(1))
            else:
                refs(value, out)
    elif isinstance(node, list):
        for value in node:
            refs(value, out)

n = 0
with zipfile.ZipFile(wheel) as z:
    for flavour in (f"{version}-local", f"{version}-local-strict"):
        src = f"{prefix}{flavour}/"
        defs = json.loads(z.read(src + "_definitions.json"))["$defs"]
        out_dir = os.path.join(dest, flavour.replace("-local", "-standalone"))
        os.makedirs(out_dir, exist_ok=True)
        for name in z.namelist():
            if not name.startswith(src) or not name.endswith(".json") or name.endswith("/_definitions.json"):
                continue
            schema = json.loads(z.read(name))
            todo, seen = set(), set()
            refs(schema, todo)
            inlined = {}
            while todo:
                key = todo.pop()
                if key in seen:
                    continue
                seen.add(key)
                d = json.loads(json.dumps(defs[key]))
                found = set()
                refs(d, found)
                inlined[key] = d
                todo |= found - seen
            schema.pop("$id", None)
            if inlined:
                schema["$defs"] = inlined
            with open(os.path.join(out_dir, name[len(src):]), "w") as f:
                json.dump(schema, f, separators=(",", ":"))
            n += 1
if n == 0:
    sys.exit(f"no {version} schemas in {wheel}")
print(f"{n} standalone Kubernetes {version} JSON schemas into {dest}")
PY
  echo "$want" > "$schemas/.installed"
fi
