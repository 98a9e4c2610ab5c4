"""The cost model against hand computations, the seed's case among them."""

from __future__ import annotations

import math

import pytest
from distillery_trainer.api import load_run, parse_run
from distillery_trainer.api.status import CostResults
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.cost import (
    run_cost,
    scoring_gpu_hours,
    scoring_of,
    serving_usd_per_month,
    tokens_usd,
)

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
    assert cost.student_to_teacher_cost == pytest.approx(
        cost.serving_usd_per_month / cost.teacher_usd_per_month, rel=1e-3
    )


def test_the_walkthroughs_case_gives_the_break_even_traffic_and_both_prices_per_million_tokens() -> None:
    """The README's case (examples/run.yaml, the walkthrough's shard reports): one always-on GPU at
    $1,460 a month against $1,089 for the teacher API at 270k requests. The figures say plainly that the
    teacher is cheaper at that traffic, and from which traffic on the student is."""
    from distillery_trainer.cost import worth_it

    from tests.support.reports import summaries

    spec = load_run(EXAMPLES / "run.yaml").spec
    shards = [CollectionSummary.model_validate(s) for s in summaries(8)]
    cost = run_cost(spec, shards, gpu_hours=2.5)
    answered = 8 * (1500 - 2 - 10)  # done - cached: the requests the teacher was paid for
    per_request = 8 * (1500 * 400 * 2.5 + 1500 * 300 * 10) / 1e6 / answered  # $0.00403
    out_per_request = 8 * 1500 * 300 / answered  # 302 output tokens
    assert cost.serving_usd_per_month == 1460.0 and cost.teacher_usd_per_month == pytest.approx(1088.71)
    assert cost.requests_per_month == 270_000
    assert cost.student_to_teacher_cost == pytest.approx(1.341)  # the student costs 1.34x the API
    assert cost.break_even_requests_per_month == math.ceil(1460 / per_request) == 362_080
    assert cost.teacher_usd_per_million_output_tokens == pytest.approx(
        per_request / out_per_request * 1e6, abs=0.01
    )
    assert cost.teacher_usd_per_million_output_tokens == pytest.approx(13.33)
    assert cost.student_usd_per_million_output_tokens == pytest.approx(
        1460 / (270_000 * out_per_request) * 1e6, abs=0.01
    )
    assert cost.student_usd_per_million_output_tokens == pytest.approx(17.88)
    assert worth_it(cost) == (
        "At 270,000 requests a month (cost.requestsPerMonth) the teacher API is cheaper: $1,089 a month "
        "against $1,460 for the student (the student costs 1.34× as much); per million output tokens "
        "$17.88 (student) against $13.33 (teacher). The student is cheaper above 362,080 requests a month."
    )
    spec.cost.requests_per_month = 1_000_000
    busy = run_cost(spec, shards, None)
    assert busy.break_even_requests_per_month == 362_080 and busy.student_to_teacher_cost < 1
    old = {
        "servingUSDPerMonth": 1460.0,
        "teacherUSDPerMonth": 1088.71,
        "savingsRatio": 0.746,
    }  # before the rename
    assert CostResults.model_validate(old).student_to_teacher_cost is None
    assert worth_it(busy).startswith(
        "At 1,000,000 requests a month (cost.requestsPerMonth) the student is cheaper"
    )  # type: ignore[union-attr]


def test_cached_answers_do_not_count_as_traffic_and_nothing_is_invented() -> None:
    spec = parse_run(make_run().obj()).spec
    cost = run_cost(spec, [], gpu_hours=None)
    assert cost.collection_usd is None and cost.training_usd is None and cost.teacher_usd_per_month is None
    assert cost.break_even_requests_per_month is None and cost.student_to_teacher_cost is None
    assert cost.serving_usd_per_month == serving_usd_per_month(1, 1, 2.0)
    cached = [CollectionSummary(shard=0, shards=1, total=5, done=5, cached=5)]
    assert run_cost(spec, cached, None).teacher_usd_per_month is None


