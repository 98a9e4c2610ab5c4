"""The four stages, defined once: the operator's planner, `distillery run`, the stage pods, metrics and
live progress all read these, so the two modes cannot disagree about what an edit re-runs.

A :class:`Stage` names the stage (the word of the CLI, the label and the status key), where its status
lives, the phase and the reasons it reports, and the spec fields its outputs depend on. From those,
:func:`fingerprints` gives each stage a digest of its inputs, chained (a stage's digest covers every
earlier stage's), that the operator stamps on the stage's child (``distillery.dev/inputs``) and the stage
writes next to its outputs (``inputs.json``, :mod:`distillery_trainer.outputs`). An edit restarts the
earliest stage whose digest changed and every stage after it. What an edit of each field does:

- **a stage's inputs** (what it produces): restarts that stage and every later one;
- **execution settings** (:data:`EXECUTION`: how fast, how often retried, where it is scheduled, whether
  serving is kept): apply to the pods started from then on, restart nothing;
- **verdict-only** (:data:`VERDICT_ONLY`): the gate and the cost figures are recomputed from the results
  already measured (:func:`verdict`), nothing runs again.

:func:`verdict` is the gate: the evaluate stage, the planner and the local executor all ask it;
:func:`collection_failures` is the collection's own bar, asked by each shard, the planner and the local
executor.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .spec import Collection, DistillationRunSpec, Evaluation
from .status import (
    PHASE_COLLECTING,
    PHASE_EVALUATING,
    PHASE_FAILED,
    PHASE_SERVING,
    PHASE_SUCCEEDED,
    PHASE_TRAINING,
    REASON_COLLECTING,
    REASON_COLLECTION_FAILED,
    REASON_EVALUATING,
    REASON_EVALUATION_FAILED,
    REASON_QUALITY_GATE_FAILED,
    REASON_QUALITY_GATE_PASSED,
    REASON_SERVING,
    REASON_SERVING_FAILED,
    REASON_TRAINING,
    REASON_TRAINING_FAILED,
    CollectionStatus,
    DistillationRunStatus,
    EvaluationStatus,
    Results,
    ServingStatus,
    StageStatus,
    TrainingStatus,
)
from .summaries import CollectionSummary

# Fingerprints carry this prefix. One recorded without it (by an operator or a stage older than this
# module) is *adopted*: it says nothing about the inputs, so the outputs are kept as they are instead of
# restarting every run on an upgrade. Bump it when the selection below changes meaning.
SCHEME = "i2-"

# Spec fields that decide how a stage runs, not what it produces (camelCase paths).
EXECUTION: tuple[str, ...] = (
    "collection.parallelism",
    "collection.concurrency",
    "collection.requestsPerMinute",
    "collection.tokensPerMinute",
    "collection.maxRetries",
    "collection.timeoutSeconds",
    "collection.backoffLimitPerIndex",
    "collection.cache",
    "collection.deadlineSeconds",
    "collection.resources",
    # Whether the collection's outputs are accepted, not what they are: the shards' answers are the same
    # whatever the bar, so editing it restarts nothing; the shards, `distillery run` and the planner hold
    # the collection against it when it ends (:func:`collection_failures`).
    "collection.maxFailedFraction",
    "training.backend",
    "training.runtime",  # which ClusterTrainingRuntime runs torchrun, not what it trains
    "training.deadlineSeconds",
    "serving.replicas",
    "serving.keep",
    "serving.keepOnFailure",
    "evaluation.deadlineSeconds",
    "serving.resources",
    "serving.shmSize",
    "evaluation.resources",
    "scheduling",
    "huggingFace",  # a token changes what may be downloaded, never what a stage makes of it
)
# Spec fields that only change the verdict and the cost figures.
VERDICT_ONLY: tuple[str, ...] = ("evaluation.minQualityRetention", "evaluation.maxErrorFraction", "cost")


@dataclass(frozen=True)
class Stage:
    name: str  # collect | train | serve | evaluate: the CLI's word, the label's value, the key
    title: str  # what the stage does, for people
    status_field: str  # where its status lives: status.collection, ...
    status_type: type[StageStatus]
    phase: str  # the run's phase while it runs
    running_reason: str
    done_reason: str
    failed_reason: str
    inputs: tuple[str, ...]  # spec paths its outputs depend on (less EXECUTION and VERDICT_ONLY)
    # Paths that are inputs only when the spec says so (collection samples several answers for seqkd).
    when: tuple[tuple[str, Callable[[DistillationRunSpec], bool]], ...] = ()

    def status(self, status: DistillationRunStatus) -> StageStatus:
        value: StageStatus = getattr(status, self.status_field)
        return value

    def reset(self, status: DistillationRunStatus) -> None:
        setattr(status, self.status_field, self.status_type())


def _seqkd_samples(spec: DistillationRunSpec) -> bool:
    return spec.training.method == "seqkd" and spec.training.seqkd.samples > 1


COLLECT = Stage(
    name="collect",
    title="collect teacher answers",
    status_field="collection",
    status_type=CollectionStatus,
    phase=PHASE_COLLECTING,
    running_reason=REASON_COLLECTING,
    done_reason="CollectionSucceeded",
    failed_reason=REASON_COLLECTION_FAILED,
    inputs=("teacher", "data", "collection", "storage"),
    when=(("training.seqkd", _seqkd_samples),),
)
TRAIN = Stage(
    name="train",
    title="train the student",
    status_field="training",
    status_type=TrainingStatus,
    phase=PHASE_TRAINING,
    running_reason=REASON_TRAINING,
    done_reason="TrainingSucceeded",
    failed_reason=REASON_TRAINING_FAILED,
    inputs=("student", "training"),
)
SERVE = Stage(
    name="serve",
    title="serve it (vLLM)",
    status_field="serving",
    status_type=ServingStatus,
    phase=PHASE_SERVING,
    running_reason=REASON_SERVING,
    done_reason="ServingReady",
    failed_reason=REASON_SERVING_FAILED,
    inputs=("serving",),
)
EVALUATE = Stage(
    name="evaluate",
    title="evaluate vs teacher",
    status_field="evaluation",
    status_type=EvaluationStatus,
    phase=PHASE_EVALUATING,
    running_reason=REASON_EVALUATING,
    done_reason="EvaluationSucceeded",
    failed_reason=REASON_EVALUATION_FAILED,
    inputs=("evaluation",),
)
STAGES: tuple[Stage, ...] = (COLLECT, TRAIN, SERVE, EVALUATE)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


def later(first: Stage) -> tuple[Stage, ...]:
    """``first`` and every stage after it."""
    return STAGES[STAGES.index(first) :]


# ---------------------------------------------------------------------------------------------- inputs


def digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _get(data: dict[str, Any], path: str) -> Any:
    value: Any = data
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _without(value: Any, path: str, excluded: tuple[str, ...]) -> Any:
    """``value`` (found at ``path``) less the excluded paths under it; what is left empty is None, as
    if it were not set."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        sub = f"{path}.{key}"
        kept = None if sub in excluded else _without(item, sub, excluded)
        if kept is not None:
            out[key] = kept
    return out or None


