"""The `fleet` command: one entry point for every service and tool."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib import import_module

_COMMANDS: dict[str, tuple[str, str]] = {
    "controller": ("controller.__main__", "run the controller (worker registry)"),
    "worker": ("worker.__main__", "run one vLLM engine as a worker"),
    "gateway": ("gateway.__main__", "run the OpenAI-compatible gateway"),
    "webui": ("webui.__main__", "run the Gradio chat UI"),
    "keys": ("gateway.keys_cli", "make client keys for the gateway's keys file, or list them"),
    "up": ("fleet.launcher", "run the whole stack: controller, workers, gateway, web UI"),
    "chat": ("fleet.chat_cli", "chat with a model in the terminal, through the gateway"),
    "batch": ("fleet.batch.cli", "run a file of requests through the gateway (or offline)"),
    "test-message": ("worker.test_message", "send a test message to a worker of a model"),
    "demo-model": ("fleet.demo_model", "prepare the demo model (SmolLM2-135M-Instruct)"),
}


def _usage() -> str:
    lines = ["usage: fleet COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["", "Run 'fleet COMMAND --help' for a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in _COMMANDS:
        print(f"fleet: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(_COMMANDS[name][0])
    entry: Callable[[Sequence[str]], int] = module.main
    return entry(rest)


if __name__ == "__main__":
    raise SystemExit(main())
