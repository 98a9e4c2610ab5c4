"""The child manifests, without a server: valid for Kubernetes 1.30 and 1.37 (kubernetes-validate, strict),
the PyTorchJob valid for Kubeflow's CRD schema, and every pod locked down and placed as asked."""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from distillery_operator.builders.collect import collect_job, teacher_deployment, teacher_service
from distillery_operator.builders.common import Run
from distillery_operator.builders.config import config_map
from distillery_operator.builders.evaluate import eval_job
from distillery_operator.builders.serve import serve_deployment, serve_service, startup_budget, student_server
from distillery_operator.builders.train import pytorch_job, rendezvous_service, train_job
from distillery_operator.naming import HASH_ANNOTATION, INPUTS_ANNOTATION, QUEUE_LABEL
from distillery_operator.settings import Settings
from distillery_operator.validate import _to_json_schema
from distillery_trainer.api.names import MAX_NODES, MAX_RUN_NAME, MAX_SHARDS, run_name_problem
from distillery_trainer.api.resource import load_yaml
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stage import StageConfig
from distillery_trainer.serve import VLLM_IMAGE, VllmServer

from tests.conftest import EXAMPLES, REPO
from tests.support.builders import make_run

K8S_VERSIONS = ("1.30", "1.37")
SETTINGS = Settings(
    node_selector={"pool": "gpu"},
    tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
)


def example(name: str, **patch: Any) -> Run:
    doc = load_yaml((EXAMPLES / name).read_text(encoding="utf-8"))
    spec = doc["spec"]
    spec.setdefault("storage", {"pvc": {"claimName": "distill-data"}})
    spec.update(patch)
    return Run(
        doc["metadata"]["name"],
        doc["metadata"].get("namespace", "default"),
        "uid-1",
        DistillationRunSpec.model_validate(spec),
    )


def custom() -> Run:
    doc = (
        make_run("custom", "ns-1")
        .spec(
            {
                "storage": {"pvc": {"claimName": "shared", "subPath": "team-a/distillery"}},
                "collection": {"shards": 16, "parallelism": 4, "backoffLimitPerIndex": 5},
                "training": {
                    "backend": "job",
                    "image": "registry.local/trainer:dev",
                    "resources": {
                        "nodes": 3,
                        "gpusPerNode": 2,
                        "gpuResource": "amd.com/gpu",
                        "cpu": "8",
                        "memory": "64Gi",
                    },
                },
                "serving": {
                    "replicas": 3,
                    "gpus": 2,
                    "image": "registry.local/vllm:dev",
                    "extraArgs": ["--enable-prefix-caching"],
                },
                "evaluation": {
                    "judge": {
                        "endpoint": {
                            "baseURL": "https://judge.example/v1",
                            "model": "judge",
                            "apiKeySecretRef": {"name": "judge", "key": "token"},
                        }
                    }
                },
                "scheduling": {
                    "nodeSelector": {"pool": "a100", "zone": "z1"},
                    "tolerations": [
                        {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}
                    ],
                    "priorityClassName": "batch-high",
                    "queueName": "team-a",
                },
            }
        )
        .obj()
    )
    return Run("custom", "ns-1", "uid-2", DistillationRunSpec.model_validate(doc["spec"]))


def single_node_claim(run: Run) -> Run:
    """The run as the planner sees it when its claim is ReadWriteOnce."""
    return dataclasses.replace(run, claim_modes=("ReadWriteOnce",))


def on_policy(**teacher: Any) -> Run:
    """whitebox-kd.yaml trained on-policy on one node: its self-hosted teacher scores the training."""
    run = example("whitebox-kd.yaml")
    doc = run.spec.to_dict()
    doc["training"].update(method="onPolicy", resources={"nodes": 1, "gpusPerNode": 4})
    if teacher:
        doc["teacher"] = teacher
    return dataclasses.replace(run, spec=DistillationRunSpec.model_validate(doc))


RUNS = {
    "run.yaml": lambda: example("run.yaml"),
    "whitebox-kd.yaml+rwo": lambda: single_node_claim(example("whitebox-kd.yaml")),
    "on-policy+rwo": lambda: single_node_claim(on_policy()),
    "whitebox-kd.yaml": lambda: example("whitebox-kd.yaml"),
    "local-cpu.yaml": lambda: example("local-cpu.yaml"),
    "custom": custom,
}


