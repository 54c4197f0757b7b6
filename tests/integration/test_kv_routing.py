"""The engine's own cache, as a gateway sees it: a real worker with KV events on (its default),
one prompt sent through the stack, then the gateway's view of that worker holds the prompt's
blocks, tokenised by the gateway as the engine did, and the same prefix routes there."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import openai
import pytest

from controller.protocol import WorkerRecord
from gateway.kv_view import KvSync, KvViews
from gateway.protocol import ChatCompletionRequest
from gateway.routing import CacheAware, RouteRequest
from tests.integration.harness import API_KEY, MODEL_NAME, Stack, free_port
from worker.load import FINISHED_COMPUTED

pytestmark = pytest.mark.integration

SYSTEM = ("You are the archivist of a lighthouse museum. Rules: " +
          " ".join(f"rule {i} says keep the lantern {i % 7} polished." for i in range(60)))


def chat(question: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=MODEL_NAME, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def test_the_gateway_sees_the_engines_cache_and_routes_the_prefix_there(
        stack: Stack, client: openai.OpenAI) -> None:
    record = WorkerRecord.model_validate(stack.worker_record("worker"))
    assert record.kv_cache_url is not None
    denied = httpx.get(f"{record.kv_cache_url}kv-cache", timeout=5)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"

    client.chat.completions.create(model=MODEL_NAME, max_tokens=2, temperature=0,
                                   messages=chat("Name the capital of France.").model_dump()[
                                       "messages"])
    # A second worker that publishes nothing: only the real one can hold the prefix.
    other = record.model_copy(update={"worker_id": "other", "kv_cache_url": None})

    async def main() -> tuple[str, str, str]:
        views = KvViews()
        async with aiohttp.ClientSession() as session:
            sync = KvSync(views, session)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            policy = CacheAware(views=views)
            try:
                while True:
                    sync.reconcile([record])
                    view = views.view("worker")
                    if views.tokenizer(MODEL_NAME) is not None and view and view.keys:
                        break
                    assert loop.time() < deadline, "the view never showed the engine's blocks"
                    await asyncio.sleep(0.2)
                same = chat("Which lantern is polished first?")
                hit = policy.choose(RouteRequest(model=MODEL_NAME, prompt_ids=same.prompt_ids),
                                    [other, record], {})
                fresh = chat("x")
                fresh.messages[0].content = "A different system prompt entirely. " * 80
                miss = CacheAware(views=views).choose(
                    RouteRequest(model=MODEL_NAME, prompt_ids=fresh.prompt_ids), [record], {})
                return hit.worker.worker_id, hit.reason, miss.reason
            finally:
                await sync.close()

    worker, reason, miss = asyncio.run(main())
    print(reason, miss, sep="\n")
    assert worker == "worker" and "(engine)" in reason, reason
    held = float(reason.split()[1])
    assert held >= 0.7, reason  # the whole system prompt, less the partial last block
    assert miss.startswith("holds 0.00 (engine)"), miss


def test_a_cache_aware_gateway_routes_on_the_speed_its_worker_learned(
        stack: Stack) -> None:
    """Through the processes `fleet up` starts: the worker learns its engine's prefill speed,
    the controller ships it, and the gateway's table keeps it across the load-only changes
    that every request causes (they once reset it to the assumed default)."""
    port = free_port()
    stack.start_gateway("gw-cache", port=port,
                        extra=["--routing", "cache-aware", "--log-level", "debug"])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY,
                               timeout=120, max_retries=0)
        stack.wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5,
                                          headers={"Authorization": f"Bearer {API_KEY}"}
                                          ).json().get("routable_workers") == 1,
                       "the cache-aware gateway's table", 60)
        log = stack.services["gw-cache"].log

        def reasons() -> list[str]:
            return [line.split(" reason=", 1)[1] for line in log.read_text().splitlines()
                    if " route request_id=" in line]

        def ask(n: int) -> None:
            client.chat.completions.create(
                model=MODEL_NAME, max_tokens=2, temperature=0, messages=[
                    {"role": "system", "content": f"Archive {n}. " + SYSTEM},
                    {"role": "user", "content": "Name the capital of France."}])

        sent = 0

        def learned() -> bool:
            nonlocal sent
            ask(sent)
            sent += 1
            return ", assumed" not in reasons()[-1]

        stack.wait_for(learned, "a route on the learned prefill speed", 120)
        # The speed pairs vLLM's prefill seconds with the computed tokens it observes with them
        # (worker/load.py); were the histogram renamed, the worker would fall back unseen.
        engine = stack.worker_record("worker")["engine_url"].rstrip("/")
        metrics = httpx.get(f"{engine}/metrics", timeout=10).text
        assert any(line.startswith(FINISHED_COMPUTED) for line in metrics.splitlines())

        def running(n: int) -> bool:
            record = stack.worker_record("worker")
            return record is not None and record["load"]["running"] == n

        # A load-only change each way: a long answer runs, then is dropped.
        stream = client.chat.completions.create(
            model=MODEL_NAME, max_tokens=2000, temperature=0, stream=True,
            extra_body={"ignore_eos": True}, messages=[
                {"role": "user", "content": "Name the capital of France."}])
        stack.wait_for(lambda: running(1), "the controller to see the long answer run", 60)
        stream.close()
        stack.wait_for(lambda: running(0), "the controller to see it gone", 60)
        first = len(reasons())
        for n in range(4):  # over a second: the gateway has synced the changes meanwhile
            ask(1000 + n)
        later = reasons()[first:]
        assert len(later) == 4 and not any(", assumed" in r for r in later), later
    finally:
        stack.stop("gw-cache")
