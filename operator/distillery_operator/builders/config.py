"""The run's ConfigMap: the stage config every pod reads (``--config /etc/distillery/stage.yaml``).

It holds the whole spec plus where things are: the artifacts root on the volume, the cache, and the
resolved teacher and student endpoints. Never a secret: API keys reach pods as ``secretKeyRef`` env vars.
"""

from __future__ import annotations

import functools
from typing import Any

from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stage import RunRef, ServedModel, StageConfig

from ..settings import Settings
from .common import CONFIG, CONFIG_FILE, SERVE, TEACHER, Run, artifacts_root, cache_root, finish, metadata

TEACHER_SERVED_NAME = "teacher"


def teacher_endpoint(run: Run) -> ServedModel:
    endpoint = run.spec.teacher.endpoint
    if endpoint is not None:
        return ServedModel(base_url=endpoint.base_url, model=endpoint.model)
    return ServedModel(base_url=run.service_url(TEACHER), model=TEACHER_SERVED_NAME)


def student_endpoint(run: Run) -> ServedModel:
    return ServedModel(base_url=run.service_url(SERVE), model=run.name)


def stage_config(run: Run, settings: Settings) -> StageConfig:
    return StageConfig(
        run=RunRef(name=run.name, namespace=run.namespace, uid=run.uid),
        spec=run.spec,
        artifacts=artifacts_root(run, settings),
        cache_dir=cache_root(run, settings),
        teacher=teacher_endpoint(run),
        student=student_endpoint(run),
    )


def config_map(run: Run, settings: Settings) -> dict[str, Any]:
    return finish(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(run, CONFIG, settings=settings),
            "data": {
                CONFIG_FILE: _rendered(
                    run.name, run.namespace, run.uid, run.spec.model_dump_json(), settings.data_mount
                )
            },
        }
    )


@functools.lru_cache(maxsize=512)
def _rendered(name: str, namespace: str, uid: str, spec_json: str, data_mount: str) -> str:
    """The stage config's YAML: PyYAML's emitter costs ~20 ms a run, and a run is planned on every event
    of any of its children, while its spec changes rarely."""
    spec = DistillationRunSpec.model_validate_json(spec_json)
    return stage_config(Run(name, namespace, uid, spec), Settings(data_mount=data_mount)).dump()
