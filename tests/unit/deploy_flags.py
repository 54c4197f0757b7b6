"""Reading a command line's flags, for the deploy tests."""

from __future__ import annotations


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` alike; a bare `--flag` maps to ''."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                name, value = arg, args[i + 1]
                i += 1
            else:
                name, value = arg, ""
            flags[name] = value
        i += 1
    return flags
