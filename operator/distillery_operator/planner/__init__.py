"""``plan(run, observed, now)``: the children a run should have, the ones to delete, and its status. Pure.

The planner is level-triggered: it looks at what exists (the observations kopf's indices hold) and at
the status it wrote last, never at what happened in between, so a restarted operator, a missed event or
a replayed one all lead to the same plan. Stages run in order; a stage is *done* when its child says so
(a Job's ``Complete``, a PyTorchJob's ``Succeeded``, a rolled-out Deployment), or when the status says so
and the child is gone. The children of later stages exist only while every earlier stage is done.
Before the first stage starts, the claim a run has the operator create (``storage.pvc.create``) is
created and, unless its StorageClass binds on first consumer, waited on until bound: the run is then
``Pending`` with reason ``WaitingForStorage`` (:func:`.storage.claim`).

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

Where the rules live: :mod:`.walk` is the pass and what every stage shares (the status helpers, the
verdict, the conditions and events); :mod:`.storage` the claim; :mod:`.teacher` a self-hosted teacher
(through the collection, and the training too for ``onPolicy``); :mod:`.collect`, :mod:`.train`,
:mod:`.serve` and :mod:`.evaluate` one stage each; :mod:`.model` what a pass hands back. What the stages
are (names, status fields, phases, reasons, inputs, the gate) is :mod:`distillery_trainer.api.stages`'s.
"""

from .model import Capabilities, Desired, Event, Outcome, Plan, prior_status
from .walk import plan, rejected

__all__ = ["Capabilities", "Desired", "Event", "Outcome", "Plan", "plan", "prior_status", "rejected"]
