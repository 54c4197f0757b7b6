"""One routed request, as the pipeline carries it from parsing to its settled end.

Everything a step needs about the request is here, so steps take one object rather than the same
eight values each: what to send where (method, path, body), who asked (caller), what routing looks
at (route), and how the answer is accounted (stream flag, arrival time, usage hook, attempts).

What the request holds for its whole life, beyond any one worker's lease (its key's place among
the key's requests in flight), it gives back through `settle`, once, however it ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.auth import ANONYMOUS, Caller
from gateway.continuation import ResumePlan
from gateway.limits import KeySlot
from gateway.routing import RouteRequest

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

# Told the usage of a response when it ends: None when it had none (a stream cut off).
UsageHook = Callable[[dict[str, Any] | None], None]
# Told the first bytes of a successful answer, and the worker that sent them.
AnswerHook = Callable[[bytes, str], None]


@dataclass
class RoutedRequest:
    request_id: str
    started: float  # monotonic arrival time: latency and time to first byte count from here
    path: str
    endpoint: str = "chat"  # the metrics label of the path
    method: str = "POST"
    model: str = "unknown"  # the metrics label: a served model's name, or "unknown"
    caller: Caller = ANONYMOUS
    body: bytes = b""  # read whole, as a JSON request is: sent as it came
    fields: dict[str, Any] | None = None  # a JSON body, parsed (not to be changed)
    upload: AsyncIterable[bytes] | None = None  # or a body streamed through as it arrives
    content_type: str = "application/json"
    stream: bool = False
    route: RouteRequest | None = None
    on_usage: UsageHook | None = None
    on_answer: AnswerHook | None = None
    policy: str = "-"
    tried: set[str] = field(default_factory=set)  # workers this request was sent to
    slot: KeySlot | None = None  # its key's place in flight, for a key with a concurrency limit
    settled: bool = False
    resume: ResumePlan | None = None  # a stream that another worker can continue, and how
    trace: RequestTrace | None = None  # its spans, while tracing is on (gateway/tracing.py)

    @property
    def upstream_body(self) -> bytes | AsyncIterable[bytes]:
        return self.upload if self.upload is not None else self.body

    @property
    def attempts(self) -> int:
        return len(self.tried)

    def settle(self) -> bool:
        """The request ended (answered, refused, failed, abandoned): give back what it held.
        True the first time; later calls change nothing, so every exit path may settle."""
        if self.settled:
            return False
        self.settled = True
        if self.slot is not None:
            self.slot.release()
        return True
