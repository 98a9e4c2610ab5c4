"""Invalid specs, table-driven: each is rejected with the right field path by the model, and by the CRD
(schema or CEL rule) wherever the API server can judge it itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from distillery_operator.validate import cel_errors, schema_errors, validate_document
from distillery_trainer.api import SpecError, parse_run

from tests.support.builders import DELETE, make_run

MODEL, CRD = "model", "crd"


@dataclass
class Case:
    id: str
    patch: dict[str, Any]
    path: str
    says: str = ""
    layers: set[str] = field(default_factory=lambda: {MODEL, CRD})
    base: str = "endpoint"  # or "selfHosted"


def S(patch: dict[str, Any]) -> dict[str, Any]:
    return {"spec": patch}


EP = "spec.teacher.endpoint"
CASES = [
    # required parts
    Case("missing-teacher", S({"teacher": DELETE}), "spec.teacher", "required"),
    Case("missing-student", S({"student": DELETE}), "spec.student", "required"),
    Case("missing-prompts", S({"data": {"prompts": DELETE}}), "spec.data.prompts", "required"),
    Case("missing-spec", {"spec": DELETE}, "spec", "required"),
    Case("missing-student-model", S({"student": {"model": DELETE}}), "spec.student.model", "required"),
    # the teacher
    Case("teacher-both", S({"teacher": {"selfHosted": {"model": "m"}}}), "spec.teacher", "exactly one"),
    Case("teacher-neither", S({"teacher": {"endpoint": DELETE}}), "spec.teacher", "exactly one"),
    Case(
        "inline-api-key", S({"teacher": {"endpoint": {"apiKey": "sk-live"}}}), f"{EP}.apiKey", "never inlined"
    ),
    Case(
        "inline-key-in-url",
        S({"teacher": {"endpoint": {"baseURL": "https://user:sk-live@api.example.com/v1"}}}),
        f"{EP}.baseURL",
        "inlined secret",
        {MODEL},
    ),
    Case("url-not-http", S({"teacher": {"endpoint": {"baseURL": "api.openai.com"}}}), f"{EP}.baseURL"),
    Case("empty-model", S({"teacher": {"endpoint": {"model": ""}}}), f"{EP}.model"),
    Case(
        "secret-name-invalid",
        S({"teacher": {"endpoint": {"apiKeySecretRef": {"name": "Open_AI"}}}}),
        f"{EP}.apiKeySecretRef.name",
    ),
    Case(
        "secret-ref-missing-key",
        S({"teacher": {"endpoint": {"apiKeySecretRef": {"key": DELETE}}}}),
        f"{EP}.apiKeySecretRef.key",
        "required",
    ),
    Case(
        "temperature-negative",
        S({"teacher": {"sampling": {"temperature": -0.1}}}),
        "spec.teacher.sampling.temperature",
        "greater than or equal to 0",
    ),
    Case(
        "temperature-string",
        S({"teacher": {"sampling": {"temperature": "hot"}}}),
        "spec.teacher.sampling.temperature",
        "number",
    ),
    Case(
        "max-tokens-zero", S({"teacher": {"sampling": {"maxTokens": 0}}}), "spec.teacher.sampling.maxTokens"
    ),
    Case("topk-zero", S({"teacher": {"logprobs": {"topK": 0}}}), "spec.teacher.logprobs.topK"),
    Case(
        "topk-over-openai-limit",
        S({"teacher": {"logprobs": {"topK": 50}}}),
        "spec.teacher.logprobs.topK",
        "at most 20",
        {MODEL},
    ),
    Case(
        "negative-price",
        S({"teacher": {"pricing": {"inputPerMTokUSD": -2.5}}}),
        "spec.teacher.pricing.inputPerMTokUSD",
    ),
    # unknown fields
    Case("unknown-spec-field", S({"trainng": {"method": "sft"}}), "spec.trainng", "unknown field"),
    Case(
        "unknown-nested-field",
        S({"training": {"kd": {"temprature": 4}}}),
        "spec.training.kd.temprature",
        "unknown field",
    ),
    # training
    Case("kd-black-box", S({"training": {"method": "kd"}}), "spec.training.method", "use sft or seqkd"),
    Case(
        "on-policy-black-box",
        S({"training": {"method": "onPolicy"}}),
        "spec.training.method",
        "a black-box API teacher cannot score them",
    ),
    Case(
        "on-policy-openai-teacher",
        S({"teacher": {"logprobs": {"topK": 5}}, "training": {"method": "onPolicy"}}),
        "spec.teacher.endpoint.baseURL",
        "does not return prompt logprobs",
        {MODEL},
    ),
    Case(
        "on-policy-greedy",
        S({"training": {"onPolicy": {"temperature": 0}}}),
        "spec.training.onPolicy.temperature",
    ),
    Case(
        "on-policy-lmbda-above-one",
        S({"training": {"onPolicy": {"lmbda": 1.5}}}),
        "spec.training.onPolicy.lmbda",
    ),
    Case(
        "on-policy-forward-kl",
        S({"training": {"onPolicy": {"divergence": "forwardKL"}}}),
        "spec.training.onPolicy.divergence",
    ),
    Case("kd-temperature-zero", S({"training": {"kd": {"temperature": 0}}}), "spec.training.kd.temperature"),
    Case("kd-alpha-zero", S({"training": {"kd": {"alpha": 0}}}), "spec.training.kd.alpha"),
    Case("kd-alpha-above-one", S({"training": {"kd": {"alpha": 1.5}}}), "spec.training.kd.alpha"),
    Case(
        "kd-divergence-unknown",
        S({"training": {"kd": {"divergence": "wasserstein"}}}),
        "spec.training.kd.divergence",
    ),
    Case(
        "kd-topk-source-without-logprobs",
        S({"training": {"method": "kd", "kd": {"source": "topk"}}}),
        "spec.training.kd.source",
        "teacher.logprobs",
        {MODEL},
        base="selfHosted",
    ),
    Case(
        "kd-online-with-api-teacher",
        S({"teacher": {"logprobs": {"topK": 5}}, "training": {"method": "kd", "kd": {"source": "online"}}}),
        "spec.training.kd.source",
        "selfHosted",
        {MODEL},
    ),
    Case("method-unknown", S({"training": {"method": "distill"}}), "spec.training.method"),
    Case(
        "seqkd-samples-greedy",
        S(
            {
                "teacher": {"sampling": {"temperature": 0}},
                "training": {"method": "seqkd", "seqkd": {"samples": 4}},
            }
        ),
        "spec.training.seqkd.samples",
        "identical",
        {MODEL},
    ),
    Case("learning-rate-zero", S({"training": {"learningRate": 0}}), "spec.training.learningRate"),
    Case(
        "negative-gpus",
        S({"training": {"resources": {"gpusPerNode": -1}}}),
        "spec.training.resources.gpusPerNode",
    ),
    Case("zero-nodes", S({"training": {"resources": {"nodes": 0}}}), "spec.training.resources.nodes"),
    Case("backend-unknown", S({"training": {"backend": "mpijob"}}), "spec.training.backend"),
    Case("lora-rank-zero", S({"student": {"lora": {"rank": 0}}}), "spec.student.lora.rank"),
    Case(
        "lora-with-fsdp",
        S({"student": {"lora": {"rank": 8}}, "training": {"strategy": "fsdp"}}),
        "spec.student.lora",
        "ddp",
        {MODEL},
    ),
    Case(
        "cpu-quantity-invalid", S({"training": {"resources": {"cpu": "lots"}}}), "spec.training.resources.cpu"
    ),
    # collection
    Case("zero-shards", S({"collection": {"shards": 0}}), "spec.collection.shards"),
    Case("shards-not-a-number", S({"collection": {"shards": "eight"}}), "spec.collection.shards"),
    Case("negative-concurrency", S({"collection": {"concurrency": -1}}), "spec.collection.concurrency"),
    Case(
        "parallelism-above-shards",
        S({"collection": {"shards": 2, "parallelism": 4}}),
        "spec.collection.parallelism",
        "cannot exceed",
        {MODEL},
    ),
    Case("negative-retries", S({"collection": {"maxRetries": -1}}), "spec.collection.maxRetries"),
    # data
    Case(
        "two-prompt-sources",
        S({"data": {"prompts": {"url": "https://example.com/p.jsonl"}}}),
        "spec.data.prompts",
        "exactly one",
    ),
    Case(
        "prompt-url-scheme",
        S({"data": {"prompts": {"pvcPath": DELETE, "url": "ftp://x/p.jsonl"}}}),
        "spec.data.prompts.url",
    ),
    Case("eval-fraction-zero", S({"data": {"evalFraction": 0}}), "spec.data.evalFraction"),
    Case("eval-fraction-one", S({"data": {"evalFraction": 1}}), "spec.data.evalFraction"),
    # serving, evaluation, cost, storage
    Case("zero-replicas", S({"serving": {"replicas": 0}}), "spec.serving.replicas"),
    Case(
        "retention-zero", S({"evaluation": {"minQualityRetention": 0}}), "spec.evaluation.minQualityRetention"
    ),
    Case(
        "retention-above-one",
        S({"evaluation": {"minQualityRetention": 1.2}}),
        "spec.evaluation.minQualityRetention",
    ),
    Case("metric-unknown", S({"evaluation": {"metrics": ["bleu"]}}), "spec.evaluation.metrics[0]"),
    Case(
        "metric-twice",
        S({"evaluation": {"metrics": ["rouge_l", "rouge_l"]}}),
        "spec.evaluation.metrics",
        "once",
        {MODEL},
    ),
    Case("load-zero-requests", S({"evaluation": {"load": {"requests": 0}}}), "spec.evaluation.load.requests"),
    Case("negative-gpu-price", S({"cost": {"gpuHourUSD": -1}}), "spec.cost.gpuHourUSD"),
    # Object storage does not work end to end yet: refused, with the way out, rather than failing later.
    Case(
        "storage-url-not-supported",
        S({"storage": {"url": "s3://b/p"}}),
        "spec.storage.url",
        "object storage is not supported yet: use storage.pvc",
    ),
    Case(
        "storage-both",
        S({"storage": {"pvc": {"claimName": "d"}, "url": "s3://b/p"}}),
        "spec.storage.url",
        "not supported yet",
    ),
    Case("storage-empty", S({"storage": {}}), "spec.storage.pvc", "storage.pvc"),
    # What the API server checks on the children, checked on the run: the field, not a stalled child.
    Case(
        "subpath-parent",
        S({"storage": {"pvc": {"claimName": "d", "subPath": "team-a/../../other"}}}),
        "spec.storage.pvc.subPath",
    ),
    Case(
        "subpath-absolute",
        S({"storage": {"pvc": {"claimName": "d", "subPath": "/etc"}}}),
        "spec.storage.pvc.subPath",
    ),
    Case(
        "subpath-only-parent",
        S({"storage": {"pvc": {"claimName": "d", "subPath": ".."}}}),
        "spec.storage.pvc.subPath",
    ),
    Case("queue-name-invalid", S({"scheduling": {"queueName": "Team_A"}}), "spec.scheduling.queueName"),
    Case("queue-name-too-long", S({"scheduling": {"queueName": "q" * 64}}), "spec.scheduling.queueName"),
    Case(
        "priority-class-invalid",
        S({"scheduling": {"priorityClassName": "High Priority"}}),
        "spec.scheduling.priorityClassName",
    ),
    Case(
        "node-selector-key",
        S({"scheduling": {"nodeSelector": {"gpu type": "a100"}}}),
        "spec.scheduling.nodeSelector",
        "gpu type",
    ),
    Case(
        "node-selector-key-prefix",
        S({"scheduling": {"nodeSelector": {"Example.com/pool": "a"}}}),
        "spec.scheduling.nodeSelector",
        "Example.com/pool",
    ),
    Case(
        "node-selector-value",
        S({"scheduling": {"nodeSelector": {"pool": "a100 80g"}}}),
        "spec.scheduling.nodeSelector.pool",
    ),
    Case(
        "node-selector-value-too-long",
        S({"scheduling": {"nodeSelector": {"pool": "a" * 64}}}),
        "spec.scheduling.nodeSelector.pool",
    ),
    Case(
        "toleration-key",
        S({"scheduling": {"tolerations": [{"key": "gpu/type/a", "operator": "Exists"}]}}),
        "spec.scheduling.tolerations[0].key",
    ),
    Case(
        "gpu-resource-unqualified",
        S({"training": {"resources": {"gpuResource": "gpu"}}}),
        "spec.training.resources.gpuResource",
    ),
    Case(
        "gpu-resource-invalid",
        S({"training": {"resources": {"gpuResource": "nvidia.com/gpu 80g"}}}),
        "spec.training.resources.gpuResource",
    ),
    Case(
        "pvc-rwo-multi-node",
        S(
            {
                "storage": {
                    "pvc": {"claimName": "d", "create": {"size": "1Ti", "accessModes": ["ReadWriteOnce"]}}
                },
                "training": {"resources": {"nodes": 2}},
            }
        ),
        "spec.storage.pvc.create.accessModes",
        "use accessModes [ReadWriteMany]",
    ),
    Case(
        "pvc-create-without-size",
        S({"storage": {"pvc": {"claimName": "d", "create": {}}}}),
        "spec.storage.pvc.create.size",
        "required",
    ),
    Case(
        "pvc-size-zero",
        S({"storage": {"pvc": {"claimName": "d", "create": {"size": "0Gi"}}}}),
        "spec.storage.pvc.create.size",
        "above zero",
        {MODEL},
    ),
    Case(
        "pvc-read-only-mode",
        S(
            {
                "storage": {
                    "pvc": {"claimName": "d", "create": {"size": "1Ti", "accessModes": ["ReadOnlyMany"]}}
                }
            }
        ),
        "spec.storage.pvc.create.accessModes[0]",
    ),
    Case(
        "toleration-effect",
        S({"scheduling": {"tolerations": [{"key": "gpu", "effect": "Sometimes"}]}}),
        "spec.scheduling.tolerations[0].effect",
    ),
    # the object
    Case("name-invalid", {"metadata": {"name": "Bad_Name"}}, "metadata.name", "", {MODEL}),
    # (the API server refuses a wrong apiVersion by routing, not by the schema)
    Case("wrong-api-version", {"apiVersion": "distillery.dev/v1"}, "apiVersion", "", {MODEL}),
]


def _doc(case: Case) -> dict[str, Any]:
    b = make_run()
    if case.base == "selfHosted":
        b.self_hosted()
    return b.patch(case.patch).obj()


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_spec_rejected_with_its_path(case: Case) -> None:
    doc = _doc(case)
    report = validate_document(doc)
    assert not report.ok
    paths = {p for p, _ in report.errors}
    assert case.path in paths, report.errors
    msgs = " | ".join(m for p, m in report.errors if p == case.path)
    assert case.says.lower() in msgs.lower(), msgs

    if MODEL in case.layers:
        with pytest.raises(SpecError) as err:
            parse_run(doc)
        assert case.path in {p for p, _ in err.value.errors}, err.value.errors
    if CRD in case.layers:
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
    rules = pvc["properties"]["create"]["x-kubernetes-validations"]
    assert [r["rule"] for r in rules] == ["self == oldSelf"] and "resize the claim" in rules[0]["message"]
