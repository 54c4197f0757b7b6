"""A gateway with a keys file in front of the real engine: what each key may do, with real usage.

A second gateway joins the session's stack (same controller and worker) with `--keys-file`.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.keys import KeyEntry, append_key, hash_key
from tests.integration.harness import MODEL_NAME, Stack, free_port

pytestmark = pytest.mark.integration

NARROW = "sk-fleet-narrow-real-engine"  # another model only
WIDE = "sk-fleet-wide-real-engine"  # the demo model, 20 requests a minute
METERED = "sk-fleet-metered-real-engine"  # the demo model, 30 tokens a minute
# Worded for a clear greedy margin: to "What is the capital of France?" the demo model's first
# token is a near tie (0.12 nats), which CPUs with other matmul kernels (AMX bf16) break
# either way.
FRANCE = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture(scope="module")
def keyed_gateway(stack: Stack) -> Iterator[str]:
    keys_file = stack.workdir / "real-keys.yaml"
    append_key(keys_file, hash_key(NARROW), KeyEntry(name="narrow", models=["another-model"]))
    append_key(keys_file, hash_key(WIDE), KeyEntry(name="wide", models=[MODEL_NAME], rpm=20))
    append_key(keys_file, hash_key(METERED), KeyEntry(name="metered", models=[MODEL_NAME],
                                                      tpm=30))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack.start_gateway("gateway-keys", port, ["--keys-file", str(keys_file)])
    try:
        stack.wait_routable(timeout=60, gateway_url=url)
        yield url
    finally:
        stack.stop("gateway-keys")


def client_for(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=120, max_retries=0)


def test_a_key_for_another_model_gets_403_and_sees_no_model(keyed_gateway: str) -> None:
    narrow = client_for(keyed_gateway, NARROW)
    with pytest.raises(openai.PermissionDeniedError) as info:
        narrow.chat.completions.create(model=MODEL_NAME, messages=FRANCE, max_tokens=5)
    assert info.value.status_code == 403
    assert info.value.body["code"] == "model_not_allowed"
    assert [m.id for m in narrow.models.list()] == []


def test_a_key_for_the_model_gets_a_normal_answer(keyed_gateway: str) -> None:
    wide = client_for(keyed_gateway, WIDE)
    assert [m.id for m in wide.models.list()] == [MODEL_NAME]
    reply = wide.chat.completions.create(model=MODEL_NAME, messages=FRANCE, temperature=0,
                                         max_tokens=30)
    assert "Paris" in reply.choices[0].message.content


def test_real_usage_spends_a_tokens_per_minute_limit(keyed_gateway: str) -> None:
    metered = client_for(keyed_gateway, METERED)
    reply = metered.chat.completions.create(model=MODEL_NAME, messages=FRANCE, temperature=0,
                                            max_tokens=20)
    assert reply.usage.total_tokens >= 30  # the chat template alone is longer than that
    response = httpx.post(f"{keyed_gateway}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {METERED}"},
                          json={"model": MODEL_NAME, "messages": FRANCE, "max_tokens": 5})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["retry-after"]) <= 60
