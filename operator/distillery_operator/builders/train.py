"""Stage 2: training with torchrun, as a Kubeflow Trainer v2 TrainJob, a Kubeflow v1 PyTorchJob or,
without Kubeflow, an Indexed Job.

- TrainJob (``trainer.kubeflow.org/v1alpha1``, the API of Kubeflow Trainer v2.3): it references a
  ClusterTrainingRuntime (the run's ``training.runtime``, else the operator's, Kubeflow's
  ``torch-distributed``) and sets the trainer's image, command, ``numNodes``, ``numProcPerNode`` (GPUs
  per node), ``resourcesPerNode`` and environment; the runtime's torch plugin sets ``PET_NNODES``,
  ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` for torchrun.
  What the TrainJob's own fields cannot say (the volumes, the pod and container security context, the
  placement, the labels the operator finds the pods by) goes into one ``runtimePatches`` entry (manager
  ``distillery.dev/operator``) on the runtime's ``node`` replicated job and its ``node`` container. The
  runtime decides the rest of the pod (its restart policy, ports, service account): a platform team's
  own runtime keeps that shape.
- PyTorchJob (``kubeflow.org/v1``): Master + (nodes - 1) Workers, ``nprocPerNode`` = GPUs per node. The
  training operator sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
  ``PET_MASTER_PORT``, which torchrun reads, so the command needs no rendezvous flags.
- Indexed Job + headless Service: pod *i* is ``<run>-train-<i>.<run>-train``; torchrun gets
  ``--nnodes/--nproc-per-node/--node-rank $(JOB_COMPLETION_INDEX)/--master-addr/--master-port`` itself.
"""

from __future__ import annotations

from typing import Any

from distillery_trainer.api.stage import TEACHER_API_KEY_ENV

from ..naming import COMPLETION_INDEX_ANNOTATION, PYTORCHJOB_CONTAINER, TRAINJOB_NODE, WORKLOAD_LABEL
from ..settings import Settings
from .common import (
    PYTORCHJOB_PORT,
    TORCH_PORT,
    TRAIN,
    Run,
    active_deadline,
    base_env,
    colocation,
    container_security_context,
    finish,
    hf_token_env,
    labels,
    metadata,
    pod_security_context,
    pod_spec,
    scheduling,
    secret_env,
    selector,
    stage_command,
    training_resources,
    volume_mounts,
    volumes,
)

TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
PATCH_MANAGER = "distillery.dev/operator"


def nproc_per_node(run: Run) -> int:
    return max(1, run.spec.training.resources.gpus_per_node)


def training_env(run: Run, settings: Settings) -> list[dict[str, Any]]:
    """The training container's environment: the student (and an online teacher) may be gated; on-policy
    steps call an endpoint teacher to score the student's samples, with its key as collection has it."""
    env = base_env(run, settings) + hf_token_env(run)
    endpoint = run.spec.teacher.endpoint
    if run.spec.training.method == "onPolicy" and endpoint is not None and endpoint.api_key_secret_ref:
        env.append(secret_env(TEACHER_API_KEY_ENV, endpoint.api_key_secret_ref))
    return env


def _container(run: Run, settings: Settings, name: str, command: list[str]) -> dict[str, Any]:
    res = run.spec.training.resources
    return {
        "name": name,
        "image": run.spec.training.image or settings.trainer_image,
        "command": command,
        "env": training_env(run, settings),
        "resources": training_resources(
            res.cpu,
            res.memory,
            settings.training_resources,
            gpus=res.gpus_per_node,
            gpu_resource=res.gpu_resource or settings.gpu_resource,
        ),
        "volumeMounts": volume_mounts(run, settings, shm=True),
    }


def _template(run: Run, settings: Settings, container: dict[str, Any], restart_policy: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels(run, TRAIN)},
        "spec": pod_spec(
            run, settings, [container], restart_policy=restart_policy, shm=True, component=TRAIN
        ),
    }


def pytorch_job(run: Run, settings: Settings, inputs: str) -> dict[str, Any]:
    nodes = run.spec.training.resources.nodes
    command = ["torchrun", "--no-python", *stage_command("train", settings)]
    container = _container(run, settings, PYTORCHJOB_CONTAINER, command)
    container["ports"] = [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}]
    replica_specs: dict[str, Any] = {
        "Master": {
            "replicas": 1,
            "restartPolicy": "OnFailure",
            "template": _template(run, settings, container, "OnFailure"),
        }
    }
    if nodes > 1:
        replica_specs["Worker"] = {
            "replicas": nodes - 1,
            "restartPolicy": "OnFailure",
            "template": _template(run, settings, container, "OnFailure"),
        }
    return finish(
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": metadata(run, TRAIN, inputs=inputs, workload=True, settings=settings),
            "spec": {
                "nprocPerNode": str(nproc_per_node(run)),
                # Pods stay after the end: the master's termination message carries the progress.
                "runPolicy": {
                    "cleanPodPolicy": "None",
                    "backoffLimit": 3,
                    **active_deadline(run.spec.training.deadline_seconds, settings.train_deadline_seconds),
                },
                "pytorchReplicaSpecs": replica_specs,
            },
        }
    )


