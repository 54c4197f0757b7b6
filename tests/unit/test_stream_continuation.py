"""Continuing a stream on another worker, without engines: what a stream may be continued as,
what its relay keeps and strips, how a continuation is re-shaped and counted, and that every
lease is settled once whatever fails where (property test over scripted engines).
"""

from __future__ import annotations

import json
from typing import Any

import pydantic_core
import pytest

from gateway.continuation import CHAT, COMPLETIONS, ResumePlan, StreamTrack, plan
from gateway.reshape import Answer, Reshaper, Seam, continuation_body, held_text
from gateway.routed_request import RoutedRequest

CHAT_BODY: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 10,
                             "messages": [{"role": "user", "content": "hi"}]}


def _plan(path: str = CHAT, **changes: Any) -> ResumePlan:
    result = plan(path, {**CHAT_BODY, **changes}, None, True)
    assert isinstance(result, ResumePlan), result
    return result


# --- what may be continued ---

@pytest.mark.parametrize(("changes", "why"), [
    ({"n": 2}, "n"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "structured output"),
    ({"structured_outputs": {"regex": "a+"}}, "structured output"),
])
def test_what_cannot_be_continued_exactly_is_not(changes: dict, why: str) -> None:
    assert plan(CHAT, {**CHAT_BODY, **changes}, None, True) == why


def test_a_completion_of_several_prompts_or_with_logprobs_is_not_continued() -> None:
    body = {"model": "m", "stream": True, "prompt": ["a", "b"]}
    assert plan(COMPLETIONS, body, None, True) == "several prompts"
    assert plan(COMPLETIONS, {**body, "prompt": "a", "logprobs": 1}, None, True) == "logprobs"
    assert plan(COMPLETIONS, {**body, "prompt": "a", "echo": True}, None, True) == "echo"
    assert isinstance(plan(COMPLETIONS, {**body, "prompt": [1, 2]}, None, True), ResumePlan)


def test_the_client_or_the_operator_can_turn_it_off() -> None:
    assert plan(CHAT, CHAT_BODY, "off", True) == "opted out"
    assert plan(CHAT, CHAT_BODY, None, False) == "off"
    assert isinstance(plan(CHAT, CHAT_BODY, "on", True), ResumePlan)


def test_tools_the_request_does_not_use_and_seeds_are_continued() -> None:
    assert isinstance(plan(CHAT, {**CHAT_BODY, "tools": [{}], "tool_choice": "none"},
                           None, True), ResumePlan)
    seeded = _plan(seed=7, temperature=0.8)
    assert seeded.sampling == {"seed": 7, "temperature": 0.8}


def test_the_output_limit_is_what_the_engine_would_apply() -> None:
    assert _plan().max_tokens == 10
    assert _plan(max_completion_tokens=5).max_tokens == 5
    assert plan(CHAT, {**CHAT_BODY, "max_tokens": None}, None, True).max_tokens is None  # type: ignore[union-attr]
    completion = plan(COMPLETIONS, {"model": "m", "prompt": "a"}, None, True)
    assert isinstance(completion, ResumePlan) and completion.max_tokens == 16  # vLLM's default


def test_the_stop_buffer_is_the_longest_stop_string_less_one() -> None:
    assert _plan(stop=["\n\n", "END!"]).hold == 3
    assert _plan(stop="x").hold == 0
    assert _plan(stop=["abc"], include_stop_str_in_output=True).hold == 0


# --- the relay's track: vLLM-shaped events ---

