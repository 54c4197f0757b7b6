"""Which worker gets which endpoint: each goes to a worker whose engine serves its path.

The gateway is built without engines; the table is filled by hand, and the workers' engine
URLs point where nothing listens, so a request that is routed ends as a 503 after its retries.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from gateway.app import create_app
from gateway.endpoints import routed_paths, serves
from gateway.forms import form_fields
from gateway.response_ids import ResponseOwners
from gateway.routing import LeastLoad
from gateway.routing_table import RoutingTable
from gateway.settings import GatewaySettings

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT_PATHS = ["/health", "/tokenize", "/v1/chat/completions", "/v1/completions",
              "/v1/messages", "/v1/responses", "/v1/responses/{response_id}",
              "/v1/responses/{response_id}/cancel"]
EMBED_PATHS = ["/health", "/pooling", "/tokenize", "/v1/embeddings", "/v1/score"]


def worker(worker_id: str, model: str, paths: list[str] | None,
           state: WorkerState = WorkerState.READY) -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, engine_url="http://127.0.0.1:9",
                        model_names=[model], state=state, engine_paths=paths,
                        registered_at=0, last_heartbeat=0)


FLEET = [worker("chat-0", "chat", CHAT_PATHS), worker("embed-0", "embed", EMBED_PATHS),
         worker("old-0", "old", None)]


def snapshot(workers: list[WorkerRecord]) -> Snapshot:
    models = sorted({m for w in workers for m in w.model_names})
    return Snapshot(generation=1, heartbeat_interval=2, expiry=6, models=models,
                    workers=workers)


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = GatewaySettings(api_keys=[KEY], controller_address="http://127.0.0.1:9",
                               sync_interval=60, max_attempts=1)
    app = create_app(settings)
    with TestClient(app) as c:
        app.state.table.update(snapshot(FLEET))
        yield c


def test_a_worker_serves_what_its_engine_listed_and_old_workers_serve_generation() -> None:
    chat, embed, old = FLEET
    assert serves(chat, "/v1/chat/completions") and not serves(chat, "/v1/embeddings")
    assert serves(embed, "/v1/embeddings") and not serves(embed, "/v1/chat/completions")
    assert serves(old, "/v1/completions") and not serves(old, "/v1/embeddings")
    # An engine still starting has not said what it serves.
    assert serves(worker("s", "chat", None, WorkerState.STARTING), "/v1/embeddings") is None
    assert routed_paths([embed]) == ["/pooling", "/tokenize", "/v1/embeddings", "/v1/score"]


def test_the_table_refuses_an_endpoint_no_engine_of_the_model_serves() -> None:
    table = RoutingTable(LeastLoad(random.Random(0)))
    table.update(snapshot(FLEET))
    assert [w.worker_id for w in table.candidates("embed", path="/v1/embeddings")] == \
        ["embed-0"]
    with pytest.raises(Exception) as refused:
        table.candidates("embed", path="/v1/chat/completions")
    assert getattr(refused.value, "status_code", None) == 400
    assert "does not serve /v1/chat/completions" in str(refused.value)
    assert "/v1/embeddings" in str(refused.value)


def test_a_model_whose_workers_are_starting_is_a_503_not_a_400() -> None:
    table = RoutingTable(LeastLoad(random.Random(0)))
    table.update(snapshot([worker("s", "embed", None, WorkerState.STARTING)]))
    with pytest.raises(Exception) as busy:
        table.candidates("embed", path="/v1/embeddings")
    assert getattr(busy.value, "status_code", None) == 503


def test_chat_to_an_embedding_model_is_a_400_from_the_gateway(client: TestClient) -> None:
    reply = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "embed", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "unsupported_endpoint" and error["param"] == "model"
    reply = client.post("/v1/embeddings", headers=AUTH, json={"model": "chat", "input": "x"})
    assert reply.status_code == 400 and "/v1/embeddings" in reply.json()["error"]["message"]


def test_an_endpoint_its_model_serves_is_routed_to_its_worker(client: TestClient) -> None:
    # Routed: the worker's engine is not there, so after the one attempt it is a 503.
    reply = client.post("/v1/embeddings", headers=AUTH, json={"model": "embed", "input": "x"})
    assert reply.status_code == 503, reply.text
    assert "embed-0" in reply.json()["error"]["message"]
    assert client.post("/v1/embeddings", headers=AUTH,
                       json={"model": "nope", "input": "x"}).status_code == 404


def test_messages_errors_are_anthropic_shaped_and_take_x_api_key(client: TestClient) -> None:
    body = {"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    reply = client.post("/v1/messages", json=body)
    assert reply.status_code == 401
    assert reply.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": reply.json()["error"]["message"]}}
    reply = client.post("/v1/messages", json={**body, "model": "embed"},
                        headers={"x-api-key": KEY})
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_model_cards_say_what_each_model_serves(client: TestClient) -> None:
    cards = {c["id"]: c for c in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert "/v1/embeddings" in cards["embed"]["endpoints"]
    assert "/v1/chat/completions" not in cards["embed"]["endpoints"]
    assert cards["old"]["endpoints"] == ["/v1/chat/completions", "/v1/completions"]
    assert cards["chat"]["root"] == "chat" and cards["chat"]["parent"] is None
    card = client.get("/v1/models/embed", headers=AUTH).json()
    # (`created` is the second it was asked in, which may have turned meanwhile.)
    assert {**card, "created": 0} == {**cards["embed"], "created": 0}
    assert client.get("/v1/models/nope", headers=AUTH).status_code == 404


def test_a_stored_response_goes_to_the_worker_that_made_it(client: TestClient) -> None:
    app = client.app
    assert client.get("/v1/responses/resp_unknown", headers=AUTH).status_code == 404
    owners: ResponseOwners = app.state.pipeline.responses
    caller = app.state.auth.authenticate(AUTH["Authorization"])
    owners.learn(b'{"id": "resp_abc123", "object": "response"}', "chat-0", "chat",
                 caller.key_id)
    # Another key's response is not there for this one.
    owners.learn(b'{"id": "resp_other"}', "chat-0", "chat", "another-key")
    assert client.get("/v1/responses/resp_other", headers=AUTH).status_code == 404
    reply = client.get("/v1/responses/resp_abc123", headers=AUTH)
    assert reply.status_code == 503 and "chat-0" in reply.json()["error"]["message"]
    owners.learn(b'{"id":"resp_gone"}', "left-0", "chat", caller.key_id)
    reply = client.post("/v1/responses/resp_gone/cancel", headers=AUTH)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "worker_gone"


def test_response_ids_are_learnt_from_a_body_or_a_stream_and_the_oldest_forgotten() -> None:
    owners = ResponseOwners(capacity=2)
    owners.learn(b'event: response.created\ndata: {"type":"response.created","response":'
                 b'{"id":"resp_1","object":"response"}}\n\n', "w1", "m", "k")
    owners.learn(b'{"id": "resp_2"}', "w2", "m", "k")
    owners.learn(b'{"id": "chatcmpl-x"}', "w3", "m", "k")  # not a response: nothing learnt
    first = owners.owner("resp_1", "k")
    assert first is not None and first.worker_id == "w1"
    assert owners.owner("resp_1", "other-key") is None
    owners.learn(b'{"id": "resp_3"}', "w3", "m", "k")
    assert owners.owner("resp_1", "k") is None and len(owners) == 2


def test_an_upload_is_routed_by_its_model_field() -> None:
    request = httpx.Request("POST", "http://x/", data={"model": "whisper", "language": "en"},
                            files={"file": ("a.wav", b"RIFF" + bytes(5000), "audio/wav")})
    fields = form_fields(request.read(), request.headers["content-type"])
    assert fields == {"model": "whisper", "language": "en"}


def test_an_upload_without_a_model_is_a_400(client: TestClient) -> None:
    reply = client.post("/v1/audio/transcriptions", headers=AUTH,
                        files={"file": ("a.wav", b"RIFF", "audio/wav")})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"
    reply = client.post("/v1/audio/transcriptions", headers=AUTH, json={"model": "chat"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "Content-Type"

