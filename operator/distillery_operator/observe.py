"""What the operator keeps of the objects it watches: small, immutable observations.

kopf's indices (see :mod:`.handlers`) hold one observation per run and per child, keyed by
``(namespace, run name)``, and one per PersistentVolumeClaim, keyed by ``(namespace, claim name)`` (a run
may use a claim someone else made), so a reconcile reads what exists from memory instead of listing the
API. The latest progress line read from a running pod's log (:mod:`.podlogs`) is one more observation,
:class:`Live`. The planner reads only these types, which keeps it pure and the operator's memory flat.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from distillery_trainer.api.base import ApiModel
from distillery_trainer.api.status import (
    REASON_CONTAINER_CONFIG_ERROR,
    REASON_CRASH_LOOPING,
    REASON_IMAGE_PULL_FAILED,
    REASON_POD_UNSCHEDULABLE,
    REASON_VOLUME_NOT_MOUNTED,
)
from distillery_trainer.redact import scrub

from .naming import (
    COMPLETION_INDEX_ANNOTATION,
    COMPONENT_LABEL,
    GENERATION_ANNOTATION,
    HASH_ANNOTATION,
    INPUTS_ANNOTATION,
    WORKLOAD_LABEL,
)
from .observe_training import STAGE_CONTAINERS, STATUS_KEYS, WORKLOADS, parse_time, replica_type
from .owned import applied_shape

COMPLETION_INDEX_LABEL = COMPLETION_INDEX_ANNOTATION  # a label too since Kubernetes 1.28
# A waiting container's reasons (the kubelet's words) that are trouble, and the reason the run reports.
WAITING_TROUBLE = {
    "ErrImagePull": REASON_IMAGE_PULL_FAILED,
    "ImagePullBackOff": REASON_IMAGE_PULL_FAILED,
    "InvalidImageName": REASON_IMAGE_PULL_FAILED,
    "ErrImageNeverPull": REASON_IMAGE_PULL_FAILED,
    "CrashLoopBackOff": REASON_CRASH_LOOPING,
    "CreateContainerConfigError": REASON_CONTAINER_CONFIG_ERROR,
    "CreateContainerError": REASON_CONTAINER_CONFIG_ERROR,
}

Key = tuple[str, str]  # (namespace, run name)


@dataclass(frozen=True)
class RunView:
    """A run as the index keeps it: spec and status as JSON text (a tenth of the memory of dicts)."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec_json: str
    status_json: str

    @classmethod
    def of(
        cls,
        name: str,
        namespace: str,
        uid: str,
        generation: int,
        spec: Mapping[str, Any],
        status: Mapping[str, Any],
    ) -> RunView:
        return cls(name, namespace, uid, generation, _json(spec), _json(status))

    @property
    def spec(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.spec_json)
        return value

    @property
    def status(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.status_json)
        return value


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Child:
    kind: str
    name: str
    uid: str = ""
    resource_version: str = ""
    owners: tuple[str, ...] = ()
    hash: str | None = None
    inputs: str | None = None
    made_for: int | None = None  # the run's generation a Job was made for (GENERATION_ANNOTATION)
    deleting: bool = False
    generation: int = 1
    replicas: int | None = None
    status: Mapping[str, Any] = field(default_factory=dict)
    storage_class: str | None = None  # a PersistentVolumeClaim's spec.storageClassName
    access_modes: tuple[str, ...] = ()  # a PersistentVolumeClaim's spec.accessModes
    # Which fields the operator's server-side apply owns, as :func:`.owned.shape_digest` of them (None: none).
    owned: str | None = None
    # A TrainJob's WORKLOAD_LABEL: its pods carry the same (the JobSet's Jobs own them, not the TrainJob).
    workload: str | None = None

    def condition(self, type_: str) -> Mapping[str, Any] | None:
        return condition(self.status, type_)

    def is_true(self, type_: str) -> bool:
        cond = self.condition(type_)
        return cond is not None and cond.get("status") == "True"


