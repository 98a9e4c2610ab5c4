"""What each stage reports when it ends: written to the run's volume and, in a pod, as its termination
message (``/dev/termination-log``, at most 4 KiB), which is how results reach the operator without giving
workload pods any Kubernetes API access. camelCase on the wire, like the rest of the API.

- collection: each shard's :class:`CollectionSummary` (``collect/summary-XXXXX.json`` and its pod's message);
- training: rank 0's :class:`TrainingProgress` (``train/progress.json``, rewritten as it goes, and its message);
- evaluation: the run's :class:`~distillery_trainer.api.status.Results` (``eval/results.json`` holds more;
  the message holds the status shape).
"""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel


class CollectionSummary(ApiModel):
    shard: int = Field(ge=0, description="Shard index (JOB_COMPLETION_INDEX).")
    shards: int = Field(ge=1, description="Shards in all.")
    total: int = Field(ge=0, description="Prompts in this shard's slice (train and eval split).")
    done: int = Field(ge=0, description="Prompts with a teacher answer written.")
    failed: int = Field(default=0, ge=0, description="Prompts recorded in the failures file.")
    cached: int = Field(default=0, ge=0, description="Answers taken from the cache (no teacher call).")
    requests: int = Field(default=0, ge=0, description="HTTP requests sent, retries included.")
    retries: int = Field(default=0, ge=0, description="Requests retried after 429/5xx/timeouts.")
    input_tokens: int = Field(default=0, ge=0, description="Teacher input (prompt) tokens.")
    output_tokens: int = Field(default=0, ge=0, description="Teacher output tokens.")
    cost_usd: float = Field(default=0.0, ge=0, description="Input and output tokens at the spec's pricing.")
    wall_seconds: float = Field(default=0.0, ge=0, description="Wall time of this shard's run.")
    prompts_per_second: float = Field(default=0.0, ge=0, description="done / wall time.")
    failure_kinds: dict[str, int] = Field(
        default_factory=dict, description="Failed prompts by kind (bad_request, context_length, ...)."
    )
    failure_examples: dict[str, str] = Field(
        default_factory=dict, description="One recorded reason per failure kind (at most 160 characters)."
    )
    last_error: str | None = Field(
        default=None,
        max_length=300,
        description="The latest error of a request that was retried (429, 5xx, a timeout...), as it was.",
    )
    stopped: str | None = Field(
        default=None,
        max_length=1024,
        description="Why the shard stopped before its last prompt (an error no retry fixes, e.g. a refused API key).",
    )


class TrainingProgress(ApiModel):
    state: str = Field(default="Running", description="Running, Succeeded or Failed.")
    method: str = Field(description="sft, kd, seqkd or onPolicy (dpo while the DPO phase runs).")
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Steps planned.")
    epoch: float = Field(default=0.0, ge=0, description="Epochs done.")
    loss: float | None = Field(default=None, description="Latest loss.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Training throughput.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated seconds left.")
    elapsed_seconds: float = Field(default=0.0, ge=0, description="Training wall time so far.")
    world_size: int = Field(default=1, ge=1, description="Processes (ranks).")
    gpus: int = Field(default=0, ge=0, description="GPUs in use over all ranks.")
    gpu_hours: float = Field(default=0.0, ge=0, description="gpus x elapsed hours.")
    message: str | None = Field(default=None, description="Why it stopped, when it did.")
    # onPolicy only
    teacher_tokens_scored: int | None = Field(
        default=None, ge=0, description="onPolicy: sequence tokens sent to the teacher to score (all ranks)."
    )
    teacher_scoring_seconds: float | None = Field(
        default=None,
        ge=0,
        description="onPolicy: seconds the ranks waited for the teacher's scores (summed over ranks), for cost.",
    )
    samples_per_second: float | None = Field(
        default=None, ge=0, description="onPolicy: student samples generated per second of training."
    )
    divergence: float | None = Field(
        default=None,
        description="onPolicy: running mean of the per-token divergence (exponential, weight 0.9 on the past).",
    )
    samples_ended: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="onPolicy: share of the latest on-policy step's samples that ended (an end-of-turn token "
        "within maxNewTokens).",
    )
    teacher_logprob: float | None = Field(
        default=None,
        le=0,
        description="onPolicy: the teacher's mean log-probability per token of the latest on-policy step's "
        "samples.",
    )
