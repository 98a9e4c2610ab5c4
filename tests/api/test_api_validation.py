"""Invalid specs, table-driven (the suite's one table: :mod:`tests.support.invalid_runs`): each is rejected
with the right field path by ``distillery validate`` and the model; ``test_crd_parity.py`` holds the CRD
(schema and CEL rules) to the same table."""

from __future__ import annotations

import pytest
from distillery_operator.validate import cel_errors, schema_errors, validate_document
from distillery_trainer.api import SpecError, parse_run

from tests.support.builders import make_run
from tests.support.invalid_runs import CASES, OPERATOR_SIDE, Case


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_spec_rejected_with_its_path(case: Case) -> None:
    doc = case.doc()
    report = validate_document(doc)
    assert not report.ok
    paths = {p for p, _ in report.errors}
    assert case.path in paths, report.errors
    msgs = " | ".join(m for p, m in report.errors if p == case.path)
    assert case.says.lower() in msgs.lower(), msgs

    with pytest.raises(SpecError) as err:
        parse_run(doc)
    assert case.path in {p for p, _ in err.value.errors}, err.value.errors
    if case.id not in OPERATOR_SIDE:
        crd_paths = {p for p, _ in schema_errors(doc)} | {p for p, _ in cel_errors(doc)}
        assert case.path in crd_paths, (schema_errors(doc), cel_errors(doc))


def test_cel_rules_and_model_agree_on_cross_field_rules() -> None:
    """The rules both layers judge: each side accepts the valid variant and rejects the invalid one."""
    valid = [
        make_run().obj(),
        make_run().kd().obj(),
        make_run().self_hosted().spec({"training": {"method": "kd"}}).obj(),
        make_run().storage().obj(),
        make_run().self_hosted().spec({"training": {"method": "onPolicy"}}).obj(),
        make_run()
        .spec(
            {
                "teacher": {"endpoint": {"baseURL": "http://vllm.example:8000/v1"}, "logprobs": {"topK": 20}},
                "training": {"method": "onPolicy", "onPolicy": {"divergence": "jsd", "topK": 50}},
            }
        )
        .obj(),
        # Several training nodes: ReadWriteMany asked for, or left to the default (which is ReadWriteMany).
        make_run()
        .spec(
            {
                "storage": {
                    "pvc": {"claimName": "d", "create": {"size": "1Ti", "accessModes": ["ReadWriteMany"]}}
                },
                "training": {"resources": {"nodes": 2}},
            }
        )
        .obj(),
        make_run()
        .spec(
            {
                "storage": {"pvc": {"claimName": "d", "create": {"size": "1Ti"}}},
                "training": {"resources": {"nodes": 4}},
            }
        )
        .obj(),
    ]
    for doc in valid:
        assert cel_errors(doc) == [], cel_errors(doc)
        assert schema_errors(doc) == [], schema_errors(doc)
        parse_run(doc)


FIELDS_THE_API_SERVER_CHECKS = {
    "scheduling": {
        "queueName": "team-a.gpu",
        "priorityClassName": "batch-high",
        "nodeSelector": {"kubernetes.io/arch": "amd64", "pool": "", "nvidia.com/gpu.product": "H100_80GB"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"operator": "Exists"},
        ],
    },
    "training": {"resources": {"gpuResource": "amd.com/gpu"}},
}


@pytest.mark.parametrize("sub_path", ["team-a", "team-a/runs/", "./x", "..data/x", "a..b", "a/./b"])
def test_values_the_api_server_accepts_pass_every_layer(sub_path: str) -> None:
    doc = (
        make_run()
        .spec(FIELDS_THE_API_SERVER_CHECKS)
        .spec({"storage": {"pvc": {"claimName": "d", "subPath": sub_path}}})
        .obj()
    )
    assert validate_document(doc).errors == []


def test_all_errors_reported_at_once() -> None:
    doc = (
        make_run()
        .spec(
            {
                "collection": {"shards": 0},
                "evaluation": {"minQualityRetention": 2},
                "teacher": {"pricing": {"outputPerMTokUSD": -1}},
            }
        )
        .obj()
    )
    paths = {p for p, _ in validate_document(doc).errors}
    assert {
        "spec.collection.shards",
        "spec.evaluation.minQualityRetention",
        "spec.teacher.pricing.outputPerMTokUSD",
    } <= paths


def test_a_created_claim_is_immutable_in_the_crd() -> None:
    from distillery_operator.crd import openapi_schema

    pvc = openapi_schema()["properties"]["spec"]["properties"]["storage"]["properties"]["pvc"]
    rules = [r for r in pvc["properties"]["create"]["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert [r["rule"] for r in rules] == ["self == oldSelf"] and "resize the claim" in rules[0]["message"]
