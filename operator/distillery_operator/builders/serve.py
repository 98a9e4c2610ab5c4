"""Stage 3: the student's vLLM OpenAI-compatible server, a Deployment and a Service.

The command line comes from :class:`distillery_trainer.serve.VllmServer`, the one builder the local
launcher uses too. Readiness and liveness probe ``/health``; a long startup probe covers weight loading.
"""

from __future__ import annotations

from typing import Any

from distillery_trainer.serve import VLLM_PORT, VllmServer

from ..settings import Settings
from .common import (
    SERVE,
    Run,
    artifacts_root,
    base_env,
    finish,
    hf_token_env,
    labels,
    metadata,
    pod_spec,
    selector,
    stage_resources,
    volume_mounts,
)

PROBE_PERIOD = 10
# What the Deployment's progress deadline allows beyond the startup probe's budget: scheduling and
# pulling the image (a vLLM image is ~10 GB) happen before the probe starts counting.
PROGRESS_MARGIN_SECONDS = 600


def startup_budget(startup_probe: dict[str, Any]) -> int:
    """The longest a container may take to start before its startup probe gives up, in seconds."""
    return int(
        startup_probe.get("initialDelaySeconds", 0)
        + startup_probe["failureThreshold"] * startup_probe.get("periodSeconds", 10)
    )


def student_server(run: Run, settings: Settings) -> VllmServer:
    model = f"{artifacts_root(run, settings)}/student"
    serving = run.spec.serving
    return VllmServer.for_student(serving, model, run.name, gpu=serving.gpus > 0)


def vllm_deployment(
    run: Run,
    settings: Settings,
    component: str,
    server: VllmServer,
    *,
    replicas: int,
    gpus: int,
    image: str,
    inputs: str | None,
) -> dict[str, Any]:
    gpu_resource = run.spec.training.resources.gpu_resource or settings.gpu_resource
    serving = run.spec.serving
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": PROBE_PERIOD}
    startup = {**probe, "failureThreshold": max(1, settings.startup_seconds // PROBE_PERIOD)}
    container = {
        "name": "vllm",
        "image": image,
        "command": server.command(),
        "args": server.args(),
        # A hub model (or the hub tokenizer of a student's base) may be gated: the token, when the run has one.
        "env": base_env(run, settings) + hf_token_env(run),
        "ports": [{"name": "http", "containerPort": server.port, "protocol": "TCP"}],
        "resources": stage_resources(
            serving.resources, settings.vllm_resources, gpus=gpus, gpu_resource=gpu_resource
        ),
        "volumeMounts": volume_mounts(run, settings, shm=True, config=False),
        "startupProbe": startup,
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 6},
    }
    meta = metadata(run, component, inputs=inputs, workload=True, settings=settings)
    return finish(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": replicas,
                # Kubernetes' default (600 s) would give up while the startup probe still waits for
                # the weights (settings.startup_seconds, 1800 s by default): the planner would fail
                # the stage of a server that was about to become ready.
                "progressDeadlineSeconds": startup_budget(startup) + PROGRESS_MARGIN_SECONDS,
                "selector": {"matchLabels": selector(run, component)},
                # GPUs are scarce: replace a replica rather than surge past the quota.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "template": {
                    "metadata": {"labels": labels(run, component)},
                    "spec": pod_spec(
                        run,
                        settings,
                        [container],
                        restart_policy="Always",
                        shm=True,
                        shm_size=serving.shm_size,
                        config=False,
                        component=component,
                    ),
                },
            },
        }
    )


def vllm_service(run: Run, settings: Settings, component: str) -> dict[str, Any]:
    return finish(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(run, component, settings=settings),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(run, component),
                "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    )


def serve_deployment(run: Run, settings: Settings, inputs: str, *, replicas: int) -> dict[str, Any]:
    serving = run.spec.serving
    return vllm_deployment(
        run,
        settings,
        SERVE,
        student_server(run, settings),
        replicas=replicas,
        gpus=serving.gpus,
        image=serving.image or settings.vllm_image,
        inputs=inputs,
    )


def serve_service(run: Run, settings: Settings) -> dict[str, Any]:
    return vllm_service(run, settings, SERVE)
