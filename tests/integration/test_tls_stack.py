"""The whole stack over TLS: controller, worker (its engine too) and gateway serve HTTPS with a
certificate from a throwaway CA and verify one another against it; clients without the CA are
refused at the handshake."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.certs import make_tls_files
from tests.integration.harness import (
    API_KEY,
    CLUSTER_AUTH,
    CLUSTER_TOKEN,
    MODEL_NAME,
    Stack,
    free_port,
)

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FRANCE = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0,
          "messages": [{"role": "user", "content": "Name the capital of France."}]}


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("tls-stack")
    stack = Stack(workdir=workdir, model_path=model_path, tls=make_tls_files(workdir / "tls"))
    try:
        stack.start_controller()
        stack.start_gateway()
        # Core 1: the session's plain stack keeps core 0.
        stack.start_worker("worker", cpus="1")
        stack.wait_routable(timeout=300)
        yield stack
    finally:
        stack.close()


def test_requests_flow_over_tls_end_to_end(tls_stack: Stack) -> None:
    assert tls_stack.gateway_url.startswith("https://")
    reply = httpx.post(f"{tls_stack.gateway_url}/v1/chat/completions", json=FRANCE, headers=AUTH,
                       verify=tls_stack.verify, timeout=60)
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    # The worker registered over HTTPS, and its engine serves HTTPS too.
    engine_url = tls_stack.worker_record("worker")["engine_url"]
    assert engine_url.startswith("https://127.0.0.1:")
    health = httpx.get(f"{engine_url.rstrip('/')}/health", verify=tls_stack.verify, timeout=5)
    assert health.status_code == 200
    worker_health = f"https://127.0.0.1:{tls_stack.worker_ports['worker']}/health"
    assert httpx.get(worker_health, verify=tls_stack.verify, timeout=5).json()["state"] == "ready"


def test_clients_without_the_ca_fail_verification(tls_stack: Stack) -> None:
    engine_url = tls_stack.worker_record("worker")["engine_url"]
    for url in (f"{tls_stack.gateway_url}/health", f"{tls_stack.controller_url}/health",
                f"{engine_url.rstrip('/')}/health"):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, timeout=5)  # the system's CAs only


def test_no_plain_http_on_a_tls_port(tls_stack: Stack) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_stack.controller_port}/health", timeout=5)


def test_a_gateway_without_the_ca_does_not_trust_the_controller(tls_stack: Stack) -> None:
    port = free_port()
    gateway = tls_stack._spawn("gw-no-ca", [
        "-m", "gateway", "--port", str(port), "--controller-address", tls_stack.controller_url,
        "--api-keys", API_KEY, "--sync-interval", "0.5",
    ], env={"FLEET_SSL_CA_FILE": None})
    try:
        tls_stack.wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in gateway.tail(100),
                           "the gateway to refuse the controller's certificate", 30,
                           watch=["gw-no-ca"])
        health = httpx.get(f"http://127.0.0.1:{port}/health", headers=AUTH, timeout=5).json()
        assert health["controller"] == "never-synced" and health["workers"] == 0
    finally:
        tls_stack.stop("gw-no-ca")


def test_test_message_verifies_controller_and_engine_with_the_ca(tls_stack: Stack) -> None:
    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fleet.cli", "test-message", "--controller-address",
             tls_stack.controller_url, "--model-name", MODEL_NAME, "--max-tokens", "5", *flags],
            capture_output=True, text=True, timeout=120,
            env={**{k: v for k, v in os.environ.items() if k != "FLEET_SSL_CA_FILE"},
                 "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN},
        )

    trusted = run("--ssl-ca-file", str(tls_stack.tls.ca))
    assert trusted.returncode == 0, trusted.stderr
    assert "Worker: worker at https://" in trusted.stdout
    untrusted = run()
    assert untrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_the_web_uis_client_trusts_the_gateway_through_the_ca(tls_stack: Stack) -> None:
    from webui.app import make_client
    from webui.chat import list_models
    from webui.settings import WebUISettings

    async def list_with(settings: WebUISettings) -> list[str]:
        async with make_client(settings) as client:
            return await list_models(client)

    def models(**tls: Path) -> list[str]:
        settings = WebUISettings(gateway_url=tls_stack.gateway_url, api_key=API_KEY, **tls)
        return asyncio.run(list_with(settings))

    assert models(ssl_ca_file=tls_stack.tls.ca) == [MODEL_NAME]
    with pytest.raises(openai.APIConnectionError) as refused:
        models()
    assert "CERTIFICATE_VERIFY_FAILED" in repr(refused.value.__cause__)


def test_the_controller_over_tls_still_wants_the_token(tls_stack: Stack) -> None:
    url = f"{tls_stack.controller_url}/snapshot"
    assert httpx.get(url, verify=tls_stack.verify, timeout=5).status_code == 401
    assert httpx.get(url, headers=CLUSTER_AUTH, verify=tls_stack.verify,
                     timeout=5).status_code == 200


def test_a_tls_worker_stops_its_engine_cleanly(tls_stack: Stack) -> None:
    # Last in the module: it stops the worker. Idle keep-alive connections (the worker's own,
    # the gateway's) must not hold the engine's TLS shutdown until it is killed.
    worker = tls_stack.services["worker"]
    assert tls_stack.stop("worker", timeout=60) == 0
    log = worker.tail(400)
    assert "stopped worker_id=worker" in log
    assert "ignored SIGTERM" not in log
