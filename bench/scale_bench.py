"""One worker per GPU: does the stack scale? One layout of `fleet up` per call, then a report.

Each call starts `fleet up` in one layout, checks where its engines sit (nvidia-smi), warms it
up, runs vLLM's serving benchmark through the gateway, and records throughput and latency, how
many requests each engine served (the engines' own counters) and each GPU's utilisation during
the runs (nvidia-smi, sampled every 500 ms). `--report` puts the layouts side by side with the
scaling ratio (output throughput of the two-worker layout over the one-worker layout).

    # on a machine with two GPUs, one call per layout (each under the device's 10-minute limit):
    python3 bench/scale_bench.py --layout per-gpu --max-concurrency 512 ...   # fleet up: 2 workers
    CUDA_VISIBLE_DEVICES=0 python3 bench/scale_bench.py --layout one-gpu --max-concurrency 256 ...
    python3 bench/scale_bench.py --layout tp --up-args "--gpus-per-worker 2 ..." ...
    python3 bench/scale_bench.py --report OUT

`bash bench/gpu.sh scale-*` holds the exact flags. On CPU (no nvidia-smi) the same runs with
CPU workers, which is how it is tested before GPU time: `--up-args "--cpu-workers 2 --cpus 0-1"`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_bench import (  # noqa: E402
    add_workload_args,
    mean_of,
    start_up,
    stop_up,
    versions,
    vllm_bench,
)
from fleetcore.cluster_auth import ControllerCredentials, bearer  # noqa: E402


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layout", help="a name for this layout (per-gpu, one-gpu, tp, ...)")
    p.add_argument("--report", type=Path, metavar="DIR", help="compare the layouts in DIR")
    add_workload_args(p, input_len=512, output_len=256, num_prompts=1024, max_concurrency=512)
    p.add_argument("--repeats", type=int, default=2, help="benchmark runs, new prompts each")
    p.add_argument("--startup-timeout", type=float, default=540)
    args = p.parse_args()
    if args.report is None and args.layout is None:
        p.error("give --layout NAME (a run) or --report DIR")
    return args


def _nvidia_smi(*query: str) -> list[list[str]]:
    """Rows of an `nvidia-smi --query-...` call; [] where there is no nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line]


def _worker_devices(pid: int) -> str | None:
    """The --gpus of the `python -m worker` process that `pid` runs under, if any."""
    with contextlib.suppress(psutil.Error):
        for proc in [psutil.Process(pid), *psutil.Process(pid).parents()]:
            argv = proc.cmdline()
            if "worker" in argv and "--gpus" in argv:
                return argv[argv.index("--gpus") + 1]
    return None


def placement() -> dict[str, Any]:
    """Which GPU each engine process uses, and whose worker it belongs to (nvidia-smi)."""
    gpus = {uuid: {"index": int(index), "memory_used_mib": int(used)}
            for index, uuid, used in _nvidia_smi("--query-gpu=index,uuid,memory.used")}
    apps = []
    for pid, uuid, used in _nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory"):
        index = gpus.get(uuid, {}).get("index")
        apps.append({"pid": int(pid), "gpu": index, "used_mib": int(used),
                     "worker_gpus": _worker_devices(int(pid))})
    # Each worker's GPUs are exactly the ones its --gpus names, and no GPU has two workers.
    by_worker: dict[str, set[int]] = {}
    owners: dict[int, set[str]] = {}
    for app in apps:
        if app["worker_gpus"] is not None and app["gpu"] is not None:
            by_worker.setdefault(app["worker_gpus"], set()).add(app["gpu"])
            owners.setdefault(app["gpu"], set()).add(app["worker_gpus"])
    # None: nothing to tell (no nvidia-smi, or its pids are not this machine's processes).
    pinned = all(
        used == {int(g) for g in spec.split(",")} for spec, used in by_worker.items()
    ) and all(len(o) == 1 for o in owners.values()) if by_worker else None
    return {"gpus": sorted(gpus.values(), key=lambda g: g["index"]), "apps": apps,
            "each_worker_on_its_own_gpus": pinned}


class GpuSampler:
    """nvidia-smi's utilisation per GPU, every 500 ms, while the benchmark runs."""

    def __init__(self) -> None:
        self.samples: dict[int, list[int]] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        with contextlib.suppress(OSError):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                index, util = (int(cell) for cell in line.split(","))
                self.samples.setdefault(index, []).append(util)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def mean(self) -> dict[str, float]:
        return {str(i): sum(s) / len(s) for i, s in sorted(self.samples.items()) if s}


def _workers(args: argparse.Namespace) -> list[dict[str, Any]]:
    token = ControllerCredentials().controller_token()
    response = httpx.get(f"{args.controller_url}/workers", headers=bearer(token), timeout=10)
    response.raise_for_status()
    return response.json()["workers"]