def selected_inputs(spec: DistillationRunSpec, st: Stage) -> dict[str, Any]:
    """The part of the spec ``st``'s outputs depend on (defaults left out, so a new field with a default
    does not change any digest)."""
    data = spec.to_dict(exclude_defaults=True)
    excluded = EXECUTION + VERDICT_ONLY
    picked = {path: _without(_get(data, path), path, excluded) for path in st.inputs}
    for path, applies in st.when:
        if applies(spec):
            picked[path] = _without(_get(data, path), path, excluded)
    return picked


def fingerprints(spec: DistillationRunSpec) -> dict[str, str]:
    """Each stage's inputs digest, chained: a stage's covers every earlier stage's inputs too."""
    out: dict[str, str] = {}
    upstream = ""
    for st in STAGES:
        upstream = SCHEME + digest([upstream, selected_inputs(spec, st)])
        out[st.name] = upstream
    return out


def inputs_changed(recorded: str | None, current: str) -> bool:
    """Whether outputs (or a child) recorded for ``recorded`` inputs must give way to ``current`` ones.
    Nothing recorded, or a fingerprint of an older scheme, is adopted (see :data:`SCHEME`)."""
    return recorded is not None and recorded.startswith(SCHEME) and recorded != current


# ---------------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Verdict:
    passed: bool
    phase: str  # Succeeded | Failed
    reason: str  # QualityGatePassed | QualityGateFailed | EvaluationFailed
    message: str
    conclusive: bool | None = None  # whether the retention interval lies wholly on one side


