"""Routing across two real CPU workers (one core each): session affinity, overload, two
gateways sharing state as one, and failures under load: a controller restart and a worker
killed outright.

The module starts its own controller and two workers; each test starts the gateway it needs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.harness import API_KEY, MODEL_NAME, Stack, free_port, prefix_counters

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("pair"), model_path=model_path)
    try:
        stack.start_controller()
        stack.start_worker("w0", cpus="0")
        stack.start_worker("w1", cpus="1")
        stack.wait_worker_state("w0", "ready", timeout=300)
        stack.wait_worker_state("w1", "ready", timeout=300)
        yield stack
    finally:
        stack.close()


def start_gateway(stack: Stack, name: str, *flags: str) -> str:
    port = free_port()
    stack._spawn(name, ["-m", "gateway", "--port", str(port), "--controller-address",
                        stack.controller_url, "--api-keys", API_KEY, "--sync-interval", "0.5",
                        *flags])
    url = f"http://127.0.0.1:{port}"

    def two_workers() -> bool:
        health = httpx.get(f"{url}/health", headers=AUTH, timeout=5).json()
        return health["routable_workers"] == 2

    stack.wait_for(two_workers, f"{name} to see both workers", 30)
    return url


def chat(url: str, content: str = "Hi", max_tokens: int = 4, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", timeout=120, headers={**AUTH, **headers},
        json={"model": MODEL_NAME, "max_tokens": max_tokens,
              "messages": [{"role": "user", "content": content}]},
    )


def test_session_affinity_keeps_a_session_on_one_worker(pair: Stack) -> None:
    url = start_gateway(pair, "gw-session", "--routing", "session")
    try:
        alice = {chat(url, **{"X-Session-Id": "alice"}).headers["x-fleet-worker"]
                 for _ in range(8)}
        assert len(alice) == 1
        spread = {chat(url, **{"X-Session-Id": f"user-{i}"}).headers["x-fleet-worker"]
                  for i in range(16)}
        assert spread == {"w0", "w1"}
    finally:
        pair.stop("gw-session")


def test_overload_returns_429_with_retry_after(pair: Stack) -> None:
    url = start_gateway(pair, "gw-tight", "--max-inflight-per-worker", "1", "--queue-size", "1",
                        "--queue-timeout", "60")
    try:
        # Two running (one per worker), one queued, the rest refused at once.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, url, "Tell me a long story.", 64) for _ in range(6)]
            results = [f.result(timeout=180) for f in futures]
        statuses = collections.Counter(r.status_code for r in results)
        others = [r.text[:300] for r in results if r.status_code not in (200, 429)]
        assert statuses[200] == 3 and statuses[429] == 3, (statuses, others)
        refused = next(r for r in results if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"
        counted = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                   if line.startswith("fleet_gateway_requests_total")]
        assert 'fleet_gateway_requests_total{endpoint="chat",model="SmolLM2-135M-Instruct",' \
               'policy="least-load",status="429"} 3.0' in counted, counted
    finally:
        pair.stop("gw-tight")


# -- two gateways as one (--shared-state) ---------------------------------------------------------
LIMITED_KEY = "sk-fleet-two-gateways-limited"
LIMIT = 6


def _conversations(stack: Stack, urls: list[str], tag: str) -> float:
    """Three system prompts, two conversations each, two turns each, every request through
    the next gateway in turn; returns the engines' prefix-cache hit rate over them."""
    hits0, queries0 = prefix_counters(stack)
    n = 0
    for group in range(3):
        system = f"[{tag}-{group}] You are assistant number {group}. " + " ".join(
            f"Rule {i}: answer briefly and stay on the topic of item {group * 100 + i}."
            for i in range(40))
        for conv in range(2):
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": f"Question {conv}: name a colour."}]
            for _turn in range(2):
                r = httpx.post(f"{urls[n % len(urls)]}/v1/chat/completions", headers=AUTH,
                               timeout=120, json={"model": MODEL_NAME, "max_tokens": 2,
                                                  "temperature": 0, "messages": messages})
                n += 1
                assert r.status_code == 200, r.text[:300]
                messages += [{"role": "assistant",
                              "content": r.json()["choices"][0]["message"]["content"]},
                             {"role": "user", "content": "And another one?"}]
    hits1, queries1 = prefix_counters(stack)
    return (hits1 - hits0) / (queries1 - queries0)


