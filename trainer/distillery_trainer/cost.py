"""The cost model, one place for the operator, the evaluator and the local executor.

- collection: the teacher API's tokens at ``teacher.pricing`` (from the collection summaries);
- training: GPU-hours × ``cost.gpuHourUSD``;
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
from .api.summaries import CollectionSummary

HOURS_PER_MONTH = 730.0


def tokens_usd(input_tokens: float, output_tokens: float, pricing: Pricing) -> float:
    return (input_tokens * pricing.input_per_mtok_usd + output_tokens * pricing.output_per_mtok_usd) / 1e6


def serving_usd_per_month(replicas: int, gpus: int, gpu_hour_usd: float) -> float:
    return replicas * max(gpus, 1) * gpu_hour_usd * HOURS_PER_MONTH


def run_cost(
    spec: DistillationRunSpec,
    summaries: Iterable[CollectionSummary],
    gpu_hours: float | None,
) -> CostResults:
    """Every cost figure of a run, from its spec, its collection summaries and training's GPU-hours."""
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
    return CostResults(
        collection_usd=round(collection, 6) if collection is not None else None,
        training_usd=round(gpu_hours * spec.cost.gpu_hour_usd, 6) if gpu_hours is not None else None,
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
