"""The peers we measure against, each in its own virtual environment, made on first use.

A peer's dependencies never mix with ours (LiteLLM alone pins dozens of packages), and the
benchmark scripts create what they need themselves, so a fresh machine needs no set-up step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PEERS = {
    "vllm-router": ["vllm-router==0.1.17"],
    "litellm": ["litellm[proxy]==1.80.17"],
    # Not a proxy of its own: the server under bench/bare_relay.py's `granian` relay, with the
    # engine client's own dependencies at the versions requirements/ pins.
    "granian": ["granian==2.8.9", "uvloop==0.23.0", "httptools==0.9.0", "yarl==1.25.1"],
}
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".venv-peers"


def peer_python(name: str, root: Path = DEFAULT_DIR) -> Path:
    """The interpreter of the peer's venv, installing the peer there first if needed."""
    venv = root / name
    python = venv / "bin" / "python"
    marker = venv / f".installed-{'-'.join(PEERS[name])}"
    if not marker.exists():
        print(f"installing {' '.join(PEERS[name])} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *PEERS[name]], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"installing {name} failed:\n{done.stdout}{done.stderr}")
        marker.touch()
    return python
