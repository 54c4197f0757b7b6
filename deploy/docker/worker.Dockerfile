# The worker on NVIDIA GPUs: vLLM's own CUDA image, with llm-fleet installed beside vLLM.
# Build from the repository root (BuildKit: DOCKER_BUILDKIT=1 before Docker 23):
#   docker build -f deploy/docker/worker.Dockerfile -t ghcr.io/llm-fleet/worker:0.1.0 .
FROM vllm/vllm-openai:v0.26.0

# vLLM's image installs its packages into the system Python, which pip may then add to.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Installing llm-fleet must not move the engine's own stack: pin what the image has.
RUN --mount=type=bind,source=.,target=/src,rw \
    python3 -m pip freeze | grep -iE '^(vllm|torch|transformers|triton)==' > /tmp/engine.txt \
    && python3 -m pip install --constraint /tmp/engine.txt /src \
    && rm /tmp/engine.txt

RUN useradd --create-home --uid 10001 --user-group fleet
USER 10001
WORKDIR /home/fleet

# 21002: the worker's /health and /metrics; 8100: the engine (both set by flags).
EXPOSE 21002 8100
# The worker is PID 1: SIGTERM from `docker stop` or the kubelet reaches it and starts the drain.
ENTRYPOINT ["fleet", "worker"]
