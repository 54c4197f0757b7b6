"""What a worker learns of its engine's prefill speed from cold prompts, and from cached ones.

Through a running gateway, bursts of chat requests to one model, alternately `cold` (every
prompt new: long prefills) and `cached` (one prefix, sent once alone first, then each request
adds a few words: short prefills). After each burst, the prefill speed and work per request
that every worker of the model reports (its `load` on the controller's /workers), read a few
heartbeats later. The cache-aware policy drains its own backlog at that speed
(gateway/placement.py), so a speed that depends on the run before changes the placement of
the next.

    .venv/bin/python bench/prefill_learning.py --gateway-url http://127.0.0.1:8000 \\
        --controller-url http://127.0.0.1:21001    # the cluster token: FLEET_CLUSTER_TOKEN,
                                                   # else the file `fleet up` made
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.routing_load import WORDS  # noqa: E402
from fleetcore.cluster_auth import (  # noqa: E402
    CLUSTER_TOKEN_ENV,
    bearer,
    default_token_file,
    read_token_file,
)


async def burst(args: argparse.Namespace, prompts: list[str], concurrency: int) -> float:
    """Seconds to answer `prompts`, `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600, headers=bearer(args.api_key)) as http:
        async def one(prompt: str) -> None:
            async with limit:
                answer = await http.post(f"{args.gateway_url}/v1/chat/completions", json={
                    "model": args.model, "max_tokens": 4,
                    "messages": [{"role": "user", "content": prompt}]})
                answer.raise_for_status()

        await asyncio.gather(*(one(p) for p in prompts))
    return time.monotonic() - started


def controller(args: argparse.Namespace, path: str) -> Any:
    return httpx.get(f"{args.controller_url}{path}", timeout=10,
                     headers=bearer(args.cluster_token)).json()


def learned(args: argparse.Namespace) -> dict[str, list[float | None]]:
    """Each worker of the model: [prefill tokens/s, prefill tokens per request]."""
    return {w["worker_id"]: [w["load"].get("prefill_tokens_per_s"),
                             w["load"].get("prefill_tokens_per_request")]
            for w in controller(args, "/workers")["workers"] if args.model in w["model_names"]}


def settled(args: argparse.Namespace) -> dict[str, list[float | None]]:
    """What the workers report once their heartbeats have carried the burst's counters: the
    same figures over two of their heartbeat intervals (a reading after the burst changes
    nothing more)."""
    quiet = 2 * controller(args, "/snapshot")["heartbeat_interval"]
    before, deadline = learned(args), time.monotonic() + quiet
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = learned(args)
        if now != before:
            before, deadline = now, time.monotonic() + quiet  # still moving: wait on
    return before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway-url", default="http://127.0.0.1:8000")
    p.add_argument("--controller-url", default="http://127.0.0.1:21001")
    p.add_argument("--cluster-token-file", type=Path, default=default_token_file(),
                   help=f"read when {CLUSTER_TOKEN_ENV} is not set")
    p.add_argument("--api-key", default=os.environ.get("FLEET_API_KEY", ""))
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--words", type=int, default=1200, help="words of each new prompt or prefix")
    p.add_argument("--requests", type=int, default=12, help="requests a burst")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="cold then cached, this many times")
    p.add_argument("--smoke", action="store_true", help="tiny run: checks that it works")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    if args.smoke:
        args.words, args.requests, args.concurrency, args.rounds = 150, 2, 2, 1
    args.cluster_token = os.environ.get(CLUSTER_TOKEN_ENV) or \
        read_token_file(args.cluster_token_file)
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    bursts: list[dict[str, Any]] = [{"burst": "before", "learned": learned(args)}]
    for _ in range(args.rounds):
        seconds = asyncio.run(burst(args, [text(args.words) for _ in range(args.requests)],
                                    args.concurrency))
        bursts.append({"burst": "cold", "seconds": seconds, "learned": settled(args)})
        prefix = text(args.words)
        asyncio.run(burst(args, [prefix], 1))  # now cached
        seconds = asyncio.run(burst(args, [f"{prefix} {text(20)}" for _ in range(args.requests)],
                                    args.concurrency))
        bursts.append({"burst": "cached", "seconds": seconds, "learned": settled(args)})
        print(json.dumps(bursts[-2:]), flush=True)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workload": {k: getattr(args, k) for k in ("model", "words", "requests",
                                                    "concurrency", "rounds")},
        "bursts": bursts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill-learning-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
