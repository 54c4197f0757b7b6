"""Keys, limits and hostile input against a running gateway.

The subject is the gateway, so the engine behind it is the fake one
(tests/integration/fake_engine.py, which registers with a real controller): it answers at once
and reports `usage` as it counts it, and its `/stats` tell whether a request reached it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.keys import KeyEntry, append_key, hash_key
from tests.integration.harness import API_KEY, MODEL_NAME, Stack

pytestmark = pytest.mark.integration

KEYS = {
    "alice": ("sk-fleet-alice-0123456789", KeyEntry(name="alice", models=[MODEL_NAME], rpm=3)),
    "bob": ("sk-fleet-bob-0123456789", KeyEntry(name="bob", models=[MODEL_NAME], tpm=100)),
    "carol": ("sk-fleet-carol-0123456789", KeyEntry(name="carol", models=["other-model"])),
    "dave": ("sk-fleet-dave-0123456789", KeyEntry(name="dave", tpm=50)),
}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def fake_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("keys")
    keys_file = workdir / "keys.yaml"
    for key, entry in KEYS.values():
        append_key(keys_file, hash_key(key), entry)
    stack = Stack(workdir=workdir, model_path=Path("unused"))
    try:
        stack.start_controller()
        stack.start_fake_engine()
        stack.start_gateway(extra=["--keys-file", str(keys_file), "--max-messages", "8"])
        stack.wait_routable(timeout=60)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def keys_file(fake_stack: Stack) -> Path:
    return fake_stack.workdir / "keys.yaml"


def call(stack: Stack, who: str | None, body: dict | bytes = CHAT,
         path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
    key = KEYS[who][0] if who in KEYS else (who or API_KEY)
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json", **headers}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{stack.gateway_url}{path}", content=content, headers=headers, timeout=30)


def engine_requests(stack: Stack) -> int:
    port = stack.worker_ports["fake"]
    return int(httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()["requests"])


def model_ids(stack: Stack, key: str) -> list[str]:
    response = httpx.get(f"{stack.gateway_url}/v1/models", timeout=5,
                         headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


def test_unknown_key_401_and_model_not_allowed_403(fake_stack: Stack) -> None:
    before = engine_requests(fake_stack)
    response = call(fake_stack, "sk-fleet-nobody")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = call(fake_stack, "carol")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_allowed"
    assert engine_requests(fake_stack) == before
    assert model_ids(fake_stack, KEYS["carol"][0]) == []
    assert model_ids(fake_stack, KEYS["alice"][0]) == [MODEL_NAME]


def test_health_shows_the_table_only_to_a_key_and_only_its_models(fake_stack: Stack) -> None:
    url = f"{fake_stack.gateway_url}/health"
    for headers in ({}, {"Authorization": "Bearer sk-fleet-nobody"}):
        response = httpx.get(url, headers=headers, timeout=5)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
    carol = httpx.get(url, headers={"Authorization": f"Bearer {KEYS['carol'][0]}"},
                      timeout=5).json()
    assert carol["models"] == [] and carol["workers"] == 0  # her model is served by nobody
    alice = httpx.get(url, headers={"Authorization": f"Bearer {KEYS['alice'][0]}"},
                      timeout=5).json()
    assert alice["models"] == [MODEL_NAME] and alice["routable_workers"] == 1


def test_plain_api_key_still_serves_every_model_without_limits(fake_stack: Stack) -> None:
    for _ in range(5):
        response = call(fake_stack, None)
        assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("fake")


def test_rpm_limit_is_429_with_retry_after_and_spares_the_engine(fake_stack: Stack) -> None:
    before = engine_requests(fake_stack)
    for _ in range(3):
        assert call(fake_stack, "alice").status_code == 200
    response = call(fake_stack, "alice")
    assert response.status_code == 429, response.text
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert engine_requests(fake_stack) == before + 3


def test_tpm_limit_counts_the_usage_of_answers(fake_stack: Stack) -> None:
    # The fake engine reports max_tokens completion tokens: 90 plus the prompt spends 100.
    first = call(fake_stack, "bob", {**CHAT, "max_tokens": 90})
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 100
    second = call(fake_stack, "bob", {**CHAT, "max_tokens": 1})
    assert second.status_code == 429 and "tokens per minute" in second.json()["error"]["message"]
    assert int(second.headers["retry-after"]) >= 1


def test_tpm_limit_counts_streams_that_did_not_ask_for_usage(fake_stack: Stack) -> None:
    with httpx.stream("POST", f"{fake_stack.gateway_url}/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEYS['dave'][0]}"},
                      json={**CHAT, "max_tokens": 60, "stream": True}) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 60
    assert call(fake_stack, "dave", {**CHAT, "max_tokens": 1}).status_code == 429


def run_fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_keys_created_or_removed_take_effect_without_a_restart(fake_stack: Stack,
                                                               keys_file: Path) -> None:
    gateway_pid = fake_stack.services["gateway"].proc.pid
    created = run_fleet("keys", "create", "--name", "erin", "--models", MODEL_NAME, "--rpm",
                        "100", "--file", str(keys_file))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    fake_stack.wait_for(lambda: call(fake_stack, key).status_code == 200,
                        "the new key to be accepted", 15)
    original = keys_file.read_text()
    keys_file.write_text("\n".join(line for line in original.splitlines()
                                   if hash_key(key) not in line) + "\n")
    fake_stack.wait_for(lambda: call(fake_stack, key).status_code == 401,
                        "the removed key to be refused", 15)
    assert call(fake_stack, "carol").status_code == 403  # the other keys stayed
    assert fake_stack.services["gateway"].proc.pid == gateway_pid


def test_a_broken_edit_keeps_the_last_good_keys(fake_stack: Stack, keys_file: Path) -> None:
    original = keys_file.read_text()
    try:
        keys_file.write_text(original + "this is: [not yaml\n")
        log = fake_stack.services["gateway"].log
        fake_stack.wait_for(lambda: "keys file not reloaded" in log.read_text(),
                            "the gateway to log the bad file", 15)
        assert call(fake_stack, "carol").status_code == 403
        assert call(fake_stack, "sk-fleet-nobody").status_code == 401
    finally:
        keys_file.write_text(original)


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[]", None),
    ({**CHAT, "max_tokens": "many"}, "max_tokens"),
    ({**CHAT, "n": 17}, "n"),
    ({**CHAT, "max_tokens": 70000}, "max_tokens"),
    ({**CHAT, "messages": CHAT["messages"] * 9}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 30000}]}, "messages"),
    ({**CHAT, "max_tokens": 2048}, "max_tokens"),
    ({**CHAT, "pad": "x" * (33 * 1024 * 1024)}, None),
])
def test_hostile_bodies_are_400_before_the_engine(fake_stack: Stack, body: dict | bytes,
                                                  param: str | None) -> None:
    before = engine_requests(fake_stack)
    response = call(fake_stack, None, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert engine_requests(fake_stack) == before


def test_a_bad_content_type_or_request_id_is_400(fake_stack: Stack) -> None:
    response = call(fake_stack, None, **{"content-type": "text/plain"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "Content-Type"
    response = call(fake_stack, None, **{"x-request-id": "a b"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "X-Request-Id"
    assert httpx.get(f"{fake_stack.gateway_url}/health", timeout=5).json()["status"] == "ok"
