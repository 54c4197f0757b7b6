"""The gateway's wire schema: what it checks in OpenAI requests, and what it answers itself.

Requests are validated here, then the client's original bytes go to the engine unchanged:
the engine (vLLM's own OpenAI server) owns the full schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetcore.json_types import JsonInt, PositiveInt
from gateway.prompt_tokens import PromptTokenizer


class _Open(BaseModel):
    # Fields we do not check are the engine's business, not ours. The ones we check are
    # strict, so "5" is not a number here even if the engine would take it.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatMessage(_Open):
    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


class _Generation(_Open):
    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None


class ModelRequest(_Open):
    """What the gateway reads of a model-addressed request beyond generation (embeddings,
    responses, messages, tokenize, ...); the engine checks the rest."""

    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = False


def _text(content: str | list[Any] | None) -> str:
    if isinstance(content, str):
        return content
    texts = (p.get("text") for p in content or [] if isinstance(p, dict))
    return "".join(t for t in texts if isinstance(t, str))


class ChatCompletionRequest(_Generation):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "SmolLM2-135M-Instruct", "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None

    def prompt_text(self) -> str:
        """The conversation as text, in order: what prefix-aware routing matches on."""
        return "".join(f"<{m.role}>{_text(m.content)}\n" for m in self.messages)

    def prompt_ids(self, tokenizer: PromptTokenizer) -> list[int] | None:
        """The conversation as the engine's template and tokenizer make it."""
        messages = [{**(m.model_extra or {}), "role": m.role, "content": _text(m.content)}
                    for m in self.messages]
        return tokenizer.chat_ids(messages, self.model_extra)

    def output_limit(self) -> tuple[str, int | None]:
        """The field that bounds the answer's length, and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(_Generation):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 8,
    }]})

    # One text, several texts, one prompt as token ids, or several: none of them empty.
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[JsonInt], Field(min_length=1)]
             | Annotated[list[list[JsonInt]], Field(min_length=1)])

    def output_limit(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        first = self.prompt[0]
        if isinstance(first, str):
            return first
        tokens = first if isinstance(first, list) else self.prompt
        return " ".join(map(str, tokens))

    def prompt_ids(self, tokenizer: PromptTokenizer) -> list[int] | None:
        """The (first) prompt as the engine's tokenizer makes it."""
        if isinstance(self.prompt, str):
            return tokenizer.text_ids(self.prompt)
        first = self.prompt[0]
        if isinstance(first, str):
            return tokenizer.text_ids(first)
        tokens = first if isinstance(first, list) else self.prompt
        return [int(t) for t in tokens]  # type: ignore[arg-type]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-fleet"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    endpoints: list[str] = Field(
        default_factory=list,
        description="The endpoints the gateway routes to this model: what its engines serve.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GatewayStatus(BaseModel):
    """`/health` for a caller without a valid key, when keys are on: what a load balancer needs
    and nothing about models or workers."""

    status: Literal["ok"] = "ok"


class TableHealth(GatewayStatus):
    """`/health` without keys, or for a valid key: the table, counted over the key's models."""

    controller: Literal["ok", "stale", "never-synced"]
    table_age_s: float | None
    workers: int = Field(description="Workers in the gateway's table, in any state.")
    routable_workers: int = Field(
        description="Workers it would send a request to now: ready, breaker not open.")
    models: list[str]
    shared_state: Literal["ok", "down"] | None = Field(
        None, description="The store shared with other gateways (--shared-state): 'down' while "
        "this gateway goes on alone; none: not configured.")


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's own body for /v1/load_lora_adapter; at the gateway it declares the adapter for the
    fleet. `base_model_name` may be left out where the fleet has one LoRA-enabled base model."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=1024)
    base_model_name: str | None = Field(None, min_length=1, max_length=256)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)
