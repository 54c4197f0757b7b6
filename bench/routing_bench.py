"""Routing policies on multi-turn, shared-prefix chat loads, side by side in one run.

Starts a controller, two workers (by default one CPU core each, demo model) and, per policy,
--replicas routers (two gateways by default: the client sends each request to the next in
turn), then for every load shape runs each policy --rounds times, interleaved A-B-C-C-B-A, each
run from empty prefix caches:
- closed loop: --concurrency conversations at a time, all of them: throughput, TTFT, hit rate;
- open loop (--rate): conversations arrive as a Poisson process at --rate requests per second
  (auto: 0.7 x round-robin's closed-loop throughput in that shape, a rate it sustains) for
  --duration seconds; TTFT p50/p90/p99 of the requests sent after --warmup seconds, the
  steady state, not the first cold wave.
A policy is one of our gateway's (`cache-aware`, `round-robin`, `least-load`, ...) or
`vllm-router:POLICY`, vLLM's own router (PyPI vllm-router; `kv_aware` reads the engines' KV
events) over the same engines.

Workload: G groups of conversations; each group shares a long system prompt, each conversation
has T turns, and every turn resends the whole history (as chat clients do). Shapes change it:
`base` (as given), `long` (prefixes twice as long, half as many), `many` (three times the
prefixes: more than the caches hold), `busy` (three times the concurrency).

    .venv/bin/python bench/routing_bench.py          # ours, vLLM's router, round-robin
    .venv/bin/python bench/routing_bench.py --shapes base,many --rounds 2 --rate auto
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import peer_python  # noqa: E402
from bench.routing_load import Clients, closed_loop, conversations, open_loop  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    API_KEY,
    MODEL_NAME,
    Service,
    Stack,
    free_port,
    prefix_counters,
)

# One engine key for both workers, so vLLM's router (one --api-key) can reach both engines.
ENGINE_KEY = "routing-bench-engine-key"

def _kv_epoch(worker: dict[str, Any]) -> str | None:
    url = (worker.get("kv_cache_url") or "").rstrip("/")
    if not url:
        return None
    return str(httpx.get(f"{url}/kv-cache", timeout=10,
                         headers={"Authorization": f"Bearer {ENGINE_KEY}"}).json()["epoch"])


def reset_caches(stack: Stack) -> None:
    """Empty every engine's prefix cache, and wait until each worker says so to gateways.

    vLLM reports a clear in its KV events only at its next step; an idle engine would report
    it when the run's first requests arrive, and until then every gateway's view would still
    show the last run's blocks. A one-token completion (too short to store a block) makes
    each engine step once; then the worker's view has started over."""
    auth = {"Authorization": f"Bearer {ENGINE_KEY}"}  # the engines' key (worker/engine_auth.py)
    for worker in stack.workers():
        engine = worker["engine_url"].rstrip("/")
        before = _kv_epoch(worker)
        httpx.post(f"{engine}/reset_prefix_cache", timeout=30, headers=auth).raise_for_status()
        if before is None:
            continue  # no KV events from this engine
        httpx.post(f"{engine}/v1/completions", timeout=120, headers=auth, json={
            "model": worker["model_names"][0], "prompt": "x", "max_tokens": 1,
        }).raise_for_status()
        stack.wait_for(lambda w=worker, b=before: _kv_epoch(w) != b,
                       f"{worker['worker_id']}'s view of the cleared cache", 30)


SHAPES = {
    "base": {},
    "long": {"system_words": 2.0, "groups": 0.5},
    "many": {"groups": 3.0},
    "busy": {"concurrency": 3.0},
}


