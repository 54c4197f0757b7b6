"""A key's limit of requests in flight, against a running gateway and a slow fake engine.

The fake engine (tests/integration/fake_engine.py) streams one chunk every 50 ms, as many as
`max_tokens` asks for, so a stream stays open for as long as the test needs it to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.keys import KeyEntry, append_key, hash_key
from tests.integration.harness import API_KEY, MODEL_NAME, Stack

pytestmark = pytest.mark.integration

LIMIT = 2
KEY = "sk-fleet-erin-0123456789"
LONG, MEDIUM, SHORT = 600, 20, 2  # max_tokens: 30 s of chunks, 1 s, or 0.1 s


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("concurrency")
    keys_file = workdir / "keys.yaml"
    append_key(keys_file, hash_key(KEY), KeyEntry(name="erin", concurrency=LIMIT))
    stack = Stack(workdir=workdir, model_path=Path("unused"))
    try:
        stack.start_controller()
        stack.start_fake_engine(extra=["--chunks", str(LONG), "--interval-ms", "50"])
        stack.start_gateway(extra=["--keys-file", str(keys_file)])
        stack.wait_routable(timeout=60)
        yield stack
    finally:
        stack.close()


def body(max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL_NAME, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def plain(stack: Stack, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=body(SHORT, False),
                      headers=auth(key), timeout=30)


def engine_requests(stack: Stack) -> int:
    stats = httpx.get(f"http://127.0.0.1:{stack.worker_ports['fake']}/stats", timeout=5)
    return int(stats.json()["requests"])


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert f"{LIMIT} requests in flight" in error["message"]


def test_the_key_is_refused_while_its_streams_run_and_admitted_after_one_ends(
        slow_stack: Stack) -> None:
    with httpx.Client(base_url=slow_stack.gateway_url, timeout=30) as client, \
            contextlib.ExitStack() as streams:

        def open_stream(max_tokens: int = LONG) -> httpx.Response:
            response = streams.enter_context(client.stream(
                "POST", "/v1/chat/completions", json=body(max_tokens, True), headers=auth()))
            assert response.status_code == 200
            return response

        first, second = open_stream(MEDIUM), open_stream()
        before = engine_requests(slow_stack)
        assert_refused(plain(slow_stack))
        with client.stream("POST", "/v1/chat/completions", json=body(SHORT, True),
                           headers=auth()) as third:
            third.read()
            assert_refused(third)
        assert engine_requests(slow_stack) == before  # refused before the engine
        assert plain(slow_stack, API_KEY).status_code == 200  # other keys are not held up

        # A stream read to its end gives its place back.
        events = [line for line in first.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        first.close()
        assert plain(slow_stack).status_code == 200

        # A client that leaves mid-stream gives its place back too.
        open_stream()
        assert_refused(plain(slow_stack))
        second.close()
        slow_stack.wait_for(lambda: plain(slow_stack).status_code == 200,
                            "the left stream's place to be given back", 10)


def test_refusals_are_counted_and_logged_like_the_other_limits(slow_stack: Stack) -> None:
    with httpx.Client(base_url=slow_stack.gateway_url, timeout=30) as client, \
            contextlib.ExitStack() as streams:
        for _ in range(LIMIT):
            response = streams.enter_context(client.stream(
                "POST", "/v1/chat/completions", json=body(LONG, True), headers=auth()))
            assert response.status_code == 200
        refused = plain(slow_stack)
        assert_refused(refused)
    request_id = refused.headers["x-request-id"]
    log = slow_stack.services["gateway"].log
    slow_stack.wait_for(lambda: f"request_id={request_id} key=erin" in log.read_text(),
                        "the refusal in the gateway's log", 5)
    line = next(line for line in log.read_text().splitlines() if request_id in line)
    assert "status=429 code=rate_limit_exceeded" in line
    metrics = httpx.get(f"{slow_stack.gateway_url}/metrics", timeout=5).text
    assert any(line.startswith("fleet_gateway_requests_total{") and 'status="429"' in line
               for line in metrics.splitlines())

