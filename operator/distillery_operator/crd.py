"""The DistillationRun CRD, generated from the pydantic model (one source of truth).

``distillery crd`` prints it; ``crds/distillery.dev_distillationruns.yaml`` holds it; a test fails when the
two drift. The schema is structural, as the API server demands: every ``$ref`` inlined, ``Optional[X]``
as ``X`` with ``nullable``, no ``anyOf`` of types, no ``additionalProperties: false`` beside
``properties`` (the API server prunes and, with strict field validation, rejects unknown fields).
Defaults are not put in the schema (the model fills them, so the operator and the local executor agree);
each field's description names its default instead.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml
from distillery_trainer.api import base
from distillery_trainer.api.names import RUN_NAME_RULES
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.status import DistillationRunStatus

CRD_NAME = f"{base.PLURAL}.{base.API_GROUP}"
CRD_FILE = f"{base.API_GROUP}_{base.PLURAL}.yaml"

_DROP = {"title", "default", "examples", "$defs", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline ``$ref``s and turn pydantic's JSON Schema (2020-12) into Kubernetes' OpenAPI v3 subset."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref").split("/")[-1]
        target = copy.deepcopy(defs[ref])
        target.update({k: v for k, v in node.items() if k == "description"})
        node = {**{k: v for k, v in node.items() if k != "description"}, **target}
    default = node.get("default", _MISSING)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "anyOf":
            branches = [b for b in value if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"a union of several types cannot go in a structural schema: {value}")
            resolved = _resolve(branches[0], defs)
            # The branch's own description yields to the field's.
            resolved.pop("description", None) if "description" in node else None
            out.update(resolved)
            out["nullable"] = True
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "properties":
            out[key] = {k: _resolve(v, defs) for k, v in value.items()}
            continue
        out[key] = _resolve(value, defs)
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if default is not _MISSING and default not in (None, [], {}) and "description" in out:
        out["description"] = out["description"].rstrip(".") + f". Default: {json.dumps(default)}."
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    first = [k for k in _ORDER if k in out]
    return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in _ORDER}}


_ORDER = ("type", "description", "nullable", "required")


_MISSING = object()


def model_schema(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _resolve(raw, raw.get("$defs", {}))
    assert isinstance(schema, dict)
    return schema


def openapi_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the CRD's one version."""
    status = model_schema(DistillationRunStatus)
    # kopf keeps its own bookkeeping under status.kopf.
    status["properties"]["kopf"] = {
        "type": "object",
        "description": "Operator bookkeeping (kopf).",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    return {
        "type": "object",
        "description": "A knowledge-distillation run: teacher outputs, a trained student, its serving and verdict.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(DistillationRunSpec),
            "status": status,
        },
        # A root rule may read self.metadata.name: the run's name, one rule with the model and the operator.
        "x-kubernetes-validations": copy.deepcopy(RUN_NAME_RULES),
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the run is."},
    {
        "name": "Retention",
        "type": "number",
        "jsonPath": ".status.results.qualityRetention",
        "description": "Student score / teacher score.",
    },
    {
        "name": "P95",
        "type": "number",
        "jsonPath": ".status.results.latencyMs.p95",
        "description": "The student's p95 latency, ms.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "distillery", "app.kubernetes.io/part-of": "distillery"},
        },
        "spec": {
            "group": base.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": base.KIND,
                "listKind": f"{base.KIND}List",
                "plural": base.PLURAL,
                "singular": base.SINGULAR,
                "shortNames": list(base.SHORT_NAMES),
                "categories": list(base.CATEGORIES),
            },
            "versions": [
                {
                    "name": base.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `distillery crd` from the DistillationRun model. Do not edit: change the model.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
