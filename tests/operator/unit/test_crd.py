"""The CRD is generated from the model, is structural, passes the official schemas, and stays in sync."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from distillery_operator.crd import CRD_FILE, build_crd, openapi_schema, render_crd

from tests.conftest import REPO

CHECKED_IN = REPO / "crds" / CRD_FILE


def test_checked_in_crd_matches_the_model() -> None:
    assert CHECKED_IN.read_text() == render_crd(), (
        "crds/ drifted from the model: run `distillery crd -o crds/distillery.dev_distillationruns.yaml`"
    )


@pytest.mark.parametrize("version", ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37"])
def test_crd_passes_kubernetes_validate_strict(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(CHECKED_IN.read_text()), version, strict=True)


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Violations of the API server's structural-schema rules under ``node``."""
    bad: list[str] = []
    for key in ("$ref", "anyOf", "oneOf", "allOf", "not", "definitions", "$defs", "title"):
        if key in node:
            bad.append(f"{path}: {key}")
    if (
        "type" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and not node.get("x-kubernetes-int-or-string")
    ):
        bad.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        bad.append(f"{path}: properties and additionalProperties together")
    if node.get("type") == "object" and not (
        "properties" in node
        or "additionalProperties" in node
        or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        bad.append(f"{path}: object with no fields declared")
    for name, sub in (node.get("properties") or {}).items():
        bad += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        bad += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        bad += _walk(node["additionalProperties"], f"{path}{{}}")
    return bad


def test_schema_is_structural() -> None:
    schema = openapi_schema()
    assert _walk(schema["properties"]["spec"], "spec") == []
    assert _walk(schema["properties"]["status"], "status") == []


def test_crd_shape() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "distillationruns.distillery.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["shortNames"], names["categories"]) == (
        "DistillationRun",
        ["drun"],
        ["distillery"],
    )
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    cols = [c["name"] for c in version["additionalPrinterColumns"]]
    assert cols == ["Phase", "Retention", "P95", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["teacher", "student", "data"]
    # Every field is documented, and defaults are named in the descriptions.
    assert (
        "Default: 4.0"
        in spec["properties"]["training"]["properties"]["kd"]["properties"]["temperature"]["description"]
    )
    # Status declares what the operator writes, so the API server keeps it.
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for key in (
        "phase",
        "observedGeneration",
        "conditions",
        "collection",
        "training",
        "results",
        "endpoint",
        "kopf",
    ):
        assert key in status
    assert set(status["results"]["properties"]["cost"]["properties"]) >= {
        "collectionUSD",
        "trainingUSD",
        "servingUSDPerMonth",
        "teacherUSDPerMonth",
    }


def _descriptions(node: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, sub in (node.get("properties") or {}).items():
        if not sub.get("description"):
            missing.append(f"{path}.{name}")
        missing += _descriptions(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        missing += _descriptions(node["items"], f"{path}[]")
    return missing


def test_every_spec_field_is_described() -> None:
    spec = openapi_schema()["properties"]["spec"]
    undocumented = [p for p in _descriptions(spec, "spec") if ".tolerations[]." not in p]
    assert undocumented == []


def test_immutable_fields_carry_transition_rules() -> None:
    spec = openapi_schema()["properties"]["spec"]["properties"]
    for name in ("teacher", "data"):
        rules = [r["rule"] for r in spec[name].get("x-kubernetes-validations", [])]
        assert "self == oldSelf" in rules, name
