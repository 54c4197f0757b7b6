"""Keys for KV-cache blocks that the worker and the gateway compute alike from token ids.

An engine's prefix cache holds prompts in blocks of `block_size` tokens, each named by a hash
chained over the blocks before it. The worker learns from the engine's KV events which blocks it
holds, with their token ids; the gateway tokenises a prompt as the engine does. Both turn token
ids into these keys, so they meet on the tokens themselves and never need to reproduce vLLM's
own hash (its algorithm and seed are engine settings, and vary by release).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT = 0  # the parent key of a prompt's first block


def chain_keys(token_ids: Sequence[int], block_size: int, parent: int = ROOT) -> list[int]:
    """The key of every whole block of `token_ids`, each chained on the one before (the first on
    `parent`); a partial last block has no key, as it has no place in the engine's cache."""
    if block_size < 1:
        raise ValueError("block_size must be positive")
    data = array("q", token_ids).tobytes()
    step = block_size * 8
    keys = []
    for start in range(0, len(data) - step + 1, step):
        digest = hashlib.blake2b(data[start:start + step], digest_size=8,
                                 key=parent.to_bytes(8, "big")).digest()
        parent = int.from_bytes(digest, "big")
        keys.append(parent)
    return keys
