"""What sharing state through Redis costs a gateway: the fleet-wide limit check on a request's
path, and the exchange of in-flight counts and placements every 100 ms.

Starts its own redis-server (Debian's), then in one process: `--gateways` gateways' shared
state, each admitting requests of limited keys one after another (`--requests` in all) and
running its exchange with `--busy-workers` workers in flight and `--placements` cache-aware
placements of `--prompt-bytes` prompts per exchange. Reports the admit round trip (p50, p99),
one exchange's time, and redis-server's CPU.

    flock /tmp/fleet-heavy.lock .venv/bin/python bench/shared_state_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.protocol import Snapshot, WorkerLoad, WorkerRecord, WorkerState  # noqa: E402
from gateway.routing import CacheAware, Choice, RouteRequest  # noqa: E402
from gateway.routing_table import RoutingTable  # noqa: E402
from gateway.shared_state import SharedState  # noqa: E402
from tests.redis_server import redis_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gateways", type=int, default=8)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--busy-workers", type=int, default=1000,
                   help="workers each gateway has requests in flight to")
    p.add_argument("--placements", type=int, default=20, help="per gateway per exchange")
    p.add_argument("--prompt-bytes", type=int, default=16_000, help="about 4,000 tokens")
    p.add_argument("--rounds", type=int, default=50, help="exchange rounds per gateway")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--label", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    if args.smoke:
        args.gateways, args.requests, args.busy_workers, args.rounds = 2, 100, 50, 5
    return args


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(workers: int) -> RoutingTable:
    table = RoutingTable(CacheAware())
    table.update(Snapshot.model_construct(
        generation=1, heartbeat_interval=2.0, expiry=6.0, models=["m"], warming_up=False,
        workers=[WorkerRecord.model_construct(
            worker_id=f"w{i:05d}", model_names=["m"], state=WorkerState.READY,
            load=WorkerLoad()) for i in range(workers)]))
    return table


async def _bench(args: argparse.Namespace, url: str, redis_pid: int) -> dict[str, Any]:
    rng = random.Random(1)
    states = [SharedState(url, gateway_id=f"gw-{g}") for g in range(args.gateways)]
    await states[0]._redis.flushdb()
    tables = [_table(args.busy_workers) for _ in states]
    for table, state in zip(tables, states, strict=True):
        table.inflight.update({f"w{i:05d}": rng.randrange(1, 20)
                               for i in range(args.busy_workers)})
        await state.exchange(table)
    for table, state in zip(tables, states, strict=True):
        await state.exchange(table)  # every gateway now knows its peers
    redis_proc = psutil.Process(redis_pid)
    cpu0 = sum(redis_proc.cpu_times()[:2])

    admit: list[float] = []
    started = time.perf_counter()

    async def requests(state: SharedState, n: int) -> None:
        for i in range(n):
            t = time.perf_counter()
            await state.admit(f"key-{i % 50}", 1_000_000, 10_000_000)
            admit.append(time.perf_counter() - t)

    await asyncio.gather(*(requests(s, args.requests // len(states)) for s in states))
    admit_wall = time.perf_counter() - started

    exchange: list[float] = []
    prompts = ["".join(rng.choice("abcdefgh ") for _ in range(args.prompt_bytes))
               for _ in range(8)]
    for _round in range(args.rounds):
        for table, state in zip(tables, states, strict=True):
            for p in range(args.placements):
                prompt = prompts[p % len(prompts)] + str(p)
                request = RouteRequest(model="m", render_prompt=lambda t=prompt: t)
                assert table.snapshot is not None
                state.routed(table, request, Choice(table.snapshot.workers[p], "bench"))
            t = time.perf_counter()
            await state.exchange(table)
            exchange.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    redis_cpu = sum(redis_proc.cpu_times()[:2]) - cpu0
    seen = sum(tables[0].remote_inflight.values())
    expected = sum(sum(t.inflight.values()) for t in tables[1:])
    for state in states:
        await state.close()
    return {
        "admit_ms": {"p50": round(_pct(admit, 0.5) * 1e3, 3),
                     "p99": round(_pct(admit, 0.99) * 1e3, 3)},
        "admits_per_s": round(len(admit) / admit_wall),
        "exchange_ms": {"p50": round(_pct(exchange, 0.5) * 1e3, 2),
                        "p99": round(_pct(exchange, 0.99) * 1e3, 2)},
        "redis_cpu_s": round(redis_cpu, 2), "wall_s": round(wall, 2),
        "peer_inflight_seen_equals_sent": seen == expected,
    }


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory() as folder, redis_server(Path(folder)) as url:
        result = asyncio.run(_bench(args, url, _redis_pid(url)))
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "setup": {k: getattr(args, k) for k in ("gateways", "requests", "busy_workers",
                                                "placements", "prompt_bytes", "rounds")},
        "result": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"shared-state-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(result, indent=2), f"\nwrote {path}", flush=True)


def _redis_pid(url: str) -> int:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "redis-server" or "redis-server" in " ".join(
                proc.info["cmdline"] or []):
            if any(str(port) in part for part in proc.info["cmdline"] or []):
                return proc.pid
    raise SystemExit("redis-server's process not found")


if __name__ == "__main__":
    main()