@dataclass(frozen=True)
class Terminated:
    container: str
    exit_code: int
    reason: str = ""
    message: str = ""
    finished_at: datetime | None = None

    def json(self) -> dict[str, Any] | None:
        """The termination message as a JSON object, or None when it is not one."""
        try:
            data = json.loads(self.message)
        except (TypeError, ValueError):
            return None
        return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Trouble:
    """Why a pod that has not ended does not get on, from its status alone (no Events are read): its
    ``PodScheduled`` condition (Unschedulable), a waiting container's reason (image pull, crash loop,
    container config), or, once scheduled, a ``PodReadyToStartContainers`` condition that stays False
    (its volumes are not mounted: FailedMount, Multi-Attach; Kubernetes 1.29 and later). ``since`` is
    the lastTransitionTime of the condition that says so (None when no condition does)."""

    reason: str  # one of distillery_trainer.api.status.STALL_REASONS
    message: str
    since: datetime | None = None


@dataclass(frozen=True)
class Pod:
    name: str
    component: str
    index: int | None = None
    replica_type: str | None = None
    phase: str | None = None
    terminated: tuple[Terminated, ...] = ()
    owners: tuple[str, ...] = ()
    container: str = ""  # the (first) container's name: whose log holds the stage's output
    trouble: Trouble | None = None
    workload: str | None = None  # WORKLOAD_LABEL: the TrainJob that made it

    @property
    def master(self) -> bool:
        """Whether the pod runs rank 0: the PyTorchJob's Master, or the Indexed Job's (or the TrainJob's
        node Job's) pod 0."""
        return self.replica_type == "master" if self.replica_type else self.index in (None, 0)

    @property
    def running(self) -> bool:
        return self.phase == "Running"

    @property
    def succeeded(self) -> Terminated | None:
        return next((t for t in self.terminated if t.exit_code == 0), None)

    @property
    def failed(self) -> Terminated | None:
        return next((t for t in self.terminated if t.exit_code != 0), None)


@dataclass(frozen=True)
class Live:
    """The latest progress line read from a running pod's log: a ``TrainingProgress`` (rank 0) or a
    ``CollectionSummary`` (a shard), and when the operator first saw it."""

    report: ApiModel
    seen_at: datetime


@dataclass(frozen=True)
class Observed:
    """Everything a reconcile knows about one run's children."""

    children: Mapping[tuple[str, str], Child] = field(default_factory=dict)
    pods: Sequence[Pod] = ()
    live: Mapping[str, Live] = field(default_factory=dict)  # pod name -> its latest progress line

    def child(self, kind: str, name: str) -> Child | None:
        return self.children.get((kind, name))

    def pods_of(self, component: str, owner: Child | None = None) -> list[Pod]:
        """The component's pods; with ``owner``, only the pods that child made (not a deleted predecessor's):
        those it owns, or for a TrainJob those with its workload label."""
        return sorted(
            (p for p in self.pods if p.component == component and (owner is None or made_by(p, owner))),
            key=lambda p: p.name,
        )

    @classmethod
    def of(
        cls, children: Iterable[Child], pods: Iterable[Pod], live: Mapping[str, Live] | None = None
    ) -> Observed:
        return cls({(c.kind, c.name): c for c in children}, tuple(pods), dict(live or {}))


def made_by(pod: Pod, owner: Child) -> bool:
    """Whether ``owner`` made ``pod``: it owns it, or (a TrainJob) the pod carries its workload label."""
    return owner.uid in pod.owners or (owner.workload is not None and pod.workload == owner.workload)


# ---------------------------------------------------------------------------------------------- parsing


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == type_:
            return cond
    return None


def plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists (kopf hands out read-only views)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def run_view(body: Mapping[str, Any]) -> RunView:
    meta = body.get("metadata") or {}
    spec = plain(body.get("spec") or {})
    return RunView.of(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 1),
        spec=spec,
        status=plain(body.get("status") or {}),
    )


def child_view(body: Mapping[str, Any]) -> Child:
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    kind = body.get("kind") or ""
    keep: dict[str, Any] = {}
    if kind == "PersistentVolumeClaim" and status.get("phase"):
        keep = {"phase": status["phase"]}
    if kind in WORKLOADS:
        keep = {k: plain(v) for k, v in status.items() if k in STATUS_KEYS}
    return Child(
        kind=kind,
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        owners=tuple(
            ref.get("uid", "") for ref in meta.get("ownerReferences") or () if isinstance(ref, Mapping)
        ),
        hash=annotations.get(HASH_ANNOTATION),
        inputs=annotations.get(INPUTS_ANNOTATION),
        made_for=_int(annotations.get(GENERATION_ANNOTATION)),
        deleting=bool(meta.get("deletionTimestamp")),
        generation=int(meta.get("generation") or 1),
        replicas=spec.get("replicas") if kind == "Deployment" else None,
        status=keep,
        storage_class=spec.get("storageClassName") if kind == "PersistentVolumeClaim" else None,
        access_modes=tuple(spec.get("accessModes") or ()) if kind == "PersistentVolumeClaim" else (),
        owned=applied_shape(body),
        workload=(meta.get("labels") or {}).get(WORKLOAD_LABEL) if kind in WORKLOADS else None,
    )


