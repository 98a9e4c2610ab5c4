"""What names a run's children and what the operator recognises them by: their names, labels and
annotations, the components, and the few Kubernetes words it matches on. No logic beyond names, so the
builders, the observers, the handlers and the planner all read the same words without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distillery_trainer.api.names import (  # the components and the bound on a run's name: the API's
    COLLECT,
    CONFIG,
    DATA,
    EVAL,
    MAX_RUN_NAME,
    SERVE,
    TEACHER,
    TRAIN,
)

# Labels and annotations.
RUN_LABEL = "distillery.dev/run"
STAGE_LABEL = "distillery.dev/stage"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_LABEL = "app.kubernetes.io/managed-by"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
HASH_ANNOTATION = "distillery.dev/hash"  # of the manifest as built: a differing one is re-applied
INPUTS_ANNOTATION = "distillery.dev/inputs"  # of the spec sections the stage depends on: restarts
# The run's generation a Job was made for: a failed one is tried again after any later edit of the spec.
GENERATION_ANNOTATION = "distillery.dev/generation"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
PYTORCHJOB_CONTAINER = "pytorch"  # the name the Kubeflow training operator looks for
# Kubeflow Trainer v2's names for the trainer's replicated job and container in its torch runtimes (a
# run's TrainJob patches these; a runtime of another shape must use them too).
TRAINJOB_NODE = "node"
# On a TrainJob and on its pods: which TrainJob made a pod (the JobSet's Jobs own the pods, not the
# TrainJob): the inputs it was made for and the run's generation.
WORKLOAD_LABEL = "distillery.dev/workload"

# Components (one per kind of child, named in the API package with the run-name rule) and their stages.
COMPONENT_STAGE = {
    CONFIG: "config",
    DATA: "storage",
    TEACHER: "collect",
    COLLECT: "collect",
    TRAIN: "train",
    SERVE: "serve",
    EVAL: "evaluate",
}

# A StorageClass's volumeBindingMode, and what the reconciler reports for a class that does not exist.
IMMEDIATE = "Immediate"
WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"
CLASS_NOT_FOUND = "NotFound"


def child_name(run: str, component: str) -> str:
    """The name of a run's child: ``<run>-<component>``."""
    return f"{run}-{component}"


def claim_name(spec: Mapping[str, Any]) -> str | None:
    """The claim a run's spec (as the API server holds it) mounts, whoever creates it."""
    name = (((spec.get("storage") or {}).get("pvc")) or {}).get("claimName")
    return name if isinstance(name, str) and name else None


__all__ = ["COLLECT", "CONFIG", "DATA", "EVAL", "MAX_RUN_NAME", "SERVE", "TEACHER", "TRAIN"]


def claim_to_create(spec: Mapping[str, Any]) -> str | None:
    """The claim a run's spec (as the API server holds it) asks the operator to create, if any."""
    pvc = ((spec.get("storage") or {}).get("pvc")) or {}
    name = pvc.get("claimName")
    return name if isinstance(name, str) and name and pvc.get("create") else None
