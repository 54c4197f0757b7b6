"""Can one controller hold a large fleet? Simulated workers heartbeat, simulated gateways sync.

Starts one controller process, registers `--workers` simulated workers, then for `--duration`
seconds sends each of them a heartbeat every `--heartbeat` seconds (spread evenly; each carries
a new load, the worst case) while `--gateways` simulated gateways read the table every second,
by `/table?since=` changes (`--sync table`, what gateways do) or whole `/snapshot`s (`--sync
snapshot`, what they did before). Reports the controller's CPU (cores, from its own process
times), heartbeat latency (send to last byte, and lag behind schedule) and each sync's size
and time. At the end the heartbeats stop and every gateway's table, built from the changes
alone, is checked against a full snapshot: the changes lose nothing.

The client is plain asyncio over keep-alive connections, so it costs little beside the
controller; on a small machine run it under the heavy-work lock:

    flock /tmp/fleet-heavy.lock .venv/bin/python bench/controller_bench.py --workers 10000
    .venv/bin/python bench/controller_bench.py --workers 8000 --sync snapshot   # the old way
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=10_000)
    p.add_argument("--gateways", type=int, default=8)
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    p.add_argument("--sync-interval", type=float, default=1.0, help="seconds between reads")
    p.add_argument("--sync", choices=["table", "snapshot"], default="table")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=6.0, help="seconds of heartbeats first")
    p.add_argument("--connections", type=int, default=200,
                   help="keep-alive connections the heartbeats share")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run (200 workers, 2 gateways, 3 s): checks the script, no speed")
    p.add_argument("--label", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args()


class Conn:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        # No timeout per call (asyncio.wait_for costs a task each): the whole run has one.
        head = (f"{method} {path} HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        head_bytes = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head_bytes[9:12])
        at = head_bytes.lower().index(b"content-length:") + 15
        length = int(head_bytes[at:head_bytes.index(b"\r\n", at)])
        return status, await self.reader.readexactly(length)


def _registration(i: int, port: int) -> bytes:
    return json.dumps({
        "worker_id": f"sim-{i:05d}", "engine_url": f"http://10.{i // 65536}.{i // 256 % 256}."
        f"{i % 256}:8000", "model_names": [f"model-{i % 4}"], "max_model_len": 4096,
        "device": "cuda:0", "state": "ready",
        "engine_paths": ["/v1/chat/completions", "/v1/completions", "/v1/models"],
    }).encode()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Gateway:
    """A simulated gateway: reads the table each interval and keeps it as a gateway does."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.epoch: str | None = None
        self.revision: int | None = None
        self.workers: dict[str, list[Any]] = {}  # id -> [state, load]
        self.sizes: list[int] = []
        self.times: list[float] = []
        self.fulls = 0

    async def read(self, conn: Conn, record: bool) -> None:
        path = "/snapshot"
        if self.mode == "table":
            path = "/table" if self.revision is None else \
                f"/table?since={self.revision}&epoch={self.epoch}"
        started = time.perf_counter()
        status, body = await conn.request("GET", path)
        elapsed = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"{path}: {status} {body[:200]!r}")
        data = json.loads(body)
        if self.mode == "snapshot" or data["full"]:
            self.fulls += 1
            self.workers = {w["worker_id"]: [w["state"], w["load"]] for w in data["workers"]}
        else:
            for w in data["workers"]:
                self.workers[w["worker_id"]] = [w["state"], w["load"]]
            for wid in data["removed"]:
                self.workers.pop(wid, None)
            for wid, (running, waiting, kv) in data["loads"].items():
                self.workers[wid][1] = {"running": running, "waiting": waiting,
                                        "kv_cache_usage": kv}
        if self.mode == "table":
            self.epoch, self.revision = data["epoch"], data["revision"]
        if record:
            self.sizes.append(len(body))
            self.times.append(elapsed)


