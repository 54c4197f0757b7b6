"""Per client key: requests and tokens per minute, and requests in flight; in this process.

Each key has a sliding one-minute window per rate, in one-second buckets (so at most 60 of
them, whatever the traffic). A request is admitted while both windows are under their limits,
and counts one request at once; its tokens are charged when its response ends, from the
engine's `usage`. Requests already running when the token window fills are not stopped, so a
burst of concurrent requests can overshoot the tokens-per-minute limit by what they use.

A key with a `concurrency` limit also has a count of its requests in flight: admission takes a
`KeySlot`, which the request gives back exactly once when it ends (gateway/pipeline.py), and
a request that would exceed the count is refused.

With shared state (gateway/shared_state.py) the rates are checked and counted fleet-wide in the
store (`acquire`), and still counted here, so that a gateway that loses the store goes on with
a window that knows the last minute. In-flight counts stay per gateway.

Hand-written rather than taken from a rate-limit library: those refuse a hit that would exceed
the limit, while token charges arrive after the fact and must always be recorded.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic_core

from fleetcore.errors import RateLimitError
from gateway.auth import Caller
from gateway.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from gateway.shared_state import SharedState

PERIOD = 60.0


class SlidingWindow:
    """Amounts added over the last `period` seconds, in `bucket`-second slots."""

    def __init__(self, period: float = PERIOD, bucket: float = 1.0) -> None:
        self.period = period
        self.bucket = bucket
        self._slots: collections.deque[list[float]] = collections.deque()  # [start, amount]
        self._total = 0.0

    def _expire(self, now: float) -> None:
        slots = self._slots
        while slots and slots[0][0] + self.period <= now:
            self._total -= slots.popleft()[1]

    def used(self, now: float) -> float:
        self._expire(now)
        return self._total

    def add(self, amount: float, now: float) -> None:
        self._expire(now)
        start = math.floor(now / self.bucket) * self.bucket
        if self._slots and self._slots[-1][0] == start:
            self._slots[-1][1] += amount
        else:
            self._slots.append([start, amount])
        self._total += amount

    def retry_after(self, limit: float, now: float) -> float:
        """Seconds until the window holds less than `limit` (0 if it does now)."""
        self._expire(now)
        excess = self._total - limit
        for start, amount in self._slots:
            if excess < 0:
                break
            excess -= amount
            if excess < 0:
                return max(start + self.period - now, 0.0)
        return 0.0


@dataclass
class _KeyWindows:
    requests: SlidingWindow = field(default_factory=SlidingWindow)
    tokens: SlidingWindow = field(default_factory=SlidingWindow)
    in_flight: int = 0  # requests holding a KeySlot (keys with a concurrency limit)


class KeySlot:
    """One request's place among its key's requests in flight, from admission to `release`."""

    __slots__ = ("_windows", "released")

    def __init__(self, windows: _KeyWindows) -> None:
        self._windows = windows
        self.released = False
        windows.in_flight += 1

    def release(self) -> bool:
        """Give the place back; True the first time. Later calls change nothing, so every
        exit path of a request may release, and the first wins."""
        if self.released:
            return False
        self.released = True
        self._windows.in_flight -= 1
        return True


# Nothing says when a request in flight will end; a second is about a short answer's time.
_CONCURRENCY_RETRY_AFTER = 1.0


class KeyLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 shared: SharedState | None = None) -> None:
        self._clock = clock
        self._windows: dict[str, _KeyWindows] = {}
        self.shared = shared

    async def acquire(self, caller: Caller) -> KeySlot | None:
        """`admit`, with the rates checked and counted across every gateway sharing state;
        this gateway's windows alone while the store does not answer."""
        entry = caller.entry
        # A store found down is not waited on per request: its exchange loop says when it is
        # back.
        if self.shared is None or not self.shared.up or (entry.rpm is None and entry.tpm is None):
            return self.admit(caller)
        windows = self._windows_of(caller.key_id)
        if entry.concurrency is not None and windows.in_flight >= entry.concurrency:
            raise _refusal(f"This API key is at its limit of {entry.concurrency} requests in "
                           "flight at once.", _CONCURRENCY_RETRY_AFTER)
        from gateway.shared_state import Unreachable

        try:
            verdict = await self.shared.admit(caller.key_id, entry.rpm, entry.tpm)
        except Unreachable:
            return self.admit(caller)
        if verdict is not None:
            what = f"{entry.rpm} requests" if verdict.limit == "rpm" else f"{entry.tpm} tokens"
            raise _over(f"{what} per minute", verdict.wait)
        windows.requests.add(1, self._clock())
        return KeySlot(windows) if entry.concurrency is not None else None

    def admit(self, caller: Caller) -> KeySlot | None:
        """Count one request against the caller's key; raise RateLimitError (429) if over.

        For a key with a concurrency limit, the request's `KeySlot`, to be released when it
        ends; None for other keys."""
        entry = caller.entry
        rpm, tpm, concurrency = entry.rpm, entry.tpm, entry.concurrency
        if rpm is None and tpm is None and concurrency is None:
            return None
        now = self._clock()
        windows = self._windows_of(caller.key_id)
        if rpm is not None and windows.requests.used(now) >= rpm:
            wait = windows.requests.retry_after(rpm, now)
            raise _over(f"{rpm} requests per minute", wait)
        if tpm is not None and windows.tokens.used(now) >= tpm:
            wait = windows.tokens.retry_after(tpm, now)
            raise _over(f"{tpm} tokens per minute", wait)
        if concurrency is not None and windows.in_flight >= concurrency:
            raise _refusal(f"This API key is at its limit of {concurrency} requests in flight "
                           "at once.", _CONCURRENCY_RETRY_AFTER)
        windows.requests.add(1, now)
        return KeySlot(windows) if concurrency is not None else None

    def charge(self, caller: Caller, tokens: int) -> None:
        """Record tokens a response of the caller used (only keys with a tokens limit)."""
        if caller.entry.tpm is None or tokens <= 0:
            return
        now = self._clock()
        self._windows_of(caller.key_id).tokens.add(tokens, now)
        if self.shared is not None and self.shared.up:
            self.shared.charge(caller.key_id, tokens)

    def _windows_of(self, key_id: str) -> _KeyWindows:
        # Not setdefault: that would build two windows per request just to drop them.
        windows = self._windows.get(key_id)
        if windows is None:
            windows = self._windows[key_id] = _KeyWindows()
        return windows

    def usage(self, key_id: str) -> tuple[float, float]:
        """Requests and tokens in the key's current window (for tests and debugging)."""
        windows = self._windows.get(key_id)
        if windows is None:
            return 0.0, 0.0
        now = self._clock()
        return windows.requests.used(now), windows.tokens.used(now)

    def in_flight(self, key_id: str) -> int:
        """The key's requests holding a slot now (for tests and debugging)."""
        windows = self._windows.get(key_id)
        return windows.in_flight if windows is not None else 0

    def forget(self, live: Iterable[str]) -> None:
        """Drop the windows of keys that left the keys file, once none of their requests is in
        flight (a key removed and added back meanwhile keeps counting them)."""
        keep = set(live)
        for key_id in [k for k, w in self._windows.items() if k not in keep and not w.in_flight]:
            del self._windows[key_id]


