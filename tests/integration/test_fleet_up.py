"""`fleet up` (what `make run` calls): the whole stack comes up with the demo fleet, serves both
models, its engines answer nothing but health and metrics without their keys, and Ctrl-C stops
it all."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.engine_doors import knock_all
from tests.integration.fleet_up import FleetUp
from tests.integration.harness import MODEL_NAME

pytestmark = pytest.mark.integration

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def test_fleet_up_serves_the_demo_fleet_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, model_path: Path
) -> None:
    # No --model and no --fleet: the demo fleet, as `make run` starts it. Unknown flags reach
    # every engine: 256 tokens fit both models (vLLM takes the embedding model's limit, 256,
    # from its sentence-transformers config).
    up = FleetUp(tmp_path, ["--api-keys", "k1,k2", "--max-model-len", "256"])
    gateway_port, webui_port, token_file = up.gateway_port, up.webui_port, up.token_file
    try:
        up.start_and_wait(timeout=300)
        assert up.proc is not None
        text = up.text()
        assert f"http://127.0.0.1:{gateway_port}/v1" in text
        assert f"web UI:      http://127.0.0.1:{webui_port}" in text
        assert f"'{MODEL_NAME}' on 1 worker(s), '{EMBEDDING_MODEL}' on 1 worker(s)" in text
        assert httpx.get(f"http://127.0.0.1:{webui_port}/health", timeout=10).is_success
        started = psutil.Process(up.proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for part in ("-m controller", "-m worker", "-m gateway", "-m webui",
                     "vllm.entrypoints.openai"):
            assert part in names
        # The generated token: readable by this user only, handed to the services in their
        # environment, on no command line, and the controller wants it.
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in names
        services = 0
        for process in started:
            argv = process.cmdline()
            module = argv[argv.index("-m") + 1] if "-m" in argv else ""
            if module in ("controller", "worker", "gateway"):
                assert process.environ()["FLEET_CLUSTER_TOKEN"] == token
                services += 1
        assert services == 4  # controller, a worker per model, gateway
        controller = f"{up.controller_url}/workers"
        assert httpx.get(controller, timeout=10).status_code == 401
        listed = httpx.get(controller, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        workers = listed.json()["workers"]
        assert [w["state"] for w in workers] == ["ready", "ready"]
        assert sorted(w["model_names"][0] for w in workers) == sorted([MODEL_NAME,
                                                                       EMBEDDING_MODEL])
        assert f"cluster token: {token_file}" in text
        # Issue 20: each engine answers only /health and /metrics without its key, on every door
        # its spec lists and the undocumented ones (tests/integration/engine_doors.py).
        for worker in workers:
            found, wrong = knock_all(worker["engine_url"].rstrip("/"), worker["engine_api_key"])
            assert wrong == [], f"{worker['model_names']}: {len(wrong)} of {len(found)}: {wrong}"
        # The unknown flag reached the engine.
        models = httpx.get(f"http://127.0.0.1:{gateway_port}/v1/models",
                           headers={"Authorization": "Bearer k2"}, timeout=10).json()
        by_id = {m["id"]: m for m in models["data"]}
        assert set(by_id) == {MODEL_NAME, EMBEDDING_MODEL}
        assert by_id[MODEL_NAME]["max_model_len"] == 256
        reply = httpx.post(
            f"http://127.0.0.1:{gateway_port}/v1/chat/completions", timeout=60,
            headers={"Authorization": "Bearer k1"},
            json={"model": MODEL_NAME, "temperature": 0, "max_tokens": 20,
                  "messages": [{"role": "user", "content": "Name the capital of France."}]},
        )
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        # The embedding model's engine embeds (asked directly, with the key the controller
        # hands gateways).
        (embedder,) = [w for w in workers if w["model_names"] == [EMBEDDING_MODEL]]
        embedded = httpx.post(
            f"{embedder['engine_url'].rstrip('/')}/v1/embeddings", timeout=60,
            headers={"Authorization": f"Bearer {embedder['engine_api_key']}"},
            json={"model": EMBEDDING_MODEL, "input": ["The capital of France", "Paris"]})
        assert embedded.status_code == 200, embedded.text
        vectors = [item["embedding"] for item in embedded.json()["data"]]
        assert [len(v) for v in vectors] == [384, 384]
        # And through the gateway, which routes the endpoint to the model's worker.
        via_gateway = httpx.post(
            f"http://127.0.0.1:{gateway_port}/v1/embeddings", timeout=60,
            headers={"Authorization": "Bearer k1"},
            json={"model": EMBEDDING_MODEL, "input": "Paris"})
        assert via_gateway.status_code == 200, via_gateway.text
        assert len(via_gateway.json()["data"][0]["embedding"]) == 384
    finally:
        # Ctrl-C; stop() also checks that nothing it started is left behind.
        code = up.stop()
    assert code == 0, up.tail()
