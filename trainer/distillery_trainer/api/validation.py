"""Cross-field rules of a DistillationRunSpec, each naming the field and the fix.

Single-field rules (ranges, patterns, enums) live on the fields themselves and reach the CRD schema;
the rules here need several fields. Those the API server can evaluate are also CEL rules on the types
(``x-kubernetes-validations`` in ``spec.py``, built from the same regular expressions and messages where a
rule reads text); ``tests/api/test_crd_parity.py`` runs every invalid spec of the suite through both and
lists the few that are deliberately the operator's alone. :func:`cluster_problems` holds what only a cluster
run needs (the operator and ``distillery validate --target cluster`` apply it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .base import Rules

if TYPE_CHECKING:
    from .spec import DistillationRunSpec

OPENAI_MAX_TOP_LOGPROBS = 20
# A base URL whose host is OpenAI's (what ``urlparse(url).hostname.endswith("openai.com")`` meant), as one
# regular expression that Python and the API server's CEL (RE2) read alike: scheme, optional userinfo, host.
OPENAI_HOST = r"(?i)^[a-z][-+.a-z0-9]*://([^/?#]*@)?[^/?#@:]*openai[.]com(:[^/?#]*)?([/?#]|$)"
OPENAI_TOPK = f"the OpenAI API returns at most {OPENAI_MAX_TOP_LOGPROBS} top logprobs: set topK <= 20"
KD_BLACK_BOX = (
    "kd needs the teacher's token logprobs: set teacher.logprobs.topK (an endpoint that returns "
    "logprobs, such as vLLM) or use teacher.selfHosted; for a black-box API teacher use sft or seqkd"
)
KD_TOPK_SOURCE = "topk needs teacher.logprobs.topK set, or use source: online"
KD_ONLINE_SOURCE = (
    "online runs the teacher model on the training ranks and needs teacher.selfHosted; "
    "with an API teacher use source: topk and teacher.logprobs"
)
SEQKD_GREEDY = (
    "several samples at temperature 0 are identical: set teacher.sampling.temperature > 0 or samples: 1"
)
PARALLELISM_ABOVE_SHARDS = "cannot exceed collection.shards: lower it or add shards"
OFF_POLICY_NOTHING = (
    "none trains the off-policy steps on sftWeight times the cross-entropy alone, and sftWeight is 0: "
    "set training.onPolicy.sftWeight > 0 or name a divergence (forwardKL)"
)
LORA_FSDP = "LoRA with FSDP is not supported: use training.strategy ddp or drop lora"
MULTI_NODE_RWO = (
    "training on several nodes mounts the volume on all of them at once, which ReadWriteOnce does not allow: "
    "use accessModes [ReadWriteMany] (a StorageClass that offers it: NFS, CephFS, Filestore, EFS, Azure Files) "
    "or set training.resources.nodes: 1"
)
PKG_SCHEME = "pkg://"
STORAGE_REQUIRED_IN_CLUSTER = (
    "required in a cluster: set storage.pvc.claimName (an existing claim; ReadWriteMany for "
    "multi-node training), add storage.pvc.create: {size: 200Gi} to have the operator create "
    "it (object storage is not supported yet)"
)
PKG_MODEL_IN_CLUSTER = (
    "pkg://<package>/<file> names a model file an installed Python package ships: it exists only on the "
    "machine of `distillery run` (the images carry no such package); in a cluster put the file (or a model "
    "directory) on the run's volume and name it pvc://<path> (relative to the volume's root), or name a "
    "Hugging Face model id"
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
        rules.fail("training.method", KD_BLACK_BOX)
    if training.method == "kd" and training.kd.source == "topk" and teacher.logprobs is None:
        rules.fail("training.kd.source", KD_TOPK_SOURCE)
    if training.method == "kd" and training.kd.source == "online" and teacher.self_hosted is None:
        rules.fail("training.kd.source", KD_ONLINE_SOURCE)
    if training.method == "onPolicy" and not teacher.white_box:
        rules.fail("training.method", ON_POLICY_BLACK_BOX)
    elif (
        training.method == "onPolicy"
        and teacher.endpoint is not None
        and re.search(OPENAI_HOST, teacher.endpoint.base_url)
    ):
        rules.fail("teacher.endpoint.baseURL", ON_POLICY_OPENAI)
    if training.method == "seqkd" and training.seqkd.samples > 1 and teacher.sampling.temperature == 0:
        rules.fail("training.seqkd.samples", SEQKD_GREEDY)

    if (
        teacher.logprobs
        and teacher.endpoint
        and teacher.logprobs.top_k > OPENAI_MAX_TOP_LOGPROBS
        and re.search(OPENAI_HOST, teacher.endpoint.base_url)
    ):
        rules.fail("teacher.logprobs.topK", OPENAI_TOPK)

    if training.on_policy.off_policy_divergence == "none" and training.on_policy.sft_weight == 0:
        rules.fail("training.onPolicy.offPolicyDivergence", OFF_POLICY_NOTHING)

    if spec.collection.parallelism is not None and spec.collection.parallelism > spec.collection.shards:
        rules.fail("collection.parallelism", PARALLELISM_ABOVE_SHARDS)

    create = spec.storage.pvc.create if spec.storage is not None and spec.storage.pvc is not None else None
    if (
        create is not None
        and create.access_modes
        and "ReadWriteMany" not in create.access_modes
        and training.resources.nodes > 1
    ):
        rules.fail("storage.pvc.create.accessModes", MULTI_NODE_RWO)

    if spec.student.lora is not None and training.strategy == "fsdp":
        rules.fail("student.lora", LORA_FSDP)

    rules.raise_if_any()


def cluster_problems(spec: DistillationRunSpec) -> list[tuple[str, str]]:
    """What a valid spec still lacks to run in a cluster, as ``(path, message)`` under ``spec.``: the rules
    the operator applies (and ``distillery validate`` with its default ``--target cluster``) that
    ``distillery run`` on one machine does not. Not CRD rules: the same resource runs in both places."""
    out: list[tuple[str, str]] = []
    if spec.storage is None:
        out.append(("spec.storage", STORAGE_REQUIRED_IN_CLUSTER))
    models = {
        "spec.teacher.selfHosted.model": spec.teacher.self_hosted.model if spec.teacher.self_hosted else None,
        "spec.student.model": spec.student.model,
        "spec.student.tokenizer": spec.student.tokenizer,
    }
    out += [
        (path, PKG_MODEL_IN_CLUSTER) for path, ref in models.items() if ref and ref.startswith(PKG_SCHEME)
    ]
    return out
