"""One set of stage rules: for every leaf of the spec, an edit restarts the same stages in the operator
(the planner, on a finished run whose children carry the old inputs) as in `distillery run` (the local
executor's reuse checks, on outputs whose records the stages themselves wrote)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from distillery_operator.local import state as executor_state
from distillery_operator.observe import Child
from distillery_operator.policy import flag_names
from distillery_operator.settings import Settings
from distillery_trainer import outputs
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stages import (
    EXECUTION,
    SCHEME,
    STAGES,
    VERDICT_ONLY,
    collection_failures,
    fingerprints,
    inputs_changed,
    later,
    stage,
    verdict,
)
from distillery_trainer.api.status import Interval, Results
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.layout import RunLayout, atomic_write_json
from pydantic import ValidationError

from tests.operator.unit.test_planner import SETTINGS, World
from tests.support.builders import DELETE, make_run
from tests.support.reports import progress, results

# Every optional section set, so that every field of the model is a leaf to walk.
FULL_ENDPOINT: dict[str, Any] = {
    "teacher": {
        "sampling": {"temperature": 0.3, "topP": 0.9, "maxTokens": 512, "seed": 7},
        "logprobs": {"topK": 8},
        "pricing": {"inputPerMTokUSD": 2.5, "outputPerMTokUSD": 10},
    },
    "student": {
        "tokenizer": "meta-llama/Llama-3.1-8B-Instruct",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
        "prune": {"keepLayers": 12},
    },
    "data": {"evalFraction": 0.1, "maxPrompts": 1000, "systemPrompt": "be brief"},
    "collection": {
        "shards": 3,
        "parallelism": 2,
        "concurrency": 8,
        "requestsPerMinute": 600,
        "tokensPerMinute": 100000,
        "maxRetries": 4,
        "timeoutSeconds": 60,
        "backoffLimitPerIndex": 2,
        "cache": True,
        "deadlineSeconds": 86400,
        "resources": {"requests": {"cpu": "1"}, "limits": {"memory": "8Gi"}},
        "maxFailedFraction": 0.05,
    },
    "training": {
        "method": "kd",
        "kd": {"temperature": 2.0, "alpha": 0.5, "divergence": "jsd", "jsdBeta": 0.4, "source": "topk"},
        "seqkd": {"samples": 2, "selection": "bestLogprob"},
        "onPolicy": {
            "lmbda": 0.4,
            "offPolicyWarmup": 0.1,
            "offPolicyDivergence": "jsd",
            "divergence": "jsd",
            "beta": 0.3,
            "temperature": 0.9,
            "maxNewTokens": 64,
            "samplesPerPrompt": 2,
            "topK": 16,
            "chunkTokens": 512,
            "sampler": "vllm",
            "vllmGpuMemoryUtilization": 0.4,
        },
        "dpo": {"enabled": True, "beta": 0.2, "pairs": 64, "epochs": 1.0, "learningRate": 1e-6},
        "epochs": 1.5,
        "maxSteps": 100,
        "maxSeconds": 3600,
        "learningRate": 1e-4,
        "lrScheduler": "linear",
        "warmupRatio": 0.05,
        "weightDecay": 0.01,
        "batchSize": 4,
        "gradientAccumulationSteps": 2,
        "maxSeqLength": 1024,
        "packing": True,
        "precision": "bf16",
        "strategy": "ddp",
        "gradientCheckpointing": True,
        "checkpointEverySteps": 50,
        "seed": 3,
        "resources": {
            "nodes": 1,
            "gpusPerNode": 2,
            "gpuResource": "nvidia.com/gpu",
            "cpu": "4",
            "memory": "32Gi",
        },
        "backend": "pytorchjob",
        "runtime": "torch-distributed",
        "image": "ghcr.io/example/trainer:1.0",
        "deadlineSeconds": 604800,
    },
    "serving": {
        "image": "vllm/vllm-openai:v0.9.0",
        "replicas": 1,
        "gpus": 1,
        "keep": True,
        "keepOnFailure": True,
        "maxModelLen": 2048,
        "dtype": "bfloat16",
        "gpuMemoryUtilization": 0.8,
        "maxLogprobs": 10,
        "extraArgs": ["--enable-prefix-caching"],
        "resources": {"requests": {"cpu": "4"}, "limits": {"memory": "32Gi"}},
        "shmSize": "8Gi",
    },
    "evaluation": {
        "judge": {"endpoint": {"baseURL": "https://judge.example/v1", "model": "judge"}, "rubric": "be fair"},
        "metrics": ["exact_match", "rouge_l"],
        "minQualityRetention": 0.9,
        "maxErrorFraction": 0.05,
        "maxSamples": 200,
        "baseline": True,
        "load": {
            "requests": 50,
            "concurrency": 4,
            "warmupRequests": 4,
            "maxTokens": 64,
            "compareTeacher": True,
        },
        "bootstrapSamples": 500,
        "confidence": 0.9,
        "deadlineSeconds": 3600,
        "resources": {"requests": {"memory": "2Gi"}},
    },
    "cost": {"gpuHourUSD": 2.0, "requestsPerMonth": 1000000},
    "storage": {"pvc": {"claimName": "distill-data", "subPath": "team-a"}},
    "scheduling": {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "batch",
        "queueName": "team-a",
    },
    "huggingFace": {"tokenSecretRef": {"name": "hf", "key": "token"}},
}
# The other branches: a self-hosted teacher, a Hugging Face dataset, seqkd, an operator-created claim.
FULL_SELF_HOSTED: dict[str, Any] = {
    "teacher": {
        "endpoint": DELETE,
        "selfHosted": {
            "model": "Qwen/Qwen2.5-7B-Instruct",
            "tensorParallelSize": 2,
            "maxModelLen": 4096,
            "dtype": "bfloat16",
            "extraArgs": ["--enforce-eager"],
        },
    },
    "data": {
        "prompts": {
            "pvcPath": DELETE,
            "hfDataset": {"name": "org/prompts", "split": "train", "config": "en", "promptField": "q"},
        }
    },
    "training": {"method": "seqkd", "seqkd": {"samples": 3, "selection": "all"}},
    "storage": {"pvc": {"claimName": "distill-data", "create": {"size": "100Gi", "deleteWithRun": True}}},
}

ALTERNATIVES = (
    "sft", "kd", "seqkd", "onPolicy", "forwardKL", "reverseKL", "jsd", "auto", "topk", "online", "bestLogprob", "all",
    "cosine", "linear", "constant", "bf16", "fp16", "fp32", "ddp", "fsdp", "trainjob", "job",
    "exact_match", "rouge_l", "ReadWriteMany", "ReadWriteOnce", "Equal", "PreferNoSchedule", "float16", "64Gi",
    "generate",
)  # fmt: skip


def full_spec(patch: dict[str, Any]) -> dict[str, Any]:
    return make_run("r", "ns").spec(FULL_ENDPOINT).spec(patch).obj()["spec"]


def leaves(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in leaves(v, (*path, k))]
    return [path]


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def candidates(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [round(value * 0.5, 6), round(value + 0.01, 6), round(value * 2, 6), 0.5]
    if isinstance(value, str):
        return [a for a in ALTERNATIVES if a != value] + [value + "2", value + "-2"]
    if isinstance(value, list):
        return [value[:-1], [*value, copy.deepcopy(value[-1])]] if value else []
    return []


def mutated(spec: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any] | None:
    """The spec with the leaf at ``path`` changed to another valid value (None if none is found)."""
    value = spec
    for key in path:
        value = value[key]
    for candidate in candidates(value):
        changed = _set(spec, path, candidate)
        try:
            DistillationRunSpec.model_validate(changed)
        except ValidationError:
            continue
        return changed
    return None


# ---------------------------------------------------------------------------------------------- the two modes


def allowing(*specs: dict[str, Any]) -> Settings:
    """A platform policy that allows what these specs set: the walk asks what an edit restarts, and
    whether the platform allows an image, a placement or a vLLM flag is another question
    (tests/operator/unit/test_policy.py)."""
    parsed = [DistillationRunSpec.model_validate(s) for s in specs]
    args = [
        a
        for p in parsed
        for a in [*p.serving.extra_args, *(p.teacher.self_hosted.extra_args if p.teacher.self_hosted else [])]
    ]
    return replace(
        SETTINGS,
        allowed_image_prefixes=("",),
        allow_scheduling_overrides=True,
        allowed_priority_classes=tuple(p.scheduling.priority_class_name or "" for p in parsed),
        vllm_args_allowlist=tuple(name for a in args for name in flag_names(a)),
    )


def operator_restarts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The stages the planner restarts when a finished run's spec is edited from ``old`` to ``new``."""
    world = World(spec=old, settings=allowing(old, new))
    for _ in range(3):  # the claim the operator creates is bound, a self-hosted teacher becomes ready
        world.plan()
        claim = world.children.get(("PersistentVolumeClaim", "distill-data"))
        if claim is not None:
            world.children[(claim.kind, claim.name)] = Child(
                **{**claim.__dict__, "status": {"phase": "Bound"}}
            )
        if ("Deployment", "r-teacher") in world.children:
            world.roll_out("teacher")
    world.collect(DistillationRunSpec.model_validate(old).collection.shards)
    world.plan()
    world.train(progress(gpu_hours=2.5))
    world.plan()
    world.roll_out()
    world.plan()
    world.evaluate(results(0.95))
    world.plan()
    assert world.status["phase"] in ("Succeeded", "Failed"), world.status.get("message")
    world.spec, world.generation = new, 2
    world.plan()
    first = next((s for s in STAGES if world.status[s.status_field]["state"] != "Succeeded"), None)
    return [s.name for s in later(first)] if first is not None else []