def children(run: Run, settings: Settings = SETTINGS) -> dict[str, dict[str, Any]]:
    out = {
        "config": config_map(run, settings),
        "collect": collect_job(run, settings, "in-c"),
        "pytorchjob": pytorch_job(run, settings, "in-t"),
        "train-job": train_job(run, settings, "in-t"),
        "rendezvous": rendezvous_service(run, settings),
        "serve": serve_deployment(run, settings, "in-s", replicas=run.spec.serving.replicas),
        "serve-svc": serve_service(run, settings),
        "eval": eval_job(run, settings, "in-e"),
    }
    if run.spec.teacher.self_hosted is not None:
        out["teacher"] = teacher_deployment(run, settings)
        out["teacher-svc"] = teacher_service(run, settings)
    return out


def all_manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for run_id, make in RUNS.items():
        for child_id, manifest in children(make()).items():
            yield f"{run_id}:{child_id}", manifest


MANIFESTS = dict(all_manifests())
BUILTIN = {k: v for k, v in MANIFESTS.items() if v["kind"] != "PyTorchJob"}
PYTORCHJOBS = {k: v for k, v in MANIFESTS.items() if v["kind"] == "PyTorchJob"}


def pod_templates(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    if manifest["kind"] == "PyTorchJob":
        return [r["template"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()]
    if manifest["kind"] in ("Job", "Deployment"):
        return [manifest["spec"]["template"]]
    return []


WORKLOADS = {k: v for k, v in MANIFESTS.items() if pod_templates(v)}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("key", sorted(BUILTIN))
def test_builtin_manifests_are_valid_kubernetes(key: str, version: str) -> None:
    kubernetes_validate.validate(BUILTIN[key], version, strict=True)


@functools.cache
def pytorchjob_validator() -> jsonschema.Draft4Validator:
    schema = yaml.safe_load(
        (REPO / "tests/support/data/kubeflow-pytorchjob-v1.schema.yaml").read_text(encoding="utf-8")
    )
    return jsonschema.Draft4Validator(_to_json_schema(schema))


@pytest.mark.parametrize("key", sorted(PYTORCHJOBS))
def test_pytorchjobs_match_the_kubeflow_schema(key: str) -> None:
    job = PYTORCHJOBS[key]
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in pytorchjob_validator().iter_errors(job)]
    assert errors == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for replica in replicas.values():
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        assert replica["template"]["spec"]["containers"][0]["name"] == "pytorch"  # what Kubeflow looks for
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": replica["template"],
        }
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(template, version, strict=True)


def test_the_schema_catches_what_kubeflow_would_reject() -> None:
    job = copy.deepcopy(next(iter(PYTORCHJOBS.values())))
    job["spec"]["nprocPerNode"] = 8  # a string in Kubeflow's API
    job["spec"]["runPolicy"]["cleanPodPolicies"] = "None"  # a typo
    del job["spec"]["pytorchReplicaSpecs"]
    messages = [e.message for e in pytorchjob_validator().iter_errors(job)]
    assert any("is not of type 'string'" in m for m in messages)
    assert any("cleanPodPolicies" in m for m in messages)
    assert any("pytorchReplicaSpecs" in m for m in messages)


def test_pytorchjob_shape_follows_the_resources() -> None:
    run = example("whitebox-kd.yaml")  # 2 nodes x 4 GPUs
    job = pytorch_job(run, SETTINGS, "x")
    assert job["spec"]["nprocPerNode"] == "4"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "torchrun",
        "--no-python",
        "distillery-trainer",
        "train",
        "--config",
        "/etc/distillery/stage.yaml",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    volumes = {
        v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    }
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}  # bounded
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "distill-rwx"
    one_node = pytorch_job(example("run.yaml"), SETTINGS, "x")
    assert (
        set(one_node["spec"]["pytorchReplicaSpecs"]) == {"Master"} and one_node["spec"]["nprocPerNode"] == "8"
    )


def test_the_indexed_job_backend_runs_torchrun_with_explicit_rendezvous() -> None:
    run = custom()  # 3 nodes x 2 GPUs, backend job
    job = train_job(run, SETTINGS, "x")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "custom-train" and pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["command"][:6] == [
        "torchrun",
        "--nnodes=3",
        "--nproc-per-node=2",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=custom-train-0.custom-train",
        "--master-port=29500",
    ]
    index_env = container["env"][0]
    assert index_env["name"] == "JOB_COMPLETION_INDEX"  # defined before it is referenced
    assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]
    assert (
        container["resources"]["limits"]["amd.com/gpu"] == "2"
        and container["image"] == "registry.local/trainer:dev"
    )
    service = rendezvous_service(run, SETTINGS)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod_labels(job).items()


