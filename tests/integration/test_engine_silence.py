"""An engine that goes quiet: the gateway's read timeout, through its own engine client.

The subject is the gateway, so the engines are fake ones (tests/integration/fake_engine.py)
registered with a real controller: one that holds every answer back for 3 s before its first
byte, one that stops for 3 s between streamed chunks. The gateway gives up after 1 s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import API_KEY, Stack

SLOW_START, STALLING = "slow-start-model", "stalling-model"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("silence"), model_path=Path("unused"))
    try:
        stack.start_controller()
        stack.start_fake_engine("slow", SLOW_START, ["--delay-ms", "3000"])
        stack.start_fake_engine("stalling", STALLING, ["--interval-ms", "3000", "--chunks", "3"])
        stack.start_gateway(extra=["--read-timeout", "1"])

        def both_routable() -> bool:
            data = httpx.get(f"{stack.gateway_url}/v1/models", headers=AUTH, timeout=5).json()
            return {SLOW_START, STALLING} <= {m["id"] for m in data["data"]}

        stack.wait_for(both_routable, "the gateway to route both fake models", 60)
        yield stack
    finally:
        stack.close()


def _chat(model: str, stream: bool) -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def _engine_requests(stack: Stack, name: str) -> int:
    port = stack.worker_ports[name]
    return int(httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()["requests"])


def test_an_engine_silent_before_its_first_byte_is_a_504_and_not_sent_twice(
        stack: Stack) -> None:
    before = _engine_requests(stack, "slow")
    response = httpx.post(f"{stack.gateway_url}/v1/chat/completions", headers=AUTH,
                          json=_chat(SLOW_START, stream=False), timeout=30)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert "sent nothing for 1s" in error["message"]
    # The engine may be working on it: sending it to another worker could run it twice.
    assert _engine_requests(stack, "slow") == before + 1


def test_an_engine_silent_mid_stream_ends_the_stream_with_an_error_event(stack: Stack) -> None:
    with httpx.stream("POST", f"{stack.gateway_url}/v1/chat/completions", headers=AUTH,
                      json=_chat(STALLING, stream=True), timeout=30) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["choices"][0]["delta"]["content"]  # what came before the silence got through
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "sent nothing for 1s" in error["message"]
