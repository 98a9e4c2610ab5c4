"""Views of the training children: which kind trains a run (a Kubeflow Trainer v2 ``TrainJob``, a
Kubeflow v1 ``PyTorchJob``, or an Indexed ``Job``), what each kind's conditions say (succeeded, failed,
suspended), and which of the pods runs rank 0. The words are each API's own:

- TrainJob (``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer v2.3): ``Complete``, ``Failed`` (with the
  controller's reason: ``DeadlineExceeded``, ``TrainingRuntimeNotSupported``, the JobSet's failure) and
  ``Suspended`` (``spec.suspend``: what Kueue sets until it admits the TrainJob). Its JobSet's Jobs own
  the pods, so the pods carry the TrainJob's :data:`~.naming.WORKLOAD_LABEL` (set through its
  ``runtimePatches``) to say whose they are; rank 0 is the pod of completion index 0 of the ``node`` Job.
- PyTorchJob (``kubeflow.org/v1``): ``Succeeded``, ``Failed``, ``Suspended``; rank 0 is the Master.
- Job (``batch/v1``): ``Complete``, ``Failed``, ``Suspended``; rank 0 is completion index 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .naming import PYTORCHJOB_CONTAINER, TRAINJOB_NODE

if TYPE_CHECKING:
    from .observe import Child, Observed

TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
PYTORCHJOB_API = "kubeflow.org/v1"
# What may train a run, in the order the planner prefers them (``training.backend: auto``).
TRAINING_KINDS = ("TrainJob", "PyTorchJob", "Job")
# The children whose status the operator keeps (its conditions and counts), and what of it.
WORKLOADS = ("Job", "PyTorchJob", "TrainJob", "Deployment")
STATUS_KEYS = (
    "conditions",
    "startTime",
    "completionTime",
    "active",
    "succeeded",
    "failed",
    "failedIndexes",
    "completedIndexes",
    "replicas",
    "readyReplicas",
    "updatedReplicas",
    "availableReplicas",
    "observedGeneration",
)
# Each kind's condition for a training that ended well.
DONE = {"TrainJob": "Complete", "PyTorchJob": "Succeeded", "Job": "Complete"}
REPLICA_TYPE_LABELS = ("training.kubeflow.org/replica-type", "pytorch-replica-type")
# The stage containers' names (the builders', and Trainer's runtimes'): the one whose log to read when a
# webhook added others.
STAGE_CONTAINERS = (PYTORCHJOB_CONTAINER, TRAINJOB_NODE, "train", "collect", "evaluate")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def training_child(observed: Observed, name: str) -> Child | None:
    """The run's training child of whichever kind exists (a TrainJob first)."""
    return next((c for kind in TRAINING_KINDS if (c := observed.child(kind, name)) is not None), None)


def succeeded(child: Child) -> bool:
    return child.is_true(DONE.get(child.kind, "Complete"))


def finish_time(child: Child) -> datetime | None:
    """When a training that succeeded ended: a Job's or PyTorchJob's ``completionTime``; a TrainJob has
    none, its ``Complete`` condition's transition says it."""
    done = child.condition(DONE.get(child.kind, "Complete")) or {}
    return parse_time(child.status.get("completionTime")) or parse_time(done.get("lastTransitionTime"))


def failed(child: Child) -> bool:
    return child.is_true("Failed")


def ended(child: Child) -> bool:
    return succeeded(child) or failed(child)


def suspended(child: Child) -> bool:
    """Suspended and not ended: waiting for Kueue to admit it (or suspended by hand)."""
    return child.is_true("Suspended") and not ended(child)


def replica_type(labels: Mapping[str, str]) -> str | None:
    """A PyTorchJob pod's replica type (``master``, ``worker``), lower case; None for other pods."""
    found = next((labels[k] for k in REPLICA_TYPE_LABELS if k in labels), None)
    return found.lower() if found else None
