"""The CPU stack from the images `make images` builds: the controller and the gateway from
ghcr.io/llm-fleet/fleet, a worker with vLLM from ghcr.io/llm-fleet/worker:…-cpu, serving the
demo model (the host's converted copy, mounted read-only), answering a chat through the gateway.

Runs where a Docker engine answers and both images exist; `make images` makes both
(deploy/docker/images.sh, about 3 minutes on 2 cores from an empty cache), else the test skips
and says so.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import API_KEY, CLUSTER_TOKEN, MODEL_NAME, free_port

pytestmark = [pytest.mark.integration, pytest.mark.images]
TAG = "0.1.0"
FLEET_IMAGE = f"ghcr.io/llm-fleet/fleet:{TAG}"
WORKER_IMAGE = f"ghcr.io/llm-fleet/worker:{TAG}-cpu"
# As the cpu-demo overlay's pods have it (deploy/k8s/overlays/cpu-demo/worker-cpu.yaml, and the
# worker's /dev/shm volume): vLLM's engine core and its executor talk through shared memory, and
# Docker's 64 MiB /dev/shm fails the engine's start ("EngineCore failed to start", measured);
# SYS_NICE lets vLLM's CPU backend set NUMA memory policies under Docker's seccomp profile.
WORKER_OPTIONS = ("--cap-add=SYS_NICE", "--shm-size=1g", "--env=VLLM_CPU_KVCACHE_SPACE=1")


def _docker() -> str:
    # Debian's client first: it matches Debian's daemon, where another client may be on PATH.
    docker = shutil.which("docker", path="/usr/bin") or shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client: `make images` installs Debian's docker.io")
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers: {info.stderr.strip()[:200]}")
    for image in (FLEET_IMAGE, WORKER_IMAGE):
        found = subprocess.run([docker, "image", "inspect", image], capture_output=True,
                               timeout=30)
        if found.returncode != 0:
            pytest.skip(f"image {image} is not built: run `make images`")
    return docker


@dataclass
class Containers:
    docker: str
    prefix: str
    names: list[str]

    def run(self, name: str, image: str, args: list[str], volumes: dict[str, str] | None = None,
            options: tuple[str, ...] = ()) -> str:
        """Start a container on the host's network, as the image's own user."""
        full = f"{self.prefix}-{name}"
        mounts = [f"--volume={src}:{dst}:ro" for src, dst in (volumes or {}).items()]
        subprocess.run([self.docker, "run", "--detach", "--network=host", f"--name={full}",
                        f"--env=FLEET_CLUSTER_TOKEN={CLUSTER_TOKEN}", "--env=HF_HUB_OFFLINE=1",
                        *options, *mounts, image, *args], check=True, capture_output=True,
                       timeout=60)
        self.names.append(full)
        return full

    def logs(self) -> str:
        out = []
        for name in self.names:
            logs = subprocess.run([self.docker, "logs", "--tail=150", name], capture_output=True,
                                  text=True, timeout=30)
            out.append(f"--- {name}\n{logs.stdout}{logs.stderr}")
        return "\n".join(out)

    def alive(self) -> bool:
        states = subprocess.run(
            [self.docker, "inspect", "--format={{.State.Running}}", *self.names],
            capture_output=True, text=True, timeout=30).stdout.split()
        return states == ["true"] * len(self.names)

    def remove(self) -> None:
        if self.names:
            subprocess.run([self.docker, "rm", "--force", *self.names], capture_output=True,
                           timeout=120)


@pytest.fixture(scope="module")
def containers() -> Iterator[Containers]:
    found = Containers(_docker(), f"fleet-test-{uuid.uuid4().hex[:8]}", [])
    try:
        yield found
    finally:
        found.remove()


def test_the_cpu_stack_runs_from_the_images_and_answers(containers: Containers,
                                                        model_path: Path) -> None:
    controller, gateway, worker = free_port(), free_port(), free_port()
    controller_url = f"http://127.0.0.1:{controller}"
    containers.run("controller", FLEET_IMAGE, ["controller", "--port", str(controller),
                                               "--heartbeat-interval", "1", "--expiry", "3"])
    containers.run("gateway", FLEET_IMAGE, [
        "gateway", "--port", str(gateway), "--controller-address", controller_url,
        "--api-keys", API_KEY, "--sync-interval", "0.5"])
    containers.run("worker", WORKER_IMAGE, [
        "--model", "/models/demo", "--model-name", MODEL_NAME, "--port", str(worker),
        "--controller-address", controller_url, "--worker-id", "image-worker", "--cpus", "0",
        "--enforce-eager", "--max-model-len", "2048"], volumes={str(model_path): "/models/demo"},
        options=WORKER_OPTIONS)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + 300
    while True:  # the engine starts in the worker's container: 30-60 s on CPU
        with contextlib.suppress(httpx.HTTPError):
            models = httpx.get(f"http://127.0.0.1:{gateway}/v1/models", headers=auth, timeout=5)
            if models.status_code == 200 and models.json()["data"]:
                break
        assert containers.alive(), containers.logs()
        assert time.monotonic() < deadline, containers.logs()
        time.sleep(1)
    response = httpx.post(
        f"http://127.0.0.1:{gateway}/v1/chat/completions", headers=auth, timeout=120,
        json={"model": MODEL_NAME, "max_tokens": 8, "temperature": 0,
              "messages": [{"role": "user", "content": "Name the capital of France."}]})
    assert response.status_code == 200, response.text
    assert response.headers["x-fleet-worker"] == "image-worker"
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    # The worker inside the image reports its engine up, as Prometheus would scrape it.
    metrics = httpx.get(f"http://127.0.0.1:{worker}/metrics", timeout=10).text
    assert "fleet_worker_engine_up 1.0" in metrics
