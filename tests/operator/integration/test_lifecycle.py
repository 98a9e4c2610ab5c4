"""Whole runs against the API emulator with the real operator process (`distillery operator`): the
lifecycle to a verdict, the quality gate, a failed shard, spec edits, the backends, a self-hosted teacher."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from distillery_trainer.api.resource import load_yaml
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.summaries import CollectionSummary
from distillery_trainer.cost import run_cost

from tests.conftest import EXAMPLES
from tests.support.builders import make_run
from tests.support.kube.cluster import Cluster, now, path
from tests.support.kube.emulator import AuditEntry, rbac_rules
from tests.support.kube.fixtures import StartOperator
from tests.support.kube.rbac import beyond_rbac
from tests.support.reports import drive_to_evaluated, progress, results, summaries

pytestmark = pytest.mark.slow

NS = "team-a"
NAME = "contracts-8b"


def example_run() -> dict[str, Any]:
    doc = load_yaml((EXAMPLES / "run.yaml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}


async def test_example_run_reaches_succeeded_with_retention_p95_and_cost(
    cluster: Cluster, start_operator: StartOperator, api_audit: list[AuditEntry]
) -> None:
    await start_operator()
    run = await cluster.apply_run(example_run())
    uid = run["metadata"]["uid"]

    status = await cluster.wait_phase(NS, NAME, "Collecting")
    assert status["collection"]["state"] == "Running"
    assert conditions(status)["Progressing"] == ("True", "Collecting")
    job = cluster.get("Job", NS, f"{NAME}-collect")
    assert job is not None and job["spec"]["completions"] == 8

    await drive_to_evaluated(cluster, NS, NAME, shards=8)
    status = await cluster.wait_phase(NS, NAME, "Succeeded")

    # The verdict: retention, p95 and the cost, exactly as the cost model computes it.
    res = status["results"]
    assert res["qualityRetention"] == 0.91 and res["gatePassed"] is True
    assert res["latencyMs"]["p95"] == 900.0
    spec = DistillationRunSpec.model_validate(example_run()["spec"])
    expected = run_cost(spec, [CollectionSummary.model_validate(s) for s in summaries(8)], 2.5).to_dict()
    assert res["cost"] == expected
    assert res["cost"]["trainingUSD"] == 5.0 and res["cost"]["servingUSDPerMonth"] == 1460.0
    assert (
        res["cost"]["breakEvenRequestsPerMonth"] == 362_080 and res["cost"]["studentToTeacherCost"] == 1.341
    )
    # the digest of the student's provenance, from the evaluation pod's termination message
    assert res["provenanceDigest"] == "sha256:" + "ab" * 32
    assert status["collection"]["done"] == 8 * 1498 and status["collection"]["inputTokens"] == 8 * 600_000
    assert status["training"]["gpuHours"] == 2.5 and status["training"]["step"] == 300
    assert status["serving"]["readyReplicas"] == 1
    assert status["endpoint"] == f"http://{NAME}-serve.{NS}.svc:8000/v1"
    assert status["observedGeneration"] == 1 and status["completionTime"]
    assert conditions(status) == {
        "Ready": ("True", "QualityGatePassed"),
        "Progressing": ("False", "QualityGatePassed"),
        "Degraded": ("False", "AsExpected"),
        "Succeeded": ("True", "QualityGatePassed"),
    }

    # Every child: created once, labelled, owned by the run; the serving Deployment still serves.
    children = cluster.children(NS, NAME)
    assert set(children) == {
        ("ConfigMap", f"{NAME}-config"),
        ("Job", f"{NAME}-collect"),
        ("PyTorchJob", f"{NAME}-train"),
        ("Deployment", f"{NAME}-serve"),
        ("Service", f"{NAME}-serve"),
        ("Job", f"{NAME}-eval"),
    }
    for (kind, name), obj in children.items():
        assert cluster.creations(kind, NS, name) == 1, (kind, name)
        labels = obj["metadata"]["labels"]
        assert labels["distillery.dev/run"] == NAME and labels["app.kubernetes.io/managed-by"]
        assert labels["distillery.dev/stage"] in {"config", "collect", "train", "serve", "evaluate"}
        assert [o["uid"] for o in obj["metadata"]["ownerReferences"]] == [uid]
    assert children[("Deployment", f"{NAME}-serve")]["spec"]["replicas"] == 1

    # Deleting the run leaves the rest to the garbage collector (owner references above): the operator
    # forgets the run and writes nothing more, though its children's events still arrive.
    await cluster.request("DELETE", path("DistillationRun", NS, NAME))
    await cluster.roll_out(NS, f"{NAME}-serve")
    before = [e for e in api_audit if e.agent == "distillery-operator"]
    await asyncio.sleep(1.0)
    assert [e for e in api_audit if e.agent == "distillery-operator"] == before

    # Children are watched through a label selector (a real API server filters; kmock ignores it).
    selector = "app.kubernetes.io/managed-by=distillery-operator,distillery.dev/run"
    for resource in (
        "pods",
        "configmaps",
        "services",
        "batch/jobs",
        "apps/deployments",
        "kubeflow.org/pytorchjobs",
    ):
        assert cluster.api.selectors[resource] == selector, resource
    assert cluster.api.selectors["distillery.dev/distillationruns"] is None

    # Everything the operator asked of the API server is within what the chart's Role grants.
    assert beyond_rbac(api_audit) == {}
    assert {"create", "watch"} <= rbac_rules(api_audit)["batch/jobs"] and "delete" not in rbac_rules(
        api_audit
    )["pods"]

    # An Event for every stage transition, in order.
    await cluster.wait_for(lambda: len(cluster.events(NS, NAME)) >= 9, "the events to be posted")
    reasons = [e["reason"] for e in cluster.events(NS, NAME)]
    assert reasons == [
        "Collecting",
        "CollectionSucceeded",
        "Training",
        "TrainingSucceeded",
        "Serving",
        "ServingReady",
        "Evaluating",
        "EvaluationSucceeded",
        "QualityGatePassed",
    ]


async def test_failing_quality_gate_fails_the_run_and_scales_serving_to_zero(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    await cluster.apply_run(example_run())
    await drive_to_evaluated(cluster, NS, NAME, shards=8, retention=0.80)
    status = await cluster.wait_phase(NS, NAME, "Failed")
    assert conditions(status)["Failed"] == ("True", "QualityGateFailed")
    assert conditions(status)["Ready"][0] == "False"
    assert "0.800 < evaluation.minQualityRetention 0.9" in status["message"]
    assert status["results"]["gatePassed"] is False and status["results"]["cost"]["trainingUSD"] == 5.0
    assert "endpoint" not in status
    deployment = await cluster.wait_for(
        lambda: (d := cluster.get("Deployment", NS, f"{NAME}-serve")) and d["spec"]["replicas"] == 0 and d,
        "the serving Deployment to be scaled to zero",
    )
    assert deployment["spec"]["replicas"] == 0
    await cluster.wait_for(
        lambda: any(
            e["reason"] == "QualityGateFailed" and e["type"] == "Warning" for e in cluster.events(NS, NAME)
        ),
        "a QualityGateFailed warning",
    )

    # Lowering the bar re-judges the measured results: no stage runs again, serving comes back.
    await cluster.patch_spec(NS, NAME, {"evaluation": {"minQualityRetention": 0.75}})
    status = await cluster.wait_phase(NS, NAME, "Succeeded")
    assert status["observedGeneration"] == 2
    await cluster.wait_for(
        lambda: cluster.get("Deployment", NS, f"{NAME}-serve")["spec"]["replicas"] == 1,
        "serving scaled back up",
    )
    assert cluster.creations("Job", NS, f"{NAME}-eval") == 1
    assert cluster.creations("PyTorchJob", NS, f"{NAME}-train") == 1
    assert beyond_rbac(cluster.api.audit) == {}


async def test_failed_gate_keeps_serving_when_asked_to(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    run = example_run()
    run["spec"]["serving"]["keepOnFailure"] = True
    await cluster.apply_run(run)
    await drive_to_evaluated(cluster, NS, NAME, shards=8, retention=0.5)
    status = await cluster.wait_phase(NS, NAME, "Failed")
    assert conditions(status)["Failed"] == ("True", "QualityGateFailed")
    assert cluster.get("Deployment", NS, f"{NAME}-serve")["spec"]["replicas"] == 1


async def test_a_failed_collection_shard_fails_the_run_with_the_shard_and_reason(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    await cluster.apply_run(example_run())
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-collect"), "the collection Job")

    # A shard pod fails and is retried: the run goes on, Degraded with reason Retrying.
    await cluster.create_shard_pod(
        NS, f"{NAME}-collect", 3, message="RuntimeError: teacher said 503", exit_code=1
    )
    await cluster.patch_status("Job", NS, f"{NAME}-collect", {"failed": 1, "active": 8})
    status = await cluster.wait_for(
        lambda: conditions(s := cluster.status(NS, NAME)).get("Degraded", ("",))[0] == "True" and s,
        "Degraded while a shard is retried",
    )
    assert status["phase"] == "Collecting" and conditions(status)["Degraded"][1] == "Retrying"

    # The shard runs out of retries: the Job fails with FailedIndexes, and so does the run.
    ok = [s for s in summaries(8) if s["shard"] != 3]
    await cluster.finish_collection(NS, NAME, ok, failed={3: "Traceback ...\nRuntimeError: teacher said 503"})
    status = await cluster.wait_phase(NS, NAME, "Failed")
    assert conditions(status)["Failed"] == ("True", "CollectionFailed")
    assert "FailedIndexes" in status["message"] and "failed shards: 3" in status["message"]
    assert "teacher said 503" in status["message"]
    assert status["collection"]["state"] == "Failed" and status["collection"]["done"] == 7 * 1498
    # No training starts, and nothing crash-loops: the status settles.
    assert not cluster.get("PyTorchJob", NS, f"{NAME}-train")
    writes = cluster.api.count("patch", "distillery.dev/distillationruns/status")
    await cluster.wait_for(lambda: len(cluster.events(NS, NAME)) >= 3, "the events")
    assert [e["reason"] for e in cluster.events(NS, NAME) if e["type"] == "Warning"] == [
        "Retrying",
        "CollectionFailed",
    ]
    await asyncio.sleep(1.5)
    assert cluster.api.count("patch", "distillery.dev/distillationruns/status") == writes


async def test_training_edit_restarts_from_training(cluster: Cluster, start_operator: StartOperator) -> None:
    await start_operator()
    await cluster.apply_run(example_run())
    await drive_to_evaluated(cluster, NS, NAME, shards=8)
    await cluster.wait_phase(NS, NAME, "Succeeded")

    await cluster.patch_spec(NS, NAME, {"training": {"epochs": 3}})
    status = await cluster.wait_for(
        lambda: (
            (s := cluster.status(NS, NAME)).get("phase") == "Training"
            and s.get("observedGeneration") == 2
            and s
        ),
        "the run to restart from training",
    )
    assert status["collection"]["state"] == "Succeeded"  # collection is kept
    assert status["training"]["state"] == "Running" and "results" not in status and "endpoint" not in status
    await cluster.wait_for(
        lambda: cluster.creations("PyTorchJob", NS, f"{NAME}-train") == 2, "a new PyTorchJob"
    )
    await cluster.wait_for(lambda: not cluster.get("Job", NS, f"{NAME}-eval"), "the old evaluation to go")
    await cluster.wait_for(
        lambda: not cluster.get("Deployment", NS, f"{NAME}-serve"), "the old serving to go"
    )
    assert cluster.creations("Job", NS, f"{NAME}-collect") == 1
    await cluster.wait_for(
        lambda: any(e["reason"] == "SpecChanged" for e in cluster.events(NS, NAME)), "a SpecChanged event"
    )

    # The new training runs to a new verdict.
    await cluster.finish_training(NS, NAME, progress(gpu_hours=3.0), started=now())
    await cluster.wait_for(lambda: cluster.get("Deployment", NS, f"{NAME}-serve"), "serving again")
    await cluster.roll_out(NS, f"{NAME}-serve")
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-eval"), "a new evaluation")
    await cluster.finish_evaluation(NS, NAME, results(0.93))
    status = await cluster.wait_phase(NS, NAME, "Succeeded")
    assert status["results"]["qualityRetention"] == 0.93 and status["results"]["cost"]["trainingUSD"] == 6.0
    assert beyond_rbac(cluster.api.audit) == {}


@pytest.mark.kubeflow(False)
async def test_without_kubeflow_training_is_an_indexed_job_with_a_headless_service(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    run = (
        make_run("small", "ns-1")
        .storage()
        .spec({"training": {"resources": {"nodes": 2, "gpusPerNode": 4}}})
        .obj()
    )
    await cluster.apply_run(run)
    await cluster.wait_for(lambda: cluster.get("Job", "ns-1", "small-collect"), "the collection Job")
    await cluster.finish_collection("ns-1", "small", summaries(1))
    job = await cluster.wait_for(lambda: cluster.get("Job", "ns-1", "small-train"), "the training Job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    # The Service is written in the same reconcile (server-side apply reads a missing child first, so it
    # may land a moment after the Job; the pods' rendezvous retries until it resolves).
    service = await cluster.wait_for(
        lambda: cluster.get("Service", "ns-1", "small-train"), "the rendezvous Service"
    )
    assert service["spec"]["clusterIP"] == "None"
    await cluster.create_shard_pod("ns-1", "small-train", 0, message=progress(gpu_hours=0.0))
    await cluster.patch_status(
        "Job",
        "ns-1",
        "small-train",
        {
            "startTime": "2026-01-01T00:00:00Z",
            "completionTime": "2026-01-01T00:30:00Z",
            "succeeded": 2,
            "conditions": [{"type": "Complete", "status": "True"}],
        },
    )
    status = await cluster.wait_phase("ns-1", "small", "Serving")
    # No GPU-hours in the report: 0.5 h x 2 nodes x 4 GPUs.
    assert status["training"]["gpuHours"] == 4.0
    await cluster.wait_for(
        lambda: not cluster.get("Service", "ns-1", "small-train"), "the rendezvous Service to go"
    )


async def test_a_self_hosted_teacher_is_served_first_and_torn_down_after_collection(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    run = make_run("white", "ns-1").self_hosted().kd().storage().obj()
    await cluster.apply_run(run)
    teacher = await cluster.wait_for(
        lambda: cluster.get("Deployment", "ns-1", "white-teacher"), "the teacher"
    )
    assert "--max-logprobs" in teacher["spec"]["template"]["spec"]["containers"][0]["args"]
    await cluster.wait_for(lambda: cluster.get("Service", "ns-1", "white-teacher"), "the teacher's Service")
    await cluster.wait_for(
        lambda: (
            "self-hosted teacher" in cluster.status("ns-1", "white").get("collection", {}).get("message", "")
        ),
        "the status to say so",
    )
    assert not cluster.get("Job", "ns-1", "white-collect")

    await cluster.roll_out("ns-1", "white-teacher")
    await cluster.wait_for(lambda: cluster.get("Job", "ns-1", "white-collect"), "the collection Job")
    config = cluster.get("ConfigMap", "ns-1", "white-config")
    assert "baseURL: http://white-teacher.ns-1.svc:8000/v1" in config["data"]["stage.yaml"]
    await cluster.finish_collection("ns-1", "white", summaries(1))
    await cluster.wait_phase("ns-1", "white", "Training")
    await cluster.wait_for(
        lambda: not cluster.get("Deployment", "ns-1", "white-teacher"), "the teacher to go"
    )
    await cluster.wait_for(lambda: not cluster.get("Service", "ns-1", "white-teacher"), "its Service to go")


async def test_an_on_policy_run_keeps_its_self_hosted_teacher_through_training_then_tears_it_down(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    """training.method onPolicy: the teacher's server scores the student's samples at every step, so
    ``<run>-teacher`` and its Service outlive the collection and go once the training has ended. The
    test plays the Deployment, Job and training-operator controllers (the emulator has none)."""
    await start_operator()
    run = make_run("onp", "ns-1").self_hosted().storage().spec({"training": {"method": "onPolicy"}}).obj()
    await cluster.apply_run(run)
    await cluster.wait_for(lambda: cluster.get("Deployment", "ns-1", "onp-teacher"), "the teacher")
    await cluster.roll_out("ns-1", "onp-teacher")
    await cluster.wait_for(lambda: cluster.get("Job", "ns-1", "onp-collect"), "the collection Job")
    await cluster.finish_collection("ns-1", "onp", summaries(1))
    await cluster.wait_for(lambda: cluster.get("PyTorchJob", "ns-1", "onp-train"), "the training")
    started = now()
    await cluster.start_training("ns-1", "onp")
    await cluster.wait_for(
        lambda: cluster.get("PyTorchJob", "ns-1", "onp-train")["status"].get("startTime"), "it to run"
    )
    await asyncio.sleep(1.0)  # a few passes of the operator while training runs: the teacher stays
    assert cluster.status("ns-1", "onp")["phase"] == "Training"
    assert cluster.get("Deployment", "ns-1", "onp-teacher") and cluster.get("Service", "ns-1", "onp-teacher")
    config = cluster.get("ConfigMap", "ns-1", "onp-config")
    assert "baseURL: http://onp-teacher.ns-1.svc:8000/v1" in config["data"]["stage.yaml"]

    await cluster.finish_training("ns-1", "onp", progress(), started=started)
    await cluster.wait_for(lambda: not cluster.get("Deployment", "ns-1", "onp-teacher"), "the teacher to go")
    await cluster.wait_for(lambda: not cluster.get("Service", "ns-1", "onp-teacher"), "its Service to go")
    await cluster.wait_for(lambda: cluster.get("Deployment", "ns-1", "onp-serve"), "the student's serving")


async def test_a_spec_the_operator_cannot_run_fails_with_its_field_path(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    await cluster.apply_run(make_run("nostore", "ns-1").obj())  # no spec.storage
    status = await cluster.wait_phase("ns-1", "nostore", "Failed")
    assert conditions(status)["Failed"] == ("True", "InvalidSpec")
    assert "spec.storage: required in a cluster" in status["message"]
    assert cluster.children("ns-1", "nostore") == {}


async def test_a_namespaced_operator_leaves_other_namespaces_alone(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator("--namespace", "ns-1")
    await cluster.apply_run(make_run("mine", "ns-1").storage().obj())
    await cluster.apply_run(make_run("theirs", "ns-2").storage().obj())
    await cluster.wait_phase("ns-1", "mine", "Collecting")
    await asyncio.sleep(1.0)
    assert cluster.status("ns-2", "theirs") == {} and cluster.children("ns-2", "theirs") == {}
    assert beyond_rbac(cluster.api.audit) == {}
    assert {e.namespace for e in cluster.api.audit if e.resource == "batch/jobs" and e.verb == "watch"} == {
        "ns-1"
    }
