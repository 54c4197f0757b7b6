"""Which worker holds which stored response, so that `/v1/responses/{id}` finds it again.

vLLM keeps a stored response (`VLLM_ENABLE_RESPONSES_API_STORE=1`) in the memory of the engine
that made it; retrieving or cancelling it must go to that engine. The gateway learns the id from
the first bytes of each `/v1/responses` answer (the JSON body, or the stream's
`response.created` event) and keeps the most recent ids, with the worker, model and API key of
each; only the key that made a response can retrieve or cancel it. The
map is per gateway process: behind several gateways, a retrieval must reach the one that
created the response (sticky sessions), or it is a 404.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')
_LOOK = 4096  # the id comes first in the body and in the first event


@dataclass(frozen=True)
class Owner:
    worker_id: str
    model: str
    key_id: str  # the API key that made it: only that key gets it back ("" without keys)


class ResponseOwners:
    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._owners: collections.OrderedDict[str, Owner] = collections.OrderedDict()

    def learn(self, first_bytes: bytes, worker_id: str, model: str, key_id: str) -> None:
        """Note the response id at the start of an answer, if there is one."""
        if (found := _ID.search(first_bytes, 0, _LOOK)) is None:
            return
        response_id = found.group(1).decode()
        self._owners[response_id] = Owner(worker_id, model, key_id)
        self._owners.move_to_end(response_id)
        while len(self._owners) > self._capacity:
            self._owners.popitem(last=False)

    def owner(self, response_id: str, key_id: str) -> Owner | None:
        """Where the response is, if `key_id` made it (another key cannot tell it exists)."""
        owner = self._owners.get(response_id)
        return owner if owner is not None and owner.key_id == key_id else None

    def __len__(self) -> int:
        return len(self._owners)