def _over(what: str, wait: float) -> RateLimitError:
    return _refusal(f"This API key is over its limit of {what}.", wait)


def _refusal(message: str, wait: float) -> RateLimitError:
    seconds = max(1, math.ceil(wait))
    return RateLimitError(f"{message} Retry in {seconds} s.",
                          headers={"Retry-After": str(seconds)})


def total_tokens(usage: dict[str, Any] | None) -> int | None:
    """Tokens an OpenAI `usage` object reports, or None when there is none."""
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and total >= 0:
        return total
    # OpenAI's names, or Anthropic's (/v1/messages).
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "input_tokens",
                                    "output_tokens")]
    counted = [p for p in parts if isinstance(p, int) and p >= 0]
    return sum(counted) if counted else None


def usage_charger(limiter: KeyLimiter, caller: Caller,
                  request: ChatCompletionRequest | CompletionRequest,
                  max_model_len: int | None) -> Callable[[dict[str, Any] | None], None]:
    """The proxy's usage hook for one request: charges the tokens its response used."""

    def charge(usage: dict[str, Any] | None) -> None:
        tokens = total_tokens(usage)
        if tokens is None:
            # No usage (a stream cut off): charge what the request could have cost, so that
            # leaving a stream just before its end is no way around the limit.
            _, out_tokens = request.output_limit()
            prompt = math.ceil(len(request.prompt_text()) / 4)
            tokens = prompt + (out_tokens or max_model_len or 1024)
        limiter.charge(caller, tokens)

    return charge


def usage_charger_for(limiter: KeyLimiter, caller: Caller,
                      fallback: int) -> Callable[[dict[str, Any] | None], None]:
    """The usage hook of a request the gateway did not read: the tokens of its usage, else
    `fallback`."""

    def charge(usage: dict[str, Any] | None) -> None:
        tokens = total_tokens(usage)
        limiter.charge(caller, fallback if tokens is None else tokens)

    return charge


def ask_for_usage(body: bytes) -> bytes:
    """The request body with `stream_options.include_usage` on, so a stream reports its tokens.

    Only for streams of keys with a tokens limit that did not ask for usage themselves: the
    client then gets one more chunk, with `usage` and empty `choices`, before `[DONE]`.
    """
    return pydantic_core.to_json(with_usage(pydantic_core.from_json(body)))


def with_usage(data: dict[str, Any]) -> dict[str, Any]:
    """`ask_for_usage` on a parsed body."""
    options = data.get("stream_options")
    return {**data, "stream_options": {**(options if isinstance(options, dict) else {}),
                                       "include_usage": True}}