async def _bench(args: argparse.Namespace, port: int, proc: psutil.Process) -> dict[str, Any]:
    rng = random.Random(1)
    conns = [await Conn.open(port) for _ in range(args.connections)]
    ids = [f"sim-{i:05d}" for i in range(args.workers)]

    async def register(slot: int) -> None:
        for i in range(slot, args.workers, len(conns)):
            status, body = await conns[slot].request("POST", "/workers/register",
                                                     _registration(i, port))
            if status != 200:
                raise RuntimeError(f"register: {status} {body[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(register(s) for s in range(len(conns))))
    print(f"registered {args.workers} workers in {time.perf_counter() - started:.1f} s",
          flush=True)

    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.5
    measure_from = t0 + args.warmup
    measure_to = measure_from + args.duration
    latencies: list[float] = []
    lags: list[float] = []
    sent = [0]

    async def beat(slot: int) -> None:
        conn = conns[slot]
        mine = list(range(slot, args.workers, len(conns)))
        # Worker i beats at t0 + offset_i + k * period, offsets spread over one period.
        k = 0
        while True:
            for i in mine:
                due = t0 + (i / args.workers + k) * args.heartbeat
                if due >= measure_to:
                    return
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                body = json.dumps({"state": "ready", "load": {
                    "running": rng.randrange(33), "waiting": rng.randrange(9),
                    "kv_cache_usage": round(rng.random(), 3)}}).encode()
                # uvloop's clock counts milliseconds: latencies are timed finer.
                sent_at = time.perf_counter()
                status, reply = await conn.request("POST", f"/workers/{ids[i]}/heartbeat", body)
                if status != 200:
                    raise RuntimeError(f"heartbeat: {status} {reply[:200]!r}")
                latency = time.perf_counter() - sent_at
                if due >= measure_from:
                    latencies.append(latency)
                    lags.append(loop.time() - due)
                    sent[0] += 1
            k += 1

    gateways = [Gateway(args.sync) for _ in range(args.gateways)]
    gconns = [await Conn.open(port) for _ in gateways]

    async def sync(g: int) -> None:
        # Gateways read out of step with each other, as independent processes do.
        next_at = t0 + g * args.sync_interval / len(gateways)
        while next_at < measure_to:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            await gateways[g].read(gconns[g], record=next_at >= measure_from)
            next_at += args.sync_interval

    cpu_at: dict[str, float] = {}
    me = psutil.Process()

    async def sample_cpu() -> None:
        await asyncio.sleep(measure_from - loop.time())
        times, mine = proc.cpu_times(), me.cpu_times()
        cpu_at["start"], cpu_at["t0"] = times.user + times.system, time.perf_counter()
        cpu_at["client_start"] = mine.user + mine.system
        await asyncio.sleep(measure_to - loop.time())
        times, mine = proc.cpu_times(), me.cpu_times()
        cpu_at["end"], cpu_at["t1"] = times.user + times.system, time.perf_counter()
        cpu_at["client_end"] = mine.user + mine.system

    await asyncio.wait_for(asyncio.gather(*(beat(s) for s in range(len(conns))),
                                          *(sync(g) for g in range(len(gateways))),
                                          sample_cpu()),
                           args.warmup + args.duration + 120)
    wall = cpu_at["t1"] - cpu_at["t0"]
    cores = (cpu_at["end"] - cpu_at["start"]) / wall
    client_cores = (cpu_at["client_end"] - cpu_at["client_start"]) / wall

    # Heartbeats stopped: every gateway's table, from changes alone, must equal a snapshot.
    # Fresh connections: the server closes idle ones (5 s keep-alive).
    for c in gconns:
        c.writer.close()
    gconns = [await Conn.open(port) for _ in gateways]
    status, body = await gconns[0].request("GET", "/snapshot")
    truth = {w["worker_id"]: [w["state"], w["load"]] for w in json.loads(body)["workers"]}
    consistent = []
    for g, gateway in enumerate(gateways):
        await gateway.read(gconns[g], record=False)
        consistent.append(_tables_match(gateway.workers, truth))
    for c in [*conns, *gconns]:
        c.writer.close()
    sizes = [s for g in gateways for s in g.sizes]
    times = [t for g in gateways for t in g.times]
    return {
        "controller_cores": round(cores, 3),
        "client_cores": round(client_cores, 3),
        "heartbeats_per_s": round(sent[0] / args.duration, 1),
        "heartbeats_expected_per_s": round(args.workers / args.heartbeat, 1),
        "heartbeat_ms": {"p50": round(_pct(latencies, 0.5) * 1e3, 2),
                         "p99": round(_pct(latencies, 0.99) * 1e3, 2),
                         "max": round(max(latencies, default=float("nan")) * 1e3, 2)},
        "heartbeat_lag_ms": {"p50": round(_pct(lags, 0.5) * 1e3, 2),
                             "p99": round(_pct(lags, 0.99) * 1e3, 2)},
        "sync": {"reads": len(times), "full_reads": sum(g.fulls for g in gateways),
                 "bytes_p50": int(_pct(sizes, 0.5)), "bytes_max": max(sizes, default=0),
                 "ms_p50": round(_pct(times, 0.5) * 1e3, 2),
                 "ms_p99": round(_pct(times, 0.99) * 1e3, 2)},
        "gateway_tables_match_snapshot": all(consistent),
    }


def _tables_match(table: dict[str, list[Any]], truth: dict[str, list[Any]]) -> bool:
    if table.keys() != truth.keys():
        return False
    # The registry ships KV-cache use only when it moved by LOAD_KV_STEP: compare within it.
    for wid, (state, load) in truth.items():
        mine_state, mine = table[wid]
        if mine_state != state or mine["running"] != load["running"] \
                or mine["waiting"] != load["waiting"] \
                or abs(mine["kv_cache_usage"] - load["kv_cache_usage"]) >= 0.02:
            return False
    return True


def main() -> None:
    args = _parse()
    if args.smoke:
        args.workers, args.gateways, args.duration, args.warmup, args.connections = \
            200, 2, 3.0, 2.0, 10
    port = free_port()
    # The project first; what the caller's PYTHONPATH holds after it (the GPU machine's
    # packages live in /root/site).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("FLEET_CLUSTER_TOKEN", None)
    cmd = [sys.executable, "-m", "controller", "--port", str(port), "--log-level", "warning",
           "--heartbeat-interval", str(args.heartbeat), "--expiry", str(args.heartbeat * 3)]
    controller = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or controller.poll() is not None:
                raise SystemExit("the controller did not start")
            time.sleep(0.2)
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        result = runner(_bench(args, port, psutil.Process(controller.pid)))
    finally:
        controller.terminate()
        controller.wait(timeout=30)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "setup": {k: getattr(args, k) for k in ("workers", "gateways", "heartbeat",
                                                "sync_interval", "sync", "duration",
                                                "connections")},
        "result": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"controller-{args.label}-{args.sync}-{args.workers}-"
                       f"{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(result, indent=2), f"\nwrote {path}", flush=True)


if __name__ == "__main__":
    main()