def chat_event(content: str | None, ids: list[int] | None, *, role: bool = False,
               prompt: list[int] | None = None, finish: str | None = None,
               with_ids: bool = True) -> bytes:
    """A chat chunk as vLLM writes it (exclude_unset), with or without return_token_ids."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}
    if not role:
        choice["token_ids"] = ids if with_ids else None
    event: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                             "created": 5, "model": "m", "choices": [choice]}
    if role:
        event["prompt_token_ids"] = prompt if with_ids else None
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def completion_event(text: str, ids: list[int], *, prompt: list[int] | None = None,
                     finish: str | None = None, with_ids: bool = True,
                     id_: str = "cmpl-1", created: int = 5) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
              "stop_reason": None, "prompt_token_ids": prompt if with_ids else None,
              "token_ids": ids if with_ids else None}
    event = {"id": id_, "object": "text_completion", "created": created, "model": "m",
             "choices": [choice]}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def usage_event(prompt: int, completion: int, id_: str = "cmpl-9") -> bytes:
    event = {"id": id_, "object": "text_completion", "created": 9, "model": "m",
             "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                      "total_tokens": prompt + completion}}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def original_stream(with_ids: bool) -> list[bytes]:
    return [chat_event("", None, role=True, prompt=[1, 2, 3], with_ids=with_ids),
            chat_event("Hel", [10], with_ids=with_ids),
            chat_event("lo", [11], with_ids=with_ids),
            chat_event(None, [12], with_ids=with_ids),  # an unfinished character: no text
            chat_event(" wo", [13], with_ids=with_ids)]


def test_the_client_gets_the_bytes_it_would_get_without_token_ids() -> None:
    track = StreamTrack(_plan())
    relayed = [track.feed(chunk) for chunk in original_stream(with_ids=True)]
    plain = original_stream(with_ids=False)
    del plain[3]  # vLLM sends a textless delta only because token ids were asked for
    assert b"".join(relayed) == b"".join(plain)
    assert track.prompt_ids == b"1,2,3"
    assert track.generated_ids() == [10, 11, 12, 13]
    assert track.head is not None and track.head["id"] == "chatcmpl-1"
    assert not track.finished and not track.done


def test_token_ids_the_client_asked_for_are_relayed_as_they_came() -> None:
    track = StreamTrack(_plan(return_token_ids=True))
    chunks = original_stream(with_ids=True)
    assert [track.feed(c) for c in chunks] == chunks


def test_an_event_cut_across_chunks_is_relayed_whole_once_its_rest_came() -> None:
    track = StreamTrack(_plan())
    joined = b"".join(original_stream(with_ids=True))
    pieces = [joined[i:i + 7] for i in range(0, len(joined), 7)]
    relayed = b"".join(track.feed(p) for p in pieces)
    assert relayed.count(b"\n\n") == 4 and b'"token_ids":[' not in relayed
    assert track.generated_ids() == [10, 11, 12, 13]


def test_tokens_whose_text_is_still_held_are_counted_as_pending() -> None:
    track = StreamTrack(_plan())
    for chunk in original_stream(with_ids=True)[:4]:
        track.feed(chunk)
    assert track.pending == 1  # token 12 has no text yet
    track.feed(chat_event(" wo", [13]))
    assert track.pending == 0


def test_an_engine_error_event_is_kept_back_with_what_follows() -> None:
    track = StreamTrack(_plan())
    error = b'data: {"error":{"message":"boom","type":"InternalServerError","code":500}}\n\n'
    out = track.feed(chat_event("Hi", [10]) + error + b"data: [DONE]\n\n")
    assert out.count(b"\n\n") == 1 and b"boom" not in out
    assert track.error is not None and b"boom" in track.error
    assert not track.done


def test_a_stream_cut_after_its_finish_and_usage_gets_only_its_done() -> None:
    from gateway.reshape import finish_only

    track = StreamTrack(_plan(stream_options={"include_usage": True}))
    track.feed(chat_event("", None, role=True, prompt=[1, 2, 3]))
    track.feed(chat_event("Hi", [10], finish="stop"))
    track.feed(usage_event(3, 1, id_="chatcmpl-1"))
    answer = Answer.from_track(track)
    assert answer is not None and answer.finished
    assert finish_only(answer, "stop") == b"data: [DONE]\n\n"


def test_tool_calls_or_reasoning_in_the_stream_make_it_not_continuable() -> None:
    track = StreamTrack(_plan())
    track.feed(chat_event("", None, role=True, prompt=[1]))
    track.feed(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
               b'"choices":[{"index":0,"delta":{"reasoning":"hm"},"token_ids":[4]}]}\n\n')
    assert track.unparsed and Answer.from_track(track) is None
    track.feed(chat_event("The answer", [5]))  # past the reasoning: plain text again
    assert not track.unparsed and Answer.from_track(track) is not None


# --- the continuation: its request, its re-shaped chunks, its count ---

def _answer(plan_: ResumePlan, generated: list[int], *, texts: list[str] | None = None,
            pending: int = 0) -> Answer:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk" if plan_.chat
            else "text_completion", "created": 5, "model": "m"}
    return Answer(plan=plan_, head=head, prompt_ids=[1, 2, 3], generated=list(generated),
                  pending=pending, texts=texts, completion_tokens=len(generated))


def test_the_continuation_asks_for_the_rest_from_token_ids() -> None:
    answer = _answer(_plan(temperature=0, stop=["x"], min_tokens=3, top_k=5), [10, 11])
    body = pydantic_core.from_json(continuation_body(answer, "m", 2))
    assert body["prompt"] == [1, 2, 3, 10, 11]
    assert body["max_tokens"] == 8 and body["min_tokens"] == 1
    assert body["temperature"] == 0 and body["top_k"] == 5 and body["stop"] == ["x"]
    assert body["stream"] and body["return_token_ids"]
    assert body["stream_options"] == {"include_usage": True}
    assert "messages" not in body and "n" not in body


def test_tokens_with_unrelayed_text_are_generated_again() -> None:
    answer = _answer(_plan(), [10, 11, 12], pending=1)
    assert answer.cut() == 2
    body = pydantic_core.from_json(continuation_body(answer, "m", answer.cut()))
    assert body["prompt"] == [1, 2, 3, 10, 11] and body["max_tokens"] == 8


def _events(data: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in data.split(b"\n\n") if e.startswith(b"data: {")]


def test_a_continuation_reads_as_the_original_chat_stream() -> None:
    answer = _answer(_plan(stream_options={"include_usage": True}), [10, 11])
    shaper = Reshaper(answer, 2, "")
    out = b""
    for chunk in (completion_event(" wor", [13], prompt=[1, 2, 3, 10, 11], id_="cmpl-9",
                                   created=9),
                  completion_event("ld", [14], finish="length", id_="cmpl-9", created=9),
                  usage_event(5, 2)):
        out += shaper.feed(pydantic_core.from_json(chunk[6:]))
    out += shaper.end()
    events = _events(out)
    assert {e["id"] for e in events} == {"chatcmpl-1"} and {e["created"] for e in events} == {5}
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert "".join(c["delta"]["content"] for e in events for c in e["choices"]) == " world"
    assert [c["finish_reason"] for e in events for c in e["choices"]] == [None, "length"]
    assert not any(c["delta"].get("role") for e in events for c in e["choices"])
    assert all(c["token_ids"] is None for e in events for c in e["choices"])
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                   "total_tokens": 7}
    assert out.endswith(b"data: [DONE]\n\n")


def test_a_continued_completion_stays_a_completion_without_usage_unless_asked() -> None:
    plan_ = plan(COMPLETIONS, {"model": "m", "prompt": "a", "stream": True}, None, True)
    assert isinstance(plan_, ResumePlan)
    answer = _answer(plan_, [10])
    shaper = Reshaper(answer, 1, "")
    out = shaper.feed(pydantic_core.from_json(completion_event("b", [11], finish="stop")[6:]))
    out += shaper.end()
    events = _events(out)
    assert [e["choices"][0]["text"] for e in events] == ["b"]
    assert events[0]["object"] == "text_completion" and events[0]["id"] == "chatcmpl-1"
    assert not any("usage" in e for e in events)
    assert answer.usage()["completion_tokens"] == 2


def test_a_stop_string_across_the_seam_ends_the_answer_there() -> None:
    seam = Seam(held="ab\n", stops=("\n\n", "STOP"), hold=3, include_stop=False)
    assert seam.feed("\n", final=False) == ("", None)  # not enough seen yet
    assert seam.feed("Xyz", final=False) == ("ab", "\n\n")


def test_text_after_the_seam_joins_when_no_stop_straddles_it() -> None:
    seam = Seam(held="ab", stops=("\n\n",), hold=1, include_stop=False)
    assert seam.feed("cd", final=False) == ("abcd", None)
    assert seam.feed("ef", final=False) == ("ef", None)


def test_a_stop_included_in_the_output_is_kept() -> None:
    seam = Seam(held="a\n", stops=("\n\n",), hold=1, include_stop=True)
    assert seam.feed("\nmore", final=False) == ("a\n\n", "\n\n")


def test_the_held_text_is_what_the_client_has_not_seen() -> None:
    assert held_text("Hello wor", "Hello", 3) == " wor"
    assert held_text("Paris is", " Paris", 2) == " is"  # a leading space lost in decoding
    assert held_text("zzz", "abc", 2) == "zz"


# --- the pipeline: what the engine is sent ---

class _Headers:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def _pipeline(**settings: Any) -> Any:
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    app = create_app(GatewaySettings(controller_address="http://127.0.0.1:9", **settings))
    return app.state.pipeline


@pytest.mark.parametrize(("headers", "settings_", "continued"), [
    ({}, {}, True), ({"x-fleet-continue": "off"}, {}, False),
    ({}, {"max_continuations": 0}, False)])
def test_a_continuable_stream_asks_the_engine_for_token_ids(
        headers: dict, settings_: dict, continued: bool) -> None:
    pipeline = _pipeline(**settings_)
    routed = RoutedRequest(request_id="r", started=0.0, path=CHAT,
                           body=json.dumps(CHAT_BODY).encode(), stream=True)
    pipeline.plan_continuation(_Headers(headers), routed, ask_usage=True)
    sent = json.loads(routed.body)
    assert sent["stream_options"] == {"include_usage": True}  # the key's tokens limit
    assert (routed.resume is not None) is continued
    assert sent.get("return_token_ids", False) is continued
    if continued:
        assert routed.resume is not None and routed.resume.include_usage