def pod_labels(manifest: dict[str, Any]) -> dict[str, str]:
    return dict(pod_templates(manifest)[0]["metadata"]["labels"])


@pytest.mark.parametrize("key", sorted(WORKLOADS))
def test_every_pod_is_locked_down_and_placed(key: str) -> None:
    manifest = WORKLOADS[key]
    run_id = key.split(":")[0]
    for template in pod_templates(manifest):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False  # workload pods need no API access
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            for env in container.get("env", []):
                assert "value" in env or "secretKeyRef" in env["valueFrom"] or "fieldRef" in env["valueFrom"]
        tolerations = pod["tolerations"]
        assert tolerations[0] == dict(SETTINGS.tolerations[0])
        if run_id == "custom":
            assert pod["nodeSelector"] == {"pool": "a100", "zone": "z1"}  # the spec wins over the default
            assert pod["priorityClassName"] == "batch-high"
            assert {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"} in tolerations
        else:
            assert pod["nodeSelector"] == {"pool": "gpu"} and "priorityClassName" not in pod
        assert QUEUE_LABEL not in template["metadata"]["labels"]  # Kueue admits the workload, not its pods
    assert (manifest["metadata"]["labels"].get(QUEUE_LABEL) == "team-a") == (run_id == "custom")


@pytest.mark.parametrize("key", sorted(MANIFESTS))
def test_names_labels_and_owner(key: str) -> None:
    manifest = MANIFESTS[key]
    meta = manifest["metadata"]
    run = RUNS[key.split(":")[0]]()
    assert meta["name"].startswith(run.name + "-") and meta["namespace"] == run.namespace
    labels = meta["labels"]
    assert labels["distillery.dev/run"] == run.name and labels["app.kubernetes.io/instance"] == run.name
    assert labels["app.kubernetes.io/managed-by"] == "distillery-operator"
    assert (
        labels["app.kubernetes.io/part-of"] == "distillery"
        and labels["app.kubernetes.io/name"] == "distillery"
    )
    assert labels["distillery.dev/stage"] in ("config", "collect", "train", "serve", "evaluate")
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "distillery.dev/v1alpha1",
            "kind": "DistillationRun",
            "name": run.name,
            "uid": run.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert len(meta["annotations"][HASH_ANNOTATION]) == 16


def test_the_stage_config_is_the_spec_plus_where_things_are_and_never_a_secret() -> None:
    run = example("run.yaml")
    data = config_map(run, SETTINGS)["data"]["stage.yaml"]
    config = StageConfig.model_validate(yaml.safe_load(data))
    assert config.spec == run.spec
    assert config.artifacts == "/data/runs/team-a/contracts-8b" and config.cache_dir == "/data/cache"
    assert (config.teacher.base_url, config.teacher.model) == ("https://api.openai.com/v1", "gpt-4o")
    assert config.student.base_url == "http://contracts-8b-serve.team-a.svc:8000/v1"
    assert config.student.model == "contracts-8b"
    assert config.run.uid == "uid-1"
    # The Secret is named, its value is nowhere; pods get it as secretKeyRef env vars.
    collect = collect_job(run, SETTINGS, "x")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in collect["env"] if "valueFrom" in e}
    assert refs == {"DISTILLERY_TEACHER_API_KEY": {"name": "openai", "key": "api-key"}}
    evaluate = eval_job(run, SETTINGS, "x")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in evaluate["env"] if "valueFrom" in e}
    assert refs == {"DISTILLERY_JUDGE_API_KEY": "openai", "DISTILLERY_TEACHER_API_KEY": "openai"}
    self_hosted = example("whitebox-kd.yaml")
    teacher = StageConfig.model_validate(
        yaml.safe_load(config_map(self_hosted, SETTINGS)["data"]["stage.yaml"])
    ).teacher
    assert (teacher.base_url, teacher.model) == ("http://qwen-kd-teacher.team-a.svc:8000/v1", "teacher")
    sub_path = custom()
    config = StageConfig.model_validate(yaml.safe_load(config_map(sub_path, SETTINGS)["data"]["stage.yaml"]))
    # The claim's subPath is mounted at the data mount: the paths within it are the same.
    assert config.artifacts == "/data/runs/ns-1/custom" and config.cache_dir == "/data/cache"


