"""Many concurrent streams through a gateway, and the gateway process's open files and memory
before and after them (read with psutil).

A round opens every stream at once from one asyncio client and checks that each arrives whole:
status 200, the fake engine's every word in order, and `[DONE]`. After a round the gateway is
left alone until its open files are back to where they were when idle: its pooled connections
to the engines close within two of the pool's keep-alive periods (30 s), so the wait is long.

Memory is the gateway's RSS. CPython frees the requests' objects (tracemalloc inside the
gateway shows its heap back within 2 MiB of where it started), but its allocator keeps most of
the pages it grew for 1,000 streams at once: RSS after the first round stays some 40 MiB above
the idle gateway, and a second round reuses them. So the first round is held to a margin, and
a leak shows as growth in the second.
"""

from __future__ import annotations

import asyncio
import json
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import psutil

from tests.integration.fake_engine import WORDS
from tests.integration.multihost import AUTH

MIB = 1024 * 1024
WaitFor = Callable[[Callable[[], bool], str, float], None]


def raise_fd_limit(wanted: int) -> None:
    """Raise this process's soft limit on open files (children inherit it) up to `wanted`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@dataclass
class Round:
    streams: int
    lost: list[str]
    seconds: float
    peak_gateway_fds: int  # 2 per stream in flight (client and engine side), over the idle ones


@dataclass
class SoakResult:
    fds_before: int
    fds_after: int
    fds_back_after_s: float
    rss_before_mib: float
    rss_after_mib: float
    rss_second_mib: float
    rounds: list[Round] = field(default_factory=list)

    @property
    def lost(self) -> list[str]:
        return [loss for r in self.rounds for loss in r.lost]

    def figures(self) -> dict[str, object]:
        return {
            "streams_per_round": [r.streams for r in self.rounds],
            "lost": len(self.lost),
            "round_seconds": [round(r.seconds, 2) for r in self.rounds],
            "peak_gateway_fds": [r.peak_gateway_fds for r in self.rounds],
            "gateway_fds_idle_before": self.fds_before,
            "gateway_fds_after": self.fds_after,
            "gateway_fds_back_after_s": round(self.fds_back_after_s, 1),
            "gateway_rss_mib_before": round(self.rss_before_mib, 1),
            "gateway_rss_mib_after": round(self.rss_after_mib, 1),
            "gateway_rss_mib_after_second_round": round(self.rss_second_mib, 1),
        }


class Soak:
    # What the first round of 1,000 streams may leave in the gateway's RSS (about 40 MiB
    # measured here: pages the allocator keeps, see above).
    RSS_MARGIN_MIB = 64.0
    # What the second round may add: a leak of 8 KiB a stream would pass it.
    RSS_GROWTH_MIB = 8.0

    def __init__(self, gateway_url: str, gateway_pid: int, model: str, streams: int = 1000,
                 warmup: int = 100) -> None:
        self.url = f"{gateway_url}/v1/chat/completions"
        self.process = psutil.Process(gateway_pid)
        self.model = model
        self.streams = streams
        self.warmup = warmup

    def _rss_mib(self) -> float:
        return float(self.process.memory_info().rss) / MIB

    def run(self, wait_for: WaitFor) -> SoakResult:
        idle = self.process.num_fds()
        settle = 90.0

        def settled(what: str) -> float:
            start = time.monotonic()
            wait_for(lambda: self.process.num_fds() <= idle,
                     f"the gateway's open files to come back to {idle} {what}", settle)
            return time.monotonic() - start

        # The first requests allocate what the gateway keeps for good (imports, pools, caches).
        warm = self._round(self.warmup)
        rss_before = self._rss_mib()
        first = self._round(self.streams)
        back_after = settled("after the first round")
        fds_after, rss_after = self.process.num_fds(), self._rss_mib()
        second = self._round(self.streams)
        settled("after the second round")
        result = SoakResult(fds_before=idle, fds_after=fds_after, fds_back_after_s=back_after,
                            rss_before_mib=rss_before, rss_after_mib=rss_after,
                            rss_second_mib=self._rss_mib())
        result.rounds = [warm, first, second]
        return result

    def _round(self, streams: int) -> Round:
        peak_fds = [self.process.num_fds()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak_fds[0] = max(peak_fds[0], self.process.num_fds())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        try:
                lost = asyncio.run(self._streams(streams))
        finally:
            done.set()
            sampler.join()
        return Round(streams, lost, time.monotonic() - start, peak_fds[0])

    async def _streams(self, count: int) -> list[str]:
        body = {"model": self.model, "stream": True,
                "messages": [{"role": "user", "content": "Stream me some words."}]}
        expected = "".join(WORDS)

        async def one(session: aiohttp.ClientSession) -> str | None:
            try:
                async with session.post(self.url, json=body, headers=AUTH) as response:
                    if response.status != 200:
                        return f"http {response.status}: {(await response.text())[:200]}"
                    return await _read_stream(response, expected)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return f"transport {exc!r}"

        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            results = await asyncio.gather(*(one(session) for _ in range(count)))
        return [r for r in results if r is not None]


async def _read_stream(response: aiohttp.ClientResponse, expected: str) -> str | None:
    """None when the stream held every word and ended with [DONE]; else what was wrong."""
    text, finished = [], False
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            finished = True
            continue
        event = json.loads(data)
        if "choices" not in event:
            return f"error event {data[:200]!r}"
        text += [c["delta"].get("content") or "" for c in event["choices"]]
    if not finished:
        return "no [DONE]"
    if "".join(text) != expected:
        return f"content {''.join(text)!r}"
    return None
