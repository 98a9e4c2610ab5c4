"""``DistillationRunStatus``: what the operator (or `distillery run`) observed, and the verdict.

Condition types and reasons are constants here, beside the model, so the operator, the local executor,
the Argo CD health check and the docs use the same words. Which stage reports which phase and reasons is
defined with the stages, in :mod:`.stages`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import ApiModel

# ---------------------------------------------------------------------------------------------- phases

PHASE_PENDING = "Pending"
PHASE_COLLECTING = "Collecting"
PHASE_TRAINING = "Training"
PHASE_SERVING = "Serving"
PHASE_EVALUATING = "Evaluating"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
TERMINAL_PHASES = (PHASE_SUCCEEDED, PHASE_FAILED)
Phase = Literal["Pending", "Collecting", "Training", "Serving", "Evaluating", "Succeeded", "Failed"]

# ---------------------------------------------------------------------------------------------- conditions

COND_READY = "Ready"  # the run finished and passed its gate; the student is served (when kept)
COND_PROGRESSING = "Progressing"  # a stage is running
COND_DEGRADED = "Degraded"  # something went wrong (the run failed, or a child is retrying)
COND_SUCCEEDED = "Succeeded"  # terminal: the run passed
COND_FAILED = "Failed"  # terminal: the run failed

# Reasons (CamelCase, as Kubernetes conventions ask).
REASON_WAITING_FOR_STORAGE = "WaitingForStorage"  # the claim the operator created is not bound yet
REASON_INVALID_SPEC = "InvalidSpec"
REASON_CHILD_REJECTED = "ChildRejected"  # the API server refused a child (422): its message says why
REASON_POLICY_VIOLATION = "PolicyViolation"  # valid, but outside the platform's policy (the chart's policy.*)
REASON_COLLECTING = "Collecting"
REASON_TRAINING = "Training"
REASON_SERVING = "Serving"
REASON_EVALUATING = "Evaluating"
REASON_COLLECTION_FAILED = "CollectionFailed"
REASON_TRAINING_FAILED = "TrainingFailed"
# training.backend names a kind the cluster does not serve (trainjob without Kubeflow Trainer v2, ...).
REASON_BACKEND_UNAVAILABLE = "TrainingBackendUnavailable"
# The ClusterTrainingRuntime a TrainJob would reference does not exist: the run waits, Degraded.
REASON_RUNTIME_NOT_FOUND = "TrainingRuntimeNotFound"
REASON_SERVING_FAILED = "ServingFailed"
REASON_EVALUATION_FAILED = "EvaluationFailed"
REASON_QUALITY_GATE_PASSED = "QualityGatePassed"
REASON_QUALITY_GATE_FAILED = "QualityGateFailed"
REASON_SPEC_CHANGED = "SpecChanged"
REASON_RETRYING = "Retrying"
REASON_AS_EXPECTED = "AsExpected"
# A stage's pod that does not get on: Degraded with one of these while it lasts, and the stage fails with
# it once it lasted the operator's stallTimeoutSeconds (see observe.Trouble for what each one is read from).
REASON_POD_UNSCHEDULABLE = "PodUnschedulable"  # PodScheduled False, reason Unschedulable
REASON_IMAGE_PULL_FAILED = "ImagePullFailed"  # ErrImagePull, ImagePullBackOff, InvalidImageName
REASON_CRASH_LOOPING = "CrashLooping"  # CrashLoopBackOff
REASON_CONTAINER_CONFIG_ERROR = "ContainerConfigError"  # CreateContainerConfigError (a missing Secret key)
REASON_VOLUME_NOT_MOUNTED = "VolumeNotMounted"  # scheduled, PodReadyToStartContainers False (FailedMount)
# A vLLM Deployment (the student's, or a self-hosted teacher's) that did not become ready in time.
REASON_PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
STALL_REASONS = (
    REASON_POD_UNSCHEDULABLE,
    REASON_IMAGE_PULL_FAILED,
    REASON_CRASH_LOOPING,
    REASON_CONTAINER_CONFIG_ERROR,
    REASON_VOLUME_NOT_MOUNTED,
)

ConditionStatus = Literal["True", "False", "Unknown"]
StageState = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]


class Condition(ApiModel):
    type: str = Field(max_length=316, description="Ready, Progressing, Degraded, Succeeded or Failed.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: datetime | None = Field(default=None, description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="Generation this was computed for."
    )


# ---------------------------------------------------------------------------------------------- stages


class Stall(ApiModel):
    """A stage that does not get on: a pod that cannot be scheduled, pulled, mounted or started, or a
    Deployment past its progress deadline. Recorded while it lasts; kept once the stage failed for it."""

    reason: str = Field(max_length=64, description="PodUnschedulable, ImagePullFailed, CrashLooping, ...")
    message: str = Field(
        default="", max_length=4096, description="The pod and the cause, as Kubernetes said."
    )
    pod: str | None = Field(default=None, max_length=253, description="The pod, when one is to blame.")
    since: datetime | None = Field(default=None, description="Since when (the pod condition's time).")


class StageStatus(ApiModel):
    """Progress of one stage: done of total units, and an ETA."""

    state: StageState = Field(
        default="Pending", description="Pending, Running, Succeeded, Failed or Skipped."
    )
    done: int = Field(default=0, ge=0, description="Units done (prompts, steps, replicas, samples).")
    total: int | None = Field(default=None, ge=0, description="Units in all, when known.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated seconds left.")
    start_time: datetime | None = Field(default=None, description="When the stage started.")
    completion_time: datetime | None = Field(default=None, description="When the stage ended.")
    message: str | None = Field(default=None, max_length=32768, description="Last message of the stage.")
    stalled: Stall | None = Field(
        default=None,
        description=(
            "Why the stage does not get on, while it lasts; once the stage failed for it, it stays Failed "
            "until the spec is edited."
        ),
    )


class CollectionStatus(StageStatus):
    failed: int = Field(
        default=0, ge=0, description="Prompts the teacher could not answer (see failures file)."
    )
    input_tokens: int = Field(default=0, ge=0, description="Teacher input tokens.")
    output_tokens: int = Field(default=0, ge=0, description="Teacher output tokens.")
    cached: int = Field(default=0, ge=0, description="Answers served from the cache.")
    retries: int = Field(default=0, ge=0, description="Requests retried (429, 5xx, timeouts), all shards.")
    last_error: str | None = Field(
        default=None, max_length=300, description="The latest error a retried request met, as it was."
    )


class TrainingStatus(StageStatus):
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    epoch: float | None = Field(default=None, ge=0, description="Epochs done.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Training throughput.")
    gpu_hours: float | None = Field(default=None, ge=0, description="GPU-hours spent so far.")
    # onPolicy only (absent for the other methods): from rank 0's progress
    teacher_tokens_scored: int | None = Field(
        default=None,
        ge=0,
        description="onPolicy: tokens of the student's samples the teacher scored (all ranks).",
    )
    teacher_scoring_seconds: float | None = Field(
        default=None,
        ge=0,
        description="onPolicy: seconds the ranks waited for the teacher's scores (summed).",
    )
    samples_per_second: float | None = Field(
        default=None, ge=0, description="onPolicy: student samples generated per second of training."
    )
    divergence: float | None = Field(
        default=None, description="onPolicy: running mean of the per-token divergence to the teacher."
    )
    samples_ended: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="onPolicy: share of the latest on-policy step's samples that ended within maxNewTokens; "
        "with teacherLogprob, how a collapsing student shows (samples that run on, the teacher finding them "
        "unlikely) before the evaluation does.",
    )
    teacher_logprob: float | None = Field(
        default=None,
        le=0,
        description="onPolicy: the teacher's mean log-probability per token of the latest on-policy step's "
        "samples, over the tokens it gave a finite one (near 0: it would have written them; far below: junk to "
        "it).",
    )
    teacher_gpu_hours: float | None = Field(
        default=None,
        ge=0,
        description="onPolicy with a self-hosted teacher: its GPUs (one device without) x the training's wall "
        "time, the hours it was kept up to score; priced in results.cost.teacherScoringUSD.",
    )


class ServingStatus(StageStatus):
    ready_replicas: int = Field(default=0, ge=0, description="Replicas serving the student.")
    replicas: int = Field(default=0, ge=0, description="Replicas asked for.")


class EvaluationStatus(StageStatus):
    pass


# ---------------------------------------------------------------------------------------------- results


class Latency(ApiModel):
    p50: float | None = Field(default=None, ge=0, description="Median end-to-end latency, ms.")
    p95: float | None = Field(default=None, ge=0, description="95th percentile, ms.")
    p99: float | None = Field(default=None, ge=0, description="99th percentile, ms.")
    ttft_p50: float | None = Field(default=None, ge=0, description="Median time to first token, ms.")
    ttft_p95: float | None = Field(default=None, ge=0, description="95th percentile time to first token, ms.")


class Interval(ApiModel):
    low: float = Field(description="Lower bound.")
    high: float = Field(description="Upper bound.")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Confidence level.")


class CostResults(ApiModel):
    @model_validator(mode="before")
    @classmethod
    def _drop_savings_ratio(cls, data: Any) -> Any:
        """``savingsRatio`` (teacher / student, which read like a saving when the student cost more) was
        renamed ``studentToTeacherCost`` (inverted): a report or status written before is still read."""
        if isinstance(data, dict) and ("savingsRatio" in data or "savings_ratio" in data):
            data = {k: v for k, v in data.items() if k not in ("savingsRatio", "savings_ratio")}
        return data

    collection_usd: float | None = Field(
        default=None, ge=0, description="Teacher API spend of the collection."
    )
    training_usd: float | None = Field(default=None, ge=0, description="Training GPU-hours x price.")
    teacher_scoring_usd: float | None = Field(
        default=None,
        ge=0,
        description="onPolicy: the teacher's scoring of the student's samples during training: an endpoint "
        "teacher's scored tokens at its input price, a self-hosted teacher's GPU-hours while it was kept up "
        "for the training x cost.gpuHourUSD.",
    )
    total_usd: float | None = Field(
        default=None,
        ge=0,
        description="What the run cost once: collectionUSD + teacherScoringUSD + trainingUSD (those known).",
    )
    serving_usd_per_month: float | None = Field(
        default=None, ge=0, description="Replicas x GPUs x price x 730 h."
    )
    teacher_usd_per_month: float | None = Field(
        default=None, ge=0, description="The teacher API at the same traffic (cost.requestsPerMonth)."
    )
    requests_per_month: int | None = Field(
        default=None, ge=0, description="The traffic the monthly figures are for (cost.requestsPerMonth)."
    )
    student_to_teacher_cost: float | None = Field(
        default=None,
        ge=0,
        description="servingUSDPerMonth / teacherUSDPerMonth: what the student costs as a multiple of the "
        "teacher API at that traffic; below 1 the student is cheaper, above 1 dearer.",
    )
    break_even_requests_per_month: int | None = Field(
        default=None,
        ge=0,
        description="Requests a month above which the student (a fixed monthly cost) is cheaper than the "
        "teacher API (a price per request): servingUSDPerMonth / the teacher's price of an average request.",
    )
    teacher_usd_per_million_output_tokens: float | None = Field(
        default=None,
        ge=0,
        description="The teacher API's price per million output tokens of the average request, its input "
        "tokens included.",
    )
    student_usd_per_million_output_tokens: float | None = Field(
        default=None,
        ge=0,
        description="The student's price per million output tokens at requestsPerMonth (its monthly cost "
        "spread over that traffic's output tokens; it falls as traffic grows).",
    )


class Results(ApiModel):
    quality_retention: float | None = Field(default=None, ge=0, description="Student score / teacher score.")
    retention_interval: Interval | None = Field(
        default=None, description="Bootstrap interval of the retention."
    )
    student_score: float | None = Field(default=None, description="Student's score on the held-out split.")
    teacher_score: float | None = Field(default=None, description="Teacher's score on the held-out split.")
    baseline_score: float | None = Field(
        default=None,
        description="The untrained student's score on the same prompts, by the same scorer (evaluation.baseline).",
    )
    baseline_retention: float | None = Field(
        default=None,
        ge=0,
        description="The untrained student's score / the teacher's: what training started from.",
    )
    metric: str | None = Field(default=None, max_length=64, description="What the scores measure.")
    samples: int | None = Field(default=None, ge=0, description="Held-out prompts evaluated.")
    gate_passed: bool | None = Field(default=None, description="Retention >= evaluation.minQualityRetention.")
    latency_ms: Latency | None = Field(default=None, description="The student's latency.")
    teacher_latency_ms: Latency | None = Field(
        default=None, description="The teacher's, measured the same way."
    )
    throughput_tokens_per_sec: float | None = Field(
        default=None, ge=0, description="Student output tokens/s."
    )
    errors: int | None = Field(default=None, ge=0, description="Failed requests during evaluation.")
    error_fraction: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of the student's requests that failed (held-out answers and the latency load).",
    )
    cost: CostResults | None = Field(default=None, description="What it cost, and what it saves.")
    report: str | None = Field(default=None, max_length=4096, description="Where the full report lies.")
    provenance_digest: str | None = Field(
        default=None,
        max_length=80,
        description="sha256 of student/provenance.json: what produced the student (spec digest, teacher, "
        "base model, prompts, seed, package versions, device) and every figure of its evaluation; "
        "student/README.md is the same as a Hugging Face model card.",
    )


class DistillationRunStatus(ApiModel):
    phase: Phase = Field(default="Pending", description="Where the run is.")
    observed_generation: int | None = Field(default=None, ge=0, description="Spec generation last acted on.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Latest conditions.")
    message: str | None = Field(default=None, max_length=32768, description="Summary of the latest event.")
    start_time: datetime | None = Field(default=None, description="When the run started.")
    completion_time: datetime | None = Field(default=None, description="When the run ended.")
    collection: CollectionStatus = Field(default_factory=CollectionStatus, description="Stage 1.")
    training: TrainingStatus = Field(default_factory=TrainingStatus, description="Stage 2.")
    serving: ServingStatus = Field(default_factory=ServingStatus, description="Stage 3.")
    evaluation: EvaluationStatus = Field(default_factory=EvaluationStatus, description="Stage 4.")
    results: Results | None = Field(default=None, description="The verdict, once evaluated.")
    endpoint: str | None = Field(
        default=None, max_length=2048, description="OpenAI base URL of the served student."
    )

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)
