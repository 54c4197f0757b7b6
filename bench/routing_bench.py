"""Routing policies on a multi-turn, shared-prefix chat workload, side by side in one run.

Starts a controller, two workers (by default one CPU core each, demo model) and one router per
policy, then for each policy: resets both engines' prefix caches, runs the same conversations
through that policy's router, and reads TTFT, throughput and the engines' prefix-cache hit rate.
A policy is one of our gateway's (`cache-aware`, `round-robin`, `least-load`, ...) or
`vllm-router:POLICY`, vLLM's own Rust router (PyPI vllm-router) over the same two engines.

Workload: G groups of conversations; each group shares a long system prompt, each conversation
has T turns, and every turn resends the whole history (as chat clients do).

    .venv/bin/python bench/routing_bench.py          # ours cache-aware, vLLM's router, round-robin
    .venv/bin/python bench/routing_bench.py --policies cache-aware,round-robin,least-load
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import peer_python  # noqa: E402
from tests.integration.harness import API_KEY, MODEL_NAME, Service, Stack, free_port  # noqa: E402

# One engine key for both workers, so vLLM's router (one --api-key) can reach both engines.
ENGINE_KEY = "routing-bench-engine-key"

WORDS = ("river mountain engine lantern copper violet harbor meadow signal orbit canyon "
         "ember glacier thimble falcon quartz saddle willow marble cobalt").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def conversations(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    systems = [f"You are assistant number {g}. Rules: " + _text(rng, args.system_words)
               for g in range(args.groups)]
    return [
        {"system": systems[c % args.groups],
         "turns": [f"Question {t} of conversation {c}: {_text(rng, 12)}?"
                   for t in range(args.turns)]}
        for c in range(args.conversations)
    ]


async def _turn(http: httpx.AsyncClient, url: str, key: str, model: str,
                messages: list[dict[str, str]], max_tokens: int) -> tuple[float, str, int]:
    started = time.monotonic()
    ttft, text, tokens = 0.0, [], 0
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft or time.monotonic() - started
                    text.append(piece)
    return ttft, "".join(text), tokens


async def run_policy(url: str, key: str, convs: list[dict[str, Any]], args: argparse.Namespace
                     ) -> dict[str, Any]:
    limit = asyncio.Semaphore(args.concurrency)
    ttfts: list[float] = []
    tokens = 0
    errors = 0

    async def conversation(conv: dict[str, Any]) -> None:
        nonlocal tokens, errors
        history = [{"role": "system", "content": conv["system"]}]
        for question in conv["turns"]:
            history.append({"role": "user", "content": question})
            async with limit:
                try:
                    ttft, answer, n = await _turn(http, url, key, args.model_name, history,
                                                  args.max_tokens)
                except httpx.HTTPError:
                    errors += 1
                    return
            ttfts.append(ttft)
            tokens += n
            history.append({"role": "assistant", "content": answer})

    async with httpx.AsyncClient(timeout=600) as http:
        started = time.monotonic()
        await asyncio.gather(*(conversation(c) for c in convs))
        wall = time.monotonic() - started
    ttfts.sort()
    return {
        "requests": len(ttfts), "errors": errors, "wall_s": wall,
        "req_per_s": len(ttfts) / wall, "output_tok_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
    }


def prefix_counters(stack: Stack) -> tuple[float, float]:
    hits = queries = 0.0
    for worker in stack.workers():
        text = httpx.get(f"{worker['engine_url'].rstrip('/')}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def reset_caches(stack: Stack) -> None:
    for worker in stack.workers():
        # The engine answers it only with its key (worker/engine_auth.py).
        httpx.post(f"{worker['engine_url'].rstrip('/')}/reset_prefix_cache", timeout=30,
                   headers={"Authorization": f"Bearer {ENGINE_KEY}"}).raise_for_status()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="cache-aware,vllm-router:cache_aware,round-robin",
                   help="ours by name (NAME@SETTING=VALUE@... sets gateway settings, e.g. "
                   "cache-aware@balance_abs=32), or vllm-router:POLICY for vLLM's router")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-words", type=int, default=700)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="model folder (default: the demo model)")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--devices", default="cpus=0,cpus=1",
                   help="one worker per entry: cpus=N or gpus=N (gpus=0,gpus=0 shares a GPU)")
    p.add_argument("--worker-args", default="--enforce-eager --max-model-len 4096",
                   help="engine flags for every worker")
    p.add_argument("--kv-blocks", type=int, default=160,
                   help="each engine's KV-cache blocks (vLLM's --num-gpu-blocks-override; 128 "
                   "tokens each on CPU); the default fits the running requests and about half "
                   "of the prefixes. 0: the engine sizes its own cache")
    p.add_argument("--sequential-start", action="store_true",
                   help="start each worker once the one before is ready (engines that share a "
                   "GPU size their caches from the memory they find free)")
    p.add_argument("--vllm-router-python",
                   help="an interpreter with vllm-router installed (default: make a venv)")
    p.add_argument("--smoke", action="store_true", help="tiny workload: checks that it runs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    if args.smoke:
        args.groups, args.conversations, args.turns, args.system_words = 2, 4, 2, 150
    return args


def start_workers(stack: Stack, args: argparse.Namespace) -> list[str]:
    names = []
    for i, device in enumerate(args.devices.split(",")):
        kind, _, value = device.partition("=")
        name = f"w{i}"
        stack.worker_ports[name] = free_port()
        extra = shlex.split(args.worker_args)
        if args.kv_blocks:
            extra += ["--num-gpu-blocks-override", str(args.kv_blocks)]
        stack._spawn(name, [
            "-m", "worker", "--model", str(args.model), "--model-name", args.model_name,
            "--port", str(stack.worker_ports[name]), "--controller-address",
            stack.controller_url, f"--{kind}", value, "--worker-id", name, *extra,
        ], env={"FLEET_WORKER_ENGINE_API_KEY": ENGINE_KEY})
        names.append(name)
        if args.sequential_start:
            stack.wait_worker_state(name, "ready", timeout=900)
    for name in names:
        stack.wait_worker_state(name, "ready", timeout=900)
    return names


def start_router(stack: Stack, policy: str, args: argparse.Namespace) -> tuple[str, str]:
    """Start one router for `policy`; return its URL and the API key clients use with it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if policy.startswith("vllm-router:"):
        python = args.vllm_router_python or str(peer_python("vllm-router"))
        engines = [w["engine_url"].rstrip("/") for w in stack.workers()]
        log = stack.workdir / f"{policy}.log"
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                [python, "-m", "vllm_router.launch_router", "--host", "127.0.0.1",
                 "--port", str(port), "--worker-urls", *engines,
                 "--policy", policy.split(":", 1)[1], "--api-key", ENGINE_KEY,
                 "--worker-startup-check-interval", "1", "--log-level", "warning"],
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        stack.services[policy] = Service(policy, proc, log)
        # It forwards the client's Authorization header to the engines as it is.
        key = ENGINE_KEY
        stack.wait_for(lambda: httpx.get(f"{url}/v1/models", timeout=5,
                                         headers={"Authorization": f"Bearer {key}"}
                                         ).status_code == 200, policy, 120)
        return url, key
    # `cache-aware@balance_abs=32`: a gateway setting (FLEET_GATEWAY_*) for this policy's gateway.
    name, *settings = policy.split("@")
    env = {f"FLEET_GATEWAY_{k.upper()}": v
           for k, v in (item.split("=", 1) for item in settings)}
    stack._spawn(f"gw-{policy}", [
        "-m", "gateway", "--port", str(port), "--controller-address", stack.controller_url,
        "--api-keys", API_KEY, "--routing", name, "--sync-interval", "0.5"], env=env)
    workers = len(args.devices.split(","))
    auth = {"Authorization": f"Bearer {API_KEY}"}  # /health shows the table only to a key
    stack.wait_for(lambda: httpx.get(f"{url}/health", headers=auth).json()["workers"] == workers,
                   f"gateway {policy}", 30)
    return url, API_KEY


