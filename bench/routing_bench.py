"""Routing policies on a multi-turn, shared-prefix chat workload, side by side in one run.

Starts a controller, two CPU workers (one core each) and one gateway per policy, then for each
policy: resets both engines' prefix caches, runs the same conversations through that policy's
gateway, and reads TTFT, throughput and the engines' prefix-cache hit rate.

Workload: G groups of conversations; each group shares a long system prompt, each conversation
has T turns, and every turn resends the whole history (as chat clients do).

    .venv/bin/python bench/routing_bench.py                   # cache-aware vs round-robin
    .venv/bin/python bench/routing_bench.py --policies cache-aware,round-robin,least-load
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import API_KEY, MODEL_NAME, Stack, free_port  # noqa: E402

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


async def _turn(http: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
                max_tokens: int) -> tuple[float, str, int]:
    started = time.monotonic()
    ttft, text, tokens = 0.0, [], 0
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {API_KEY}"}) as response:
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


async def run_policy(url: str, convs: list[dict[str, Any]], args: argparse.Namespace
                     ) -> dict[str, Any]:
    limit = asyncio.Semaphore(args.concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def conversation(conv: dict[str, Any]) -> None:
        nonlocal tokens
        history = [{"role": "system", "content": conv["system"]}]
        for question in conv["turns"]:
            history.append({"role": "user", "content": question})
            async with limit:
                ttft, answer, n = await _turn(http, url, history, args.max_tokens)
            ttfts.append(ttft)
            tokens += n
            history.append({"role": "assistant", "content": answer})

    async with httpx.AsyncClient(timeout=300) as http:
        started = time.monotonic()
        await asyncio.gather(*(conversation(c) for c in convs))
        wall = time.monotonic() - started
    ttfts.sort()
    return {
        "requests": len(ttfts), "wall_s": wall, "req_per_s": len(ttfts) / wall,
        "output_tok_per_s": tokens / wall,
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
        httpx.post(f"{worker['engine_url'].rstrip('/')}/reset_prefix_cache",
                   timeout=30).raise_for_status()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="cache-aware,round-robin")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-words", type=int, default=700)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-blocks", type=int, default=160,
                   help="each engine's KV-cache blocks of 128 tokens (vLLM's "
                   "--num-gpu-blocks-override); the default fits the running requests and "
                   "about half of the prefixes")
    p.add_argument("--smoke", action="store_true", help="tiny workload: checks that it runs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    if args.smoke:
        args.groups, args.conversations, args.turns, args.system_words = 2, 4, 2, 150
    from fleet.demo_model import ensure_demo_model

    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the engines' /reset_prefix_cache
    policies = args.policies.split(",")
    stack = Stack(workdir=Path(tempfile.mkdtemp(prefix="routing-bench-")),
                  model_path=ensure_demo_model(progress=False))
    results: dict[str, Any] = {}
    try:
        stack.start_controller()
        for i in range(2):
            stack.start_worker(f"w{i}", cpus=str(i),
                               extra=["--num-gpu-blocks-override", str(args.kv_blocks)])
        for i in range(2):
            stack.wait_worker_state(f"w{i}", "ready", timeout=600)
        urls = {}
        for policy in policies:
            port = free_port()
            stack._spawn(f"gw-{policy}", [
                "-m", "gateway", "--port", str(port), "--controller-address",
                stack.controller_url, "--api-keys", API_KEY, "--routing", policy,
                "--sync-interval", "0.5"])
            urls[policy] = f"http://127.0.0.1:{port}"
            stack.wait_for(lambda u=urls[policy]: httpx.get(f"{u}/health").json()["workers"] == 2,
                           f"gateway {policy}", 30)
        convs = conversations(args)
        # Warm-up (other prompts), so the first policy measured pays no first-request costs.
        warm = conversations(argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
        asyncio.run(run_policy(urls[policies[0]], warm[:4], args))
        for policy in policies:
            reset_caches(stack)
            hits0, queries0 = prefix_counters(stack)
            result = asyncio.run(run_policy(urls[policy], convs, args))
            hits1, queries1 = prefix_counters(stack)
            result["prefix_cache_hit_rate"] = (hits1 - hits0) / max(queries1 - queries0, 1)
            results[policy] = result
            print(f"{policy}: {json.dumps({k: round(v, 3) for k, v in result.items()})}",
                  flush=True)
    finally:
        stack.close()
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workload": {k: getattr(args, k) for k in ("groups", "conversations", "turns",
                                                   "system_words", "max_tokens", "concurrency",
                                                   "kv_blocks")},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"routing-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print("\n| policy | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | prefix-cache hit rate |")
    print("|---|---|---|---|---|---|")
    for policy, r in results.items():
        print(f"| {policy} | {r['req_per_s']:.2f} | {r['output_tok_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
              f"{r['prefix_cache_hit_rate']:.2f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
