"""Progress as the operator and a person at a terminal see it: ``train/progress.json`` (a
:class:`TrainingProgress`, rewritten atomically every few seconds by rank 0) and a one-line bar on a terminal;
elsewhere (a pod's log) a human line and a machine-readable one (:mod:`..progress_line`, which the operator
reads from rank 0's log while training runs) every 10 seconds and at the end."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .. import progress_line
from ..api.summaries import TrainingProgress
from ..layout import atomic_write_json

log = logging.getLogger(__name__)


class ProgressReporter:
    def __init__(
        self,
        path: Path,
        progress: TrainingProgress,
        *,
        enabled: bool,
        interval_s: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.path = path
        self.progress = progress
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_write = 0.0
        self._last_line = 0.0

    def update(self, *, force: bool = False, **fields: Any) -> None:
        self.progress = self.progress.model_copy(update=fields)
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self._last_write >= self.interval_s:
            self.write()
            self._last_write = now
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
        elif force or now - self._last_line >= max(self.interval_s, 10.0):
            log.info("%s", self.line())
            progress_line.emit("train", self.progress, self.stream)
            self._last_line = now

    def write(self) -> None:
        if self.enabled:
            atomic_write_json(self.path, self.progress.to_dict())

    def finish(self, state: str, message: str | None = None) -> None:
        self.update(
            force=True, state=state, message=message, eta_seconds=0.0 if state == "Succeeded" else None
        )
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        p = self.progress
        total = p.total_steps or 0
        width = 24
        done = int(width * p.step / total) if total else 0
        bar = "#" * done + "." * (width - done)
        parts = [f"[{bar}] {p.method} step {p.step}/{total or '?'}"]
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4f}")
        if p.tokens_per_second:
            parts.append(f"{p.tokens_per_second:,.0f} tok/s")
        if p.divergence is not None:
            parts.append(f"divergence {p.divergence:.4f}")
        if p.teacher_tokens_scored:
            parts.append(
                f"teacher scored {p.teacher_tokens_scored:,} tok in {_duration(p.teacher_scoring_seconds or 0)}"
            )
        if p.eta_seconds is not None:
            parts.append(f"ETA {_duration(p.eta_seconds)}")
        parts.append(f"elapsed {_duration(p.elapsed_seconds)}")
        return "  ".join(parts)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
