"""Train: the student, as a Kubeflow Trainer v2 TrainJob, a Kubeflow v1 PyTorchJob, or an Indexed Job
with a headless rendezvous Service (``training.backend``; ``auto`` takes the first the cluster serves,
in that order). Rank 0's progress line (while it runs) and its report (once it ended) fill the training
status. The kind is chosen when the child is created: an existing child is followed whatever it is.
An on-policy training scores the student's samples with the self-hosted teacher's server: it is kept
through the training (started again for a restarted one, the child waiting until it is ready) and torn
down once the training ended (:mod:`.teacher`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillery_trainer.api.status import (
    REASON_BACKEND_UNAVAILABLE,
    REASON_RETRYING,
    REASON_RUNTIME_NOT_FOUND,
)

from .. import status as derive
from ..builders.common import teacher_in_training
from ..builders.train import pytorch_job, rendezvous_service, runtime_name, train_job, trainjob
from ..naming import TEACHER, TRAIN
from ..observe import parse_time
from ..observe_training import (
    PYTORCHJOB_API,
    TRAINJOB_API,
    failed,
    finish_time,
    succeeded,
    suspended,
    training_child,
)
from . import stalls, teacher
from .model import Outcome

if TYPE_CHECKING:
    from ..observe import Child
    from .walk import Walk


def train(w: Walk) -> Outcome:
    st = w.st.training
    res = w.spec.training.resources
    name = w.run.child(TRAIN)
    child = training_child(w.observed, name)
    scoring = teacher_in_training(w.spec)  # the self-hosted teacher scores the student's samples
    if (held := stalls.held(w, "train")) is not None:
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
        return _create(w, child)

    pods = w.observed.pods_of(TRAIN, child)
    done = succeeded(child)
    # Rank 0's log only while the training runs; once it ended, its termination message is the report.
    running = not done and not failed(child)
    progress = derive.training_progress(pods, w.observed.live if running else None)
    if done or failed(child):
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
        derive.apply_on_policy(st, progress, w.spec)
        if running and progress.gpu_hours > 0:
            st.gpu_hours = round(progress.gpu_hours, 4)
    started = parse_time(child.status.get("startTime")) or st.start_time
    if done:
        finished = finish_time(child)
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
    if failed(child):
        rank0 = f"rank 0: {progress.message}" if progress is not None and progress.message else ""
        return stalls.failed(w, "train", child, pods, rank0)
    if suspended(child):
        # Kueue holds a workload suspended until its queue admits it (or preempts it: suspended again).
        cond = child.condition("Suspended") or {}
        queue = f" in queue {child_queue}" if (child_queue := _queue(w)) else ""
        why = f" ({cond['message']})" if cond.get("message") else ""
        w.stage_status("train").message = f"queued: {child.kind} {name} is suspended{queue}{why}"
        return Outcome.RUNNING
    if child.kind == "TrainJob" and (missing := _missing_runtime(w)) is not None and not pods:
        w.stage_status("train").message = missing
        w.degraded = (REASON_RUNTIME_NOT_FOUND, missing)
        w.requeue(w.settings.discovery_ttl_seconds)
        return Outcome.RUNNING
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
    if (stalled := stalls.stalled(w, "train", troubled, (child.kind, name), ("Service", name))) is not None:
        teacher.teardown(w)
        return stalled
    if scoring:
        teacher.want(w)
    return Outcome.RUNNING


def _create(w: Walk, previous: Child | None) -> Outcome:
    """The training child of the kind ``training.backend`` chooses among those the cluster serves."""
    res = w.spec.training.resources
    kind, problem = _backend(w)
    if problem is not None:
        return w.fail("train", problem, reason=REASON_BACKEND_UNAVAILABLE)
    if kind == "TrainJob" and (missing := _missing_runtime(w)) is not None:
        # Not created: without its runtime a TrainJob never starts and says nothing (no webhook) or is
        # refused (the Trainer's webhook). The runtime may be installed yet: looked up again in a while.
        st = w.stage_status("train")
        st.message = missing
        w.degraded = (REASON_RUNTIME_NOT_FOUND, missing)
        w.requeue(w.settings.discovery_ttl_seconds)
        return Outcome.RUNNING
    what = {"TrainJob": "TrainJob", "PyTorchJob": "PyTorchJob", "Job": "Indexed Job"}[kind]
    via = f" (ClusterTrainingRuntime {runtime_name(w.run, w.settings)})" if kind == "TrainJob" else ""
    w.start("train", f"starting: {what}{via}, {res.nodes} node(s) x {res.gpus_per_node} GPU(s)")
    if teacher_in_training(w.spec) and (waiting := teacher.ready(w, "train")) is not None:
        return waiting
    fp = w.fp["train"]
    if kind == "TrainJob":
        return w.create_or_wait("train", previous, trainjob(w.run, w.settings, fp, w.view.generation))
    if kind == "PyTorchJob":
        return w.create_or_wait("train", previous, pytorch_job(w.run, w.settings, fp))
    if previous is None:  # the Indexed Job's workers find rank 0 through its Service
        w.want(rendezvous_service(w.run, w.settings), mutable=True)
    return w.create_or_wait("train", previous, train_job(w.run, w.settings, fp))


def _backend(w: Walk) -> tuple[str, str | None]:
    """(the kind to create, None) or (_, why the run cannot train as its spec says)."""
    choice = w.spec.training.backend
    caps = w.caps
    if choice == "auto":
        return ("TrainJob" if caps.trainjob else "PyTorchJob" if caps.pytorchjob else "Job"), None
    if choice == "trainjob" and not caps.trainjob:
        return "TrainJob", (
            f"training.backend is trainjob, but the cluster does not serve {TRAINJOB_API} TrainJobs: "
            "install Kubeflow Trainer v2 (docs/install.md), or set training.backend to auto"
        )
    if choice == "pytorchjob" and not caps.pytorchjob:
        return "PyTorchJob", (
            f"training.backend is pytorchjob, but the cluster does not serve {PYTORCHJOB_API} "
            "PyTorchJobs (Kubeflow's v1 training operator): install it, or set training.backend to auto"
        )
    return {"trainjob": "TrainJob", "pytorchjob": "PyTorchJob", "job": "Job"}[choice], None


def _missing_runtime(w: Walk) -> str | None:
    """Why the run's TrainJob cannot start, when its ClusterTrainingRuntime is known not to exist."""
    runtime = runtime_name(w.run, w.settings)
    if w.caps.runtimes.get(runtime, True):
        return None
    named = "the run's training.runtime" if w.spec.training.runtime else "the operator's default"
    return (
        f"waiting: ClusterTrainingRuntime {runtime} ({named}) does not exist; install Kubeflow "
        "Trainer's runtimes (docs/install.md), or name one that exists (`kubectl get "
        "clustertrainingruntimes`) in training.runtime or the chart's workloads.trainingRuntime"
    )


def _queue(w: Walk) -> str | None:
    return w.spec.scheduling.queue_name or w.settings.queue_name


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
