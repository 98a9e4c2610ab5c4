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
from distillery_trainer.api.spec import DistillationRunSpec, PodResources
from distillery_trainer.api.stages import digest
from distillery_trainer.models import VOLUME_ROOT_ENV
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
# The variable huggingface_hub reads its access token from (gated models).
HF_TOKEN_ENV = "HF_TOKEN"
TORCH_PORT = 29500
PYTORCHJOB_PORT = 23456


@dataclass(frozen=True)
class Run:
    """The parts of a DistillationRun the builders need."""

    name: str
    namespace: str
    uid: str
    spec: DistillationRunSpec
    # The access modes of the run's claim, when known: the spec's for a claim the operator creates, the
    # claim's own spec.accessModes for one the run names (what the claim index saw); () when unknown.
    claim_modes: tuple[str, ...] = ()

    @property
    def single_node_claim(self) -> bool:
        """Whether the claim attaches to one node at a time (ReadWriteOnce without ReadWriteMany): the
        pods that use it at once must then share a node (else the second is stuck in Multi-Attach)."""
        return "ReadWriteOnce" in self.claim_modes and "ReadWriteMany" not in self.claim_modes

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


# The components whose pods mount the run's claim, some of them at the same time: a self-hosted teacher
# and the collection's shards; the served student and its evaluation; a training that runs again while
# the run's earlier student is still served (or a teacher still stopping). On a single-node claim every
# one of them is scheduled onto the node of any that is running (one required pod affinity to all of
# them, kubernetes.io/hostname): the first pod goes anywhere (a pod that matches its own affinity term is
# placed when no other does), and the scheduler ignores pods that have ended, so a stage that starts once
# the others are done is placed freely.
CLAIM_USERS: tuple[str, ...] = (TEACHER, COLLECT, TRAIN, SERVE, EVAL)
HOSTNAME = "kubernetes.io/hostname"


def teacher_in_training(spec: DistillationRunSpec) -> bool:
    """Whether the self-hosted teacher's server is needed during the training too: ``onPolicy`` scores
    the student's samples with it at every step (an endpoint teacher is not the operator's to keep)."""
    return spec.training.method == "onPolicy" and spec.teacher.self_hosted is not None


def colocation(run: Run, component: str) -> dict[str, Any] | None:
    """The ``affinity`` that keeps ``component``'s pods on the node of the run's other pods that mount
    its claim, when the claim is single-node (ReadWriteOnce); None otherwise."""
    if component not in CLAIM_USERS or not run.single_node_claim:
        return None
    term = {
        "labelSelector": {
            "matchLabels": {RUN_LABEL: run.name},
            "matchExpressions": [{"key": COMPONENT_LABEL, "operator": "In", "values": list(CLAIM_USERS)}],
        },
        "topologyKey": HOSTNAME,
    }
    return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}


def active_deadline(spec_value: int | None, default: int) -> dict[str, Any]:
    """A Job's (or a PyTorchJob's runPolicy's) ``activeDeadlineSeconds``: the run's, else the operator's;
    the operator's 0 means none."""
    value = spec_value if spec_value is not None else default
    return {"activeDeadlineSeconds": value} if value > 0 else {}


def artifacts_root(run: Run, settings: Settings) -> str:
    """Where the run's artifacts live: on the claim (``storage.url``, object storage, is refused by the API)."""
    return f"{settings.data_mount}/runs/{run.namespace}/{run.name}"


def cache_root(run: Run, settings: Settings) -> str:
    return f"{settings.data_mount}/cache"


