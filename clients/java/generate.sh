#!/usr/bin/env bash
# Regenerates the checked-in Java code (src/main/java/io/rerankservice/rerank/v1/)
# from proto/rerank/v1/rerank.proto. One command, idempotent, deterministic:
#   clients/java/generate.sh
# It fetches the pinned protoc and protoc-gen-grpc-java binaries from Maven Central
# into <repo>/.ci/tools/java/ (skipped when already there), then runs buf generate
# from the repository root with clients/java/buf.gen.yaml.
# Versions come from pom.xml: protoc = protobuf.version, plugin = grpc.version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
pom="$here/pom.xml"
tools="$root/.ci/tools/java"

prop() { sed -n "s:.*<$1>\(.*\)</$1>.*:\1:p" "$pom" | head -n1; }
protobuf_version="$(prop protobuf.version)"
grpc_version="$(prop grpc.version)"
[[ -n "$protobuf_version" && -n "$grpc_version" ]] || { echo "generate.sh: cannot read versions from $pom" >&2; exit 1; }

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) classifier=linux-x86_64 ;;
  Linux-aarch64) classifier=linux-aarch_64 ;;
  Darwin-x86_64) classifier=osx-x86_64 ;;
  Darwin-arm64) classifier=osx-aarch_64 ;;
  *) echo "generate.sh: unsupported platform $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac

mkdir -p "$tools"

# fetch GROUP:ARTIFACT VERSION LINKNAME: copies the exe artifact from Maven Central
# (via the local ~/.m2 cache) and points a stable name at it.
fetch() {
  local ga="$1" version="$2" link="$3"
  local artifact="${ga#*:}"
  local file="$artifact-$version-$classifier.exe"
  if [[ ! -x "$tools/$file" ]]; then
    mvn -q -B -Dstyle.color=never -f "$pom" dependency:copy \
      -Dartifact="$ga:$version:exe:$classifier" \
      -DoutputDirectory="$tools" -Dmdep.overWriteReleases=true 2>&1 \
      | sed -e 's/\x1b\[[0-9;]*m//g' -e '/^$/d'  # drop stray colour codes of some Maven builds
    chmod +x "$tools/$file"
  fi
  ln -sfn "$file" "$tools/$link"
}
fetch com.google.protobuf:protoc "$protobuf_version" protoc
fetch io.grpc:protoc-gen-grpc-java "$grpc_version" protoc-gen-grpc-java

buf="$root/.ci/tools/node_modules/.bin/buf"
if [[ ! -x "$buf" ]]; then
  npm ci --prefix "$root/.ci/tools"
fi

# Remove the previous output first so files for deleted messages do not linger.
rm -rf "$here/src/main/java/io/rerankservice/rerank/v1"
cd "$root"
"$buf" generate --template clients/java/buf.gen.yaml
echo "generated $(find "$here/src/main/java/io/rerankservice/rerank/v1" -name '*.java' | wc -l) files into clients/java/src/main/java/io/rerankservice/rerank/v1 (protoc $protobuf_version, grpc-java $grpc_version)"
