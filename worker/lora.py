"""What the engine's arguments say about LoRA: how many adapters it runs at once, and which it
starts with. The worker reports both, so that gateways know where adapters can go."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

ENABLE = "--enable-lora"
MAX_LORAS = "--max-loras"
# Adapters the engine keeps in memory; vLLM swaps them into its --max-loras batch slots itself.
MAX_CPU_LORAS = "--max-cpu-loras"
MODULES = "--lora-modules"
# vLLM's default for --max-loras.
DEFAULT_SLOTS = 1
# Without it vLLM has no /v1/load_lora_adapter: the gateway could not place adapters.
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class LoraArgs:
    # How many adapters the engine holds at once (--max-cpu-loras, else --max-loras): more
    # registered than this, vLLM drops them from memory and reads them from disk again on
    # use. None: LoRA is off.
    slots: int | None = None
    static: list[str] = field(default_factory=list)
    # Distinct adapters one engine step may run (--max-loras) where fewer than `slots`; a
    # request for another waits in the engine until one of those has nothing running. None:
    # as many as `slots` (and not reported, so that a controller from before the field still
    # takes the registration).
    batch_slots: int | None = None


def _values(args: Sequence[str], flag: str) -> list[str]:
    """Every value given to `flag`, as `--flag a b`, or `--flag=a`, possibly repeated."""
    values: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1:])
        elif arg == flag:
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            continue
        i += 1
    return values


def _module_name(value: str) -> str:
    if value.lstrip().startswith("{"):
        return str(json.loads(value)["name"])
    name, sep, _ = value.partition("=")
    if not sep:
        raise ValueError(f"{MODULES} takes name=path or JSON, got {value!r}")
    return name


def parse_lora_args(args: Sequence[str]) -> LoraArgs:
    """LoRA's settings from the engine's arguments; raises ValueError for a malformed one."""
    enabled = ENABLE in args or any(a.startswith(ENABLE + "=") and a.split("=", 1)[1].lower()
                                    in ("1", "true") for a in args)
    if not enabled:
        return LoraArgs()
    counts = _values(args, MAX_LORAS)
    slots = int(counts[-1]) if counts else DEFAULT_SLOTS
    if slots < 1:
        raise ValueError(f"{MAX_LORAS} must be at least 1")
    held = _values(args, MAX_CPU_LORAS)
    places = max(slots, int(held[-1])) if held else slots
    return LoraArgs(slots=places, static=[_module_name(v) for v in _values(args, MODULES)],
                    batch_slots=slots if slots < places else None)


def adapters_in(models: object) -> list[str]:
    """The adapters in the engine's /v1/models answer: the cards that name a parent."""
    data = models.get("data") if isinstance(models, dict) else None
    if not isinstance(data, list):
        raise ValueError("no model list")
    return sorted(card["id"] for card in data
                  if isinstance(card, dict) and card.get("parent") and isinstance(card.get("id"),
                                                                                  str))
