"""`fleet chat`: an interactive multi-turn chat in the terminal, through the gateway.

Commands: /reset forgets the conversation, /system TEXT sets the system prompt, /exit (or
Ctrl-D) quits. Ctrl-C while an answer is written stops that answer (the request is closed, so
the engine aborts it) and keeps the part already shown; at the prompt it only clears the line.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from pydantic import Field, ValidationError

from fleet.client.chat import Chat, Message
from fleet.client.errors import FleetAPIError
from fleet.client.settings import ClientSettings, add_client_flags, json_object

HELP = "Commands: /reset  /system TEXT  /exit   (Ctrl-C stops an answer, Ctrl-D quits)"
STOPPED = "[stopped]"


class ChatSettings(ClientSettings):
    model: str | None = None
    system: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> ChatSettings:
        parser = argparse.ArgumentParser(prog="fleet chat", description=__doc__.split("\n")[0])
        parser.add_argument("--model", help="Model to chat with (default: the only one served).")
        parser.add_argument("--system", help="System prompt.")
        parser.add_argument("--temperature", type=float)
        parser.add_argument("--top-p", type=float)
        parser.add_argument("--max-tokens", type=int, help="Longest answer, in tokens.")
        parser.add_argument("--stop", action="append", help="Stop string (repeatable).")
        parser.add_argument("--extra-body", type=json_object,
                            help="Engine-specific sampling parameters as JSON, e.g. "
                            "'{\"top_k\": 20}'.")
        add_client_flags(parser)
        args = parser.parse_args(argv)
        return cls(**{k: v for k, v in vars(args).items() if v is not None})


def _pick_model(wanted: str | None, served: list[str]) -> str:
    if wanted is not None and wanted in served:
        return wanted
    listed = ", ".join(served) or "none"
    if wanted is not None:
        raise LookupError(f"the gateway does not serve '{wanted}' (it serves: {listed})")
    if len(served) != 1:
        raise LookupError(f"pick a model with --model (the gateway serves: {listed})")
    return served[0]


class Repl:
    def __init__(self, chat: Chat, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.chat = chat
        self.history: list[Message] = []
        self.out = out
        self.err = err

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            self.out.write("(conversation cleared)\n")
        elif name == "/system":
            if arg.strip():
                self.chat.system = arg.strip()
                self.out.write("(system prompt set)\n")
            else:
                self.out.write(f"(system prompt: {self.chat.system or 'none'})\n")
        else:
            self.out.write(f"unknown command {name}. {HELP}\n")
        return True

    def answer(self, query: str) -> None:
        stream = self.chat.stream_chat(query, self.history)
        try:
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
            self.out.write("\n")
        except KeyboardInterrupt:
            stream.close()
            self.out.write(f"\n{STOPPED}\n")
        except FleetAPIError as exc:
            self.out.write("\n")
            self.err.write(f"error: {exc}\n")
        finally:
            self.history = stream.history
            self.out.flush()

    def run(self, read: Any = input) -> int:
        self.out.write(f"Chatting with {self.chat.model}. {HELP}\n")
        while True:
            try:
                line = read("you> ").strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                    continue
                self.answer(line)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                # At the prompt (or between two answers): the program stays.
                self.out.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C stops an answer, also when started with SIGINT ignored (a background job of a
    # non-interactive shell ignores it, and Python then installs no handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        settings = ChatSettings.from_cli(argv)
    except ValidationError as exc:
        print(f"fleet chat: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    chat = Chat(settings.gateway_url, settings.key, settings.model or "", system=settings.system,
                temperature=settings.temperature, top_p=settings.top_p,
                max_tokens=settings.max_tokens, stop=settings.stop,
                extra_body=settings.extra_body, timeout=settings.timeout)
    with chat:
        try:
            chat.model = _pick_model(settings.model, chat.models())
        except (FleetAPIError, LookupError) as exc:
            print(f"fleet chat: {exc}", file=sys.stderr)
            return 1
        if sys.stdin.isatty():
            import readline  # noqa: F401 - line editing and history for input()
        return Repl(chat).run()


if __name__ == "__main__":
    raise SystemExit(main())
