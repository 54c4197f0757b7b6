"""`fleet up` (what `make run` calls): the whole stack comes up, serves, and Ctrl-C stops it all."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.fleet_up import FleetUp
from tests.integration.harness import MODEL_NAME

pytestmark = pytest.mark.integration


def test_fleet_up_serves_the_demo_model_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, model_path: Path
) -> None:
    up = FleetUp(tmp_path, ["--api-keys", "k1,k2", "--max-model-len", "2048"])
    gateway_port, webui_port, token_file = up.gateway_port, up.webui_port, up.token_file
    try:
        up.start_and_wait(timeout=300)
        assert up.proc is not None
        text = up.text()
        assert f"http://127.0.0.1:{gateway_port}/v1" in text
        assert f"web UI:      http://127.0.0.1:{webui_port}" in text
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
        assert services == 3
        controller = f"{up.controller_url}/workers"
        assert httpx.get(controller, timeout=10).status_code == 401
        listed = httpx.get(controller, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert [w["state"] for w in listed.json()["workers"]] == ["ready"]
        assert f"cluster token: {token_file}" in text
        # The unknown flag reached the engine.
        models = httpx.get(f"http://127.0.0.1:{gateway_port}/v1/models",
                           headers={"Authorization": "Bearer k2"}, timeout=10).json()
        assert models["data"][0]["id"] == MODEL_NAME
        assert models["data"][0]["max_model_len"] == 2048
        reply = httpx.post(
            f"http://127.0.0.1:{gateway_port}/v1/chat/completions", timeout=60,
            headers={"Authorization": "Bearer k1"},
            json={"model": MODEL_NAME, "temperature": 0, "max_tokens": 20,
                  "messages": [{"role": "user", "content": "Name the capital of France."}]},
        )
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    finally:
        # Ctrl-C; stop() also checks that nothing it started is left behind.
        code = up.stop()
    assert code == 0, up.tail()
