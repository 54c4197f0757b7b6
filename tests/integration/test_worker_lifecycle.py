"""A worker's life with a real engine: crash and restart, drain on SIGTERM, a model that fails.

These tests stop and start the session's worker; each leaves it serving again.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.harness import API_KEY, MODEL_NAME, Stack

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL_NAME, "max_tokens": 5,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def chat(stack: Stack) -> httpx.Response:
    return httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=CHAT, headers=AUTH,
                      timeout=60)


def test_crashed_engine_is_reported_unhealthy_and_restarted(stack: Stack) -> None:
    worker = psutil.Process(stack.services["worker"].proc.pid)
    (guard,) = worker.children()
    (engine,) = guard.children()
    assert "vllm.entrypoints" in " ".join(engine.cmdline())
    doomed = [engine, *engine.children(recursive=True)]
    engine.kill()
    stack.wait_worker_state("worker", "unhealthy", timeout=15)
    # The engine's own children go with it, before the new engine starts beside them.
    psutil.wait_procs(doomed, timeout=15)
    assert not [p for p in doomed if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    stack.wait_worker_state("worker", "ready", timeout=300)
    stack.wait_for(lambda: chat(stack).status_code == 200, "chat after the restart", 30)
    metrics = httpx.get(f"http://127.0.0.1:{stack.worker_ports['worker']}/metrics").text
    assert "fleet_worker_engine_restarts_total 1.0" in metrics
    assert "fleet_worker_engine_up 1.0" in metrics


def test_an_engine_whose_port_was_taken_while_it_was_down_comes_back_on_another(
        stack: Stack) -> None:
    """Between an engine's death and its restart (seconds of imports) any process may take
    its port; an outgoing connection can get it as its source port. The worker then moves
    the engine to a free port and registers the new address, instead of failing every
    restart on the old one."""
    old_url = stack.worker_record("worker")["engine_url"]
    port = int(old_url.rstrip("/").rsplit(":", 1)[1])
    worker = psutil.Process(stack.services["worker"].proc.pid)
    (guard,) = worker.children()
    (engine,) = guard.children()
    doomed = [engine, *engine.children(recursive=True)]
    engine.kill()
    psutil.wait_procs(doomed, timeout=15)
    with socket.socket() as squatter:
        # As uvicorn binds: past the dead engine's connections in TIME_WAIT.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()

        def moved() -> bool:
            record = stack.worker_record("worker")
            return record is not None and record["state"] == "ready" \
                and record["engine_url"] != old_url

        stack.wait_for(moved, "the engine back on another port", 300)
        stack.wait_for(lambda: chat(stack).status_code == 200, "chat on the new port", 30)
    assert "was taken before the engine could bind it" in stack.services["worker"].tail(200)


def test_sigterm_drains_then_503_until_a_worker_is_back(stack: Stack) -> None:
    # ignore_eos and 300 tokens: seconds of answer on one core (about 30 tokens/s for a single
    # stream here), well within the harness's 20 s drain.
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 300,
            "ignore_eos": True, "stream": True}
    answering = threading.Event()
    received: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", json=body,
                          headers=AUTH, timeout=120) as response:
            received.append(str(response.status_code))
            for line in filter(None, response.iter_lines()):  # events, not their blank lines
                received.append(line)
                if line.startswith("data: {"):
                    answering.set()

    client = threading.Thread(target=stream)
    client.start()
    # Polling the engine's gauge instead could miss a short answer entirely.
    stack.wait_for(lambda: answering.is_set() or not client.is_alive(),
                   "the stream's first tokens", 60)
    assert answering.is_set(), received
    stack.services["worker"].proc.send_signal(signal.SIGTERM)
    stack.wait_worker_state("worker", "draining", timeout=10)
    # While draining, the worker takes no new requests.
    stack.wait_for(lambda: chat(stack).status_code == 503, "503 while draining", 10)
    client.join(timeout=120)
    # The drain let the answer run to its end: no error event, no cut.
    events = [json.loads(line[6:]) for line in received if line.startswith("data: {")]
    assert [e for e in events if "error" in e] == [], received[-3:]
    assert events[-1]["choices"][0]["finish_reason"] == "length", received[-3:]
    assert received[-1] == "data: [DONE]"
    assert stack.stop("worker", timeout=60) == 0
    assert stack.worker_record("worker") is None
    response = chat(stack)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_worker_available"
    assert MODEL_NAME in response.json()["error"]["message"]

    stack.start_worker("worker", cpus="0")
    stack.wait_routable(timeout=300)
    reply = chat(stack)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_engine_that_cannot_load_its_model_fails_the_worker(stack: Stack, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    service = stack.start_worker("broken", cpus="1", model=broken)
    code = service.proc.wait(timeout=180)
    stack.services.pop("broken")
    log = service.tail(400)
    assert code == 1
    assert "engine exited with code" in log
    assert "no-such-architecture" in log  # the engine's own words reach the user
    assert stack.worker_record("broken") is None
