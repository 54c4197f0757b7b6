"""The worker's view of its engine's prefix cache, fed vLLM's own msgspec-encoded events, and
the gateway's view kept from the worker's answers."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

from fleetcore.kv_blocks import chain_keys
from gateway.kv_view import KvView
from worker.kv_events import KvBlockIndex, KvEventRelay, decode_batch, kv_events_args

BS = 4
ENCODER = msgspec.msgpack.Encoder()


def stored(hashes: list[bytes], tokens: list[int], parent: bytes | None = None,
           **extra: object) -> BlockStored:
    fields: dict[str, object] = {"lora_id": None, "medium": "GPU", "lora_name": None, **extra}
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                       block_size=BS, **fields)


def batch(*events: object) -> bytes:
    return ENCODER.encode(KVEventBatch(ts=1.0, events=list(events)))


def fed(*payloads: bytes) -> tuple[KvEventRelay, KvBlockIndex]:
    index = KvBlockIndex()
    relay = KvEventRelay("ipc:///nowhere", index)
    for seq, payload in enumerate(payloads):
        relay.receive(seq, payload)
    return relay, index


PROMPT = list(range(100, 112))  # three blocks of four


def test_stored_blocks_are_named_by_their_token_ids_not_the_engine_hash() -> None:
    _, index = fed(batch(stored([b"h1", b"h2"], PROMPT[:8])),
                   batch(stored([b"h3"], PROMPT[8:], parent=b"h2")))
    changes = index.changes(None, 0)
    assert changes.reset and changes.block_size == BS
    # The gateway, tokenising the same prompt, computes the same keys.
    assert set(changes.added) == set(chain_keys(PROMPT, BS))
    view = KvView()
    view.apply(changes)
    assert view.match(chain_keys(PROMPT + [7, 7, 7, 7], BS)) == 3
    assert view.match(chain_keys([1, 2, 3, 4] + PROMPT, BS)) == 0


def test_removed_blocks_leave_and_a_reader_gets_only_the_changes() -> None:
    relay, index = fed(batch(stored([b"h1", b"h2", b"h3"], PROMPT)))
    view = KvView()
    view.apply(index.changes(None, 0))
    relay.receive(1, batch(BlockRemoved(block_hashes=[b"h3"], medium="GPU")))
    delta = index.changes(view.epoch, view.seq)
    assert not delta.reset and delta.removed == [chain_keys(PROMPT, BS)[2]] and not delta.added
    view.apply(delta)
    assert view.match(chain_keys(PROMPT, BS)) == 2


def test_all_blocks_cleared_starts_a_new_epoch_with_nothing() -> None:
    relay, index = fed(batch(stored([b"h1", b"h2"], PROMPT[:8])))
    view = KvView()
    view.apply(index.changes(None, 0))
    relay.receive(1, batch(AllBlocksCleared()))
    answer = index.changes(view.epoch, view.seq)
    assert answer.reset and answer.added == [] and answer.epoch != view.epoch
    view.apply(answer)
    assert view.match(chain_keys(PROMPT, BS)) == 0
    # The block size stays known, so gateways key prompts against the cleared engine at once
    # instead of falling back to their estimates until it stores a block again.
    assert answer.block_size == BS and view.block_size == BS


def test_a_new_engine_or_a_gap_in_the_sequence_forgets_everything() -> None:
    relay, index = fed(batch(stored([b"h1"], PROMPT[:4])))
    epoch = index.epoch
    relay.receive(5, batch(stored([b"h9"], PROMPT[4:8], parent=b"h1")))  # 1..4 were missed
    assert index.epoch != epoch and index.size == 0  # h9's parent went with the reset
    relay.receive(6, batch(stored([b"h1"], PROMPT[:4])))
    assert index.size == 1
    relay.engine_started()
    assert index.size == 0 and index.changes(None, 0).added == []


def test_blocks_a_plain_prompt_cannot_hit_are_left_out() -> None:
    _, index = fed(batch(
        stored([b"l"], PROMPT[:4], lora_name="adapter"),
        stored([b"s"], PROMPT[:4], extra_keys=[("salt",)]),
        BlockStored(block_hashes=[b"c"], parent_block_hash=None, token_ids=PROMPT[:4],
                    block_size=BS, lora_id=None, medium="CPU_OFFLOAD", lora_name=None),
        stored([b"orphan"], PROMPT[4:8], parent=b"unknown"),
        stored([b"short"], PROMPT[:3]),  # fewer tokens than its blocks
    ))
    assert index.size == 0


def test_a_block_reported_again_counts_once() -> None:
    relay, index = fed(batch(stored([b"h1"], PROMPT[:4])), batch(stored([b"h1"], PROMPT[:4])))
    assert index.size == 1 and index.changes(index.epoch, 0).added == chain_keys(PROMPT[:4], BS)


def test_a_reader_too_far_behind_gets_the_whole_set() -> None:
    index = KvBlockIndex(max_log=2)
    relay = KvEventRelay("ipc:///nowhere", index)
    relay.receive(0, batch(stored([b"h1", b"h2", b"h3"], PROMPT)))
    answer = index.changes(index.epoch, 0)
    assert answer.reset and len(answer.added) == 3


def test_unreadable_batches_reset_rather_than_guess() -> None:
    relay, index = fed(batch(stored([b"h1"], PROMPT[:4])))
    relay.receive(1, b"\xc1not msgpack")
    assert index.size == 0
    with pytest.raises(ValueError):
        decode_batch(ENCODER.encode([1.0]))


def test_the_engine_flag_is_valid_vllm_config() -> None:
    from vllm.config.kv_events import KVEventsConfig

    flag, value = kv_events_args("ipc:///tmp/x/kv-events")
    config = KVEventsConfig(**msgspec.json.decode(value))
    assert flag == "--kv-events-config" and config.enable_kv_cache_events
    assert config.endpoint == "ipc:///tmp/x/kv-events" and config.publisher == "zmq"


def test_a_long_poll_returns_as_soon_as_blocks_arrive() -> None:
    async def main() -> float:
        relay, index = fed()
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = asyncio.create_task(index.wait_past(index.epoch, index.seq, timeout=10))
        await asyncio.sleep(0)
        relay.receive(0, batch(stored([b"h1"], PROMPT[:4])))
        await asyncio.wait_for(waiting, 5)
        return loop.time() - started

    assert asyncio.run(main()) < 5


# -- the worker's /kv-cache ----------------------------------------------------------------------
def worker_app(index: KvBlockIndex | None):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from worker.app import WorkerMetrics, create_app
    from worker.protocol import TokenizerFiles

    worker = SimpleNamespace(engine_api_key="engine-key-0123456789", kv_index=index,
                             tokenizer_files=TokenizerFiles(tokenizer_json="{}"),
                             metrics=WorkerMetrics())
    return TestClient(create_app(worker))  # type: ignore[arg-type]


AUTH = {"Authorization": "Bearer engine-key-0123456789"}


def test_kv_cache_needs_the_engine_key() -> None:
    client = worker_app(KvBlockIndex())
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for path in ("/kv-cache", "/kv-cache/tokenizer"):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["type"] == \
                "authentication_error"
    assert client.get("/kv-cache/tokenizer", headers=AUTH).json()["tokenizer_json"] == "{}"


def test_kv_cache_answers_the_whole_set_then_changes() -> None:
    index = KvBlockIndex()
    relay = KvEventRelay("ipc:///nowhere", index)
    relay.receive(0, batch(stored([b"h1", b"h2"], PROMPT[:8])))
    client = worker_app(index)
    first = client.get("/kv-cache", headers=AUTH).json()
    assert first["reset"] and sorted(first["added"]) == sorted(chain_keys(PROMPT[:8], BS))
    relay.receive(1, batch(BlockRemoved(block_hashes=[b"h2"], medium="GPU")))
    second = client.get("/kv-cache", headers=AUTH, params={
        "epoch": first["epoch"], "after": first["seq"]}).json()
    assert not second["reset"] and second["removed"] == [chain_keys(PROMPT[:8], BS)[1]]


def test_a_worker_without_events_says_so() -> None:
    answer = worker_app(None).get("/kv-cache", headers=AUTH)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "kv_events_off"


def test_a_wildcard_tcp_endpoint_is_read_on_loopback() -> None:
    from worker.kv_events import connect_address

    assert connect_address("tcp://*:5557") == "tcp://127.0.0.1:5557"
    assert connect_address("ipc:///run/fleet/kv") == "ipc:///run/fleet/kv"
