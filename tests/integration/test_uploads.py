"""A multipart upload (an audio transcription) goes through the gateway byte for byte.

The subject is the gateway's relay of a multipart body, so the engine is a fake one
(tests/integration/fake_engine.py) that registers `/v1/audio/transcriptions` among its paths
and answers with the digest of the body it received; the demo engines serve no speech model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.harness import API_KEY, Stack

MODEL = "fake-whisper"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("uploads"), model_path=Path("unused"))
    try:
        stack.start_controller()
        stack.start_fake_engine("audio", MODEL)
        stack.start_gateway()

        def routable() -> bool:
            data = httpx.get(f"{stack.gateway_url}/v1/models", headers=AUTH, timeout=5).json()
            return MODEL in {m["id"] for m in data["data"]}

        stack.wait_for(routable, "the gateway to route the fake model", 60)
        yield stack
    finally:
        stack.close()


def test_an_upload_reaches_the_engine_unchanged(stack: Stack) -> None:
    audio = bytes(range(256)) * 2000  # 512 KB, every byte value
    request = httpx.Request("POST", f"{stack.gateway_url}/v1/audio/transcriptions",
                            headers=AUTH, data={"model": MODEL, "language": "en"},
                            files={"file": ("speech.wav", audio, "audio/wav")})
    body = request.read()
    with httpx.Client(timeout=30) as http:
        reply = http.send(request)
    assert reply.status_code == 200, reply.text
    seen = reply.json()
    assert seen["bytes"] == len(body)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["content_type"] == request.headers["content-type"]  # the boundary with it
    assert reply.headers["x-fleet-worker"] == "audio" and reply.headers["x-request-id"]


def test_the_openai_client_transcribes_through_the_gateway(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=API_KEY, timeout=30,
                           max_retries=0)
    text = client.audio.transcriptions.create(model=MODEL,
                                              file=("a.wav", b"RIFF" + bytes(1000), "audio/wav"))
    assert text.text == "fake transcription"
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nope", file=("a.wav", b"RIFF", "audio/wav"))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="sk-wrong", timeout=30,
                      max_retries=0).audio.transcriptions.create(
            model=MODEL, file=("a.wav", b"RIFF", "audio/wav"))
