"""The cost model, one place for the operator, the evaluator and the local executor.

- collection: the teacher API's tokens at ``teacher.pricing`` (from the collection summaries);
- training: GPU-hours × ``cost.gpuHourUSD``;
- serving: replicas × GPUs × ``cost.gpuHourUSD`` × 730 h a month (a GPU-less replica counts as one
  device-hour at the same price, so a CPU deployment is not free on paper);
- the teacher API it replaces: ``cost.requestsPerMonth`` × the average request's tokens at
  ``teacher.pricing`` — the seed's $4000/month → $380/month comparison (none without a price).
"""

from __future__ import annotations

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
    teacher = None
    if answered > 0 and (pricing.input_per_mtok_usd or pricing.output_per_mtok_usd):
        per_request = tokens_usd(input_tokens / answered, output_tokens / answered, pricing)
        teacher = per_request * spec.cost.requests_per_month
    return CostResults(
        collection_usd=round(collection, 6) if collection is not None else None,
        training_usd=round(gpu_hours * spec.cost.gpu_hour_usd, 6) if gpu_hours is not None else None,
        serving_usd_per_month=round(serving, 2),
        teacher_usd_per_month=round(teacher, 2) if teacher is not None else None,
        savings_ratio=round(teacher / serving, 3) if teacher is not None and serving > 0 else None,
    )
