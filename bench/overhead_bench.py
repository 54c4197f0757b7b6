"""What a proxy adds on top of a fast backend: our gateway, vLLM's router and LiteLLM, one run.

The subject is the proxy, so the backend is a fake OpenAI engine (bench/fast_backend.py) that
streams 16 chunks back to back, each its own write. Each proxy runs alone, pinned to its own
core; the backend, the load generator and our controller share the other core. For each
request rate the load generator first measures the backend directly, then each proxy, and
reports:

- added TTFT: the proxy's TTFT p50/p99 minus the direct one at the same rate;
- errors (a failed request, or a stream that lost chunks or its `[DONE]`);
- CPU time of the proxy's processes per 1,000 streamed requests (utime + stime from /proc);
- the most requests/s the proxy sustains: a closed loop of 256 concurrent streams.

The load generator is a bare asyncio protocol client over kept-alive connections (uvloop where
installed) in its own process, sending at a fixed rate (open loop: a slow proxy does not slow
the arrivals down). Peers are
installed in their own venvs under .venv-peers/ on first use (bench/peers.py).

    .venv/bin/python bench/overhead_bench.py                     # rates 100,500,1000,2000
    .venv/bin/python bench/overhead_bench.py --proxies fleet --rates 1000 --duration 10
    .venv/bin/python bench/overhead_bench.py --proxies before,fleet,vllm-router \\
        --fleet-tree before=../fleet-main                            # before and after, one run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import PEERS, peer_python  # noqa: E402
from gateway.keys import KeyEntry, append_key, hash_key  # noqa: E402
from tests.integration.harness import free_port  # noqa: E402

MODEL = "fake-model"
KEY = "sk-overhead-bench-key"
ROOT = Path(__file__).resolve().parents[1]


# --- the load generator (runs in its own process: `overhead_bench.py --load ...`) ---
# A bare asyncio protocol over kept-alive connections, so that it and the backend fit on one
# core at 2,000 streamed requests/s (an aiohttp client alone costs about 0.25 ms a request).

class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.alive = True
        self._done: asyncio.Future[tuple[float | None, str]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, data: bytes, chunks: int) -> asyncio.Future[tuple[float | None, str]]:
        """Resolves to (TTFT, "") when the stream came whole, else to why it did not."""
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._chunks, self._started, self._ttft = chunks, time.perf_counter(), None
        self._buffer, self._body_at = bytearray(), -1
        self.transport.write(data)
        return self._done

    def data_received(self, data: bytes) -> None:
        if self._done is None or self._done.done():
            return
        self._buffer += data
        if self._body_at < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self._buffer.startswith(b"HTTP/1.1 200"):
                # An error answer: counted, and the connection dropped.
                self._finish(bytes(self._buffer[:12]).decode(errors="replace"))
                return
            self._body_at = end + 4
        if self._ttft is None and len(self._buffer) > self._body_at:
            self._ttft = time.perf_counter() - self._started
        if self._buffer.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            # Every chunk is one event; proxies may re-encode them, but not merge them.
            events = self._buffer.count(b"data:") - 1
            whole = events >= self._chunks and b"[DONE]" in self._buffer[-64:]
            self._done.set_result((self._ttft, "" if whole else "short stream"))

    def _finish(self, why: str) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()
        if self._done is not None and not self._done.done():
            # How long it waited says which timer ended it (a proxy's keep-alive, ...).
            waited = time.perf_counter() - self._started
            self._done.set_result((self._ttft, f"{why} after {waited:.1f} s"
                                   + ("" if self._body_at < 0 else ", in the body")))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection lost ({exc or 'closed by the proxy'})")


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    host, port = args.url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": args.chunks,
                       "messages": [{"role": "user", "content": "Say something."}]}).encode()
    data = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    idle: list[_Connection] = []
    results: list[tuple[float | None, str]] = []

    async def one() -> tuple[float | None, str]:
        while idle:
            conn = idle.pop()
            if conn.alive:
                break
        else:
            try:
                _, conn = await loop.create_connection(_Connection, host, int(port))
            except OSError as exc:
                return None, f"connect: {exc}"
        try:
            result = await asyncio.wait_for(conn.request(data, args.chunks), args.timeout)
        except asyncio.TimeoutError:
            conn._finish("timed out")
            return None, f"timed out after {args.timeout:.0f} s"
        if conn.alive:
            idle.append(conn)
        return result

    started = time.perf_counter()
    if args.rate:  # open loop: arrivals at a fixed rate, whatever the answers do
        tasks = []
        for i in range(int(args.rate * args.duration)):
            delay = started + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        results = list(await asyncio.gather(*tasks))
    else:  # closed loop: `concurrency` streams back to back for `duration`
        deadline = started + args.duration

        async def stream_loop() -> None:
            while time.perf_counter() < deadline:
                results.append(await one())

        await asyncio.gather(*(stream_loop() for _ in range(args.concurrency)))
    wall = time.perf_counter() - started
    for conn in idle:
        conn._finish("")
    ttfts = sorted(t for t, why in results if not why and t is not None)
    return {
        "requests": len(results), "errors": sum(bool(why) for _, why in results),
        "failures": dict(collections.Counter(why for _, why in results if why)),
        "wall_s": wall,
        "req_per_s": len(ttfts) / wall,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))]
        if ttfts else None,
    }


def _load_main(args: argparse.Namespace) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(_load(args))), flush=True)


# --- the orchestration ---

class Proc:
    """A service pinned to some cores, with its log kept for when something fails."""

    def __init__(self, name: str, argv: list[str], cores: str, workdir: Path,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as handle:
            self.proc = subprocess.Popen(
                ["taskset", "-c", cores, *argv], stdout=handle, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
                start_new_session=True)

    def cpu_seconds(self) -> float:
        """utime + stime of the process and all its children, from /proc."""
        total = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = p.cpu_times()
                    total += times.user + times.system
        return total

    def wait_http(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"{self.name} not ready at {url}:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_load(url: str, args: argparse.Namespace, *, rate: float, duration: float,
              concurrency: int = 0) -> dict[str, Any]:
    cmd = ["taskset", "-c", args.client_cores, sys.executable, __file__, "--load",
           "--url", url, "--key", KEY, "--rate", str(rate), "--duration", str(duration),
           "--concurrency", str(concurrency), "--chunks", str(args.chunks)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0:
        raise SystemExit(f"load generator failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _start_proxy(name: str, args: argparse.Namespace, workdir: Path, backend: str,
                 controller: str) -> tuple[Proc, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    trees = dict(t.split("=", 1) for t in args.fleet_tree)
    if name == "fleet" or name in trees:
        # Another checkout's gateway (`--fleet-tree`): run from there, importing from there.
        tree = Path(trees[name]).resolve() if name in trees else ROOT
        keys = workdir / "keys.yaml"
        if not keys.exists():
            # The bench's key in a keys file, with a model list and limits far above the load:
            # every request pays the key lookup, the model check, the rpm and tpm windows, and
            # (tpm) the usage event asked for and charged at the end of each stream.
            append_key(keys, hash_key(KEY), KeyEntry(name="bench", models=[MODEL],
                                                     rpm=100_000_000, tpm=1_000_000_000))
        proc = Proc(name, [sys.executable, "-m", "gateway", "--port", str(port),
                           "--controller-address", controller, "--keys-file", str(keys),
                           "--routing", "least-load", "--log-level", "warning"],
                    args.proxy_cores, workdir, env={"PYTHONPATH": str(tree)}, cwd=tree)
        proc.wait_http(f"{url}/v1/models", 60, auth)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health", headers=auth, timeout=2).json().get("workers", 0) < 1:
            if time.monotonic() > deadline:
                raise SystemExit("our gateway never saw the backend")
            time.sleep(0.2)
    elif name == "vllm-router":
        python = str(peer_python("vllm-router"))
        proc = Proc(name, [python, "-m", "vllm_router.launch_router", "--host", "127.0.0.1",
                           "--port", str(port), "--worker-urls", backend,
                           "--policy", "round_robin", "--log-level", "warning",
                           "--worker-startup-check-interval", "1"], args.proxy_cores, workdir)
        proc.wait_http(f"{url}/v1/models", 60, auth)
    elif name == "litellm":
        python = peer_python("litellm")
        config = workdir / "litellm.yaml"
        config.write_text(json.dumps({
            "model_list": [{"model_name": MODEL, "litellm_params": {
                "model": f"openai/{MODEL}", "api_base": f"{backend}/v1", "api_key": "none"}}],
            "general_settings": {"master_key": KEY},
            "litellm_settings": {"telemetry": False, "drop_params": True},
        }))
        proc = Proc(name, [str(python.parent / "litellm"), "--config", str(config),
                           "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                    args.proxy_cores, workdir,
                    env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                         "DISABLE_SCHEMA_UPDATE": "True"})
        proc.wait_http(f"{url}/health/liveliness", 180)
    else:
        raise SystemExit(f"unknown proxy {name!r}; expected fleet, vllm-router, litellm or a "
                         "--fleet-tree name")
    # One request end to end, so a proxy that starts but cannot reach the backend fails here.
    check = run_load(url, args, rate=0, duration=0.2, concurrency=1)
    if check["errors"] or not check["requests"]:
        raise SystemExit(f"{name} does not relay the backend's stream:\n"
                         f"{proc.log.read_text()[-3000:]}")
    return proc, url


def run(args: argparse.Namespace) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="overhead-bench-"))
    rates = [float(r) for r in args.rates.split(",")]
    proxies = args.proxies.split(",")
    for name in proxies:  # install peers before anything is timed
        if name in PEERS:
            peer_python(name)
    controller_port, backend_port = free_port(), free_port()
    controller = f"http://127.0.0.1:{controller_port}"
    backend = f"http://127.0.0.1:{backend_port}"
    services = [
        Proc("controller", [sys.executable, "-m", "controller", "--port", str(controller_port),
                            "--log-level", "warning"], args.client_cores, workdir),
        Proc("backend", [sys.executable, str(ROOT / "bench" / "fast_backend.py"), "--port",
                         str(backend_port), "--controller-address", controller, "--model",
                         MODEL, "--chunks", str(args.chunks)], args.client_cores, workdir),
    ]
    results: dict[str, Any] = {"direct": {}, **{p: {} for p in proxies}}
    try:
        services[0].wait_http(f"{controller}/health", 30)
        services[1].wait_http(f"{backend}/health", 30)
        run_load(backend, args, rate=0, duration=1, concurrency=16)  # warm-up
        for rate in rates:
            results["direct"][str(rate)] = run_load(backend, args, rate=rate,
                                                     duration=args.duration)
            print(f"direct @ {rate:g}/s: {results['direct'][str(rate)]}", flush=True)
        for name in proxies:
            proc, url = _start_proxy(name, args, workdir, backend, controller)
            try:
                run_load(url, args, rate=0, duration=1, concurrency=16)  # warm-up
                saturated = None
                for rate in rates:
                    if saturated is not None:
                        results[name][str(rate)] = {"skipped": f"saturated at {saturated:g}/s"}
                        continue
                    cpu0 = proc.cpu_seconds()
                    r = run_load(url, args, rate=rate, duration=args.duration)
                    served = r["requests"] - r["errors"]
                    r["cpu_ms_per_1k"] = 1e6 * (proc.cpu_seconds() - cpu0) / max(served, 1)
                    direct = results["direct"][str(rate)]
                    if r["ttft_p50_ms"] is not None and direct["ttft_p50_ms"] is not None:
                        r["added_ttft_p50_ms"] = r["ttft_p50_ms"] - direct["ttft_p50_ms"]
                        r["added_ttft_p99_ms"] = r["ttft_p99_ms"] - direct["ttft_p99_ms"]
                    results[name][str(rate)] = r
                    print(f"{name} @ {rate:g}/s: {r}", flush=True)
                    # Far behind the offered rate: higher rates would only queue for minutes.
                    if r["errors"] > 0.5 * r["requests"] or r["req_per_s"] < 0.5 * rate:
                        saturated = rate
                results[name]["max"] = run_load(url, args, rate=0, duration=args.duration,
                                                 concurrency=256)
                print(f"{name} closed loop x256: {results[name]['max']}", flush=True)
            finally:
                proc.stop()
        results["direct"]["max"] = run_load(backend, args, rate=0, duration=args.duration,
                                             concurrency=256)
    finally:
        for service in services:
            service.stop()
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setup": {"proxy_cores": args.proxy_cores, "client_cores": args.client_cores,
                  "chunks": args.chunks,
                  "duration_s": args.duration, "peers": {p: PEERS[p] for p in proxies
                                                         if p in PEERS}},
        "results": results,
        "logs": str(workdir),  # each service's log, by its name
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overhead-{args.label}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    _print_table(record, rates, proxies)
    print(f"wrote {path}")
    return path


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _print_table(record: dict[str, Any], rates: list[float], proxies: list[str]) -> None:
    res = record["results"]
    print("\n| proxy | rate/s | TTFT p50 / p99 ms | added p50 / p99 ms | errors "
          "| CPU ms per 1k req |")
    print("|---|---|---|---|---|---|")
    for rate in rates:
        d = res["direct"][str(rate)]
        print(f"| direct | {rate:g} | {_fmt(d['ttft_p50_ms'], '.2f')} / "
              f"{_fmt(d['ttft_p99_ms'], '.2f')} | – | {d['errors']} | – |")
        for name in proxies:
            r = res[name][str(rate)]
            if "skipped" in r:
                print(f"| {name} | {rate:g} | {r['skipped']} | | | |")
                continue
            print(f"| {name} | {rate:g} | {_fmt(r['ttft_p50_ms'], '.2f')} / "
                  f"{_fmt(r['ttft_p99_ms'], '.2f')} | {_fmt(r.get('added_ttft_p50_ms'), '+.2f')}"
                  f" / {_fmt(r.get('added_ttft_p99_ms'), '+.2f')} | {r['errors']} | "
                  f"{r['cpu_ms_per_1k']:.0f} |")
    print("\nclosed loop, 256 streams: " + ", ".join(
        f"{name} {res[name]['max']['req_per_s']:.0f} req/s" for name in ["direct", *proxies]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxies", default="fleet,vllm-router,litellm")
    p.add_argument("--fleet-tree", action="append", default=[], metavar="NAME=PATH",
                   help="our gateway from another checkout as proxy NAME, to list in --proxies "
                        "(before and after in one run: --fleet-tree before=../old-checkout)")
    p.add_argument("--rates", default="100,500,1000,2000", help="requests/s, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--proxy-cores", default="1")
    p.add_argument("--client-cores", default="0")
    p.add_argument("--smoke", action="store_true", help="tiny run: checks that it works")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--label", default="cpu")
    # The load generator's own flags (it is this script, run with --load).
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=30, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load:
        _load_main(args)
        return
    if args.smoke:
        args.rates, args.duration = "20", 1.0
    run(args)


if __name__ == "__main__":
    main()
