"""The config every stage pod (and the local executor's processes) reads: the run's spec plus where things are.

The operator renders it into the run's ConfigMap (``<run>-config``, key ``stage.yaml``); the local executor
writes the same file into the run's directory. Secrets are never in it: API keys arrive as environment
variables (``DISTILLERY_TEACHER_API_KEY``, ``DISTILLERY_JUDGE_API_KEY``) from ``secretKeyRef``s, or,
for `distillery run`, from the variable the spec's ``apiKeyEnv`` names.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from .base import ApiModel, format_errors
from .resource import SpecError
from .spec import DistillationRunSpec, Endpoint

TEACHER_API_KEY_ENV = "DISTILLERY_TEACHER_API_KEY"
JUDGE_API_KEY_ENV = "DISTILLERY_JUDGE_API_KEY"
CONFIG_KEY = "stage.yaml"


class RunRef(ApiModel):
    name: str
    namespace: str = "default"
    uid: str | None = None


class ServedModel(ApiModel):
    """An OpenAI-compatible endpoint resolved for this run (a Service in the cluster, a local port)."""

    base_url: str = Field(alias="baseURL")
    model: str


class StageConfig(ApiModel):
    run: RunRef
    spec: DistillationRunSpec
    artifacts: str = Field(description="Root of this run's artifacts: a directory (volume mount) or URL.")
    cache_dir: str | None = Field(default=None, description="Teacher-answer cache shared across runs.")
    teacher: ServedModel | None = Field(
        default=None,
        description="The teacher to call: the spec's endpoint, or the self-hosted teacher's server.",
    )
    student: ServedModel | None = Field(default=None, description="The served student (evaluation).")

    def teacher_endpoint(self) -> ServedModel:
        if self.teacher is not None:
            return self.teacher
        ep = self.spec.teacher.endpoint
        if ep is None:
            raise ValueError("the self-hosted teacher has no resolved endpoint in the stage config")
        return ServedModel(base_url=ep.base_url, model=ep.model)

    def teacher_api_key(self) -> str:
        return api_key(self.spec.teacher.endpoint, TEACHER_API_KEY_ENV)

    def judge_api_key(self) -> str:
        judge = self.spec.evaluation.judge
        return api_key(judge.endpoint if judge else None, JUDGE_API_KEY_ENV)

    def dump(self) -> str:
        # libyaml's emitter when PyYAML has it: the same text, ~7x faster (the operator renders one per run).
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return yaml.dump(self.to_dict(), Dumper=dumper, sort_keys=False)


def api_key(endpoint: Endpoint | None, pod_env: str) -> str:
    """The key from the pod's env var, else the spec's ``apiKeyEnv``; "EMPTY" for servers that need none."""
    if os.environ.get(pod_env):
        return os.environ[pod_env]
    if endpoint is not None and endpoint.api_key_env and os.environ.get(endpoint.api_key_env):
        return os.environ[endpoint.api_key_env]
    return "EMPTY"


def load_stage_config(path: str | Path) -> StageConfig:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    try:
        return StageConfig.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc), str(path)) from None
