"""The controller's HTTP API: every request and response body, as pydantic models.

Workers and gateways import these; nobody else declares them.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from fleetcore.json_types import NonNegativeInt, PositiveInt

WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
# U+0085 is whitespace to Python and Rust (pydantic) but not to JSON Schema's ECMA regex, U+FEFF
# the other way round, so both
# are named: the spec and the check then agree (schemathesis found the gap).
MODEL_NAME_PATTERN = r"^[^\s\u0085\ufeff/][^\s\u0085\ufeff]{0,255}$"
ENGINE_PATH_PATTERN = r"^/[A-Za-z0-9._~{}/-]{0,255}$"
# The engine's paths, from its OpenAPI spec; None: not (yet) known.
EnginePaths = Annotated[
    list[Annotated[str, Field(pattern=ENGINE_PATH_PATTERN)]] | None,
    Field(None, max_length=512, description="The paths the engine serves, from its OpenAPI "
          "spec, once it is up; none: not known (the gateway then assumes the OpenAI "
          "generation endpoints only)."),
]


class WorkerState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"


class WorkerLoad(BaseModel):
    """What the worker last read from its engine's /metrics."""

    # Strict: a load of "0.5" or true is a bug in the sender, not a number.
    model_config = ConfigDict(extra="forbid", strict=True)

    running: NonNegativeInt = Field(0, description="Requests the engine is running.")
    waiting: NonNegativeInt = Field(0, description="Requests queued in the engine.")
    kv_cache_usage: float = Field(0.0, ge=0.0, le=1.0, description="KV-cache use, 0..1.")
    # Learned by the worker from its engine's counters; none until the engine has prefilled.
    prefill_tokens_per_s: float | None = Field(
        None, gt=0, description="Prompt tokens the engine computes (not cache hits) per second "
        "of prefill time, a moving average.")
    prefill_tokens_per_request: float | None = Field(
        None, ge=0, description="Prompt tokens the engine computes per request, a moving "
        "average: what each waiting request will cost it.")
    # Whoever sent them (any gateway): an adapter with requests in the engine is not unloaded.
    busy_adapters: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=1024, description="LoRA adapters with requests "
        "running or waiting in the engine at its last step (vLLM's vllm:lora_requests_info).")


ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
# The LoRA adapters an engine holds now; None in a heartbeat: not reported (unchanged).
AdapterNames = Annotated[
    list[ModelName] | None,
    Field(None, max_length=1024, description="The LoRA adapters the engine holds now, static "
          "(--lora-modules) and loaded at run time; none: not reported."),
]


class AdapterDeclaration(BaseModel):
    """The body of `PUT /adapters/{name}`: where the adapter comes from, and its base model."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        # No whitespace, as the spec's ECMA regex and Python both see it (see MODEL_NAME_PATTERN).
        min_length=1, max_length=1024, pattern=r"^[^\s\u0085\ufeff]+$",
        description="An absolute folder on the workers' hosts, or a Hugging Face id (a "
        "ModelScope id where the engines have VLLM_USE_MODELSCOPE=True): vLLM's lora_path.")
    base_model: ModelName


class AdapterSpec(AdapterDeclaration):
    """A LoRA adapter declared for the fleet: gateways load it on workers of its base model."""

    name: ModelName


class AdapterList(BaseModel):
    adapters: list[AdapterSpec]


class WorkerInfo(BaseModel):
    """The static facts of a worker; sent when it registers."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str = Field(pattern=WORKER_ID_PATTERN)
    engine_url: HttpUrl = Field(description="Base URL of the engine's OpenAI server.")
    engine_api_key: str | None = Field(None, max_length=512)
    # The pattern sits on the items, so the OpenAPI spec says what a model name may be.
    model_names: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(
        min_length=1, max_length=64, json_schema_extra={"uniqueItems": True}
    )
    max_model_len: PositiveInt | None = None
    device: str = Field("cpu", max_length=256, description="e.g. 'cuda:0', 'cuda:0,1', 'cpu:0-1'.")
    # Optional, so that workers from before this field still register.
    chat_template: str | None = Field(
        None, max_length=4096,
        description="The chat template the engine renders with: 'model' (the tokenizer's own), "
        "'chatml' (the built-in fallback for tokenizers without one) or 'file:PATH' "
        "(--chat-template). None: not reported.",
    )

    engine_paths: EnginePaths = None
    kv_cache_url: HttpUrl | None = Field(
        None, description="The worker's own URL whose /kv-cache tells gateways what its "
        "engine's prefix cache holds (read with the engine's API key); none: not published.")
    # LoRA: how many adapters the engine holds at once (--max-cpu-loras, else --max-loras);
    # None: LoRA is off.
    lora_slots: PositiveInt | None = None
    lora_batch_slots: PositiveInt | None = Field(
        None, description="Distinct LoRA adapters one engine step runs (--max-loras), where "
        "fewer than lora_slots; none: as many as lora_slots.")
    static_adapters: list[ModelName] = Field(
        default_factory=list, max_length=1024,
        description="Adapters the engine was started with (--lora-modules): never unloaded.")
    adapters: list[ModelName] = Field(
        default_factory=list, max_length=1024,
        description="The LoRA adapters the engine holds now, static ones included.")

    @field_validator("model_names")
    @classmethod
    def _names_are_unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("model names repeat")
        return names


