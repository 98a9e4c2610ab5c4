"""What `distillery run` shows: a progress row per stage on a terminal (rich), plain timestamped lines
otherwise (CI logs, pipes), and the verdict as a table at the end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distillery_trainer.api.stages import STAGES
from distillery_trainer.api.status import DistillationRunStatus, Latency, StageStatus, TrainingStatus
from distillery_trainer.cost import worth_it
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class Ui:
    def __init__(self, console: Console | None = None, *, line_interval: float = 10.0) -> None:
        self.console = console or Console(stderr=True)
        if not self.console.is_terminal:
            self.console.soft_wrap = True  # a log line is one line, whatever its length
        self.live = self.console.is_terminal
        self._bar: Progress | None = None
        self.tasks: dict[str, Any] = {}
        self.line_interval = line_interval
        self._last_line: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self, name: str, root: Path) -> None:
        self.console.print(f"[bold]distillery run[/bold] {name}: artifacts in {root}")
        if self.live:
            self._bar = Progress(
                TextColumn("{task.description:<26}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=self.console,
            )
            self._bar.start()
            for st in STAGES:
                self.tasks[st.name] = self._bar.add_task(st.title, total=None, start=False, note="")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _line(self, text: str) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False)

    # ------------------------------------------------------------------------------------------ events

    def stage_started(self, stage: str) -> None:
        if self._bar is not None:
            self._bar.start_task(self.tasks[stage])
        else:
            self._line(f"{stage}: started")

    def stage_finished(self, stage: str, message: str, *, reused: bool = False) -> None:
        note = ("reused: " if reused else "") + message
        if self._bar is not None:
            task = self.tasks[stage]
            total = self._bar.tasks[task].total or 1
            self._bar.update(task, total=total, completed=total, note=note)
            self._bar.stop_task(task)
        else:
            self._line(f"{stage}: done — {note}")

    def note(self, stage: str, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self.tasks[stage], note=text)
        else:
            self._line(f"{stage}: {text}")

    def progress_line(self, stage: str, st: StageStatus) -> str:
        parts = [f"{st.done}" + (f"/{st.total}" if st.total else "")]
        loss = getattr(st, "loss", None)
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if scoring := _on_policy(st):
            parts.append(scoring)
        if getattr(st, "failed", 0):
            parts.append(f"{st.failed} failed")  # type: ignore[attr-defined]
        if retries := self._retries(st):
            parts.append(retries)
        if st.eta_seconds is not None:
            parts.append(f"ETA {st.eta_seconds:.0f}s")
        return ", ".join(parts)

    @staticmethod
    def _retries(st: StageStatus) -> str:
        retries, last = getattr(st, "retries", 0), getattr(st, "last_error", None)
        return f"{retries} retries" + (f" (last: {last})" if last else "") if retries else ""

    def progress(self, stage: str, st: StageStatus) -> None:
        if self._bar is not None:
            loss = getattr(st, "loss", None)
            note = ", ".join(x for x in (f"loss {loss:.3f}" if loss is not None else "", _on_policy(st)) if x)
            self._bar.update(
                self.tasks[stage], total=st.total, completed=st.done, note=note or self._retries(st)
            )
            return
        now = time.monotonic()
        if now - self._last_line.get(stage, 0.0) >= self.line_interval:
            self._last_line[stage] = now
            self._line(f"{stage}: {self.progress_line(stage, st)}")

    def serving(self, url: str, name: str) -> None:
        self.close()
        self.console.print(f"Serving the student at {url} as model {name!r}; Ctrl-C stops it.")

    # ------------------------------------------------------------------------------------------ verdict

    def failed(self, message: str) -> None:
        self.close()
        self.console.print(f"[bold red]Failed[/bold red]: {message}")

    def summary(self, name: str, status: DistillationRunStatus, status_file: Path) -> None:
        self.close()
        r = status.results
        table = Table(title=f"DistillationRun {name}: {status.phase}", show_header=True, header_style="bold")
        table.add_column("")
        table.add_column("student", justify="right")
        table.add_column("teacher", justify="right")
        if r is not None:
            ci = r.retention_interval
            interval = f" [{ci.low:.3f}, {ci.high:.3f}]" if ci else ""
            retention = f"{r.quality_retention:.3f}{interval}" if r.quality_retention is not None else "n/a"
            table.add_row("quality retention" + (f" ({r.metric})" if r.metric else ""), retention, "")
            table.add_row("score", _num(r.student_score), _num(r.teacher_score))
            if r.baseline_score is not None:  # what distillation bought
                before = f"{r.baseline_score:.3f}" + (
                    f" (retention {r.baseline_retention:.3f})" if r.baseline_retention is not None else ""
                )
                table.add_row("score before training", before, "")
            for q in ("p50", "p95", "p99"):
                table.add_row(f"latency {q} (ms)", _ms(r.latency_ms, q), _ms(r.teacher_latency_ms, q))
            if r.throughput_tokens_per_sec is not None:
                table.add_row("output tokens/s", f"{r.throughput_tokens_per_sec:.1f}", "")
            c = r.cost
            if c is not None:
                table.add_row("collection cost", _usd(c.collection_usd), "")
                table.add_row("training cost", _usd(c.training_usd), "")
                if c.teacher_scoring_usd is not None:
                    table.add_row("teacher scoring cost (onPolicy)", _usd(c.teacher_scoring_usd), "")
                if c.total_usd is not None:
                    table.add_row("total cost (once)", _usd(c.total_usd), "")
                table.add_row(
                    "serving per month", _usd(c.serving_usd_per_month), _usd(c.teacher_usd_per_month)
                )
                if c.break_even_requests_per_month is not None:
                    table.add_row("break-even (requests a month)", f"{c.break_even_requests_per_month:,}", "")
        self.console.print(table)
        self.console.print(status.message or "")
        if r is not None and r.cost is not None and (sentence := worth_it(r.cost)):
            self.console.print(sentence, highlight=False, markup=False)
        if r is not None and r.report:
            self.console.print(f"Report: {r.report}")
        self.console.print(f"Status: {status_file}")


def _on_policy(st: StageStatus) -> str:
    """An onPolicy training's figures for its progress row: the running divergence, samples per second and
    the tokens the teacher scored; "" for any other stage or method."""
    if not isinstance(st, TrainingStatus) or st.teacher_tokens_scored is None:
        return ""
    parts = []
    if st.divergence is not None:
        parts.append(f"divergence {st.divergence:.3f}")
    if st.samples_per_second is not None:
        parts.append(f"{st.samples_per_second:.2f} samples/s")
    if st.samples_ended is not None:
        parts.append(f"{st.samples_ended:.0%} ended")
    if st.teacher_logprob is not None:
        parts.append(f"teacher logprob {st.teacher_logprob:.2f}/tok")
    parts.append(f"teacher scored {st.teacher_tokens_scored:,} tok")
    return ", ".join(parts)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ms(lat: Latency | None, q: str) -> str:
    v = getattr(lat, q, None) if lat is not None else None
    return "n/a" if v is None else f"{v:.0f}"


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.2f}"
