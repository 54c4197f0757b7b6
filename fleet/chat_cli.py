"""`fleet chat`: an interactive multi-turn chat in the terminal, through the gateway.

Commands: /reset forgets the conversation, /system TEXT sets the system prompt, /exit (or
Ctrl-D) quits. Ctrl-C while an answer is written stops that answer (the request is closed, so
the engine aborts it) and keeps the part already shown; at the prompt it only clears the line.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Sequence
from typing import Annotated, Any, TextIO

from pydantic import Field, ValidationError, field_validator

from fleet.client.chat import Chat, Message
from fleet.client.settings import ClientSettings
from fleetcore.errors import FleetError
from fleetcore.settings_cli import Flag

HELP = "Commands: /reset  /system TEXT  /exit   (Ctrl-C stops an answer, Ctrl-D quits)"
STOPPED = "[stopped]"


class ChatSettings(ClientSettings):
    cli_prog = "fleet chat"
    cli_description = __doc__.split("\n")[0]

    model: str | None = Field(None, description="Model to chat with; none: the only one served.")
    system: str | None = Field(None, description="System prompt.")
    temperature: float | None = Field(None, ge=0, le=2,
                                      description="Sampling temperature; none: the engine's.")
    top_p: float | None = Field(None, gt=0, le=1, description="Top p; none: the engine's.")
    max_tokens: int | None = Field(None, ge=1, description="Longest answer, in tokens.")
    stop: Annotated[list[str] | None, Flag(repeat=True)] = Field(
        None, description="Stop string (repeatable; in the environment a JSON list).")
    extra_body: Annotated[dict[str, Any], Flag(metavar="JSON")] = Field(
        default_factory=dict,
        description='Engine-specific sampling parameters as a JSON object, e.g. \'{"top_k": 20}\'.')

    @field_validator("extra_body", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
            if not isinstance(value, dict):
                raise ValueError('expected a JSON object, e.g. \'{"top_k": 20}\'')
        return value


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
        except FleetError as exc:
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
        except (FleetError, LookupError) as exc:
            print(f"fleet chat: {exc}", file=sys.stderr)
            return 1
        if sys.stdin.isatty():
            import readline  # noqa: F401 - line editing and history for input()
        return Repl(chat).run()


if __name__ == "__main__":
    raise SystemExit(main())
