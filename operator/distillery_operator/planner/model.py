"""What a planning pass hands back (:class:`Plan`: children to apply, to delete, the status, events),
what it knows of the cluster (:class:`Capabilities`), and how each stage's rules end (:class:`Outcome`)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distillery_trainer.api.status import DistillationRunStatus

from .. import status as derive


class Outcome(enum.Enum):
    DONE = "done"
    RUNNING = "running"
    FAILED = "failed"


@dataclass(frozen=True)
class Capabilities:
    """What the cluster offers, from discovery."""

    pytorchjob: bool = True
    trainjob: bool = False  # Kubeflow Trainer v2's TrainJob (trainer.kubeflow.org/v1alpha1)
    # Whether the ClusterTrainingRuntimes the reconciler looked up exist; a name missing here is unknown
    # (not looked up, or not readable): the TrainJob is created and the Trainer says the rest.
    runtimes: Mapping[str, bool] = field(default_factory=dict)
    # The volumeBindingMode of StorageClasses the reconciler looked up (Immediate, WaitForFirstConsumer,
    # or CLASS_NOT_FOUND); a class missing here is unknown (not looked up, or not readable).
    binding_modes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Desired:
    manifest: dict[str, Any]
    # Mutable children (ConfigMap, Service, Deployment) are patched when they differ; Jobs, PyTorchJobs
    # and TrainJobs are only created (their pod templates are immutable: a change restarts the stage).
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
