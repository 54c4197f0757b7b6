"""Per-key requests- and tokens-per-minute windows, on a clock the tests move by hand."""

from __future__ import annotations

import json

import pytest

from fleetcore.errors import RateLimitError
from gateway.auth import Caller
from gateway.keys import KeyEntry
from gateway.limits import (
    KeyLimiter,
    SlidingWindow,
    ask_for_usage,
    total_tokens,
    usage_charger,
)
from gateway.protocol import ChatCompletionRequest


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def caller(key_id: str = "k", **limits: int) -> Caller:
    return Caller(key_id=key_id, entry=KeyEntry(name=key_id, **limits))


def retry_after(exc: pytest.ExceptionInfo[RateLimitError]) -> int:
    return int(exc.value.headers["Retry-After"])


def test_window_forgets_what_is_older_than_its_period() -> None:
    window = SlidingWindow(period=60)
    window.add(5, now=0.2)
    window.add(3, now=30.5)
    assert window.used(59.9) == 8
    assert window.used(60.0) == 3
    assert window.used(90.5) == 0


def test_window_keeps_at_most_one_slot_per_second() -> None:
    window = SlidingWindow(period=60)
    for i in range(10_000):
        window.add(1, now=i * 0.01)  # 100 s of traffic, 100 adds a second
    assert len(window._slots) <= 61
    assert window.used(100.0) == 5900  # seconds 41-99; a slot leaves when its second is 60 s old


def test_window_retry_after_is_when_enough_has_expired() -> None:
    window = SlidingWindow(period=60)
    window.add(4, now=10.0)
    window.add(4, now=20.0)
    assert window.retry_after(limit=8, now=25.0) == pytest.approx(45.0)  # the first slot goes
    assert window.retry_after(limit=3, now=25.0) == pytest.approx(55.0)  # both must go
    assert window.retry_after(limit=9, now=25.0) == 0


def test_rpm_admits_up_to_the_limit_then_429_with_retry_after() -> None:
    clock = Clock(1000.0)
    limiter = KeyLimiter(clock)
    alice = caller(rpm=3)
    for _ in range(3):
        limiter.admit(alice)
    with pytest.raises(RateLimitError) as info:
        limiter.admit(alice)
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert retry_after(info) == 60 and "3 requests per minute" in info.value.message
    clock.now += 30
    with pytest.raises(RateLimitError) as info:
        limiter.admit(alice)
    assert retry_after(info) == 30
    clock.now += 30
    limiter.admit(alice)  # the first minute's requests have left the window


def test_refused_requests_do_not_count() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock)
    alice = caller(rpm=1)
    limiter.admit(alice)
    for _ in range(5):
        with pytest.raises(RateLimitError):
            limiter.admit(alice)
    clock.now += 60
    limiter.admit(alice)


def test_keys_have_separate_windows_and_no_limit_means_none() -> None:
    limiter = KeyLimiter(Clock())
    limiter.admit(caller("a", rpm=1))
    limiter.admit(caller("b", rpm=1))
    for _ in range(100):
        limiter.admit(caller("free"))
    assert limiter.usage("free") == (0, 0)


def test_tpm_refuses_once_the_charged_tokens_reach_the_limit() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock)
    bob = caller(tpm=100)
    limiter.admit(bob)
    limiter.charge(bob, 60)
    limiter.admit(bob)  # 60 < 100: still admitted
    clock.now += 10
    limiter.charge(bob, 60)
    with pytest.raises(RateLimitError) as info:
        limiter.admit(bob)
    assert "100 tokens per minute" in info.value.message
    assert retry_after(info) == 50  # when the first 60 tokens leave the window
    clock.now += 50
    limiter.admit(bob)


def test_tokens_of_keys_without_a_tpm_are_not_kept() -> None:
    limiter = KeyLimiter(Clock())
    limiter.charge(caller("a", rpm=5), 1000)
    assert limiter.usage("a") == (0, 0)


