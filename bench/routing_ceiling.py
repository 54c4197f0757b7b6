"""The most of the prefix cache any router can find on the routing bench's loads, and what
round-robin finds: computed from the workload, no engine run.

bench/routing_bench.py measures each policy's hit rate on real engines. How much better a
router could do than round-robin on a load shape is bounded by the workload itself: a block of
a prompt (vLLM's full blocks of `--block-size` tokens, each keyed by everything before it) is
computed at least once in a run, so the best any placement can reach is one computation per
distinct block (perfect placement with caches that keep everything). Round-robin computes each
distinct block once on every engine that gets a request holding it. Both are counted here with
caches that never evict, so round-robin's figure is an upper bound for it too (on shapes whose
prefixes fit the caches it is what the engines measure), and every request's answer is taken as
text the cache has not seen (its generated tokens are not counted as cached for the next turn):
the ceiling is thus a little low where the engines do reuse an answer's blocks.

    .venv/bin/python bench/routing_ceiling.py   # the GPU run's workload (bench/gpu.sh routing)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.routing_bench import SHAPES, shaped  # noqa: E402
from bench.routing_load import WORDS, conversations  # noqa: E402


def prompts(convs: list[dict[str, Any]], answer_words: int, seed: int) -> list[list[str]]:
    """Each conversation's requests as message lists, one per turn (the history resent)."""
    rng = random.Random(seed)
    out = []
    for conv in convs:
        history = [{"role": "system", "content": conv["system"]}]
        turns = []
        for question in conv["turns"]:
            history.append({"role": "user", "content": question})
            turns.append([dict(m) for m in history])
            answer = " ".join(rng.choice(WORDS) for _ in range(answer_words))
            history.append({"role": "assistant", "content": answer})
        out.append(turns)
    return out


def blocks(ids: list[int], size: int) -> list[tuple[int, ...]]:
    """The keys of a prompt's full blocks: each the whole prefix up to its end."""
    return [tuple(ids[:end]) for end in range(size, len(ids) + 1, size)]


def hit_rates(requests: list[list[list[int]]], size: int, engines: int,
              seed: int) -> dict[str, float]:
    """`requests`: per conversation, its turns' token ids, in the order sent. Best: each
    distinct block computed once, every later use a hit. Round-robin: once on each engine that
    a request holding it went to (each request to an engine at random, as round-robin from
    several routers under concurrency sends a conversation's turns)."""
    rng = random.Random(seed)
    held: list[set[tuple[int, ...]]] = [set() for _ in range(engines + 1)]
    queried = best = rr = 0
    for conv in requests:
        for ids in conv:
            queried += len(ids)
            engine = held[1 + rng.randrange(engines)]
            for key in blocks(ids, size):
                best += size if key in held[0] else 0
                rr += size if key in engine else 0
                held[0].add(key)
                engine.add(key)
    return {"queried_tokens": queried, "best": best / queried, "round_robin": rr / queried}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a folder with the tokenizer (default: the demo "
                   "model's, which the GPU runs' 8B shape uses too)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--conversations", type=int, default=96)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-words", type=int, default=1800)
    p.add_argument("--max-tokens", type=int, default=32, help="words of each answer")
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny workload: checks that it runs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="gpu-load")
    args = p.parse_args()
    if args.smoke:
        args.groups, args.conversations, args.turns, args.system_words = 2, 4, 2, 150
    if args.model is None:
        from fleet.demo_model import ensure_demo_model

        args.model = ensure_demo_model(progress=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "shapes": {}}
    print("| shape | tokens queried | best any router | round-robin | headroom |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        load = shaped(args, shape)
        requests = [[list(tokenizer.apply_chat_template(m, add_generation_prompt=True,
                                                        tokenize=True, return_dict=False))
                     for m in conv] for conv in prompts(conversations(load), args.max_tokens,
                                                        args.seed)]
        rates = hit_rates(requests, args.block_size, args.engines, args.seed)
        record["shapes"][shape] = rates
        print(f"| {shape} | {rates['queried_tokens']:,} | {rates['best']:.3f} | "
              f"{rates['round_robin']:.3f} | {rates['best'] - rates['round_robin']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"routing-ceiling-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
