"""The cost model, one place for the operator, the evaluator and the local executor.

- collection: the teacher API's tokens at ``teacher.pricing`` (from the collection summaries);
- training: GPU-hours × ``cost.gpuHourUSD``;
- the teacher's scoring during an ``onPolicy`` training (``teacherScoringUSD``): an endpoint teacher's
  scored tokens at ``teacher.pricing.inputPerMTokUSD`` (they are prompt tokens to it); a self-hosted
  teacher's GPUs (``tensorParallelSize``; one device without a GPU, as serving counts) × the training's
  wall time × ``cost.gpuHourUSD``: it is kept up for the whole training, whether it scores or waits. (The
  collection's self-hosted teacher is priced by ``teacher.pricing``'s tokens, nothing by default.)
  ``totalUSD`` is what the run cost once: collection + teacher scoring + training;
- serving: replicas × GPUs × ``cost.gpuHourUSD`` × 730 h a month (a GPU-less replica counts as one
  device-hour at the same price, so a CPU deployment is not free on paper);
- the teacher API it replaces: ``cost.requestsPerMonth`` × the average request's tokens at
  ``teacher.pricing`` — the seed's $4000/month → $380/month comparison (none without a price);
- is it worth it: the student's monthly cost as a multiple of the teacher API's at that traffic, the
  break-even traffic (requests a month above which the fixed monthly cost of the student is less than the
  teacher's price per request), and each one's price per million output tokens; :func:`worth_it` says it
  in one sentence for the report, ``distillery run``'s summary and the README.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .api.spec import DistillationRunSpec, Pricing
from .api.status import CostResults
from .api.summaries import CollectionSummary, TrainingProgress

HOURS_PER_MONTH = 730.0


def tokens_usd(input_tokens: float, output_tokens: float, pricing: Pricing) -> float:
    return (input_tokens * pricing.input_per_mtok_usd + output_tokens * pricing.output_per_mtok_usd) / 1e6


def serving_usd_per_month(replicas: int, gpus: int, gpu_hour_usd: float) -> float:
    return replicas * max(gpus, 1) * gpu_hour_usd * HOURS_PER_MONTH


def scoring_gpu_hours(spec: DistillationRunSpec, elapsed_seconds: float) -> float | None:
    """The device-hours a self-hosted teacher is kept up to score an ``onPolicy`` training of
    ``elapsed_seconds``: its GPUs (one device at least) × that wall time; None for any other run."""
    teacher = spec.teacher.self_hosted
    if spec.training.method != "onPolicy" or teacher is None:
        return None
    return max(teacher.tensor_parallel_size, 1) * max(elapsed_seconds, 0.0) / 3600.0


def scoring_of(
    spec: DistillationRunSpec, progress: TrainingProgress | None
) -> tuple[int | None, float | None]:
    """``(teacher tokens scored, self-hosted teacher GPU-hours)`` of a training from rank 0's progress, for
    :func:`run_cost` (``(None, None)`` when it did not score with the teacher)."""
    if progress is None or progress.teacher_tokens_scored is None:
        return None, None
    return progress.teacher_tokens_scored, scoring_gpu_hours(spec, progress.elapsed_seconds)


def scoring_usd(spec: DistillationRunSpec, tokens: int | None, gpu_hours: float | None) -> float | None:
    """What the teacher's scoring of an ``onPolicy`` training cost: a self-hosted teacher's GPU-hours at
    ``cost.gpuHourUSD``, an endpoint's scored tokens at its input price; None when nothing was scored."""
    if spec.teacher.self_hosted is not None:
        return gpu_hours * spec.cost.gpu_hour_usd if gpu_hours is not None else None
    return tokens_usd(tokens, 0, spec.teacher.pricing) if tokens is not None else None


def run_cost(
    spec: DistillationRunSpec,
    summaries: Iterable[CollectionSummary],
    gpu_hours: float | None,
    *,
    scored_tokens: int | None = None,
    teacher_gpu_hours: float | None = None,
) -> CostResults:
    """Every cost figure of a run, from its spec, its collection summaries, training's GPU-hours and (an
    ``onPolicy`` training) the tokens the teacher scored and the self-hosted teacher's GPU-hours
    (:func:`scoring_of`)."""
    shards = list(summaries)
    answered = sum(s.done - s.cached for s in shards)
    input_tokens = sum(s.input_tokens for s in shards)
    output_tokens = sum(s.output_tokens for s in shards)
    pricing = spec.teacher.pricing
    collection = sum(s.cost_usd for s in shards) if shards else None
    serving = serving_usd_per_month(spec.serving.replicas, spec.serving.gpus, spec.cost.gpu_hour_usd)
    requests = spec.cost.requests_per_month
    teacher = per_request = None
    if answered > 0 and (pricing.input_per_mtok_usd or pricing.output_per_mtok_usd):
        per_request = tokens_usd(input_tokens / answered, output_tokens / answered, pricing)
        teacher = per_request * requests
    out_per_request = output_tokens / answered if answered > 0 else 0.0
    monthly_out = out_per_request * requests
    training = gpu_hours * spec.cost.gpu_hour_usd if gpu_hours is not None else None
    scoring = scoring_usd(spec, scored_tokens, teacher_gpu_hours)
    once = [x for x in (collection, scoring, training) if x is not None]
    return CostResults(
        collection_usd=round(collection, 6) if collection is not None else None,
        training_usd=round(training, 6) if training is not None else None,
        teacher_scoring_usd=round(scoring, 6) if scoring is not None else None,
        total_usd=round(sum(once), 6) if once else None,
        serving_usd_per_month=round(serving, 2),
        teacher_usd_per_month=round(teacher, 2) if teacher is not None else None,
        requests_per_month=requests,
        student_to_teacher_cost=round(serving / teacher, 3) if teacher else None,
        break_even_requests_per_month=math.ceil(serving / per_request) if per_request else None,
        teacher_usd_per_million_output_tokens=(
            round(per_request / out_per_request * 1e6, 2) if per_request and out_per_request > 0 else None
        ),
        student_usd_per_million_output_tokens=round(serving / monthly_out * 1e6, 2)
        if monthly_out > 0
        else None,
    )


def worth_it(cost: CostResults) -> str | None:
    """The cost figures in one plain sentence (None without a teacher price to compare with)."""
    teacher, student, even = (
        cost.teacher_usd_per_month,
        cost.serving_usd_per_month,
        cost.break_even_requests_per_month,
    )
    if teacher is None or student is None or even is None or cost.requests_per_month is None:
        return None
    at = f"{cost.requests_per_month:,} requests a month (cost.requestsPerMonth)"
    if student < teacher:
        verdict = (
            f"the student is cheaper: ${student:,.0f} a month against ${teacher:,.0f} for the teacher API"
        )
    else:
        verdict = (
            f"the teacher API is cheaper: ${teacher:,.0f} a month against ${student:,.0f} for the student "
            f"(the student costs {cost.student_to_teacher_cost:.2f}× as much)"
        )
    per_mtok = ""
    if (
        cost.student_usd_per_million_output_tokens is not None
        and cost.teacher_usd_per_million_output_tokens is not None
    ):
        per_mtok = (
            f"; per million output tokens ${cost.student_usd_per_million_output_tokens:,.2f} (student) against "
            f"${cost.teacher_usd_per_million_output_tokens:,.2f} (teacher)"
        )
    return f"At {at} {verdict}{per_mtok}. The student is cheaper above {even:,} requests a month."
