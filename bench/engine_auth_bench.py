"""What the engine's door (worker/engine_auth.py) costs per streamed request.

The middleware runs once per request, before the app, and hands vLLM's `send` through
untouched: a stream's chunks do not pass through it. So it is measured twice:

- end to end: a trivial streaming ASGI app (16 SSE chunks, each its own send, as vLLM streams)
  served by uvicorn as vLLM serves (httptools, uvloop, no access log), once bare (A) and once
  behind `EngineKeyMiddleware` (B), each in its own process pinned to one core; the load
  generator of bench/overhead_bench.py on the other core sends at a fixed rate. Runs go
  A-B-B-A, `--rounds` times; CPU = utime + stime of the server process per 1,000 streams.
- in process: the middleware's `__call__` around an app that does nothing, against that app
  called alone, with the headers a gateway sends, timed with `time.process_time` over many
  calls in alternating blocks.

Both are reported as CPU per 1,000 streams and as a share of our gateway's CPU per stream
(`--gateway-ms-per-1k`, from bench/RESULTS.md: 366 ms per 1,000 streams at 1,000/s). Goal: at
most 5 %.

    .venv/bin/python bench/engine_auth_bench.py                  # 1,000/s, 10 s a run, 3 rounds
    .venv/bin/python bench/engine_auth_bench.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead_bench import KEY, Proc, run_load  # noqa: E402
from tests.integration.harness import free_port  # noqa: E402
from worker.engine_auth import KEY_ENV, EngineKeyMiddleware  # noqa: E402

Scope = dict[str, Any]


# --- the server (this script, run with --serve) ---

def _events(chunks: int) -> list[bytes]:
    return [b'data: {"choices":[{"index":0,"delta":{"content":" word%d"}}]}\n\n' % i
            for i in range(chunks)] + [b"data: [DONE]\n\n"]


def streaming_app(chunks: int) -> Any:
    """A bare ASGI app: GET answers 200, POST streams `chunks` events then [DONE]."""
    events = _events(chunks)
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream")]}

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # the request body
            message = await receive()
            more = message.get("more_body", False)
        await send(start)
        if scope["method"] == "POST":
            for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    app = streaming_app(args.chunks)
    if args.guard:
        app = EngineKeyMiddleware(app)  # the key from VLLM_API_KEY, as in the engine
    # asgi3 said outright: uvicorn would take the door, whose __call__ is no coroutine
    # function, for ASGI2. In vLLM it sits inside Starlette's stack, which asks nothing.
    uvicorn.run(app, host="127.0.0.1", port=args.port, http="httptools", loop="uvloop",
                interface="asgi3", access_log=False, log_level="warning")


# --- in process ---

def _scope() -> Scope:
    # What the gateway's engine client sends with a chat request.
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"host", b"127.0.0.1:8100"), (b"content-type", b"application/json"),
        (b"content-length", b"180"), (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
        (b"accept", b"text/event-stream"), (b"authorization", f"Bearer {KEY}".encode())]}


def in_process(calls: int, blocks: int) -> dict[str, Any]:
    """CPU µs per request of the middleware: alternating blocks, bare app vs. behind it."""
    async def nothing(scope: Scope, receive: Any, send: Any) -> None:
        return None

    guarded = EngineKeyMiddleware(nothing, key=KEY)
    scope = _scope()
    bare_us: list[float] = []
    guarded_us: list[float] = []

    async def time_block(app: Any) -> float:
        started = time.process_time()
        for _ in range(calls):
            await app(scope, None, None)
        return 1e6 * (time.process_time() - started) / calls

    async def run() -> None:
        for _ in range(blocks):
            bare_us.append(await time_block(nothing))
            guarded_us.append(await time_block(guarded))
            guarded_us.append(await time_block(guarded))
            bare_us.append(await time_block(nothing))

    asyncio.run(run())
    added = statistics.median(guarded_us) - statistics.median(bare_us)
    return {"calls_per_block": calls, "blocks": 4 * blocks,
            "bare_us": statistics.median(bare_us), "guarded_us": statistics.median(guarded_us),
            "added_us_per_request": added}


# --- end to end ---

def end_to_end(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    servers: dict[str, tuple[Proc, str]] = {}
    for name, guard in (("bare", False), ("guarded", True)):
        port = free_port()
        argv = [sys.executable, __file__, "--serve", "--port", str(port),
                "--chunks", str(args.chunks), *(["--guard"] if guard else [])]
        proc = Proc(name, argv, args.proxy_cores, workdir, env={KEY_ENV: KEY})
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/health", 30, {"Authorization": f"Bearer {KEY}"})
        servers[name] = (proc, url)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "guarded": []}
    try:
        for proc, url in servers.values():
            check = run_load(url, args, rate=0, duration=1, concurrency=16)  # warm-up
            if check["errors"] or not check["requests"]:
                raise SystemExit(f"{proc.name} does not stream:\n{proc.log.read_text()[-3000:]}")
        for _ in range(args.rounds):
            for name in ("bare", "guarded", "guarded", "bare"):
                proc, url = servers[name]
                cpu0 = proc.cpu_seconds()
                r = run_load(url, args, rate=args.rate, duration=args.duration)
                served = r["requests"] - r["errors"]
                r["cpu_ms_per_1k"] = 1e6 * (proc.cpu_seconds() - cpu0) / max(served, 1)
                runs[name].append(r)
                print(f"{name} @ {args.rate:g}/s: {r['cpu_ms_per_1k']:.1f} ms per 1,000 "
                      f"streams, errors {r['errors']}, TTFT p50 {r['ttft_p50_ms']:.2f} ms",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.stop()
    bare = statistics.median(r["cpu_ms_per_1k"] for r in runs["bare"])
    guarded = statistics.median(r["cpu_ms_per_1k"] for r in runs["guarded"])
    return {"runs": runs, "bare_cpu_ms_per_1k": bare, "guarded_cpu_ms_per_1k": guarded,
            "added_cpu_ms_per_1k": guarded - bare,
            "errors": sum(r["errors"] for rs in runs.values() for r in rs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="streams/s offered")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    p.add_argument("--rounds", type=int, default=3, help="A-B-B-A rounds")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--calls", type=int, default=200_000, help="in-process calls per block")
    p.add_argument("--gateway-ms-per-1k", type=float, default=366.0,
                   help="our gateway's CPU per 1,000 streams (bench/RESULTS.md, 1,000/s)")
    p.add_argument("--proxy-cores", default="1", help="the servers' core")
    p.add_argument("--client-cores", default="0", help="the load generator's core")
    p.add_argument("--smoke", action="store_true", help="tiny run: checks that it works")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--guard", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        _serve(args)
        return
    if args.smoke:
        args.rate, args.duration, args.rounds, args.calls = 50, 1.0, 1, 2_000
    workdir = Path(tempfile.mkdtemp(prefix="engine-auth-bench-"))
    micro = in_process(args.calls, blocks=max(args.rounds, 1))
    print(f"in process: +{micro['added_us_per_request']:.2f} µs per request "
          f"({micro['bare_us']:.2f} bare, {micro['guarded_us']:.2f} behind the door)", flush=True)
    e2e = end_to_end(args, workdir)
    gateway = args.gateway_ms_per_1k
    summary = {
        "in_process_cpu_ms_per_1k": micro["added_us_per_request"],
        "in_process_share_of_gateway_pct": 100 * micro["added_us_per_request"] / gateway,
        "end_to_end_added_cpu_ms_per_1k": e2e["added_cpu_ms_per_1k"],
        "end_to_end_share_of_gateway_pct": 100 * e2e["added_cpu_ms_per_1k"] / gateway,
        "gateway_cpu_ms_per_1k": gateway,
    }
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setup": {"rate": args.rate, "duration_s": args.duration, "rounds": args.rounds,
                  "chunks": args.chunks, "proxy_cores": args.proxy_cores,
                  "client_cores": args.client_cores},
        "in_process": micro, "end_to_end": e2e, "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engine-auth-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nin process: {summary['in_process_cpu_ms_per_1k']:.2f} ms per 1,000 requests "
          f"= {summary['in_process_share_of_gateway_pct']:.2f} % of the gateway's per stream")
    print(f"end to end: bare {e2e['bare_cpu_ms_per_1k']:.1f}, behind the door "
          f"{e2e['guarded_cpu_ms_per_1k']:.1f} ms per 1,000 streams: "
          f"{summary['end_to_end_added_cpu_ms_per_1k']:+.1f} "
          f"= {summary['end_to_end_share_of_gateway_pct']:+.2f} % of the gateway's")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
