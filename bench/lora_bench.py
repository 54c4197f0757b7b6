"""LoRA placement under skewed traffic: demand placement against every adapter resident and
against loading wherever the first request lands.

Two workers (one CPU core each, demo model) serve 8 adapters made on the spot
(tests/lora_adapters.py). Requests name an adapter drawn from a Zipf law (the first adapter the
hottest), `--concurrency` at a time, each asking for exactly `--max-tokens` tokens. Every side
but resident has 2 batch slots per worker (`--max-loras 2`: at most 2 distinct adapters in one
engine step); they differ in how many adapters a worker keeps in memory.

- demand: `--max-loras 2` and nothing more: 2 adapters held per worker, the gateway's default
  placement (`--lora-placement demand`).
- naive: the same workers, `--lora-placement naive`: least-load picks a worker for each request,
  which loads the adapter if it lacks it (the baseline of "load wherever it lands").
- held (heldN, N = `--held`, default 8): demand placement on workers started with
  `--max-loras 2 --max-cpu-loras N`: still 2 adapters per engine step, but N kept in memory,
  which vLLM swaps into its 2 batch slots itself from step to step (vLLM's own production
  setting for many adapters). held-naive: the same workers with naive placement.
- held-aware: held with `--adapter-batch-aware`: an adapter's requests go first to a holder
  whose engine has a batch slot free for it, not by load alone.
- held-resident: the held workers given all 8 adapters at start (`--lora-modules`): 2 batch
  slots, nothing ever loaded; what the 2 batch slots alone cost against resident.
- resident: `--max-loras 8`, all 8 adapters given to both engines at start (`--lora-modules`):
  8 batch slots, nothing ever loaded; the upper bound.

Each worker configuration runs on workers started for it, in A-B-C-C-B-A order over the
configurations (`--repeats 2`), and the two placements on one configuration in A-B-B-A order,
all adapters unloaded between runs. Each run has its own gateway.

    .venv/bin/python bench/lora_bench.py                  # every side, twice (~15 min, 2 cores)
    .venv/bin/python bench/lora_bench.py --sides held,resident --requests 48 --repeats 1
    .venv/bin/python bench/lora_bench.py --smoke     # 3 adapters, demand and naive, once

On a GPU (bench/gpu.sh lora): `--model` a folder with no weights (bench/dummy_model.py),
`--worker-args "--load-format dummy ..."`, `--devices gpus=0,gpus=0 --sequential-start`; the
adapters are then written from the model's config (tests/lora_adapters.py). `--reverse` runs
the worker configurations in the other order, so two calls make one A-B-B-A.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import API_KEY, MODEL_NAME, Stack, free_port  # noqa: E402
from tests.lora_adapters import make_adapters, make_adapters_for_config  # noqa: E402

ENGINE_KEY = "lora-bench-engine-key-0123456789"
ADMIN_KEY = "sk-fleet-lora-bench-admin"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def zipf_sequence(names: list[str], count: int, s: float, seed: int) -> list[str]:
    weights = [1.0 / (rank + 1) ** s for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


async def run_traffic(url: str, sequence: list[str], args: argparse.Namespace
                      ) -> dict[str, Any]:
    queue = list(enumerate(sequence))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            index, adapter = queue.pop(0)
            body = {"model": adapter, "max_tokens": args.max_tokens, "ignore_eos": True,
                    "temperature": 0, "messages": [
                        {"role": "user", "content": f"Request {index}: tell me a story."}]}
            started = time.monotonic()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body,
                                           headers=AUTH)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if response.status_code != 200:
                key = str(response.status_code)
                errors[key] = errors.get(key, 0) + 1
                continue
            latencies.append(time.monotonic() - started)
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
    wall = time.monotonic() - started
    latencies.sort()
    return {"requests": len(sequence), "ok": len(latencies), "errors": errors,
            "seconds": wall, "req_per_s": len(latencies) / wall, "output_tok_per_s": tokens / wall,
            "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
            "latency_p99_s": latencies[int(len(latencies) * 0.99)] if latencies else None}


def gateway_loads(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fleet_gateway_adapter_loads_total"))


def start_workers(stack: Stack, args: argparse.Namespace, slots: int,
                  static: dict[str, Path] | None, held: int | None = None) -> None:
    extra = ["--enable-lora", "--max-loras", str(slots), "--max-lora-rank", "8"]
    if held:
        extra += ["--max-cpu-loras", str(held)]
    if static:
        extra += ["--lora-modules", *(f"{n}={p}" for n, p in static.items())]
    started = time.monotonic()
    for i, device in enumerate(args.devices.split(",")):
        name = f"w{i}"
        kind, _, value = device.partition("=")
        stack.start_worker(name, model=args.model, model_name=args.model_name,
                           cpus=value, gpus=value if kind == "gpus" else None,
                           engine_args=shlex.split(args.worker_args), extra=extra,
                           env={"FLEET_WORKER_ENGINE_API_KEY": ENGINE_KEY})
        if args.sequential_start:  # each engine sizes its cache from the memory left
            stack.wait_worker_state(name, "ready", timeout=900)
    for i in range(2):
        stack.wait_worker_state(f"w{i}", "ready", timeout=900)
    print(f"workers ready ({slots} slots) in {time.monotonic() - started:.0f} s", flush=True)


def stop_workers(stack: Stack) -> None:
    for i in range(2):
        stack.stop(f"w{i}")


def unload_all(stack: Stack, names: list[str]) -> None:
    """Every adapter out of both engines, so each run starts from nothing loaded."""
    for worker in stack.workers():
        for name in names:
            httpx.post(f"{worker['engine_url'].rstrip('/')}/v1/unload_lora_adapter",
                       json={"lora_name": name}, timeout=30,
                       headers={"Authorization": f"Bearer {ENGINE_KEY}"})

    def none_held() -> bool:
        return all(not set(w["adapters"]) & set(names) for w in stack.workers())

    stack.wait_for(none_held, "the workers to report no adapters", 30)


def start_gateway(stack: Stack, name: str, placement: str) -> str:
    port = free_port()
    # "demand-aware": demand placement, an adapter's requests first where a batch slot is free.
    extra = ["--adapter-batch-aware"] if placement == "demand-aware" else []
    stack._spawn(name, ["-m", "gateway", "--port", str(port), "--controller-address",
                        stack.controller_url, "--api-keys", API_KEY, "--admin-api-keys",
                        ADMIN_KEY, "--sync-interval", "0.5", "--lora-placement",
                        placement.removesuffix("-aware"), *extra])
    url = f"http://127.0.0.1:{port}"
    stack.wait_for(lambda: httpx.get(f"{url}/health", headers=AUTH, timeout=5
                                     ).json()["routable_workers"] == 2, name, 60)
    return url


def declare(url: str, adapters: dict[str, Path]) -> None:
    for name, path in adapters.items():
        response = httpx.post(f"{url}/v1/load_lora_adapter", timeout=10, json={
            "lora_name": name, "lora_path": str(path)},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        response.raise_for_status()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s")
    p.add_argument("--repeats", type=int, default=2, help="runs per side (A-B-B-A order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held", type=int, default=8,
                   help="adapters each worker keeps in memory for the held sides "
                        "(--max-cpu-loras; --max-loras stays 2)")
    p.add_argument("--sides", default="demand,naive,held,held-naive,resident",
                   help="comma-separated, from: demand, naive (2 slots), held, held-naive "
                        "(2 batch slots, HELD in memory), held-aware, held-resident, "
                        "resident")
    p.add_argument("--model", type=Path, default=None, help="the base model's folder "
                   "(default: the demo model)")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--devices", default="cpus=0,cpus=1",
                   help="the two workers' devices, as --cpus=X or --gpus=X")
    p.add_argument("--worker-args", default="--enforce-eager --max-model-len 4096")
    p.add_argument("--sequential-start", action="store_true",
                   help="start the second worker once the first is ready (workers sharing a "
                        "GPU)")
    p.add_argument("--adapters-from-config", action="store_true",
                   help="write the adapters from the model's config, not with peft (implied "
                        "when the model folder holds no weights)")
    p.add_argument("--reverse", action="store_true",
                   help="the worker configurations in reverse order")
    p.add_argument("--label", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run for the tests: 3 adapters, 8 requests, demand and naive "
                        "once each")
    args = p.parse_args()
    if args.smoke:
        args.adapters, args.requests, args.concurrency, args.max_tokens = 3, 8, 4, 4
        args.repeats, args.sides = 1, "demand,naive"
    return args


def main() -> None:
    args = _parse()
    from fleet.demo_model import ensure_demo_model

    model = args.model = args.model or ensure_demo_model(progress=False)
    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    names = [f"adapter-{i}" for i in range(args.adapters)]
    # A folder with no weights has nothing for peft to wrap: written from its config then.
    if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
        args.adapters_from_config = True
    make = make_adapters_for_config if args.adapters_from_config else make_adapters
    adapters = make(model, workdir / "adapters", names)
    stack = Stack(workdir=workdir, model_path=model)
    runs: list[dict[str, Any]] = []
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "label": args.label, "machine": f"{os.cpu_count()} cores",
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "workload": {k: str(getattr(args, k)) if k in ("model", "worker_args") else
                           getattr(args, k) for k in (
                  "adapters", "requests", "concurrency", "max_tokens", "zipf", "repeats",
                  "model", "model_name", "devices", "worker_args", "adapters_from_config",
                  "reverse")},
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lora-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    sides = args.sides.split(",")
    unknown = set(sides) - {"demand", "naive", "held", "held-naive", "held-aware",
                            "held-resident", "resident"}
    if unknown:
        raise SystemExit(f"unknown sides: {sorted(unknown)}")
    warm = zipf_sequence(names, 8, args.zipf, args.seed + 99)
    counter = iter(range(1000))

    def measure(side: str, placement: str) -> None:
        number = next(counter)
        url = start_gateway(stack, f"gw-{side}-{number}", placement)
        declare(url, adapters)
        asyncio.run(run_traffic(url, warm, args))  # first-request costs, then forgotten
        if not side.endswith("resident"):
            unload_all(stack, names)
        stack.stop(f"gw-{side}-{number}")
        url = start_gateway(stack, f"gw-{side}-{number}b", placement)
        sequence = zipf_sequence(names, args.requests, args.zipf, args.seed)  # one for all
        result = asyncio.run(run_traffic(url, sequence, args))
        result.update(side=side, run=number, adapter_loads=gateway_loads(url))
        stack.stop(f"gw-{side}-{number}b")
        runs.append(result)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(result), flush=True)

    held = f"held{args.held}"
    # (slots, held, static, the sides those workers serve): each group on workers started
    # for it.
    groups = [(2, None, None, [("demand", "demand"), ("naive", "naive")]),
              (2, args.held, None, [(held, "demand"), (f"{held}-naive", "naive"),
                                    (f"{held}-aware", "demand-aware")]),
              (2, args.held, adapters, [(f"{held}-resident", "demand")]),
              (args.adapters, None, adapters, [("resident", "demand")])]
    groups = [(slots, kept, static, [(side, placement) for side, placement in pair
                                     if side.replace(held, "held") in sides])
              for slots, kept, static, pair in groups]
    groups = [g for g in groups if g[3]]
    try:
        stack.start_controller()
        # A-B-C-C-B-A over the worker configurations, and A-B-B-A within each: the machine's
        # drift is shared out evenly.
        for repeat in range(args.repeats):
            forward = (repeat % 2 == 0) != args.reverse
            for slots, kept, static, pair in groups if forward else groups[::-1]:
                start_workers(stack, args, slots=slots, held=kept, static=static)
                for side, placement in pair if forward else pair[::-1]:
                    measure(side, placement)
                stop_workers(stack)
    finally:
        stack.close()
    print("\n| side | runs | req/s | out tok/s | latency p50 s | p99 s | adapter loads | "
          "failed |")
    print("|---|---|---|---|---|---|---|---|")
    means: dict[str, dict[str, float]] = {}
    for side in ("demand", "naive", held, f"{held}-naive", f"{held}-aware",
                 f"{held}-resident", "resident"):
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        mean = means[side] = {k: sum(r[k] for r in mine) / len(mine) for k in (
            "req_per_s", "output_tok_per_s", "latency_p50_s", "latency_p99_s",
            "adapter_loads")}
        failed = sum(r["requests"] - r["ok"] for r in mine)
        print(f"| {side} | {len(mine)} | {mean['req_per_s']:.2f} | "
              f"{mean['output_tok_per_s']:.1f} | {mean['latency_p50_s']:.2f} | "
              f"{mean['latency_p99_s']:.2f} | {mean['adapter_loads']:.1f} | {failed} |")
    # The goals: throughput against resident, loads against naive placement.
    for side in ("demand", held):
        if side in means and "resident" in means:
            print(f"{side}: {means[side]['req_per_s'] / means['resident']['req_per_s']:.2f} "
                  "of resident's req/s")
        for base in ("naive", f"{held}-naive"):
            if side in means and base in means and means[base]["adapter_loads"]:
                print(f"{side}: {means[side]['adapter_loads'] / means[base]['adapter_loads']:.2f}"
                      f" of {base}'s adapter loads")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