def main() -> None:
    args = _parse()
    if args.model is None:
        from fleet.demo_model import ensure_demo_model

        args.model = ensure_demo_model(progress=False)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the engines' /reset_prefix_cache
    policies = args.policies.split(",")
    stack = Stack(workdir=Path(tempfile.mkdtemp(prefix="routing-bench-")),
                  model_path=args.model)
    results: dict[str, Any] = {}
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workload": {k: str(getattr(args, k)) for k in (
            "groups", "conversations", "turns", "system_words", "max_tokens", "concurrency",
            "kv_blocks", "devices", "worker_args", "model_name")},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"routing-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    try:
        stack.start_controller()
        start_workers(stack, args)
        routers = {policy: start_router(stack, policy, args) for policy in policies}
        convs = conversations(args)
        # Warm-up (other prompts), so the first policy measured pays no first-request costs.
        warm = conversations(argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
        asyncio.run(run_policy(*routers[policies[0]], warm[:4], args))
        for policy in policies:
            reset_caches(stack)
            hits0, queries0 = prefix_counters(stack)
            result = asyncio.run(run_policy(*routers[policy], convs, args))
            hits1, queries1 = prefix_counters(stack)
            result["prefix_cache_hit_rate"] = (hits1 - hits0) / max(queries1 - queries0, 1)
            results[policy] = result
            # Written after every policy: a run cut short keeps what it measured.
            path.write_text(json.dumps(record, indent=2) + "\n")
            print(f"{policy}: {json.dumps({k: round(v, 3) for k, v in result.items()})}",
                  flush=True)
    finally:
        stack.close()
    print("\n| policy | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | prefix-cache hit rate "
          "| errors |")
    print("|---|---|---|---|---|---|---|")
    for policy, r in results.items():
        print(f"| {policy} | {r['req_per_s']:.2f} | {r['output_tok_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
              f"{r['prefix_cache_hit_rate']:.2f} | {r['errors']} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
