"""The self-hosted teacher (``teacher.selfHosted``): a vLLM Deployment and Service, ``<run>-teacher``.

The collection needs it, and for ``training.method: onPolicy`` the training too (the teacher's server
scores the student's samples at every on-policy step): it is brought up before the collection Job, kept
from the collection through the training (brought up again when a restarted training needs it) and torn
down once the last stage that needs it has ended, whether it succeeded or failed. An endpoint teacher
needs nothing of this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..builders.collect import teacher_deployment, teacher_service
from ..builders.common import teacher_in_training
from ..naming import TEACHER
from . import stalls
from .model import Outcome

if TYPE_CHECKING:
    from .walk import Walk

WAITING = "waiting for the self-hosted teacher (vLLM) to become ready"


def want(w: Walk) -> None:
    w.want(teacher_deployment(w.run, w.settings), mutable=True)
    w.want(teacher_service(w.run, w.settings), mutable=True)


def teardown(w: Walk) -> None:
    if w.spec.teacher.self_hosted is not None:
        w.drop("Deployment", w.run.child(TEACHER))
        w.drop("Service", w.run.child(TEACHER))


def after_collection(w: Walk) -> None:
    """The collection ended well: the teacher goes, unless the training needs it (its rules keep it)."""
    if not teacher_in_training(w.spec):
        teardown(w)


def ready(w: Walk, stage: str) -> Outcome | None:
    """Want the teacher and say whether ``stage`` may go on: None once it is ready; RUNNING while it
    starts; the stage's failure (the teacher torn down) when it is past its progress deadline or its pods
    are stalled, as the student's serving is."""
    teacher = w.observed.child("Deployment", w.run.child(TEACHER))
    if teacher is not None and int(teacher.status.get("readyReplicas") or 0) >= 1:
        want(w)
        return None
    w.stage_status(stage).message = WAITING
    failed = stalls.past_deadline(w, stage, teacher) if teacher is not None else None
    if failed is None:
        failed = stalls.stalled(w, stage, w.observed.pods_of(TEACHER))
    if failed is not None:
        teardown(w)
        return failed
    want(w)
    return Outcome.RUNNING
