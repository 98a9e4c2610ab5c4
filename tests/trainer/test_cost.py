"""The cost model against hand computations, the seed's case among them."""

from __future__ import annotations

import pytest
from distillery_trainer.api import load_run, parse_run
from distillery_trainer.api.summaries import CollectionSummary
from distillery_trainer.cost import run_cost, serving_usd_per_month, tokens_usd

from tests.conftest import EXAMPLES
from tests.support.builders import make_run


def test_tokens_at_pricing() -> None:
    spec = load_run(EXAMPLES / "run.yaml").spec
    # 1M input at $2.5 + 1M output at $10
    assert tokens_usd(1e6, 1e6, spec.teacher.pricing) == pytest.approx(12.5)


def test_seed_case_orders_of_magnitude() -> None:
    """12k GPT-4o requests of ~1.5k input / 300 output tokens cost ~$80 to collect; at 270k requests a
    month the API costs ~$1.8k; one GPU at $2/h is $1460 a month."""
    spec = load_run(EXAMPLES / "run.yaml").spec
    shards = [
        CollectionSummary(
            shard=i,
            shards=8,
            total=1500,
            done=1500,
            input_tokens=1500 * 1500,
            output_tokens=1500 * 300,
            cost_usd=tokens_usd(1500 * 1500, 1500 * 300, spec.teacher.pricing),
        )
        for i in range(8)
    ]
    cost = run_cost(spec, shards, gpu_hours=48.0)
    assert cost.collection_usd == pytest.approx(12000 * (1500 * 2.5 + 300 * 10) / 1e6)
    assert cost.training_usd == pytest.approx(96.0)
    assert cost.serving_usd_per_month == pytest.approx(1 * 1 * 2.0 * 730)
    per_request = (1500 * 2.5 + 300 * 10) / 1e6
    assert cost.teacher_usd_per_month == pytest.approx(per_request * 270000, rel=1e-3)
    assert cost.savings_ratio == pytest.approx(
        cost.teacher_usd_per_month / cost.serving_usd_per_month, rel=1e-3
    )


def test_cached_answers_do_not_count_as_traffic_and_nothing_is_invented() -> None:
    spec = parse_run(make_run().obj()).spec
    cost = run_cost(spec, [], gpu_hours=None)
    assert cost.collection_usd is None and cost.training_usd is None and cost.teacher_usd_per_month is None
    assert cost.serving_usd_per_month == serving_usd_per_month(1, 1, 2.0)
    cached = [CollectionSummary(shard=0, shards=1, total=5, done=5, cached=5)]
    assert run_cost(spec, cached, None).teacher_usd_per_month is None


def test_no_teacher_price_means_no_teacher_monthly_cost() -> None:
    spec = parse_run(
        make_run().spec({"teacher": {"pricing": {"inputPerMTokUSD": 0, "outputPerMTokUSD": 0}}}).obj()
    ).spec
    paid = [CollectionSummary(shard=0, shards=1, total=5, done=5, input_tokens=500, output_tokens=100)]
    assert run_cost(spec, paid, None).teacher_usd_per_month is None
