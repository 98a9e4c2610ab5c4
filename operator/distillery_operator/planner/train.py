"""Train: the student, as a Kubeflow PyTorchJob or, without Kubeflow (or with ``training.backend: job``),
an Indexed Job with a headless rendezvous Service. Rank 0's progress line (while it runs) and its
report (once it ended) fill the training status. An on-policy training scores the student's samples with
the self-hosted teacher's server: it is kept through the training (started again for a restarted one, the
Job waiting until it is ready) and torn down once the training ended (:mod:`.teacher`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillery_trainer.api.status import REASON_RETRYING

from .. import status as derive
from ..builders.common import teacher_in_training
from ..builders.train import pytorch_job, rendezvous_service, train_job
from ..naming import TEACHER, TRAIN
from ..observe import parse_time
from . import teacher
from .model import Outcome

if TYPE_CHECKING:
    from .walk import Walk


def train(w: Walk) -> Outcome:
    st = w.st.training
    res = w.spec.training.resources
    name = w.run.child(TRAIN)
    child = w.observed.child("PyTorchJob", name) or w.observed.child("Job", name)
    scoring = teacher_in_training(w.spec)  # the self-hosted teacher scores the student's samples
    if (held := w.held("train")) is not None:
        teacher.teardown(w)
        return held
    if (held := w.superseded("train", child, "Service")) is not None:
        if scoring:
            teacher.want(w)  # the restarted training needs it again
        return held
    if child is None or child.deleting:
        if child is None and st.state == "Succeeded":
            teacher.teardown(w)
            return Outcome.DONE
        backend = "job" if w.spec.training.backend == "job" or not w.caps.pytorchjob else "pytorchjob"
        what = "PyTorchJob" if backend == "pytorchjob" else "Indexed Job"
        w.start("train", f"starting: {what}, {res.nodes} node(s) x {res.gpus_per_node} GPU(s)")
        if scoring and (waiting := teacher.ready(w, "train")) is not None:
            return waiting
        if backend == "pytorchjob":
            return w.create_or_wait("train", child, pytorch_job(w.run, w.settings, w.fp["train"]))
        if child is None:  # the Indexed Job's workers find rank 0 through its Service
            w.want(rendezvous_service(w.run, w.settings), mutable=True)
        return w.create_or_wait("train", child, train_job(w.run, w.settings, w.fp["train"]))

    pods = w.observed.pods_of(TRAIN, child)
    done = child.is_true("Succeeded") if child.kind == "PyTorchJob" else child.is_true("Complete")
    # Rank 0's log only while the training runs; once it ended, its termination message is the report.
    running = not done and not child.is_true("Failed")
    progress = derive.training_progress(pods, w.observed.live if running else None)
    if done or child.is_true("Failed"):
        w.drop("Service", name)  # the Indexed Job's rendezvous Service has served its purpose
        teacher.teardown(w)
    elif child.kind == "Job":
        w.want(rendezvous_service(w.run, w.settings), mutable=True)
    if done and st.state == "Succeeded":
        return Outcome.DONE
    if progress is not None:
        st.step = progress.step
        st.total = progress.total_steps
        st.done = progress.step
        st.epoch = progress.epoch
        st.loss = _rounded(progress.loss, 6)
        st.tokens_per_second = _rounded(progress.tokens_per_second, 1)
        st.eta_seconds = _rounded(progress.eta_seconds, 1)
        if running and progress.gpu_hours > 0:
            st.gpu_hours = round(progress.gpu_hours, 4)
    started = parse_time(child.status.get("startTime")) or st.start_time
    if done:
        finished = parse_time(child.status.get("completionTime"))
        if progress is None and w.waiting_for_reports(finished):
            st.message = f"{child.kind} {name} succeeded; reading rank 0's report"
            return Outcome.RUNNING
        w.succeed("train", finished)
        if progress is not None and progress.gpu_hours > 0:
            st.gpu_hours = round(progress.gpu_hours, 4)
        elif started is not None:
            hours = ((finished or w.now) - started).total_seconds() / 3600
            st.gpu_hours = round(max(0.0, hours) * res.nodes * res.gpus_per_node, 4)
        loss = f", loss {st.loss:.4g}" if st.loss is not None else ""
        st.message = f"{st.step} steps{loss}, {st.gpu_hours or 0:.2f} GPU-hours"
        return Outcome.DONE
    if child.is_true("Failed"):
        rank0 = f"rank 0: {progress.message}" if progress is not None and progress.message else ""
        return w.failed("train", child, pods, rank0)
    total = f"/{st.total}" if st.total else ""
    loss = f", loss {st.loss:.4g}" if st.loss is not None else ""
    w.start(
        "train",
        f"{progress.method} step {st.step}{total}{loss}"
        if progress is not None
        else f"{child.kind} {name} running",
    )
    restarting = child.is_true("Restarting") or int(child.status.get("failed") or 0) > 0
    if restarting:
        w.degraded = (
            REASON_RETRYING,
            f"{child.kind} {name} is restarting failed pods. {derive.failure_detail(pods)}".strip(),
        )
    # A stalled training is stopped: its pods would hold their GPUs (the Service goes with it), and so
    # would the teacher that scores it.
    troubled = [*pods, *w.observed.pods_of(TEACHER)] if scoring else pods
    if (stalled := w.stalled("train", troubled, (child.kind, name), ("Service", name))) is not None:
        teacher.teardown(w)
        return stalled
    if scoring:
        teacher.want(w)
    return Outcome.RUNNING


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