def test_two_gateways_share_limits_load_and_placement(pair: Stack, tmp_path: Path) -> None:
    """Two gateways over one Redis: a key's rpm holds across both, each sees the other's
    requests in flight, and a prefix placed through one is found through the other, so two
    gateways keep one gateway's prefix-cache hit rate."""
    from gateway.keys import hash_key
    from tests.redis_server import redis_server

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({hash_key(LIMITED_KEY): {"name": "limited", "rpm": LIMIT},
                                hash_key(API_KEY): {"name": "open"}}))
    with redis_server(tmp_path) as redis_url:
        # Two engines take both cores here: a generous timeout keeps a starved gateway from
        # going on alone, which would be right but not what this test is about.
        shared = ["--routing", "cache-aware", "--keys-file", str(keys),
                  "--shared-state", redis_url, "--shared-state-timeout", "2"]
        a = start_gateway(pair, "gw-a", *shared)
        b = start_gateway(pair, "gw-b", *shared)
        try:
            for url in (a, b):
                pair.wait_for(lambda u=url: httpx.get(f"{u}/health", headers=AUTH, timeout=5)
                              .json()["shared_state"] == "ok", "the store to be up", 10)
            # One gateway's hit rate, then two gateways', on fresh prompts of the same shape.
            alone = _conversations(pair, [a], "alone")
            together = _conversations(pair, [a, b], "together")
            assert together >= alone - 0.02, (alone, together)

            # A stream held through a shows in b's view of that worker, and leaves it after.
            body = {"model": MODEL_NAME, "max_tokens": 400, "stream": True, "temperature": 0,
                    "messages": [{"role": "user", "content": "Tell me a very long story."}]}

            def peer_inflight() -> dict[str, float]:
                text = httpx.get(f"{b}/metrics", timeout=5).text
                return {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                        for line in text.splitlines()
                        if line.startswith("fleet_gateway_peer_inflight{")}

            with httpx.stream("POST", f"{a}/v1/chat/completions", json=body, headers=AUTH,
                              timeout=120) as r:
                worker = r.headers["x-fleet-worker"]
                pair.wait_for(lambda: peer_inflight().get(worker) == 1.0,
                              "b to see a's request in flight", 5)
            pair.wait_for(lambda: not peer_inflight().get(worker),
                          "b to see a's request end", 5)

            # The key's rpm, fleet-wide: requests alternate between the gateways.
            limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
            statuses = [httpx.post(f"{(a, b)[i % 2]}/v1/chat/completions", headers=limited,
                                   timeout=120, json={"model": MODEL_NAME, "max_tokens": 1,
                                                      "messages": [{"role": "user",
                                                                    "content": "Hi"}]}
                                   ).status_code for i in range(LIMIT + 4)]
            logs = pair.services["gw-a"].tail(200) + pair.services["gw-b"].tail(200)
            assert "goes on alone" not in logs, logs
            assert statuses == [200] * LIMIT + [429] * 4, (statuses, logs)
        finally:
            pair.stop("gw-a")
            pair.stop("gw-b")


def _load(url: str, stop_at: float, stream: bool) -> list[str]:
    """Requests one after another until `stop_at`; returns how each ended."""
    outcomes = []
    while time.monotonic() < stop_at:
        body = {"model": MODEL_NAME, "max_tokens": 24, "stream": stream,
                "messages": [{"role": "user", "content": "Count to ten."}]}
        try:
            if not stream:
                r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
                outcomes.append("ok" if r.status_code == 200 else f"http {r.status_code}")
                continue
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH,
                              timeout=60) as r:
                if r.status_code != 200:
                    outcomes.append(f"http {r.status_code}")
                    continue
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            if events[-1] != "[DONE]":
                outcomes.append("no [DONE]")
            elif any('"error"' in e and "choices" not in json.loads(e) for e in events[:-1]):
                outcomes.append("error event")
            else:
                outcomes.append("ok")
        except httpx.HTTPError as exc:
            outcomes.append(f"transport {type(exc).__name__}")
    return outcomes


def _under_load(url: str, seconds: float, action) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    stop_at = time.monotonic() + seconds
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(_load, url, stop_at, False) for _ in range(2)]
        streams = [pool.submit(_load, url, stop_at, True) for _ in range(2)]
        action()
        # Each request has its own timeout, so the load ends soon after stop_at: no hang.
        done = [f.result(timeout=seconds + 90) for f in plain + streams]
    return [o for r in done[:2] for o in r], [o for r in done[2:] for o in r]


def test_controller_restart_under_load_costs_no_request(pair: Stack) -> None:
    url = start_gateway(pair, "gw-ctl")

    def restart_controller() -> None:
        time.sleep(2)  # let the load run before the fault: this is the scenario, not a sync
        pair.stop("controller", sig=signal.SIGKILL)
        pair.start_controller()
        pair.wait_worker_state("w0", "ready", timeout=10)
        pair.wait_worker_state("w1", "ready", timeout=10)

    try:
        plain, streams = _under_load(url, 12, restart_controller)
        assert plain and set(plain) == {"ok"}, collections.Counter(plain)
        assert streams and set(streams) == {"ok"}, collections.Counter(streams)
    finally:
        pair.stop("gw-ctl")


def test_worker_killed_under_load_fails_no_plain_request(pair: Stack) -> None:
    url = start_gateway(pair, "gw-kill")
    victim = psutil.Process(pair.services["w1"].proc.pid)
    family = [victim, *victim.children(recursive=True)]

    def kill_w1() -> None:
        time.sleep(3)  # let the load reach both workers first
        victim.kill()

    try:
        plain, streams = _under_load(url, 15, kill_w1)
        assert plain and set(plain) == {"ok"}, collections.Counter(plain)
        assert streams and set(streams) <= {"ok", "error event"}, collections.Counter(streams)
        # The worker's engine and its children go with it.
        gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
        # The first refused connection, or the first stream cut off, opens w1's breaker: after
        # that, w1 gets a request only as a half-open trial every cool-down (5 s), until the
        # controller drops it at its expiry. Which comes first depends on what w1 was serving.
        metrics = httpx.get(f"{url}/metrics").text.splitlines()
        retries = sum(float(line.rsplit(" ", 1)[1]) for line in metrics
                      if line.startswith("fleet_gateway_retries_total"))
        # A stream cut off by the kill is continued on w0 (issue 21), or ends in an error event.
        continued = sum(float(line.rsplit(" ", 1)[1]) for line in metrics
                        if line.startswith("fleet_gateway_continuations_total"))
        assert retries >= 1 or continued >= 1 or "error event" in streams, \
            "the kill went unnoticed"
        assert retries <= 6
        # The controller drops it at its expiry (3 s here).
        workers = [w["worker_id"] for w in pair.workers()]
        assert workers == ["w0"]
        assert chat(url).headers["x-fleet-worker"] == "w0"
    finally:
        pair.stop("gw-kill")
        pair.services.pop("w1", None)
