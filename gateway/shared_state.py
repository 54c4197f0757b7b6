"""What several gateway replicas share through one Redis (`--shared-state redis://...`).

- Key rate limits, fleet-wide: each request of a key with an rpm or tpm limit is checked and
  counted by one Lua script, atomically, in the same sliding minute of one-second buckets as
  gateway/limits.py, on Redis's clock. Requests per minute hold exactly across replicas; tokens
  are charged when a response ends, so, as with one gateway, requests already running when the
  window fills can overshoot it by what they use.
- In-flight requests per worker: every `interval` (100 ms) each gateway publishes its own
  counts and reads the others', which its routing policy then adds to its own (a worker's
  in-flight therefore includes what every gateway has sent it, queued in the engine or not).
- Prefix placement: each gateway publishes where it sent each prompt, as the prompt's prefix
  block hashes (never its text), and the others' cache-aware trees learn it, so a prefix that
  one gateway placed on a worker is found there by all of them.

Every call has a timeout. When Redis cannot be reached each gateway carries on alone: its own
limits (so a fleet of N admits up to N times a key's limit until Redis is back), its own
in-flight counts and its own trees; it logs the outage once and tries again every interval
(requests do not wait on a store found down: `up` says whether to ask it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.routing import CacheAware, Choice, RouteRequest
from gateway.routing_table import RoutingTable

logger = logging.getLogger(__name__)

_PREFIX = "fleet:"
_GATEWAYS = _PREFIX + "gateways"
_ROUTED = _PREFIX + "routed"
_ROUTED_MAXLEN = 10_000
_KEY_BYTES = 12  # gateway/prefix_tree.py's block hash size

# KEYS: the key's request and token buckets. ARGV: rpm, tpm (-1: none).
# Returns {0} when admitted, else {1 (rpm) or 2 (tpm), seconds until there is room}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local function used(key, limit)
  local total, old, oldest = 0, {}, nil
  local data = redis.call('HGETALL', key)
  local live = {}
  for i = 1, #data, 2 do
    local s = tonumber(data[i])
    if s <= now - 60 then table.insert(old, data[i])
    else total = total + tonumber(data[i + 1]); table.insert(live, {s, tonumber(data[i + 1])}) end
  end
  if #old > 0 then redis.call('HDEL', key, unpack(old)) end
  if total < limit then return -1 end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  local excess = total - limit
  for _, slot in ipairs(live) do
    excess = excess - slot[2]
    if excess < 0 then return slot[1] + 60 - now end
  end
  return 1
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm >= 0 then
  local wait = used(KEYS[1], rpm)
  if wait >= 0 then return {1, wait} end
end
if tpm >= 0 then
  local wait = used(KEYS[2], tpm)
  if wait >= 0 then return {2, wait} end
end
redis.call('HINCRBY', KEYS[1], now, 1)
redis.call('EXPIRE', KEYS[1], 61)
return {0, 0}
"""
_CHARGE = """
local now = redis.call('TIME')[1]
redis.call('HINCRBY', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], 61)
return 0
"""


class Unreachable(Exception):
    """The store did not answer in time: the gateway limits alone."""


@dataclass(frozen=True)
class Refusal:
    """Over a fleet-wide limit: which one ('rpm' or 'tpm') and seconds until there is room."""

    limit: str
    wait: float


def _buckets(key_id: str) -> list[str]:
    return [f"{_PREFIX}rate:{key_id}:r", f"{_PREFIX}rate:{key_id}:t"]


