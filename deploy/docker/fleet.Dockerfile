# syntax=docker/dockerfile:1
# Controller, gateway and web UI: one image, the service is the first argument.
# Build from the repository root:
#   docker build -f deploy/docker/fleet.Dockerfile -t ghcr.io/llm-fleet/fleet:0.1.0 .
#   docker run ghcr.io/llm-fleet/fleet:0.1.0 gateway --host 0.0.0.0
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN --mount=type=bind,source=.,target=/src,rw pip install /src

RUN useradd --create-home --uid 10001 --user-group fleet
USER 10001
WORKDIR /home/fleet

# 21001 controller, 8000 gateway, 7860 web UI.
EXPOSE 21001 8000 7860
ENTRYPOINT ["fleet"]
CMD ["--help"]