def volumes(run: Run, *, shm: str | None = None, config: bool = True) -> list[dict[str, Any]]:
    """The pod's volumes; ``shm``: the size limit of a memory-backed /dev/shm (none without it)."""
    out: list[dict[str, Any]] = [{"name": "home", "emptyDir": {}}]
    if config:
        out.append({"name": "config", "configMap": {"name": run.child(CONFIG)}})
    storage = run.spec.storage
    if storage is not None and storage.pvc is not None:
        out.append({"name": "data", "persistentVolumeClaim": {"claimName": storage.pvc.claim_name}})
    if shm:
        # Bounded: a memory-backed emptyDir counts against the pod's memory, and unbounded it may take
        # the node's (the kubelet evicts the pod past the limit instead).
        out.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
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
    env = [
        {"name": "HOME", "value": "/home/distillery"},
        {"name": "HF_HOME", "value": hf_home},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if storage is not None and storage.pvc is not None:
        # Where the volume is mounted: pvcPath prompts and pvc://<path> models are relative to it.
        env.append({"name": VOLUME_ROOT_ENV, "value": settings.data_mount})
    return env


def hf_token_env(run: Run) -> list[dict[str, Any]]:
    """``HF_TOKEN`` from the run's Secret, for a pod that downloads a model (a gated one needs it)."""
    hf = run.spec.hugging_face
    if hf is None or hf.token_secret_ref is None:
        return []
    return [secret_env(HF_TOKEN_ENV, hf.token_secret_ref)]


def volume_path(ref: str, settings: Settings) -> str:
    """A model reference as a pod sees it: ``pvc://<path>`` is the path under the volume's mount."""
    from distillery_trainer.models import resolve_model_ref

    return resolve_model_ref(ref, volume=settings.data_mount) if ref.startswith("pvc://") else ref


def secret_env(name: str, ref: Any) -> dict[str, Any]:
    """An API key as a ``secretKeyRef``: the operator never reads the Secret."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def training_resources(
    cpu: str | None,
    memory: str | None,
    default: Any,
    *,
    gpus: int = 0,
    gpu_resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    """A training container's resources: the operator's default for training, with the run's
    ``training.resources.cpu`` and ``.memory`` in place of the default's of that kind (the request; the
    memory also as the limit, a cpu without a limit); plus the GPUs, requested and limited alike."""
    requests = dict(default.get("requests") or {})
    limits = dict(default.get("limits") or {})
    if cpu:
        requests["cpu"] = cpu
        limits.pop("cpu", None)
    if memory:
        requests["memory"] = limits["memory"] = memory
    base = {"requests": requests, "limits": limits}
    out: dict[str, Any] = {part: entries for part, entries in base.items() if entries}
    if gpus > 0:
        for part in ("requests", "limits"):
            out.setdefault(part, {})[gpu_resource] = str(gpus)
    return out


def stage_resources(
    spec: PodResources | None,
    default: Any,
    *,
    gpus: int = 0,
    gpu_resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    """A container's resources: the run's CPU and memory (``*.resources``) or else the operator's default
    for the stage, as a whole; plus the GPUs, requested and limited alike."""
    base = spec.manifest() if spec is not None else default
    out: dict[str, Any] = {part: dict(base[part]) for part in ("requests", "limits") if base.get(part)}
    if gpus > 0:
        for part in ("requests", "limits"):
            out.setdefault(part, {})[gpu_resource] = str(gpus)
    return out


def pod_spec(
    run: Run,
    settings: Settings,
    containers: list[dict[str, Any]],
    *,
    restart_policy: str,
    shm: bool = False,
    shm_size: str | None = None,
    config: bool = True,
    component: str | None = None,
    extra_volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A pod spec with the shared security context, placement and volumes; no API token mounted. With
    ``component``, the pod affinity a single-node claim needs (:func:`colocation`)."""
    for container in containers:
        container.setdefault("imagePullPolicy", settings.image_pull_policy)
        container["securityContext"] = container_security_context()
        container.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    affinity = colocation(run, component) if component else None
    placement = {"affinity": affinity} if affinity else {}
    return {
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        **scheduling(run, settings),
        **placement,
        "containers": containers,
        "volumes": volumes(run, shm=(shm_size or settings.shm_size) if shm else None, config=config)
        + (extra_volumes or []),
    }


def stage_command(stage: str, settings: Settings) -> list[str]:
    return ["distillery-trainer", stage, "--config", f"{settings.config_mount}/{CONFIG_FILE}"]
