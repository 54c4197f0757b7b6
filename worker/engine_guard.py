"""The engine's guard: runs vLLM's server as its child and takes the whole group down with it.

The worker starts this instead of vLLM itself. vLLM's API server spawns engine-core processes
that outlive it when it is killed; if the worker itself is killed outright, nothing would stop
them. The kernel tells this guard when the worker dies (PR_SET_PDEATHSIG), and the guard then
kills its process group, which is the engine with all its children.

    python -m worker.engine_guard -- python -m vllm.entrypoints.openai.api_server ...
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1
# Not SIGTERM: the worker sends SIGTERM to the group to ask for a graceful stop.
PARENT_DIED = signal.SIGHUP
# The worker's pid, set by the worker (worker/engine.py): in a container the worker is PID 1,
# so "my parent is 1" does not mean that it died.
PARENT_ENV = "FLEET_ENGINE_GUARD_PARENT"


def _kill_group(signum: int, _frame: object) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _restore_signals() -> None:
    # Ignored signals stay ignored across exec; the engine must get SIGTERM and SIGINT.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m worker.engine_guard -- COMMAND...", file=sys.stderr)
        return 2
    parent = int(os.environ.pop(PARENT_ENV, "0")) or os.getppid()
    signal.signal(PARENT_DIED, _kill_group)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, PARENT_DIED)
    if os.getppid() != parent:  # the worker died before the line above took effect
        return 1
    # The engine receives the worker's SIGTERM through the process group; the guard only waits.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(args, preexec_fn=_restore_signals)
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    raise SystemExit(main())
