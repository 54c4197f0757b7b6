"""What relaying an engine's KV events through its worker costs a gateway, against subscribing
to the engine's ZMQ socket directly: the delay and the bytes per request.

One real worker (demo model, one core) publishes its engine's events on a known IPC socket; this
script subscribes there directly (what a gateway would do without the worker) and reads the
worker's /kv-cache as a gateway does (gateway/kv_view.py), then sends --requests prompts of
about --words words straight to the engine, one at a time. Per request: when the direct
subscriber got the engine's `BlockStored` batch, when the gateway's view held the prompt's
blocks, and the bytes each path carried.

    .venv/bin/python bench/kv_relay_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.protocol import WorkerRecord  # noqa: E402
from fleetcore.kv_blocks import chain_keys  # noqa: E402
from gateway.kv_view import KvSync, KvViews  # noqa: E402
from gateway.protocol import ChatCompletionRequest  # noqa: E402
from tests.integration.harness import MODEL_NAME, Stack, free_port  # noqa: E402

KEY = "kv-relay-bench-engine-key"
WORDS = "river mountain engine lantern copper violet harbor meadow signal orbit".split()


class Direct(threading.Thread):
    """A plain SUB socket on the engine's publisher: arrival time and size of every batch."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.batches: list[tuple[float, int]] = []
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)

    def run(self) -> None:
        while True:
            frames = self._socket.recv_multipart()
            self.batches.append((time.monotonic(), sum(len(f) for f in frames)))


async def measure(stack: Stack, record: WorkerRecord, direct: Direct,
                  args: argparse.Namespace) -> dict[str, Any]:
    views = KvViews()
    relay_bytes = 0

    async def on_chunk(session: Any, ctx: Any, params: aiohttp.TraceResponseChunkReceivedParams
                       ) -> None:
        nonlocal relay_bytes
        relay_bytes += len(params.chunk)

    trace = aiohttp.TraceConfig()
    trace.on_response_chunk_received.append(on_chunk)
    rng = random.Random(0)
    rows = []
    async with aiohttp.ClientSession(trace_configs=[trace]) as session, \
            httpx.AsyncClient(timeout=300) as http:
        sync = KvSync(views, session)
        sync.reconcile([record])
        deadline = time.monotonic() + 60
        while views.tokenizer(MODEL_NAME) is None or views.view(record.worker_id) is None:
            assert time.monotonic() < deadline, "no view of the worker"
            await asyncio.sleep(0.05)
        tokenizer_bytes, relay_bytes = relay_bytes, 0
        for n in range(args.requests + 1):
            chat = ChatCompletionRequest(model=MODEL_NAME, messages=[{
                "role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(args.words))}])
            ids = chat.prompt_ids(views.tokenizer(MODEL_NAME))  # type: ignore[arg-type]
            assert ids is not None
            batches, before = len(direct.batches), relay_bytes
            response = await http.post(
                f"{str(record.engine_url).rstrip('/')}/v1/chat/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"model": MODEL_NAME, "messages": chat.model_dump()["messages"],
                      "max_tokens": 1})
            response.raise_for_status()
            answered = time.monotonic()
            view = views.view(record.worker_id)
            while view is None or not view.block_size or \
                    view.match(chain_keys(ids, view.block_size)) < len(ids) // view.block_size:
                assert time.monotonic() < answered + 30, "the view never held the prompt"
                await asyncio.sleep(0.001)
                view = views.view(record.worker_id)
            seen = time.monotonic()
            # The relay can beat this process's own subscriber thread to the batch: wait for it.
            while len(direct.batches) == batches:
                assert time.monotonic() < seen + 30, "the direct subscriber never got the batch"
                await asyncio.sleep(0.001)
            mine = direct.batches[batches:]
            if n == 0:
                continue  # the first request pays the tokenizer's warm-up
            rows.append({"direct_after_answer_ms": 1000 * (mine[0][0] - answered),
                         "relay_after_direct_ms": 1000 * (seen - mine[0][0]),
                         "direct_bytes": sum(b for _, b in mine),
                         "relay_bytes": relay_bytes - before})
        await sync.close()
    return {"tokenizer_bytes": tokenizer_bytes, "rows": rows, **{
        k: {"p50": statistics.median(r[k] for r in rows),
            "max": max(r[k] for r in rows)} for k in rows[0]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--words", type=int, default=800)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.words = 3, 300
    from fleet.demo_model import ensure_demo_model

    stack = Stack(workdir=Path(tempfile.mkdtemp(prefix="kv-relay-bench-")),
                  model_path=ensure_demo_model(progress=False))
    endpoint = f"ipc://{stack.workdir / 'kv-w0'}"
    try:
        stack.start_controller()
        stack.worker_ports["w0"] = free_port()
        stack._spawn("w0", [
            "-m", "worker", "--model", str(stack.model_path), "--model-name", MODEL_NAME,
            "--port", str(stack.worker_ports["w0"]), "--controller-address",
            stack.controller_url, "--cpus", "0", "--worker-id", "w0", "--enforce-eager",
            "--max-model-len", "4096", "--kv-events-endpoint", endpoint,
        ], env={"FLEET_WORKER_ENGINE_API_KEY": KEY})
        stack.wait_worker_state("w0", "ready", timeout=600)
        direct = Direct(endpoint)
        direct.start()
        record = WorkerRecord.model_validate(stack.worker_record("w0"))
        result = asyncio.run(measure(stack, record, direct, args))
    finally:
        stack.close()
    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "label": args.label, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "requests": args.requests, "words": args.words, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kv-relay-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for k in ("direct_after_answer_ms", "relay_after_direct_ms", "direct_bytes", "relay_bytes"):
        print(f"{k}: p50 {result[k]['p50']:.1f}, max {result[k]['max']:.1f}")
    print(f"tokenizer, once per model and gateway: {result['tokenizer_bytes']} bytes")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
