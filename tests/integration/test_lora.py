"""LoRA adapters across two real CPU workers (2 adapter slots each), with adapters made in the
test (tests/lora_adapters.py) that visibly change the demo model's answer.

One stack for the module: a controller with an adapters file, two workers with
`--enable-lora --max-loras 2`, the first also started with a static adapter, and a gateway
with an admin key. The tests run in file order and build on one another.
"""

from __future__ import annotations

import collections
import concurrent.futures
import random
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import API_KEY, CLUSTER_AUTH, MODEL_NAME, Stack, free_port
from tests.lora_adapters import make_adapters

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "sk-fleet-test-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = "Name the capital of France."
DYNAMIC = ["a1", "a2", "a3", "a4"]  # with the static one, more adapters than the 3 free slots
LORA = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]


class Lora:
    def __init__(self, stack: Stack, url: str, adapters: dict[str, Path]) -> None:
        self.stack, self.url, self.adapters = stack, url, adapters

    def chat(self, model: str, max_tokens: int = 8) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
            "model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPT}]})

    def answer(self, model: str) -> str:
        response = self.chat(model)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    def declare(self, name: str) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/load_lora_adapter", headers=ADMIN, timeout=10, json={
            "lora_name": name, "lora_path": str(self.adapters[name])})

    def metric(self, name: str) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith(name)}

    def start_controller(self) -> None:
        self.stack._spawn("controller", [
            "-m", "controller", "--port", str(self.stack.controller_port),
            "--heartbeat-interval", "1", "--expiry", "3",
            "--adapters-file", str(self.stack.workdir / "adapters.json")])
        self.stack.wait_for(lambda: self.stack.workers() is not None, "the controller", 30,
                            watch=["controller"])


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Lora]:
    workdir = tmp_path_factory.mktemp("lora")
    adapters = make_adapters(model_path, workdir / "adapters", ["static", *DYNAMIC])
    stack = Stack(workdir=workdir, model_path=model_path)
    port = free_port()
    try:
        env = Lora(stack, f"http://127.0.0.1:{port}", adapters)
        env.start_controller()
        stack.start_worker("w0", cpus="0", extra=[
            *LORA, "--lora-modules", f"static={adapters['static']}"])
        stack.start_worker("w1", cpus="1", extra=LORA)
        stack._spawn("gateway", [
            "-m", "gateway", "--port", str(port), "--controller-address", stack.controller_url,
            "--api-keys", API_KEY, "--admin-api-keys", ADMIN_KEY, "--sync-interval", "0.5"])
        stack.wait_worker_state("w0", "ready", timeout=300)
        stack.wait_worker_state("w1", "ready", timeout=300)
        stack.wait_routable(timeout=60, gateway_url=env.url)

        def both_routable() -> bool:
            health = httpx.get(f"{env.url}/health", headers=AUTH, timeout=5).json()
            return bool(health["routable_workers"] == 2)

        stack.wait_for(both_routable, "both workers routable", 60)
        yield env
    finally:
        stack.close()


def test_a_static_adapter_is_listed_and_routed_to_its_worker(lora: Lora) -> None:
    cards = {c["id"]: c for c in httpx.get(f"{lora.url}/v1/models", headers=AUTH,
                                           timeout=5).json()["data"]}
    assert cards["static"]["parent"] == MODEL_NAME
    base = lora.answer(MODEL_NAME)
    assert "Paris" in base
    for _ in range(3):
        response = lora.chat("static")
        assert response.status_code == 200, response.text
        assert response.headers["x-fleet-worker"] == "w0"
        assert response.json()["choices"][0]["message"]["content"] != base


def test_an_adapter_in_use_is_reported_busy_by_its_worker_until_its_requests_end(
        lora: Lora) -> None:
    """What any gateway's requests hold in the engine reaches every gateway through the
    heartbeats (vLLM's vllm:lora_requests_info): placement does not unload it."""
    def busy() -> list[str]:
        record = lora.stack.worker_record("w0")
        return list(record["load"].get("busy_adapters", [])) if record else []

    def long_answer() -> httpx.Response:  # a few seconds of decoding on one core
        return httpx.post(f"{lora.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
            "model": "static", "max_tokens": 256, "ignore_eos": True,
            "messages": [{"role": "user", "content": PROMPT}]})

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(long_answer)
        lora.stack.wait_for(lambda: "static" in busy() or running.done(),
                            "w0 to report the static adapter busy", 60)
        assert "static" in busy(), "the request ended before a heartbeat saw it"
        assert running.result().status_code == 200
    lora.stack.wait_for(lambda: busy() == [], "w0 to report no adapter busy", 30)


