"""Stage 1: the collection Job (Indexed, one pod per shard) and, for a self-hosted teacher, its vLLM
Deployment and Service (created first, torn down once the collection has ended, or once the training
has for an on-policy training, which scores with it: :mod:`distillery_operator.planner.teacher`)."""

from __future__ import annotations

from typing import Any

from distillery_trainer.api.stage import TEACHER_API_KEY_ENV
from distillery_trainer.collect.prompts import CONFIGMAP_MOUNT, PROMPTS_DIR_ENV
from distillery_trainer.serve import VllmServer
from distillery_trainer.serve.args import score_top_k

from ..settings import Settings
from .common import (
    COLLECT,
    TEACHER,
    Run,
    active_deadline,
    base_env,
    finish,
    hf_token_env,
    labels,
    metadata,
    pod_spec,
    secret_env,
    stage_command,
    stage_resources,
    volume_mounts,
    volume_path,
)
from .config import TEACHER_SERVED_NAME
from .serve import vllm_deployment, vllm_service

# The collection pods' view of a data.prompts.configMapRef (the trainer reads it there).
PROMPTS_MOUNT = CONFIGMAP_MOUNT
PROMPTS_VOLUME = "prompts"


def collect_job(run: Run, settings: Settings, inputs: str) -> dict[str, Any]:
    spec = run.spec.collection
    env = base_env(run, settings)
    endpoint = run.spec.teacher.endpoint
    if endpoint is not None and endpoint.api_key_secret_ref is not None:
        env.append(secret_env(TEACHER_API_KEY_ENV, endpoint.api_key_secret_ref))
    if run.spec.teacher.logprobs is not None:
        env += hf_token_env(run)  # white-box: the teacher's tokenizer may come from the hub
    mounts = volume_mounts(run, settings)
    extra_volumes = []
    cm = run.spec.data.prompts.config_map_ref
    if cm is not None:
        # Only the key, at a fixed path beside the stage config (never inside its read-only volume).
        extra_volumes.append(
            {
                "name": PROMPTS_VOLUME,
                "configMap": {"name": cm.name, "items": [{"key": cm.key, "path": cm.key}]},
            }
        )
        mounts.append({"name": PROMPTS_VOLUME, "mountPath": PROMPTS_MOUNT, "readOnly": True})
        env.append({"name": PROMPTS_DIR_ENV, "value": PROMPTS_MOUNT})
    container = {
        "name": "collect",
        "image": run.spec.training.image or settings.trainer_image,
        # The shard is the pod's JOB_COMPLETION_INDEX, which the Job controller sets.
        "command": stage_command("collect", settings),
        "env": env,
        "resources": stage_resources(spec.resources, settings.collection_resources),
        "volumeMounts": mounts,
    }
    meta = metadata(run, COLLECT, inputs=inputs, workload=True, settings=settings)
    return finish(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta,
            "spec": {
                "completionMode": "Indexed",
                "completions": spec.shards,
                "parallelism": min(spec.shards, spec.parallelism or spec.shards),
                # A shard's pod is retried on its own; the Job fails once every shard has ended and
                # any of them ran out of retries (reason FailedIndexes).
                "backoffLimitPerIndex": spec.backoff_limit_per_index,
                **active_deadline(spec.deadline_seconds, settings.collect_deadline_seconds),
                "template": {
                    "metadata": {"labels": labels(run, COLLECT)},
                    "spec": pod_spec(
                        run,
                        settings,
                        [container],
                        restart_policy="Never",
                        extra_volumes=extra_volumes,
                        component=COLLECT,
                    ),
                },
            },
        }
    )


def _teacher_server(run: Run, settings: Settings) -> VllmServer:
    teacher = run.spec.teacher.self_hosted
    assert teacher is not None
    model = volume_path(teacher.model, settings)  # vLLM knows no pvc://: the path where it is mounted
    return VllmServer.for_teacher(
        teacher, run.spec.teacher.logprobs, model, TEACHER_SERVED_NAME, score_top_k=score_top_k(run.spec)
    )


def teacher_deployment(run: Run, settings: Settings) -> dict[str, Any]:
    teacher = run.spec.teacher.self_hosted
    assert teacher is not None
    return vllm_deployment(
        run,
        settings,
        TEACHER,
        _teacher_server(run, settings),
        replicas=1,
        gpus=teacher.tensor_parallel_size,
        image=run.spec.serving.image or settings.vllm_image,
        inputs=None,
    )


def teacher_service(run: Run, settings: Settings) -> dict[str, Any]:
    return vllm_service(run, settings, TEACHER)
