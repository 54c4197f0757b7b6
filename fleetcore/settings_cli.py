"""Command lines generated from settings classes, so each setting is declared once.

A setting is a pydantic field: its type, default and description. From that one declaration come
its flag (`--field-name`, or the name `Flag` gives it), its environment variable (the class's
`env_prefix` and the field's name, or the field's alias, as pydantic-settings reads it) and its
`--help` line, which shows the default and the variable. tests/unit/test_readme_flags.py holds
the README's flag tables to the same declarations.

Precedence stays as pydantic-settings has it: a flag given on the command line (an init value)
over the environment over the default. Flags not given are left out, never passed as None.

Why not pydantic-settings' own `CliSettingsSource` (2.16): a field with an alias gets a flag
named after it (`--FLEET-CLUSTER-TOKEN-FILE`, beside `--cluster-token-file`), its help shows
types (`{str,null}`), and unknown flags can be ignored but not kept, while the worker, `fleet up`
and `fleet batch --offline` hand them to vLLM unchanged (argparse's `parse_known_args`; a
`Passthrough` field says where they go).
"""

from __future__ import annotations

import argparse
import enum
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Self

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings


@dataclass(frozen=True)
class Flag:
    """Where a setting's flag differs from `--field-name`."""

    name: str | None = None
    # `--model-name a --model-name b` gives ["a", "b"].
    repeat: bool = False
    metavar: str | None = None
    # Flags that share a group exclude each other.
    exclusive: str | None = None


@dataclass(frozen=True)
class EnvOnly:
    """A secret: set in the environment only, never a flag, since `ps` shows command lines."""


@dataclass(frozen=True)
class Passthrough:
    """The flags the parser does not know, unchanged (a list of str): vLLM's engine arguments.
    With `only_with`, unknown flags are an error unless that (boolean) flag is given."""

    only_with: str | None = None


class Setting(NamedTuple):
    """One setting as users see it: for `--help` and the README's tables."""

    name: str
    flag: str | None  # None: environment only
    env: str
    default: str  # as shown: "required", "none", or the value
    description: str


_METAVARS = {int: "N", float: "NUM", Path: "PATH"}


def _metadata(info: FieldInfo, kind: type[Any]) -> Any:
    return next((m for m in info.metadata if isinstance(m, kind)), None)


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `list[str]` -> list."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else str
    return typing.get_origin(annotation) or annotation


def show_default(info: FieldInfo) -> str:
    """The default as `--help` and the README show it."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None or value == [] or value == {}:
        return "none"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path | str | int):
        return str(value) if value != "" else '""'
    raise TypeError(f"no way to show the default {value!r}")


def _env_name(cls: type[BaseSettings], name: str, info: FieldInfo) -> str:
    if isinstance(info.validation_alias, str):
        return info.validation_alias
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def _declaration_order(cls: type[BaseSettings]) -> list[str]:
    """The class's own fields first, then each base's (the shared tokens and TLS last)."""
    order: list[str] = []
    for klass in cls.__mro__:
        order += [n for n in vars(klass).get("__annotations__", {}) if n in cls.model_fields
                  and n not in order]
    return order


def settings_of(cls: type[BaseSettings]) -> list[Setting]:
    """Every setting of `cls` users can set, its own first (the passthrough excluded)."""
    out = []
    for name in _declaration_order(cls):
        info = cls.model_fields[name]
        if _metadata(info, Passthrough):
            continue
        flag = _metadata(info, Flag) or Flag()
        out.append(Setting(
            name=name,
            flag=None if _metadata(info, EnvOnly) else flag.name or f"--{name.replace('_', '-')}",
            env=_env_name(cls, name, info),
            default=show_default(info),
            description=(info.description or "").strip(),
        ))
    return out


def settings_by_name(cls: type[BaseSettings]) -> dict[str, Setting]:
    return {s.name: s for s in settings_of(cls)}


def _passthrough(cls: type[BaseSettings]) -> tuple[str, Passthrough] | None:
    return next(((n, p) for n, i in cls.model_fields.items()
                 if (p := _metadata(i, Passthrough)) is not None), None)


def build_parser(cls: type[BaseSettings], prog: str, description: str) -> argparse.ArgumentParser:
    passthrough = _passthrough(cls)
    parser = argparse.ArgumentParser(
        prog=prog, description=textwrap.fill(description, width=78),
        # An engine flag must reach vLLM whole, not be taken for an abbreviation of ours, and
        # `--cluster-token SECRET` must not pass for `--cluster-token-file`.
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups: dict[str, Any] = {}  # argparse's mutually exclusive groups, by name
    secrets = []
    for setting in settings_of(cls):
        info = cls.model_fields[setting.name]
        if setting.flag is None:
            secrets.append(textwrap.fill(f"{setting.env}: {setting.description}", width=78,
                                         initial_indent="  ", subsequent_indent="    "))
            continue
        default = "required" if setting.default == "required" else f"default: {setting.default}"
        text = f"{setting.description} ({default}; env {setting.env})"
        flag: Flag = _metadata(info, Flag) or Flag()
        kwargs: dict[str, Any] = {
            "dest": setting.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%"),
        }
        base = _base_type(info.annotation)
        if base is bool:
            kwargs["action"] = "store_false" if info.default else "store_true"
        else:
            if flag.repeat:
                kwargs["action"] = "append"
            if isinstance(base, type) and issubclass(base, enum.Enum):
                kwargs["choices"] = [m.value for m in base]
            elif base in (int, float):
                kwargs["type"] = base
            if "choices" not in kwargs:
                kwargs["metavar"] = flag.metavar or _METAVARS.get(base, "TEXT")
        target: Any = parser
        if flag.exclusive is not None:
            if flag.exclusive not in groups:
                groups[flag.exclusive] = parser.add_mutually_exclusive_group()
            target = groups[flag.exclusive]
        target.add_argument(setting.flag, **kwargs)
    notes = []
    if secrets:
        notes.append("Environment only (a flag would show in `ps`):\n" + "\n".join(secrets))
    if passthrough is not None:
        only_with = passthrough[1].only_with
        when = f" (with {settings_by_name(cls)[only_with].flag})" if only_with else ""
        notes.append(f"Any other flag is passed to vLLM unchanged{when}.")
    parser.epilog = "\n\n".join(notes) or None
    return parser


class CliSettings(BaseSettings):
    """A service's settings, filled from its command line over its environment over defaults."""

    cli_prog: ClassVar[str]
    cli_description: ClassVar[str]

    @classmethod
    def cli_parser(cls) -> argparse.ArgumentParser:
        return build_parser(cls, cls.cli_prog, cls.cli_description)

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> Self:
        parser = cls.cli_parser()
        passthrough = _passthrough(cls)
        if passthrough is None:
            return cls(**vars(parser.parse_args(argv)))
        args, rest = parser.parse_known_args(argv)
        values = vars(args)
        name, rule = passthrough
        if rest and rule.only_with is not None and not values.get(rule.only_with):
            flag = settings_by_name(cls)[rule.only_with].flag
            parser.error(f"unrecognized arguments: {' '.join(rest)} (only with {flag} do flags "
                         "go to vLLM)")
        if rest:
            values[name] = rest
        return cls(**values)

