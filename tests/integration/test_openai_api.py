"""The OpenAI API through the gateway, served by a real vLLM engine with the demo model."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.integration.harness import API_KEY, CLUSTER_TOKEN, MODEL_NAME, Stack

pytestmark = pytest.mark.integration
# Worded for a clear greedy margin: to "What is the capital of France?" the demo model's first
# token is a near tie (0.12 nats), which CPUs with other matmul kernels (AMX bf16) break
# either way.
FRANCE = [{"role": "user", "content": "Name the capital of France."}]
# test-message reads the registry, which hands out engine keys only for a token.
WITH_TOKEN = {**os.environ, "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN}


def test_models_lists_the_demo_model_with_its_context(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert MODEL_NAME in models
    assert models[MODEL_NAME].model_extra["max_model_len"] == 4096


def test_chat_at_temperature_zero_knows_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL_NAME, messages=FRANCE, temperature=0,
                                           max_tokens=30)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0


def test_streamed_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=FRANCE, temperature=0, max_tokens=30, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0 and not chunks[-1].choices


def test_completion_and_streamed_completion_agree(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8,
                                      temperature=0)
    pieces = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8,
                                       temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in pieces if c.choices)
    assert whole.choices[0].text == streamed
    assert "Paris" in streamed


def test_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=3, temperature=0,
        messages=[{"role": "user", "content": "Write a long poem about the sea."}],
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_responses_name_the_worker_and_request_id(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions", timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "trace-me-42"},
        json={"model": MODEL_NAME, "messages": FRANCE, "max_tokens": 2},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-me-42"
    assert response.headers["x-fleet-worker"] == "worker"


def test_bad_key_is_401(stack: Stack) -> None:
    bad = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL_NAME, messages=FRANCE)
    assert info.value.status_code == 401
    assert "not valid" in info.value.body["message"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nonexistent", messages=FRANCE)
    assert info.value.body["code"] == "model_not_found"
    assert MODEL_NAME in info.value.body["message"]


def test_malformed_body_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    assert info.value.body["param"] == "messages"


def test_max_tokens_past_the_context_is_refused_by_the_gateway(client: openai.OpenAI) -> None:
    # The worker registered the engine's context (4096): no engine work for a sure failure.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=FRANCE, max_tokens=4096)
    assert info.value.body["param"] == "max_tokens"
    assert info.value.body["code"] == "context_length_exceeded" and "4096" in str(info.value)


def test_engine_side_rejection_comes_back_as_the_engines_400(client: openai.OpenAI) -> None:
    # The gateway does not tokenize: ~4,500 tokens in 27,000 characters pass its cheap bound
    # (10 characters a token); the engine's exact check refuses them, and its error is relayed
    # unchanged.
    long = [{"role": "user", "content": "hello " * 4500}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=long, max_tokens=5)
    assert "4096" in str(info.value) and info.value.body.get("code") != "context_length_exceeded"


def test_client_disconnect_mid_stream_aborts_the_engine_request(stack: Stack) -> None:
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 3000,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{stack.gateway_url}/v1/completions", json=body,
                         headers=headers) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            # The engine's gauges lag its scheduler a little.
            stack.wait_for(lambda: stack.engine_running() == 1, "the engine to run it", 10)
    # 3000 tokens would take the engine far longer than this deadline on one core.
    stack.wait_for(lambda: stack.engine_running() == 0, "the engine to abort it", 10)
    # A client leaving is not the worker failing: the next request goes to it at once.
    reply = httpx.post(f"{stack.gateway_url}/v1/completions", headers=headers, timeout=60,
                       json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def test_test_message_streams_a_reply_from_a_worker(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.test_message", "--controller-address",
         stack.controller_url, "--model-name", MODEL_NAME, "--message",
         "Name the capital of France.", "--max-tokens", "30"],
        capture_output=True, text=True, timeout=120, env=WITH_TOKEN,
    )
    assert result.returncode == 0, result.stderr
    assert MODEL_NAME in result.stdout.splitlines()[0]
    assert "Worker: worker" in result.stdout
    assert "Paris" in result.stdout


def test_test_message_for_a_model_nobody_serves_fails(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "test-message", "--controller-address",
         stack.controller_url, "--model-name", "nobody-serves-this"],
        capture_output=True, text=True, timeout=60, env=WITH_TOKEN,
    )
    assert result.returncode == 1
    assert "no ready worker serves model 'nobody-serves-this'" in result.stderr
