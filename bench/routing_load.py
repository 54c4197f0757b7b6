"""The routing bench's load: multi-turn, shared-prefix conversations, and the closed- and
open-loop clients that send them through one or more routers (bench/routing_bench.py).

Workload: G groups of conversations; each group shares a long system prompt, each conversation
has T turns, and every turn resends the whole history (as chat clients do).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import time
from typing import Any

import httpx

WORDS = ("river mountain engine lantern copper violet harbor meadow signal orbit canyon "
         "ember glacier thimble falcon quartz saddle willow marble cobalt").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def conversations(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    systems = [f"You are assistant number {g}. Rules: " + _text(rng, args.system_words)
               for g in range(args.groups)]
    return [
        {"system": systems[c % args.groups], "name": f"g{c % args.groups}-c{c}",
         "turns": [f"Question {t} of conversation {c}: {_text(rng, 12)}?"
                   for t in range(args.turns)]}
        for c in range(args.conversations)
    ]


def retake(conv: dict[str, Any], again: int) -> dict[str, Any]:
    """The conversation taken again for the `again`-th time (0: as it is): the same system
    prompt, questions of its own, and a name of its own for the request ids."""
    if not again:
        return conv
    return {**conv, "name": f"{conv['name']}-a{again}",
            "turns": [f"{q} (take {again})" for q in conv["turns"]]}


async def _turn(http: httpx.AsyncClient, url: str, key: str, model: str,
                messages: list[dict[str, str]], max_tokens: int,
                request_id: str) -> tuple[float, str, int]:
    started = time.monotonic()
    ttft, text, tokens = 0.0, [], 0
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}",
                                    "X-Request-Id": request_id}) as response:
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


class Clients:
    """The client side: one HTTP client, and the next router URL for each request."""

    def __init__(self, urls: list[str], key: str) -> None:
        self.urls, self.key = urls, key
        self._next = 0

    def url(self) -> str:
        self._next += 1
        return self.urls[self._next % len(self.urls)]


async def _conversation(http: httpx.AsyncClient, clients: Clients, conv: dict[str, Any],
                        args: argparse.Namespace, limit: asyncio.Semaphore | None,
                        out: list[dict[str, float]]) -> int:
    """The turns of one conversation, one after the other; the errors it met."""
    history = [{"role": "system", "content": conv["system"]}]
    run = os.urandom(3).hex()  # the gateways' logs name each turn: group, conversation, turn
    for t, question in enumerate(conv["turns"]):
        history.append({"role": "user", "content": question})
        request_id = f"{conv['name']}-t{t}-{run}"
        sent = time.monotonic()
        try:
            if limit is None:
                ttft, answer, n = await _turn(http, clients.url(), clients.key,
                                              args.model_name, history, args.max_tokens,
                                              request_id)
            else:
                async with limit:
                    sent = time.monotonic()
                    ttft, answer, n = await _turn(http, clients.url(), clients.key,
                                                  args.model_name, history, args.max_tokens,
                                                  request_id)
        except httpx.HTTPError:
            return 1
        out.append({"sent": sent, "ttft": ttft, "tokens": n})
        history.append({"role": "assistant", "content": answer})
    return 0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def _ttfts(turns: list[dict[str, float]]) -> dict[str, float]:
    ttfts = [t["ttft"] for t in turns]
    return {f"ttft_{name}_ms": 1000 * _quantile(ttfts, q)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


async def closed_loop(clients: Clients, convs: list[dict[str, Any]],
                      args: argparse.Namespace) -> dict[str, Any]:
    limit = asyncio.Semaphore(args.concurrency)
    turns: list[dict[str, float]] = []
    async with httpx.AsyncClient(timeout=600) as http:
        started = time.monotonic()
        errors = sum(await asyncio.gather(
            *(_conversation(http, clients, c, args, limit, turns) for c in convs)))
        wall = time.monotonic() - started
    tokens = sum(t["tokens"] for t in turns)
    return {"requests": len(turns), "errors": errors, "wall_s": wall,
            "req_per_s": len(turns) / wall, "output_tok_per_s": tokens / wall, **_ttfts(turns)}


async def open_loop(clients: Clients, convs: list[dict[str, Any]], args: argparse.Namespace,
                    rate: float, seed: int) -> dict[str, Any]:
    """Conversations start at Poisson times (rate / turns a second, so requests come at about
    `rate`) for `args.duration` seconds; the steady state is what was sent after the warm-up."""
    rng = random.Random(seed)
    turns: list[dict[str, float]] = []
    tasks = []
    async with httpx.AsyncClient(timeout=600) as http:
        started = time.monotonic()
        at = 0.0  # the first arrives at once
        for n in itertools.count():
            conv = retake(convs[n % len(convs)], n // len(convs))
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            tasks.append(asyncio.create_task(
                _conversation(http, clients, conv, args, None, turns)))
            at += rng.expovariate(rate / args.turns)
            if at >= args.duration:
                break
        errors = sum(await asyncio.gather(*tasks))
        wall = time.monotonic() - started
    steady = [t for t in turns if args.warmup <= t["sent"] - started < args.duration]
    return {"rate": rate, "requests": len(turns), "steady_requests": len(steady),
            "errors": errors, "wall_s": wall, **_ttfts(steady)}
