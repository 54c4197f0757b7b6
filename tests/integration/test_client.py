"""The Python client and `fleet chat` against the real stack (gateway, worker, vLLM engine)."""

from __future__ import annotations

import copy
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from fleet.client import (
    AuthenticationError,
    BadRequestError,
    Chat,
    GatewayUnreachableError,
    ModelNotFoundError,
)
from tests.integration.harness import API_KEY, MODEL_NAME, Stack, free_port

pytestmark = pytest.mark.integration
# Worded for a clear greedy margin: to "What is the capital of France?" the demo model's first
# token is a near tie (0.12 nats), which CPUs with other matmul kernels (AMX bf16) break
# either way.
FRANCE = "Name the capital of France."


@pytest.fixture
def chat(stack: Stack) -> Iterator[Chat]:
    with Chat(stack.gateway_url, API_KEY, MODEL_NAME, system="You are a helpful assistant.",
              temperature=0, max_tokens=30, max_retries=0) as client:
        yield client


def test_the_worker_reports_the_models_own_template(stack: Stack) -> None:
    assert stack.worker_record("worker")["chat_template"] == "model"


def test_chat_answers_and_never_touches_the_callers_history(chat: Chat) -> None:
    answer, history = chat.chat(FRANCE)
    assert "Paris" in answer
    assert history == [{"role": "user", "content": FRANCE},
                       {"role": "assistant", "content": answer}]
    frozen = copy.deepcopy(history)
    _, longer = chat.chat("And of Italy?", history)
    _, branch = chat.chat("And of Spain?", history)
    assert history == frozen
    assert longer[:2] == frozen and branch[:2] == frozen
    assert longer[2]["content"] == "And of Italy?" and branch[2]["content"] == "And of Spain?"


def test_the_history_is_sent(chat: Chat) -> None:
    # The engine counts what it was sent: the same question after a history is a longer prompt.
    _, history = chat.chat(FRANCE)
    with chat.stream_chat("And of Italy?") as alone:
        list(alone)
    with chat.stream_chat("And of Italy?", history) as after:
        list(after)
    assert alone.usage is not None and after.usage is not None
    assert after.usage["prompt_tokens"] > alone.usage["prompt_tokens"] + 10


def test_streaming_gives_pieces_that_add_up_to_the_whole_answer(chat: Chat) -> None:
    whole, _ = chat.chat(FRANCE)
    with chat.stream_chat(FRANCE, []) as stream:
        pieces = list(stream)
    assert len(pieces) > 3
    assert "".join(pieces) == whole == stream.text
    assert stream.finish_reason == "stop"
    assert stream.history[-1] == {"role": "assistant", "content": whole}


def test_sampling_parameters_reach_the_engine(chat: Chat) -> None:
    with chat.stream_chat("Write a long poem about the sea.", max_tokens=3) as stream:
        list(stream)
    assert stream.finish_reason == "length" and stream.usage["completion_tokens"] == 3
    answer, _ = chat.chat(FRANCE, stop=["Paris"])
    assert "Paris" not in answer and answer.strip()
    varied = {chat.chat("Name an animal.", temperature=1.5, top_p=1.0, max_tokens=8)[0]
              for _ in range(4)}
    assert len(varied) > 1  # sampled, not greedy


def test_errors_are_typed(stack: Stack, chat: Chat) -> None:
    with Chat(stack.gateway_url, "wrong-key", MODEL_NAME, max_retries=0) as bad:
        with pytest.raises(AuthenticationError) as info:
            bad.chat("Hi")
    assert info.value.status_code == 401 and info.value.request_id
    with Chat(stack.gateway_url, API_KEY, "no-such-model", max_retries=0) as lost:
        with pytest.raises(ModelNotFoundError) as missing:
            lost.chat("Hi")
    assert missing.value.code == "model_not_found"
    with pytest.raises(BadRequestError, match="4096"):
        chat.chat("Hi", max_tokens=10_000)  # past the 4,096-token context: a 400
    with Chat(f"http://127.0.0.1:{free_port()}", API_KEY, MODEL_NAME, max_retries=0) as off:
        with pytest.raises(GatewayUnreachableError):
            off.chat("Hi")


# -- fleet chat, driven through its stdin and stdout -----------------------------------------
class Terminal:
    """`fleet chat` as a child process; its output is read by a thread and polled."""

    def __init__(self, stack: Stack, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "chat", "--gateway-url", stack.gateway_url,
             "--model", MODEL_NAME, *flags],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "FLEET_CLIENT_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"},
        )
        self.output = ""
        self.errors = ""
        self._chunks: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while data := os.read(self.proc.stdout.fileno(), 4096):
            self._chunks.put(data.decode(errors="replace"))

    def wait_for(self, check: object, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.output):  # type: ignore[operator]
            try:
                self.output += self._chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} after {timeout}s; output:\n{self.output}"
                                     ) from None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def prompts(self) -> int:
        return self.output.count("you> ")

    def close(self) -> int:
        try:
            code = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stderr is not None
        self.errors = self.proc.stderr.read().decode(errors="replace")
        return code


def test_fleet_chat_holds_a_conversation_with_commands(stack: Stack) -> None:
    term = Terminal(stack, "--temperature", "0", "--max-tokens", "30")
    term.wait_for(lambda out: "you> " in out, "prompt", 60)
    term.send(FRANCE)
    term.wait_for(lambda out: out.count("you> ") == 2, "answer")
    assert "Paris" in term.output
    term.send("/system Always answer in French.")
    term.wait_for(lambda out: "(system prompt set)" in out, "/system")
    term.send("/reset")
    term.wait_for(lambda out: "(conversation cleared)" in out, "/reset")
    term.send("What is the capital of Italy?")
    term.wait_for(lambda out: out.count("you> ") == 5, "second answer")
    assert "Rom" in term.output.rsplit("you> ", 2)[1]
    term.send("/exit")
    assert term.close() == 0, term.errors


def test_ctrl_c_stops_the_answer_not_the_program(stack: Stack) -> None:
    # ignore_eos with a large max_tokens: an answer that would run for minutes.
    term = Terminal(stack, "--max-tokens", "3000", "--extra-body", '{"ignore_eos": true}')
    term.wait_for(lambda out: "you> " in out, "prompt", 60)
    term.send("Tell me a very long story.")
    # Some words of the answer are on screen: the request is being answered.
    term.wait_for(lambda out: len(out.split("you> ", 1)[1]) > 40, "the answer's start")
    assert stack.engine_running() == 1
    term.proc.send_signal(signal.SIGINT)
    term.wait_for(lambda out: "[stopped]" in out and out.count("you> ") == 2, "[stopped]")
    stack.wait_for(lambda: stack.engine_running() == 0, "the engine to abort the request", 30)
    assert term.proc.poll() is None  # still running, at the prompt
    term.send("/system Be brief.")
    term.wait_for(lambda out: "(system prompt set)" in out, "/system after Ctrl-C")
    term.send("/exit")
    assert term.close() == 0, term.errors
