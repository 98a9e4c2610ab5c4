"""The DistillationRun API: one pydantic model for the CRD, the operator, the local executor and the stages.

Imports no torch. camelCase on the wire (YAML, the CRD), snake_case in Python, unknown fields rejected.
"""

from .base import API_GROUP, API_VERSION, KIND, PLURAL, ApiModel, RuleViolations, format_errors
from .resource import (
    API_GROUP_VERSION,
    DistillationRun,
    ObjectMeta,
    SpecError,
    dump_yaml,
    load_run,
    parse_run,
)
from .spec import DistillationRunSpec
from .stage import StageConfig, load_stage_config
from .status import DistillationRunStatus

__all__ = [
    "API_GROUP",
    "API_GROUP_VERSION",
    "API_VERSION",
    "KIND",
    "PLURAL",
    "ApiModel",
    "DistillationRun",
    "DistillationRunSpec",
    "DistillationRunStatus",
    "ObjectMeta",
    "RuleViolations",
    "SpecError",
    "StageConfig",
    "dump_yaml",
    "format_errors",
    "load_run",
    "load_stage_config",
    "parse_run",
]
