"""What the stage pods report (their termination messages), built from the trainer's own models so a
change of the contract breaks these tests, and a driver that plays every controller through a run."""

from __future__ import annotations

from typing import Any

from distillery_trainer.api.spec import Pricing
from distillery_trainer.api.status import Latency, Results
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.cost import tokens_usd

from tests.support.kube.cluster import Cluster, now

PRICING = Pricing(input_per_mtok_usd=2.5, output_per_mtok_usd=10)


def summaries(shards: int, per_shard: int = 1500, *, pricing: Pricing = PRICING) -> list[dict[str, Any]]:
    out = []
    for shard in range(shards):
        inp, outp = per_shard * 400, per_shard * 300
        out.append(
            CollectionSummary(
                shard=shard,
                shards=shards,
                total=per_shard,
                done=per_shard - 2,
                failed=2,
                cached=10,
                requests=per_shard + 5,
                retries=5,
                input_tokens=inp,
                output_tokens=outp,
                cost_usd=tokens_usd(inp, outp, pricing),
                wall_seconds=60.0,
                prompts_per_second=25.0,
            ).to_dict()
        )
    return out


def progress(gpu_hours: float = 2.5) -> dict[str, Any]:
    return TrainingProgress(
        state="Succeeded",
        method="sft",
        step=300,
        total_steps=300,
        epoch=2.0,
        loss=0.42,
        tokens_per_second=5200.0,
        elapsed_seconds=1125.0,
        world_size=8,
        gpus=8,
        gpu_hours=gpu_hours,
    ).to_dict()


def results(retention: float = 0.91, p95: float = 900.0) -> dict[str, Any]:
    data = Results(
        quality_retention=retention,
        student_score=0.82 * retention / 0.91,
        teacher_score=0.82 / 0.91,
        metric="judge",
        samples=600,
        latency_ms=Latency(p50=450.0, p95=p95, p99=1200.0),
        teacher_latency_ms=Latency(p50=2100.0, p95=4200.0, p99=5100.0),
        throughput_tokens_per_sec=880.0,
        errors=0,
        provenance_digest="sha256:" + "ab" * 32,
    ).to_dict()
    data["truncated"] = False  # what termination.compact adds: the operator must ignore it
    return data


async def drive_to_evaluated(
    cluster: Cluster, namespace: str, name: str, *, shards: int, retention: float = 0.91
) -> None:
    """Play the Job, training and Deployment controllers from collection to the evaluation's end."""
    await cluster.wait_for(lambda: cluster.get("Job", namespace, f"{name}-collect"), "the collection Job")
    started = now()
    await cluster.finish_collection(namespace, name, summaries(shards))
    await cluster.wait_for(lambda: cluster.get("PyTorchJob", namespace, f"{name}-train"), "the PyTorchJob")
    await cluster.finish_training(namespace, name, progress(), started=started)
    await cluster.wait_for(
        lambda: cluster.get("Deployment", namespace, f"{name}-serve"), "the serving Deployment"
    )
    await cluster.roll_out(namespace, f"{name}-serve")
    await cluster.wait_for(lambda: cluster.get("Job", namespace, f"{name}-eval"), "the evaluation Job")
    await cluster.finish_evaluation(namespace, name, results(retention))
