"""The README's flag tables say what the settings declare: each row's flags, variables and
defaults, and every setting has a row."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest
from pydantic_settings import BaseSettings

from controller.settings import ControllerSettings
from fleet.batch.cli import BatchSettings
from fleet.chat_cli import ChatSettings
from fleet.launcher import UpSettings
from fleetcore.settings_cli import Setting, settings_of
from gateway.settings import GatewaySettings
from webui.settings import WebUISettings
from worker.settings import WorkerSettings

README = Path(__file__).resolve().parents[2] / "README.md"
SECTIONS: dict[str, type[BaseSettings]] = {
    "fleet controller": ControllerSettings,
    "fleet worker": WorkerSettings,
    "fleet gateway": GatewaySettings,
    "fleet webui": WebUISettings,
    "fleet up": UpSettings,
    "fleet chat": ChatSettings,
    "fleet batch": BatchSettings,
}


class Row(NamedTuple):
    text: str
    flags: list[str]
    envs: list[str] | None  # None: the table has no env column
    defaults: list[str]


def _section(readme: str, command: str) -> str:
    match = re.search(rf"^### `{command}`.*?$(.*?)(?=^#)", readme, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section ### `{command}`"
    return match.group(1)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _default(cell: str) -> str:
    return cell.strip().strip("`").strip('"')


def rows(section: str) -> list[Row]:
    """The first table's rows: `| flag | [env |] default | meaning |`. A cell may name several
    flags, then the env and default cells list one each, comma-separated, in the same order."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = _cells(lines[0])
    assert header[0] == "flag" and header[-2:] == ["default", "meaning"], header
    has_env = header[1] == "env"
    out = []
    for line in lines[2:]:
        cells = _cells(line)
        assert len(cells) == len(header), line
        flags = list(dict.fromkeys(re.findall(r"`(--[a-z0-9-]+)", cells[0])))
        envs = re.findall(r"FLEET_[A-Z0-9_]+", cells[1]) if has_env else None
        count = len(flags) or len(envs or [])
        defaults = [_default(d) for d in cells[-2].split(", ")] if count > 1 \
            else [_default(cells[-2])]
        out.append(Row(line, flags, envs, defaults))
    return out


@pytest.mark.parametrize("command", SECTIONS)
def test_readme_flag_table_matches_the_settings(command: str) -> None:
    declared = settings_of(SECTIONS[command])
    by_flag = {s.flag: s for s in declared if s.flag is not None}
    by_env = {s.env: s for s in declared}
    documented: set[str] = set()
    for row in rows(_section(README.read_text(), command)):
        settings: list[Setting] = []
        if row.flags:
            unknown = [f for f in row.flags if f not in by_flag]
            assert not unknown, f"{command} has no flag {unknown}: {row.text}"
            settings = [by_flag[f] for f in row.flags]
            if row.envs is not None:
                assert row.envs == [s.env for s in settings], row.text
        else:
            assert row.envs, f"a row with neither flag nor variable: {row.text}"
            unknown = [e for e in row.envs if e not in by_env]
            assert not unknown, f"{command} reads no {unknown}: {row.text}"
            settings = [by_env[e] for e in row.envs]
            assert all(s.flag is None for s in settings), f"these have a flag: {row.text}"
        assert row.defaults == [s.default for s in settings], row.text
        documented |= {s.name for s in settings}
    missing = [s.flag or s.env for s in declared if s.name not in documented]
    assert not missing, f"the README's {command} table leaves out {missing}"


def test_the_table_reader_sees_several_flags_in_one_row() -> None:
    section = ("| flag | env | default | meaning |\n|---|---|---|---|\n"
               "| `--host`, `--port` | `FLEET_X_HOST`, `FLEET_X_PORT` | 127.0.0.1, 80 | bind |\n"
               "| — | `FLEET_CLUSTER_TOKEN` | none | the token |\n")
    host, token = rows(section)
    assert host.flags == ["--host", "--port"] and host.defaults == ["127.0.0.1", "80"]
    assert host.envs == ["FLEET_X_HOST", "FLEET_X_PORT"]
    assert token.flags == [] and token.envs == ["FLEET_CLUSTER_TOKEN"]
