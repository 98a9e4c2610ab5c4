"""Offline validation of a DistillationRun, as the API server and the operator would judge it.

Three layers, all with field paths:

1. the CRD's ``openAPIV3Schema`` (what the API server checks: types, ranges, patterns, required fields,
   unknown fields under strict field validation), via ``jsonschema``;
2. the CRD's CEL rules (``x-kubernetes-validations``; transition rules on ``oldSelf`` are skipped: a file
   is a create), via ``cel-python``;
3. the pydantic model (what the operator and the stages check, cross-field rules included);
4. for a cluster run (``--target cluster``, the default), what the operator refuses of a run the model
   accepts because ``distillery run`` on one machine can run it (:func:`cluster_problems`: no
   ``spec.storage``, ``pkg://`` models); ``--target local`` leaves them out;
5. with chart values (``--policy values.yaml``), the platform's policy (:mod:`.policy`), which the
   operator checks otherwise only in the cluster.

The model's messages are the ones shown (they name the fix); a schema or CEL error on a path the model
accepted is shown too, marked with where it came from, since it means the CRD and the model disagree.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from distillery_trainer.api.base import API_GROUP, API_VERSION, KIND, join_path
from distillery_trainer.api.resource import DistillationRun, SpecError, load_documents, parse_run
from distillery_trainer.api.validation import cluster_problems

from .crd import openapi_schema
from .policy import settings_from_values, violations
from .settings import Settings

Error = tuple[str, str]
CLUSTER, LOCAL = "cluster", "local"
TARGETS = (CLUSTER, LOCAL)
CLUSTER_ONLY = " (cluster run)"


# ---------------------------------------------------------------------------------------------- schema


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) → JSON Schema Draft 4, strict about unknown fields."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = _to_json_schema(copy.deepcopy(openapi_schema()))
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[Error]:
    out: list[Error] = []
    for err in _validator().iter_errors(doc):
        path = list(err.absolute_path)
        msg = err.message
        if err.validator == "required":
            missing = msg.split("'")[1] if "'" in msg else ""
            path, msg = [*path, missing], "required field is missing"
        elif err.validator == "additionalProperties":
            extra = [p for p in (err.instance or {}) if p not in (err.schema.get("properties") or {})]
            for name in extra:
                out.append((join_path([*path, name]), "unknown field"))
            continue
        out.append((join_path(path), msg))
    return out


# ---------------------------------------------------------------------------------------------- CEL


@functools.cache
def _program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _to_cel(schema: dict[str, Any], value: Any) -> Any:
    """A decoded value as the API server hands it to CEL: typed by the schema, so a ``type: number`` field
    written as ``0`` is the double 0.0 there (a rule compares it with ``0.0``), not the integer 0."""
    import celpy
    from celpy import celtypes

    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): _to_cel(props.get(k, extra if isinstance(extra, dict) else {}), v)
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return celtypes.ListType([_to_cel(items, v) for v in value])
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return celtypes.DoubleType(value)
    return celpy.json_to_cel(value)


def _walk_rules(schema: dict[str, Any], value: Any, path: list[str | int]) -> Iterable[Error]:
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        try:
            ok = _program(rule["rule"]).evaluate({"self": _to_cel(schema, value)})
        except Exception as exc:  # a rule that cannot evaluate is what the API server reports, too
            yield join_path(path), f"rule {rule['rule']!r} could not be evaluated: {exc}"
            continue
        if not bool(ok):
            extra = [p for p in rule.get("fieldPath", "").split(".") if p]
            if not path and not extra and "self.metadata.name" in rule["rule"]:
                extra = ["metadata", "name"]  # a root rule on the run's name
            yield join_path([*path, *extra]), rule["message"]
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                yield from _walk_rules(sub, value[name], [*path, name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _walk_rules(schema["items"], item, [*path, i])


def cel_errors(doc: dict[str, Any]) -> list[Error]:
    return list(_walk_rules(openapi_schema(), doc, []))


# ---------------------------------------------------------------------------------------------- together


@dataclass
class Report:
    source: str
    run: DistillationRun | None = None
    errors: list[Error] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_document(
    doc: Any, source: str = "", policy: Settings | None = None, target: str = CLUSTER
) -> Report:
    report = Report(source)
    if not isinstance(doc, dict):
        report.errors.append(("", "expected a Kubernetes object (a YAML mapping)"))
        return report
    want = f"{API_GROUP}/{API_VERSION}"
    if doc.get("apiVersion") != want:
        report.errors.append(("apiVersion", f"must be {want}"))
    if doc.get("kind") != KIND:
        report.errors.append(("kind", f"must be {KIND}"))

    model_errs: list[Error] = []
    try:
        report.run = parse_run(doc, source)
    except SpecError as exc:
        model_errs = exc.errors
    seen = {p for p, _ in model_errs}
    crd_errs = [
        (p, f"{m} (CRD schema)")
        for p, m in schema_errors(doc)
        if p not in seen and p not in ("apiVersion", "kind")
    ]
    cel_errs = [(p, f"{m} (CRD rule)") for p, m in cel_errors(doc) if p not in seen]
    for err in [*model_errs, *crd_errs, *cel_errs]:
        if err not in report.errors:
            report.errors.append(err)
    if target == CLUSTER and report.run is not None:
        report.errors += [(p, m + CLUSTER_ONLY) for p, m in cluster_problems(report.run.spec)]
    if policy is not None and report.run is not None:
        report.errors += [(p, f"{m} (policy)") for p, m in violations(report.run.spec, policy)]
    return report


def policy_settings(values_file: str | Path) -> Settings:
    """The operator's settings a chart installed with this values file gives it (its policy)."""
    values = yaml.safe_load(Path(values_file).read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError("expected the chart's values (a YAML mapping with policy: ...)")
    return settings_from_values(values)


def validate_file(path: str | Path, policy: Settings | None = None, target: str = CLUSTER) -> list[Report]:
    """Every document's report. Raises :class:`~distillery_trainer.api.resource.YamlSyntaxError` when the
    file is not YAML (one line: the file, the line and column, the problem)."""
    reports = [validate_document(doc, f"{path}#{i}", policy, target) for i, doc in load_documents(path)]
    if not reports:
        reports.append(Report(str(path), errors=[("", "no YAML documents in the file")]))
    return reports


def summary(run: DistillationRun) -> str:
    spec = run.spec
    t = spec.teacher
    teacher = (
        f"{t.endpoint.model} via {t.endpoint.base_url}"
        if t.endpoint
        else f"self-hosted {t.self_hosted.model}"  # type: ignore[union-attr]
    )
    method = spec.training.method + (" + dpo" if spec.training.dpo.enabled else "")
    res = spec.training.resources
    gpus = res.nodes * res.gpus_per_node
    return (
        f"DistillationRun {run.metadata.name} is valid: teacher {teacher} -> student {spec.student.model}, "
        f"{method}, {f'{gpus} GPU' + ('s' if gpus != 1 else '') if gpus else 'on the CPU'}, "
        f"gate {spec.evaluation.min_quality_retention:.0%}"
    )
