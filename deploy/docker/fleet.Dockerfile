# Controller, gateway and web UI: one image, the service is the first argument.
# Build from the repository root (BuildKit: DOCKER_BUILDKIT=1 before Docker 23):
#   docker build -f deploy/docker/fleet.Dockerfile -t ghcr.io/llm-fleet/fleet:0.1.0 .
#   docker run ghcr.io/llm-fleet/fleet:0.1.0 gateway --host 0.0.0.0
# `make images` builds it FROM a Debian base made by debootstrap instead (deploy/docker/base.sh).
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# A venv: Debian's own Python refuses pip installs into the system (PEP 668). The pip-cert
# secret is a CA bundle for a network whose proxy re-signs TLS; it is not kept in the image.
# The CPU lock pins what it shares with the tested set-up (it installs nothing by itself).
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && python3 -m venv /opt/venv \
    && pip install -c /src/requirements/constraints-cpu.txt /src

RUN useradd --create-home --uid 10001 --user-group fleet
USER 10001
WORKDIR /home/fleet

# 21001 controller, 8000 gateway, 7860 web UI.
EXPOSE 21001 8000 7860
ENTRYPOINT ["fleet"]
CMD ["--help"]
