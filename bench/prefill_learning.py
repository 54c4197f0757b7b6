"""What a worker learns of its engine's prefill speed from cold prompts, and from cached ones.

Through a running gateway, bursts of chat requests to one model, alternately `cold` (every
prompt new: long prefills) and `cached` (one prefix, sent once alone first, then each request
adds a few words: short prefills). After each burst, the prefill speed and work per request
that every worker of the model reports (its `load` on the controller's /workers), read a few
heartbeats later. The cache-aware policy drains its own backlog at that speed
(gateway/placement.py), so a speed that depends on the run before changes the placement of
the next.

    .venv/bin/python bench/prefill_learning.py --gateway-url http://127.0.0.1:8000 \\
        --controller-url http://127.0.0.1:21001 --cluster-token-file ~/.cache/fleet/cluster-token
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

WORDS = ("river mountain engine lantern copper violet harbor meadow signal orbit canyon "
         "ember glacier thimble falcon quartz saddle willow marble cobalt").split()


async def burst(args: argparse.Namespace, prompts: list[str], concurrency: int) -> float:
    """Seconds to answer `prompts`, `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600, headers=headers) as http:
        async def one(prompt: str) -> None:
            async with limit:
                answer = await http.post(f"{args.gateway_url}/v1/chat/completions", json={
                    "model": args.model, "max_tokens": 4,
                    "messages": [{"role": "user", "content": prompt}]})
                answer.raise_for_status()

        await asyncio.gather(*(one(p) for p in prompts))
    return time.monotonic() - started


def learned(args: argparse.Namespace) -> dict[str, list[float | None]]:
    """Each worker of the model: [prefill tokens/s, prefill tokens per request]."""
    workers = httpx.get(f"{args.controller_url}/workers", timeout=10, headers={
        "Authorization": f"Bearer {args.cluster_token}"}).json()["workers"]
    return {w["worker_id"]: [w["load"].get("prefill_tokens_per_s"),
                             w["load"].get("prefill_tokens_per_request")]
            for w in workers if args.model in w.get("model_names", [])}


def settled(args: argparse.Namespace) -> dict[str, list[float | None]]:
    """What the workers report once their next heartbeats have carried the burst's counters."""
    before, deadline = learned(args), time.monotonic() + args.settle
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = learned(args)
        if now != before:
            before, deadline = now, time.monotonic() + args.settle  # still moving: wait on
    return before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway-url", default="http://127.0.0.1:8000")
    p.add_argument("--controller-url", default="http://127.0.0.1:21001")
    p.add_argument("--cluster-token-file", type=Path,
                   default=Path.home() / ".cache/fleet/cluster-token")
    p.add_argument("--api-key", default=os.environ.get("FLEET_API_KEY", ""))
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--words", type=int, default=1200, help="words of each new prompt or prefix")
    p.add_argument("--requests", type=int, default=12, help="requests a burst")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="cold then cached, this many times")
    p.add_argument("--settle", type=float, default=2.5,
                   help="seconds the reports must stay the same after a burst")
    p.add_argument("--smoke", action="store_true", help="tiny run: checks that it works")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    if args.smoke:
        args.words, args.requests, args.concurrency, args.rounds = 150, 2, 2, 1
    args.cluster_token = os.environ.get("FLEET_CLUSTER_TOKEN") or \
        args.cluster_token_file.read_text().strip()
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
