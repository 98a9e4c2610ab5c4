"""What reaches the pods beyond the stage config: the Hugging Face token (a ``secretKeyRef``, in every pod
that downloads a model, never a value), the ConfigMap of prompts mounted into the collection pods, and
settable resources (collection, evaluation and vLLM pods; a bounded ``/dev/shm``), valid for Kubernetes
(kubernetes-validate, strict)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from distillery_operator.builders.collect import PROMPTS_MOUNT, collect_job, teacher_deployment
from distillery_operator.builders.common import HF_TOKEN_ENV, VOLUME_ROOT_ENV, Run
from distillery_operator.builders.config import config_map
from distillery_operator.builders.evaluate import eval_job
from distillery_operator.builders.serve import serve_deployment
from distillery_operator.builders.train import pytorch_job, train_job
from distillery_operator.settings import Settings
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.collect.prompts import PROMPTS_DIR_ENV

from tests.support.builders import DELETE, make_run

K8S_VERSIONS = ("1.30", "1.37")
PLANTED = "hf_PLANTEDtoken0123456789abcdef"  # what the Secret holds: the operator must never see it
HF = {"huggingFace": {"tokenSecretRef": {"name": "hf-token", "key": "token"}}}


def _run(builder: Any, name: str = "gated") -> Run:
    return Run(name, "team-a", "uid-9", DistillationRunSpec.model_validate(builder.obj()["spec"]))


def _children(run: Run, settings: Settings) -> dict[str, dict[str, Any]]:
    out = {
        "config": config_map(run, settings),
        "collect": collect_job(run, settings, "i"),
        "pytorchjob": pytorch_job(run, settings, "i"),
        "train-job": train_job(run, settings, "i"),
        "serve": serve_deployment(run, settings, "i", replicas=1),
        "eval": eval_job(run, settings, "i"),
    }
    if run.spec.teacher.self_hosted is not None:
        out["teacher"] = teacher_deployment(run, settings)
    return out


def _pods(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    if manifest["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()]
    if manifest["kind"] in ("Job", "Deployment"):
        return [manifest["spec"]["template"]["spec"]]
    return []


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


# ---------------------------------------------------------------------------------------------- HF token


def gated() -> Run:
    # A gated teacher served for the run, KD with top-k (collection loads its tokenizer), 2-node training.
    return _run(
        make_run("gated")
        .self_hosted("meta-llama/Llama-3.1-70B-Instruct")
        .kd()
        .storage()
        .spec({**HF, "training": {"resources": {"nodes": 2}}})
    )


def test_every_pod_that_downloads_a_model_gets_the_token_as_a_secret_key_ref(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The operator's own environment holding a token must not leak into what it builds either.
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", PLANTED)
    children = _children(gated(), Settings())
    wanted = {"teacher", "collect", "pytorchjob", "train-job", "serve"}
    for key in wanted:
        pods = _pods(children[key])
        assert len(pods) == (2 if key == "pytorchjob" else 1)  # the Master and the Worker
        for pod in pods:
            ref = _env(pod)[HF_TOKEN_ENV]
            assert ref == {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
            }, key
    # The evaluation downloads no model: no token there (least privilege).
    assert HF_TOKEN_ENV not in _env(_pods(children["eval"])[0])
    for key, manifest in children.items():
        text = json.dumps(manifest)
        assert PLANTED not in text, key
        for pod in _pods(manifest):
            assert not any(PLANTED in a for a in pod["containers"][0].get("args", []))
    # The ConfigMap names the Secret (it is the spec) but holds no value.
    assert "hf-token" in children["config"]["data"]["stage.yaml"]


def test_without_a_token_secret_no_pod_gets_hf_token() -> None:
    run = _run(make_run("open").self_hosted("Qwen/Qwen2.5-7B-Instruct").storage())
    for key, manifest in _children(run, Settings()).items():
        for pod in _pods(manifest):
            assert HF_TOKEN_ENV not in _env(pod), key


def test_the_token_is_referenced_never_inlined() -> None:
    with pytest.raises(ValueError, match="tokenSecretRef"):
        DistillationRunSpec.model_validate(make_run().spec({"huggingFace": {"token": PLANTED}}).obj()["spec"])


def test_pods_on_the_volume_know_its_root_for_pvc_model_refs() -> None:
    run = _run(make_run("vol").self_hosted("pvc://models/teacher").storage())
    children = _children(run, Settings())
    for key in ("teacher", "collect", "train-job", "serve", "eval"):
        assert _env(_pods(children[key])[0])[VOLUME_ROOT_ENV] == {"name": VOLUME_ROOT_ENV, "value": "/data"}
    # vLLM knows no pvc://: the teacher's Deployment gets the path where the volume is mounted.
    args = _pods(children["teacher"])[0]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/data/models/teacher"


# ---------------------------------------------------------------------------------------------- prompts


def test_prompts_from_a_config_map_are_mounted_into_the_collection_pods() -> None:
    run = _run(
        make_run("cm")
        .storage()
        .spec(
            {"data": {"prompts": {"pvcPath": DELETE, "configMapRef": {"name": "prompts", "key": "p.jsonl"}}}}
        )
    )
    job = collect_job(run, Settings(), "i")
    pod = _pods(job)[0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["prompts"] == {
        "name": "prompts",
        "configMap": {"name": "prompts", "items": [{"key": "p.jsonl", "path": "p.jsonl"}]},
    }
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["prompts"] == {"name": "prompts", "mountPath": PROMPTS_MOUNT, "readOnly": True}
    # Not inside the config volume's mount: a mount point inside a read-only ConfigMap volume cannot be made.
    assert not PROMPTS_MOUNT.startswith(mounts["config"]["mountPath"] + "/")
    assert _env(pod)[PROMPTS_DIR_ENV] == {"name": PROMPTS_DIR_ENV, "value": PROMPTS_MOUNT}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    # Only the collection reads the prompts.
    for key in ("eval", "train-job", "serve"):
        assert "prompts" not in {v["name"] for v in _pods(_children(run, Settings())[key])[0]["volumes"]}


def test_pvc_prompts_mount_no_config_map() -> None:
    pod = _pods(collect_job(_run(make_run("pvc").storage()), Settings(), "i"))[0]
    assert "prompts" not in {v["name"] for v in pod["volumes"]}
    assert PROMPTS_DIR_ENV not in _env(pod)


# ---------------------------------------------------------------------------------------------- resources


def _resources(manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(_pods(manifest)[0]["containers"][0]["resources"])


def _shm(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in _pods(manifest)[0]["volumes"] if v["name"] == "shm")


def test_defaults_come_from_the_operator_settings() -> None:
    settings = Settings(
        collection_resources={"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "768Mi"}},
        evaluation_resources={"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "6Gi"}},
        vllm_resources={"requests": {"cpu": "4", "memory": "32Gi"}},
        shm_size="4Gi",
    )
    run = _run(make_run("defaults").self_hosted().storage())
    children = _children(run, settings)
    assert _resources(children["collect"]) == settings.collection_resources
    assert _resources(children["eval"]) == settings.evaluation_resources
    for key in ("serve", "teacher"):
        res = _resources(children[key])
        assert res["requests"] == {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"}
        assert res["limits"] == {"nvidia.com/gpu": "1"}
        assert _shm(children[key]) == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}
    for key in ("train-job", "pytorchjob"):
        assert _shm(children[key])["emptyDir"]["sizeLimit"] == "4Gi"  # never an unbounded memory disk


def test_built_in_defaults_give_vllm_pods_requests_and_a_bounded_shm() -> None:
    children = _children(_run(make_run("builtin").self_hosted().storage()), Settings())
    for key in ("serve", "teacher"):
        res = _resources(children[key])
        assert {"cpu", "memory"} <= set(res["requests"])
        assert _shm(children[key])["emptyDir"]["sizeLimit"]
    assert _resources(children["eval"])["limits"]["memory"]  # an OOM is bounded and can be raised


def test_the_spec_overrides_the_defaults() -> None:
    run = _run(
        make_run("custom")
        .self_hosted()
        .storage()
        .spec(
            {
                "collection": {"resources": {"requests": {"cpu": "2", "memory": "3Gi"}}},
                "evaluation": {
                    "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "12Gi"}}
                },
                "serving": {
                    "gpus": 2,
                    "shmSize": "16Gi",
                    "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"cpu": "16"}},
                },
            }
        )
    )
    children = _children(run, Settings())
    assert _resources(children["collect"]) == {"requests": {"cpu": "2", "memory": "3Gi"}}
    assert _resources(children["eval"]) == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "12Gi"},
    }
    assert _resources(children["serve"]) == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"cpu": "16", "nvidia.com/gpu": "2"},
    }
    # serving.* is the run's vLLM settings: the self-hosted teacher's pods too (its GPUs are its own).
    teacher = _resources(children["teacher"])
    assert teacher["requests"]["memory"] == "64Gi" and teacher["requests"]["nvidia.com/gpu"] == "1"
    assert _shm(children["serve"])["emptyDir"]["sizeLimit"] == "16Gi"
    assert _shm(children["teacher"])["emptyDir"]["sizeLimit"] == "16Gi"
    for manifest in children.values():
        if manifest["kind"] != "PyTorchJob":
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)


def test_a_limit_below_its_request_is_rejected_with_its_path() -> None:
    spec = make_run().spec(
        {"evaluation": {"resources": {"requests": {"memory": "4Gi"}, "limits": {"memory": "2Gi"}}}}
    )
    with pytest.raises(ValueError, match="limits.memory"):
        DistillationRunSpec.model_validate(spec.obj()["spec"])


def test_settings_read_the_chart_environment() -> None:
    settings = Settings.from_env(
        {
            "DISTILLERY_COLLECTION_RESOURCES": '{"requests": {"cpu": "1"}}',
            "DISTILLERY_EVALUATION_RESOURCES": '{"limits": {"memory": "9Gi"}}',
            "DISTILLERY_VLLM_RESOURCES": '{"requests": {"memory": "20Gi"}}',
            "DISTILLERY_SHM_SIZE": "2Gi",
        }
    )
    assert settings.collection_resources == {"requests": {"cpu": "1"}}
    assert settings.evaluation_resources == {"limits": {"memory": "9Gi"}}
    assert settings.vllm_resources == {"requests": {"memory": "20Gi"}}
    assert settings.shm_size == "2Gi"
    with pytest.raises(ValueError, match="DISTILLERY_VLLM_RESOURCES"):
        Settings.from_env({"DISTILLERY_VLLM_RESOURCES": '{"requests": {"gpu": "1"}}'})


# ---------------------------------------------------------------------------------------------- quotas


def _replicas(manifest: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """Each pod spec of a workload with how many of its pods run at once."""
    spec = manifest.get("spec", {})
    if manifest["kind"] == "PyTorchJob":
        return [(r["template"]["spec"], r["replicas"]) for r in spec["pytorchReplicaSpecs"].values()]
    if manifest["kind"] == "Job":
        return [(spec["template"]["spec"], spec.get("parallelism", 1))]
    if manifest["kind"] == "Deployment":
        return [(spec["template"]["spec"], spec["replicas"])]
    return []


def _quantity(text: str) -> float:
    from distillery_trainer.api.spec import quantity_value

    return float(quantity_value(text))


def quota_usage(manifest: dict[str, Any], tracked: tuple[str, ...] = ("cpu", "memory")) -> dict[str, float]:
    """What the ResourceQuota admission plugin would charge the pods of a workload (the emulator has no
    quota; this plays it): a quota that tracks requests.cpu or requests.memory refuses a pod whose
    container does not request it ("must specify requests.cpu"), and charges the sum of the requests."""
    used = dict.fromkeys(tracked, 0.0)
    for pod, count in _replicas(manifest):
        for container in pod["containers"] + pod.get("initContainers", []):
            requests = container.get("resources", {}).get("requests", {})
            for name in tracked:
                assert name in requests, (
                    f"{manifest['metadata']['name']}: container {container['name']} requests no {name}: "
                    f"a namespace with a requests.{name} quota refuses the pod"
                )
                used[name] += _quantity(requests[name]) * count
    return used


QUOTA_RUNS = {
    "external-teacher": lambda: make_run("quota").storage(),
    "self-hosted": lambda: make_run("quota").self_hosted().storage(),
    "multi-node": lambda: make_run("quota").storage().spec({"training": {"resources": {"nodes": 3}}}),
    "set-resources": lambda: (
        make_run("quota").storage().spec({"training": {"resources": {"cpu": "16", "memory": "128Gi"}}})
    ),
}


@pytest.mark.parametrize("settings", [Settings(), Settings.from_env({})], ids=["built-in", "chart-less"])
@pytest.mark.parametrize("name", sorted(QUOTA_RUNS))
def test_every_workload_pod_requests_cpu_and_memory(name: str, settings: Settings) -> None:
    """docs/multi-tenancy.md: a ResourceQuota on requests.cpu and requests.memory caps a team. That holds
    only if every pod a run creates (collection shards, training master and workers, a self-hosted
    teacher, the served student, the evaluation) requests both: a quota refuses a pod that does not."""
    children = _children(_run(QUOTA_RUNS[name](), "quota"), settings)
    workloads = {k: m for k, m in children.items() if _replicas(m)}
    assert {"collect", "pytorchjob", "train-job", "serve", "eval"} <= set(workloads)
    for manifest in workloads.values():
        used = quota_usage(manifest)
        assert used["cpu"] > 0 and used["memory"] > 0


def test_a_quota_charges_the_training_nodes_their_requests() -> None:
    settings = Settings(training_resources={"requests": {"cpu": "4", "memory": "32Gi"}})
    run = _run(make_run("quota").storage().spec({"training": {"resources": {"nodes": 3}}}), "quota")
    children = _children(run, settings)
    for key in ("pytorchjob", "train-job"):
        used = quota_usage(children[key])  # master + 2 workers, or 3 indexed pods at once
        assert used == {"cpu": 12.0, "memory": 3 * 32 * 2**30}, key


def test_training_pods_take_the_operator_default_unless_the_run_sets_cpu_or_memory() -> None:
    settings = Settings(
        training_resources={
            "requests": {"cpu": "6", "memory": "48Gi"},
            "limits": {"cpu": "12", "memory": "64Gi"},
        }
    )
    children = _children(_run(make_run("train").storage(), "train"), settings)
    for key in ("pytorchjob", "train-job"):
        assert _resources(children[key]) == {
            "requests": {"cpu": "6", "memory": "48Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "12", "memory": "64Gi", "nvidia.com/gpu": "1"},
        }
    # The run's training.resources.cpu / .memory replace the default's for that resource: the request,
    # and its limit (memory: the run's value is the limit as well, as before; cpu: no limit).
    run = _run(make_run("train").storage().spec({"training": {"resources": {"memory": "200Gi"}}}), "train")
    for key in ("pytorchjob", "train-job"):
        assert _resources(_children(run, settings)[key]) == {
            "requests": {"cpu": "6", "memory": "200Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "12", "memory": "200Gi", "nvidia.com/gpu": "1"},
        }
    run = _run(make_run("train").storage().spec({"training": {"resources": {"cpu": "32"}}}), "train")
    res = _resources(_children(run, settings)["pytorchjob"])
    assert res["requests"]["cpu"] == "32" and "cpu" not in res["limits"]  # never a limit below the request
    for manifest in _children(run, settings).values():
        if manifest["kind"] != "PyTorchJob":
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)


def test_settings_read_the_training_default_from_the_chart_environment() -> None:
    settings = Settings.from_env(
        {"DISTILLERY_TRAINING_RESOURCES": '{"requests": {"cpu": "2", "memory": "8Gi"}}'}
    )
    assert settings.training_resources == {"requests": {"cpu": "2", "memory": "8Gi"}}
    with pytest.raises(ValueError, match="DISTILLERY_TRAINING_RESOURCES"):
        Settings.from_env({"DISTILLERY_TRAINING_RESOURCES": '{"requests": {"cpu": "lots"}}'})