def pod_view(body: Mapping[str, Any]) -> Pod:
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    status = body.get("status") or {}
    index_text = annotations.get(COMPLETION_INDEX_ANNOTATION, labels.get(COMPLETION_INDEX_LABEL))
    try:
        index = int(index_text) if index_text is not None else None
    except ValueError:
        index = None
    containers = (body.get("spec") or {}).get("containers") or ()
    terminated: list[Terminated] = []
    for cs in status.get("containerStatuses") or ():
        state = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if state:
            terminated.append(
                Terminated(
                    container=cs.get("name", ""),
                    exit_code=int(state.get("exitCode", -1)),
                    reason=state.get("reason") or "",
                    # A stage scrubs its keys itself; what still looks like one is masked here, before
                    # any of it can reach the status or an Event (the operator never knows the keys).
                    message=scrub(state.get("message") or ""),
                    finished_at=parse_time(state.get("finishedAt")),
                )
            )
    return Pod(
        name=meta.get("name", ""),
        component=labels.get(COMPONENT_LABEL, ""),
        index=index,
        replica_type=replica_type(labels),
        phase=status.get("phase"),
        terminated=tuple(terminated),
        owners=tuple(
            ref.get("uid", "") for ref in meta.get("ownerReferences") or () if isinstance(ref, Mapping)
        ),
        container=_stage_container(containers),
        trouble=pod_trouble(body),
        workload=labels.get(WORKLOAD_LABEL),
    )


def pod_trouble(body: Mapping[str, Any]) -> Trouble | None:
    """:class:`Trouble` of a pod that is Pending or Running, or None."""
    status = body.get("status") or {}
    phase = status.get("phase")
    if phase not in (None, "Pending", "Running"):
        return None
    scheduled = condition(status, "PodScheduled") or {}
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return Trouble(
            REASON_POD_UNSCHEDULABLE,
            f"cannot be scheduled: {scheduled.get('message') or 'Unschedulable'}",
            parse_time(scheduled.get("lastTransitionTime")),
        )
    # Since when its containers are not ready (a crash-looping container's resets with every start).
    not_ready = next(
        (
            c
            for c in (condition(status, "ContainersReady"), condition(status, "Ready"))
            if c is not None and c.get("status") == "False"
        ),
        None,
    )
    since = parse_time(not_ready.get("lastTransitionTime")) if not_ready else None
    for cs in (*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = WAITING_TROUBLE.get(waiting.get("reason") or "")
        if reason is None:
            continue
        text = f"container {cs.get('name', '')}: {waiting['reason']}"
        if reason == REASON_CRASH_LOOPING:
            last = (cs.get("lastState") or {}).get("terminated") or {}
            text += f" (restarted {int(cs.get('restartCount') or 0)} times"
            if last:
                text += f", last exit code {last.get('exitCode')} {last.get('reason') or ''}".rstrip()
            text += ")"
        if waiting.get("message"):
            text += f": {str(waiting['message'])[:300]}"
        return Trouble(reason, text, since)
    sandbox = condition(status, "PodReadyToStartContainers") or {}
    if phase in (None, "Pending") and scheduled.get("status") == "True" and sandbox.get("status") == "False":
        node = (body.get("spec") or {}).get("nodeName") or "its node"
        return Trouble(
            REASON_VOLUME_NOT_MOUNTED,
            f"scheduled on {node} but its volumes are not mounted yet (FailedMount or Multi-Attach; "
            "or its network sandbox is not created): `kubectl describe pod` shows the events",
            parse_time(sandbox.get("lastTransitionTime")),
        )
    return None


def _stage_container(containers: Any) -> str:
    names = [str(c.get("name") or "") for c in containers if isinstance(c, Mapping)]
    return next((n for n in names if n in STAGE_CONTAINERS), names[0] if names else "")
