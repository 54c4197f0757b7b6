"""An approximate prefix tree of recent prompts: a hashed trie of fixed-size text blocks.

A prompt is cut into blocks; block i is keyed by a hash chained over blocks 0..i, so one key
stands for a whole prefix, much like vLLM's own prefix-cache block hashes. Matching walks the
keys until one is missing. Keys live in an LRU of bounded size: old prefixes fall out, as they
do from the engine's cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def block_keys(text: str, block_bytes: int) -> list[bytes]:
    """The chained hash of every whole block of `text` (a partial last block is not a key)."""
    keys, previous = [], b""
    data = text.encode()
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        previous = hashlib.blake2b(previous + data[start:start + block_bytes],
                                   digest_size=12).digest()
        keys.append(previous)
    return keys


class PrefixTree:
    def __init__(self, max_blocks: int = 100_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    @property
    def size(self) -> int:
        return len(self._keys)

    def match(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt (given by its keys) the tree holds."""
        matched = 0
        for key in keys:
            if key not in self._keys:
                break
            self._keys.move_to_end(key)
            matched += 1
        return matched

    def insert(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.max_blocks:
            self._keys.popitem(last=False)