class Registration(WorkerInfo):
    state: WorkerState = WorkerState.STARTING
    load: WorkerLoad = Field(default_factory=WorkerLoad)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: WorkerState
    load: WorkerLoad = Field(default_factory=WorkerLoad)
    # Facts that become known only once the engine is up.
    max_model_len: PositiveInt | None = None
    engine_paths: EnginePaths = None
    adapters: AdapterNames = None


class RegisterResponse(BaseModel):
    worker_id: str
    heartbeat_interval: float
    expiry: float


class WorkerRecord(Registration):
    """A worker as the controller holds it."""

    model_config = ConfigDict(extra="ignore")

    registered_at: float
    last_heartbeat: float


class ModelList(BaseModel):
    object: str = "list"
    models: list[str]


class WorkerList(BaseModel):
    workers: list[WorkerRecord]


class Snapshot(BaseModel):
    """Everything a gateway needs to route, in one read.

    `models` also holds models whose workers have all gone, so that a gateway can tell
    "no worker right now" (503) from "no such model" (404).
    """

    generation: int
    heartbeat_interval: float
    expiry: float
    workers: list[WorkerRecord]
    models: list[str]
    # True for one expiry period after the controller starts: workers are still registering
    # again, so a worker missing from `workers` may well be alive.
    warming_up: bool = False
    # The fleet's adapter catalogue (declared, persisted by the controller).
    adapters: list[AdapterSpec] = Field(default_factory=list)


# A worker's load as the table's changes carry it: running, waiting, KV-cache use.
CompactLoad = tuple[int, int, float]


class TableChanges(BaseModel):
    """The routing table since a gateway's last read: `GET /table?since=REV&epoch=EPOCH`.

    `full`: `workers` is the whole table (first contact, another controller or a restarted one,
    or a gateway too far behind). Otherwise `workers` holds the workers registered or changed
    since `since`, `removed` those gone, and `loads` the load of workers whose load alone
    changed, compactly. Apply them in that order and keep `revision` for the next read.
    """

    epoch: str = Field(description="Names this run of the controller; revisions count in it.")
    revision: NonNegativeInt
    full: bool
    generation: int
    heartbeat_interval: float
    expiry: float
    models: list[str]
    warming_up: bool = False
    workers: list[WorkerRecord]
    removed: list[str] = Field(default_factory=list)
    loads: dict[str, CompactLoad] = Field(
        default_factory=dict, description="worker id -> [running, waiting, kv_cache_usage]")
    # The fleet's adapter catalogue, whole in every read: it is small, and declared rarely.
    adapters: list[AdapterSpec] = Field(default_factory=list)
