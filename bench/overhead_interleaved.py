"""CPU per streamed request of several proxies, measured interleaved: the before/after check.

`bench/overhead_bench.py` measures one proxy after another, minutes apart; on a shared machine
the load of everything else drifts meanwhile, and its CPU figures moved by 10-20 % between runs
of the same code (bench/RESULTS.md, issue 18). Here every proxy is up at once, pinned to the
same core (ours idles at about 2 ms of CPU a second, vLLM's router at none), and at each rate
the load goes to each in turn and then in reverse order (A B C C B A), `--rounds` times, so
that a drift touches all of them alike. Same fixture, load generator and CPU count as
overhead_bench.py: the fake backend's 16 chunks, keys with rpm and tpm limits, least-load.

    .venv/bin/python bench/overhead_interleaved.py --tree before=../fleet-main --tree after=. \\
        --router --rates 100,1000 --duration 8 --rounds 2

`--bare uvicorn,granian` adds bench/bare_relay.py's relays, which do nothing but relay: the
floor under the goal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead_bench import KEY, MODEL, ROOT, Proc, _start_proxy, run_load  # noqa: E402
from bench.peers import PEERS, peer_python  # noqa: E402
from gateway.keys import KeyEntry, append_key, hash_key  # noqa: E402
from tests.integration.harness import free_port  # noqa: E402


def _path_with(tree: Path) -> str:
    # The tree first; what the caller's PYTHONPATH holds after it (the GPU machine's packages
    # live in /root/site).
    return os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)


def _start_fleet(name: str, tree: Path, workdir: Path, controller: str, keys: Path,
                 settings: dict[str, str] | None = None) -> tuple[Proc, str]:
    port = free_port()
    env = {"PYTHONPATH": _path_with(tree),
           **{f"FLEET_GATEWAY_{k.upper()}": v for k, v in (settings or {}).items()}}
    proc = Proc(name, [sys.executable, "-m", "gateway", "--port", str(port),
                       "--controller-address", controller, "--keys-file", str(keys),
                       "--routing", "least-load", "--log-level", "warning"],
                "1", workdir, env=env, cwd=tree)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    proc.wait_http(f"{url}/v1/models", 60, auth)
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health", headers=auth, timeout=2).json().get("workers", 0) < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} never saw the backend")
        time.sleep(0.2)
    return proc, url


def _start_bare(server: str, workdir: Path, backend: str) -> tuple[Proc, str]:
    port = free_port()
    python = sys.executable if server == "uvicorn" else str(peer_python("granian"))
    proc = Proc(f"bare-{server}", [python, str(ROOT / "bench" / "bare_relay.py"), server,
                                   str(port), backend], "1", workdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # no route but the relay: ready once it relays a stream
        with contextlib.suppress(SystemExit):
            check = run_load(url, argparse.Namespace(client_cores="0", chunks=1), rate=0,
                             duration=0.2, concurrency=1)
            if check["requests"] and not check["errors"]:
                return proc, url
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bare-{server} never relayed:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="overhead-interleaved-"))
    controller_port, backend_port = free_port(), free_port()
    controller = f"http://127.0.0.1:{controller_port}"
    backend = f"http://127.0.0.1:{backend_port}"
    keys = workdir / "keys.yaml"
    append_key(keys, hash_key(KEY), KeyEntry(name="bench", models=[MODEL], rpm=100_000_000,
                                             tpm=1_000_000_000))
    services = [
        Proc("controller", [sys.executable, "-m", "controller", "--port", str(controller_port),
                            "--log-level", "warning"], "0", workdir),
        Proc("backend", [sys.executable, str(ROOT / "bench" / "fast_backend.py"), "--port",
                         str(backend_port), "--controller-address", controller, "--model",
                         MODEL, "--chunks", str(args.chunks)], "0", workdir),
    ]
    proxies: dict[str, tuple[Proc, str]] = {}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    # NAME=PATH[@SETTING=VALUE...]: a gateway setting as its FLEET_GATEWAY_* variable.
    specs = {name: spec.split("@") for name, spec in (t.split("=", 1) for t in args.tree)}
    trees = {name: str(Path(path).resolve()) for name, (path, *_) in specs.items()}
    settings = {name: dict(item.split("=", 1) for item in items)
                for name, (_, *items) in specs.items()}
    try:
        services[0].wait_http(f"{controller}/health", 30)
        services[1].wait_http(f"{backend}/health", 30)
        for name, tree in trees.items():
            proxies[name] = _start_fleet(name, Path(tree), workdir, controller, keys,
                                         settings[name])
        for server in filter(None, args.bare.split(",")):
            proxies[f"bare-{server}"] = _start_bare(server, workdir, backend)
        if args.router:
            proxies["vllm-router"] = _start_proxy("vllm-router", args, workdir, backend,
                                                  controller)
        names = list(proxies)
        for name in names:
            run_load(proxies[name][1], args, rate=0, duration=1, concurrency=16)  # warm-up
        for rate in [float(r) for r in args.rates.split(",")]:
            for _ in range(args.rounds):
                for name in names + names[::-1]:
                    proc, url = proxies[name]
                    cpu0 = proc.cpu_seconds()
                    r = run_load(url, args, rate=rate, duration=args.duration)
                    served = r["requests"] - r["errors"]
                    r["cpu_ms_per_1k"] = 1e6 * (proc.cpu_seconds() - cpu0) / max(served, 1)
                    results.setdefault(f"{rate:g}", {}).setdefault(name, []).append(r)
                    print(f"{name} @ {rate:g}/s: {r['cpu_ms_per_1k']:.0f} ms per 1k, "
                          f"errors {r['errors']}", flush=True)
    finally:
        for proc, _ in proxies.values():
            proc.stop()
        for service in services:
            service.stop()
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}", "command": " ".join(sys.argv),
        "trees": trees, "settings": settings,
        "peers": PEERS["vllm-router"] if args.router else None,
        "bare": args.bare.split(",") if args.bare else [],
        "granian": PEERS["granian"] if "granian" in args.bare else None,
        "duration_s": args.duration, "rounds": args.rounds, "chunks": args.chunks,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overhead-interleaved-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print("\n| proxy | rate/s | CPU ms per 1,000 streams, each run | mean |\n|---|---|---|---|")
    for rate, by_name in results.items():
        for name, runs in by_name.items():
            values = [r["cpu_ms_per_1k"] for r in runs]
            print(f"| {name} | {rate} | {', '.join(f'{v:.0f}' for v in values)} | "
                  f"{sum(values) / len(values):.0f} |")
    print(f"wrote {path}")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH[@K=V...]",
                   help="our gateway from this checkout, as proxy NAME (repeat); each @K=V "
                   "sets the gateway's FLEET_GATEWAY_K, e.g. @max_continuations=0")
    p.add_argument("--router", action="store_true", help="vLLM's router too")
    p.add_argument("--bare", default="", help="bench/bare_relay.py's relays too, "
                   "comma-separated: uvicorn, granian")
    p.add_argument("--rates", default="100,1000", help="requests/s, comma-separated")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    # What overhead_bench's helpers read.
    args.client_cores, args.proxy_cores, args.fleet_tree = "0", "1", []
    run(args)


if __name__ == "__main__":
    main()