def served(workers: list[dict[str, Any]]) -> dict[str, float]:
    """Requests each engine has finished, from its own /metrics, by the worker's device."""
    out = {}
    for worker in workers:
        text = httpx.get(f"{worker['engine_url'].rstrip('/')}/metrics", timeout=10).text
        out[worker["device"]] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                    if line.startswith("vllm:request_success_total"))
    return out


def _wait_routable(args: argparse.Namespace, proc: subprocess.Popen[bytes]) -> int:
    """Wait for `fleet up` to say it is up, then return the workers the gateway routes to."""
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fleet up exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            # With keys on, /health shows its table to a key only.
            health = httpx.get(f"{args.gateway_url}/health", timeout=5, headers={
                "Authorization": f"Bearer {args.gateway_key}"}).json()
            workers = _workers(args)
            if workers and all(w["state"] == "ready" for w in workers) \
                    and health["routable_workers"] == len(workers):
                return len(workers)
        time.sleep(1)
    raise SystemExit(f"the stack was not up within {args.startup_timeout:.0f} s")


def run(args: argparse.Namespace) -> Path:
    if args.smoke:
        args.num_prompts, args.max_concurrency, args.input_len, args.output_len = 8, 4, 16, 8
        args.repeats = 1
    if args.tokenizer is None:
        from fleet.demo_model import ensure_demo_model

        args.tokenizer = str(ensure_demo_model(progress=False))
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "layout": args.layout,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "versions": versions(),
        "workload": {k: getattr(args, k) for k in ("endpoint", "input_len", "output_len",
                                                  "num_prompts", "max_concurrency")},
    }
    started = time.monotonic()
    proc = start_up(args)
    try:
        record["workers"] = _wait_routable(args, proc)
        record["startup_s"] = round(time.monotonic() - started, 1)
        workers = _workers(args)
        record["devices"] = sorted(w["device"] for w in workers)
        record["placement"] = placement()
        print(f"up in {record['startup_s']} s: {record['devices']}\n"
              f"placement: {json.dumps(record['placement'])}", flush=True)
        # A warm-up at full concurrency with short answers: every engine has run a full batch.
        vllm_bench(argparse.Namespace(**{**vars(args), "num_prompts": args.max_concurrency,
                                         "output_len": min(args.output_len, 32)}),
                   args.gateway_url, args.gateway_key, "warmup", seed=100)
        before = served(workers)
        runs = []
        with GpuSampler() as sampler:
            for seed in range(1, args.repeats + 1):
                runs.append(vllm_bench(args, args.gateway_url, args.gateway_key, args.layout,
                                       seed=seed))
        after = served(workers)
        record.update(
            runs=runs, result=mean_of(runs), gpu_utilisation_pct=sampler.mean(),
            requests_by_device={d: after[d] - before.get(d, 0) for d in sorted(after)})
    finally:
        stop_up(proc)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-{args.label}-{args.layout}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.layout}: {json.dumps(record['result'])}\n"
          f"requests by device: {record['requests_by_device']}\n"
          f"GPU utilisation %: {record['gpu_utilisation_pct']}\nwrote {path}", flush=True)
    return path


def report(folder: Path) -> str:
    """A Markdown table per run label in `folder` (each layout's newest record), with the
    ratios of every layout to the one-worker, one-device layout of the same label."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("scale-*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["label"], {})[record["layout"]] = record
    lines = []
    for label, records in runs.items():
        lines += [f"{label}:", "",
                  "| layout | workers (devices) | concurrency | req/s | out tok/s "
                  "| TTFT p50 / p99 ms | TPOT p50 ms | failed | requests by device | GPU util % |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in records.items():
            res = r["result"]
            lines.append(
                f"| {name} | {r['workers']} ({', '.join(r['devices'])}) | "
                f"{r['workload']['max_concurrency']} | {res['request_throughput']:.2f} | "
                f"{res['output_throughput']:.0f} | {res['median_ttft_ms']:.0f} / "
                f"{res['p99_ttft_ms']:.0f} | {res['median_tpot_ms']:.1f} | {res['failed']:.0f} | "
                f"{', '.join(f'{d}: {n:.0f}' for d, n in r['requests_by_device'].items())} | "
                f"{', '.join(f'{g}: {u:.0f}' for g, u in r['gpu_utilisation_pct'].items()) or '-'}"
                " |")
        # The base: one worker on one device. A tensor-parallel worker ("cuda:0,1") is not one.
        bases = [r for r in records.values() if r["workers"] == 1 and "," not in r["devices"][0]]
        lines.append("")
        for base in bases:
            for r in records.values():
                if r is not base:
                    ratio = r["result"]["output_throughput"] / base["result"]["output_throughput"]
                    lines.append(f"- {r['layout']} / {base['layout']}: {ratio:.2f}x output "
                                 f"throughput ({r['workers']} worker(s) on "
                                 f"{', '.join(r['devices'])})")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    parsed = _parse()
    if parsed.report is not None:
        print(report(parsed.report))
    else:
        run(parsed)
    sys.stdout.flush()
    # Skip interpreter teardown: triton (imported by vLLM) prints pages of nanobind leak
    # warnings at exit.
    os._exit(0)
