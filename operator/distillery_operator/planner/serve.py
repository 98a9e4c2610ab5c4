"""Serve: the student behind vLLM, a Deployment and a Service.

While the stage runs it is done once the Deployment has rolled out (or the evaluation of these inputs
already started). Once the walk has a verdict, :func:`serving` keeps the Deployment at
``serving.replicas`` or scales it to zero (``serving.keep``, ``serving.keepOnFailure``); a changed
Deployment is updated in place (a rolling update).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillery_trainer.api.stages import inputs_changed
from distillery_trainer.api.status import (
    PHASE_FAILED,
    PHASE_SUCCEEDED,
)

from ..builders.serve import serve_deployment, serve_service
from ..naming import EVAL, SERVE
from . import stalls
from .model import Outcome

if TYPE_CHECKING:
    from .walk import Walk


def serve(w: Walk) -> Outcome:
    st = w.st.serving
    name = w.run.child(SERVE)
    dep = w.observed.child("Deployment", name)
    if dep is not None and not w.owned(dep):
        return w.blocked("serve", dep)
    w.serve_reached = True
    if (held := stalls.held(w, "serve")) is not None:
        return held
    replicas = w.spec.serving.replicas
    st.replicas = replicas
    if dep is None or dep.deleting:
        w.start("serve", f"starting vLLM: 0/{replicas} replicas ready")
        return Outcome.RUNNING
    if inputs_changed(dep.inputs, w.fp["serve"]):
        return w.restart("serve")
    ready = int(dep.status.get("readyReplicas") or 0)
    updated = int(dep.status.get("updatedReplicas") or 0)
    want = dep.replicas if dep.replicas is not None else replicas
    rolled_out = int(dep.status.get("observedGeneration") or 0) >= dep.generation and updated >= want
    st.ready_replicas = st.done = ready
    st.total = want
    w.serving_ready = rolled_out and want > 0 and ready >= want
    evaluation = w.observed.child("Job", w.run.child(EVAL))
    evaluating = (
        evaluation is not None
        and w.owned(evaluation)
        and not inputs_changed(evaluation.inputs, w.fp["evaluate"])
    )
    if w.serving_ready or evaluating or st.state == "Succeeded":
        w.succeed("serve")
        st.message = f"{ready}/{want} replicas ready"
        return Outcome.DONE
    if (failed := stalls.past_deadline(w, "serve", dep)) is not None:
        return failed
    w.start("serve", f"{ready}/{want} replicas ready")
    # The Deployment's pods belong to its ReplicaSets: the component's pods, whoever made them.
    return stalls.stalled(w, "serve", w.observed.pods_of(SERVE)) or Outcome.RUNNING


def serving(w: Walk, phase: str) -> None:
    """The Deployment and Service once the walk knows the run's phase; the endpoint while it is ready."""
    if not w.serve_reached:
        return
    keep = _keep_serving(w, phase)
    replicas = w.spec.serving.replicas if keep else 0
    w.want(serve_deployment(w.run, w.settings, w.fp["serve"], replicas=replicas), mutable=True)
    w.want(serve_service(w.run, w.settings), mutable=True)
    if not keep:
        why = "the run failed" if phase == PHASE_FAILED else "serving.keep is false"
        w.st.serving.message = f"scaled to zero: {why}"
        w.serving_ready = False
    w.st.endpoint = w.run.service_url(SERVE) if w.serving_ready else None


def _keep_serving(w: Walk, phase: str) -> bool:
    if phase == PHASE_SUCCEEDED:
        return w.spec.serving.keep
    if phase == PHASE_FAILED:
        return w.spec.serving.keep_on_failure
    return True
