"""Stages that do not get on, and children that failed: the rules every stage applies alike.

- :func:`stalled`: pods in trouble (unschedulable, image pulls, crash loops, a volume that does not mount)
  make the run Degraded, and fail the stage once the operator's ``stallTimeoutSeconds`` passed;
- :func:`past_deadline`: a vLLM Deployment past its ``progressDeadlineSeconds`` fails its stage;
- :func:`held`: a stage failed that way stays Failed until the spec is edited;
- :func:`failed`: a child's ``Failed`` condition, what the stage knows and the pods' words, in one message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from distillery_trainer.api.status import (
    REASON_PROGRESS_DEADLINE_EXCEEDED,
    REASON_VOLUME_NOT_MOUNTED,
    STALL_REASONS,
    Stall,
)

from .. import status as derive
from ..observe import Child, Pod, parse_time
from .model import Outcome

if TYPE_CHECKING:
    from .walk import Walk

# A trouble that a healthy pod goes through for a moment is reported only once it lasted this long:
# attaching and mounting a volume takes seconds, creating the sandbox too.
REPORT_AFTER_SECONDS = {REASON_VOLUME_NOT_MOUNTED: 60.0}
# The spec field that sets each Job stage's activeDeadlineSeconds, and the operator's default of it.
DEADLINE_FIELDS = {
    "collect": ("collection.deadlineSeconds", "collect_deadline_seconds"),
    "train": ("training.deadlineSeconds", "train_deadline_seconds"),
    "evaluate": ("evaluation.deadlineSeconds", "evaluate_deadline_seconds"),
}


def held(w: Walk, stage: str) -> Outcome | None:
    """A stage that failed because it did not get on (a stall, a progress deadline: ``stalled`` says
    so) stays Failed until the spec is edited, whatever its children show since: a Deployment scaled
    to zero reports progress again, a stalled Job was deleted. An edit (a new generation) runs the
    stage's rules afresh."""
    st = w.stage_status(stage)
    if st.state != "Failed" or st.stalled is None:
        return None
    if w.prior.observed_generation != w.view.generation:
        return None
    w.failure = (stage, st.message or "")
    w.failure_reason = st.stalled.reason if st.stalled.reason in STALL_REASONS else None
    return Outcome.FAILED


def stalled(w: Walk, stage: str, pods: Sequence[Pod], *children: tuple[str, str]) -> Outcome | None:
    """The stage's pods that do not get on (:class:`~..observe.Trouble`): the one in trouble longest is
    recorded in the stage's ``stalled`` and makes the run Degraded with its reason; once it lasted the
    operator's ``stall_timeout_seconds`` the stage fails with that reason and ``children`` (kind,
    name) are deleted, so that their pods hold no node, GPU or quota. Since when comes from the pod's
    condition, or from the status recorded earlier for the same pod and reason (a crash loop's
    condition moves with every restart), never from this process's memory. None: go on."""
    st = w.stage_status(stage)
    before = st.stalled
    worst: tuple[datetime, Pod, str, str] | None = None
    troubled = 0
    for pod in pods:
        trouble = pod.trouble
        if trouble is None:
            continue
        since = trouble.since
        if before is not None and before.pod == pod.name and before.reason == trouble.reason:
            since = min(since, before.since) if since and before.since else since or before.since
        since = since or w.now
        wait = REPORT_AFTER_SECONDS.get(trouble.reason, 0.0) - (w.now - since).total_seconds()
        if wait > 0:
            w.requeue(wait)
            continue
        troubled += 1
        if worst is None or since < worst[0]:
            worst = (since, pod, trouble.reason, trouble.message)
    if worst is None:
        st.stalled = None
        return None
    since, pod, reason, message = worst
    st.stalled = Stall(reason=reason, message=message, pod=pod.name, since=since)
    others = f" (and {troubled - 1} more pod(s))" if troubled > 1 else ""
    elapsed = (w.now - since).total_seconds()
    timeout = w.settings.stall_timeout_seconds
    text = f"pod {pod.name}{others} {message}; for {elapsed:.0f} s"
    if timeout > 0 and elapsed >= timeout:
        for kind, name in children:
            w.drop(kind, name)
        return w.fail(stage, f"{text}, past the operator's stallTimeoutSeconds ({timeout} s)", reason=reason)
    if timeout > 0:
        text += f"; the stage fails after {timeout} s (the operator's stallTimeoutSeconds)"
        w.requeue(timeout - elapsed + 0.5)
    w.degraded = (reason, text)
    return None


def failed(w: Walk, stage: str, child: Child, pods: Sequence[Pod], *known: str) -> Outcome:
    """The stage's child failed: its ``Failed`` condition, what else the stage knows (``known``;
    empty parts are left out) and the last failed pod's words, in one message."""
    cond = child.condition("Failed") or {}
    detail = f"{child.kind} {child.name} failed ({cond.get('reason') or 'Failed'})"
    if cond.get("message"):
        detail += f": {cond['message']}"
    if cond.get("reason") == "DeadlineExceeded" and stage in DEADLINE_FIELDS:
        path, default = DEADLINE_FIELDS[stage]
        detail += f"; it ran past its deadline ({path}, else the operator's {getattr(w.settings, default)} s)"
    for part in (*known, derive.failure_detail(pods)):
        if part:
            detail += f"; {part}"
    return w.fail(stage, detail, parse_time(cond.get("lastTransitionTime")))


def past_deadline(w: Walk, stage: str, dep: Child) -> Outcome | None:
    """A vLLM Deployment past its progressDeadlineSeconds (the startup probe's budget and a margin) fails
    ``stage``, recorded as stalled so that it stays failed (:func:`held`): scaled to zero, the
    Deployment reports progress again, which must not start it over."""
    progressing: Mapping[str, Any] = dep.condition("Progressing") or {}
    if progressing.get("status") != "False" or progressing.get("reason") != REASON_PROGRESS_DEADLINE_EXCEEDED:
        return None
    message = f"Deployment {dep.name} did not become ready ({REASON_PROGRESS_DEADLINE_EXCEEDED})"
    if progressing.get("message"):
        message += f": {progressing['message']}"
    outcome = w.fail(stage, message)
    w.stage_status(stage).stalled = Stall(
        reason=REASON_PROGRESS_DEADLINE_EXCEEDED,
        message=str(progressing.get("message") or ""),
        since=parse_time(progressing.get("lastTransitionTime")),
    )
    return outcome
