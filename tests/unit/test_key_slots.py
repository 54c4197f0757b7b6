"""A key's requests in flight: a slot taken at admission, given back once however a request ends.

Property tests drive random sequences against the limiter alone (admit, release, release again,
keys file reloads), and random requests through the real entry path (`GenerateRoutes` and the
pipeline) over a scripted proxy: plain answers, refusals, bugs, streams read to the end, clients
that leave before or during a stream, tasks cancelled anywhere. What must balance: the key's
count is the number of requests holding a slot at every step, never above the limit, a 429 is
given only when the key is full, and the count is back to zero at the end.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import Response

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from fleetcore.errors import BadGatewayError, RateLimitError
from gateway.asgi import ClientWatch, GenerateRoutes, RelayResponse
from gateway.auth import Authenticator, Caller
from gateway.keys import KeyEntry
from gateway.limits import KeyLimiter, KeySlot
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.protocol import ChatCompletionRequest
from gateway.routed_request import RoutedRequest
from gateway.routing import LeastLoad
from gateway.routing_table import RoutingTable
from gateway.settings import GatewaySettings

KEYS = ("a", "b")


def _caller(key_id: str, limit: int) -> Caller:
    return Caller(key_id=key_id, entry=KeyEntry(name=key_id, concurrency=limit))


_LIMITER_OPS = st.one_of(
    st.tuples(st.just("admit"), st.sampled_from(KEYS)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("reload"), st.sets(st.sampled_from(KEYS))),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_LIMITER_OPS, max_size=80), limit=st.integers(1, 4))
def test_the_count_is_the_unreleased_slots_over_any_sequence(ops: list[tuple], limit: int
                                                             ) -> None:
    limiter = KeyLimiter()
    slots: list[tuple[str, KeySlot]] = []
    for op in ops:
        if op[0] == "admit":
            held = sum(1 for k, s in slots if k == op[1] and not s.released)
            try:
                slot = limiter.admit(_caller(op[1], limit))
            except RateLimitError:
                assert held == limit  # refused only when the key is full
            else:
                assert slot is not None and held < limit
                slots.append((op[1], slot))
        elif op[0] == "reload":
            limiter.forget(op[1])  # the keys file now holds only these keys
        elif slots:
            _, slot = slots[op[1] % len(slots)]
            was_held = not slot.released
            assert slot.release() is was_held
        for key in KEYS:
            held = sum(1 for k, s in slots if k == key and not s.released)
            assert limiter.in_flight(key) == held <= limit
    for _, slot in slots:
        slot.release()
    assert all(limiter.in_flight(key) == 0 for key in KEYS)


# --- through the pipeline ---

KINDS = ("plain", "refused", "bug", "stream")
CLIENTS = ("stays", "leaves_at_start", "leaves_midway")


@dataclass(frozen=True)
class Plan:
    kind: str
    turns: int  # loop turns spent before answering, and chunks of a stream
    client: str
    cancel_after: int | None  # loop turns after which the request's task is cancelled


_PLANS = st.builds(Plan, st.sampled_from(KINDS), st.integers(0, 3), st.sampled_from(CLIENTS),
                   st.none() | st.integers(0, 6))


class OneKey(Authenticator):
    def __init__(self, caller: Caller) -> None:
        super().__init__()
        self.caller = caller

    def authenticate(self, authorization: str | None) -> Caller:
        return self.caller


class Scenario:
    """Requests of one key through the real pipeline, over a proxy that follows each one's plan
    and keeps `active`: the requests between reaching the proxy and ending, by the proxy's
    own account (the body's `finally`, or the response's close for a relay never begun)."""

    def __init__(self, limit: int, plans: list[Plan]) -> None:
        self.limit = limit
        self.plans = plans
        self.limiter = KeyLimiter()
        self.active: set[str] = set()
        self.refusals = 0
        table = RoutingTable(LeastLoad(random.Random(0)))
        table.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6, models=["m"],
                              workers=[WorkerRecord(worker_id="w", engine_url="http://x:9",
                                                    model_names=["m"], state=WorkerState.READY,
                                                    registered_at=0, last_heartbeat=0)]))
        pipeline = Pipeline(GatewaySettings(), auth=OneKey(_caller("k", limit)),
                            limiter=self.limiter, table=table, metrics=GatewayMetrics(table),
                            proxy=self)  # type: ignore[arg-type]

        async def chat(request):  # type: ignore[no-untyped-def]
            return await pipeline.generate(request, "/v1/chat/completions",
                                           ChatCompletionRequest)

        async def fallback(scope, receive, send):  # type: ignore[no-untyped-def]
            raise AssertionError("only the generation route is called")

        self.app = GenerateRoutes(fallback, {"/v1/chat/completions": chat})

    def observe(self) -> None:
        in_flight = self.limiter.in_flight("k")
        assert in_flight == len(self.active) <= self.limit

    async def forward(self, routed: RoutedRequest, watch: ClientWatch
                      ) -> Response | RelayResponse:
        watch.close()
        rid = routed.request_id
        plan = self.plans[int(rid[1:])]
        self.active.add(rid)
        self.observe()
        streaming = False
        try:
            for _ in range(plan.turns):
                await asyncio.sleep(0)
                self.observe()
            if plan.kind == "refused":
                raise BadGatewayError("the worker broke off")
            if plan.kind == "bug":
                raise RuntimeError("a bug in the proxy")
            if plan.kind == "plain":
                return Response(b"{}", media_type="application/json")
            streaming = True
            return RelayResponse(self._body(rid, plan.turns), 200, {}, "text/event-stream",
                                 on_close=lambda: self.active.discard(rid))
        finally:
            if not streaming:
                self.active.discard(rid)

    async def _body(self, rid: str, chunks: int) -> AsyncIterator[bytes]:
        try:
            for _ in range(chunks):
                self.observe()
                yield b"data: x\n\n"
                await asyncio.sleep(0)
        finally:
            self.active.discard(rid)

    async def call(self, index: int) -> None:
        plan = self.plans[index]
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"content-type", b"application/json"),
                             (b"x-request-id", f"r{index}".encode())],
                 "query_string": b""}
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays connected
            return {}

        chunks = 0

        async def send(message: dict) -> None:
            nonlocal chunks
            if message["type"] == "http.response.start":
                if message["status"] == 429:
                    # Nothing ran between the refusal and its answer: the key was full.
                    assert self.limiter.in_flight("k") == self.limit
                    self.refusals += 1
                if plan.client == "leaves_at_start":
                    raise OSError("client gone")
            elif message.get("more_body"):
                chunks += 1
                if plan.client == "leaves_midway" and chunks >= 1:
                    raise OSError("client gone")
            await asyncio.sleep(0)

        await self.app(scope, receive, send)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.call(i)) for i in range(len(self.plans))]

        async def cancel(task: asyncio.Task[None], turns: int) -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()

        cancellers = [asyncio.create_task(cancel(task, plan.cancel_after))
                      for task, plan in zip(tasks, self.plans, strict=True)
                      if plan.cancel_after is not None]
        results = await asyncio.gather(*tasks, *cancellers, return_exceptions=True)
        assert all(r is None or isinstance(r, OSError | asyncio.CancelledError)
                   for r in results), results
        self.observe()
        assert self.limiter.in_flight("k") == 0 and not self.active


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 3), plans=st.lists(_PLANS, min_size=1, max_size=16))
def test_every_exit_path_gives_the_slot_back_once(limit: int, plans: list[Plan]) -> None:
    scenario = Scenario(limit, plans)
    asyncio.run(scenario.run())


def test_the_key_over_its_limit_is_refused_while_its_streams_run() -> None:
    """Two streams of a key limited to two hold their slots to the end: a third is refused."""
    plans = [Plan("stream", 3, "stays", None)] * 3
    scenario = Scenario(2, plans)
    asyncio.run(scenario.run())
    assert scenario.refusals == 1