def train_job(run: Run, settings: Settings, inputs: str) -> dict[str, Any]:
    nodes = run.spec.training.resources.nodes
    name = run.child(TRAIN)
    command = [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc_per_node(run)}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={name}-0.{name}",
        f"--master-port={TORCH_PORT}",
        "--no-python",
        *stage_command("train", settings),
    ]
    container = _container(run, settings, "train", command)
    container["env"].insert(
        0,
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
    )
    container["ports"] = [{"name": "torch", "containerPort": TORCH_PORT, "protocol": "TCP"}]
    template = _template(run, settings, container, "Never")
    template["spec"]["subdomain"] = name  # pod i resolves as <run>-train-<i>.<run>-train
    return finish(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(run, TRAIN, inputs=inputs, workload=True, settings=settings),
            "spec": {
                "completionMode": "Indexed",
                "completions": nodes,
                "parallelism": nodes,
                "backoffLimit": 3 * nodes,
                **active_deadline(run.spec.training.deadline_seconds, settings.train_deadline_seconds),
                "template": template,
            },
        }
    )


def runtime_name(run: Run, settings: Settings) -> str:
    """The ClusterTrainingRuntime the run's TrainJob references."""
    return run.spec.training.runtime or settings.training_runtime


def workload_id(inputs: str, generation: int) -> str:
    """The value of a TrainJob's (and its pods') WORKLOAD_LABEL: a later TrainJob of the same name is made
    for other inputs, or (retried after a failure) for a later generation of the run."""
    return f"{inputs}.g{generation}"


def trainjob(run: Run, settings: Settings, inputs: str, generation: int) -> dict[str, Any]:
    """The run's Kubeflow Trainer v2 TrainJob (see the module's docstring)."""
    res = run.spec.training.resources
    workload = workload_id(inputs, generation)
    pod_labels = {**labels(run, TRAIN), WORKLOAD_LABEL: workload}
    placement = scheduling(run, settings)
    placement.pop("priorityClassName", None)  # not a field a runtime patch may set (docs/install.md)
    affinity = colocation(run, TRAIN)
    if affinity:
        placement["affinity"] = affinity
    pod = {
        "securityContext": pod_security_context(settings),
        **placement,
        "volumes": volumes(run, shm=settings.shm_size),
        "containers": [
            {
                "name": TRAINJOB_NODE,
                "securityContext": container_security_context(),
                "volumeMounts": volume_mounts(run, settings, shm=True),
            }
        ],
    }
    meta = metadata(run, TRAIN, inputs=inputs, workload=True, settings=settings)
    meta["labels"][WORKLOAD_LABEL] = workload
    return finish(
        {
            "apiVersion": TRAINJOB_API,
            "kind": "TrainJob",
            "metadata": meta,
            "spec": {
                "runtimeRef": {
                    "apiGroup": "trainer.kubeflow.org",
                    "kind": "ClusterTrainingRuntime",
                    "name": runtime_name(run, settings),
                },
                **active_deadline(run.spec.training.deadline_seconds, settings.train_deadline_seconds),
                "trainer": {
                    "image": run.spec.training.image or settings.trainer_image,
                    "command": ["torchrun", "--no-python", *stage_command("train", settings)],
                    "numNodes": res.nodes,
                    "numProcPerNode": nproc_per_node(run),
                    "resourcesPerNode": training_resources(
                        res.cpu,
                        res.memory,
                        settings.training_resources,
                        gpus=res.gpus_per_node,
                        gpu_resource=res.gpu_resource or settings.gpu_resource,
                    ),
                    # API keys and tokens only as secretKeyRefs (the operator never reads a Secret).
                    "env": training_env(run, settings),
                },
                "runtimePatches": [
                    {
                        "manager": PATCH_MANAGER,
                        "trainingRuntimeSpec": {
                            "template": {
                                "metadata": {"labels": labels(run, TRAIN)},
                                "spec": {
                                    "replicatedJobs": [
                                        {
                                            "name": TRAINJOB_NODE,
                                            "template": {
                                                "spec": {
                                                    "template": {
                                                        "metadata": {"labels": pod_labels},
                                                        "spec": pod,
                                                    }
                                                }
                                            },
                                        }
                                    ]
                                },
                            }
                        },
                    }
                ],
            },
        }
    )


def rendezvous_service(run: Run, settings: Settings) -> dict[str, Any]:
    return finish(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(run, TRAIN, settings=settings),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": selector(run, TRAIN),
                "ports": [{"name": "torch", "port": TORCH_PORT, "targetPort": TORCH_PORT, "protocol": "TCP"}],
            },
        }
    )
