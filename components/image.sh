#!/usr/bin/env bash
# Build the components' image (components/Dockerfile) on a clean machine; `make image` and CI call this.
#
#   components/image.sh                 # CPU image  $IMAGE (default ghcr.io/rlhf-project/rlhf:0.1.0)
#   VARIANT=cuda components/image.sh    # GPU image  $IMAGE-cuda (torch's PyPI wheel, CUDA runtime bundled)
#
# What it does, each step only when needed:
#  1. a Docker engine: installs Debian's docker.io and starts `dockerd --iptables=false --ip6tables=false`
#     (root only; no NAT: the build and the steps use the host network, nothing else);
#  2. a base image: $BASE_IMAGE if given, else python:3.11-slim if present or pullable, else a local base
#     made once from Debian packages with mmdebstrap (`docker import`, tag rlhf-base:bookworm);
#  3. torch: for the CPU image the pinned CPU wheel from this machine's pip sources (`pip download
#     torch==X+cpu`, into components/wheels/, kept between builds); where pip has none, the build takes it
#     from $TORCH_INDEX_URL (default the PyTorch CPU index);
#  4. `docker build --network=host`, pip's CA bundle ($PIP_CERT / pip's `cert`) as a BuildKit secret (never
#     in a layer) and pip's configured http(s) index as PIP_INDEX_URL; prints the image size.
# Exit code 3: no Docker engine can be had here (tests skip on that, and only on that).
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=${VARIANT:-cpu}
IMAGE=${IMAGE:-ghcr.io/rlhf-project/rlhf:0.1.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LOCAL_BASE=rlhf-base:bookworm
CACHE=${RLHF_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-image}
PY=${PYTHON:-python3}
case "$VARIANT" in
  cpu) TAG=$IMAGE; TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu} ;;
  cuda) TAG=${IMAGE}-cuda; TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple} ;;
  *) echo "image.sh: VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;;
esac
say() { echo "image.sh: $*" >&2; }

# -- 1. Docker engine ------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    say "no Docker engine answers and this is not root: start dockerd (or join the docker group)"; exit 3
  fi
  if ! command -v dockerd >/dev/null; then
    say "installing docker.io"
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; } \
      || { say "docker.io could not be installed"; exit 3; }
  fi
  say "starting dockerd (log: /var/log/rlhf-dockerd.log)"
  nohup dockerd --iptables=false --ip6tables=false >/var/log/rlhf-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { say "dockerd did not start: see /var/log/rlhf-dockerd.log"; exit 3; }
fi

# BuildKit (secret mounts): `docker buildx` where present, else the engine's built-in BuildKit through a
# client older than 23 (Debian's docker.io ships /usr/bin/docker 20.10; newer clients need buildx).
if docker buildx version >/dev/null 2>&1; then
  BUILD=(docker buildx build --load)
else
  BUILD=()
  for cli in docker /usr/bin/docker; do
    v=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$v" ] && [ "${v%%.*}" -lt 23 ]; then BUILD=(env DOCKER_BUILDKIT=1 "$cli" build); break; fi
  done
  [ ${#BUILD[@]} -gt 0 ] || { say "no BuildKit client: install docker-buildx"; exit 1; }
fi

# -- 2. base image ---------------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1
  then
    BASE_IMAGE=python:3.11-slim
  else
    BASE_IMAGE=$LOCAL_BASE
    if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
      mkdir -p "$CACHE"
      if [ ! -s "$CACHE/base.tar" ]; then
        command -v mmdebstrap >/dev/null || {
          DEBIAN_FRONTEND=noninteractive apt-get update -qq
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null; }
        say "no registry reachable: making the base image from Debian packages (once, cached in $CACHE)"
        mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
          bookworm "$CACHE/base.partial.tar"
        mv "$CACHE/base.partial.tar" "$CACHE/base.tar"
      fi
      docker import "$CACHE/base.tar" "$LOCAL_BASE" >/dev/null
    fi
  fi
fi
say "base image $BASE_IMAGE"

# -- 3. torch ----------------------------------------------------------------------------------------
TORCH_WHEEL=${TORCH_WHEEL:-}
if [ "$VARIANT" = cpu ] && [ -z "$TORCH_WHEEL" ]; then
  if "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d components/wheels \
       "torch==${TORCH_VERSION}+cpu" >/dev/null 2>&1; then
    TORCH_WHEEL=$(cd components/wheels && ls -t "torch-${TORCH_VERSION}+cpu-"*.whl | head -1)
    say "torch from this machine's pip sources: $TORCH_WHEEL"
  else
    say "torch from $TORCH_INDEX_URL"
  fi
fi

# -- 4. build ----------------------------------------------------------------------------------------
args=(--network=host -f components/Dockerfile -t "$TAG"
      --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION"
      --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" --build-arg "TORCH_WHEEL=$TORCH_WHEEL")
cert=${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}
[ -n "$cert" ] && [ -s "$cert" ] && args+=(--secret "id=pip-cert,src=$cert")
index=${PIP_INDEX_URL:-$("$PY" -m pip config get global.index-url 2>/dev/null || true)}
case "$index" in http://*|https://*) args+=(--build-arg "PIP_INDEX_URL=$index") ;; esac
[ -n "${TARGET:-}" ] && args+=(--target "$TARGET")
commit=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}  # recorded as lineage (RLHF_GIT_COMMIT)
[ -n "$commit" ] && args+=(--build-arg "GIT_COMMIT=$commit")

"${BUILD[@]}" "${args[@]}" "$@" .
size=$(docker image inspect -f '{{.Size}}' "$TAG")
echo "image $TAG: $(awk -v b="$size" 'BEGIN {printf "%.2f GB", b / 1e9}')"
