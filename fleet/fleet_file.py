"""The fleet file: the models `fleet up` serves, each with its source, names, devices and engine.

```yaml
models:
  - source: demo:smollm2                 # or a local path, a Hugging Face id, hf:ID, modelscope:ID
    served_names: [SmolLM2-135M-Instruct]
    workers: 1
    engine_args: [--max-model-len, "2048"]
  - source: demo:all-minilm-l6-v2
    engine_args: [--runner, pooling]
```

A model may list LoRA adapters (`adapters: [{name, source}]`): its workers then run with
`--enable-lora --max-loras MAX_LORAS` and the adapters are declared for the fleet, to be loaded
where requests need them (gateway/adapters.py).

A source is given as `PREFIX:VALUE`, or bare (the worker's `--source auto`: a local path if it
exists, else a Hugging Face id). `demo:` sources are the demo models (fleet/demo_model.py),
resolved to local folders before anything starts, so the file needs nothing downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Where a prefixed source comes from, as the worker's --source names it.
SOURCE_PREFIXES = {"local": "local", "hf": "hf", "modelscope": "modelscope"}
DEMO_PREFIX = "demo"


class FleetFileError(ValueError):
    """A fleet file that cannot be read or does not describe a fleet; the message says where."""


def demo_fleet_path() -> Path:
    """The demo fleet that `fleet up` serves by default, shipped with the package."""
    return Path(str(resources.files("fleet") / "demo_fleet.yaml"))


_Flag = Annotated[str, Field(min_length=1)]


class FleetAdapter(BaseModel):
    """A LoRA adapter of a model, declared for the fleet when it starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256, pattern=r"^[^\s/]\S*$")
    source: str = Field(min_length=1, description="A folder (relative to the file) or a "
                        "Hugging Face id.")


class FleetModel(BaseModel):
    """One model of the fleet, and the workers that serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, min_length=1, description="What logs and the banner call it; "
                             "none: its first served name, else the source.")
    source: str = Field(min_length=1, description="Local path, Hugging Face id, hf:ID, "
                        "modelscope:ID, local:PATH or demo:NAME.")
    served_names: list[_Flag] = Field(default_factory=list, description="Names it is served "
                                      "as; none: the folder name or id.")
    workers: int | None = Field(None, ge=1, description="How many workers serve it; none: one "
                                "on CPU, on GPUs a share of the GPUs no other model claims.")
    gpus: list[str] | None = Field(None, min_length=1,
                                   description="The GPUs it may use (indices).")
    gpus_per_worker: int = Field(1, ge=1, description="GPUs per worker, tensor parallel.")
    cpus: str | None = Field(None, min_length=1, description="The cores its workers share "
                             "out, e.g. 0-3; none: a share of the cores no other model claims.")
    engine_args: list[_Flag] = Field(default_factory=list,
                                     description="vLLM engine arguments, as on a command line.")
    chat_template: str | None = Field(None, min_length=1, description="The worker's "
                                      "--chat-template: a Jinja file or 'chatml'.")
    adapters: list[FleetAdapter] = Field(default_factory=list,
                                         description="LoRA adapters declared for it.")
    max_loras: int | None = Field(None, ge=1, description="Adapter slots per worker "
                                  "(--max-loras); none: 2 where it lists adapters, else no LoRA.")

    @property
    def lora_args(self) -> list[str]:
        """The engine arguments that turn LoRA on, unless `engine_args` does already."""
        if not (self.adapters or self.max_loras) or "--enable-lora" in self.engine_args:
            return []
        return ["--enable-lora", "--max-loras", str(self.max_loras or 2)]

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_indices(cls, value: object) -> object:
        # `gpus: [0, 1]` in YAML gives ints; the worker takes them as text.
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @field_validator("engine_args", mode="before")
    @classmethod
    def _args_as_text(cls, value: object) -> object:
        # `[--max-model-len, 2048]` gives an int; a command line is text.
        if isinstance(value, list):
            return [v if isinstance(v, str) else str(v).lower() if isinstance(v, bool)
                    else str(v) for v in value]
        return value

    @property
    def label(self) -> str:
        return self.name or (self.served_names[0] if self.served_names else self.source)

    @property
    def prefix(self) -> str | None:
        """The source's prefix (`hf`, `demo`, ...), or None for a bare source."""
        head, sep, _ = self.source.partition(":")
        return head if sep and head in (*SOURCE_PREFIXES, DEMO_PREFIX) else None

    @property
    def location(self) -> str:
        """The source without its prefix: a path or an id."""
        return self.source.split(":", 1)[1] if self.prefix else self.source


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[FleetModel] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _distinct_labels(cls, models: list[FleetModel]) -> list[FleetModel]:
        labels = [m.label for m in models]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"two models are called {', '.join(twice)}; give each a name")
        adapters = [a.name for m in models for a in m.adapters]
        twice = sorted({name for name in adapters if adapters.count(name) > 1})
        if twice:
            raise ValueError(f"two adapters are called {', '.join(twice)}")
        return models


def _where(loc: tuple[int | str, ...]) -> str:
    """('models', 1, 'source') -> 'models[1].source'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "the file"


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "missing"
        lines.append(f"{_where(error['loc'])}: {message}")
    return "; ".join(lines)


def parse_fleet(text: str, origin: str = "the fleet file") -> FleetFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetFileError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FleetFileError(f"{origin} must be a mapping with a 'models' list")
    try:
        return FleetFile.model_validate(data)
    except ValidationError as exc:
        raise FleetFileError(f"{origin}: {_describe(exc)}") from None


def _beside(folder: Path, model: FleetModel) -> FleetModel:
    """Relative `local:` paths and chat template files are relative to the fleet file. (A bare
    source is left as it is: it may be a Hugging Face id.)"""
    update: dict[str, str] = {}
    if model.prefix == "local" and not Path(model.location).expanduser().is_absolute():
        update["source"] = f"local:{folder / model.location}"
    template = model.chat_template
    if template is not None and template != "chatml" and not Path(template).is_absolute():
        update["chat_template"] = str(folder / template)
    adapters = [a.model_copy(update={"source": str(folder / a.source)})
                if not Path(a.source).is_absolute() and (folder / a.source).exists() else a
                for a in model.adapters]
    return model.model_copy(update={**update, "adapters": adapters})


def load_fleet(path: Path) -> FleetFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FleetFileError(f"cannot read the fleet file {path}: {exc.strerror}") from None
    fleet = parse_fleet(text, str(path))
    folder = path.resolve().parent
    return FleetFile(models=[_beside(folder, model) for model in fleet.models])



# A demo model's name -> its local folder and the name it is served as.
DemoResolver = Callable[[str], tuple[Path, str]]


def resolve_demo_sources(fleet: FleetFile, demo: DemoResolver) -> FleetFile:
    """The fleet with each `demo:` source replaced by the demo model's local folder (prepared
    now if needed), served under the demo model's name unless the file names it."""
    models = []
    for model in fleet.models:
        if model.prefix == DEMO_PREFIX:
            folder, served_as = demo(model.location)
            model = model.model_copy(update={
                "source": f"local:{folder}",
                "served_names": model.served_names or [served_as],
                "name": model.name or (model.served_names or [served_as])[0],
            })
        models.append(model)
    return FleetFile(models=models)