def shaped(args: argparse.Namespace, shape: str) -> argparse.Namespace:
    factors = SHAPES[shape]
    return argparse.Namespace(**{**vars(args), **{
        k: max(1, round(getattr(args, k) * f)) for k, f in factors.items()}})


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="cache-aware,vllm-router:cache_aware,round-robin",
                   help="ours by name (NAME@SETTING=VALUE@... sets gateway settings, NAME~TREE "
                   "runs another checkout's gateway), or "
                   "vllm-router:POLICY for vLLM's router (cache_aware, kv_aware, ...)")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="another checkout, whose gateway `POLICY~NAME` runs (before/after)")
    p.add_argument("--shapes", default="base", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each policy per shape and mode, interleaved A-B-B-A")
    p.add_argument("--replicas", type=int, default=2,
                   help="routers per policy; the client sends each request to the next")
    p.add_argument("--rate", default="auto",
                   help="open-loop requests per second: a number, auto (0.7 x round-robin's "
                   "closed-loop throughput in the shape) or 0 (no open loop)")
    p.add_argument("--duration", type=float, default=30.0, help="open loop: seconds of arrivals")
    p.add_argument("--warmup", type=float, default=8.0,
                   help="open loop: seconds of arrivals left out of the steady state")
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
        args.duration, args.warmup = 4.0, 0.0
    args.trees = {name: Path(path).resolve() for name, _, path in
                  (item.partition("=") for item in args.tree)}
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
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
            stack.controller_url, f"--{kind}", value, "--worker-id", name,
            # A known endpoint, so that vLLM's kv_aware can subscribe beside our worker.
            "--kv-events-endpoint", kv_endpoint(stack, name), *extra,
        ], env={"FLEET_WORKER_ENGINE_API_KEY": ENGINE_KEY})
        names.append(name)
        if args.sequential_start:
            stack.wait_worker_state(name, "ready", timeout=900)
    for name in names:
        stack.wait_worker_state(name, "ready", timeout=900)
    return names


_KV_PORTS: dict[str, int] = {}


def kv_endpoint(stack: Stack, worker: str) -> str:
    """What the engine binds: vLLM's router's kv_aware takes only tcp://HOST:PORT, and vLLM
    binds (rather than connects) only an endpoint with `*` in it; our worker then reads it on
    loopback. (Every interface: a bench machine only.)"""
    port = _KV_PORTS.setdefault(worker, free_port())
    return f"tcp://*:{port}"


def block_size(stack: Stack) -> int:
    """The engines' KV block size, as their workers saw it in the events (after a request)."""
    for worker in stack.workers():
        url = (worker.get("kv_cache_url") or "").rstrip("/")
        if url:
            answer = httpx.get(f"{url}/kv-cache", timeout=10,
                               headers={"Authorization": f"Bearer {ENGINE_KEY}"}).json()
            if answer.get("block_size"):
                return int(answer["block_size"])
    return 16


def kv_events_live(stack: Stack) -> dict[str, int]:
    """Per worker, the blocks its /kv-cache shows: 0 means the engine's events do not arrive
    (cache-aware then routes that worker on its own estimate)."""
    out = {}
    for worker in stack.workers():
        url = (worker.get("kv_cache_url") or "").rstrip("/")
        answer = httpx.get(f"{url}/kv-cache", timeout=10,
                           headers={"Authorization": f"Bearer {ENGINE_KEY}"}).json() if url else {}
        out[worker["worker_id"]] = len(answer.get("added", []))
    return out


