"""``plan(run, observed, now)``: the children a run should have, the ones to delete, and its status. Pure.

The planner is level-triggered: it looks at what exists (the observations kopf's indices hold) and at
the status it wrote last, never at what happened in between, so a restarted operator, a missed event or
a replayed one all lead to the same plan. Stages run in order; a stage is *done* when its child says so
(a Job's ``Complete``, a PyTorchJob's ``Succeeded``, a rolled-out Deployment), or when the status says so
and the child is gone. The children of later stages exist only while every earlier stage is done.
Before the first stage starts, the claim a run has the operator create (``storage.pvc.create``) is
created and, unless its StorageClass binds on first consumer, waited on until bound: the run is then
``Pending`` with reason ``WaitingForStorage`` (:meth:`_Walk.claim`).

Spec changes during a run (``teacher`` and ``data`` are immutable: the CRD's CEL rules refuse edits):

- every stage's child carries the digest of the stage's inputs (``distillery.dev/inputs``), from the
  stage rules that `distillery run` and the stage pods read too (:mod:`distillery_trainer.api.stages`);
  the pods set aside outputs on the volume that were made for other inputs;
- an edit of those sections restarts the run *from the earliest stage it touches*: that stage's child is
  deleted and built again, every later stage's child is deleted, their status and the results are reset,
  and a ``SpecChanged`` event says why. A finished run (Succeeded or Failed) restarts the same way, so
  "more epochs" after a failed quality gate retrains, re-serves and re-evaluates. A Deployment is updated
  in place (a rolling update) instead of being deleted;
- ``evaluation.minQualityRetention`` and ``cost`` only change the verdict and the cost figures, which are
  recomputed from the results already measured: no stage runs again;
- execution settings (``scheduling``, collection rates and retries, ``serving.replicas``...) apply to the
  children built from then on (a running Job's pods are immutable).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from distillery_trainer.api.base import format_errors
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stages import (
    BY_NAME,
    EVALUATE,
    STAGES,
    Stage,
    fingerprints,
    inputs_changed,
    later,
    verdict,
)
from distillery_trainer.api.status import (
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_SUCCEEDED,
    REASON_INVALID_SPEC,
    REASON_RETRYING,
    REASON_SERVING,
    REASON_SPEC_CHANGED,
    REASON_WAITING_FOR_STORAGE,
    TERMINAL_PHASES,
    DistillationRunStatus,
    StageStatus,
)
from distillery_trainer.cost import run_cost
from pydantic import ValidationError

from . import status as derive
from .builders.collect import collect_job, teacher_deployment, teacher_service
from .builders.common import Run
from .builders.config import config_map
from .builders.evaluate import eval_job
from .builders.serve import serve_deployment, serve_service
from .builders.storage import persistent_volume_claim
from .builders.train import pytorch_job, rendezvous_service, train_job
from .naming import CLASS_NOT_FOUND, COLLECT, EVAL, IMMEDIATE, MAX_RUN_NAME, SERVE, TEACHER, TRAIN
from .observe import Child, Observed, RunView, parse_time
from .settings import Settings


class Outcome(enum.Enum):
    DONE = "done"
    RUNNING = "running"
    FAILED = "failed"


@dataclass(frozen=True)
class Capabilities:
    """What the cluster offers, from discovery."""

    pytorchjob: bool = True
    # The volumeBindingMode of StorageClasses the reconciler looked up (Immediate, WaitForFirstConsumer,
    # or CLASS_NOT_FOUND); a class missing here is unknown (not looked up, or not readable).
    binding_modes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Desired:
    manifest: dict[str, Any]
    # Mutable children (ConfigMap, Service, Deployment) are patched when they differ; Jobs and
    # PyTorchJobs are only created (their pod templates are immutable: a change restarts the stage).
    mutable: bool
    # Exclusive children must belong to the run; a non-exclusive one (the PersistentVolumeClaim) found
    # under its name is used as it is, whoever made it.
    exclusive: bool = True

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    apply: list[Desired] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    status: DistillationRunStatus = field(default_factory=DistillationRunStatus)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


def prior_status(raw: dict[str, Any] | Any) -> DistillationRunStatus:
    """The status last written, ignoring what the model does not know (``status.kopf``)."""
    found = derive.lenient(DistillationRunStatus, dict(raw) if raw else {})
    return found if found is not None else DistillationRunStatus()


def plan(
    view: RunView,
    observed: Observed,
    now: datetime,
    *,
    settings: Settings,
    caps: Capabilities = Capabilities(),
) -> Plan:
    prior = prior_status(view.status)
    try:
        spec = DistillationRunSpec.model_validate_json(view.spec_json)
    except ValidationError as exc:
        return _invalid(view, prior, format_errors(exc, ("spec",)), now)
    problems: list[tuple[str, str]] = []
    if spec.storage is None:
        problems.append(
            (
                "spec.storage",
                "required in a cluster: set storage.pvc.claimName (an existing claim; ReadWriteMany for "
                "multi-node training), add storage.pvc.create: {size: 200Gi} to have the operator create "
                "it, or set storage.url",
            )
        )
    if len(view.name) > MAX_RUN_NAME:
        problems.append(
            (
                "metadata.name",
                f"at most {MAX_RUN_NAME} characters in a cluster (children add '-collect-<shard>')",
            )
        )
    if problems:
        return _invalid(view, prior, problems, now)
    return _Walk(view, spec, observed, now, settings, caps, prior).plan()


def _invalid(
    view: RunView, prior: DistillationRunStatus, errors: list[tuple[str, str]], now: datetime
) -> Plan:
    st = prior.model_copy(deep=True)
    st.observed_generation = view.generation
    st.phase = "Failed"
    message = "invalid spec: " + "; ".join(f"{p or '<root>'}: {m}" for p, m in errors)
    st.message = message
    st.completion_time = prior.completion_time if prior.phase == PHASE_FAILED else now
    st.conditions = derive.conditions(
        prior.conditions,
        phase=PHASE_FAILED,
        reason=REASON_INVALID_SPEC,
        message=message,
        degraded=None,
        ready=(False, REASON_INVALID_SPEC, message),
        generation=view.generation,
        now=now,
    )
    events = [] if prior.message == message else [Event("Warning", REASON_INVALID_SPEC, message)]
    return Plan(status=st, events=events)


class _Walk:
    """One planning pass over the stages."""

    def __init__(
        self,
        view: RunView,
        spec: DistillationRunSpec,
        observed: Observed,
        now: datetime,
        settings: Settings,
        caps: Capabilities,
        prior: DistillationRunStatus,
    ) -> None:
        self.view = view
        self.spec = spec
        self.run = Run(view.name, view.namespace, view.uid, spec)
        self.observed = observed
        self.now = now
        self.settings = settings
        self.caps = caps
        self.prior = prior
        self.fp = fingerprints(spec)
        self.st = prior_status(view.status)  # a second parse is cheaper than a deep copy
        self.st.observed_generation = view.generation
        self.out = Plan(status=self.st)
        self.failure: tuple[str, str] | None = None  # (stage, message)
        self.degraded: tuple[str, str] | None = None
        self.serve_reached = False
        self.serving_ready = False
        self.storage_wait: str | None = None  # why the run waits for its claim, when it does

    # ------------------------------------------------------------------------------------------ helpers

    def want(self, manifest: dict[str, Any], *, mutable: bool) -> None:
        self.out.apply.append(Desired(manifest, mutable))

    def drop(self, kind: str, name: str) -> None:
        child = self.observed.child(kind, name)
        if child is not None and self.view.uid in child.owners and not child.deleting:
            self.out.delete.append((kind, name))

    def owned(self, child: Child | None) -> bool:
        return child is None or self.view.uid in child.owners

    def blocked(self, stage: str, child: Child) -> Outcome:
        stage_status = self._stage_status(stage)
        stage_status.state = "Running"
        stage_status.message = (
            f"waiting: {child.kind} {child.name} exists and does not belong to this run; it is deleted "
            "with the run that owns it (or delete it if nothing does)"
        )
        self.degraded = (REASON_RETRYING, stage_status.message)
        return Outcome.RUNNING

    def _stage_status(self, stage: str) -> StageStatus:
        return BY_NAME[stage].status(self.st)

    def start(self, stage: str, message: str) -> StageStatus:
        st = self._stage_status(stage)
        if st.state != "Running":
            st.state = "Running"
            st.start_time = self.now
            st.completion_time = None
        st.message = message
        return st

    def succeed(self, stage: str, when: datetime | None = None) -> StageStatus:
        st = self._stage_status(stage)
        if st.state != "Succeeded":
            st.state = "Succeeded"
            st.completion_time = when or self.now
            st.eta_seconds = None
        return st

    def fail(self, stage: str, message: str, when: datetime | None = None) -> Outcome:
        st = self._stage_status(stage)
        if st.state != "Failed":
            st.completion_time = when or self.now
        st.state = "Failed"
        st.message = message
        st.eta_seconds = None
        self.failure = (stage, message)
        return Outcome.FAILED

    def restart(self, stage: str) -> Outcome:
        """The stage's inputs changed: reset it and every later stage, and delete its child."""
        restarted = later(BY_NAME[stage])
        started = any(s.status(self.st).state != "Pending" for s in restarted)
        for s in restarted:
            s.reset(self.st)
        self.st.results = None
        self.st.endpoint = None
        self.st.completion_time = None
        sections = "/".join(f"spec.{s}" for s in BY_NAME[stage].inputs)
        if started:
            self.out.events.append(
                Event("Normal", REASON_SPEC_CHANGED, f"{sections} changed: restarting from {stage}")
            )
        self.start(stage, f"{sections} changed: restarting")
        return Outcome.RUNNING

    def waiting_for_reports(self, since: datetime | None) -> bool:
        """A finished Job's pods may report a moment after it: wait up to the grace period."""
        grace = self.settings.results_grace_seconds
        elapsed = (self.now - since).total_seconds() if since is not None else 0.0
        if elapsed < grace:
            left = grace - elapsed + 0.5
            self.out.requeue_after = min(self.out.requeue_after or left, left)
            return True
        return False

    # ------------------------------------------------------------------------------------------ stages

    def collect(self) -> Outcome:
        st = self.st.collection
        shards = self.spec.collection.shards
        name = self.run.child(COLLECT)
        job = self.observed.child("Job", name)
        self_hosted = self.spec.teacher.self_hosted is not None
        if job is not None and not self.owned(job):
            return self.blocked("collect", job)
        if job is not None and not job.deleting and inputs_changed(job.inputs, self.fp["collect"]):
            self.restart("collect")
            self.drop("Job", name)
            return Outcome.RUNNING
        if job is None or job.deleting:
            if job is None and st.state == "Succeeded":
                self._teardown_teacher()
                return Outcome.DONE
            hold = self.claim()
            if hold is not None:
                st.message = self.storage_wait = hold
                return Outcome.RUNNING
            self.start("collect", f"0/{shards} shards done")
            if self_hosted:
                self.want(teacher_deployment(self.run, self.settings), mutable=True)
                self.want(teacher_service(self.run, self.settings), mutable=True)
                teacher = self.observed.child("Deployment", self.run.child(TEACHER))
                if teacher is None or int(teacher.status.get("readyReplicas") or 0) < 1:
                    st.message = "waiting for the self-hosted teacher (vLLM) to become ready"
                    return Outcome.RUNNING
            if job is None:
                self.want(collect_job(self.run, self.settings, self.fp["collect"]), mutable=False)
            else:
                st.message = f"waiting for the previous Job {name} to be deleted"
            return Outcome.RUNNING

        pods = self.observed.pods_of(COLLECT, job)
        found = derive.summaries(pods)
        if job.is_true("Complete"):
            if st.state == "Succeeded":
                self._teardown_teacher()
                return Outcome.DONE
            derive.apply_collection(st, found, shards)
            completed = parse_time(job.status.get("completionTime"))
            if len(found) < shards and self.waiting_for_reports(completed):
                st.message = f"Job {name} complete; reading the shards' summaries ({len(found)}/{shards})"
                return Outcome.RUNNING
            self.succeed("collect", completed)
            missing = f" ({shards - len(found)} shard summaries missing)" if len(found) < shards else ""
            st.message = f"{st.done} answers from {shards} shards, {st.failed} prompts failed, {st.cached} cached{missing}"
            self._teardown_teacher()
            return Outcome.DONE
        live = derive.live_summaries(pods, self.observed.live)
        derive.apply_collection(st, found, shards, live)
        if job.is_true("Failed"):
            cond = job.condition("Failed") or {}
            detail = f"Job {name} failed ({cond.get('reason') or 'Failed'})"
            if cond.get("message"):
                detail += f": {cond['message']}"
            if job.status.get("failedIndexes"):
                detail += f"; failed shards: {job.status['failedIndexes']}"
            pod_detail = derive.failure_detail(pods)
            if pod_detail:
                detail += f"; {pod_detail}"
            self._teardown_teacher()
            return self.fail("collect", detail, parse_time(cond.get("lastTransitionTime")))
        answered = f"; {st.done}/{st.total if st.total is not None else '?'} answered" if live else ""
        self.start("collect", f"{len(found)}/{shards} shards done{answered}")
        if self_hosted:
            self.want(teacher_deployment(self.run, self.settings), mutable=True)
            self.want(teacher_service(self.run, self.settings), mutable=True)
        eta = derive.collection_eta(found, live, shards)
        times = derive.finish_times(pods)
        if eta is not None:
            st.eta_seconds = eta
        elif found and times and st.start_time is not None:
            per_shard = (times[-1] - st.start_time).total_seconds() / len(found)
            st.eta_seconds = round(max(0.0, per_shard * (shards - len(found))), 1)
        failed = int(job.status.get("failed") or 0)
        if failed:
            self.degraded = (
                REASON_RETRYING,
                f"{failed} collection pod(s) failed; each shard is retried up to "
                f"{self.spec.collection.backoff_limit_per_index} times. {derive.failure_detail(pods)}".strip(),
            )
        return Outcome.RUNNING

    def claim(self) -> str | None:
        """Before the collection (the first workload) starts: the claim the run asked the operator to
        create exists and can be mounted. Returns why the run waits, or None.

        A missing claim is created (the plan's first child) and never touched again; one of that name
        that the operator did not create is used as is. Pending holds the run, except when its
        StorageClass binds a volume only for the first pod that uses it (WaitForFirstConsumer: the
        collection's pods are what binds it) or the class could not be read (the pods then wait as any
        pod waits for its volume). A claim the run names without ``create`` is the user's: never waited on.
        """
        storage = self.spec.storage
        pvc = storage.pvc if storage is not None else None
        if pvc is None or pvc.create is None:
            return None
        name = pvc.claim_name
        found = self.observed.child("PersistentVolumeClaim", name)
        if found is None:
            manifest = persistent_volume_claim(self.run, self.settings)
            assert manifest is not None
            self.out.apply.insert(0, Desired(manifest, mutable=False, exclusive=False))
            return f"creating PersistentVolumeClaim {name}"
        if found.deleting:
            return (
                f"PersistentVolumeClaim {name} is being deleted (pods may still use it); "
                "the operator creates it again once it is gone"
            )
        phase = found.status.get("phase") or "Pending"
        if phase == "Bound":
            return None
        if phase == "Lost":
            return (
                f"PersistentVolumeClaim {name} is Lost (its PersistentVolume is gone): restore the volume, "
                "or delete the claim and the operator creates a new one"
            )
        klass = found.storage_class
        mode = self.caps.binding_modes.get(klass) if klass else IMMEDIATE
        if mode == CLASS_NOT_FOUND:
            return (
                f"PersistentVolumeClaim {name} is Pending: its StorageClass {klass} does not exist; create "
                "that class, or delete the run and the claim and create the run again naming a class that "
                "exists (storage.pvc.create.storageClassName)"
            )
        if mode != IMMEDIATE:
            return None
        via = f"StorageClass {klass}" if klass else "no StorageClass: a matching PersistentVolume"
        return (
            f"waiting for PersistentVolumeClaim {name} to be bound (Pending; {via}); "
            f"`kubectl describe pvc {name} -n {self.view.namespace}` says why it is not"
        )

    def _teardown_teacher(self) -> None:
        if self.spec.teacher.self_hosted is not None:
            self.drop("Deployment", self.run.child(TEACHER))
            self.drop("Service", self.run.child(TEACHER))

    def train(self) -> Outcome:
        st = self.st.training
        res = self.spec.training.resources
        name = self.run.child(TRAIN)
        child = self.observed.child("PyTorchJob", name) or self.observed.child("Job", name)
        if child is not None and not self.owned(child):
            return self.blocked("train", child)
        if child is not None and not child.deleting and inputs_changed(child.inputs, self.fp["train"]):
            self.restart("train")
            self.drop(child.kind, name)
            self.drop("Service", name)
            return Outcome.RUNNING
        if child is None or child.deleting:
            if child is None and st.state == "Succeeded":
                return Outcome.DONE
            backend = (
                "job" if self.spec.training.backend == "job" or not self.caps.pytorchjob else "pytorchjob"
            )
            what = "PyTorchJob" if backend == "pytorchjob" else "Indexed Job"
            self.start("train", f"starting: {what}, {res.nodes} node(s) x {res.gpus_per_node} GPU(s)")
            if child is not None:
                self._stage_status(
                    "train"
                ).message = f"waiting for the previous {child.kind} {name} to be deleted"
            elif backend == "pytorchjob":
                self.want(pytorch_job(self.run, self.settings, self.fp["train"]), mutable=False)
            else:
                self.want(rendezvous_service(self.run, self.settings), mutable=True)
                self.want(train_job(self.run, self.settings, self.fp["train"]), mutable=False)
            return Outcome.RUNNING

        pods = self.observed.pods_of(TRAIN, child)
        done = child.is_true("Succeeded") if child.kind == "PyTorchJob" else child.is_true("Complete")
        # Rank 0's log only while the training runs; once it ended, its termination message is the report.
        running = not done and not child.is_true("Failed")
        progress = derive.training_progress(pods, self.observed.live if running else None)
        if done or child.is_true("Failed"):
            self.drop("Service", name)  # the Indexed Job's rendezvous Service has served its purpose
        elif child.kind == "Job":
            self.want(rendezvous_service(self.run, self.settings), mutable=True)
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
            if progress is None and self.waiting_for_reports(finished):
                st.message = f"{child.kind} {name} succeeded; reading rank 0's report"
                return Outcome.RUNNING
            self.succeed("train", finished)
            if progress is not None and progress.gpu_hours > 0:
                st.gpu_hours = round(progress.gpu_hours, 4)
            elif started is not None:
                hours = ((finished or self.now) - started).total_seconds() / 3600
                st.gpu_hours = round(max(0.0, hours) * res.nodes * res.gpus_per_node, 4)
            loss = f", loss {st.loss:.4g}" if st.loss is not None else ""
            st.message = f"{st.step} steps{loss}, {st.gpu_hours or 0:.2f} GPU-hours"
            return Outcome.DONE
        if child.is_true("Failed"):
            cond = child.condition("Failed") or {}
            detail = f"{child.kind} {name} failed ({cond.get('reason') or 'Failed'})"
            if cond.get("message"):
                detail += f": {cond['message']}"
            if progress is not None and progress.message:
                detail += f"; rank 0: {progress.message}"
            pod_detail = derive.failure_detail(pods)
            if pod_detail:
                detail += f"; {pod_detail}"
            return self.fail("train", detail, parse_time(cond.get("lastTransitionTime")))
        total = f"/{st.total}" if st.total else ""
        loss = f", loss {st.loss:.4g}" if st.loss is not None else ""
        self.start(
            "train",
            f"{progress.method} step {st.step}{total}{loss}"
            if progress is not None
            else f"{child.kind} {name} running",
        )
        restarting = child.is_true("Restarting") or int(child.status.get("failed") or 0) > 0
        if restarting:
            self.degraded = (
                REASON_RETRYING,
                f"{child.kind} {name} is restarting failed pods. {derive.failure_detail(pods)}".strip(),
            )
        return Outcome.RUNNING

    def serve(self) -> Outcome:
        st = self.st.serving
        name = self.run.child(SERVE)
        dep = self.observed.child("Deployment", name)
        if dep is not None and not self.owned(dep):
            return self.blocked("serve", dep)
        self.serve_reached = True
        replicas = self.spec.serving.replicas
        st.replicas = replicas
        if dep is None or dep.deleting:
            self.start("serve", f"starting vLLM: 0/{replicas} replicas ready")
            return Outcome.RUNNING
        if inputs_changed(dep.inputs, self.fp["serve"]):
            return self.restart("serve")
        ready = int(dep.status.get("readyReplicas") or 0)
        updated = int(dep.status.get("updatedReplicas") or 0)
        want = dep.replicas if dep.replicas is not None else replicas
        rolled_out = int(dep.status.get("observedGeneration") or 0) >= dep.generation and updated >= want
        st.ready_replicas = st.done = ready
        st.total = want
        self.serving_ready = rolled_out and want > 0 and ready >= want
        evaluation = self.observed.child("Job", self.run.child(EVAL))
        evaluating = (
            evaluation is not None
            and self.owned(evaluation)
            and not inputs_changed(evaluation.inputs, self.fp["evaluate"])
        )
        if self.serving_ready or evaluating or st.state == "Succeeded":
            self.succeed("serve")
            st.message = f"{ready}/{want} replicas ready"
            return Outcome.DONE
        progressing = dep.condition("Progressing") or {}
        if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
            return self.fail(
                "serve",
                f"Deployment {name} did not become ready ({progressing.get('reason')}): {progressing.get('message', '')}",
            )
        self.start("serve", f"{ready}/{want} replicas ready")
        return Outcome.RUNNING

    def evaluate(self) -> Outcome:
        st = self.st.evaluation
        name = self.run.child(EVAL)
        job = self.observed.child("Job", name)
        if job is not None and not self.owned(job):
            return self.blocked("evaluate", job)
        if job is not None and not job.deleting and inputs_changed(job.inputs, self.fp["evaluate"]):
            self.restart("evaluate")
            self.drop("Job", name)
            return Outcome.RUNNING
        if job is None or job.deleting:
            if job is None and st.state == "Succeeded" and self.st.results is not None:
                return Outcome.DONE
            self.start("evaluate", "evaluating the student against the teacher")
            if job is None:
                self.want(eval_job(self.run, self.settings, self.fp["evaluate"]), mutable=False)
            else:
                st.message = f"waiting for the previous Job {name} to be deleted"
            return Outcome.RUNNING
        pods = self.observed.pods_of(EVAL, job)
        if job.is_true("Complete"):
            if st.state == "Succeeded" and self.st.results is not None:
                return Outcome.DONE
            found = derive.results(pods)
            completed = parse_time(job.status.get("completionTime"))
            if found is None:
                if self.waiting_for_reports(completed):
                    st.message = f"Job {name} complete; reading its results"
                    return Outcome.RUNNING
                return self.fail(
                    "evaluate",
                    f"Job {name} completed but its pod left no results (a JSON termination message)",
                    completed,
                )
            self.st.results = found
            self.succeed("evaluate", completed)
            st.done = st.total = found.samples or 0
            st.message = f"{found.samples or 0} held-out prompts evaluated"
            return Outcome.DONE
        if job.is_true("Failed"):
            cond = job.condition("Failed") or {}
            detail = f"Job {name} failed ({cond.get('reason') or 'Failed'})"
            if cond.get("message"):
                detail += f": {cond['message']}"
            pod_detail = derive.failure_detail(pods)
            if pod_detail:
                detail += f"; {pod_detail}"
            return self.fail("evaluate", detail, parse_time(cond.get("lastTransitionTime")))
        self.start("evaluate", "evaluating the student against the teacher")
        if int(job.status.get("failed") or 0):
            self.degraded = (
                REASON_RETRYING,
                f"Job {name} is retrying. {derive.failure_detail(pods)}".strip(),
            )
        return Outcome.RUNNING

    # ------------------------------------------------------------------------------------------ the pass

    def plan(self) -> Plan:
        self.st.start_time = self.st.start_time or self.now
        self.want(config_map(self.run, self.settings), mutable=True)
        current: str | None = None
        for st in STAGES:
            outcome: Outcome = getattr(self, st.name)()
            if outcome is not Outcome.DONE:
                current = st.name
                break
        if current is not None:
            self._drop_after(current)
        phase, reason, message = self._verdict(current)
        self._serving(phase)
        self._finish(phase, reason, message)
        return self.out

    def _drop_after(self, stage: str) -> None:
        """Later stages' children exist only while every earlier stage is done."""
        after = {s.name for s in later(BY_NAME[stage])[1:]}
        if "train" in after:
            self.drop("PyTorchJob", self.run.child(TRAIN))
            self.drop("Job", self.run.child(TRAIN))
            self.drop("Service", self.run.child(TRAIN))
        if "serve" in after:
            self.drop("Deployment", self.run.child(SERVE))
            self.drop("Service", self.run.child(SERVE))
        if "evaluate" in after:
            self.drop("Job", self.run.child(EVAL))

    def _verdict(self, current: str | None) -> tuple[str, str, str]:
        if self.failure is not None:
            name, message = self.failure
            return PHASE_FAILED, BY_NAME[name].failed_reason, f"{name} failed: {message}"
        if self.storage_wait is not None:
            return PHASE_PENDING, REASON_WAITING_FOR_STORAGE, self.storage_wait
        if current is not None:
            st: Stage = BY_NAME[current]
            stage_message = st.status(self.st).message
            return st.phase, st.running_reason, f"{current}: {stage_message}" if stage_message else current
        results = self.st.results
        assert results is not None
        results.cost = run_cost(
            self.spec,
            [derive.collection_summary(self.st.collection, self.spec)],
            self.st.training.gpu_hours,
        )
        gate = verdict(results, self.spec.evaluation)
        results.gate_passed = gate.passed if results.quality_retention is not None else None
        if gate.reason == EVALUATE.failed_reason:
            return gate.phase, gate.reason, f"evaluate failed: {gate.message}"
        return gate.phase, gate.reason, gate.message

    def _keep_serving(self, phase: str) -> bool:
        if phase == PHASE_SUCCEEDED:
            return self.spec.serving.keep
        if phase == PHASE_FAILED:
            return self.spec.serving.keep_on_failure
        return True

    def _serving(self, phase: str) -> None:
        if not self.serve_reached:
            return
        keep = self._keep_serving(phase)
        replicas = self.spec.serving.replicas if keep else 0
        self.want(
            serve_deployment(self.run, self.settings, self.fp["serve"], replicas=replicas), mutable=True
        )
        self.want(serve_service(self.run, self.settings), mutable=True)
        if not keep:
            why = "the run failed" if phase == PHASE_FAILED else "serving.keep is false"
            self.st.serving.message = f"scaled to zero: {why}"
            self.serving_ready = False
        self.st.endpoint = self.run.service_url(SERVE) if self.serving_ready else None

    def _ready(self, phase: str, reason: str, message: str) -> tuple[bool, str, str]:
        if phase != PHASE_SUCCEEDED:
            return False, reason, message
        if not self.spec.serving.keep:
            return True, reason, message + "; serving not kept (serving.keep: false)"
        if self.st.endpoint:
            return True, reason, f"{message}; serving at {self.st.endpoint}"
        return False, REASON_SERVING, f"the student passed but is not served: {self.st.serving.message}"

    def _finish(self, phase: str, reason: str, message: str) -> None:
        st, prior = self.st, self.prior
        st.phase = phase  # type: ignore[assignment]
        st.message = message
        if phase in TERMINAL_PHASES:
            st.completion_time = (
                prior.completion_time if prior.phase == phase and prior.completion_time else self.now
            )
        else:
            st.completion_time = None
        st.conditions = derive.conditions(
            prior.conditions,
            phase=phase,
            reason=reason,
            message=message,
            degraded=self.degraded,
            ready=self._ready(phase, reason, message),
            generation=self.view.generation,
            now=self.now,
        )
        for st in STAGES:
            before, after = st.status(prior), st.status(self.st)
            if after.state == "Succeeded" and before.state != "Succeeded":
                self.out.events.append(Event("Normal", st.done_reason, after.message or ""))
        progressing = prior.condition("Progressing")
        if reason == REASON_WAITING_FOR_STORAGE and (progressing is None or progressing.reason != reason):
            self.out.events.append(Event("Normal", reason, message))
        if prior.phase != phase or (phase == PHASE_FAILED and not _same_failure(prior, reason)):
            self.out.events.append(Event("Warning" if phase == PHASE_FAILED else "Normal", reason, message))
        was_retrying = (
            (c := prior.condition("Degraded")) is not None
            and c.status == "True"
            and c.reason == REASON_RETRYING
        )
        if self.degraded is not None and not was_retrying and phase not in TERMINAL_PHASES:
            self.out.events.append(Event("Warning", REASON_RETRYING, self.degraded[1]))


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _same_failure(prior: DistillationRunStatus, reason: str) -> bool:
    cond = prior.condition("Failed")
    return cond is not None and cond.reason == reason
