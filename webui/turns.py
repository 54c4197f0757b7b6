"""The turn being answered in each browser session, so that Stop, Clear or a new model end it.

One turn at a time per session: a second Send while an answer streams is refused rather than
racing the first for the history.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Turn:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by Clear and model changes: the turn ends without writing its answer anywhere.
    discard: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Turns:
    def __init__(self) -> None:
        self._running: dict[str, Turn] = {}

    def begin(self, session: str) -> Turn | None:
        """A new turn for `session`, or None while one is still running there."""
        if session in self._running:
            return None
        turn = self._running[session] = Turn()
        return turn

    def end(self, session: str, turn: Turn) -> None:
        if self._running.get(session) is turn:
            del self._running[session]
        turn.done.set()

    def running(self, session: str) -> bool:
        return session in self._running

    async def stop(self, session: str, *, discard: bool = False, wait: float = 0) -> None:
        """Ask the session's turn to stop; with `wait`, give it that long to finish."""
        turn = self._running.get(session)
        if turn is None:
            return
        turn.discard = turn.discard or discard
        turn.stop.set()
        if wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(turn.done.wait(), wait)