def start_router(stack: Stack, policy: str, replica: int, args: argparse.Namespace,
                 blocks: int) -> tuple[str, str]:
    """Start one router for `policy`; return its URL and the API key clients use with it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = f"{policy}#{replica}"
    if policy.startswith("vllm-router:"):
        python = args.vllm_router_python or str(peer_python("vllm-router"))
        workers = stack.workers()
        engines = [w["engine_url"].rstrip("/") for w in workers]
        router_policy = policy.split(":", 1)[1]
        extra: list[str] = []
        if router_policy == "kv_aware":
            for w in workers:
                endpoint = kv_endpoint(stack, w["worker_id"]).replace("*", "127.0.0.1")
                extra += ["--kv-event-source", f"{w['engine_url'].rstrip('/')}={endpoint}"]
            extra += ["--kv-event-block-size", str(blocks), "--kv-event-model",
                      args.model_name]
        log = stack.workdir / f"{name}.log"
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                [python, "-m", "vllm_router.launch_router", "--host", "127.0.0.1",
                 "--port", str(port), "--worker-urls", *engines,
                 "--policy", router_policy, "--api-key", ENGINE_KEY,
                 "--worker-startup-check-interval", "1", "--log-level", "warning",
                 # Its own metrics port, or a second replica finds the default taken.
                 "--prometheus-port", str(free_port()), *extra],
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        stack.services[name] = Service(name, proc, log)
        # It forwards the client's Authorization header to the engines as it is.
        key = ENGINE_KEY
        stack.wait_for(lambda: httpx.get(f"{url}/v1/models", timeout=5,
                                         headers={"Authorization": f"Bearer {key}"}
                                         ).status_code == 200, name, 120)
        return url, key
    # `least-load@max_inflight_per_worker=8`: a gateway setting (FLEET_GATEWAY_*);
    # `cache-aware~before`: the gateway of the tree --tree names `before`.
    ours, *settings = policy.split("@")
    ours, _, tree = ours.partition("~")
    env = {f"FLEET_GATEWAY_{k.upper()}": v
           for k, v in (item.split("=", 1) for item in settings)}
    run = ["-m", "gateway"] if not tree else [
        "-c", "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
        "runpy.run_module('gateway', run_name='__main__', alter_sys=True)", str(args.trees[tree])]
    stack._spawn(f"gw-{name}", [
        *run, "--port", str(port), "--controller-address", stack.controller_url,
        "--api-keys", API_KEY, "--routing", ours, "--sync-interval", "0.5"], env=env)
    workers = len(args.devices.split(","))
    auth = {"Authorization": f"Bearer {API_KEY}"}  # /health shows the table only to a key
    stack.wait_for(lambda: httpx.get(f"{url}/health", headers=auth).json()["workers"] == workers,
                   f"gateway {name}", 30)
    return url, API_KEY


def interleaved(policies: list[str], rounds: int) -> list[tuple[int, str]]:
    """A-B-C, C-B-A, A-B-C, ...: every policy as often early as late."""
    order = []
    for r in range(rounds):
        order += [(r, p) for p in (policies if r % 2 == 0 else policies[::-1])]
    return order


def _warm(stack: Stack, args: argparse.Namespace) -> None:
    """One request straight to each engine: first-request costs, and a block in its cache."""
    for worker in stack.workers():
        httpx.post(f"{worker['engine_url'].rstrip('/')}/v1/chat/completions", timeout=600,
                   headers={"Authorization": f"Bearer {ENGINE_KEY}"},
                   json={"model": args.model_name, "max_tokens": 4, "messages": [
                       {"role": "user", "content": "warm up " * 400}]}).raise_for_status()


def measured(stack: Stack, run: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """`run` from empty prefix caches, with the engines' hit rate over it."""
    reset_caches(stack)
    learned = learned_prefill(stack)
    hits0, queries0 = prefix_counters(stack)
    result = asyncio.run(run)
    hits1, queries1 = prefix_counters(stack)
    result["prefix_cache_hit_rate"] = (hits1 - hits0) / max(queries1 - queries0, 1)
    result["learned_before"] = learned
    return result


def _brief(result: dict[str, Any]) -> str:
    return json.dumps({k: round(v, 3) if isinstance(v, float) else v
                       for k, v in result.items()})


def learned_prefill(stack: Stack) -> dict[str, list[float | None]]:
    """What each worker had learned of its engine's prefill as a run began (speed in tokens/s,
    work per request in tokens): a round that starts from other figures places otherwise."""
    return {w["worker_id"]: [w["load"].get("prefill_tokens_per_s"),
                             w["load"].get("prefill_tokens_per_request")]
            for w in stack.workers()}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per mode and policy, the mean and the spread of each figure over the rounds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        out.setdefault(run["mode"], {}).setdefault(run["policy"], {})
    for mode, policies in out.items():
        for policy in policies:
            mine = [r for r in runs if r["mode"] == mode and r["policy"] == policy]
            for k in ("rate", "req_per_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
                      "prefix_cache_hit_rate", "errors"):
                values = [r[k] for r in mine if k in r]
                if values:
                    policies[policy][k] = statistics.fmean(values)
                    policies[policy][f"{k}_min"] = min(values)
                    policies[policy][f"{k}_max"] = max(values)
    return out