def test_forget_drops_keys_that_left_the_file() -> None:
    limiter = KeyLimiter(Clock())
    limiter.admit(caller("gone", rpm=5))
    limiter.admit(caller("kept", rpm=5))
    limiter.forget({"kept"})
    assert limiter.usage("gone") == (0, 0) and limiter.usage("kept") == (1, 0)


def test_concurrency_admits_up_to_the_limit_then_429_until_one_ends() -> None:
    limiter = KeyLimiter(Clock())
    carol = caller(concurrency=2)
    first, second = limiter.admit(carol), limiter.admit(carol)
    assert first is not None and second is not None and limiter.in_flight("k") == 2
    with pytest.raises(RateLimitError) as info:
        limiter.admit(carol)
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert retry_after(info) == 1 and "2 requests in flight" in info.value.message
    assert first.release() and not first.release()  # a second release changes nothing
    assert limiter.in_flight("k") == 1
    third = limiter.admit(carol)
    assert third is not None and limiter.in_flight("k") == 2


def test_keys_without_a_concurrency_limit_hold_no_slot() -> None:
    limiter = KeyLimiter(Clock())
    assert limiter.admit(caller(rpm=5)) is None and limiter.admit(caller("free")) is None
    assert limiter.in_flight("k") == 0


def test_a_request_refused_by_one_limit_uses_none_of_the_others() -> None:
    limiter = KeyLimiter(Clock())
    dave = caller(rpm=2, concurrency=1)
    slot = limiter.admit(dave)
    with pytest.raises(RateLimitError, match="in flight"):
        limiter.admit(dave)
    assert limiter.usage("k") == (1, 0)  # the refused one did not count a request
    assert slot is not None and slot.release()
    limiter.admit(dave)
    with pytest.raises(RateLimitError, match="requests per minute"):
        limiter.admit(dave)
    assert limiter.in_flight("k") == 1  # nor did the one over the rpm take a slot


def test_forget_keeps_a_removed_key_until_its_requests_end() -> None:
    limiter = KeyLimiter(Clock())
    slot = limiter.admit(caller("gone", concurrency=3))
    limiter.forget(set())
    assert limiter.in_flight("gone") == 1
    assert slot is not None and slot.release()
    limiter.forget(set())
    assert limiter.in_flight("gone") == 0 and "gone" not in limiter._windows


@pytest.mark.parametrize("usage, tokens", [
    ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}, 12),
    ({"prompt_tokens": 5, "completion_tokens": 7}, 12),
    ({"completion_tokens": 7}, 7),
    ({}, None),
    (None, None),
    ("garbage", None),
    ({"total_tokens": "12"}, None),
])
def test_total_tokens_from_usage(usage: object, tokens: int | None) -> None:
    assert total_tokens(usage) == tokens  # type: ignore[arg-type]


def test_ask_for_usage_turns_include_usage_on_and_keeps_the_rest() -> None:
    body = b'{"model": "m", "stream": true, "stream_options": {"x": 1}, "extra": [1, 2]}'
    data = json.loads(ask_for_usage(body))
    assert data == {"model": "m", "stream": True, "extra": [1, 2],
                    "stream_options": {"x": 1, "include_usage": True}}
    assert json.loads(ask_for_usage(b'{"stream": true}'))["stream_options"] == {
        "include_usage": True}


def test_usage_charger_charges_reported_usage_or_the_most_a_cut_off_request_could_cost() -> None:
    limiter = KeyLimiter(Clock())
    key = caller(tpm=10_000)
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "x" * 391}]})
    charge = usage_charger(limiter, key, request, max_model_len=4096)
    charge({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    assert limiter.usage("k") == (0, 7)
    charge(None)  # "<user>" + 391 characters + "\n" is 398: 100 prompt tokens at 4 a token
    assert limiter.usage("k") == (0, 7 + 100 + 50)
    unbounded = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    usage_charger(limiter, key, unbounded, max_model_len=4096)(None)
    assert limiter.usage("k")[1] == 157 + 3 + 4096
