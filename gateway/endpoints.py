"""The engine endpoints the gateway routes by the `model` of their JSON body, beyond generation.

Each goes to a worker of that model whose engine serves the path (workers report their engine's
paths: an embedding model has no chat, a chat model no embeddings). The body is relayed as it
came; the gateway reads only `model` and `stream`. Errors are OpenAI-shaped, except on the
Anthropic endpoints, where they are Anthropic-shaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starlette.responses import JSONResponse

from controller.protocol import WorkerRecord, WorkerState
from fleetcore.errors import FleetError

ErrorStyle = Literal["openai", "anthropic"]
# What workers from before engine paths were reported serve (and what they were routed).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
RESPONSES = "/v1/responses"


@dataclass(frozen=True)
class EngineEndpoint:
    path: str
    name: str  # the metrics label
    errors: ErrorStyle = "openai"
    summary: str = ""
    body: Literal["json", "form"] = "json"  # form: multipart, with `model` as a field


ENDPOINTS = {e.path: e for e in (
    EngineEndpoint("/v1/embeddings", "embeddings", summary="Embeddings (OpenAI)"),
    EngineEndpoint("/v2/embed", "embed", summary="Embeddings (Cohere v2)"),
    EngineEndpoint("/v1/responses", "responses", summary="Create a response (OpenAI)"),
    EngineEndpoint("/v1/messages", "messages", "anthropic", "Messages (Anthropic)"),
    EngineEndpoint("/v1/messages/count_tokens", "count_tokens", "anthropic",
                   "Count the tokens of a message (Anthropic)"),
    EngineEndpoint("/tokenize", "tokenize", summary="Tokenize a prompt or messages"),
    EngineEndpoint("/detokenize", "detokenize", summary="Token ids back to text"),
    EngineEndpoint("/pooling", "pooling", summary="Pooled hidden states"),
    EngineEndpoint("/classify", "classify", summary="Classification"),
    EngineEndpoint("/v1/score", "score", summary="Score text pairs"),
    EngineEndpoint("/score", "score", summary="Score text pairs"),
    EngineEndpoint("/v1/rerank", "rerank", summary="Rerank documents"),
    EngineEndpoint("/rerank", "rerank", summary="Rerank documents"),
    EngineEndpoint("/v2/rerank", "rerank", summary="Rerank documents (Cohere v2)"),
    EngineEndpoint("/v1/audio/transcriptions", "transcriptions",
                   summary="Transcribe audio (OpenAI; multipart)", body="form"),
    EngineEndpoint("/v1/audio/translations", "translations",
                   summary="Translate audio into English (OpenAI; multipart)", body="form"),
)}

ROUTED_PATHS = GENERATION_PATHS | frozenset(ENDPOINTS)
# Every routed path's metrics label.
ENDPOINT_NAMES = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                  **{e.path: e.name for e in ENDPOINTS.values()}}


def serves(worker: WorkerRecord, path: str) -> bool | None:
    """Whether the worker's engine serves `path`; None while that is not known yet (an engine
    still starting has not said)."""
    if worker.engine_paths is not None:
        return path in worker.engine_paths
    if worker.state is WorkerState.STARTING:
        return None
    return path in GENERATION_PATHS


def routed_paths(workers: list[WorkerRecord]) -> list[str]:
    """The routed endpoints that any of `workers` serves, for messages and model cards."""
    return sorted(p for p in ROUTED_PATHS if any(serves(w, p) for w in workers))


# Anthropic's error types, by HTTP status.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(exc: FleetError) -> JSONResponse:
    """The Anthropic error body for one of our errors, with its status and headers."""
    status = exc.status_code or 500  # a kind without a status is a client's: our bug here
    kind = _ANTHROPIC_TYPES.get(status, "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": exc.message}},
                        status_code=status, headers=exc.headers)
