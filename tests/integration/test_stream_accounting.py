"""1,000 streams ended every way, then not one request is left counted in flight.

The subject is the gateway's load accounting (a lease per request, settled once on every exit
path), so the engines are fake ones (tests/integration/fake_engine.py), registered with a real
controller, each failing its own way: one cuts its streams after two chunks, one goes silent
mid-stream and one before its first byte (the gateway gives up after 1 s), one answers 503 and
one refuses connections, beside a good one serving the same model (so those requests are
retried), and a slow one that clients leave before its first byte or mid-stream. Clients
speak raw HTTP/1.1 over sockets, so that leaving means closing the socket at a chosen moment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import API_KEY, Stack

MIXED, SLOW, CUT, SILENT, SILENT_START = "mixed", "slow", "cut", "silent", "silent-start"
ENGINES = {  # name: (model, fake engine flags)
    "good": (MIXED, []),
    "busy": (MIXED, ["--status", "503"]),
    "gone": (MIXED, ["--no-listen"]),
    "slow": (SLOW, ["--delay-ms", "300", "--interval-ms", "20"]),
    "cut": (CUT, ["--cut-after", "2"]),
    "silent": (SILENT, ["--interval-ms", "5000", "--chunks", "3"]),
    "silent-start": (SILENT_START, ["--delay-ms", "5000"]),
}
WAYS = {  # how a stream ends: (model, how many of the 1,000)
    "completed": (MIXED, 350),  # some after a 503 or a refused connection, retried
    "client_left_before_first_byte": (SLOW, 150),
    "client_left_mid_stream": (SLOW, 150),
    "engine_cut_mid_stream": (CUT, 150),
    "engine_silent_mid_stream": (SILENT, 100),
    "engine_silent_before_first_byte": (SILENT_START, 100),
}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("accounting"), model_path=Path("unused"))
    try:
        stack.start_controller()
        for name, (model, flags) in ENGINES.items():
            stack.start_fake_engine(name, model, flags)
        stack.start_gateway(extra=["--read-timeout", "1", "--breaker-cooldown", "0.1",
                                   "--max-inflight-per-worker", "16"])

        def all_routable() -> bool:
            data = httpx.get(f"{stack.gateway_url}/v1/models", headers=AUTH, timeout=5).json()
            health = httpx.get(f"{stack.gateway_url}/health", headers=AUTH, timeout=5).json()
            return {m for m, _ in WAYS.values()} <= {m["id"] for m in data["data"]} \
                and health["workers"] == len(ENGINES)

        stack.wait_for(all_routable, "the gateway to route every fake engine", 60)
        yield stack
    finally:
        stack.close()


def _request(model: str) -> bytes:
    body = json.dumps({"model": model, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def _stream(port: int, way: str) -> str:
    """One stream, ended `way`; what the client saw, in a word."""
    model = WAYS[way][0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(model))
        await writer.drain()
        if way == "client_left_before_first_byte":
            return "left"  # the engine holds its answer back for 300 ms
        if way == "client_left_mid_stream":
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                return head.split(b" ", 2)[1].decode()
            await reader.readuntil(b"data: ")
            return "left"
        answer = await reader.read()  # to the end: Connection: close
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status = answer.split(b" ", 2)[1].decode()
    if status != "200":
        return status
    body = _dechunk(answer.partition(b"\r\n\r\n")[2])
    if body is None:
        return "cut short"
    if b'"error"' in body:
        return "error event"
    return "done" if body.rstrip().endswith(b"data: [DONE]") else "no [DONE]"


def _dechunk(raw: bytes) -> bytes | None:
    """A chunked body's bytes; None if it does not end with its last (empty) chunk."""
    parts = []
    while True:
        size_line, sep, raw = raw.partition(b"\r\n")
        if not sep:
            return None
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(parts)
        if len(raw) < size + 2:
            return None
        parts.append(raw[:size])
        raw = raw[size + 2:]


async def _all_streams(port: int) -> collections.Counter[tuple[str, str]]:
    ways = [way for way, (_, count) in WAYS.items() for _ in range(count)]
    random.Random(18).shuffle(ways)
    gate = asyncio.Semaphore(64)

    async def one(way: str) -> tuple[str, str]:
        async with gate, asyncio.timeout(60):
            return way, await _stream(port, way)

    return collections.Counter(await asyncio.gather(*(one(way) for way in ways)))


def _gauge(metrics: str, name: str) -> dict[str, float]:
    """Samples of one labelled gauge, by its label's value."""
    samples = {}
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            samples[labels[len(name) + 1:-1].split('"')[1]] = float(value)
    return samples


def test_1000_streams_ended_every_way_leave_nothing_in_flight(stack: Stack) -> None:
    seen = asyncio.run(_all_streams(stack.gateway_port))

    # Each way ended as a client would see it end; the gateway's own 503 (a breaker open on
    # every worker of the model) is a fair answer to a failing engine too.
    assert seen[("completed", "done")] == WAYS["completed"][1], seen
    assert seen[("engine_cut_mid_stream", "error event")] > 0, seen
    assert seen[("engine_silent_mid_stream", "error event")] > 0, seen
    assert seen[("engine_silent_before_first_byte", "504")] > 0, seen
    failing = {"engine_cut_mid_stream", "engine_silent_mid_stream",
               "engine_silent_before_first_byte"}
    assert {answer for way, answer in seen if way in failing} <= {"error event", "504", "503"}

    def settled() -> bool:
        metrics = httpx.get(f"{stack.gateway_url}/metrics", timeout=5).text
        inflight = _gauge(metrics, "fleet_gateway_inflight")
        return all(count == 0 for count in inflight.values()) \
            and not _gauge(metrics, "fleet_gateway_queue_depth")

    # Streams whose client left end on the gateway's side a moment later.
    stack.wait_for(settled, "fleet_gateway_inflight to be 0 for every worker", 15)
    metrics = httpx.get(f"{stack.gateway_url}/metrics", timeout=5).text
    retries = {line.split('reason="')[1].split('"')[0] for line in metrics.splitlines()
               if line.startswith("fleet_gateway_retries_total{")}
    assert {"503", "connect"} <= retries  # the refusing engines were tried, and retried past
    engine_requests = {
        name: httpx.get(f"http://127.0.0.1:{stack.worker_ports[name]}/stats",
                        timeout=5).json()["requests"]
        for name in ENGINES if name != "gone"
    }
    assert all(engine_requests.values()), engine_requests