def finished_outputs(layout: RunLayout, spec: DistillationRunSpec) -> None:
    """What a finished local run leaves: the stages' records (written by the stages' own claim) and
    the files the executor looks for."""
    for name in ("collect", "train", "evaluate"):
        outputs.claim(layout, name, spec, lambda _: None)
    shards = spec.collection.shards
    for i in range(shards):
        summary = CollectionSummary(shard=i, shards=shards, total=10, done=10)
        atomic_write_json(layout.summary_file(i), summary.to_dict())
    atomic_write_json(layout.progress_file, TrainingProgress(state="Succeeded", method="sft").to_dict())
    atomic_write_json(layout.student_dir / "config.json", {})
    atomic_write_json(layout.results_file, {"results": {}})


def local_restarts(tmp: Path, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The stages `distillery run` runs again after the same edit. It serves the student on every run
    (a process, not an output): what counts there is that a serving edit evaluates again."""
    layout = RunLayout(tmp)
    finished_outputs(layout, DistillationRunSpec.model_validate(old))
    spec = DistillationRunSpec.model_validate(new)
    again = {
        "collect": not executor_state.collect_done(layout, spec),
        "train": not executor_state.train_done(layout, spec),
        "evaluate": not executor_state.evaluate_done(layout, spec),
    }
    return [s.name for s in STAGES if again.get(s.name)]


def same_restarts(cluster: list[str], local: list[str]) -> bool:
    return [s for s in cluster if s != "serve"] == local and ("serve" not in cluster or "evaluate" in local)


BASES = {"endpoint": {}, "self-hosted": FULL_SELF_HOSTED}


@pytest.mark.parametrize("base", BASES)
def test_every_spec_leaf_restarts_the_same_stages_in_both_modes(base: str, tmp_path: Path) -> None:
    spec = full_spec(BASES[base])
    DistillationRunSpec.model_validate(spec)
    walked, unchanged, differ = 0, [], []
    for i, path in enumerate(leaves(spec)):
        new = mutated(spec, path)
        if new is None:
            unchanged.append(".".join(map(str, path)))
            continue
        walked += 1
        cluster = operator_restarts(spec, new)
        local = local_restarts(tmp_path / str(i), spec, new)
        if not same_restarts(cluster, local):
            differ.append((".".join(map(str, path)), cluster, local))
    assert differ == []
    assert walked >= 60, (walked, unchanged)
    # Leaves no other valid value was found for (a fixed value, or one pinned by a cross-field rule).
    assert set(unchanged) <= {"serving.engine", "training.strategy"}, (
        unchanged
    )  # a Literal of one; LoRA pins ddp


@pytest.mark.parametrize(
    ("leaf", "value", "restarts"),
    [
        ("teacher.sampling.temperature", 0.7, ["collect", "train", "serve", "evaluate"]),
        ("data.evalFraction", 0.2, ["collect", "train", "serve", "evaluate"]),
        ("collection.shards", 4, ["collect", "train", "serve", "evaluate"]),
        ("storage.pvc.subPath", "team-b", ["collect", "train", "serve", "evaluate"]),
        ("training.epochs", 3.0, ["train", "serve", "evaluate"]),
        ("student.lora.rank", 32, ["train", "serve", "evaluate"]),
        ("serving.maxModelLen", 4096, ["serve", "evaluate"]),
        ("evaluation.load.requests", 80, ["evaluate"]),
        ("evaluation.load.warmupRequests", 8, ["evaluate"]),
        # The baseline answers are the untrained student's: training writes them whenever the switch is on,
        # and turning it off or on re-scores, never re-trains.
        ("evaluation.baseline", False, ["evaluate"]),
        ("evaluation.metrics", ["rouge_l"], ["evaluate"]),
        ("collection.concurrency", 64, []),
        ("collection.requestsPerMinute", 60, []),
        ("collection.maxFailedFraction", 0.5, []),
        ("training.backend", "job", []),
        ("training.runtime", "torch-tuned", []),
        ("serving.replicas", 3, []),
        ("serving.keep", False, []),
        ("scheduling.queueName", "team-b", []),
        ("collection.resources.limits.memory", "16Gi", []),
        ("evaluation.resources.requests.memory", "6Gi", []),
        ("serving.resources.requests.cpu", "8", []),
        ("serving.shmSize", "16Gi", []),
        ("huggingFace.tokenSecretRef.name", "other-token", []),
        ("evaluation.minQualityRetention", 0.5, []),
        ("evaluation.maxErrorFraction", 0.5, []),
        ("cost.gpuHourUSD", 9.0, []),
    ],
)
def test_what_an_edit_restarts(leaf: str, value: Any, restarts: list[str], tmp_path: Path) -> None:
    spec = full_spec({})
    new = _set(spec, tuple(leaf.split(".")), value)
    DistillationRunSpec.model_validate(new)
    assert operator_restarts(spec, new) == restarts
    assert local_restarts(tmp_path, spec, new) == [s for s in restarts if s != "serve"]


def test_a_collection_past_max_failed_fraction_is_not_done_until_the_bar_allows_it(tmp_path: Path) -> None:
    spec = DistillationRunSpec.model_validate(full_spec({}))  # maxFailedFraction 0.05, 3 shards
    layout = RunLayout(tmp_path)
    finished_outputs(layout, spec)
    assert executor_state.collect_done(layout, spec)
    bad = CollectionSummary(shard=1, shards=3, total=10, done=8, failed=2, failure_kinds={"refused": 2})
    atomic_write_json(layout.summary_file(1), bad.to_dict())  # 2 of 30 prompts: 6.7 %
    assert not executor_state.collect_done(layout, spec)  # `distillery run` collects again (and fails again)
    message = collection_failures(executor_state.collection_summaries(layout, 3), spec.collection)
    assert (
        message is not None and "2 of 30 prompts failed (6.7%) > collection.maxFailedFraction 0.05" in message
    )
    assert "most common failure: refused (2 prompts)" in message
    raised = DistillationRunSpec.model_validate(full_spec({"collection": {"maxFailedFraction": 0.1}}))
    assert executor_state.collect_done(
        layout, raised
    )  # raising the bar reuses the collection: nothing restarts


def test_seqkd_samples_are_a_collection_input_only_when_the_method_samples_several() -> None:
    base = full_spec({"training": {"method": "seqkd", "seqkd": {"samples": 2}}})
    more = _set(base, ("training", "seqkd", "samples"), 4)
    fp = [fingerprints(DistillationRunSpec.model_validate(s)) for s in (base, more)]
    assert fp[0]["collect"] != fp[1]["collect"]
    sft = full_spec({"training": {"method": "sft", "seqkd": {"samples": 2}}})
    sft_more = _set(sft, ("training", "seqkd", "samples"), 4)
    fp = [fingerprints(DistillationRunSpec.model_validate(s)) for s in (sft, sft_more)]
    assert fp[0]["collect"] == fp[1]["collect"] and fp[0]["train"] != fp[1]["train"]


def test_every_excluded_path_names_a_field_of_the_spec() -> None:
    spec = full_spec({})
    for path in EXECUTION + VERDICT_ONLY:
        node: Any = spec
        for key in path.split("."):
            assert key in node, path
            node = node[key]
    for st in STAGES:
        for path in st.inputs:
            assert path.split(".")[0] in DistillationRunSpec.model_json_schema(by_alias=True)["properties"]


def test_fingerprints_are_chained_and_versioned() -> None:
    fp = fingerprints(DistillationRunSpec.model_validate(full_spec({})))
    assert all(v.startswith(SCHEME) for v in fp.values()) and len(set(fp.values())) == 4
    # A fingerprint of an older scheme (or none) is adopted; one of this scheme that differs is not.
    assert not inputs_changed(None, fp["train"]) and not inputs_changed("0123456789abcdef", fp["train"])
    assert inputs_changed(fp["collect"], fp["train"]) and not inputs_changed(fp["train"], fp["train"])
    assert json.dumps(fp)  # plain strings, fit for an annotation


def test_the_verdict_is_one_rule_for_every_caller() -> None:
    ev = DistillationRunSpec.model_validate(full_spec({})).evaluation
    passed = verdict(Results(quality_retention=0.95, retention_interval=Interval(low=0.91, high=0.99)), ev)
    assert (passed.passed, passed.phase, passed.reason, passed.conclusive) == (
        True,
        "Succeeded",
        "QualityGatePassed",
        True,
    )
    straddles = verdict(Results(quality_retention=0.88, retention_interval=Interval(low=0.8, high=0.93)), ev)
    assert (straddles.passed, straddles.reason, straddles.conclusive) == (False, "QualityGateFailed", False)
    assert "straddles 0.9" in straddles.message and "evaluation.minQualityRetention 0.9" in straddles.message
    none = verdict(Results(), ev)
    assert (none.passed, none.reason) == (False, stage("evaluate").failed_reason)


def test_failed_requests_fail_the_gate_in_the_cluster_too() -> None:
    """The planner re-judges from the results the evaluate pod reported, with the same rule."""
    spec = full_spec({})
    world = World(spec=spec, settings=allowing(spec))
    world.plan()
    world.collect(3)
    world.plan()
    world.train(progress())
    world.plan()
    world.roll_out()
    world.plan()
    world.evaluate({**results(0.99), "errorFraction": 0.3})
    world.plan()
    assert world.status["phase"] == "Failed" and world.status["results"]["gatePassed"] is False
    assert (
        "30.0% of the student's requests failed > evaluation.maxErrorFraction 0.05" in world.status["message"]
    )
    world.spec, world.generation = _set(spec, ("evaluation", "maxErrorFraction"), 0.5), 2
    world.plan()  # a verdict-only edit: re-judged, nothing runs again
    assert world.status["phase"] == "Succeeded"
