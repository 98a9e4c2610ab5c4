"""The local executor: one DistillationRun on this machine, the embedded default (`distillery run`).

It runs the operator's stages as local processes with the same stage CLIs, the same stage config and the
same artifact layout as in a cluster:

    collect   `distillery-trainer collect` per shard (a self-hosted teacher is served by vLLM meanwhile)
    train     `distillery-trainer train` (under torchrun with one process per GPU; one process on a CPU;
              an on-policy training has the self-hosted teacher served again, to score its samples)
    serve     the student on vLLM (the CPU build without a GPU), kept up while evaluating
    evaluate  `distillery-trainer evaluate` against the student (and the teacher, for latency)

Status is written to ``<workdir>/<name>/status.json`` in exactly the CR's status shape. Re-running skips
what is finished for the same inputs (collection summaries, the trained student, results.json), by the
stage rules the operator uses too (:mod:`distillery_trainer.api.stages`): the stages set aside outputs
made for other inputs themselves (:mod:`distillery_trainer.outputs`). Ctrl-C stops every child process
and the next run resumes; a failed stage stops the run with the stage, the cause and the log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distillery_trainer import outputs
from distillery_trainer.api import DistillationRun, DistillationRunStatus, load_run
from distillery_trainer.api import status as S
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stage import RunRef, ServedModel, StageConfig
from distillery_trainer.api.stages import BY_NAME, collection_failures, fingerprints, inputs_changed, verdict
from distillery_trainer.api.status import Results
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.cost import run_cost
from distillery_trainer.layout import RunLayout, atomic_write, atomic_write_json
from distillery_trainer.models import VOLUME_ROOT_ENV
from distillery_trainer.serve.args import score_top_k

from ..builders.common import teacher_in_training
from ..status import apply_collection, conditions
from . import process
from .process import StageFailed
from .servers import Served, serve_model
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


# ---------------------------------------------------------------------------------------------- stages


def prompts_args(lr: LocalRun) -> list[str]:
    """``--prompts FILE`` for a prompt source that is a local file (relative to the run file's directory)."""
    from distillery_trainer.collect.prompts import local_prompts_path

    source = lr.run.spec.data.prompts
    if source.config_map_ref is not None:
        raise StageFailed(
            "collect",
            "spec.data.prompts.configMapRef: `distillery run` has no ConfigMap to read: put the JSONL in a "
            "file and set data.prompts.pvcPath (relative to the run file) or url: file:///path/prompts.jsonl",
        )
    path = local_prompts_path(source, lr.spec_dir)
    if path is None:
        return []
    if not path.exists():
        raise StageFailed("collect", f"spec.data.prompts: {path} does not exist")
    return ["--prompts", str(path)]


@contextmanager
def teacher_served(lr: LocalRun, stage: str) -> Iterator[None]:
    """Serve a self-hosted teacher with vLLM for the duration (nothing to do for an endpoint teacher, or
    when it is served already: an on-policy run keeps it from the collection through the training)."""
    sh = lr.run.spec.teacher.self_hosted
    if sh is None or lr.teacher is not None:
        yield
        return
    lr.ui.note(stage, "starting the teacher on vLLM")
    with serve_model(
        ref=sh.model,
        name=TEACHER_NAME,
        cache_dir=lr.cache_dir,
        base_dir=lr.spec_dir,
        log=lr.logs / "teacher-vllm.log",
        stage=stage,
        teacher=sh,
        logprobs=lr.run.spec.teacher.logprobs,
        score_top_k=score_top_k(lr.run.spec),
    ) as served:
        lr.teacher = served
        try:
            yield
        finally:
            lr.teacher = None


def run_collect(lr: LocalRun) -> None:
    spec = lr.run.spec
    extra = prompts_args(lr)
    with teacher_served(lr, "collect"):
        config = lr.write_config()
        if lr.teacher is not None:
            extra += ["--tokenizer", lr.teacher.model_dir]
        procs = []
        try:
            for shard in range(spec.collection.shards):
                argv = [*lr.trainer_cmd(), "collect", "--config", str(config), "--shard", str(shard),
                        "--shards", str(spec.collection.shards), *extra]  # fmt: skip
                procs.append(process.start(argv, lr.logs / f"collect-{shard:05d}.log", lr.stage_env()))
            while any(p.alive() for p in procs):
                observe(lr)
                lr.ui.progress("collect", lr.status.collection)
                lr.write_status()
                time.sleep(1)
        except BaseException:
            for p in procs:
                p.stop()
            raise
        # The totals over every shard, by the rule each shard applied to its own share (and the planner's).
        too_many = collection_failures(
            collection_summaries(lr.layout, spec.collection.shards), spec.collection
        )
        if too_many is not None:
            observe(lr)
            raise StageFailed("collect", too_many, lr.logs / "collect-00000.log")
        for shard, p in enumerate(procs):
            if p.popen.returncode != 0:
                raise StageFailed(
                    "collect",
                    f"shard {shard}: exit code {p.popen.returncode}: {process.last_error_line(p.log)}",
                    p.log,
                )
    observe(lr)
    log = lr.logs / "collect-00000.log"
    if not collect_done(lr.layout, spec):
        raise StageFailed("collect", "the shards ended without a complete summary", log)
    if lr.status.collection.done == 0:
        raise StageFailed("collect", f"the teacher answered no prompt: {first_failure(lr.layout)}", log)


def first_failure(layout: RunLayout) -> str:
    """The reason of the first recorded failure, to say why a collection produced nothing."""
    for path in sorted(layout.collect_dir.glob("failures-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                return str(json.loads(line).get("reason", line))
            except ValueError:
                return line
    return "no failure was recorded"


def gpu_count() -> int:
    """GPUs torch can use here (0 on a machine without one); torch is imported only to ask."""
    import subprocess

    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def run_train(lr: LocalRun) -> None:
    # An on-policy training scores the student's samples with the teacher: a self-hosted one is served
    # for the duration and the stage config names it, as for collection.
    with teacher_served(lr, "train") if teacher_in_training(lr.run.spec) else _nothing():
        _train(lr)


def _train(lr: LocalRun) -> None:
    config = lr.write_config()
    wanted = lr.run.spec.training.resources.gpus_per_node
    nproc = min(wanted, gpu_count()) if wanted > 0 else 0
    if nproc > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--module", "distillery_trainer.cli", "train", "--config", str(config)]  # fmt: skip
    else:
        argv = [*lr.trainer_cmd(), "train", "--config", str(config)]
    env = lr.stage_env() if nproc > 0 else {**lr.stage_env(), "CUDA_VISIBLE_DEVICES": ""}

    def tick() -> None:
        observe(lr)
        lr.ui.progress("train", lr.status.training)
        lr.write_status()

    process.run("train", argv, lr.logs / "train.log", env=env, tick=tick)
    if not train_done(lr.layout, lr.run.spec):
        raise StageFailed("train", "training ended without a student", lr.logs / "train.log")


def run_serve_and_evaluate(lr: LocalRun, keep_serving: bool) -> None:
    spec = lr.run.spec
    begin(lr, "serve")
    lr.status.serving.replicas = 1
    with serve_model(
        ref=str(lr.layout.student_dir),
        name=lr.name,
        cache_dir=lr.cache_dir,
        base_dir=lr.spec_dir,
        log=lr.logs / "student-vllm.log",
        stage="serve",
        serving=spec.serving,
    ) as student:
        lr.student = student
        lr.status.serving.ready_replicas = lr.status.serving.done = 1
        lr.status.serving.total = 1
        lr.status.endpoint = student.base_url
        finish(lr, "serve", f"student served at {student.base_url}")
        if evaluate_done(lr.layout, spec):
            finish(lr, "evaluate", "reused eval/results.json", skipped=True)
        else:
            begin(lr, "evaluate")
            compare = spec.evaluation.load.compare_teacher
            ctx = teacher_served(lr, "evaluate") if compare else _nothing()
            with ctx:
                config = lr.write_config()
                process.run("evaluate", [*lr.trainer_cmd(), "evaluate", "--config", str(config)],
                            lr.logs / "evaluate.log")  # fmt: skip
            finish(lr, "evaluate", "results in eval/results.json")
        if keep_serving:
            lr.ui.serving(student.base_url, lr.name)
            student.wait()
    if not keep_serving:
        lr.status.endpoint = None
        lr.status.serving.ready_replicas = 0


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------------------------------- verdict


def conclude(lr: LocalRun) -> None:
    """The verdict and the cost figures, from the measured results and the spec as it is now (the gate
    and the prices may have changed since the evaluation ran), as the operator decides them."""
    results = read_results(lr.layout)
    if results is None:
        raise StageFailed("evaluate", "no eval/results.json was written", lr.logs / "evaluate.log")
    spec = lr.run.spec
    progress = training_progress(lr.layout)
    results.cost = run_cost(
        spec,
        collection_summaries(lr.layout, spec.collection.shards),
        progress.gpu_hours if progress else None,
    )
    gate = verdict(results, spec.evaluation)
    results.gate_passed = gate.passed
    lr.status.results = results
    lr.status.completion_time = now()
    transition(lr, gate.phase, gate.reason, gate.message, ready=gate.passed)


def fail(lr: LocalRun, err: StageFailed) -> None:
    st = BY_NAME[err.stage].status(lr.status)
    st.state, st.completion_time, st.message = "Failed", now(), err.cause
    lr.status.completion_time = now()
    transition(lr, S.PHASE_FAILED, BY_NAME[err.stage].failed_reason, str(err))


# ---------------------------------------------------------------------------------------------- entry


def load_previous_status(layout: RunLayout) -> DistillationRunStatus:
    try:
        data: dict[str, Any] = json.loads(layout.status_file.read_text())
        return DistillationRunStatus.model_validate(data)
    except (OSError, ValueError):
        return DistillationRunStatus()


def execute(spec_file: str | Path, workdir: str | Path, ui: Ui, *, keep_serving: bool = False) -> LocalRun:
    """Run (or resume) one DistillationRun here. Raises StageFailed after recording it in status.json."""
    spec_file = Path(spec_file)
    run = load_run(spec_file)
    lr = LocalRun(run=run, spec_file=spec_file, workdir=Path(workdir), ui=ui)
    lr.layout.root.mkdir(parents=True, exist_ok=True)
    previous = load_previous_status(lr.layout)
    lr.status = DistillationRunStatus(start_time=previous.start_time or now(), observed_generation=1)
    lr.status.phase = S.PHASE_PENDING  # type: ignore[assignment]
    lr.write_status()
    ui.start(lr.name, lr.layout.root)
    changed = changed_stages(lr.layout, run.spec)
    if changed:
        ui.note(changed[0], f"the spec changed since the last run: redoing {', '.join(changed)}")
    try:
        collect_and_train(lr)
        run_serve_and_evaluate(lr, keep_serving)
        conclude(lr)
    except StageFailed as err:
        fail(lr, err)
        raise
    except KeyboardInterrupt:
        transition(lr, lr.status.phase, "Interrupted", "interrupted: run the same command again to resume")
        progressing = lr.status.condition(S.COND_PROGRESSING)
        if progressing is not None:  # nothing runs until the command is run again
            progressing.status = "False"
        lr.write_status()
        raise
    return lr


def collect_and_train(lr: LocalRun) -> None:
    spec = lr.run.spec
    collected = collect_done(lr.layout, spec)
    if collected:
        observe(lr)
        finish(lr, "collect", "reused collect/", skipped=True)
    else:
        begin(lr, "collect")
    trained = train_done(lr.layout, spec)
    # An on-policy training scores with the teacher: one server from the collection through the training.
    kept = teacher_in_training(spec) and not collected and not trained
    with teacher_served(lr, "collect") if kept else _nothing():
        if not collected:
            run_collect(lr)
            finish(
                lr, "collect", f"{lr.status.collection.done} answers, {lr.status.collection.failed} failed"
            )
        if trained:
            observe(lr)
            finish(lr, "train", "reused student/", skipped=True)
        else:
            begin(lr, "train")
            run_train(lr)
            observe(lr)
            finish(lr, "train", f"{lr.status.training.step} steps, loss {lr.status.training.loss or 0:.3f}")


def workdir_default() -> Path:
    return Path(os.environ.get("DISTILLERY_WORKDIR", "runs"))
