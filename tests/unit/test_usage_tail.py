"""The usage the gateway charges and counts comes from the last events of a stream."""

from __future__ import annotations

import pytest

from gateway.proxy import usage_from_sse_tail

USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n'
CHUNK = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize("tail", [
    CHUNK + USAGE + DONE,
    USAGE + CHUNK + DONE,  # a later event with "usage": null does not hide the real one
    USAGE,
    USAGE[:-2],  # no blank line after the last event
])
def test_the_last_usage_in_the_tail_is_found(tail: bytes) -> None:
    assert usage_from_sse_tail(tail) == {"prompt_tokens": 3, "completion_tokens": 5}


@pytest.mark.parametrize("tail", [
    b"", DONE, CHUNK + DONE,
    USAGE[20:] + DONE,  # the event that had it was cut off by the tail's start
    b'data: {"choices":[{"delta":{"content":"\\"usage\\""}}]}\n\n' + DONE,
    b'data: {"usage": {"prompt_tokens": 3\n\n' + DONE,  # broken JSON
])
def test_no_usage_without_a_whole_usage_event(tail: bytes) -> None:
    assert usage_from_sse_tail(tail) is None
