"""Stage 4: the evaluation Job, ``distillery-trainer evaluate`` against the student's Service. Its pod
writes the verdict (the status ``results`` shape) as its termination message."""

from __future__ import annotations

from typing import Any

from distillery_trainer.api.stage import JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV

from ..settings import Settings
from .common import (
    EVAL,
    Run,
    active_deadline,
    base_env,
    finish,
    labels,
    metadata,
    pod_spec,
    secret_env,
    stage_command,
    stage_resources,
    volume_mounts,
)


def eval_job(run: Run, settings: Settings, inputs: str) -> dict[str, Any]:
    env = base_env(run, settings)
    judge = run.spec.evaluation.judge
    if judge is not None and judge.endpoint.api_key_secret_ref is not None:
        env.append(secret_env(JUDGE_API_KEY_ENV, judge.endpoint.api_key_secret_ref))
    teacher = run.spec.teacher.endpoint
    if teacher is not None and teacher.api_key_secret_ref is not None:
        # The latency comparison calls the teacher the same way it calls the student.
        env.append(secret_env(TEACHER_API_KEY_ENV, teacher.api_key_secret_ref))
    container = {
        "name": "evaluate",
        "image": run.spec.training.image or settings.trainer_image,
        "command": stage_command("evaluate", settings),
        "env": env,
        "resources": stage_resources(run.spec.evaluation.resources, settings.evaluation_resources),
        "volumeMounts": volume_mounts(run, settings),
    }
    meta = metadata(run, EVAL, inputs=inputs, workload=True, settings=settings)
    return finish(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta,
            "spec": {
                "completions": 1,
                "parallelism": 1,
                "backoffLimit": 1,
                **active_deadline(run.spec.evaluation.deadline_seconds, settings.evaluate_deadline_seconds),
                "template": {
                    "metadata": {"labels": labels(run, EVAL)},
                    # On a ReadWriteOnce claim: on the node of the served student, which uses it too.
                    "spec": pod_spec(run, settings, [container], restart_policy="Never", component=EVAL),
                },
            },
        }
    )
