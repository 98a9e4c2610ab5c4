"""The shared pass: :func:`plan` checks what the CRD cannot, then one :class:`Walk` runs each stage's
rules in :data:`~distillery_trainer.api.stages.STAGES` order (:mod:`.collect`, :mod:`.train`,
:mod:`.serve`, :mod:`.evaluate`) until one is not done, drops the children of the stages after it, and
turns what it found into the run's phase, conditions and events. The walk's helpers are how the stage
rules change the status and the children: written once here, for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from distillery_trainer.api.base import format_errors
from distillery_trainer.api.names import run_name_problem
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
    REASON_CHILD_REJECTED,
    REASON_INVALID_SPEC,
    REASON_POLICY_VIOLATION,
    REASON_RETRYING,
    REASON_SERVING,
    REASON_SPEC_CHANGED,
    REASON_WAITING_FOR_STORAGE,
    TERMINAL_PHASES,
    DistillationRunStatus,
    StageStatus,
)
from distillery_trainer.api.validation import cluster_problems
from distillery_trainer.cost import run_cost
from pydantic import ValidationError

from .. import status as derive
from ..builders.common import Run
from ..builders.config import config_map
from ..naming import EVAL, GENERATION_ANNOTATION, SERVE, TRAIN
from ..observe import Child, Observed, RunView
from ..policy import violations
from ..settings import Settings
from . import collect, evaluate, serve, train
from .model import Capabilities, Desired, Event, Outcome, Plan, prior_status
from .storage import claim_modes

DEFAULT_CAPS = Capabilities()  # a cluster with the PyTorchJob CRD (not Trainer v2), nothing looked up


def plan(
    view: RunView,
    observed: Observed,
    now: datetime,
    *,
    settings: Settings,
    caps: Capabilities = DEFAULT_CAPS,
) -> Plan:
    prior = prior_status(view.status)
    try:
        spec = DistillationRunSpec.model_validate_json(view.spec_json)
    except ValidationError as exc:
        return _invalid(view, prior, format_errors(exc, ("spec",)), now)
    problems = cluster_problems(spec)  # what `distillery validate` (--target cluster) checks, too
    if (problem := run_name_problem(view.name)) is not None:  # the CRD's rule, for runs made before it
        problems.append(("metadata.name", problem))
    if problems:
        return _invalid(view, prior, problems, now)
    # The platform's policy, before any child exists: a tenant's run never starts an image, a placement
    # or a vLLM flag the chart does not allow.
    if refused := violations(spec, settings):
        return _invalid(
            view, prior, refused, now, reason=REASON_POLICY_VIOLATION, what="outside the platform's policy"
        )
    return Walk(view, spec, observed, now, settings, caps, prior).plan()


def _invalid(
    view: RunView,
    prior: DistillationRunStatus,
    errors: list[tuple[str, str]],
    now: datetime,
    *,
    reason: str = REASON_INVALID_SPEC,
    what: str = "invalid spec",
) -> Plan:
    message = f"{what}: " + "; ".join(f"{p or '<root>'}: {m}" for p, m in errors)
    return _failed(view, prior, prior, reason, message, now, [])


def rejected(view: RunView, planned: Plan, what: str, detail: str, now: datetime) -> Plan:
    """The API server refused one of the children ``planned`` (422, ``detail`` names the field): the run
    fails with its words instead of retrying the same request. Level-triggered: the next pass (a spec
    edit, a child's change) plans from scratch and goes on once the child is accepted. The walk's status
    is kept otherwise, and its events but the phase's (the run did not reach it)."""
    prior = prior_status(view.status)
    progressing = planned.status.condition("Progressing")
    skip = {REASON_RETRYING, progressing.reason if progressing is not None else ""}
    events = [e for e in planned.events if e.reason not in skip]
    message = f"{what} was rejected by the API server: {detail}"
    return _failed(view, prior, planned.status, REASON_CHILD_REJECTED, message, now, events)


def _failed(
    view: RunView,
    prior: DistillationRunStatus,
    base: DistillationRunStatus,
    reason: str,
    message: str,
    now: datetime,
    events: list[Event],
) -> Plan:
    """``base`` as a run that failed for ``reason`` before its stages could go on; one Event per message."""
    st = base.model_copy(deep=True)
    st.observed_generation = view.generation
    st.phase = PHASE_FAILED
    st.message = message
    st.completion_time = prior.completion_time if prior.phase == PHASE_FAILED else now
    st.conditions = derive.conditions(
        prior.conditions,
        phase=PHASE_FAILED,
        reason=reason,
        message=message,
        degraded=None,
        ready=(False, reason, message),
        generation=view.generation,
        now=now,
    )
    if prior.message != message:
        events = [*events, Event("Warning", reason, message)]
    return Plan(status=st, events=events)


class Walk:
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
        self.run = Run(view.name, view.namespace, view.uid, spec, claim_modes(spec, observed))
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
        self.failure_reason: str | None = None  # the run's reason for it, when not the stage's own
        self.degraded: tuple[str, str] | None = None
        self.serve_reached = False
        self.serving_ready = False
        self.storage_wait: str | None = None  # why the run waits for its claim, when it does

    # ------------------------------------------------------------------------------------------ helpers

    def want(self, manifest: dict[str, Any], *, mutable: bool) -> None:
        if not mutable:  # a workload: which spec it was made for decides whether a failure is retried
            annotations = manifest["metadata"].setdefault("annotations", {})
            annotations[GENERATION_ANNOTATION] = str(self.view.generation)
        self.out.apply.append(Desired(manifest, mutable))

    def drop(self, kind: str, name: str) -> None:
        child = self.observed.child(kind, name)
        if child is not None and self.view.uid in child.owners and not child.deleting:
            self.out.delete.append((kind, name))

    def create_or_wait(self, stage: str, previous: Child | None, manifest: dict[str, Any]) -> Outcome:
        """Create the stage's immutable child (``manifest``), or wait while the ``previous`` one of that
        name is being deleted: a child made for other inputs is replaced, never changed in place."""
        if previous is None:
            self.want(manifest, mutable=False)
        else:
            waiting = f"waiting for the previous {previous.kind} {previous.name} to be deleted"
            self.stage_status(stage).message = waiting
        return Outcome.RUNNING

    def owned(self, child: Child | None) -> bool:
        return child is None or self.view.uid in child.owners

    def blocked(self, stage: str, child: Child) -> Outcome:
        stage_status = self.stage_status(stage)
        stage_status.state = "Running"
        stage_status.message = (
            f"waiting: {child.kind} {child.name} exists and does not belong to this run; it is deleted "
            "with the run that owns it (or delete it if nothing does)"
        )
        self.degraded = (REASON_RETRYING, stage_status.message)
        return Outcome.RUNNING

    def superseded(self, stage: str, child: Child | None, *also: str) -> Outcome | None:
        """What the stage does with a child that is not the run's (wait for it to go) or that was made for
        other inputs (restart from the stage, delete the child and the ``also`` kinds of that name); None
        when there is no child or it is the stage's to go on with."""
        if child is None:
            return None
        if not self.owned(child):
            return self.blocked(stage, child)
        if child.deleting:
            return None
        if inputs_changed(child.inputs, self.fp[stage]):
            self.restart(stage)
        elif child.is_true("Failed") and child.made_for is not None and child.made_for < self.view.generation:
            # The spec changed since this Job failed (more memory, a longer deadline, a fixed secret...):
            # try the stage again, as `distillery run` does on every run.
            self.restart(stage, f"the spec changed after {stage} failed: retrying {stage}")
        else:
            return None
        for kind in (child.kind, *also):
            self.drop(kind, child.name)
        return Outcome.RUNNING

    def stage_status(self, stage: str) -> StageStatus:
        return BY_NAME[stage].status(self.st)

    def start(self, stage: str, message: str) -> StageStatus:
        st = self.stage_status(stage)
        if st.state != "Running":
            st.state = "Running"
            st.start_time = self.now
            st.completion_time = None
            st.stalled = None
        st.message = message
        return st

    def succeed(self, stage: str, when: datetime | None = None) -> StageStatus:
        st = self.stage_status(stage)
        if st.state != "Succeeded":
            st.state = "Succeeded"
            st.completion_time = when or self.now
            st.eta_seconds = None
        return st

    def fail(
        self, stage: str, message: str, when: datetime | None = None, reason: str | None = None
    ) -> Outcome:
        """The stage failed; ``reason`` is the run's reason for it when not the stage's own
        (``CollectionFailed``, ...): a stall's (``PodUnschedulable``, ...)."""
        st = self.stage_status(stage)
        if st.state != "Failed":
            st.completion_time = when or self.now
        st.state = "Failed"
        st.message = message
        st.eta_seconds = None
        self.failure = (stage, message)
        self.failure_reason = reason
        return Outcome.FAILED

    def requeue(self, seconds: float) -> None:
        """Plan again in ``seconds`` at the latest (no watch event says that time has passed)."""
        self.out.requeue_after = min(self.out.requeue_after or seconds, seconds)

    def restart(self, stage: str, why: str | None = None) -> Outcome:
        """The stage's inputs changed (or ``why``): reset it and every later stage."""
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
                Event("Normal", REASON_SPEC_CHANGED, why or f"{sections} changed: restarting from {stage}")
            )
        self.start(stage, why or f"{sections} changed: restarting")
        return Outcome.RUNNING

    def waiting_for_reports(self, since: datetime | None) -> bool:
        """A finished Job's pods may report a moment after it: wait up to the grace period."""
        grace = self.settings.results_grace_seconds
        elapsed = (self.now - since).total_seconds() if since is not None else 0.0
        if elapsed < grace:
            self.requeue(grace - elapsed + 0.5)
            return True
        return False

    # ------------------------------------------------------------------------------------------ the pass

    def plan(self) -> Plan:
        self.st.start_time = self.st.start_time or self.now
        self.want(config_map(self.run, self.settings), mutable=True)
        current: str | None = None
        for st in STAGES:
            outcome = RULES[st.name](self)
            if outcome is not Outcome.DONE:
                current = st.name
                break
        if current is not None:
            self._drop_after(current)
        phase, reason, message = self._verdict(current)
        serve.serving(self, phase)
        self._finish(phase, reason, message)
        return self.out

    def _drop_after(self, stage: str) -> None:
        """Later stages' children exist only while every earlier stage is done."""
        after = {s.name for s in later(BY_NAME[stage])[1:]}
        if "train" in after:
            self.drop("TrainJob", self.run.child(TRAIN))
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
            reason = self.failure_reason or BY_NAME[name].failed_reason
            return PHASE_FAILED, reason, f"{name} failed: {message}"
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
            scored_tokens=self.st.training.teacher_tokens_scored,
            teacher_gpu_hours=self.st.training.teacher_gpu_hours,
        )
        gate = verdict(results, self.spec.evaluation)
        results.gate_passed = gate.passed if results.quality_retention is not None else None
        if gate.reason == EVALUATE.failed_reason:
            return gate.phase, gate.reason, f"evaluate failed: {gate.message}"
        return gate.phase, gate.reason, gate.message

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
        for stage in STAGES:
            before, after = stage.status(prior), stage.status(self.st)
            if after.state == "Succeeded" and before.state != "Succeeded":
                self.out.events.append(Event("Normal", stage.done_reason, after.message or ""))
        progressing = prior.condition("Progressing")
        if reason == REASON_WAITING_FOR_STORAGE and (progressing is None or progressing.reason != reason):
            self.out.events.append(Event("Normal", reason, message))
        if prior.phase != phase or (phase == PHASE_FAILED and not _same_failure(prior, reason)):
            self.out.events.append(Event("Warning" if phase == PHASE_FAILED else "Normal", reason, message))
        if self.degraded is not None and phase not in TERMINAL_PHASES:
            reason, message = self.degraded
            was = prior.condition("Degraded")
            if was is None or was.status != "True" or was.reason != reason:
                self.out.events.append(Event("Warning", reason, message))


def _same_failure(prior: DistillationRunStatus, reason: str) -> bool:
    cond = prior.condition("Failed")
    return cond is not None and cond.reason == reason


# Each stage's rules, by the stage's name: they take the walk and say whether the stage is done.
RULES: dict[str, Callable[[Walk], Outcome]] = {
    "collect": collect.collect,
    "train": train.train,
    "serve": serve.serve,
    "evaluate": evaluate.evaluate,
}
