"""Stage 2: training with torchrun, as a Kubeflow PyTorchJob or, without Kubeflow, an Indexed Job.

- PyTorchJob (``kubeflow.org/v1``): Master + (nodes - 1) Workers, ``nprocPerNode`` = GPUs per node. The
  training operator sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
  ``PET_MASTER_PORT``, which torchrun reads, so the command needs no rendezvous flags.
- Indexed Job + headless Service: pod *i* is ``<run>-train-<i>.<run>-train``; torchrun gets
  ``--nnodes/--nproc-per-node/--node-rank $(JOB_COMPLETION_INDEX)/--master-addr/--master-port`` itself.
"""

from __future__ import annotations

from typing import Any

from distillery_trainer.api.stage import TEACHER_API_KEY_ENV

from ..naming import COMPLETION_INDEX_ANNOTATION, PYTORCHJOB_CONTAINER
from ..settings import Settings
from .common import (
    PYTORCHJOB_PORT,
    TORCH_PORT,
    TRAIN,
    Run,
    active_deadline,
    base_env,
    finish,
    hf_token_env,
    labels,
    metadata,
    pod_spec,
    resources,
    secret_env,
    selector,
    stage_command,
    teacher_in_training,
    volume_mounts,
)


def nproc_per_node(run: Run) -> int:
    return max(1, run.spec.training.resources.gpus_per_node)


def _container(run: Run, settings: Settings, name: str, command: list[str]) -> dict[str, Any]:
    res = run.spec.training.resources
    env = base_env(run, settings) + hf_token_env(run)  # the student (and an online teacher) may be gated
    endpoint = run.spec.teacher.endpoint
    if run.spec.training.method == "onPolicy" and endpoint is not None and endpoint.api_key_secret_ref:
        # On-policy steps call the teacher's endpoint to score the student's samples, as collection does.
        env.append(secret_env(TEACHER_API_KEY_ENV, endpoint.api_key_secret_ref))
    return {
        "name": name,
        "image": run.spec.training.image or settings.trainer_image,
        "command": command,
        "env": env,
        "resources": resources(
            cpu=res.cpu,
            memory=res.memory,
            gpus=res.gpus_per_node,
            gpu_resource=res.gpu_resource or settings.gpu_resource,
        ),
        "volumeMounts": volume_mounts(run, settings, shm=True),
    }


def _template(run: Run, settings: Settings, container: dict[str, Any], restart_policy: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels(run, TRAIN)},
        # An on-policy training on a single-node claim goes to the node of the teacher that scores it.
        "spec": pod_spec(
            run,
            settings,
            [container],
            restart_policy=restart_policy,
            shm=True,
            component=TRAIN if teacher_in_training(run.spec) else None,
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
