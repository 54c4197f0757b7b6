"""The controller's doors, tried against the running stack: nobody without the cluster token
registers, heartbeats, deregisters or reads the registry, and the engine keys it holds reach
only those who have the token. An engine reached without the gateway refuses requests."""

from __future__ import annotations

import httpx
import psutil
import pytest

from tests.integration.harness import API_KEY, CLUSTER_AUTH, CLUSTER_TOKEN, MODEL_NAME, Stack

pytestmark = pytest.mark.integration
WRONG = {"Authorization": "Bearer this-is-not-the-cluster-token"}
ROGUE = {"worker_id": "rogue", "engine_url": "http://127.0.0.1:9", "model_names": [MODEL_NAME]}
CHAT = {"model": MODEL_NAME, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}


def engine_key(stack: Stack) -> str:
    record = stack.worker_record("worker")
    assert record is not None and record["engine_api_key"]
    return str(record["engine_api_key"])


def assert_401(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == code


@pytest.mark.parametrize("headers, code", [({}, "missing_cluster_token"),
                                           (WRONG, "invalid_cluster_token")])
def test_registration_without_the_token_is_refused(stack: Stack, headers: dict,
                                                   code: str) -> None:
    response = httpx.post(f"{stack.controller_url}/workers/register", json=ROGUE,
                          headers=headers, timeout=5)
    assert_401(response, code)
    assert [w["worker_id"] for w in stack.workers()] == ["worker"]


def test_nobody_without_the_token_can_drop_or_mark_the_worker(stack: Stack) -> None:
    url = f"{stack.controller_url}/workers/worker"
    assert_401(httpx.delete(url, timeout=5), "missing_cluster_token")
    assert_401(httpx.post(f"{url}/heartbeat", json={"state": "draining"}, headers=WRONG,
                          timeout=5), "invalid_cluster_token")
    # The worker, registered with the right token, is still there and serving.
    assert stack.worker_record("worker")["state"] == "ready"
    reply = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=CHAT, timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200 and reply.headers["x-fleet-worker"] == "worker"


def test_the_engine_key_reaches_only_token_holders(stack: Stack) -> None:
    key = engine_key(stack)
    for path in ("/snapshot", "/workers", "/models", f"/models/{MODEL_NAME}/workers"):
        for headers, code in (({}, "missing_cluster_token"), (WRONG, "invalid_cluster_token")):
            response = httpx.get(f"{stack.controller_url}{path}", headers=headers, timeout=5)
            assert_401(response, code)
            assert key not in response.text
    # What stays open tells nobody the key either.
    worker_port = stack.worker_ports["worker"]
    for url in (f"{stack.controller_url}/health", f"{stack.controller_url}/metrics",
                f"http://127.0.0.1:{worker_port}/health", f"http://127.0.0.1:{worker_port}/metrics",
                f"{stack.gateway_url}/health", f"{stack.gateway_url}/metrics"):
        response = httpx.get(url, timeout=5)
        assert response.status_code == 200 and key not in response.text, url


def test_the_engine_is_useless_without_its_key(stack: Stack) -> None:
    record = stack.worker_record("worker")
    url = f"{record['engine_url'].rstrip('/')}/v1/chat/completions"
    for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}, CLUSTER_AUTH):
        assert httpx.post(url, json=CHAT, headers=headers, timeout=30).status_code == 401
    with_key = httpx.post(url, json=CHAT, timeout=60,
                          headers={"Authorization": f"Bearer {record['engine_api_key']}"})
    assert with_key.status_code == 200


def test_no_command_line_shows_a_token_or_key(stack: Stack) -> None:
    key = engine_key(stack)
    worker = psutil.Process(stack.services["worker"].proc.pid)
    processes = [psutil.Process(s.proc.pid) for s in stack.services.values()]
    processes += worker.children(recursive=True)
    assert len(processes) > len(stack.services)  # the engine and its helpers are in the list
    for process in processes:
        cmdline = " ".join(process.cmdline())
        assert key not in cmdline and CLUSTER_TOKEN not in cmdline, cmdline
    # The engine runs model code: it gets its own key, and no cluster token.
    (guard,) = worker.children()
    (engine,) = guard.children()
    environ = engine.environ()
    assert environ["VLLM_API_KEY"] == key and "FLEET_CLUSTER_TOKEN" not in environ


def test_a_worker_with_a_wrong_token_is_refused_and_says_why(stack: Stack) -> None:
    intruder = stack.start_worker(
        "intruder", cpus="1", env={"FLEET_CLUSTER_TOKEN": "a-guessed-token-of-fine-length"})
    try:
        # The worker registers as `starting` before its engine is up, so the refusal is quick.
        stack.wait_for(lambda: "refused this worker (401)" in intruder.tail(200),
                       "the intruder to be refused", 60, watch=["intruder"])
        assert "FLEET_CLUSTER_TOKEN" in intruder.tail(200)
        assert stack.worker_record("intruder") is None
    finally:
        assert stack.stop("intruder", timeout=60) == 0
    assert [w["worker_id"] for w in stack.workers()] == ["worker"]
