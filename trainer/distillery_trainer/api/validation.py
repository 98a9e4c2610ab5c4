"""Cross-field rules of a DistillationRunSpec, each naming the field and the fix.

Single-field rules (ranges, patterns, enums) live on the fields themselves and reach the CRD schema;
the rules here need several fields. Those the API server can evaluate are also CEL rules on the types
(see ``spec.py``); the tests check that both reject the same specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .base import Rules

if TYPE_CHECKING:
    from .spec import DistillationRunSpec

OPENAI_MAX_TOP_LOGPROBS = 20
MULTI_NODE_RWO = (
    "training on several nodes mounts the volume on all of them at once, which ReadWriteOnce does not allow: "
    "use accessModes [ReadWriteMany] (a StorageClass that offers it: NFS, CephFS, Filestore, EFS, Azure Files) "
    "or set training.resources.nodes: 1"
)
ON_POLICY_BLACK_BOX = (
    "onPolicy needs the teacher's log-probabilities of the student's own samples (vLLM's prompt_logprobs): "
    "use teacher.selfHosted, or a vLLM teacher.endpoint with teacher.logprobs.topK set; a black-box API "
    "teacher cannot score them: use sft or seqkd"
)
ON_POLICY_OPENAI = (
    "the OpenAI API does not return prompt logprobs, which training.method onPolicy needs to score the "
    "student's samples: serve the teacher with vLLM (teacher.selfHosted, or a vLLM endpoint), or use sft, "
    "seqkd or kd"
)


def check_spec(spec: DistillationRunSpec) -> None:
    rules = Rules()
    teacher, training = spec.teacher, spec.training

    if training.method == "kd" and not teacher.white_box:
        rules.fail(
            "training.method",
            "kd needs the teacher's token logprobs: set teacher.logprobs.topK (an endpoint that returns "
            "logprobs, such as vLLM) or use teacher.selfHosted; for a black-box API teacher use sft or seqkd",
        )
    if training.method == "kd" and training.kd.source == "topk" and teacher.logprobs is None:
        rules.fail("training.kd.source", "topk needs teacher.logprobs.topK set, or use source: online")
    if training.method == "kd" and training.kd.source == "online" and teacher.self_hosted is None:
        rules.fail(
            "training.kd.source",
            "online runs the teacher model on the training ranks and needs teacher.selfHosted; "
            "with an API teacher use source: topk and teacher.logprobs",
        )
    if training.method == "onPolicy" and not teacher.white_box:
        rules.fail("training.method", ON_POLICY_BLACK_BOX)
    elif training.method == "onPolicy" and teacher.endpoint is not None:
        host = urlparse(teacher.endpoint.base_url).hostname or ""
        if host.endswith("openai.com"):
            rules.fail("teacher.endpoint.baseURL", ON_POLICY_OPENAI)
    if training.method == "seqkd" and training.seqkd.samples > 1 and teacher.sampling.temperature == 0:
        rules.fail(
            "training.seqkd.samples",
            "several samples at temperature 0 are identical: set teacher.sampling.temperature > 0 or samples: 1",
        )

    if teacher.logprobs and teacher.endpoint:
        host = urlparse(teacher.endpoint.base_url).hostname or ""
        if host.endswith("openai.com") and teacher.logprobs.top_k > OPENAI_MAX_TOP_LOGPROBS:
            rules.fail(
                "teacher.logprobs.topK",
                f"the OpenAI API returns at most {OPENAI_MAX_TOP_LOGPROBS} top logprobs: set topK <= 20",
            )

    if spec.collection.parallelism is not None and spec.collection.parallelism > spec.collection.shards:
        rules.fail("collection.parallelism", "cannot exceed collection.shards: lower it or add shards")

    create = spec.storage.pvc.create if spec.storage is not None and spec.storage.pvc is not None else None
    if (
        create is not None
        and create.access_modes
        and "ReadWriteMany" not in create.access_modes
        and training.resources.nodes > 1
    ):
        rules.fail("storage.pvc.create.accessModes", MULTI_NODE_RWO)

    if spec.student.lora is not None and training.strategy == "fsdp":
        rules.fail("student.lora", "LoRA with FSDP is not supported: use training.strategy ddp or drop lora")

    rules.raise_if_any()
