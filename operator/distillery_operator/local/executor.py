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

This module decides the order and the verdict; the run's state and status are :mod:`.state`, the stage
processes :mod:`.stages`.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from distillery_trainer.api import DistillationRunStatus, load_run
from distillery_trainer.api import status as S
from distillery_trainer.api.stages import BY_NAME, EVALUATE, STAGES, verdict
from distillery_trainer.cost import run_cost, scoring_of

from ..builders.common import teacher_in_training
from .process import StageFailed
from .stages import nothing, run_collect, run_serve_and_evaluate, run_train, teacher_served
from .state import (
    LocalRun,
    begin,
    changed_stages,
    collect_done,
    collection_summaries,
    finish,
    load_previous_status,
    now,
    observe,
    read_results,
    train_done,
    training_progress,
    transition,
)
from .ui import Ui

# ---------------------------------------------------------------------------------------------- verdict


def conclude(lr: LocalRun) -> None:
    """The verdict and the cost figures, from the measured results and the spec as it is now (the gate
    and the prices may have changed since the evaluation ran), as the operator decides them."""
    results = read_results(lr.layout)
    if results is None:
        raise StageFailed("evaluate", "no eval/results.json was written", lr.logs / "evaluate.log")
    spec = lr.run.spec
    progress = training_progress(lr.layout)
    scored, teacher_hours = scoring_of(spec, progress)
    results.cost = run_cost(
        spec,
        collection_summaries(lr.layout, spec.collection.shards),
        progress.gpu_hours if progress else None,
        scored_tokens=scored,
        teacher_gpu_hours=teacher_hours,
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


def crashed(lr: LocalRun, exc: Exception) -> StageFailed:
    """The executor's own error (a cache it cannot write, a full disk), not a stage process's: the stage
    that was under way fails with it, as if its process had, and its traceback goes to that stage's log."""
    # The stages run in order, each Succeeded (or reused) before the next begins: the first that is not is
    # the one under way (or, between two, the next); after all of them, the verdict's, which evaluate owns.
    stage = next((s.name for s in STAGES if s.status(lr.status).state != "Succeeded"), EVALUATE.name)
    log = lr.logs / f"{stage}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"\ndistillery run failed in stage {stage}:\n{''.join(traceback.format_exception(exc))}")
    except OSError:  # the disk that failed the stage may refuse the log too: the status still says it
        pass
    return StageFailed(stage, f"{type(exc).__name__}: {exc}", log)


# ---------------------------------------------------------------------------------------------- entry


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
    except Exception as exc:
        err = crashed(lr, exc)
        fail(lr, err)
        raise err from exc
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
    with teacher_served(lr, "collect") if kept else nothing():
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
