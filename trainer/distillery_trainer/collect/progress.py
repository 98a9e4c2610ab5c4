"""Progress of a shard: a bar on a terminal (rich); in a pod's log, every ``interval`` seconds, a plain line and
a machine-readable one (the shard's :class:`CollectionSummary` so far, :mod:`..progress_line`), which the
operator reads while the shard runs."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from .. import progress_line
from ..api.summaries import CollectionSummary
from .collector import Counters

log = logging.getLogger("distillery.collect")


def describe(
    counters: Counters,
    *,
    total: int,
    before: int,
    before_failed: int,
    shard: int,
    shards: int,
    elapsed: float,
) -> str:
    """``before``: prompts an earlier attempt finished, ``before_failed`` of them for good."""
    done = before - before_failed + counters.processed - counters.processed_failed
    failed = before_failed + counters.processed_failed
    rate = counters.processed / elapsed if elapsed > 0 else 0.0
    left = total - before - counters.processed
    eta = f", eta {_duration(left / rate)}" if rate > 0 and left > 0 else ""
    pct = 100.0 * (before + counters.processed) / total if total else 100.0
    last = f" (last: {counters.last_error})" if counters.retries and counters.last_error else ""
    return (
        f"shard {shard}/{shards}: {done}/{total} answered ({pct:.1f}%), {failed} failed, "
        f"{counters.processed_cached} cached, {counters.requests} requests, {counters.retries} retries{last}, "
        f"{rate:.1f} prompts/s{eta}"
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    def __init__(
        self,
        counters: Counters,
        *,
        total: int,
        before: int,
        before_failed: int = 0,
        shard: int,
        shards: int,
        interval: float = 10.0,
        tty: bool | None = None,
        summary: Callable[[], CollectionSummary] | None = None,
    ) -> None:
        self.counters = counters
        self.total, self.before, self.before_failed = total, before, before_failed
        self.shard, self.shards = shard, shards
        self.interval = interval
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.summary = summary
        self.start = time.monotonic()
        self._bar: Any = None
        self._task_id: Any = None

    def line(self) -> str:
        return describe(
            self.counters,
            total=self.total,
            before=self.before,
            before_failed=self.before_failed,
            shard=self.shard,
            shards=self.shards,
            elapsed=time.monotonic() - self.start,
        )

    def emit(self, summary: CollectionSummary | None = None) -> None:
        """The machine-readable line (off a terminal): ``summary``, else the shard's summary so far."""
        report = summary if summary is not None else self.summary() if self.summary is not None else None
        if report is not None and not self.tty:
            progress_line.emit("collect", report)

    async def run(self) -> None:
        """Until cancelled: refresh the bar, or log a line every ``interval`` seconds."""
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn(f"collect shard {self.shard}/{self.shards}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task_id = self._bar.add_task("collect", total=self.total, completed=self.before, status="")
            self._bar.start()
            try:
                while True:
                    c = self.counters
                    self._bar.update(
                        self._task_id,
                        completed=self.before + c.processed,
                        status=f"{self.before_failed + c.processed_failed} failed, {c.processed_cached} cached, "
                        f"{c.retries} retries"
                        + (f" (last: {c.last_error})" if c.retries and c.last_error else ""),
                    )
                    await asyncio.sleep(0.2)
            finally:
                c = self.counters
                self._bar.update(self._task_id, completed=self.before + c.processed)
                self._bar.stop()
        else:
            while True:
                await asyncio.sleep(self.interval)
                log.info("%s", self.line())
                self.emit()
