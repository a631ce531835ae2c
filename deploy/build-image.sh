#!/usr/bin/env bash
# Builds deploy/Dockerfile (the upstream-only image) as localhost/rerank-service:VERSION with
# neither a container registry nor a Docker daemon: buildah (chroot isolation) on a Debian
# base made by mmdebstrap from Debian's mirrors, pip installing from wheels the host's pip
# downloads beforehand (`--build-context wheelhouse=DIR`: no package index inside the build).
#
#   deploy/build-image.sh              (or `make image`)
#   deploy/build-image.sh --rebuild    a new base, new wheels and a new image, caches ignored
#   deploy/build-image.sh --tag NAME   another name than localhost/rerank-service:VERSION
#
# Each step is skipped while its inputs are unchanged:
#   base    .ci/tools/images/base-KEY.tar (mmdebstrap), committed as the image
#           localhost/rerank-service-base:bookworm-KEY; KEY hashes the suite, packages, options
#   wheels  .ci/tools/images/wheelhouse-KEY/; KEY hashes both pyproject.toml files and the
#           Python version and machine they are for
#   image   not built again while its label rerank-service.build-inputs matches a hash of the
#           Dockerfile, every file it copies, this script, the base's image ID and the wheels
#
# Environment: HOST_PYTHON, the Python whose pip downloads the wheels (default .venv/bin/python,
# else python3); STORAGE_DRIVER, buildah's storage driver (default vfs, which works everywhere;
# overlay is faster where the kernel allows it); DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR.
# Runs as root (mmdebstrap's root mode and buildah's storage in /var/lib/containers). Installs
# buildah and mmdebstrap with apt-get when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REBUILD=0
IMAGE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rebuild) REBUILD=1 ;;
        --tag)
            [ $# -ge 2 ] || { echo "build-image.sh: --tag needs a name" >&2; exit 2; }
            IMAGE=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "build-image.sh: $*" >&2; exit 1; }
step() { printf '== %s\n' "$*"; }
elapsed() { printf '   %s: %ds\n' "$1" "$(($(date +%s) - $2))"; }
started=$(date +%s)

[ "$(id -u)" = 0 ] || die "run as root: mmdebstrap builds the base in root mode and buildah keeps its images in /var/lib/containers"

SUITE=bookworm
PYTHON_VERSION=3.11 # bookworm's python3: the wheels are downloaded for it
# pip download evaluates python_full_version markers against the host's Python, not
# bookworm's 3.11.2: what a dependency needs only below the host's version is named here.
EXTRA_WHEELS=("async-timeout>=4.0.3") # redis, on Python < 3.11.3
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What the python:3.11-slim images leave out too; copyright files stay.
DPKG_OPTIONS=(
    'path-exclude=/usr/share/doc/*'
    'path-include=/usr/share/doc/*/copyright'
    'path-exclude=/usr/share/man/*'
    'path-exclude=/usr/share/info/*'
    'path-exclude=/usr/share/locale/*'
    'path-include=/usr/share/locale/locale.alias'
)
# The base image's configuration: python:3.11-slim's, whose CMD the Dockerfile's ENTRYPOINT clears.
BASE_CONFIG=(--env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 --cmd python3)
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
CACHE=$ROOT/.ci/tools/images
LABEL=rerank-service.build-inputs

# One build (and one apt-get) at a time.
mkdir -p "$CACHE"
[ -e "$CACHE/.gitignore" ] || printf '# made by deploy/build-image.sh: nothing here is committed\n*\n' >"$CACHE/.gitignore"
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "another build has held $CACHE/.lock for 15 minutes" # one build at a time

# --- tools -------------------------------------------------------------------------------

missing=()
for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "${missing[*]} missing, and no apt-get to install them with: install ${missing[*]}"
    step "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" \
        || { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } \
        || die "apt-get install ${missing[*]} failed"
    for tool in "${missing[@]}"; do
        command -v "$tool" >/dev/null || die "$tool is still missing after apt-get install"
    done
fi
buildah build --help 2>/dev/null | grep -q -- '--build-context' \
    || die "$(buildah --version) has no --build-context (Debian bookworm's buildah 1.28 has it)"

PY=${HOST_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3) || die "no Python: run make install-dev, or set HOST_PYTHON"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip: run make install-dev, or set HOST_PYTHON"
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE=${IMAGE:-localhost/rerank-service:$VERSION} # VERSION: pyproject.toml's

bah() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
image_id() { bah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null; }

bah images >/dev/null 2>&1 || die "buildah cannot open its storage with the $STORAGE_DRIVER driver (set STORAGE_DRIVER)"


key() { sha256sum | cut -c1-12; }

# --- the base: Debian bookworm with Python 3.11, from Debian's mirrors -------------------

