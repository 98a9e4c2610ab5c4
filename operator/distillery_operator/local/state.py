"""The state of one local run: where its files are, what is finished for the current inputs (by the stage
rules the operator uses too, :mod:`distillery_trainer.api.stages`), and its status, kept in
``<workdir>/<name>/status.json`` in exactly the CR's status shape."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distillery_trainer import outputs
from distillery_trainer.api import DistillationRun, DistillationRunStatus
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stage import RunRef, ServedModel, StageConfig
from distillery_trainer.api.stages import BY_NAME, collection_failures, fingerprints, inputs_changed
from distillery_trainer.api.status import Results
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.layout import RunLayout, atomic_write, atomic_write_json
from distillery_trainer.models import VOLUME_ROOT_ENV
from distillery_trainer.progress_line import latest_collection

from ..status import apply_collection, apply_on_policy, conditions
from .servers import Served
from .ui import Ui

TEACHER_NAME = "teacher"


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class LocalRun:
    run: DistillationRun
    spec_file: Path
    workdir: Path
    ui: Ui
    status: DistillationRunStatus = field(default_factory=DistillationRunStatus)
    teacher: Served | None = None
    student: Served | None = None

    @property
    def name(self) -> str:
        return self.run.metadata.name

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.workdir / self.name)

    @property
    def cache_dir(self) -> Path:
        return self.workdir / ".cache"

    @property
    def logs(self) -> Path:
        return self.layout.root / "logs"

    @property
    def spec_dir(self) -> Path:
        return self.spec_file.resolve().parent

    def stage_env(self) -> dict[str, str]:
        """What the stage processes get beyond this environment: the run file's directory stands for the
        volume (``pvc://`` models and ``pvcPath`` prompts are relative to it, as in a cluster to the
        volume's root). HF_TOKEN, when exported, is inherited as it is."""
        return {VOLUME_ROOT_ENV: str(self.spec_dir)}

    # ------------------------------------------------------------------------------------------ config

    def stage_config(self) -> StageConfig:
        return StageConfig(
            run=RunRef(name=self.name, namespace=self.run.metadata.namespace or "local"),
            spec=self.run.spec,
            artifacts=str(self.layout.root.resolve()),
            cache_dir=str(self.cache_dir.resolve()),
            teacher=ServedModel(base_url=self.teacher.base_url, model=self.teacher.name)
            if self.teacher
            else None,
            student=ServedModel(base_url=self.student.base_url, model=self.student.name)
            if self.student
            else None,
        )

    def write_config(self) -> Path:
        path = self.layout.stage_config_file
        atomic_write(path, self.stage_config().dump())
        return path

    def write_status(self) -> None:
        atomic_write_json(self.layout.status_file, self.status.to_dict())

    def trainer_cmd(self) -> list[str]:
        return [sys.executable, "-m", "distillery_trainer.cli"]


# ---------------------------------------------------------------------------------------------- observing


def collection_summaries(layout: RunLayout, shards: int) -> list[CollectionSummary]:
    out = []
    for i in range(shards):
        path = layout.summary_file(i)
        if path.exists():
            out.append(CollectionSummary.model_validate_json(path.read_text()))
    return out


def live_collection(lr: LocalRun, shards: int) -> list[CollectionSummary]:
    """The running shards' latest progress lines (their logs, this attempt's part): retries and the last
    error show there before any answer reaches a summary file."""
    out = []
    for i in range(shards):
        try:
            text = (lr.logs / f"collect-{i:05d}.log").read_text(errors="replace")
        except OSError:
            continue
        found = latest_collection(text[text.rfind("\n$ ") + 1 :])  # after the line that started it
        if found is not None:
            out.append(found)
    return out


def _with_live(found: list[CollectionSummary], live: list[CollectionSummary]) -> list[CollectionSummary]:
    newest = {s.shard: s for s in found}
    for s in live:
        if s.shard not in newest or s.requests > newest[s.shard].requests:
            newest[s.shard] = s
    return [newest[k] for k in sorted(newest)]


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def training_progress(layout: RunLayout) -> TrainingProgress | None:
    try:
        return TrainingProgress.model_validate_json(layout.progress_file.read_text())
    except (OSError, ValueError):
        return None


def read_results(layout: RunLayout) -> Results | None:
    try:
        data = json.loads(layout.results_file.read_text())
    except (OSError, ValueError):
        return None
    return Results.model_validate(data["results"]) if "results" in data else None


def collect_done(layout: RunLayout, spec: DistillationRunSpec) -> bool:
    """Every shard ended for these inputs, and the collection passes ``collection.maxFailedFraction``
    (one that does not is collected again: the shards ask the prompts whose retries ran out again)."""
    shards = spec.collection.shards
    summaries = collection_summaries(layout, shards)
    return (
        outputs.matches(layout, "collect", spec)
        and len(summaries) == shards
        and all(s.done + s.failed >= s.total for s in summaries)
        and collection_failures(summaries, spec.collection) is None
    )


def train_done(layout: RunLayout, spec: DistillationRunSpec) -> bool:
    progress = training_progress(layout)
    return (
        outputs.matches(layout, "train", spec)
        and (layout.student_dir / "config.json").exists()
        and progress is not None
        and progress.state == "Succeeded"
    )


def evaluate_done(layout: RunLayout, spec: DistillationRunSpec) -> bool:
    return outputs.matches(layout, "evaluate", spec) and layout.results_file.exists()


def changed_stages(layout: RunLayout, spec: DistillationRunSpec) -> list[str]:
    """The stages whose outputs on disk were made for other inputs: they run again (and set those aside)."""
    current = fingerprints(spec)
    out = []
    for name in ("collect", "train", "evaluate"):
        rec = outputs.recorded(layout, name)
        if rec is not None and inputs_changed(rec.inputs, current[name]):
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------- status


def transition(lr: LocalRun, phase: str, reason: str, message: str, *, ready: bool = False) -> None:
    """Move the run to ``phase`` with the operator's condition rules (distillery_operator.status)."""
    lr.status.phase = phase  # type: ignore[assignment]
    lr.status.message = message
    lr.status.conditions = conditions(
        lr.status.conditions,
        phase=phase,
        reason=reason,
        message=message,
        degraded=None,
        ready=(ready, reason, message),
        generation=1,
        now=now(),
    )
    lr.write_status()


def begin(lr: LocalRun, stage: str) -> None:
    st = BY_NAME[stage].status(lr.status)
    st.state, st.start_time, st.completion_time, st.message = "Running", now(), None, None
    transition(lr, BY_NAME[stage].phase, BY_NAME[stage].running_reason, f"stage {stage} is running")
    lr.ui.stage_started(stage)


def finish(lr: LocalRun, stage: str, message: str = "", *, skipped: bool = False) -> None:
    st = BY_NAME[stage].status(lr.status)
    st.state = "Succeeded"
    st.completion_time = st.completion_time if skipped and st.completion_time else now()
    st.message = message or st.message
    lr.write_status()
    lr.ui.stage_finished(stage, message, reused=skipped)


def observe(lr: LocalRun) -> None:
    """Fold what the stages wrote on disk into the status (cheap: called every second)."""
    spec, layout, status = lr.run.spec, lr.layout, lr.status
    summaries = collection_summaries(layout, spec.collection.shards)
    c = status.collection
    if c.state == "Running":
        summaries = _with_live(summaries, live_collection(lr, spec.collection.shards))
    if summaries:
        apply_collection(c, summaries, spec.collection.shards)
    if c.state == "Running" and len(summaries) < spec.collection.shards:
        c.done = sum(count_lines(layout.shard_file(i)) for i in range(spec.collection.shards))
    p = training_progress(layout)
    if p is not None:
        t = status.training
        t.step, t.done, t.total = p.step, p.step, p.total_steps
        t.loss, t.tokens_per_second, t.gpu_hours, t.epoch = p.loss, p.tokens_per_second, p.gpu_hours, p.epoch
        t.eta_seconds = p.eta_seconds if t.state == "Running" else None
        apply_on_policy(t, p, spec)


def load_previous_status(layout: RunLayout) -> DistillationRunStatus:
    try:
        data: dict[str, Any] = json.loads(layout.status_file.read_text())
        return DistillationRunStatus.model_validate(data)
    except (OSError, ValueError):
        return DistillationRunStatus()
