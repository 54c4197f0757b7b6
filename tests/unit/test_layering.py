"""The packages' layers: services import the kernel (`fleetcore`), never the user tools (`fleet`);
the kernel imports neither. Read from the source with `ast`, imports inside functions included,
so a lazy import cannot slip past."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("controller", "worker", "gateway", "webui")
KERNEL = "fleetcore"


def imported(path: Path) -> set[str]:
    """The absolute modules `path` imports (a relative import stays inside its package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    return [f"{path.relative_to(ROOT)}: {name}"
            for path in files for name in sorted(imported(path))
            if name.split(".")[0] in forbidden]


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_the_kernel_not_the_user_tools(service: str) -> None:
    assert offenders(service, ("fleet",)) == []


def test_the_kernel_imports_no_service_and_no_user_tool() -> None:
    assert offenders(KERNEL, ("fleet", *SERVICES)) == []


def test_the_check_sees_a_user_tool_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import fleetcore.errors\n\ndef f():\n    from fleet.client import Chat\n")
    assert imported(module) == {"fleetcore.errors", "fleet.client"}
