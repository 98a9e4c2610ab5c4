"""What every child of a run shares: names, labels, the owner reference, pod security and placement
(the names, labels and annotations themselves are :mod:`distillery_operator.naming`'s).

Builders are pure: a :class:`Run` (the parts of the DistillationRun they need) and the operator's
:class:`~distillery_operator.settings.Settings` in, a plain manifest (dict) out. No API calls.

Every pod runs as a non-root user (``runAsNonRoot``, UID 10001 by default, the trainer image's user), without privilege escalation,
with every capability dropped and the RuntimeDefault seccomp profile, and without a service-account
token (workload pods never talk to the API server). Two deliberate exceptions, the same for all images:
the root filesystem stays writable (torch, Triton and vLLM write caches where their images say; ``HOME``
is an emptyDir), and the official vLLM image, which defaults to root, runs as the same non-root UID
(it needs nothing of root once ``HOME`` is writable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distillery_trainer.api.base import API_GROUP, API_VERSION, KIND
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stages import digest
from distillery_trainer.serve import VLLM_PORT

from ..naming import (  # noqa: F401  (the components and MAX_RUN_NAME: re-exported for the builders)
    COLLECT,
    COMPONENT_LABEL,
    COMPONENT_STAGE,
    CONFIG,
    DATA,
    EVAL,
    HASH_ANNOTATION,
    INPUTS_ANNOTATION,
    MANAGED_LABEL,
    MAX_RUN_NAME,
    QUEUE_LABEL,
    RUN_LABEL,
    SERVE,
    STAGE_LABEL,
    TEACHER,
    TRAIN,
    child_name,
)
from ..settings import MANAGED_BY, Settings

CONFIG_FILE = "stage.yaml"
TORCH_PORT = 29500
PYTORCHJOB_PORT = 23456


@dataclass(frozen=True)
class Run:
    """The parts of a DistillationRun the builders need."""

    name: str
    namespace: str
    uid: str
    spec: DistillationRunSpec

    def child(self, component: str) -> str:
        return child_name(self.name, component)

    def service_url(self, component: str, port: int = VLLM_PORT) -> str:
        return f"http://{self.child(component)}.{self.namespace}.svc:{port}/v1"


def labels(run: Run, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "distillery",
        "app.kubernetes.io/instance": run.name,
        COMPONENT_LABEL: component,
        MANAGED_LABEL: MANAGED_BY,
        "app.kubernetes.io/part-of": "distillery",
        RUN_LABEL: run.name,
        STAGE_LABEL: COMPONENT_STAGE[component],
    }


def selector(run: Run, component: str) -> dict[str, str]:
    """The labels a Deployment or Service selects its pods by (immutable once created)."""
    return {RUN_LABEL: run.name, COMPONENT_LABEL: component}


def owner_reference(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    run: Run, component: str, *, inputs: str | None = None, workload: bool = False, settings: Settings
) -> dict[str, Any]:
    """Metadata of a child: its name, labels (a workload also gets the Kueue queue label), owner."""
    meta_labels = labels(run, component)
    queue = run.spec.scheduling.queue_name or settings.queue_name
    if workload and queue:
        meta_labels[QUEUE_LABEL] = queue
    meta: dict[str, Any] = {
        "name": run.child(component),
        "namespace": run.namespace,
        "labels": meta_labels,
        "ownerReferences": [owner_reference(run)],
    }
    if inputs is not None:
        meta["annotations"] = {INPUTS_ANNOTATION: inputs}
    return meta


def finish(manifest: dict[str, Any]) -> dict[str, Any]:
    """Stamp the manifest's hash into its annotations: the writer re-applies a child whose hash differs."""
    annotations = manifest["metadata"].setdefault("annotations", {})
    annotations.pop(HASH_ANNOTATION, None)
    annotations[HASH_ANNOTATION] = digest(manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- pods


def pod_security_context(settings: Settings) -> dict[str, Any]:
    uid = settings.run_as_user
    ids = {} if uid is None else {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}
    # Without a user (the chart's workloads.runAsUser: null) the platform assigns one: OpenShift's
    # restricted SCC gives each namespace its own range and refuses a fixed UID outside it.
    return {"runAsNonRoot": True, **ids, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    # No readOnlyRootFilesystem: torch, Triton and vLLM write caches under $HOME (an emptyDir here)
    # and some under paths the images fix; everything else is locked down.
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scheduling(run: Run, settings: Settings) -> dict[str, Any]:
    """nodeSelector, tolerations and priority class: the spec's merged over the operator's defaults."""
    spec = run.spec.scheduling
    out: dict[str, Any] = {}
    node_selector = {**settings.node_selector, **spec.node_selector}
    if node_selector:
        out["nodeSelector"] = node_selector
    tolerations = [dict(t) for t in settings.tolerations] + [t.to_dict() for t in spec.tolerations]
    if tolerations:
        out["tolerations"] = tolerations
    priority = spec.priority_class_name or settings.priority_class_name
    if priority:
        out["priorityClassName"] = priority
    return out


def artifacts_root(run: Run, settings: Settings) -> str:
    storage = run.spec.storage
    if storage is not None and storage.url:
        return f"{storage.url.rstrip('/')}/runs/{run.namespace}/{run.name}"
    return f"{settings.data_mount}/runs/{run.namespace}/{run.name}"


def cache_root(run: Run, settings: Settings) -> str:
    storage = run.spec.storage
    if storage is not None and storage.url:
        return f"{storage.url.rstrip('/')}/cache"
    return f"{settings.data_mount}/cache"


def volumes(run: Run, *, shm: bool = False, config: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "home", "emptyDir": {}}]
    if config:
        out.append({"name": "config", "configMap": {"name": run.child(CONFIG)}})
    storage = run.spec.storage
    if storage is not None and storage.pvc is not None:
        out.append({"name": "data", "persistentVolumeClaim": {"claimName": storage.pvc.claim_name}})
    if shm:
        out.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    return out


def volume_mounts(
    run: Run, settings: Settings, *, shm: bool = False, config: bool = True
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "home", "mountPath": "/home/distillery"}]
    if config:
        out.append({"name": "config", "mountPath": settings.config_mount, "readOnly": True})
    storage = run.spec.storage
    if storage is not None and storage.pvc is not None:
        mount: dict[str, Any] = {"name": "data", "mountPath": settings.data_mount}
        if storage.pvc.sub_path:
            mount["subPath"] = storage.pvc.sub_path
        out.append(mount)
    if shm:
        out.append({"name": "shm", "mountPath": "/dev/shm"})
    return out


