"""Counting a batch as it runs: the progress bar (done, failed, tokens/s, ETA) and the summary."""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from fleet.batch.jobs import is_success, usage_of


@dataclass
class Tally:
    total: int  # lines in the input
    skipped: int = 0  # done by an earlier run
    done: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    workers: collections.Counter[str] = field(default_factory=collections.Counter)
    started: float = field(default_factory=time.monotonic)

    def add(self, record: dict[str, Any]) -> None:
        if is_success(record):
            self.done += 1
            prompt, completion = usage_of(record)
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            worker = (record.get("response") or {}).get("worker")
            if worker:
                self.workers[str(worker)] += 1
        else:
            self.failed += 1

    def restart_clock(self) -> None:
        """Time from now: offline, the engine's start is not part of the batch's throughput."""
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed

    def summary(self, output: str, *, sorted_: bool, note: str = "") -> str:
        finished = self.done + self.failed
        lines = [
            f"fleet batch: {self.total} lines: {self.done} done now, {self.skipped} done before, "
            f"{self.failed} failed, {self.total - self.skipped - finished} not run",
            f"  tokens (this run): {self.prompt_tokens} prompt, {self.completion_tokens} "
            f"completion; {self.retries} retries",
            f"  wall time {self.elapsed:.1f} s: {finished / self.elapsed:.2f} requests/s, "
            f"{self.tokens_per_s:.1f} completion tokens/s",
        ]
        if self.workers:
            spread = ", ".join(f"{w} {n}" for w, n in sorted(self.workers.items()))
            lines.append(f"  workers: {spread}")
        order = "in input order" if sorted_ else "in completion order; run again to finish"
        lines.append(f"  output: {output}, {order}")
        if note:
            lines.append(f"  {note}")
        return "\n".join(lines)


class Progress:
    """A tqdm bar on stderr; tqdm gives the count, rate and ETA, we add failures and tok/s."""

    def __init__(self, tally: Tally, *, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.tally = tally
        self.bar = tqdm(total=tally.total, initial=tally.skipped, unit="req", desc="batch",
                        disable=not enabled, file=stream, dynamic_ncols=True)
        self._refresh_postfix()

    def _refresh_postfix(self) -> None:
        self.bar.set_postfix(failed=self.tally.failed, tok_s=f"{self.tally.tokens_per_s:.1f}",
                             refresh=False)

    def restart_clock(self) -> None:
        self.tally.restart_clock()
        self.bar.reset(total=self.tally.total)
        # What earlier runs did is the starting point, not progress made at some rate.
        self.bar.n = self.bar.last_print_n = self.tally.skipped
        self.bar.refresh()

    def advance(self, count: int = 1) -> None:
        self._refresh_postfix()
        self.bar.update(count)

    def close(self) -> None:
        self._refresh_postfix()
        self.bar.close()
