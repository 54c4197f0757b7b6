"""`fleet up` (what `make run` calls): the whole stack comes up, serves, and Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.harness import MODEL_NAME, Stack, free_port
from tests.integration.harness import Service as Proc

pytestmark = pytest.mark.integration


def test_fleet_up_serves_the_demo_model_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, model_path: Path
) -> None:
    controller_port, gateway_port, webui_port = free_port(), free_port(), free_port()
    log = tmp_path / "up.log"
    token_file = tmp_path / "state" / "cluster-token"
    # No token in the environment: `fleet up` makes one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_CLUSTER_TOKEN")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "up", "--controller-port", str(controller_port),
             "--gateway-port", str(gateway_port), "--webui-port", str(webui_port),
             "--api-keys", "k1,k2", "--cluster-token-file", str(token_file),
             "--max-model-len", "2048"],
            stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
        )
    up = Proc("fleet-up", proc, log)
    harness = Stack(workdir=tmp_path, model_path=model_path, services={"fleet-up": up})
    started: list[psutil.Process] = []
    try:
        harness.wait_for(lambda: "llm-fleet is up" in log.read_text(), "fleet up", 300)
        text = log.read_text()
        assert f"http://127.0.0.1:{gateway_port}/v1" in text
        assert f"web UI:      http://127.0.0.1:{webui_port}" in text
        assert httpx.get(f"http://127.0.0.1:{webui_port}/health", timeout=10).is_success
        started = psutil.Process(proc.pid).children(recursive=True)
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
        controller = f"http://127.0.0.1:{controller_port}/workers"
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
                  "messages": [{"role": "user", "content": "What is the capital of France?"}]},
        )
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    assert code == 0, up.tail()
    gone, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