def base_env(run: Run, settings: Settings) -> list[dict[str, Any]]:
    storage = run.spec.storage
    hf_home = (
        f"{settings.data_mount}/cache/huggingface"
        if storage is not None and storage.pvc is not None
        else "/home/distillery/.cache/huggingface"
    )
    return [
        {"name": "HOME", "value": "/home/distillery"},
        {"name": "HF_HOME", "value": hf_home},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def secret_env(name: str, ref: Any) -> dict[str, Any]:
    """An API key as a ``secretKeyRef``: the operator never reads the Secret."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def resources(
    *, cpu: str | None = None, memory: str | None = None, gpus: int = 0, gpu_resource: str = "nvidia.com/gpu"
) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = memory
        limits["memory"] = memory
    if gpus > 0:
        limits[gpu_resource] = str(gpus)
        requests[gpu_resource] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_spec(
    run: Run,
    settings: Settings,
    containers: list[dict[str, Any]],
    *,
    restart_policy: str,
    shm: bool = False,
    config: bool = True,
) -> dict[str, Any]:
    """A pod spec with the shared security context, placement and volumes; no API token mounted."""
    for container in containers:
        container.setdefault("imagePullPolicy", settings.image_pull_policy)
        container["securityContext"] = container_security_context()
        container.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    return {
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        **scheduling(run, settings),
        "containers": containers,
        "volumes": volumes(run, shm=shm, config=config),
    }


def stage_command(stage: str, settings: Settings) -> list[str]:
    return ["distillery-trainer", stage, "--config", f"{settings.config_mount}/{CONFIG_FILE}"]
