"""The worker's own HTTP API for gateways: what its engine's prefix cache holds, and the
tokenizer that names it. Gateways import these; nobody else declares them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class KvCacheChanges(BaseModel):
    """What changed in the engine's prefix cache since a gateway's last read.

    Blocks are named by `fleetcore.kv_blocks.chain_keys` of their token ids. A reader passes the
    `epoch` and `seq` it holds; an answer with `reset` replaces what it holds with `added` (a new
    engine, a cleared cache, or a reader too far behind), otherwise it applies `removed` and then
    `added`."""

    epoch: str = Field(description="Changes when the engine's cache starts over.")
    seq: int = Field(ge=0, description="Changes applied up to here.")
    block_size: int | None = Field(None, description="Tokens per block; none: no block yet.")
    reset: bool
    added: list[int] = Field(default_factory=list)
    removed: list[int] = Field(default_factory=list)


class TokenizerFiles(BaseModel):
    """What a gateway needs to tokenise a prompt exactly as the engine does."""

    tokenizer_json: str = Field(description="The Hugging Face `tokenizer.json`.")
    chat_template: str | None = Field(None, description="The Jinja template the engine renders "
                                      "chats with; none: the model has none.")
    bos_token: str | None = None
    eos_token: str | None = None
