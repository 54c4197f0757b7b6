"""`fleet chat`'s loop: commands, Ctrl-C during an answer, errors, the model choice.

The chat here is a stand-in that records what it was asked; the real gateway and terminal
process are in tests/integration/test_client.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from fleet.chat_cli import STOPPED, Repl, _pick_model
from fleet.client import NoWorkerError


class FakeStream:
    def __init__(self, history: list, query: str, pieces: list, fail: BaseException | None):
        self._pieces = pieces
        self._fail = fail
        self._before = list(history)
        self._query = query
        self.text = ""
        self.closed = False

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.text += piece
            yield piece
        if self._fail is not None:
            raise self._fail

    def close(self) -> None:
        self.closed = True

    @property
    def history(self) -> list:
        if not self.text:
            return self._before
        return [*self._before, {"role": "user", "content": self._query},
                {"role": "assistant", "content": self.text}]


class FakeChat:
    model = "m"

    def __init__(self) -> None:
        self.system: str | None = None
        self.asked: list[tuple[str, list, str | None]] = []
        self.script: list[tuple[list, BaseException | None]] = []
        self.streams: list[FakeStream] = []

    def stream_chat(self, query: str, history: list) -> FakeStream:
        self.asked.append((query, list(history), self.system))
        pieces, fail = self.script.pop(0) if self.script else (["ok"], None)
        stream = FakeStream(history, query, pieces, fail)
        self.streams.append(stream)
        return stream


def run(chat: FakeChat, *lines: str | type[BaseException]) -> tuple[int, str, str]:
    feed = iter(lines)

    def read(prompt: str) -> str:
        item = next(feed, EOFError)
        if isinstance(item, type):
            raise item
        return item

    out, err = io.StringIO(), io.StringIO()
    code = Repl(chat, out, err).run(read)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


def test_turns_carry_the_history_and_reset_forgets_it() -> None:
    chat = FakeChat()
    chat.script = [(["Pa", "ris."], None), (["Rome."], None), (["Hello."], None)]
    code, out, _ = run(chat, "Capital of France?", "And Italy?", "/reset", "Hi", "/exit")
    assert code == 0
    assert "Paris.\n" in out and "(conversation cleared)" in out
    assert [len(h) for _, h, _ in chat.asked] == [0, 2, 0]
    assert chat.asked[1][1][1] == {"role": "assistant", "content": "Paris."}


def test_system_sets_the_prompt_for_the_next_turns() -> None:
    chat = FakeChat()
    _, out, _ = run(chat, "/system Answer in French.", "Hi", "/system")
    assert chat.asked[0][2] == "Answer in French."
    assert "(system prompt: Answer in French.)" in out


def test_ctrl_c_during_an_answer_stops_it_and_keeps_the_program() -> None:
    chat = FakeChat()
    chat.script = [(["Once", " upon"], KeyboardInterrupt()), (["Sure."], None)]
    code, out, _ = run(chat, "Tell me a story", "Another?", "/exit")
    assert code == 0
    assert f"Once upon\n{STOPPED}\n" in out and "Sure." in out
    assert chat.streams[0].closed
    # What was shown stays in the conversation.
    assert chat.asked[1][1][-1] == {"role": "assistant", "content": "Once upon"}


def test_ctrl_c_at_the_prompt_does_not_quit_and_ctrl_d_does() -> None:
    chat = FakeChat()
    code, _, _ = run(chat, KeyboardInterrupt, "Hi")
    assert code == 0 and len(chat.asked) == 1


def test_an_error_is_shown_and_the_chat_goes_on() -> None:
    chat = FakeChat()
    chat.script = [([], NoWorkerError("No worker is ready.", status_code=503))]
    code, out, err = run(chat, "Hi", "Again", "/exit")
    assert "error: 503 No worker is ready." in err
    assert len(chat.asked) == 2 and chat.asked[1][1] == []


def test_unknown_command_shows_help() -> None:
    _, out, _ = run(FakeChat(), "/frobnicate", "/exit")
    assert "unknown command /frobnicate" in out and "/reset" in out


def test_the_model_is_the_one_asked_for_or_the_only_one_served() -> None:
    assert _pick_model(None, ["only"]) == "only"
    assert _pick_model("b", ["a", "b"]) == "b"
    with pytest.raises(LookupError, match="serves: a, b"):
        _pick_model(None, ["a", "b"])
    with pytest.raises(LookupError, match="does not serve 'c'"):
        _pick_model("c", ["a", "b"])