def test_collection_is_an_indexed_job_with_bounded_parallelism() -> None:
    spec = collect_job(custom(), SETTINGS, "x")["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 16, 4)
    assert spec["backoffLimitPerIndex"] == 5 and spec["template"]["spec"]["restartPolicy"] == "Never"
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["distillery-trainer", "collect", "--config", "/etc/distillery/stage.yaml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/etc/distillery" in mounts and mounts["/data"]["subPath"] == "team-a/distillery"
    example_mounts = {
        m["mountPath"]
        for m in collect_job(example("run.yaml"), SETTINGS, "x")["spec"]["template"]["spec"]["containers"][0][
            "volumeMounts"
        ]
    }
    assert "/data" in example_mounts


def test_serving_is_vllm_with_the_shared_argument_builder() -> None:
    run = custom()
    deployment = serve_deployment(run, SETTINGS, "x", replicas=3)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    server = VllmServer.for_student(run.spec.serving, "/data/runs/ns-1/custom/student", "custom")
    assert container["command"] + container["args"] == server.command() + server.args()
    assert student_server(run, SETTINGS) == server
    assert "--enable-prefix-caching" in container["args"] and "--tensor-parallel-size" in container["args"]
    assert container["image"] == "registry.local/vllm:dev"
    assert (
        example("run.yaml")
        and serve_deployment(example("run.yaml"), SETTINGS, "x", replicas=1)["spec"]["template"]["spec"][
            "containers"
        ][0]["image"]
        == VLLM_IMAGE
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= SETTINGS.startup_seconds
    assert container["resources"]["limits"]["amd.com/gpu"] == "2"
    assert (
        deployment["spec"]["replicas"] == 3
        and deployment["metadata"]["annotations"][INPUTS_ANNOTATION] == "x"
    )
    service = serve_service(run, SETTINGS)
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    model = example("run.yaml")
    args = serve_deployment(model, SETTINGS, "x", replicas=1)["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert args[args.index("--model") + 1] == "/data/runs/team-a/contracts-8b/student"
    assert args[args.index("--served-model-name") + 1] == "contracts-8b"


def test_a_self_hosted_teacher_is_served_with_its_logprobs() -> None:
    run = example("whitebox-kd.yaml")
    container = teacher_deployment(run, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--model") + 1] == "Qwen/Qwen2.5-7B-Instruct"
    assert args[args.index("--served-model-name") + 1] == "teacher"
    assert args[args.index("--max-logprobs") + 1] == "64"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_builds_are_deterministic_and_the_hash_follows_the_content() -> None:
    first, again = children(example("run.yaml")), children(example("run.yaml"))
    assert first == again
    changed = children(example("run.yaml", serving={"replicas": 2, "gpus": 1}))
    assert (
        changed["serve"]["metadata"]["annotations"][HASH_ANNOTATION]
        != first["serve"]["metadata"]["annotations"][HASH_ANNOTATION]
    )
    assert changed["collect"] == first["collect"] or changed["config"] != first["config"]


def pod_hostnames(manifest: dict[str, Any]) -> list[str]:
    """The hostnames a child's pods get, as Kubernetes and Kubeflow name them: an Indexed Job's pod i is
    ``<job>-<i>``; a PyTorchJob's pods (and the Service the training operator makes for each) are
    ``<job>-master-0`` and ``<job>-worker-<i>``. A Deployment's pods get generated names, which the kubelet
    cuts to 63 characters for the hostname: they cannot be too long."""
    name, spec = manifest["metadata"]["name"], manifest.get("spec") or {}
    if manifest["kind"] == "Job" and spec.get("completionMode") == "Indexed":
        return [f"{name}-{spec['completions'] - 1}"]
    if manifest["kind"] == "PyTorchJob":
        replicas = spec["pytorchReplicaSpecs"]
        return [f"{name}-{kind.lower()}-{r['replicas'] - 1}" for kind, r in replicas.items()]
    return []


RFC_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def widest(name: str) -> Run:
    """A run of that name with the most shards and training nodes the spec allows and a self-hosted
    teacher: every kind of child, each with its most pods."""
    doc = (
        make_run(name, "team-a")
        .self_hosted()
        .storage()
        .spec({"collection": {"shards": MAX_SHARDS}, "training": {"resources": {"nodes": MAX_NODES}}})
        .obj()
    )
    return Run(name, "team-a", "uid-1", DistillationRunSpec.model_validate(doc["spec"]))


def test_a_run_name_at_the_bound_fits_every_child_name_and_pod_hostname() -> None:
    """Every name a run's children and their pods get is an RFC 1035 label of at most 63 characters
    (Services must be; the others are DNS-1123 labels, which RFC 1035 labels are too), for a name at the
    bound the API package sets (the CRD, `distillery validate` and the planner all use it)."""
    at_bound = "run-" + "x" * (MAX_RUN_NAME - 4)
    assert run_name_problem(at_bound) is None
    names: list[str] = []
    for manifest in children(widest(at_bound)).values():
        names += [manifest["metadata"]["name"], *pod_hostnames(manifest)]
        if manifest["kind"] != "PyTorchJob":
            kubernetes_validate.validate(manifest, "1.37", strict=True)
    assert any(n.endswith(f"-train-worker-{MAX_NODES - 2}") for n in names)
    assert any(n.endswith(f"-collect-{MAX_SHARDS - 1}") for n in names)
    bad = [n for n in names if len(n) > 63 or not RFC_1035_LABEL.match(n)]
    assert bad == []
    # The bound is tight: one character more and the longest name no longer fits.
    longer = [n for m in children(widest(at_bound + "x")).values() for n in pod_hostnames(m)]
    assert max(len(n) for n in longer) == 64


# ---------------------------------------------------------------------------------------------- deadlines


def test_every_job_runs_under_a_deadline_from_the_spec_else_the_operators() -> None:
    run = example("run.yaml")
    settings = Settings(
        collect_deadline_seconds=111, train_deadline_seconds=222, evaluate_deadline_seconds=333
    )
    built = children(run, settings)
    assert built["collect"]["spec"]["activeDeadlineSeconds"] == 111
    assert built["train-job"]["spec"]["activeDeadlineSeconds"] == 222
    assert built["pytorchjob"]["spec"]["runPolicy"]["activeDeadlineSeconds"] == 222
    assert built["eval"]["spec"]["activeDeadlineSeconds"] == 333
    # The defaults are bounded: no stage runs forever unless the operator says so (0).
    defaults = children(run, Settings())
    assert all(
        0 < defaults[k]["spec"]["activeDeadlineSeconds"] <= 7 * 86400
        for k in ("collect", "train-job", "eval")
    )
    own = example(
        "run.yaml",
        collection={"deadlineSeconds": 600},
        training={"deadlineSeconds": 7200},
        evaluation={"deadlineSeconds": 900},
    )
    built = children(own, settings)
    assert built["collect"]["spec"]["activeDeadlineSeconds"] == 600
    assert built["train-job"]["spec"]["activeDeadlineSeconds"] == 7200
    assert built["pytorchjob"]["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    assert built["eval"]["spec"]["activeDeadlineSeconds"] == 900
    for key in ("collect", "train-job", "eval"):
        kubernetes_validate.validate(built[key], "1.37", strict=True)
    none = children(
        run, Settings(collect_deadline_seconds=0, train_deadline_seconds=0, evaluate_deadline_seconds=0)
    )
    assert "activeDeadlineSeconds" not in none["collect"]["spec"]
    assert "activeDeadlineSeconds" not in none["pytorchjob"]["spec"]["runPolicy"]


@pytest.mark.parametrize("startup_seconds", [60, 1800, 7200])
def test_a_vllm_deployment_waits_for_its_startup_probe_before_giving_up(startup_seconds: int) -> None:
    """Kubernetes' default progressDeadlineSeconds (600 s) fired while the startup probe still allowed
    1800 s: the planner failed the stage of a server still loading its weights."""
    settings = Settings(startup_seconds=startup_seconds)
    for deployment in (
        serve_deployment(example("run.yaml"), settings, "x", replicas=1),
        teacher_deployment(example("whitebox-kd.yaml"), settings),
    ):
        probe = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        budget = probe.get("initialDelaySeconds", 0) + probe["failureThreshold"] * probe["periodSeconds"]
        assert budget >= startup_seconds and startup_budget(probe) == budget
        # Scheduling and the image pull come before the probe counts: a margin on top.
        assert deployment["spec"]["progressDeadlineSeconds"] >= budget + 300
        kubernetes_validate.validate(deployment, "1.37", strict=True)


# ---------------------------------------------------------------------------------------------- ReadWriteOnce


def _affinity_terms(template: dict[str, Any]) -> list[dict[str, Any]]:
    affinity = template["spec"].get("affinity") or {}
    terms: list[dict[str, Any]] = (affinity.get("podAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or []
    return terms


def _selects(term: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = term["labelSelector"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", ()):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


# Every workload of a run that mounts its claim: a self-hosted teacher, the collection shards, the training
# (either backend, master and workers), the served student and the evaluation.
CLAIM_USERS = ("teacher", "collect", "pytorchjob", "train-job", "serve", "eval")


@pytest.mark.parametrize("modes", [("ReadWriteOnce",), ("ReadWriteOnce", "ReadWriteMany"), ()])
def test_every_pod_of_a_run_on_a_readwriteonce_claim_shares_one_node(modes: tuple[str, ...]) -> None:
    """A ReadWriteOnce volume attaches to one node at a time: a pod on another node than a running pod
    of the same claim waits in Multi-Attach. The claim is mounted at once by the eight collection shards
    (and the teacher they query), by the evaluation beside the served student, and by a training that
    re-runs while the run's earlier student is still served. So on such a claim every pod of the run that
    mounts it carries a required pod affinity (kubernetes.io/hostname) to all of them: the first goes
    anywhere (a pod that matches its own term), the others follow while any is running (the scheduler
    ignores pods that have ended). ReadWriteMany, or a claim the operator could not see: none."""
    run = dataclasses.replace(example("whitebox-kd.yaml"), claim_modes=modes)
    built = children(run)
    assert set(CLAIM_USERS) <= set(built)
    if modes != ("ReadWriteOnce",):
        for key in CLAIM_USERS:
            assert all(not _affinity_terms(t) for t in pod_templates(built[key])), key
        return
    other_run = children(dataclasses.replace(run, name="other"))
    for key in CLAIM_USERS:
        for template in pod_templates(built[key]):
            (term,) = _affinity_terms(template)
            assert term["topologyKey"] == "kubernetes.io/hostname"
            for other in CLAIM_USERS:  # selects every pod it may share the claim with, its own included
                assert _selects(term, pod_labels(built[other])), (key, other)
                assert not _selects(term, pod_labels(other_run[other])), (key, "another run's", other)


def test_an_on_policy_training_on_a_readwriteonce_claim_sits_beside_the_teacher_that_scores_it() -> None:
    """The self-hosted teacher stays up through an on-policy training (the planner keeps it), so both
    use the single-node claim at once: the training's pods sit on the teacher's node."""
    built = children(single_node_claim(on_policy()))
    for key in ("teacher", "collect", "pytorchjob", "train-job"):
        for template in pod_templates(built[key]):
            (term,) = _affinity_terms(template)
            for other in ("teacher", "collect", "pytorchjob", "train-job"):
                assert _selects(term, pod_labels(built[other])), (key, other)
    for template in pod_templates(children(on_policy())["pytorchjob"]):
        assert not _affinity_terms(template)  # ReadWriteMany: placed freely


def test_on_policy_training_pods_reach_the_teacher_through_the_stage_config() -> None:
    """The training pods read the teacher's address where every stage does (the run's stage config: the
    self-hosted teacher's Service, else the endpoint) and, for an endpoint, its key as collection does."""
    config = StageConfig.model_validate(
        yaml.safe_load(config_map(on_policy(), SETTINGS)["data"]["stage.yaml"])
    )
    assert config.teacher_endpoint().base_url == "http://qwen-kd-teacher.team-a.svc:8000/v1"
    secret = {"name": "vllm", "key": "token"}
    endpoint = {"baseURL": "http://vllm.example:8000/v1", "model": "t", "apiKeySecretRef": secret}
    run = on_policy(endpoint=endpoint, logprobs={"topK": 20})
    config = StageConfig.model_validate(yaml.safe_load(config_map(run, SETTINGS)["data"]["stage.yaml"]))
    assert config.teacher_endpoint().base_url == "http://vllm.example:8000/v1"
    for job in (pytorch_job(run, SETTINGS, "in-t"), train_job(run, SETTINGS, "in-t")):
        env = {e["name"]: e for e in pod_templates(job)[0]["spec"]["containers"][0]["env"]}
        assert env["DISTILLERY_TEACHER_API_KEY"]["valueFrom"]["secretKeyRef"] == secret
    sft = example("run.yaml")
    env = pod_templates(pytorch_job(sft, SETTINGS, "in-t"))[0]["spec"]["containers"][0]["env"]
    assert "DISTILLERY_TEACHER_API_KEY" not in {e["name"] for e in env}  # sft never calls the teacher
