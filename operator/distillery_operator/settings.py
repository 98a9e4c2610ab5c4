"""The operator's defaults, in one place: images, mount paths, placement, storage, timings.

Each comes from an environment variable (what the Helm chart sets) and may be overridden on the
command line (`distillery operator --trainer-image ...`). The spec of a run wins over these defaults
where it has a say (``training.image``, ``serving.image``, ``scheduling``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from distillery_trainer import __version__
from distillery_trainer.serve import VLLM_IMAGE

MANAGED_BY = "distillery-operator"
DATA_MOUNT = "/data"
CONFIG_MOUNT = "/etc/distillery"

ENV_PREFIX = "DISTILLERY_"

# The vLLM flags a run may pass by default: tuning of batching, caching and logging, none of which loads
# code, reads files or opens the server further (never --trust-remote-code). The chart's
# policy.vllmArgsAllowlist replaces this list (its default is the same list).
DEFAULT_VLLM_ARGS: tuple[str, ...] = (
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--enforce-eager",
    "--block-size",
    "--swap-space",
    "--kv-cache-dtype",
    "--seed",
    "--disable-log-requests",
    "--disable-log-stats",
    "--disable-uvicorn-access-log",
)


@dataclass(frozen=True)
class Settings:
    trainer_image: str = f"ghcr.io/distillery-dev/distillery-trainer:{__version__}"
    vllm_image: str = VLLM_IMAGE
    image_pull_policy: str = "IfNotPresent"
    data_mount: str = DATA_MOUNT
    config_mount: str = CONFIG_MOUNT
    # Every pod runs as this non-root user (the trainer image's user; the vLLM image runs as root by
    # default but needs nothing of root: it only has to be able to write $HOME, an emptyDir here).
    # None: no runAsUser/runAsGroup/fsGroup at all, the platform assigns them (OpenShift's restricted SCC);
    # DISTILLERY_RUN_AS_USER=none.
    run_as_user: int | None = 10001
    # The extended resource a GPU is requested as, when a run's training.resources.gpuResource is unset.
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str | None = None
    queue_name: str | None = None
    # The StorageClass of the claims the operator creates (storage.pvc.create) when a run names none;
    # None: the cluster's default class.
    storage_class: str | None = None
    # A vLLM server loads its weights before /health answers: a startup probe this long (seconds).
    startup_seconds: int = 1800
    # The Jobs' activeDeadlineSeconds when a run sets no collection/training/evaluation.deadlineSeconds
    # (0: none): past it Kubernetes stops the stage's pods and the stage fails.
    collect_deadline_seconds: int = 86400
    train_deadline_seconds: int = 7 * 86400
    evaluate_deadline_seconds: int = 6 * 3600
    # How long a stage's pod may stay unschedulable, unpullable, unmounted or crash-looping before the
    # stage fails with that reason (the run is Degraded meanwhile); 0: never fail for it, only report.
    stall_timeout_seconds: int = 900
    # How long a finished Job may wait for its pods' termination messages before the stage goes on
    # (or, for the evaluation, fails) without them.
    results_grace_seconds: float = 30.0
    # The ClusterTrainingRuntime a TrainJob references when the run names none (training.runtime): the
    # one Kubeflow Trainer ships for PyTorch distributed training.
    training_runtime: str = "torch-distributed"
    # How long the answers to "does the cluster serve TrainJobs, PyTorchJobs?" and "does this
    # ClusterTrainingRuntime exist?" are trusted: Kubeflow installed after the operator started is seen
    # within this time.
    discovery_ttl_seconds: float = 300.0
    # While training or collection runs, the operator reads the tail of rank 0's (or every shard's) log
    # at most this often per run for the live progress in the status; 0 turns it off (then progress
    # arrives only as the pods end, from their termination messages).
    progress_interval_seconds: float = 30.0
    # CPU and memory of the stage pods whose run does not set its own (collection.resources,
    # evaluation.resources, serving.resources, training.resources.cpu/memory): the container
    # ``resources`` shape, cpu and memory only. Every workload pod requests both, so that a namespace's
    # ResourceQuota on requests.cpu / requests.memory admits (and counts) it.
    collection_resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    )
    evaluation_resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    )
    # Every training pod (the TrainJob's nodes, the PyTorchJob's master and workers, or the Indexed Job's pods), when the run sets
    # no training.resources.cpu / .memory (each replaces the default's request and limit of its kind).
    training_resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {"requests": {"cpu": "4", "memory": "32Gi"}}
    )
    # Every vLLM pod (the student's and a self-hosted teacher's): weights pass through host memory on load.
    vllm_resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {"requests": {"cpu": "2", "memory": "16Gi"}}
    )
    # The size limit of the memory-backed /dev/shm of vLLM and training pods (it counts as their memory).
    shm_size: str = "8Gi"

    # Whether the operator may read its stage pods' logs at all (the chart's operator.liveProgress, which
    # also decides whether it is granted get on pods/log). False: no log is ever read, progress arrives
    # only as the pods end.
    live_progress: bool = True

    # The platform's policy (the chart's policy.*; see policy.py): what a run's spec may override.
    # Image prefixes a run's training.image / serving.image may start with; empty: only the defaults above.
    allowed_image_prefixes: tuple[str, ...] = ()
    # Whether scheduling.nodeSelector, scheduling.tolerations and (any non-system) priorityClassName of a
    # run's spec are honoured. Control-plane placement and tolerating every taint never are.
    allow_scheduling_overrides: bool = False
    # PriorityClasses a run may name whatever allow_scheduling_overrides says.
    allowed_priority_classes: tuple[str, ...] = ()
    # vLLM flags a run's serving.extraArgs / teacher.selfHosted.extraArgs may use.
    vllm_args_allowlist: tuple[str, ...] = DEFAULT_VLLM_ARGS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        base = cls()
        values: dict[str, Any] = {}

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        for attr, var in (
            ("trainer_image", "TRAINER_IMAGE"),
            ("vllm_image", "VLLM_IMAGE"),
            ("image_pull_policy", "IMAGE_PULL_POLICY"),
            ("priority_class_name", "PRIORITY_CLASS"),
            ("queue_name", "QUEUE_NAME"),
            ("gpu_resource", "GPU_RESOURCE"),
            ("storage_class", "STORAGE_CLASS"),
            ("shm_size", "SHM_SIZE"),
            ("training_runtime", "TRAINING_RUNTIME"),
        ):
            if (value := get(var)) is not None:
                values[attr] = value
        if (value := get("RUN_AS_USER")) is not None:
            values["run_as_user"] = None if value.strip().lower() == "none" else int(value)
        for attr, var in (
            ("startup_seconds", "STARTUP_SECONDS"),
            ("collect_deadline_seconds", "COLLECT_DEADLINE_SECONDS"),
            ("train_deadline_seconds", "TRAIN_DEADLINE_SECONDS"),
            ("evaluate_deadline_seconds", "EVALUATE_DEADLINE_SECONDS"),
            ("stall_timeout_seconds", "STALL_TIMEOUT_SECONDS"),
        ):
            if (value := get(var)) is not None:
                values[attr] = int(value)
        for attr, var in (
            ("results_grace_seconds", "RESULTS_GRACE_SECONDS"),
            ("discovery_ttl_seconds", "DISCOVERY_TTL_SECONDS"),
            ("progress_interval_seconds", "PROGRESS_INTERVAL_SECONDS"),
        ):
            if (value := get(var)) is not None:
                values[attr] = float(value)
        for attr, var in (
            ("live_progress", "LIVE_PROGRESS"),
            ("allow_scheduling_overrides", "ALLOW_SCHEDULING_OVERRIDES"),
        ):
            if (value := get(var)) is not None:
                values[attr] = parse_bool(value, ENV_PREFIX + var)
        for attr, var in (
            ("allowed_image_prefixes", "ALLOWED_IMAGE_PREFIXES"),
            ("allowed_priority_classes", "ALLOWED_PRIORITY_CLASSES"),
            ("vllm_args_allowlist", "VLLM_ARGS_ALLOWLIST"),
        ):
            if (value := env.get(ENV_PREFIX + var)) is not None:  # "[]" (or empty): nothing allowed
                values[attr] = parse_list(value, ENV_PREFIX + var)
        if (value := get("NODE_SELECTOR")) is not None:
            values["node_selector"] = parse_node_selector(value)
        if (value := get("TOLERATIONS")) is not None:
            values["tolerations"] = parse_tolerations(value)
        for attr, var in (
            ("collection_resources", "COLLECTION_RESOURCES"),
            ("evaluation_resources", "EVALUATION_RESOURCES"),
            ("training_resources", "TRAINING_RESOURCES"),
            ("vllm_resources", "VLLM_RESOURCES"),
        ):
            if (value := get(var)) is not None:
                values[attr] = parse_resources(value, ENV_PREFIX + var)
        return replace(base, **values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def parse_bool(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}: expected true or false, got {text!r}")


def parse_list(text: str, name: str) -> tuple[str, ...]:
    """A JSON list of strings (what the chart writes), or comma-separated words; empty: none."""
    text = text.strip()
    if text.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{name}: expected a JSON list of strings")
        return tuple(data)
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_node_selector(text: str) -> dict[str, str]:
    """``{"k": "v"}`` (JSON) or ``k=v,k2=v2``."""
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the node selector must be a JSON object of label: value")
        return {str(k): str(v) for k, v in data.items()}
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"node selector entry {part!r}: expected label=value")
        out[key.strip()] = value.strip()
    return out


def parse_tolerations(text: str) -> tuple[dict[str, Any], ...]:
    """A JSON list of Kubernetes tolerations."""
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ValueError(
            'tolerations must be a JSON list of objects, e.g. [{"key": "gpu", "operator": "Exists"}]'
        )
    return tuple(data)


def parse_resources(text: str, where: str) -> dict[str, dict[str, str]]:
    """A JSON ``{"requests": {"cpu", "memory"}, "limits": {...}}`` (a container's resources, cpu and
    memory only), checked as a run's ``*.resources`` is."""
    from distillery_trainer.api.spec import PodResources
    from pydantic import ValidationError

    try:
        data = json.loads(text)
        if isinstance(data, dict):  # the chart's values: empty means none, and `cpu: 1` is a number
            data = {
                part: {k: str(v) for k, v in entries.items() if v not in (None, "")}
                if isinstance(entries, dict)
                else entries
                for part, entries in data.items()
            }
        return PodResources.model_validate(data).manifest()
    except (ValueError, ValidationError) as exc:
        raise ValueError(
            f'{where}: expected JSON like {{"requests": {{"cpu": "1", "memory": "4Gi"}}, '
            f'"limits": {{"memory": "4Gi"}}}}: {exc}'
        ) from None
