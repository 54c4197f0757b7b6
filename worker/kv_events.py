"""What the engine's prefix cache holds, from its own KV events, kept for gateways to read.

The engine (vLLM `--kv-events-config`, ZMQ publisher) binds an IPC socket in the worker's
private folder, so nothing on the network can read or spoof its events; the worker subscribes,
turns each `BlockStored` into `fleetcore.kv_blocks` keys of its token ids, and keeps the set
with a log of changes that gateways read through the worker's `/kv-cache` (worker/app.py).
A new engine, an `AllBlocksCleared`, or a gap in the publisher's sequence numbers starts the
set over under a new epoch: a gateway must never believe in blocks that may be gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from fleetcore.kv_blocks import ROOT, chain_keys
from worker.protocol import KvCacheChanges

logger = logging.getLogger(__name__)

KV_EVENTS_FLAG = "--kv-events-config"
_DECODER = msgspec.msgpack.Decoder()


def kv_events_args(endpoint: str) -> list[str]:
    """The engine flags that make it publish its KV events on `endpoint` (an ipc:// path)."""
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
              "topic": "kv"}
    return [KV_EVENTS_FLAG, json.dumps(config, separators=(",", ":"))]


def decode_batch(payload: bytes) -> list[Mapping[str, Any]]:
    """The events of one published batch (vLLM's `KVEventBatch`: `[ts, events, dp_rank]`, each
    event a map tagged by `type`). Read generically, so fields a release adds change nothing."""
    batch = _DECODER.decode(payload)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch")
    return [e for e in batch[1] if isinstance(e, dict)]


class KvBlockIndex:
    """The engine's cached blocks as keys, with the log of changes since the epoch began."""

    def __init__(self, max_log: int = 200_000) -> None:
        self._max_log = max_log
        self.waiters = asyncio.Event()
        # The engine's block size, from its first stored block. Kept when the set starts over:
        # the worker's engine always runs with the same arguments, and without it a gateway
        # could not key prompts against this engine until its next block is stored, which
        # after a clear is the moment a burst is being placed.
        self.block_size: int | None = None
        self.reset("start")

    def reset(self, reason: str) -> None:
        self.epoch = secrets.token_hex(8)
        self.seq = 0
        self._keys: dict[Hashable, int] = {}  # the engine's block hash: our key
        self._held: collections.Counter[int] = collections.Counter()
        self._log: collections.deque[tuple[int, int, int]] = collections.deque()  # seq, ±1, key
        logger.info("kv cache view starts over epoch=%s reason=%s", self.epoch, reason)
        self._notify()

    @property
    def size(self) -> int:
        return len(self._held)

    def _notify(self) -> None:
        self.waiters.set()
        self.waiters = asyncio.Event()

    def _change(self, sign: int, key: int) -> None:
        self.seq += 1
        self._log.append((self.seq, sign, key))
        if len(self._log) > self._max_log:
            self._log.popleft()

    def apply(self, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            kind = event.get("type")
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                for block in event.get("block_hashes") or ():
                    self._removed(block)
            elif kind == "AllBlocksCleared":
                self.reset("engine cleared its cache")
        self._notify()

    def _stored(self, event: Mapping[str, Any]) -> None:
        hashes, tokens = event.get("block_hashes") or [], event.get("token_ids") or []
        size = event.get("block_size")
        # Blocks of another tier, another LoRA, with a cache salt or images are not what a plain
        # prompt would hit; a partial block is not a prefix of whole blocks.
        if (event.get("medium") not in (None, "GPU", "CPU") or event.get("lora_name")
                or any(event.get("extra_keys") or ()) or not isinstance(size, int)
                or size < 1 or len(tokens) != size * len(hashes)):
            return
        if self.block_size is None:
            self.block_size = size
        elif size != self.block_size:
            return
        parent_hash = event.get("parent_block_hash")
        if parent_hash is None:
            parent = ROOT
        elif (found := self._keys.get(_hashable(parent_hash))) is not None:
            parent = found
        else:
            return  # its parent is gone: no prompt can reach it from the root
        for block, key in zip(hashes, chain_keys(tokens, size, parent), strict=True):
            block = _hashable(block)
            if block in self._keys:
                continue  # a reused block reported again
            self._keys[block] = key
            self._held[key] += 1
            if self._held[key] == 1:
                self._change(+1, key)

    def _removed(self, block: Any) -> None:
        key = self._keys.pop(_hashable(block), None)
        if key is None:
            return
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]
            self._change(-1, key)

    def changes(self, epoch: str | None, after: int) -> KvCacheChanges:
        """What a reader holding (`epoch`, `after`) must apply to hold what the engine holds."""
        oldest = self._log[0][0] if self._log else self.seq + 1
        if epoch != self.epoch or after > self.seq or after + 1 < oldest:
            return KvCacheChanges(epoch=self.epoch, seq=self.seq, block_size=self.block_size,
                                  reset=True, added=list(self._held))
        added: dict[int, None] = {}
        removed: dict[int, None] = {}
        for seq, sign, key in reversed(self._log):
            if seq <= after:
                break
            if key in added or key in removed:
                continue  # the latest change to a key is the one that counts
            (added if sign > 0 else removed)[key] = None
        return KvCacheChanges(epoch=self.epoch, seq=self.seq, block_size=self.block_size,
                              reset=False, added=list(added), removed=list(removed))

    async def wait_past(self, epoch: str | None, after: int, timeout: float) -> None:
        """Return once there is something past (`epoch`, `after`), or after `timeout`."""
        if epoch == self.epoch and after >= self.seq:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.waiters.wait(), timeout)


def _hashable(block: Any) -> Hashable:
    # vLLM sends bytes, or ints with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES; msgpack may hand a
    # list back for an unusual one.
    return tuple(block) if isinstance(block, list) else block


def connect_address(endpoint: str) -> str:
    """Where a subscriber connects to an endpoint the engine binds: `tcp://*:PORT` (every
    interface, for subscribers on other hosts) is reached on loopback."""
    return endpoint.replace("tcp://*:", "tcp://127.0.0.1:", 1)


class KvEventRelay:
    """Subscribes to the engine's publisher and feeds `index`, for the worker's lifetime."""

    def __init__(self, endpoint: str, index: KvBlockIndex) -> None:
        self.endpoint = endpoint
        self.index = index
        self._last_seq: int | None = None
        self.batches = 0

    def engine_started(self) -> None:
        """A new engine: what the last one held is gone."""
        self._last_seq = None
        self.index.reset("engine started")

    def receive(self, seq: int, payload: bytes) -> None:
        if self._last_seq is not None and seq != self._last_seq + 1:
            # Missed batches (or a publisher that started over): the set may hold blocks the
            # engine has dropped since, so it starts over rather than guess.
            self.index.reset(f"event gap after seq={self._last_seq} got seq={seq}")
        self._last_seq = seq
        try:
            events = decode_batch(payload)
        except (msgspec.DecodeError, ValueError) as exc:
            logger.warning("unreadable kv event batch seq=%d error=%r", seq, exc)
            self.index.reset("unreadable event batch")
            return
        self.batches += 1
        self.index.apply(events)

    async def run(self) -> None:
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.connect(connect_address(self.endpoint))
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3:
                    continue
                _, seq, payload = frames
                self.receive(int.from_bytes(seq, "big", signed=True), payload)
        finally:
            socket.close(linger=0)
            context.term()