base_key=$(printf '%s\n' "$SUITE" "$PACKAGES" "$MIRROR" "$SECURITY_MIRROR" "${DPKG_OPTIONS[@]}" "${BASE_CONFIG[@]}" | key)
BASE_IMAGE=localhost/rerank-service-base:$SUITE-$base_key
base_tar=$CACHE/base-$base_key.tar
if [ "$REBUILD" = 1 ]; then
    rm -f "$base_tar"
    bah rmi "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if ! image_id "$BASE_IMAGE" >/dev/null; then
    if [ ! -s "$base_tar" ]; then
        step "base: mmdebstrap $SUITE ($PACKAGES) -> ${base_tar#"$ROOT"/}"
        t=$(date +%s)
        # /dev's nodes are left out: a container runtime provides /dev.
        mmdebstrap --mode=root --variant=minbase --format=tar --include="$PACKAGES" \
            "${DPKG_OPTIONS[@]/#/--dpkgopt=}" --aptopt='Acquire::Retries "3"' \
            "$SUITE" - \
            "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main" \
            | tar --delete --wildcards './dev/?*' >"$base_tar.part" \
            || die "mmdebstrap failed (Debian's mirror $MIRROR unreachable? set DEBIAN_MIRROR)"
        mv "$base_tar.part" "$base_tar"
        elapsed mmdebstrap "$t"
    fi
    step "base: $base_tar -> $BASE_IMAGE"
    t=$(date +%s)
    container=$(bah from --quiet scratch)
    trap 'bah rm "$container" >/dev/null 2>&1 || true' EXIT
    bah add --quiet "$container" "$base_tar" / >/dev/null
    bah config "${BASE_CONFIG[@]}" "$container"
    bah commit --quiet --rm "$container" "$BASE_IMAGE" >/dev/null
    trap - EXIT
    elapsed commit "$t"
fi
base_id=$(image_id "$BASE_IMAGE")
# bases of an earlier recipe: their tarballs and tags
find "$CACHE" -maxdepth 1 -name 'base-*.tar*' ! -name "base-$base_key.tar" -delete
for stale in $(bah images --noheading --format '{{.Name}}:{{.Tag}}' | grep -x 'localhost/rerank-service-base:.*' | grep -vx "$BASE_IMAGE" || true); do
    bah rmi "$stale" >/dev/null 2>&1 || true
done

# --- the wheels: every dependency and the build backend, for the base's Python -----------

build_requires=$("$PY" -c '
import sys, tomllib
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        print("\n".join(tomllib.load(f)["build-system"]["requires"]))
' pyproject.toml clients/python/pyproject.toml | sort -u)
wheels_key=$(cat pyproject.toml clients/python/pyproject.toml <(echo "$PYTHON_VERSION $(uname -m) ${EXTRA_WHEELS[*]}") | key)
WHEELHOUSE=$CACHE/wheelhouse-$wheels_key
[ "$REBUILD" = 1 ] && rm -rf "$WHEELHOUSE"
if [ ! -d "$WHEELHOUSE" ]; then
    step "wheels: pip download (Python $PYTHON_VERSION) -> ${WHEELHOUSE#"$ROOT"/}"
    t=$(date +%s)
    rm -rf "$WHEELHOUSE.part"
    mapfile -t requires <<<"$build_requires"
    requires+=("${EXTRA_WHEELS[@]}")
    "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --python-version "$PYTHON_VERSION" --dest "$WHEELHOUSE.part" ./clients/python '.[otel]' "${requires[@]}" \
        || die "pip download failed: the wheels come from the index the host's pip uses"
    mv "$WHEELHOUSE.part" "$WHEELHOUSE"
    elapsed "pip download" "$t"
fi
find "$CACHE" -maxdepth 1 -name 'wheelhouse-*' ! -name "wheelhouse-$wheels_key" -exec rm -rf {} +

# --- the image ---------------------------------------------------------------------------

inputs=$(
    {
        find deploy/Dockerfile deploy/build-image.sh pyproject.toml README.md rerank_service clients/python -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        echo "$base_id"
        (cd "$WHEELHOUSE" && LC_ALL=C ls)
    } | sha256sum | cut -c1-16
)
previous=$(image_id "$IMAGE" || true)
if [ "$REBUILD" = 0 ] && [ -n "$previous" ] \
    && [ "$(bah inspect --type image --format "{{index .OCIv1.Config.Labels \"$LABEL\"}}" "$IMAGE")" = "$inputs" ]; then
    step "image: $IMAGE is up to date ($LABEL=$inputs)"
else
    step "image: buildah build -f deploy/Dockerfile -> $IMAGE"
    t=$(date +%s)
    bah build --isolation chroot --pull-never --layers=false --force-rm \
        --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-context wheelhouse="$WHEELHOUSE" \
        --label "$LABEL=$inputs" --tag "$IMAGE" -f deploy/Dockerfile . \
        || die "buildah build failed"
    elapsed build "$t"
    # the image this one replaced, if it is left untagged
    if [ -n "$previous" ] && [ "$previous" != "$(image_id "$IMAGE")" ] \
        && bah images --noheading --no-trunc --filter dangling=true --format '{{.ID}}' | grep -q "$previous"; then
        bah rmi "$previous" >/dev/null || true
    fi
fi
size=$(bah images --noheading --format '{{.Size}}' "$IMAGE")
step "$IMAGE $(image_id "$IMAGE" | cut -c1-12), $size, storage driver $STORAGE_DRIVER ($(($(date +%s) - started))s)"
