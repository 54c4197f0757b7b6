"""The devices `fleet up` shares out: GPUs grouped per worker, CPU cores split among workers,
and both shared out among the models of a fleet."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from fleet.fleet_file import FleetModel


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """GPU indices this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = dict(os.environ if env is None else env)
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def group_gpus(gpus: Sequence[str], per_worker: int) -> list[str]:
    """['0','1','2','3'], 2 -> ['0,1', '2,3']; leftover GPUs that cannot fill a group are unused."""
    if per_worker < 1:
        raise ValueError("--gpus-per-worker must be at least 1")
    usable = len(gpus) - len(gpus) % per_worker
    return [",".join(gpus[i:i + per_worker]) for i in range(0, usable, per_worker)]


def _core_range(cores: Sequence[int]) -> str:
    if list(cores) == list(range(cores[0], cores[-1] + 1)):
        return str(cores[0]) if len(cores) == 1 else f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def parse_cores(spec: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cores: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"bad core list {spec!r}; expected e.g. 0-3 or 0,2")
        cores.update(range(int(first), int(last or first) + 1))
    return sorted(cores)


def split_cores(cores: Sequence[int], workers: int) -> list[str]:
    """Share the cores out among CPU workers, as contiguous sets: [0,1,2,3], 2 -> ['0-1', '2-3']."""
    cores = sorted(cores)
    if workers < 1:
        raise ValueError("--cpu-workers must be at least 1")
    if workers > len(cores):
        raise ValueError(f"{workers} CPU workers need at least {workers} cores; "
                         f"this machine lets us use {len(cores)}")
    size, extra = divmod(len(cores), workers)
    out, start = [], 0
    for i in range(workers):
        n = size + (1 if i < extra else 0)
        out.append(_core_range(cores[start:start + n]))
        start += n
    return out


def _share(total: int, parts: int) -> list[int]:
    """7 among 3 -> [3, 2, 2]."""
    size, extra = divmod(total, parts)
    return [size + (1 if i < extra else 0) for i in range(parts)]


def share_gpus(models: Sequence[FleetModel], gpus: Sequence[str]) -> list[list[str]]:
    """Each model's workers, as their --gpus groups. A model takes the GPUs it lists; then, in
    file order, a model with a number of workers takes as many groups, and the models with
    neither share out the GPUs left."""
    claimed = [g for m in models for g in (m.gpus or [])]
    for model in models:
        for gpu in model.gpus or []:
            if gpu not in gpus:
                raise ValueError(f"model {model.label!r} lists GPU {gpu}, which is not visible "
                                 f"(visible: {','.join(gpus)})")
    if len(set(claimed)) < len(claimed):
        raise ValueError("two models list the same GPU")
    free = [g for g in gpus if g not in claimed]
    unclaimed = [m for m in models if m.gpus is None]
    need = sum(m.workers * m.gpus_per_worker for m in unclaimed if m.workers)
    if need > len(free):
        raise ValueError(f"the models need {need} GPUs besides those they list; this machine "
                         f"lets us use {len(free)}")
    open_models = [m for m in unclaimed if not m.workers]
    shares = iter(_share(len(free) - need, len(open_models)) if open_models else [])
    out, start = [], 0
    for model in models:
        if model.gpus is not None:
            groups = group_gpus(model.gpus, model.gpus_per_worker)
        else:
            n = model.workers * model.gpus_per_worker if model.workers else next(shares)
            groups = group_gpus(free[start:start + n], model.gpus_per_worker)
            start += n
        per = model.gpus_per_worker
        if model.workers and len(groups) < model.workers:
            raise ValueError(f"model {model.label!r}: {model.workers} workers of {per} GPU(s) "
                             f"need {model.workers * per} GPUs; it has {len(groups) * per}")
        if not groups:
            raise ValueError(f"model {model.label!r} gets no GPU: {len(gpus)} visible, {per} "
                             f"per worker, shared among {len(models)} models")
        out.append(groups[:model.workers] if model.workers else groups)
    return out


def share_cores(models: Sequence[FleetModel], cores: Sequence[int]) -> list[list[str]]:
    """Each model's workers, as their --cpus sets. A model takes the cores it lists; the cores
    left are split among the other models' workers (one each unless `workers` says), in file
    order."""
    claimed: list[int] = []
    for model in models:
        if model.gpus is not None:
            raise ValueError(f"model {model.label!r} lists GPUs, but no GPU is visible")
        if model.cpus is not None:
            own = parse_cores(model.cpus)
            if not set(own) <= set(cores):
                raise ValueError(f"model {model.label!r} lists cores {model.cpus}; this machine "
                                 f"lets us use {_core_range(sorted(cores))}")
            claimed += own
    if len(set(claimed)) < len(claimed):
        raise ValueError("two models list the same core")
    free = [c for c in cores if c not in claimed]
    counts = [model.workers or 1 for model in models if model.cpus is None]
    shared = iter(split_cores(free, sum(counts)) if counts else [])
    out = []
    for model in models:
        if model.cpus is not None:
            out.append(split_cores(parse_cores(model.cpus), model.workers or 1))
        else:
            out.append([next(shared) for _ in range(model.workers or 1)])
    return out