def verdict(results: Results, evaluation: Evaluation) -> Verdict:
    """The quality gate, from measured results and the spec's thresholds (which may have changed since):
    no retention fails the evaluation; too many failed student requests, or a retention below
    ``minQualityRetention``, fails the gate."""
    threshold = evaluation.min_quality_retention
    retention = results.quality_retention
    if retention is None:
        return Verdict(
            False,
            PHASE_FAILED,
            REASON_EVALUATION_FAILED,
            "no quality retention could be measured",
        )
    errors = results.error_fraction
    if errors is not None and errors > evaluation.max_error_fraction:
        # Failed requests are in no score: a retention over the few answers that came back proves nothing.
        message = (
            f"{errors:.1%} of the student's requests failed > evaluation.maxErrorFraction "
            f"{evaluation.max_error_fraction:g} (quality retention {retention:.3f} on the answers that came back)"
        )
        return Verdict(False, PHASE_FAILED, REASON_QUALITY_GATE_FAILED, message)
    passed = retention >= threshold
    span, conclusive = "", None
    iv = results.retention_interval
    if iv is not None:
        conclusive = iv.low >= threshold if passed else iv.high < threshold
        span = f" ({iv.confidence:.0%} interval {iv.low:.3f}-{iv.high:.3f}"
        span += (
            ")" if conclusive else f", which straddles {threshold:g}: more held-out prompts would settle it)"
        )
    latency = results.latency_ms
    p95 = f"; p95 {latency.p95:.0f} ms" if latency is not None and latency.p95 is not None else ""
    if passed:
        message = f"quality retention {retention:.3f} >= {threshold:g}{span}{p95}"
        return Verdict(True, PHASE_SUCCEEDED, REASON_QUALITY_GATE_PASSED, message, conclusive)
    message = f"quality retention {retention:.3f} < evaluation.minQualityRetention {threshold:g}{span}{p95}"
    return Verdict(False, PHASE_FAILED, REASON_QUALITY_GATE_FAILED, message, conclusive)


# ---------------------------------------------------------------------------------------------- collection


def collection_failures(summaries: Sequence[CollectionSummary], collection: Collection) -> str | None:
    """The collection's bar: None when at most ``collection.maxFailedFraction`` of the prompts the
    ``summaries`` cover ended in the failures files, else why the collection fails (the share, the bar
    and the most common failure reason). One shard asks it of its own summary when it ends; the planner
    and `distillery run` of every shard's, so the totals are held to the same rule."""
    total = sum(s.total for s in summaries)
    failed = sum(s.failed for s in summaries)
    if total == 0 or failed / total <= collection.max_failed_fraction:
        return None
    kinds: Counter[str] = Counter()
    for s in summaries:
        kinds.update(s.failure_kinds)
    message = (
        f"{failed} of {total} prompts failed ({failed / total:.1%}) > collection.maxFailedFraction "
        f"{collection.max_failed_fraction:g}"
    )
    if kinds:
        kind, count = kinds.most_common(1)[0]
        example = next((s.failure_examples[kind] for s in summaries if kind in s.failure_examples), None)
        message += f"; most common failure: {kind} ({count} prompts)" + (f": {example}" if example else "")
    return message + ": fix the cause (collect/failures-*.jsonl has every prompt's reason), or raise the bar"