def test_no_teacher_price_means_no_teacher_monthly_cost() -> None:
    spec = parse_run(
        make_run().spec({"teacher": {"pricing": {"inputPerMTokUSD": 0, "outputPerMTokUSD": 0}}}).obj()
    ).spec
    paid = [CollectionSummary(shard=0, shards=1, total=5, done=5, input_tokens=500, output_tokens=100)]
    assert run_cost(spec, paid, None).teacher_usd_per_month is None


def _on_policy(tokens: int, elapsed: float) -> TrainingProgress:
    return TrainingProgress(
        method="onPolicy",
        teacher_tokens_scored=tokens,
        elapsed_seconds=elapsed,
        gpus=4,
        gpu_hours=4 * elapsed / 3600,
    )


def test_an_endpoint_teachers_scoring_is_its_scored_tokens_at_its_input_price() -> None:
    """onPolicy sends the student's samples to the teacher as prompts: 4M scored tokens at $2.5 per
    million input tokens is $10, its own figure and in the total; the monthly figures and the break-even
    (the teacher's price per request against the student's monthly cost) do not move."""
    from tests.support.reports import summaries

    teacher = {
        "endpoint": {"baseURL": "http://vllm.example:8000/v1"},  # a vLLM endpoint returns prompt logprobs
        "logprobs": {"topK": 20},
        "pricing": {"inputPerMTokUSD": 2.5, "outputPerMTokUSD": 10},
    }
    spec = parse_run(make_run().spec({"teacher": teacher, "training": {"method": "onPolicy"}}).obj()).spec
    assert spec.teacher.endpoint is not None and spec.teacher.pricing.input_per_mtok_usd == 2.5
    shards = [CollectionSummary.model_validate(s) for s in summaries(8)]
    scored, hours = scoring_of(spec, _on_policy(4_000_000, 1800.0))
    assert (scored, hours) == (4_000_000, None)  # the run keeps no endpoint up
    cost = run_cost(spec, shards, gpu_hours=2.0, scored_tokens=scored, teacher_gpu_hours=hours)
    plain = run_cost(spec, shards, gpu_hours=2.0)
    assert cost.teacher_scoring_usd == pytest.approx(10.0) and plain.teacher_scoring_usd is None
    assert cost.total_usd == pytest.approx(cost.collection_usd + 4.0 + 10.0)  # type: ignore[operator]
    assert plain.total_usd == pytest.approx(plain.collection_usd + 4.0)  # type: ignore[operator]
    same = ("break_even_requests_per_month", "teacher_usd_per_month", "student_to_teacher_cost")
    assert [getattr(cost, k) for k in same] == [getattr(plain, k) for k in same]


def test_a_self_hosted_teachers_scoring_is_its_gpus_for_the_trainings_wall_time() -> None:
    """A self-hosted teacher is kept up for the whole onPolicy training: its tensorParallelSize GPUs x the
    training's wall time (1.5 h) x cost.gpuHourUSD ($3), whatever teacher.pricing says of its tokens."""
    spec = parse_run(
        make_run()
        .self_hosted()
        .spec(
            {
                "teacher": {"selfHosted": {"tensorParallelSize": 4}, "pricing": {"inputPerMTokUSD": 100}},
                "training": {"method": "onPolicy"},
                "cost": {"gpuHourUSD": 3.0},
            }
        )
        .obj()
    ).spec
    assert scoring_gpu_hours(spec, 5400.0) == pytest.approx(6.0)
    scored, hours = scoring_of(spec, _on_policy(1_000_000, 5400.0))
    assert (scored, hours) == (1_000_000, pytest.approx(6.0))
    cost = run_cost(spec, [], gpu_hours=6.0, scored_tokens=scored, teacher_gpu_hours=hours)
    assert cost.teacher_scoring_usd == pytest.approx(18.0) and cost.training_usd == pytest.approx(18.0)
    assert cost.total_usd == pytest.approx(36.0)  # no collection summary: scoring + training
    # Any other method scores nothing: no figure (not $0), and no teacher GPU-hours.
    sft = spec.model_copy(update={"training": spec.training.model_copy(update={"method": "sft"})})
    assert scoring_gpu_hours(sft, 5400.0) is None
    assert scoring_of(sft, TrainingProgress(method="sft", elapsed_seconds=5400.0)) == (None, None)
    assert run_cost(sft, [], gpu_hours=6.0).teacher_scoring_usd is None
