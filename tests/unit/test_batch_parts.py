"""`fleet batch` pieces: input lines, result records, resume bookkeeping, backoff, settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.batch.cli import BatchSettings
from fleet.batch.jobs import (
    CHAT,
    COMPLETIONS,
    Defaults,
    InputError,
    ResultsFile,
    error_record,
    is_success,
    parse_lines,
    success_record,
)
from fleet.batch.offline import UnsupportedParameter, sampling_kwargs
from fleet.batch.online import backoff_delay
from fleet.batch.report import Tally

DEFAULTS = Defaults(model="served", max_tokens=16, temperature=0.0)


def line(custom_id: str, body: dict, **extra: object) -> str:
    return json.dumps({"custom_id": custom_id, "body": body, **extra})


def test_a_line_with_input_is_an_embedding_and_gets_no_sampling_defaults() -> None:
    jobs = parse_lines([line("e", {"input": ["a", "b"], "encoding_format": "float"})],
                       Defaults(model="m", max_tokens=64, temperature=0.5))
    assert jobs[0].url == "/v1/embeddings"
    assert jobs[0].body == {"model": "m", "input": ["a", "b"], "encoding_format": "float"}


def test_plain_text_lines_are_user_messages_numbered_by_line() -> None:
    jobs = parse_lines(["What is 2+2?\n", "\n", "Name a colour.\n"],
                       Defaults(model="m", system="Be brief."))
    assert [j.custom_id for j in jobs] == ["line-1", "line-3"]
    assert [j.index for j in jobs] == [0, 2]
    assert jobs[1].url == CHAT
    assert jobs[1].body == {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]}


def test_openai_batch_lines_keep_their_body_and_get_the_model_and_defaults() -> None:
    jobs = parse_lines([
        line("a", {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 99, "stream": True, "top_k": 5},
             method="POST", url="/v1/chat/completions"),
        line("b", {"prompt": "Once upon"}, url="/completions"),
    ], DEFAULTS)
    assert jobs[0].body == {"model": "served", "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 99, "temperature": 0.0, "top_k": 5}
    assert (jobs[1].url, jobs[1].body["max_tokens"]) == (COMPLETIONS, 16)


def test_the_url_is_inferred_from_the_body() -> None:
    jobs = parse_lines([line("c", {"messages": [{"role": "user", "content": "x"}]}),
                        line("p", {"prompt": "x"})], DEFAULTS)
    assert [j.url for j in jobs] == [CHAT, COMPLETIONS]


def test_a_text_line_that_looks_like_json_but_is_not_an_object_is_text() -> None:
    jobs = parse_lines(["{not json at all", "[1, 2]"], DEFAULTS)
    assert [j.body["messages"][-1]["content"] for j in jobs] == ["{not json at all", "[1, 2]"]


@pytest.mark.parametrize("text, message", [
    (json.dumps({"custom_id": "x"}), "line 1: a JSON line needs a 'body'"),
    (line("x", {"temperature": 1}), "none of 'messages', 'prompt' and 'input'"),
    (line("x", {"messages": []}), "'messages' must be a non-empty list"),
    (line("x", {"prompt": "p"}, url="/v1/images"), "is not one of /v1/chat/completions"),
    (line("", {"prompt": "p"}), "'custom_id' must be a non-empty string"),
    (line("x", {"prompt": "p"}, method="GET"), "method must be POST"),
])
def test_bad_lines_are_named(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_lines([text], DEFAULTS)


def test_a_repeated_custom_id_is_refused() -> None:
    with pytest.raises(InputError, match="line 3: custom_id 'a' repeats line 1"):
        parse_lines([line("a", {"prompt": "1"}), line("b", {"prompt": "2"}),
                     line("a", {"prompt": "3"})], DEFAULTS)


def test_records_tell_success_from_failure() -> None:
    job = parse_lines(["Hi"], DEFAULTS)[0]
    ok = success_record(job, {"usage": {"prompt_tokens": 3, "completion_tokens": 4}},
                        request_id="r1", worker="w0")
    assert is_success(ok) and ok["response"]["worker"] == "w0"
    assert ok["id"].startswith("batch_req_") and ok["custom_id"] == "line-1"
    failed = error_record(job, "no worker", code="no_worker_available", status_code=503)
    assert not is_success(failed)
    assert failed["response"]["status_code"] == 503 and failed["error"]["code"] == \
        "no_worker_available"
    unreachable = error_record(job, "refused", code="GatewayUnreachableError")
    assert unreachable["response"] is None
    tally = Tally(total=3)
    for record in (ok, failed, unreachable):
        tally.add(record)
    assert (tally.done, tally.failed, tally.prompt_tokens, tally.completion_tokens) == \
        (1, 2, 3, 4)
    assert tally.workers == {"w0": 1}


def jobs_of(n: int) -> list:
    return parse_lines([f"question {i}" for i in range(n)], DEFAULTS)


def test_resume_skips_only_what_succeeded(tmp_path: Path) -> None:
    jobs = jobs_of(4)
    results = ResultsFile(tmp_path / "out.jsonl")
    results.load()
    assert results.done_ids() == set()
    results.append(success_record(jobs[2], {}))
    results.append(error_record(jobs[0], "boom", code="x", status_code=502))
    again = ResultsFile(tmp_path / "out.jsonl")
    again.load()
    assert again.done_ids() == {"line-3"}


def test_a_line_cut_short_by_a_kill_is_dropped_and_cut_off(tmp_path: Path) -> None:
    jobs = jobs_of(3)
    path = tmp_path / "out.jsonl"
    results = ResultsFile(path)
    results.append(success_record(jobs[0], {}))
    with path.open("a") as handle:
        handle.write('{"id": "batch_req_x", "custom_id": "line-2", "resp')
    again = ResultsFile(path)
    again.load()
    assert again.done_ids() == {"line-1"}
    again.append(success_record(jobs[1], {}))
    assert [json.loads(x)["custom_id"] for x in path.read_text().splitlines()] == \
        ["line-1", "line-2"]


def test_an_output_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("hello\n")
    with pytest.raises(InputError, match="line 1 is not JSON"):
        ResultsFile(path).load()


def test_finalize_sorts_by_input_and_keeps_one_record_per_id(tmp_path: Path) -> None:
    jobs = jobs_of(3)
    results = ResultsFile(tmp_path / "out.jsonl")
    results.append(error_record(jobs[0], "busy", code="overloaded", status_code=429))
    results.append(success_record(jobs[2], {"n": 2}))
    results.append(success_record(jobs[0], {"n": 0}))
    results.append(error_record(jobs[1], "first", code="x", status_code=502))
    results.append(error_record(jobs[1], "second", code="x", status_code=502))
    stray = success_record(parse_lines([line("other", {"prompt": "p"})], DEFAULTS)[0], {})
    results.append(stray)
    results.finalize(jobs)
    written = [json.loads(x) for x in results.path.read_text().splitlines()]
    assert [r["custom_id"] for r in written] == ["line-1", "line-2", "line-3", "other"]
    assert written[0]["response"]["body"] == {"n": 0}  # the success, not the earlier failure
    assert written[1]["error"]["message"] == "second"  # the last failure
    assert not list(tmp_path.glob(".*sorting"))


def test_backoff_doubles_with_jitter_is_capped_and_honours_retry_after() -> None:
    assert backoff_delay(0, base=1, cap=30, rand=lambda: 1.0) == 1.0
    assert backoff_delay(3, base=1, cap=30, rand=lambda: 1.0) == 8.0
    assert backoff_delay(3, base=1, cap=30, rand=lambda: 0.0) == 4.0
    assert backoff_delay(10, base=1, cap=30, rand=lambda: 1.0) == 30.0
    assert backoff_delay(0, base=1, cap=30, retry_after=7, rand=lambda: 1.0) == 7.0
    assert backoff_delay(0, base=1, cap=30, retry_after=3600, rand=lambda: 1.0) == 30.0


def test_offline_sampling_uses_the_models_defaults_under_the_lines_own() -> None:
    kwargs = sampling_kwargs({"model": "m", "messages": [], "max_completion_tokens": 8,
                              "top_k": 5, "stream": False}, {"temperature": 0.6, "top_k": 50})
    assert kwargs == {"temperature": 0.6, "top_k": 5, "max_tokens": 8}
    assert sampling_kwargs({"prompt": "p"}, {})["max_tokens"] is None  # up to the context
    with pytest.raises(UnsupportedParameter, match="logprobs, tools"):
        sampling_kwargs({"prompt": "p", "tools": [], "logprobs": True}, {})


def test_settings_only_offline_takes_engine_flags(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--input", "i", "--output", "o", "--model", "/models/m"]
    offline = BatchSettings.from_cli([*base, "--offline", "--max-model-len", "2048"])
    assert offline.engine_args == ["--max-model-len", "2048"]
    assert offline.served_name == "/models/m"  # not a local folder: the name as given
    with pytest.raises(SystemExit):
        BatchSettings.from_cli([*base, "--max-model-len", "2048"])
    assert "unrecognized arguments: --max-model-len" in capsys.readouterr().err
