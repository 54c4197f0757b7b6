"""The gateway's CPU per request for looking a prompt up in the engines' own caches: render the
chat template, tokenise, key the blocks, match them against each worker's view.

Prompts are chats with a system prompt of about --tokens tokens, in two loads: `fresh`, a new
system prompt every request (nothing cached helps: the worst case), and `shared`, system prompts
drawn from --systems (a shared-prefix load, where the tokenizer's cache of pieces between special
tokens pays). The views hold --view-blocks keys each. CPU time is the thread's own
(`time.thread_time`), per request, over --requests requests after a warm-up.

    .venv/bin/python bench/tokenize_bench.py                      # demo model, 4,000 tokens
    .venv/bin/python bench/tokenize_bench.py --tokenizer MODEL_DIR --block-size 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetcore.kv_blocks import chain_keys  # noqa: E402
from gateway.kv_view import KvView  # noqa: E402
from gateway.prompt_tokens import PromptTokenizer  # noqa: E402
from gateway.protocol import ChatCompletionRequest  # noqa: E402
from worker.protocol import KvCacheChanges  # noqa: E402
from worker.tokenizer_files import read_tokenizer_files  # noqa: E402

WORDS = ("river mountain engine lantern copper violet harbor meadow signal orbit canyon "
         "ember glacier thimble falcon quartz saddle willow marble cobalt").split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, help="model folder (default: the demo model)")
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--block-size", type=int, default=16, help="16 on GPU engines, 128 on CPU")
    p.add_argument("--workers", type=int, default=2, help="views matched per request")
    p.add_argument("--view-blocks", type=int, default=10_000)
    p.add_argument("--systems", type=int, default=16, help="system prompts of the shared load")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.tokens = 5, 500
    if args.tokenizer is None:
        from fleet.demo_model import ensure_demo_model

        args.tokenizer = ensure_demo_model(progress=False)
    files = read_tokenizer_files(args.tokenizer, None)
    assert files is not None, f"{args.tokenizer} has no tokenizer.json"
    started = time.perf_counter()
    tokenizer = PromptTokenizer(files)
    load_s = time.perf_counter() - started
    rng = random.Random(0)
    # About 1.16 tokens per word of these words with the demo model's tokenizer; the record
    # has the measured mean.
    words = int(args.tokens / 1.16)

    pool = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(args.systems)]

    def request(shared: bool) -> ChatCompletionRequest:
        system = rng.choice(pool) if shared else " ".join(rng.choice(WORDS) for _ in range(words))
        return ChatCompletionRequest(model="m", messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": "Question: " + " ".join(rng.sample(WORDS, 8))}])

    views = []
    for w in range(args.workers):
        view = KvView()
        keys = [rng.getrandbits(64) for _ in range(args.view_blocks)]
        view.apply(KvCacheChanges(epoch=f"e{w}", seq=1, block_size=args.block_size,
                                  reset=True, added=keys))
        views.append(view)
    loads: dict[str, Any] = {}
    lengths = []
    for load in ("fresh", "shared"):
        phases: dict[str, list[float]] = {"tokenise_ms": [], "keys_ms": [], "match_ms": [],
                                          "total_ms": []}
        for n in range(args.requests + 5):
            chat = request(load == "shared")
            t0 = time.thread_time()
            ids = chat.prompt_ids(tokenizer)
            t1 = time.thread_time()
            assert ids is not None
            keys = chain_keys(ids, args.block_size)
            t2 = time.thread_time()
            for view in views:
                view.match(keys)
            t3 = time.thread_time()
            if n < 5:
                continue  # warm-up
            lengths.append(len(ids))
            for name, value in (("tokenise_ms", t1 - t0), ("keys_ms", t2 - t1),
                                ("match_ms", t3 - t2), ("total_ms", t3 - t0)):
                phases[name].append(1000 * value)
        loads[load] = {
            name: {"p50": statistics.median(v), "p90": percentile(v, 0.9),
                   "p99": percentile(v, 0.99), "mean": statistics.fmean(v)}
            for name, v in phases.items()}
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tokenizer": str(args.tokenizer), "tokenizer_load_s": load_s,
        "prompt_tokens_mean": statistics.fmean(lengths), "requests": len(lengths),
        "block_size": args.block_size, "workers": args.workers, "view_blocks": args.view_blocks,
        "cpu_ms_per_request": loads,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tokenize-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"prompt tokens {record['prompt_tokens_mean']:.0f}, tokenizer load {load_s:.2f}s")
    print("| load | phase | p50 ms | p90 ms | p99 ms | mean ms |")
    print("|---|---|---|---|---|---|")
    for load, summary in loads.items():
        for name, q in summary.items():
            print(f"| {load} | {name} | {q['p50']:.2f} | {q['p90']:.2f} | {q['p99']:.2f} | "
                  f"{q['mean']:.2f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