def main() -> None:
    args = _parse()
    if args.model is None:
        from fleet.demo_model import ensure_demo_model

        args.model = ensure_demo_model(progress=False)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the engines' /reset_prefix_cache
    policies = args.policies.split(",")
    stack = Stack(workdir=Path(tempfile.mkdtemp(prefix="routing-bench-")),
                  model_path=args.model)
    shapes: dict[str, Any] = {}
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workload": {k: str(getattr(args, k)) for k in (
            "groups", "conversations", "turns", "system_words", "max_tokens", "concurrency",
            "kv_blocks", "devices", "worker_args", "model_name", "rounds", "replicas", "rate",
            "duration", "warmup")},
        "shapes": shapes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"routing-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    try:
        stack.start_controller()
        start_workers(stack, args)
        _warm(stack, args)
        blocks = block_size(stack)
        record["kv_events"] = kv_events_live(stack)
        print(f"engines' KV block size {blocks}; blocks their workers saw after the warm-up: "
              f"{record['kv_events']}", flush=True)
        routers: dict[str, Clients] = {}
        for policy in list(policies):
            try:
                started = [start_router(stack, policy, r, args, blocks)
                           for r in range(args.replicas)]
            except AssertionError as exc:  # a peer that will not start: the others still run
                if not policy.startswith("vllm-router:"):
                    raise
                print(f"{policy} did not start; measuring without it: {exc}"[:2000], flush=True)
                record.setdefault("not_started", {})[policy] = str(exc)[-2000:]
                policies.remove(policy)
                continue
            routers[policy] = Clients([u for u, _ in started], started[0][1])
        for shape in args.shapes.split(","):
            load = shaped(args, shape)
            convs = conversations(load)
            runs: list[dict[str, Any]] = []
            shapes[shape] = {"workload": {k: getattr(load, k) for k in (
                "groups", "conversations", "turns", "system_words", "concurrency")},
                "runs": runs}
            for round_, policy in interleaved(policies, args.rounds):
                result = measured(stack, closed_loop(routers[policy], convs, load))
                runs.append({"mode": "closed", "policy": policy, "round": round_, **result})
                print(f"{shape} closed {policy} #{round_}: "
                      f"{_brief(result)}", flush=True)
                path.write_text(json.dumps(record, indent=2) + "\n")
            rate = _open_rate(args.rate, runs)
            for round_, policy in interleaved(policies, args.rounds) if rate else ():
                result = measured(stack, open_loop(routers[policy], convs, load, rate,
                                                   seed=args.seed + round_))
                runs.append({"mode": "open", "policy": policy, "round": round_, **result})
                print(f"{shape} open {policy} #{round_}: "
                      f"{_brief(result)}", flush=True)
                path.write_text(json.dumps(record, indent=2) + "\n")
            shapes[shape]["summary"] = summarise(runs)
            path.write_text(json.dumps(record, indent=2) + "\n")
    finally:
        stack.close()
    print_tables(shapes)
    print(f"wrote {path}")


def _open_rate(setting: str, runs: list[dict[str, Any]]) -> float:
    if setting != "auto":
        return float(setting)
    closed = [r for r in runs if r["mode"] == "closed"]
    baseline = [r["req_per_s"] for r in closed if r["policy"] == "round-robin"] or \
        [r["req_per_s"] for r in closed]
    return 0.7 * statistics.fmean(baseline)


def print_tables(shapes: dict[str, Any]) -> None:
    for shape, data in shapes.items():
        summary = data.get("summary", {})
        closed, opened = summary.get("closed", {}), summary.get("open", {})
        print(f"\n{shape} {data['workload']}")
        print("| policy | req/s (min-max) | TTFT p50 ms | hit rate | open-loop TTFT p50 / p90 / "
              "p99 ms | open hit rate | errors |")
        print("|---|---|---|---|---|---|---|")
        for policy, c in closed.items():
            o = opened.get(policy, {})
            open_ttft = (f"{o['ttft_p50_ms']:.0f} / {o['ttft_p90_ms']:.0f} / "
                         f"{o['ttft_p99_ms']:.0f}") if o else "-"
            open_hits = f"{o['prefix_cache_hit_rate']:.3f}" if o else "-"
            errors = c["errors"] + o.get("errors", 0)
            print(f"| {policy} | {c['req_per_s']:.2f} ({c['req_per_s_min']:.2f}-"
                  f"{c['req_per_s_max']:.2f}) | {c['ttft_p50_ms']:.0f} | "
                  f"{c['prefix_cache_hit_rate']:.3f} | {open_ttft} | {open_hits} | "
                  f"{errors:.0f} |")


if __name__ == "__main__":
    main()