def test_an_unknown_adapter_is_404(lora: Lora) -> None:
    response = lora.chat("no-such-adapter")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_a_declared_adapter_loads_on_first_use_and_answers_as_itself(lora: Lora) -> None:
    assert lora.declare("a1").status_code == 200
    assert httpx.post(f"{lora.url}/v1/load_lora_adapter", headers=AUTH, timeout=10, json={
        "lora_name": "a2", "lora_path": str(lora.adapters["a2"])}).status_code == 403
    cards = {c["id"]: c for c in httpx.get(f"{lora.url}/v1/models", headers=AUTH,
                                           timeout=5).json()["data"]}
    assert cards["a1"]["parent"] == MODEL_NAME
    first = lora.answer("a1")
    assert lora.metric("fleet_gateway_adapter_loads_total") == {
        'fleet_gateway_adapter_loads_total{adapter="a1",reason="first_use"}': 1.0}
    assert first == lora.answer("a1")  # served as loaded: no second load
    assert first not in (lora.answer(MODEL_NAME), lora.answer("static"))
    assert sum(lora.metric("fleet_gateway_adapter_loads_total").values()) == 1.0
    # One copy, so every request goes to the worker that holds it.
    assert len({lora.chat("a1").headers["x-fleet-worker"] for _ in range(3)}) == 1


def _engine_loads(stack: Stack) -> collections.Counter[tuple[str, str]]:
    """Adapters each engine loaded at run time, from its own log (not the static one)."""
    loads: collections.Counter[tuple[str, str]] = collections.Counter()
    for wid in ("w0", "w1"):
        text = (stack.workdir / f"{wid}.log").read_text(errors="replace")
        for name in re.findall(r"Loaded new LoRA adapter: name '([^']+)'", text):
            if name != "static":
                loads[(wid, name)] += 1
        assert "has already been loaded" not in text, f"{wid} was asked to load twice"
    return loads


def test_mixed_traffic_over_more_adapters_than_slots_fails_nothing(lora: Lora) -> None:
    for name in DYNAMIC[1:]:
        assert lora.declare(name).status_code == 200
    answers = {name: lora.answer(name) for name in DYNAMIC}  # one at a time: slots turn over
    assert len(set(answers.values())) == len(DYNAMIC), answers  # each adapter its own
    rng = random.Random(7)
    models = [rng.choice([*DYNAMIC, "static", MODEL_NAME]) for _ in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda m: lora.chat(m, max_tokens=4), models))
    failed = [(m, r.status_code, r.text[:200]) for m, r in zip(models, responses, strict=True)
              if r.status_code != 200]
    assert not failed
    gateway_loads = sum(lora.metric("fleet_gateway_adapter_loads_total").values())
    engine_loads = _engine_loads(lora.stack)
    # Every load the gateway counts is one the engines did, and no more.
    assert sum(engine_loads.values()) == gateway_loads >= len(DYNAMIC)
    evictions = sum(v for k, v in lora.metric("fleet_gateway_adapter_unloads_total").items()
                    if 'reason="evict"' in k)
    assert evictions >= 1  # 4 adapters, 3 free slots


def test_the_catalogue_survives_a_controller_and_a_gateway_restart(lora: Lora) -> None:
    lora.stack.stop("controller")
    lora.start_controller()

    def declared_again() -> bool:
        snapshot = httpx.get(f"{lora.stack.controller_url}/snapshot", timeout=5,
                             headers=CLUSTER_AUTH).json()
        return {a["name"] for a in snapshot["adapters"]} == set(DYNAMIC)

    lora.stack.wait_for(declared_again, "the catalogue back", 30)
    # A gateway keeps no catalogue of its own: a new one reads it from the controller.
    lora.stack.stop("gateway")
    lora.stack._spawn("gateway", [
        "-m", "gateway", "--port", lora.url.rsplit(":", 1)[1], "--controller-address",
        lora.stack.controller_url, "--api-keys", API_KEY, "--admin-api-keys", ADMIN_KEY,
        "--sync-interval", "0.5"])

    def listed() -> bool:
        cards = httpx.get(f"{lora.url}/v1/models", headers=AUTH, timeout=5).json()["data"]
        return set(DYNAMIC) <= {c["id"] for c in cards}

    lora.stack.wait_for(listed, "the restarted gateway to list the adapters", 30)
    assert httpx.post(f"{lora.url}/v1/unload_lora_adapter", headers=ADMIN, timeout=10,
                      json={"lora_name": "a4"}).status_code == 200
    lora.stack.wait_for(lambda: lora.chat("a4").status_code == 404, "a4 gone", 30)
    assert lora.chat("a1").status_code == 200
