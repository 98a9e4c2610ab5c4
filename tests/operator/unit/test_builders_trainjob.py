"""The Kubeflow Trainer v2 TrainJob the operator builds, held against Trainer v2.3.0's own CRD schema
(tests/support/data/kubeflow-trainjob-v1alpha1.schema.yaml), single-node and multi-node."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import jsonschema
import pytest
import yaml
from distillery_operator.builders.common import Run
from distillery_operator.builders.train import trainjob, workload_id
from distillery_operator.naming import QUEUE_LABEL, WORKLOAD_LABEL
from distillery_operator.settings import Settings
from distillery_operator.validate import _to_json_schema
from distillery_trainer.api.spec import DistillationRunSpec

from tests.conftest import REPO
from tests.support.builders import make_run

SCHEMA = REPO / "tests/support/data/kubeflow-trainjob-v1alpha1.schema.yaml"
SETTINGS = Settings(
    node_selector={"pool": "gpu"},
    tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    queue_name="team-a-gpus",
)
# The TrainJob's own CEL rule on its name (metadata.name is an RFC 1035 label of at most 63 characters).
RFC_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@functools.cache
def validator() -> jsonschema.Draft4Validator:
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(_to_json_schema(schema))


def run(nodes: int, gpus: int, **training: Any) -> Run:
    spec = (
        make_run("contracts-8b", "team-a")
        .storage()
        .spec(
            {
                "training": {"resources": {"nodes": nodes, "gpusPerNode": gpus}, **training},
                "huggingFace": {"tokenSecretRef": {"name": "hf", "key": "token"}},
            }
        )
        .obj()["spec"]
    )
    modes = ("ReadWriteMany",) if nodes > 1 else ("ReadWriteOnce",)  # what the claim index saw
    return Run("contracts-8b", "team-a", "uid-1", DistillationRunSpec.model_validate(spec), modes)


def errors(job: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator().iter_errors(job)]


def node_patch(job: dict[str, Any]) -> dict[str, Any]:
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the trainer's replicated job in Kubeflow's torch runtimes
    template: dict[str, Any] = node["template"]["spec"]["template"]
    return template


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 8), (4, 8)], ids=["1x1", "1x8", "4x8"])
def test_the_trainjob_validates_against_the_trainer_crd_schema(nodes: int, gpus: int) -> None:
    job = trainjob(run(nodes, gpus), SETTINGS, "i2-abc", 3)
    assert errors(job) == []
    assert RFC_1035.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, gpus)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert trainer["command"] == [
        "torchrun",
        "--no-python",
        "distillery-trainer",
        "train",
        "--config",
        "/etc/distillery/stage.yaml",
    ]  # the runtime's torch plugin sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR... for torchrun


def test_the_schema_catches_what_trainer_v2_3_would_refuse() -> None:
    """The schema is strict about fields: an older release's names are caught (a test that can fail)."""
    job = trainjob(run(2, 8), SETTINGS, "i2-abc", 1)
    bad = copy.deepcopy(job)
    bad["spec"]["podTemplateOverrides"] = bad["spec"].pop("runtimePatches")  # v2.1's name
    bad["spec"]["trainer"]["numProcPerNode"] = "auto"  # an int in v2.3
    del bad["spec"]["runtimeRef"]
    messages = " | ".join(errors(bad))
    assert "podTemplateOverrides" in messages and "runtimeRef" in messages and "'auto'" in messages


def test_the_runtime_is_the_operators_default_unless_the_run_names_one() -> None:
    default = trainjob(run(1, 1), SETTINGS, "i", 1)["spec"]["runtimeRef"]
    assert default == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    tuned = trainjob(run(1, 1, runtime="torch-tuned"), SETTINGS, "i", 1)["spec"]["runtimeRef"]
    assert tuned["name"] == "torch-tuned"
    other = Settings(training_runtime="platform-torch")
    assert trainjob(run(1, 1), other, "i", 1)["spec"]["runtimeRef"]["name"] == "platform-torch"


def test_secrets_reach_the_trainer_only_as_secret_key_refs() -> None:
    env = trainjob(run(2, 8), SETTINGS, "i", 1)["spec"]["trainer"]["env"]
    hf = next(e for e in env if e["name"] == "HF_TOKEN")
    assert hf == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert all("value" in e or "secretKeyRef" in e.get("valueFrom", {}) for e in env)
    assert not any(e["name"].startswith("PET_") for e in env)  # reserved: Trainer's webhook refuses them


def test_volume_config_security_and_placement_go_through_the_runtime_patch() -> None:
    job = trainjob(run(2, 8), SETTINGS, "i2-abc", 3)
    pod = node_patch(job)
    spec = pod["spec"]
    assert {v["name"] for v in spec["volumes"]} == {"home", "config", "data", "shm"}
    assert next(v for v in spec["volumes"] if v["name"] == "data") == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "distill-data"},
    }
    (container,) = spec["containers"]
    assert container["name"] == "node"  # the trainer container of Kubeflow's torch runtimes
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/etc/distillery", "/dev/shm"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "priorityClassName" not in spec  # not a field Trainer's runtime patches allow


def test_the_operator_finds_the_pods_by_their_labels_and_kueue_by_the_trainjobs() -> None:
    job = trainjob(run(2, 8), SETTINGS, "i2-abc", 3)
    labels = node_patch(job)["metadata"]["labels"]
    assert labels["distillery.dev/run"] == "contracts-8b"
    assert labels["app.kubernetes.io/managed-by"] == "distillery-operator"
    assert labels["app.kubernetes.io/component"] == "train"
    assert labels[WORKLOAD_LABEL] == job["metadata"]["labels"][WORKLOAD_LABEL] == workload_id("i2-abc", 3)
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a-gpus"  # Kueue's TrainJob integration
    assert QUEUE_LABEL not in labels  # Kueue admits the TrainJob, not its pods one by one
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_the_deadline_is_the_trainjobs_active_deadline() -> None:
    assert (
        trainjob(run(1, 1, deadlineSeconds=3600), SETTINGS, "i", 1)["spec"]["activeDeadlineSeconds"] == 3600
    )
    none = Settings(train_deadline_seconds=0)
    assert "activeDeadlineSeconds" not in trainjob(run(1, 1), none, "i", 1)["spec"]
