"""The optional chat log: finished turns and 👍 / 👎 / flag feedback, as JSON lines.

One file per UTC day, `<log-dir>/webui-YYYY-MM-DD.jsonl`; each line is one event. A turn line
and the feedback lines about the same conversation share its `conversation_id`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from webui.chat import Message, Params

logger = logging.getLogger(__name__)


class FeedbackLog:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._lock = threading.Lock()

    def path(self, now: float | None = None) -> Path:
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        return self.log_dir / f"webui-{day}.jsonl"

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with self.path(record["time"]).open("a", encoding="utf-8") as out:
                out.write(line)

    async def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        try:
            await asyncio.to_thread(self._append, record)
        except OSError as exc:
            # A full disk must not break the chat.
            logger.error("feedback log write failed path=%s error=%s", self.log_dir, exc)

    async def turn(self, *, conversation_id: str, model: str, params: Params, system_prompt: str,
                   conversation: Sequence[Message], outcome: str) -> None:
        await self.write({
            "type": "turn", "conversation_id": conversation_id, "model": model,
            "parameters": params.as_dict(), "system_prompt": system_prompt,
            "conversation": list(conversation), "outcome": outcome,
        })

    async def feedback(self, *, conversation_id: str, model: str | None, params: Params,
                       system_prompt: str, conversation: Sequence[Message], index: int,
                       rating: str) -> None:
        await self.write({
            "type": "feedback", "rating": rating, "message_index": index,
            "conversation_id": conversation_id, "model": model,
            "parameters": params.as_dict(), "system_prompt": system_prompt,
            "conversation": list(conversation),
        })
