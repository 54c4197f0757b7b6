"""The longest gap between two tokens at the seam, when a worker dies mid-stream.

Starts a controller, two workers (by default one CPU core each, demo model) and our gateway.
Each round runs S streams (chat, temperature 0, `ignore_eos`) through the gateway twice,
interleaved: once without a fault (the baseline), once killing (`kill -9`, engine and worker)
the worker that carries most of them once every stream has N chunks. The client records each
content chunk's arrival; per stream, the longest gap between two chunks. For the streams on the
killed worker that is the seam: the failure noticed, the continuation's prefill of prompt plus
generated tokens on the other worker, its first token. After each fault round the killed
worker is started again.

    .venv/bin/python bench/seam_bench.py                       # 3 rounds of 4 streams, CPU
    .venv/bin/python bench/seam_bench.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import API_KEY, MODEL_NAME, Stack, free_port  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def start_worker(stack: Stack, name: str, device: str, args: argparse.Namespace) -> None:
    kind, _, value = device.partition("=")
    stack.worker_ports[name] = free_port()
    stack._spawn(name, [
        "-m", "worker", "--model", str(args.model), "--model-name", args.model_name,
        "--port", str(stack.worker_ports[name]), "--controller-address", stack.controller_url,
        f"--{kind}", value, "--worker-id", name, *shlex.split(args.worker_args)])


async def stream(client: httpx.AsyncClient, url: str, i: int, args: argparse.Namespace,
                 record: dict[str, Any]) -> None:
    body = {"model": args.model_name, "stream": True, "temperature": 0, "ignore_eos": True,
            "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": f"Request {i}: tell me a long story."}]}
    times: list[float] = []
    record["times"] = times
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers=AUTH) as response:
        record["worker"] = response.headers.get("x-fleet-worker")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                record["done"] = True
            elif line.startswith("data: {") and '"content":"' in line \
                    and '"content":""' not in line:
                times.append(time.monotonic())


async def one_round(url: str, args: argparse.Namespace, stack: Stack | None) -> dict[str, Any]:
    """S streams; with `stack`, kill the busiest worker once each stream has N chunks."""
    records: list[dict[str, Any]] = [{} for _ in range(args.streams)]
    killed = None
    async with httpx.AsyncClient(timeout=300) as client:
        tasks = [asyncio.create_task(stream(client, url, i, args, r))
                 for i, r in enumerate(records)]
        if stack is not None:
            deadline = time.monotonic() + 300
            while not all(len(r.get("times", ())) >= args.kill_after for r in records):
                assert time.monotonic() < deadline, "streams did not begin"
                assert not any(t.done() for t in tasks), "a stream ended before the fault"
                await asyncio.sleep(0.01)
            workers = [r["worker"] for r in records]
            killed = max(set(workers), key=workers.count)
            process = psutil.Process(stack.services[killed].proc.pid)
            for member in [process, *process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    member.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    gaps = []
    for r in records:
        times = r["times"]
        longest = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
        gaps.append({"worker": r["worker"], "chunks": len(times), "done": r.get("done", False),
                     "longest_gap_ms": round(longest * 1000, 1),
                     "median_gap_ms": round(statistics.median(
                         b - a for a, b in zip(times, times[1:], strict=False)) * 1000, 1)
                     if len(times) > 2 else None,
                     "continued": killed is not None and r["worker"] == killed})
    return {"killed": killed, "streams": gaps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: the demo model)")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--devices", default="cpus=0,cpus=1")
    p.add_argument("--worker-args", default="--enforce-eager --max-model-len 2048")
    p.add_argument("--gateway-args", default="", help="e.g. '--stall-timeout 5'")
    p.add_argument("--sequential-start", action="store_true",
                   help="start each worker once the one before is ready (workers sharing a GPU)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--kill-after", type=int, default=32, help="chunks every stream has first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="one small round: checks that it runs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.streams, args.max_tokens, args.kill_after = 1, 2, 32, 8
    if args.model is None:
        from fleet.demo_model import ensure_demo_model

        args.model = ensure_demo_model(progress=False)
    stack = Stack(workdir=Path(tempfile.mkdtemp(prefix="seam-bench-")), model_path=args.model)
    devices = args.devices.split(",")
    names = [f"w{i}" for i in range(len(devices))]
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workload": {k: str(getattr(args, k)) for k in (
            "streams", "max_tokens", "kill_after", "rounds", "devices", "worker_args",
            "gateway_args", "model_name")},
        "rounds": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"seam-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    try:
        stack.start_controller()
        for name, device in zip(names, devices, strict=True):
            start_worker(stack, name, device, args)
            if args.sequential_start:
                stack.wait_worker_state(name, "ready", timeout=900)
        for name in names:
            stack.wait_worker_state(name, "ready", timeout=900)
        stack.start_gateway(extra=shlex.split(args.gateway_args))
        url = stack.gateway_url
        stack.wait_for(lambda: httpx.get(f"{url}/health", headers=AUTH, timeout=5).json()
                       ["routable_workers"] == len(names), "the gateway", 60)
        asyncio.run(one_round(url, args, None))  # warm-up
        for n in range(args.rounds):
            baseline = asyncio.run(one_round(url, args, None))
            fault = asyncio.run(one_round(url, args, stack))
            record["rounds"].append({"baseline": baseline, "fault": fault})
            path.write_text(json.dumps(record, indent=2) + "\n")
            seams = [s["longest_gap_ms"] for s in fault["streams"] if s["continued"]]
            print(f"round {n}: seam gaps ms {seams}; baseline longest gaps ms "
                  f"{[s['longest_gap_ms'] for s in baseline['streams']]}", flush=True)
            killed = fault["killed"]
            stack.services.pop(killed)
            start_worker(stack, killed, devices[names.index(killed)], args)
            stack.wait_worker_state(killed, "ready", timeout=900)
            stack.wait_for(lambda: httpx.get(f"{url}/health", headers=AUTH, timeout=5).json()
                           ["routable_workers"] == len(names), "the gateway", 120)
    finally:
        stack.close()
    summarize(record)
    print(f"wrote {path}")


def summarize(record: dict[str, Any]) -> None:
    seams, base, base_median, lost = [], [], [], 0
    for r in record["rounds"]:
        for s in r["fault"]["streams"]:
            lost += 0 if s["done"] else 1
            if s["continued"]:
                seams.append(s["longest_gap_ms"])
        for s in r["baseline"]["streams"]:
            base.append(s["longest_gap_ms"])
            if s["median_gap_ms"] is not None:
                base_median.append(s["median_gap_ms"])
    if not seams:
        print("no stream was continued")
        return
    print("| | longest gap ms: median | max | streams |")
    print("|---|---|---|---|")
    print(f"| seam (continued streams) | {statistics.median(seams):.0f} | {max(seams):.0f} | "
          f"{len(seams)} |")
    print(f"| baseline (no fault), longest gap per stream | {statistics.median(base):.0f} | "
          f"{max(base):.0f} | {len(base)} |")
    print(f"| baseline, median gap per stream | {statistics.median(base_median):.0f} | – | – |")
    print(f"streams without [DONE] in fault rounds: {lost}")


if __name__ == "__main__":
    main()