class SharedState:
    """One gateway's side of the shared store."""

    def __init__(self, url: str, *, timeout: float = 0.25, interval: float = 0.1,
                 gateway_id: str | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.interval = interval
        self.gateway_id = gateway_id or f"{socket.gethostname()}-{os.getpid()}"
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
        self._admit = self._redis.register_script(_ADMIT)
        self._charge = self._redis.register_script(_CHARGE)
        self.up = False  # True once a call has succeeded, until one fails
        self._warned = False
        self._last_routed = b"0-0"
        self._routed: list[tuple[str, str, bytes]] = []  # (model, worker, keys) to publish
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: list[str] = []

    def _failed(self, what: str, exc: BaseException) -> None:
        if self.up or not self._warned:
            logger.warning("shared state unreachable; this gateway goes on alone url=%s "
                           "during=%s error=%r", self.url, what, exc)
            self._warned = True
        self.up = False

    def _ok(self) -> None:
        if not self.up and self._warned:
            logger.info("shared state reachable again url=%s", self.url)
        self.up = True

    # Key rate limits.

    async def admit(self, key_id: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        """Check and count one request fleet-wide: None if admitted, a `Refusal` if over;
        raises `Unreachable` if the store did not answer (the caller then limits alone)."""
        try:
            async with asyncio.timeout(self.timeout):
                verdict, wait = await self._admit(
                    keys=_buckets(key_id), args=[-1 if rpm is None else rpm,
                                                 -1 if tpm is None else tpm])
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("admit", exc)
            raise Unreachable from exc
        self._ok()
        if verdict == 0:
            return None
        return Refusal("rpm" if verdict == 1 else "tpm", float(wait))

    def charge(self, key_id: str, tokens: int) -> None:
        """Count tokens a response used, in the background (off the response's path)."""
        task = asyncio.get_running_loop().create_task(self._charge_now(key_id, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _charge_now(self, key_id: str, tokens: int) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._charge(keys=_buckets(key_id)[1:], args=[tokens])
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("charge", exc)

    # In-flight counts and prefix placement.

    def routed(self, table: RoutingTable, request: RouteRequest, choice: Choice) -> None:
        """The table's hook: note where a request went, for the other gateways' trees."""
        policy = table.policy_for(request.model)
        # Published only while another gateway is there to learn it.
        if isinstance(policy, CacheAware) and self.up and len(self._peers) > 1:
            keys = policy.prefix_keys(request.prompt)
            if keys:
                self._routed.append((request.model, choice.worker.worker_id, b"".join(keys)))

    async def exchange(self, table: RoutingTable) -> None:
        """One round: publish this gateway's in-flight counts and placements, read the
        others'. Raises on a store error."""
        me = f"{_PREFIX}inflight:{self.gateway_id}"
        routed, self._routed = self._routed, []
        async with asyncio.timeout(self.timeout):
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(me, json.dumps(dict(table.inflight)),
                     px=int(max(1.0, 10 * self.interval) * 1000))
            pipe.sadd(_GATEWAYS, self.gateway_id)
            for model, worker, keys in routed:
                pipe.xadd(_ROUTED, {"g": self.gateway_id, "m": model, "w": worker, "k": keys},
                          maxlen=_ROUTED_MAXLEN, approximate=True)
            pipe.smembers(_GATEWAYS)
            peers = [p for p in self._peers if p != self.gateway_id]
            if peers:
                pipe.mget([f"{_PREFIX}inflight:{p}" for p in peers])
            pipe.xread({_ROUTED: self._last_routed}, count=5000)
            results = await pipe.execute()
        members = results[2 + len(routed)]
        self._peers = sorted(m.decode() for m in members)
        remote: Counter[str] = Counter()
        if peers:
            gone = []
            for peer, raw in zip(peers, results[3 + len(routed)], strict=True):
                if raw is None:
                    gone.append(peer)
                    continue
                remote.update({str(w): int(n) for w, n in json.loads(raw).items()})
            if gone:
                await self._redis.srem(_GATEWAYS, *gone)
        table.remote_inflight = remote
        self._learn(table, results[-1])
        self._ok()

    def _learn(self, table: RoutingTable,
               streams: Sequence[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]) -> None:
        for _name, entries in streams:
            for entry_id, fields in entries:
                self._last_routed = entry_id
                if fields[b"g"].decode() == self.gateway_id:
                    continue
                policy = table.policy_for(fields[b"m"].decode())
                if isinstance(policy, CacheAware):
                    raw = fields[b"k"]
                    policy.learn(fields[b"w"].decode(),
                                 [raw[i:i + _KEY_BYTES] for i in range(0, len(raw), _KEY_BYTES)])

    async def run_forever(self, table: RoutingTable) -> None:
        table.on_routed = lambda request, choice: self.routed(table, request, choice)
        while True:
            try:
                await self.exchange(table)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("exchange", exc)
                table.remote_inflight = Counter()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self._redis.srem(_GATEWAYS, self.gateway_id)
                await self._redis.delete(f"{_PREFIX}inflight:{self.gateway_id}")
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self._redis.aclose()
